//! `BalancerActor`: one per worker thread, owner of that worker's server lists (one per
//! pool) and their cursors.
//!
//! It is started inside the `HttpServer::new` factory, so it runs on the same arbiter as the
//! handlers that ask it for a server: nothing here crosses a thread (see DESIGN.md for the
//! measurements). It learns about health and membership only through the [`ServerEvent`]s
//! it is sent, from whoever it joined at start (the HealthActor, wired in `lib.rs`; this
//! module knows nothing of it), and it is their only writer. The lists live in a
//! [`Balancer`] that the actor shares with the worker's handlers (`Rc<Balancer>`, never
//! leaving the thread): a handler takes its [`Lease`] from it and the lease's end gives it
//! back synchronously, without a message (DESIGN.md: a same-worker message costs more than
//! 2% of a request's instructions). The logic is the plain [`Pools`] of
//! [`ServerList`](list::ServerList)s (`pools.rs`, `list.rs`); the actor is a thin shell around it. It
//! must not block, and must not share its lists with another thread.

mod list;
mod pools;

use std::{
    cell::{Cell, RefCell},
    future::Future,
    rc::Rc,
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

/// One worker's server lists, shared by its [`BalancerActor`] (the only one to apply
/// [`ServerEvent`]s to them) and its handlers (which begin and end requests on them,
/// synchronously). Never leaves the worker's thread.
pub struct Balancer {
    pools: RefCell<Pools>,
    /// The first snapshot has been applied. Until then a request asks the actor, which
    /// holds every message back until it has: no request sees an empty list at start.
    ready: Cell<bool>,
    /// Where a server whose failures in a row reached its pool's `eject_after_5xx` is
    /// reported (the HealthActor decides).
    eject: Recipient<Eject>,
    /// This worker's share of the in-flight gauge (only this worker writes it).
    in_flight: Arc<AtomicI64>,
}

impl Balancer {
    /// Chooses a server of `pool` for a request and counts it in flight there (see
    /// [`Pools::begin`]); `None` when the pool has none in rotation.
    fn begin(self: &Rc<Self>, next: &NextServer) -> Option<Lease> {
        let upstream =
            self.pools
                .borrow_mut()
                .begin(next.pool, &next.tried, next.key, next.sticky)?;
        self.in_flight.fetch_add(1, Relaxed);
        Some(Lease {
            upstream,
            balancer: self.clone(),
            outcome: Cell::default(),
        })
    }

    /// A request on `upstream` ended so.
    fn end(&self, upstream: &Upstream, outcome: Outcome) {
        self.in_flight.fetch_sub(1, Relaxed);
        if self.pools.borrow_mut().end(upstream, outcome) {
            self.eject.do_send(Eject {
                pool: upstream.pool,
                label: Arc::from(&*upstream.label),
            });
        }
    }
}

/// A worker's way to its balancer: the shared lists, and the actor for the time before
/// its first snapshot.
#[derive(Clone)]
pub struct BalancerHandle {
    state: Rc<Balancer>,
    actor: Addr<BalancerActor>,
}

impl BalancerHandle {
    /// A lease on the server of `next.pool` the request goes to: taken from the worker's
    /// lists at once, or, before the balancer has its first snapshot, from the actor once
    /// it has. `Ok(None)`: the pool has no server in rotation.
    pub async fn lease(&self, next: NextServer) -> Result<Option<Lease>, MailboxError> {
        if let Some(lease) = self.lease_now(&next) {
            return Ok(lease);
        }
        self.actor.send(WhenReady).await?;
        Ok(self.state.begin(&next))
    }

    /// [`lease`](Self::lease) when it needs no wait (every request once the balancer has
    /// its first snapshot); `None` before. A handler asks this first and awaits `lease`
    /// only when it must, so that its future does not hold the wait's.
    pub fn lease_now(&self, next: &NextServer) -> Option<Option<Lease>> {
        self.state.ready.get().then(|| self.state.begin(next))
    }

    /// The actor (the registry is handed its recipients at start).
    #[cfg(test)]
    pub fn actor(&self) -> &Addr<BalancerActor> {
        &self.actor
    }
}

/// The worker-local balancer: every pool's [`ServerList`](list::ServerList) behind a
/// mailbox, for the events that change them and the admin API's view of them.
pub struct BalancerActor {
    state: Rc<Balancer>,
}

impl BalancerActor {
    /// Starts a balancer on the current arbiter. `join` is given the balancer's recipients
    /// and answers with the current server list; until that answer arrives the balancer
    /// holds every other message back, and handlers ask it rather than the lists, so no
    /// request sees an empty list at start.
    pub fn start<F>(
        metrics: Arc<Metrics>,
        eject: Recipient<Eject>,
        join: impl FnOnce(BalancerHandles) -> F,
    ) -> BalancerHandle
    where
        F: Future<Output = Result<ServerEvent, MailboxError>> + 'static,
    {
        let state = Rc::new(Balancer {
            pools: RefCell::new(Pools::default()),
            ready: Cell::new(false),
            eject,
            in_flight: metrics.worker_in_flight(),
        });
        let shared = state.clone();
        let actor = BalancerActor::create(move |ctx| {
            let address = ctx.address();
            let joined = join(BalancerHandles {
                events: address.clone().recipient(),
                list: address.recipient(),
            });
            // `wait` is used only here, at start-up.
            ctx.wait(
                actix::fut::wrap_future::<_, Self>(joined).map(|snapshot, act, _| {
                    if let Ok(snapshot) = snapshot {
                        act.state.pools.borrow_mut().apply(snapshot.for_worker());
                    }
                    act.state.ready.set(true);
                }),
            );
            BalancerActor { state: shared }
        });
        BalancerHandle { state, actor }
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

/// What a request asks its balancer for: a server of `pool`, as a [`Lease`] on it.
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

/// Answered once the balancer has its first snapshot (the actor holds it until then).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct WhenReady;

impl Handler<WhenReady> for BalancerActor {
    type Result = ();

    fn handle(&mut self, _: WhenReady, _: &mut Self::Context) {}
}

/// One request's claim on a server: while it lives, the request counts as in flight there
/// (this worker's count, and the process's gauge).
///
/// Dropping it ends the count, however the request ended: answered, failed, or abandoned
/// by a client that went away.
pub struct Lease {
    upstream: Arc<Upstream>,
    balancer: Rc<Balancer>,
    /// How the request ended on the server, told to the balancer with the lease's end.
    outcome: Cell<Outcome>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("upstream", &self.upstream.label)
            .field("outcome", &self.outcome.get())
            .finish()
    }
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
        self.balancer.end(&self.upstream, self.outcome.get());
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
        self.state.pools.borrow_mut().apply(event.for_worker());
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
        MessageResult(self.state.pools.borrow().views())
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    /// Stands in for the HealthActor: takes ejections and does nothing.
    struct Ignore;

    impl Actor for Ignore {
        type Context = Context<Self>;
    }

    impl Handler<Eject> for Ignore {
        type Result = ();

        fn handle(&mut self, _: Eject, _: &mut Self::Context) {}
    }

    #[actix_rt::test]
    async fn a_request_before_the_first_snapshot_waits_for_it_and_its_lease_ends_its_count() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let health = Ignore.start().recipient();
        let server = Upstream::local(9);
        let snapshot = ServerEvent::Snapshot {
            pools: vec![PoolSpec {
                id: PoolId::DEFAULT,
                name: "default".into(),
                strategy: config::Strategy::RoundRobin,
                panic_threshold: 0,
                eject_after_5xx: 0,
                retired: false,
            }],
            servers: vec![ServerState {
                upstream: server,
                healthy: true,
                ejected: false,
            }],
        };
        let balancer = BalancerActor::start(Arc::new(Metrics::new()), health, move |_| async {
            let _ = rx.await;
            Ok(snapshot)
        });
        let next = || NextServer {
            pool: PoolId::DEFAULT,
            key: None,
            sticky: None,
            tried: Vec::new(),
        };
        let asked = balancer.lease(next());
        tokio::pin!(asked);
        for _ in 0..10 {
            actix_rt::task::yield_now().await;
            assert!(asked.as_mut().now_or_never().is_none(), "no list yet");
        }
        tx.send(()).unwrap();
        let lease = asked.await.unwrap().expect("the snapshot's server");
        let in_flight = async || balancer.actor().send(ListServers).await.unwrap()[0].in_flight;
        assert_eq!(in_flight().await, 1);
        drop(lease);
        assert_eq!(in_flight().await, 0, "ended at once, no message");
    }
}
