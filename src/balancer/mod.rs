//! `BalancerActor`: one per worker thread, owner of that worker's server list and cursor.
//!
//! It is started inside the `HttpServer::new` factory, so it runs on the same arbiter as the
//! handlers that ask it for a server: a `send().await` to it never crosses a thread (see
//! DESIGN.md for the measurements). It learns about health and membership only through the
//! [`ServerEvent`]s it is sent, from whoever it joined at start (the HealthActor, wired in
//! `lib.rs`; this module knows nothing of it), and it keeps the in-flight count of every
//! server from [`NextServer`] and the [`Lease`]s it hands out. The logic is the plain
//! [`ServerList`]; the actor is a thin shell around it. It must not block, and must not
//! share its list with another thread.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        atomic::{AtomicI64, Ordering::Relaxed},
        Arc,
    },
};

use actix::prelude::*;

use crate::{
    config,
    metrics::Metrics,
    strategy::{self, Slot, Strategy},
    upstream::Upstream,
};

/// A worker's servers, their health as last broadcast, and the strategy's cursor.
pub struct ServerList {
    slots: Vec<Slot>,
    /// Label → index in `slots`; rebuilt whenever the list changes shape. Read on every
    /// request's end: a fast hash.
    index: HashMap<Arc<str>, usize, foldhash::fast::RandomState>,
    strategy: Box<dyn Strategy>,
}

impl ServerList {
    /// An empty list balanced by `strategy`.
    pub fn new(strategy: Box<dyn Strategy>) -> Self {
        Self {
            slots: Vec::new(),
            index: HashMap::default(),
            strategy,
        }
    }

    fn position(&self, label: &str) -> Option<usize> {
        self.index.get(label).copied()
    }

    /// After an insertion or removal: indices moved, the strategy's cursor follows.
    fn reshaped(&mut self) {
        self.index = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.upstream.label.clone(), i))
            .collect();
        self.strategy.resize(&self.slots);
    }

    /// Applies a change broadcast by the registry.
    pub fn apply(&mut self, event: ServerEvent) {
        match event {
            ServerEvent::Snapshot(servers) => {
                // Keep the in-flight counts of servers that stay, so their ends still balance.
                let mut next: Vec<Slot> = servers
                    .into_iter()
                    .map(|(upstream, healthy)| {
                        let in_flight = self
                            .position(&upstream.label)
                            .map_or(0, |i| self.slots[i].in_flight);
                        Slot {
                            upstream,
                            healthy,
                            draining: false,
                            in_flight,
                        }
                    })
                    .collect();
                let listed: std::collections::HashSet<Arc<str>> =
                    next.iter().map(|s| s.upstream.label.clone()).collect();
                for old in self.slots.drain(..) {
                    if old.in_flight > 0 && !listed.contains(&old.upstream.label) {
                        next.push(Slot {
                            draining: true,
                            ..old
                        });
                    }
                }
                self.slots = next;
                self.reshaped();
            }
            ServerEvent::Health { label, healthy } => {
                if let Some(i) = self.position(&label) {
                    self.slots[i].healthy = healthy;
                }
            }
            ServerEvent::Added { upstream, healthy } => match self.position(&upstream.label) {
                // Re-added while still draining: it simply stays.
                Some(i) => {
                    let slot = &mut self.slots[i];
                    slot.upstream = upstream;
                    slot.healthy = healthy;
                    slot.draining = false;
                }
                None => {
                    self.slots.push(Slot {
                        upstream,
                        healthy,
                        draining: false,
                        in_flight: 0,
                    });
                    self.reshaped();
                }
            },
            ServerEvent::Reweighted { upstream } => {
                if let Some(i) = self.position(&upstream.label) {
                    self.slots[i].upstream = upstream;
                    // nginx starts the weighted scores again when the peers change.
                    self.strategy.resize(&self.slots);
                }
            }
            ServerEvent::Removed { label } => {
                if let Some(i) = self.position(&label) {
                    if self.slots[i].in_flight == 0 {
                        self.slots.remove(i);
                        self.reshaped();
                    } else {
                        self.slots[i].draining = true;
                    }
                }
            }
        }
    }

    /// Chooses the server for a request, skipping those in `tried`, and counts the request
    /// in flight there.
    pub fn begin(&mut self, tried: &[Arc<Upstream>]) -> Option<Arc<Upstream>> {
        let slots = &self.slots;
        let usable = |i: usize| {
            let s = &slots[i];
            s.healthy && !s.draining && !tried.iter().any(|t| t.label == s.upstream.label)
        };
        let i = self.strategy.pick(slots, &usable)?;
        let slot = &mut self.slots[i];
        slot.in_flight += 1;
        Some(slot.upstream.clone())
    }

    /// A request on `label` ended; a draining server goes once its last one has.
    pub fn end(&mut self, label: &str) {
        // By label, not by `Arc`: a server removed and added back while this request was in
        // flight keeps its slot (and count) under a new `Upstream`; labels are unique here.
        if let Some(i) = self.position(label) {
            let slot = &mut self.slots[i];
            slot.in_flight = slot.in_flight.saturating_sub(1);
            if slot.draining && slot.in_flight == 0 {
                self.slots.remove(i);
                self.reshaped();
            }
        }
    }

    /// Balances by `strategy` from now on.
    pub fn set_strategy(&mut self, mut strategy: Box<dyn Strategy>) {
        strategy.resize(&self.slots);
        self.strategy = strategy;
    }

    /// This worker's view of every server, draining ones included.
    pub fn views(&self) -> Vec<ServerView> {
        self.slots
            .iter()
            .map(|s| ServerView {
                upstream: s.upstream.clone(),
                healthy: s.healthy,
                draining: s.draining,
                in_flight: s.in_flight,
            })
            .collect()
    }
}

/// The worker-local balancer: a [`ServerList`] behind a mailbox.
pub struct BalancerActor {
    list: ServerList,
    /// This worker's share of the in-flight gauge (only this worker writes it).
    in_flight: Arc<AtomicI64>,
}

impl BalancerActor {
    /// Starts a balancer on the current arbiter. `join` is given the balancer's recipients
    /// and answers with the current server list; until that answer arrives the balancer
    /// holds every other message back, so no request sees an empty list at start.
    pub fn start<F>(
        strategy: Box<dyn Strategy>,
        metrics: Arc<Metrics>,
        join: impl FnOnce(BalancerHandles) -> F,
    ) -> Addr<Self>
    where
        F: Future<Output = Result<ServerEvent, MailboxError>> + 'static,
    {
        BalancerActor::create(move |ctx| {
            let address = ctx.address();
            let joined = join(BalancerHandles {
                events: address.clone().recipient(),
                list: address.clone().recipient(),
                rebalance: address.recipient(),
            });
            // `wait` is used only here, at start-up.
            ctx.wait(
                actix::fut::wrap_future::<_, Self>(joined).map(|snapshot, act, _| {
                    if let Ok(snapshot) = snapshot {
                        act.list.apply(snapshot.for_worker());
                    }
                }),
            );
            BalancerActor {
                list: ServerList::new(strategy),
                in_flight: metrics.worker_in_flight(),
            }
        })
    }
}

impl Actor for BalancerActor {
    type Context = Context<Self>;
}

/// Where a balancer is told of changes and asked for its view.
pub struct BalancerHandles {
    pub events: Recipient<ServerEvent>,
    pub list: Recipient<ListServers>,
    pub rebalance: Recipient<Rebalance>,
}

/// Asks for the server the next request goes to; the answer is a [`Lease`] on it.
#[derive(Debug, Default)]
pub struct NextServer {
    /// Servers this request already failed to reach; they are not chosen again.
    pub tried: Vec<Arc<Upstream>>,
}

impl Message for NextServer {
    type Result = Option<Lease>;
}

/// One request's claim on a server: while it lives, the request counts as in flight there
/// (this worker's count, and the process's gauge).
///
/// Dropping it ends the count, however the request ended: answered, failed, or abandoned
/// by a client that went away, even before the handler received the reply that carries it.
#[derive(Debug)]
pub struct Lease {
    upstream: Arc<Upstream>,
    balancer: Addr<BalancerActor>,
}

impl Lease {
    /// The server leased.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.balancer
            .do_send(RequestEnded(Arc::clone(&self.upstream)));
    }
}

impl Handler<NextServer> for BalancerActor {
    type Result = Option<Lease>;

    fn handle(&mut self, msg: NextServer, ctx: &mut Self::Context) -> Self::Result {
        let upstream = self.list.begin(&msg.tried)?;
        self.in_flight.fetch_add(1, Relaxed);
        Some(Lease {
            upstream,
            balancer: ctx.address(),
        })
    }
}

/// A request's [`Lease`] has ended; sent by its `Drop`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct RequestEnded(Arc<Upstream>);

impl Handler<RequestEnded> for BalancerActor {
    type Result = ();

    fn handle(&mut self, RequestEnded(upstream): RequestEnded, _: &mut Self::Context) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.list.end(&upstream.label);
    }
}

/// A change in the server set, broadcast by the registry to every worker's balancer.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum ServerEvent {
    /// The whole list with each server's health; replaces what the balancer had.
    Snapshot(Vec<(Arc<Upstream>, bool)>),
    /// A server went in or out of rotation.
    Health { label: Arc<str>, healthy: bool },
    /// A server was added at runtime.
    Added {
        upstream: Arc<Upstream>,
        healthy: bool,
    },
    /// A server's weight changed (a reload).
    Reweighted { upstream: Arc<Upstream> },
    /// A server was removed at runtime: no new requests; gone once its in-flight ones end.
    Removed { label: Arc<str> },
}

impl ServerEvent {
    /// The event with this worker's own copy of each server in it: the `Arc` cloned and
    /// dropped per request, and the counters, are then the worker's alone.
    fn for_worker(self) -> ServerEvent {
        let own = |u: Arc<Upstream>| Arc::new(u.for_worker());
        match self {
            ServerEvent::Snapshot(servers) => {
                ServerEvent::Snapshot(servers.into_iter().map(|(u, h)| (own(u), h)).collect())
            }
            ServerEvent::Added { upstream, healthy } => ServerEvent::Added {
                upstream: own(upstream),
                healthy,
            },
            ServerEvent::Reweighted { upstream } => ServerEvent::Reweighted {
                upstream: own(upstream),
            },
            other => other,
        }
    }
}

/// Balance by another strategy from now on (a reload).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Rebalance(pub config::Strategy);

impl Handler<Rebalance> for BalancerActor {
    type Result = ();

    fn handle(&mut self, Rebalance(kind): Rebalance, _: &mut Self::Context) {
        self.list.set_strategy(strategy::from_config(kind));
    }
}

impl Handler<ServerEvent> for BalancerActor {
    type Result = ();

    fn handle(&mut self, event: ServerEvent, _: &mut Self::Context) {
        self.list.apply(event.for_worker());
    }
}

/// One server as this worker sees it, for the admin API.
#[derive(Debug, Clone)]
pub struct ServerView {
    pub upstream: Arc<Upstream>,
    pub healthy: bool,
    pub draining: bool,
    pub in_flight: u32,
}

/// Asks for this worker's view of every server (draining ones included).
#[derive(Debug, Message)]
#[rtype(result = "Vec<ServerView>")]
pub struct ListServers;

impl Handler<ListServers> for BalancerActor {
    type Result = MessageResult<ListServers>;

    fn handle(&mut self, _: ListServers, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.list.views())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::RoundRobin;

    fn upstream(port: u16) -> Arc<Upstream> {
        Upstream::local(port)
    }

    fn list_of(ports: &[u16]) -> ServerList {
        let mut list = ServerList::new(Box::new(RoundRobin::default()));
        list.apply(ServerEvent::Snapshot(
            ports.iter().map(|&p| (upstream(p), true)).collect(),
        ));
        list
    }

    fn ports(list: &ServerList) -> Vec<u16> {
        list.views()
            .iter()
            .map(|v| v.upstream.url.port().unwrap())
            .collect()
    }

    #[test]
    fn requests_go_round_and_skip_the_servers_already_tried() {
        let mut list = list_of(&[1, 2, 3]);
        let picked: Vec<u16> = (0..4)
            .map(|_| list.begin(&[]).unwrap().url.port().unwrap())
            .collect();
        assert_eq!(picked, [1, 2, 3, 1]);
        let tried = [upstream(2)];
        assert_eq!(list.begin(&tried).unwrap().url.port(), Some(3));
    }

    #[test]
    fn a_removed_server_drains_and_goes_with_its_last_request() {
        let mut list = list_of(&[1, 2]);
        let first = list.begin(&[]).unwrap();
        list.apply(ServerEvent::Removed {
            label: first.label.clone(),
        });
        assert_eq!(
            ports(&list),
            [1, 2],
            "still listed while a request is in flight"
        );
        assert!(list.views()[0].draining);
        assert_eq!(
            list.begin(&[]).unwrap().url.port(),
            Some(2),
            "no new requests"
        );
        list.end(&first.label);
        assert_eq!(ports(&list), [2]);
    }

    #[test]
    fn a_snapshot_keeps_the_counts_of_servers_that_stay_and_drains_those_that_leave() {
        let mut list = list_of(&[1, 2]);
        let one = list.begin(&[]).unwrap();
        let two = list.begin(&[]).unwrap();
        list.apply(ServerEvent::Snapshot(vec![(upstream(2), true)]));
        let views = list.views();
        assert_eq!(ports(&list), [2, 1]);
        assert_eq!((views[0].in_flight, views[0].draining), (1, false));
        assert_eq!((views[1].in_flight, views[1].draining), (1, true));
        list.end(&one.label);
        list.end(&two.label);
        assert_eq!(ports(&list), [2]);
        assert_eq!(list.views()[0].in_flight, 0);
    }

    #[test]
    fn a_server_re_added_while_draining_stays_in_rotation() {
        let mut list = list_of(&[1]);
        let lease = list.begin(&[]).unwrap();
        list.apply(ServerEvent::Removed {
            label: lease.label.clone(),
        });
        list.apply(ServerEvent::Added {
            upstream: upstream(1),
            healthy: true,
        });
        list.end(&lease.label);
        assert_eq!(ports(&list), [1]);
        assert!(!list.views()[0].draining);
        assert!(list.begin(&[]).is_some());
    }

    #[test]
    fn an_unhealthy_server_gets_nothing_until_it_is_back() {
        let mut list = list_of(&[1]);
        let label = upstream(1).label.clone();
        list.apply(ServerEvent::Health {
            label: label.clone(),
            healthy: false,
        });
        assert!(list.begin(&[]).is_none());
        list.apply(ServerEvent::Health {
            label,
            healthy: true,
        });
        assert!(list.begin(&[]).is_some());
    }

    #[actix_rt::test]
    async fn a_lease_whose_reply_is_never_read_still_ends_its_count() {
        use crate::{
            config::{Config, HealthCheckSection},
            health::{HealthActor, Register},
        };
        // Nobody listens on port 9: the one probe at start fails, and an hour's interval
        // keeps the server in rotation meanwhile.
        let config = Config::from_toml_with_env(
            "t.toml",
            "[balancer]\nservers = [\"http://127.0.0.1:9\"]",
            Some(Default::default()),
        )
        .unwrap();
        let settings = HealthCheckSection {
            interval: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        let metrics = Arc::new(Metrics::new());
        let health = HealthActor::new(
            &config.servers,
            settings,
            config.upstream_tls,
            metrics.clone(),
        )
        .start();
        let balancer = BalancerActor::start(
            strategy::from_config(config::Strategy::RoundRobin),
            metrics,
            move |balancer| {
                health.send(Register {
                    balancer,
                    limiter: None,
                })
            },
        );
        let in_flight = async || balancer.send(ListServers).await.unwrap()[0].in_flight;
        drop(balancer.send(NextServer::default()).await.unwrap());
        assert_eq!(in_flight().await, 0);

        // The request is queued and handled, but whoever asked has gone before reading it.
        let unread = balancer.send(NextServer::default());
        for _ in 0..10 {
            actix_rt::task::yield_now().await;
        }
        drop(unread);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while in_flight().await != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the count never ended"
            );
            actix_rt::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
