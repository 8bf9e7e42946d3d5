//! `HealthActor`: one per process, the single owner of health truth and of the
//! [`Registry`].
//!
//! Every pool's `health_check.interval` it probes every server of that pool with
//! `GET url + path`, all at once, each bounded by the pool's `health_check.timeout`, so a
//! hung server never delays another's check or the next round. A server in two pools is
//! probed and counted in each. Results, and the passive failures the handlers report when they cannot
//! connect, go through [`HealthState`] (HAProxy's rise/fall): a server changes state only
//! after `unhealthy_threshold` failures or `healthy_threshold` passes in a row. Every change
//! is logged once and put in the registry, which broadcasts it to the workers. Runtime
//! membership changes (the admin API) come here too. For the status page it keeps, beside
//! the counts, when each server last changed state and its last probe's outcome, read
//! through [`Status`]. It never forwards a request.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;

mod eject;
mod names;
mod state;

pub use self::state::{HealthState, LastCheck};
use self::{
    eject::Ejections,
    state::{is_pass, Checks},
};
use crate::{
    balancer::{BalancerHandles, ListServers, PoolSpec, ServerEvent},
    config::{HealthCheckSection, PoolConfig, ServerConfig},
    metrics::Metrics,
    rate_limit::Reconfigure,
    registry::{Changes, MembershipError, Registry, WorkerHandles},
    resolve::Resolved,
    upstream::{self, describe, PoolId, Upstream},
};

/// How long a pool gone from the file keeps serving the requests that a route table read
/// before the reload sent to it (their limiter check may still be under way), before its
/// servers are removed and drain.
const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// The user agent of health checks.
const USER_AGENT: &str = concat!("roundabout-health/", env!("CARGO_PKG_VERSION"));

/// One pool's checks: its settings, and the timer of its rounds.
struct PoolChecks {
    settings: HealthCheckSection,
    rounds: Option<SpawnHandle>,
}

/// A member's key: its pool and label.
pub(super) type Key = (PoolId, Arc<str>);

/// The process-wide health checker; owner of the server registry.
pub struct HealthActor {
    registry: Registry,
    /// By pool and label, for every member of the registry.
    checks: HashMap<Key, Checks>,
    /// By pool, for every pool of the registry.
    pools: HashMap<PoolId, PoolChecks>,
    metrics: Arc<Metrics>,
    /// Built in `started`: `awc::Client` is not `Send`, and this actor's thread is its home.
    client: Option<awc::Client>,
    /// How `https://` servers are verified (probes go over HTTPS to them).
    upstream_tls: Arc<rustls::ClientConfig>,
    /// Every server's ejections (passive health).
    ejections: Ejections,
    /// The pools in panic now (fewer in rotation than their `panic_threshold`).
    panicking: HashSet<PoolId>,
    /// Each pool's servers known by name, looked up again every `resolve_interval`.
    names: names::ByPool,
    /// The pools as configured, until `started` schedules their names' lookups.
    configured: Vec<PoolConfig>,
}

/// A pool as the registry announces it.
fn spec(pool: &PoolConfig, retired: bool) -> PoolSpec {
    PoolSpec {
        id: PoolId::of(&pool.name),
        name: pool.name.clone(),
        strategy: pool.strategy,
        retired,
        panic_threshold: pool.panic_threshold,
        eject_after_5xx: pool.health_check.eject_after_5xx,
    }
}

impl HealthActor {
    /// A registry over the configured pools and their servers, all in rotation.
    /// `resolved` holds the addresses of the servers given by name (`resolve_at_start`).
    pub fn new(
        pools: &[PoolConfig],
        resolved: &Resolved,
        upstream_tls: Arc<rustls::ClientConfig>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut actor = Self {
            registry: Registry::default(),
            checks: HashMap::new(),
            pools: HashMap::new(),
            metrics,
            client: None,
            upstream_tls,
            ejections: Ejections::default(),
            panicking: HashSet::new(),
            names: names::ByPool::new(),
            configured: pools.to_vec(),
        };
        let mut members = Vec::with_capacity(pools.len());
        for pool in pools {
            let servers = actor.expand(pool, resolved);
            for u in &servers {
                actor.metrics.set_healthy(&key_of(u), true);
                actor.checks.insert(
                    (u.pool, u.label.clone()),
                    Checks::new(HealthState::default()),
                );
            }
            members.push((spec(pool, false), servers));
            let checks = PoolChecks {
                settings: pool.health_check.clone(),
                rounds: None,
            };
            actor.pools.insert(PoolId::of(&pool.name), checks);
        }
        actor.registry = Registry::new(members);
        actor
    }

    /// The client probes go out with: no cap on connecting of its own (each probe is held
    /// to its pool's timeout as a whole).
    fn new_client(&self) -> awc::Client {
        let longest = self
            .pools
            .values()
            .map(|p| p.settings.timeout)
            .max()
            .unwrap_or(Duration::from_secs(1));
        upstream::client(longest, Some(USER_AGENT), self.upstream_tls.clone())
    }

    /// Probes `pool` now, then every interval of its.
    fn schedule(&mut self, pool: PoolId, ctx: &mut Context<Self>) {
        let Some(checks) = self.pools.get_mut(&pool) else {
            return;
        };
        if let Some(rounds) = checks.rounds.take() {
            ctx.cancel_future(rounds);
        }
        let interval = checks.settings.interval;
        self.probe_pool(pool, ctx);
        let rounds = ctx.run_interval(interval, move |act, ctx| act.probe_pool(pool, ctx));
        if let Some(checks) = self.pools.get_mut(&pool) {
            checks.rounds = Some(rounds);
        }
    }

    fn track(&mut self, upstream: &Upstream, state: HealthState, healthy: bool) {
        self.checks
            .insert((upstream.pool, upstream.label.clone()), Checks::new(state));
        self.metrics.set_healthy(&key_of(upstream), healthy);
    }

    fn untrack(&mut self, upstream: &Upstream) {
        let key = (upstream.pool, upstream.label.clone());
        self.checks.remove(&key);
        self.ejections.forget(&key);
        self.metrics.forget_server(&key_of(upstream));
        self.check_panic(upstream.pool);
    }

    fn probe_pool(&mut self, pool: PoolId, ctx: &mut Context<Self>) {
        let all: Vec<Arc<Upstream>> = self
            .registry
            .members()
            .iter()
            .filter(|m| m.upstream.pool == pool)
            .map(|m| m.upstream.clone())
            .collect();
        for upstream in all {
            self.probe(upstream, ctx);
        }
    }

    fn probe(&mut self, upstream: Arc<Upstream>, ctx: &mut Context<Self>) {
        let Some(client) = &self.client else { return };
        let Some(settings) = self.pools.get(&upstream.pool).map(|p| &p.settings) else {
            return;
        };
        let key = (upstream.pool, upstream.label.clone());
        let Some(checks) = self.checks.get_mut(&key) else {
            return;
        };
        if checks.probing {
            return;
        }
        checks.probing = true;
        let timeout = settings.timeout;
        let mut request = client
            .get(upstream.health_url(&settings.path))
            .timeout(timeout);
        if let Some(address) = upstream.address {
            request = request.address(address);
        }
        let request = request.send();
        ctx.spawn(
            async move {
                let sent = Instant::now();
                let outcome = match request.await {
                    Ok(res) if is_pass(res.status()) => {
                        Ok(format!("status {}", res.status().as_u16()))
                    }
                    Ok(res) => Err(format!("status {}", res.status().as_u16())),
                    Err(e) => Err(describe(&e, timeout)),
                };
                (upstream, outcome, sent.elapsed())
            }
            .into_actor(self)
            .map(move |(upstream, outcome, latency), act, _| {
                if let Some(checks) = act.checks.get_mut(&key) {
                    checks.probing = false;
                    let (Ok(result) | Err(result)) = &outcome;
                    checks.last = Some(LastCheck {
                        at: Instant::now(),
                        ok: outcome.is_ok(),
                        result: result.clone(),
                        latency,
                    });
                }
                act.observe(&upstream, outcome);
            }),
        );
    }

    /// Counts one result for `upstream` (a probe or a passive report) and applies a change.
    fn observe(&mut self, upstream: &Upstream, outcome: Result<String, String>) {
        let Some(settings) = self.pools.get(&upstream.pool).map(|p| &p.settings) else {
            return;
        };
        let (rise, fall) = (settings.healthy_threshold, settings.unhealthy_threshold);
        // A report on a server removed meanwhile is dropped.
        let (Some(member), Some(checks)) = (
            self.registry.get(upstream.pool, &upstream.label),
            self.checks
                .get_mut(&(upstream.pool, upstream.label.clone())),
        ) else {
            return;
        };
        let name = member.upstream.to_string();
        let ok = outcome.is_ok();
        if !ok {
            self.metrics.health_check_failed(&key_of(upstream));
        }
        let first = checks.state.probation;
        let Some(healthy) = checks.state.observe(member.healthy, ok, rise, fall) else {
            return;
        };
        checks.since = Instant::now();
        // Counts in words: a bare "(1/2)" reads as a threshold not yet met.
        match outcome {
            Ok(reason) if first => log::info!("{name} up: {reason} (first check passed)"),
            Ok(reason) => log::info!(
                "{name} up: {reason} ({}/{rise} checks passed)",
                checks.state.passes.min(rise)
            ),
            Err(reason) => log::warn!(
                "{name} down: {reason} ({}/{fall} checks failed)",
                checks.state.failures.min(fall)
            ),
        }
        let ejected = member.ejected;
        self.metrics
            .set_healthy(&key_of(upstream), healthy && !ejected);
        self.registry
            .set_healthy(upstream.pool, &upstream.label, healthy);
        self.check_panic(upstream.pool);
    }

    /// The retired pool's grace is over: its servers are removed and drain.
    fn forget_pool(&mut self, pool: PoolId, ctx: &mut Context<Self>) {
        let removed = self.registry.forget(pool);
        if self.registry.pools().iter().any(|p| p.id == pool) {
            // Brought back by a later reload.
            return;
        }
        for member in &removed {
            self.untrack(&member.upstream);
        }
        if let Some(checks) = self.pools.remove(&pool) {
            if let Some(rounds) = checks.rounds {
                ctx.cancel_future(rounds);
            }
        }
    }
}

/// A server's name in the metrics: its pool's and its own.
pub(super) fn key_of(u: &Upstream) -> (Arc<str>, Arc<str>) {
    (u.pool_name.clone(), u.label.clone())
}

impl Actor for HealthActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.client = Some(self.new_client());
        // First round now, so a server that is down at start leaves rotation soon.
        let pools: Vec<PoolId> = self.pools.keys().copied().collect();
        for pool in pools {
            self.schedule(pool, ctx);
        }
        for pool in std::mem::take(&mut self.configured) {
            self.schedule_names(&pool, ctx);
        }
    }
}

/// A worker joins the broadcast; the answer is the current [`ServerEvent::Snapshot`].
#[derive(Message)]
#[rtype(result = "ServerEvent")]
pub struct Register {
    pub balancer: BalancerHandles,
    pub limiter: Option<Recipient<Reconfigure>>,
}

impl Handler<Register> for HealthActor {
    type Result = MessageResult<Register>;

    fn handle(&mut self, msg: Register, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.registry.join(WorkerHandles {
            events: msg.balancer.events,
            list: msg.balancer.list,
            limiter: msg.limiter,
        }))
    }
}

/// A reloaded config file's part for the registry and the workers: the pools with their
/// servers and health settings, and the limiter's live keys.
#[derive(Message)]
#[rtype(result = "Changes")]
pub struct Reload {
    pub pools: Vec<PoolConfig>,
    /// The addresses of the servers given by name, as looked up for this reload (a name
    /// missing here keeps the addresses it has).
    pub resolved: Resolved,
    pub limiter: Reconfigure,
    /// The verification of `https://` servers, read again with the file.
    pub upstream_tls: Arc<rustls::ClientConfig>,
}

impl Handler<Reload> for HealthActor {
    type Result = MessageResult<Reload>;

    fn handle(&mut self, msg: Reload, ctx: &mut Self::Context) -> Self::Result {
        let pools = msg
            .pools
            .iter()
            .map(|p| (spec(p, false), self.expand(p, &msg.resolved)))
            .collect();
        let changes = self.registry.reload(pools);
        for upstream in &changes.added {
            self.track(upstream, HealthState::default(), true);
        }
        for upstream in &changes.removed {
            self.untrack(upstream);
        }
        for &pool in &changes.pools_retired {
            ctx.run_later(RETIRE_GRACE, move |act, ctx| act.forget_pool(pool, ctx));
        }
        self.registry.reconfigure_limiters(&msg.limiter);

        // A new CA file, or the same one read again: probes use it from now on.
        let tls_changed = !Arc::ptr_eq(&self.upstream_tls, &msg.upstream_tls);
        self.upstream_tls = msg.upstream_tls;
        let mut new_client = tls_changed;
        for pool in &msg.pools {
            let id = PoolId::of(&pool.name);
            let added_here = changes.added.iter().any(|u| u.pool == id);
            let old = self.pools.insert(
                id,
                PoolChecks {
                    settings: pool.health_check.clone(),
                    rounds: None,
                },
            );
            let (rounds, reschedule) = match old {
                Some(old) => {
                    new_client |= old.settings.timeout != pool.health_check.timeout;
                    let again = old.settings.interval != pool.health_check.interval || added_here;
                    (old.rounds, again)
                }
                None => {
                    new_client = true;
                    (None, true)
                }
            };
            if let Some(checks) = self.pools.get_mut(&id) {
                checks.rounds = rounds;
            }
            if reschedule {
                if new_client {
                    self.client = Some(self.new_client());
                    new_client = false;
                }
                self.schedule(id, ctx);
            }
        }
        if new_client {
            self.client = Some(self.new_client());
        }
        for pool in &msg.pools {
            self.schedule_names(pool, ctx);
        }
        MessageResult(changes)
    }
}

/// Asks for every registered worker balancer, so the admin API can ask each of them.
#[derive(Message)]
#[rtype(result = "Vec<Recipient<ListServers>>")]
pub struct Balancers;

impl Handler<Balancers> for HealthActor {
    type Result = MessageResult<Balancers>;

    fn handle(&mut self, _: Balancers, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.registry.listers())
    }
}

/// One member's health as the status page shows it.
#[derive(Debug, Clone)]
pub struct ServerHealth {
    pub pool: PoolId,
    /// `host:port`.
    pub label: Arc<str>,
    /// Since when it has been in or out of rotation (or a member).
    pub since: Instant,
    /// The last probe's outcome; `None` until the first has come back.
    pub last: Option<LastCheck>,
}

/// Asks for every member's health, for the status page. Read only: it changes nothing.
#[derive(Debug, Message)]
#[rtype(result = "Vec<ServerHealth>")]
pub struct Status;

impl Handler<Status> for HealthActor {
    type Result = MessageResult<Status>;

    fn handle(&mut self, _: Status, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.registry
                .members()
                .iter()
                .filter_map(|m| {
                    let checks = self
                        .checks
                        .get(&(m.upstream.pool, m.upstream.label.clone()))?;
                    Some(ServerHealth {
                        pool: m.upstream.pool,
                        label: m.upstream.label.clone(),
                        since: checks.since,
                        last: checks.last.clone(),
                    })
                })
                .collect(),
        )
    }
}

/// A handler could not open a connection to this server: a failed check, counted at once.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ConnectFailed {
    pub upstream: Arc<Upstream>,
    pub reason: String,
}

impl Handler<ConnectFailed> for HealthActor {
    type Result = ();

    fn handle(&mut self, msg: ConnectFailed, _: &mut Self::Context) {
        self.observe(&msg.upstream, Err(msg.reason));
    }
}

/// Adds a server to a pool at runtime: out of rotation until its first passed check,
/// probed at once.
#[derive(Debug, Message)]
#[rtype(result = "Result<Arc<Upstream>, MembershipError>")]
pub struct AddServer {
    /// The pool's name.
    pub pool: String,
    pub server: ServerConfig,
    /// Who asked, for the log: the caller's address.
    pub by: String,
}

impl Handler<AddServer> for HealthActor {
    type Result = Result<Arc<Upstream>, MembershipError>;

    fn handle(&mut self, msg: AddServer, ctx: &mut Self::Context) -> Self::Result {
        let Some(pool) = self.registry.pool(&msg.pool) else {
            return Err(MembershipError::UnknownPool(msg.pool));
        };
        let upstream = Arc::new(Upstream::new(&pool.name, &msg.server).with_metrics(&self.metrics));
        self.registry.add(upstream.clone())?;
        log::info!(
            "{upstream} added (weight {}) by {}, waiting for its first check",
            upstream.weight,
            msg.by
        );
        self.track(&upstream, HealthState::on_probation(), false);
        self.probe(upstream.clone(), ctx);
        Ok(upstream)
    }
}

/// Removes a server from a pool at runtime, by `host:port`; the balancers drain it.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), MembershipError>")]
pub struct RemoveServer {
    /// The pool's name.
    pub pool: String,
    /// `host:port`.
    pub label: String,
    /// Who asked, for the log: the caller's address.
    pub by: String,
}

impl Handler<RemoveServer> for HealthActor {
    type Result = Result<(), MembershipError>;

    fn handle(&mut self, msg: RemoveServer, _: &mut Self::Context) -> Self::Result {
        let Some(pool) = self.registry.pool(&msg.pool).map(|p| p.id) else {
            return Err(MembershipError::UnknownPool(msg.pool));
        };
        let removed = self.registry.remove(pool, &msg.label)?;
        self.untrack(&removed.upstream);
        log::info!("{} removed by {}, draining", removed.upstream, msg.by);
        Ok(())
    }
}

/// Asks for the pools, `default` first; those a reload retired are marked so until their
/// servers have gone.
#[derive(Debug, Message)]
#[rtype(result = "Vec<PoolSpec>")]
pub struct ListPools;

impl Handler<ListPools> for HealthActor {
    type Result = MessageResult<ListPools>;

    fn handle(&mut self, _: ListPools, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.registry.pools().to_vec())
    }
}
