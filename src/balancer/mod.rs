//! `BalancerActor`: one per worker thread, owner of that worker's server lists (one per
//! pool) and their cursors.
//!
//! It is started inside the `HttpServer::new` factory, so it runs on the same arbiter as the
//! handlers that ask it for a server: a `send().await` to it never crosses a thread (see
//! DESIGN.md for the measurements). It learns about health and membership only through the
//! [`ServerEvent`]s it is sent, from whoever it joined at start (the HealthActor, wired in
//! `lib.rs`; this module knows nothing of it), and it keeps the in-flight count of every
//! server from [`NextServer`] and the [`Lease`]s it hands out. The logic is the plain
//! [`Pools`] of [`ServerList`](list::ServerList)s (`pools.rs`, `list.rs`); the actor is a thin shell
//! around it. It must not block, and must not share its lists with another thread.

mod list;
mod pools;

use std::{
    cell::Cell,
    future::Future,
    sync::{
        atomic::{AtomicI64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use actix::prelude::*;

use self::pools::Pools;
use crate::{
    config,
    metrics::Metrics,
    sticky::ServerId,
    upstream::{PoolId, Upstream},
};

/// The worker-local balancer: every pool's [`ServerList`](list::ServerList) behind a
/// mailbox.
pub struct BalancerActor {
    pools: Pools,
    /// Where a server whose failures in a row reached its pool's `eject_after_5xx` is
    /// reported (the HealthActor decides).
    eject: Recipient<Eject>,
    /// This worker's share of the in-flight gauge (only this worker writes it).
    in_flight: Arc<AtomicI64>,
}

impl BalancerActor {
    /// Starts a balancer on the current arbiter. `join` is given the balancer's recipients
    /// and answers with the current server list; until that answer arrives the balancer
    /// holds every other message back, so no request sees an empty list at start.
    pub fn start<F>(
        metrics: Arc<Metrics>,
        eject: Recipient<Eject>,
        join: impl FnOnce(BalancerHandles) -> F,
    ) -> Addr<Self>
    where
        F: Future<Output = Result<ServerEvent, MailboxError>> + 'static,
    {
        BalancerActor::create(move |ctx| {
            let address = ctx.address();
            let joined = join(BalancerHandles {
                events: address.clone().recipient(),
                list: address.recipient(),
            });
            // `wait` is used only here, at start-up.
            ctx.wait(
                actix::fut::wrap_future::<_, Self>(joined).map(|snapshot, act, _| {
                    if let Ok(snapshot) = snapshot {
                        act.pools.apply(snapshot.for_worker());
                    }
                }),
            );
            BalancerActor {
                pools: Pools::default(),
                eject,
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
}

/// Asks for the server of `pool` the next request goes to; the answer is a [`Lease`] on it.
#[derive(Debug)]
pub struct NextServer {
    /// The pool the request was routed to.
    pub pool: PoolId,
    /// The request's hash key (`hash_on`), for `consistent_hash`.
    pub key: Option<u64>,
    /// The server the request's sticky cookie names, if it named a valid one.
    pub sticky: Option<ServerId>,
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
    /// How the request ended on the server, told to the balancer with the lease's end.
    outcome: Cell<Outcome>,
}

impl Lease {
    /// The server leased.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// The server answered with `status`, its head `head_time` after the request.
    pub fn answered(&self, status: u16, head_time: Duration) {
        self.outcome.set(Outcome {
            status: Some(status),
            failed: false,
            head_time: Some(head_time),
        });
    }

    /// The server could not be reached, or did not answer in time.
    pub fn failed(&self) {
        self.outcome.set(Outcome {
            status: None,
            failed: true,
            head_time: None,
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.balancer.do_send(RequestEnded {
            upstream: Arc::clone(&self.upstream),
            outcome: self.outcome.get(),
        });
    }
}

/// How a request ended on its server, as far as the balancer cares.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// The answer's status; `None` without one (a failure, or a client that left first).
    pub status: Option<u16>,
    /// No answer: the connection failed or the server did not answer in time.
    pub failed: bool,
    /// From the request to the answer's head (`peak_ewma` learns from it).
    pub head_time: Option<Duration>,
}

impl Handler<NextServer> for BalancerActor {
    type Result = Option<Lease>;

    fn handle(&mut self, msg: NextServer, ctx: &mut Self::Context) -> Self::Result {
        let upstream = self
            .pools
            .begin(msg.pool, &msg.tried, msg.key, msg.sticky)?;
        self.in_flight.fetch_add(1, Relaxed);
        Some(Lease {
            upstream,
            balancer: ctx.address(),
            outcome: Cell::default(),
        })
    }
}

/// A request's [`Lease`] has ended; sent by its `Drop`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct RequestEnded {
    upstream: Arc<Upstream>,
    outcome: Outcome,
}

impl Handler<RequestEnded> for BalancerActor {
    type Result = ();

    fn handle(&mut self, msg: RequestEnded, _: &mut Self::Context) {
        self.in_flight.fetch_sub(1, Relaxed);
        if self.pools.end(&msg.upstream, msg.outcome) {
            self.eject.do_send(Eject {
                pool: msg.upstream.pool,
                label: Arc::from(&*msg.upstream.label),
            });
        }
    }
}

/// A server's 5xx answers, failed connections or time-outs in a row, as one worker counted
/// them, reached its pool's `eject_after_5xx`: the HealthActor decides whether it goes out.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Eject {
    pub pool: PoolId,
    pub label: Arc<str>,
}

/// A pool as the registry announces it to the balancers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub id: PoolId,
    pub name: Arc<str>,
    pub strategy: config::Strategy,
    /// Percent in rotation below which the pool uses every server (0: never).
    pub panic_threshold: u8,
    /// Failures in a row a worker reports for ejection (0: none).
    pub eject_after_5xx: u32,
    /// Gone from the configuration: its servers show as draining, and requests that an
    /// older route table sent to it are still served, until the registry removes them.
    pub retired: bool,
}

/// A change in the server set, broadcast by the registry to every worker's balancer.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum ServerEvent {
    /// Every pool and every server with its health; replaces what the balancer had.
    Snapshot {
        pools: Vec<PoolSpec>,
        servers: Vec<ServerState>,
    },
    /// The pools now (a reload): new ones start empty, strategies apply, one not listed
    /// drains and goes.
    Pools(Vec<PoolSpec>),
    /// A server went in or out of rotation.
    Health {
        pool: PoolId,
        label: Arc<str>,
        healthy: bool,
    },
    /// A server was added at runtime (its pool is the upstream's).
    Added {
        upstream: Arc<Upstream>,
        healthy: bool,
    },
    /// A server's weight changed (a reload).
    Reweighted { upstream: Arc<Upstream> },
    /// A server was removed: no new requests; gone once its in-flight ones end.
    Removed { pool: PoolId, label: Arc<str> },
    /// A server was ejected for its failures, or came back.
    Ejected {
        pool: PoolId,
        label: Arc<str>,
        ejected: bool,
    },
}

/// A server and its state, as a snapshot lists it.
#[derive(Debug, Clone)]
pub struct ServerState {
    pub upstream: Arc<Upstream>,
    pub healthy: bool,
    pub ejected: bool,
}

impl ServerEvent {
    /// The event with this worker's own copy of each server in it: the `Arc` cloned and
    /// dropped per request, and the counters, are then the worker's alone.
    fn for_worker(self) -> ServerEvent {
        let own = |u: Arc<Upstream>| Arc::new(u.for_worker());
        match self {
            ServerEvent::Snapshot { pools, servers } => ServerEvent::Snapshot {
                pools,
                servers: servers
                    .into_iter()
                    .map(|s| ServerState {
                        upstream: own(s.upstream),
                        ..s
                    })
                    .collect(),
            },
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

impl Handler<ServerEvent> for BalancerActor {
    type Result = ();

    fn handle(&mut self, event: ServerEvent, _: &mut Self::Context) {
        self.pools.apply(event.for_worker());
    }
}

/// One server as this worker sees it, for the admin API.
#[derive(Debug, Clone)]
pub struct ServerView {
    pub upstream: Arc<Upstream>,
    /// In rotation by the health checks and not ejected.
    pub healthy: bool,
    pub draining: bool,
    pub ejected: bool,
    pub in_flight: u32,
}

/// Asks for this worker's view of every server of every pool (draining ones included).
#[derive(Debug, Message)]
#[rtype(result = "Vec<ServerView>")]
pub struct ListServers;

impl Handler<ListServers> for BalancerActor {
    type Result = MessageResult<ListServers>;

    fn handle(&mut self, _: ListServers, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.pools.views())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut pools = config.pools.clone();
        pools[0].health_check = HealthCheckSection {
            interval: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        let metrics = Arc::new(Metrics::new());
        let health = HealthActor::new(
            &pools,
            &Default::default(),
            config.upstream_tls,
            metrics.clone(),
        )
        .start();
        let eject = health.clone().recipient();
        let balancer = BalancerActor::start(metrics, eject, move |balancer| {
            health.send(Register {
                balancer,
                limiter: None,
            })
        });
        let next = || NextServer {
            pool: PoolId::DEFAULT,
            key: None,
            sticky: None,
            tried: Vec::new(),
        };
        let in_flight = async || balancer.send(ListServers).await.unwrap()[0].in_flight;
        drop(balancer.send(next()).await.unwrap());
        assert_eq!(in_flight().await, 0);

        // The request is queued and handled, but whoever asked has gone before reading it.
        let unread = balancer.send(next());
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
