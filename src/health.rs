//! `HealthActor`: one per process, the single owner of health truth and of the server set.
//!
//! Every `health_check.interval` it probes every server with `GET url + path`, all at once,
//! each bounded by `health_check.timeout`, so a hung server never delays another's check or
//! the next round. Results, and the passive failures the handlers report when they cannot
//! connect, go through [`HealthState`] (HAProxy's rise/fall): a server changes state only
//! after `unhealthy_threshold` failures or `healthy_threshold` passes in a row. Every change
//! is logged once and broadcast to the worker balancers registered through [`Register`].
//! Runtime membership changes (the admin API) come here too, and are broadcast the same way.

use std::{sync::Arc, time::Duration};

use actix::prelude::*;
use actix_web::http::StatusCode;
use awc::error::{ConnectError, SendRequestError};

use crate::{
    balancer::{ListServers, ServerEvent},
    config::{HealthCheckSection, ServerConfig},
    metrics::Metrics,
    upstream::Upstream,
};

/// Consecutive-result counting for one server, like HAProxy's `rise`/`fall`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    pub healthy: bool,
    /// Passes in a row (reset by a failure).
    pub passes: u32,
    /// Failures in a row (reset by a pass).
    pub failures: u32,
    /// Added at runtime and not yet checked: the first pass puts it in rotation.
    probation: bool,
}

impl HealthState {
    /// A server from the config file: in rotation until checks say otherwise.
    pub fn in_rotation() -> Self {
        Self {
            healthy: true,
            passes: 0,
            failures: 0,
            probation: false,
        }
    }

    /// A server added at runtime: out of rotation until its first passed check.
    pub fn on_probation() -> Self {
        Self {
            healthy: false,
            passes: 0,
            failures: 0,
            probation: true,
        }
    }

    /// Counts one result; returns true when the server changed state.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        if ok {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if !self.healthy && (self.probation || self.passes >= rise) {
                self.healthy = true;
                self.probation = false;
                return true;
            }
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.healthy && self.failures >= fall {
                self.healthy = false;
                return true;
            }
        }
        false
    }
}

struct Tracked {
    upstream: Arc<Upstream>,
    state: HealthState,
    /// A probe is out; the next round skips this server rather than stacking probes.
    probing: bool,
}

/// The process-wide health checker and server registry.
pub struct HealthActor {
    servers: Vec<Tracked>,
    balancers: Vec<Recipient<ServerEvent>>,
    listers: Vec<Recipient<ListServers>>,
    settings: HealthCheckSection,
    metrics: Arc<Metrics>,
    /// Built in `started`: `awc::Client` is not `Send`, and this actor's thread is its home.
    client: Option<awc::Client>,
}

impl HealthActor {
    /// A registry over the configured servers, all in rotation.
    pub fn new(
        servers: &[ServerConfig],
        settings: HealthCheckSection,
        metrics: Arc<Metrics>,
    ) -> Self {
        let servers = servers
            .iter()
            .map(|s| Tracked {
                upstream: Arc::new(Upstream::new(s).with_metrics(&metrics)),
                state: HealthState::in_rotation(),
                probing: false,
            })
            .collect::<Vec<_>>();
        for t in &servers {
            metrics.set_healthy(&t.upstream.label, true);
        }
        Self {
            servers,
            balancers: Vec::new(),
            listers: Vec::new(),
            settings,
            metrics,
            client: None,
        }
    }

    fn broadcast(&mut self, event: ServerEvent) {
        // A worker that stopped (actix restarts a worker that panicked) leaves a dead entry.
        self.balancers.retain(|b| b.connected());
        for b in &self.balancers {
            b.do_send(event.clone());
        }
    }

    fn snapshot(&self) -> ServerEvent {
        ServerEvent::Snapshot(
            self.servers
                .iter()
                .map(|t| (t.upstream.clone(), t.state.healthy))
                .collect(),
        )
    }

    fn probe_all(&mut self, ctx: &mut Context<Self>) {
        for i in 0..self.servers.len() {
            self.probe(i, ctx);
        }
    }

    fn probe(&mut self, i: usize, ctx: &mut Context<Self>) {
        let Some(client) = &self.client else { return };
        let tracked = &mut self.servers[i];
        if tracked.probing {
            return;
        }
        tracked.probing = true;
        let upstream = tracked.upstream.clone();
        let request = client
            .get(upstream.health_url(&self.settings.path))
            .timeout(self.settings.timeout)
            .send();
        let timeout = self.settings.timeout;
        ctx.spawn(
            async move {
                let outcome = match request.await {
                    Ok(res) if is_pass(res.status()) => {
                        Ok(format!("status {}", res.status().as_u16()))
                    }
                    Ok(res) => Err(format!("status {}", res.status().as_u16())),
                    Err(e) => Err(describe(&e, timeout)),
                };
                (upstream, outcome)
            }
            .into_actor(self)
            .map(|(upstream, outcome), act, _| {
                if let Some(t) = act
                    .servers
                    .iter_mut()
                    .find(|t| Arc::ptr_eq(&t.upstream, &upstream))
                {
                    t.probing = false;
                }
                act.observe(&upstream, outcome);
            }),
        );
    }

    /// Counts one result for `upstream` (a probe or a passive report) and broadcasts a change.
    fn observe(&mut self, upstream: &Arc<Upstream>, outcome: Result<String, String>) {
        let (rise, fall) = (
            self.settings.healthy_threshold,
            self.settings.unhealthy_threshold,
        );
        // A report on a server removed meanwhile is dropped.
        let Some(t) = self
            .servers
            .iter_mut()
            .find(|t| t.upstream.label == upstream.label)
        else {
            return;
        };
        let ok = outcome.is_ok();
        if !ok {
            self.metrics.health_check_failed(&t.upstream.label);
        }
        if !t.state.observe(ok, rise, fall) {
            return;
        }
        let healthy = t.state.healthy;
        let label = t.upstream.label.clone();
        match outcome {
            Ok(reason) => log::info!("{label} up: {reason} ({}/{rise})", t.state.passes.min(rise)),
            Err(reason) => log::warn!("{label} down: {reason} ({}/{fall})", t.state.failures),
        }
        self.metrics.set_healthy(&label, healthy);
        self.broadcast(ServerEvent::Health { label, healthy });
    }
}

/// A status in 200..=399 passes, as in HAProxy's default `http-check expect`.
fn is_pass(status: StatusCode) -> bool {
    status.is_success() || status.is_redirection()
}

/// A short reason for a failed probe or forward, for the log line.
pub fn describe(e: &SendRequestError, timeout: Duration) -> String {
    match e {
        SendRequestError::Connect(ConnectError::Io(io)) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            _ => format!("connect: {io}"),
        },
        SendRequestError::Connect(ConnectError::Timeout) | SendRequestError::Timeout => {
            format!("timed out after {}", humantime::format_duration(timeout))
        }
        SendRequestError::Connect(other) => format!("connect: {other}"),
        other => other.to_string(),
    }
}

impl Actor for HealthActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.client = Some(
            awc::Client::builder()
                .connector(
                    awc::Connector::new()
                        .timeout(self.settings.timeout)
                        .limit(0),
                )
                .disable_redirects()
                .no_default_headers()
                .add_default_header((
                    "user-agent",
                    concat!("roundabout-health/", env!("CARGO_PKG_VERSION")),
                ))
                .disable_timeout()
                .finish(),
        );
        // First round now, so a server that is down at start leaves rotation soon.
        self.probe_all(ctx);
        ctx.run_interval(self.settings.interval, |act, ctx| act.probe_all(ctx));
    }
}

/// A worker's balancer joins the broadcast; the answer is the current [`ServerEvent::Snapshot`].
#[derive(Message)]
#[rtype(result = "ServerEvent")]
pub struct Register {
    pub events: Recipient<ServerEvent>,
    pub list: Recipient<ListServers>,
}

impl Handler<Register> for HealthActor {
    type Result = MessageResult<Register>;

    fn handle(&mut self, msg: Register, _: &mut Self::Context) -> Self::Result {
        self.balancers.push(msg.events);
        self.listers.push(msg.list);
        MessageResult(self.snapshot())
    }
}

/// Asks for every registered worker balancer, so the admin API can ask each of them.
#[derive(Message)]
#[rtype(result = "Vec<Recipient<ListServers>>")]
pub struct Balancers;

impl Handler<Balancers> for HealthActor {
    type Result = MessageResult<Balancers>;

    fn handle(&mut self, _: Balancers, _: &mut Self::Context) -> Self::Result {
        self.listers.retain(|l| l.connected());
        MessageResult(self.listers.clone())
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

/// Why a runtime membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("server {0} is already present")]
    Duplicate(String),
    #[error("no server {0}")]
    Unknown(String),
}

/// Adds a server at runtime: out of rotation until its first passed check, probed at once.
#[derive(Debug, Message)]
#[rtype(result = "Result<Arc<Upstream>, MembershipError>")]
pub struct AddServer(pub ServerConfig);

impl Handler<AddServer> for HealthActor {
    type Result = Result<Arc<Upstream>, MembershipError>;

    fn handle(&mut self, AddServer(server): AddServer, ctx: &mut Self::Context) -> Self::Result {
        let upstream = Arc::new(Upstream::new(&server).with_metrics(&self.metrics));
        if self
            .servers
            .iter()
            .any(|t| t.upstream.label == upstream.label)
        {
            return Err(MembershipError::Duplicate(upstream.label.to_string()));
        }
        log::info!(
            "{} added (weight {}), waiting for its first check",
            upstream.label,
            upstream.weight
        );
        self.servers.push(Tracked {
            upstream: upstream.clone(),
            state: HealthState::on_probation(),
            probing: false,
        });
        self.metrics.set_healthy(&upstream.label, false);
        self.broadcast(ServerEvent::Added {
            upstream: upstream.clone(),
            healthy: false,
        });
        self.probe(self.servers.len() - 1, ctx);
        Ok(upstream)
    }
}

/// Removes a server at runtime, by `host:port`; the balancers drain it.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), MembershipError>")]
pub struct RemoveServer(pub String);

impl Handler<RemoveServer> for HealthActor {
    type Result = Result<(), MembershipError>;

    fn handle(&mut self, RemoveServer(label): RemoveServer, _: &mut Self::Context) -> Self::Result {
        let i = self
            .servers
            .iter()
            .position(|t| *t.upstream.label == *label)
            .ok_or_else(|| MembershipError::Unknown(label.clone()))?;
        let removed = self.servers.remove(i);
        log::info!("{label} removed, draining");
        self.metrics.forget_server(&removed.upstream.label);
        self.broadcast(ServerEvent::Removed {
            label: removed.upstream.label.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_leaves_after_fall_failures_and_returns_after_rise_passes() {
        let mut s = HealthState::in_rotation();
        assert!(!s.observe(false, 2, 3));
        assert!(!s.observe(false, 2, 3));
        assert!(s.observe(false, 2, 3));
        assert!(!s.healthy);
        assert!(!s.observe(true, 2, 3));
        assert!(s.observe(true, 2, 3));
        assert!(s.healthy);
    }

    #[test]
    fn a_pass_resets_the_failure_count() {
        let mut s = HealthState::in_rotation();
        s.observe(false, 2, 2);
        s.observe(true, 2, 2);
        assert!(!s.observe(false, 2, 2));
        assert!(s.healthy);
    }

    #[test]
    fn a_server_on_probation_joins_after_its_first_pass() {
        let mut s = HealthState::on_probation();
        assert!(!s.healthy);
        assert!(s.observe(true, 5, 2));
        assert!(s.healthy);
    }
}
