//! The status page on the admin listener: `GET /` serves one self-contained HTML page
//! (`status.html`: inline CSS and script, built into the binary, nothing fetched from
//! elsewhere) and `GET /status.json` what the page shows.
//!
//! It only reads: the servers as every worker's balancer sees them (as `GET /servers`),
//! their health history from the HealthActor ([`Status`]), and rates from the counters the
//! workers already keep, sampled here on the admin side once a second into a ring of a
//! minute, so the request path pays nothing for the page. The page's actions (add, drain)
//! are the admin API's own calls, made by its script with the operator's token: the page
//! has no powers of its own, and its HTML holds no data, so serving it needs no token.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use serde::Serialize;

use crate::{
    admin::{authorize, server_views, AdminError, AdminState},
    balancer::ServerView,
    config::{Config, HealthCheckSection},
    health::{ServerHealth, Status},
    metrics::{Answers, Counts, Metrics, ServerKey},
    rate_limit::Breaker,
};

/// The page, served as is.
const PAGE: &str = include_str!("status.html");

/// Nothing but the page's own inline style and script, and calls back to this listener;
/// no framing (the page has buttons that change the server set).
const PAGE_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
    script-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How often the counters are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The span of the request and error rates.
const RATE_SPAN: Duration = Duration::from_secs(10);
/// The span of "requests limited in the last minute", and so how long samples are kept.
const LIMITED_SPAN: Duration = Duration::from_secs(60);

/// What the status handlers share, beside [`AdminState`].
pub struct StatusState {
    started: Instant,
    /// The running configuration (a reload replaces it): strategy, limiter, health settings.
    config: Arc<Mutex<Config>>,
    /// Whether the limiter's store is unreachable now.
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
    samples: Mutex<Samples>,
}

impl StatusState {
    /// The state of a balancer that starts now; the first sample is taken at once.
    pub fn new(config: Arc<Mutex<Config>>, breaker: Arc<Breaker>, metrics: Arc<Metrics>) -> Self {
        let started = Instant::now();
        let mut samples = Samples::default();
        samples.push(started, metrics.counts());
        Self {
            started,
            config,
            breaker,
            metrics,
            samples: Mutex::new(samples),
        }
    }

    fn sample(&self) {
        let counts = self.metrics.counts();
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now(), counts);
    }
}

/// Samples the counters every second on the calling thread's arbiter, until `state` is
/// gone (the admin listener has stopped and dropped it).
pub fn start_sampling(state: &Arc<StatusState>) {
    let state = Arc::downgrade(state);
    actix_rt::spawn(async move {
        let mut tick = actix_rt::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { break };
            state.sample();
        }
    });
}

/// Counter samples, oldest first, reaching back a little over [`LIMITED_SPAN`].
#[derive(Debug, Default)]
struct Samples(VecDeque<(Instant, Counts)>);

impl Samples {
    fn push(&mut self, at: Instant, counts: Counts) {
        self.0.push_back((at, counts));
        // Keep the newest sample that is at least LIMITED_SPAN old: the longest rate's base.
        while self
            .0
            .get(1)
            .is_some_and(|(second, _)| at.duration_since(*second) >= LIMITED_SPAN)
        {
            self.0.pop_front();
        }
    }

    /// Where a rate over `span` up to `now` starts: the newest sample at least `span` old,
    /// else the oldest there is (the process is younger than `span`).
    fn base(&self, now: Instant, span: Duration) -> Option<&(Instant, Counts)> {
        self.0
            .iter()
            .rev()
            .find(|(at, _)| now.saturating_duration_since(*at) >= span)
            .or_else(|| self.0.front())
    }
}

/// What `GET /status.json` answers (the SPEC lists the fields).
#[derive(Debug, Serialize)]
struct Report {
    version: &'static str,
    /// This process's: after a SIGUSR2 upgrade, the new process's.
    pid: u32,
    uptime_seconds: f64,
    /// The default pool's.
    strategy: &'static str,
    /// The default pool's.
    health_check: HealthCheckReport,
    /// Every pool, `default` first.
    pools: Vec<PoolReport>,
    /// The span the request rates and error rates cover: 10 s once the process is that old.
    rates_over_seconds: f64,
    totals: Totals,
    rate_limit: LimiterReport,
    servers: Vec<ServerReport>,
}

#[derive(Debug, Serialize)]
struct HealthCheckReport {
    interval_seconds: f64,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
}

impl HealthCheckReport {
    fn of(hc: &HealthCheckSection) -> Self {
        HealthCheckReport {
            interval_seconds: hc.interval.as_secs_f64(),
            unhealthy_threshold: hc.unhealthy_threshold,
            healthy_threshold: hc.healthy_threshold,
        }
    }
}

#[derive(Debug, Serialize)]
struct PoolReport {
    name: String,
    strategy: &'static str,
    health_check: HealthCheckReport,
}

#[derive(Debug, Serialize)]
struct Totals {
    /// Every answer since start, ours included.
    requests: u64,
    in_flight: i64,
    requests_per_second: f64,
    /// Share of answers that were 5xx (the servers' and ours); `null` with no answers.
    error_rate: Option<f64>,
}

#[derive(Debug, Serialize)]
struct LimiterReport {
    enabled: bool,
    requests: u64,
    window_seconds: u64,
    /// `redis` or `in-process`.
    store: &'static str,
    /// The count is shared by every instance on the same store.
    shared: bool,
    /// False while the store cannot be reached (`on_store_error` decides meanwhile).
    store_reachable: bool,
    limited_last_minute: u64,
    /// The span `limited_last_minute` covers: 60 s once the process is that old.
    limited_over_seconds: f64,
}

#[derive(Debug, Serialize)]
struct ServerReport {
    /// The pool it serves in.
    pool: String,
    url: String,
    /// For a server known by name: the URL with the name (`url` is its address's).
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// `host:port`: what `DELETE /servers/{host:port}` takes.
    label: String,
    weight: u32,
    /// `up`, `down`, `ejected` or `draining`.
    state: &'static str,
    healthy: bool,
    draining: bool,
    ejected: bool,
    in_flight: u32,
    /// How long it has been up or down; `null` while draining.
    state_seconds: Option<f64>,
    last_check: Option<CheckReport>,
    requests_per_second: f64,
    error_rate: Option<f64>,
}

#[derive(Debug, Serialize)]
struct CheckReport {
    ok: bool,
    result: String,
    latency_ms: f64,
    seconds_ago: f64,
}

/// Registers `GET /` and `GET /status.json`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(page))
        .route("/status.json", web::get().to(status_json));
}

async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, PAGE_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .body(PAGE)
}

async fn status_json(
    req: HttpRequest,
    admin: web::Data<AdminState>,
    status: web::Data<StatusState>,
) -> Result<HttpResponse, AdminError> {
    authorize(&req, &admin)?;
    let views = server_views(&admin.health).await?;
    let health = admin
        .health
        .send(Status)
        .await
        .map_err(|_| AdminError::Unavailable)?;
    let report = report(&status, views, &health, Instant::now());
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(report))
}

/// `part / whole`, or `None` when there is no whole to speak of.
fn share(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn per_second(n: u64, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        n as f64 / over.as_secs_f64()
    }
}

fn report(
    state: &StatusState,
    views: Vec<ServerView>,
    health: &[ServerHealth],
    now: Instant,
) -> Report {
    let counts = state.metrics.counts();
    let (rate_base, limited_base) = {
        let samples = state.samples.lock().unwrap_or_else(|e| e.into_inner());
        let base = |span| {
            samples
                .base(now, span)
                .map(|(at, c)| (now.saturating_duration_since(*at), c.clone()))
                .unwrap_or_default()
        };
        (base(RATE_SPAN), base(LIMITED_SPAN))
    };
    let (over, then) = &rate_base;
    // A server with no sample then is younger than the span: it started from zero.
    let since = |key: &ServerKey, now: Answers| {
        let before = then.servers.get(key).copied().unwrap_or_default();
        Answers {
            all: now.all.saturating_sub(before.all),
            errors: now.errors.saturating_sub(before.errors),
        }
    };

    let servers = views
        .into_iter()
        .map(|v| {
            let label = &v.upstream.label;
            let key = (v.upstream.pool_name.clone(), label.clone());
            let delta = since(&key, counts.servers.get(&key).copied().unwrap_or_default());
            let checks = health
                .iter()
                .find(|h| h.label == *label && h.pool == v.upstream.pool);
            ServerReport {
                pool: v.upstream.pool_name.to_string(),
                url: v.upstream.shown_url(),
                name: v.upstream.shown_name(),
                label: label.to_string(),
                weight: v.upstream.weight,
                state: match (v.draining, v.ejected, v.healthy) {
                    (true, _, _) => "draining",
                    (false, true, _) => "ejected",
                    (false, false, true) => "up",
                    (false, false, false) => "down",
                },
                healthy: v.healthy,
                draining: v.draining,
                ejected: v.ejected,
                in_flight: v.in_flight,
                state_seconds: checks
                    .filter(|_| !v.draining)
                    .map(|h| now.saturating_duration_since(h.since).as_secs_f64()),
                last_check: checks.and_then(|h| h.last.as_ref()).map(|c| CheckReport {
                    ok: c.ok,
                    result: c.result.clone(),
                    latency_ms: c.latency.as_secs_f64() * 1000.0,
                    seconds_ago: now.saturating_duration_since(c.at).as_secs_f64(),
                }),
                requests_per_second: per_second(delta.all, *over),
                error_rate: share(delta.errors, delta.all),
            }
        })
        .collect();

    let requests = counts.requests.saturating_sub(then.requests);
    let errors = counts.own.errors.saturating_sub(then.own.errors)
        + counts
            .servers
            .iter()
            .map(|(key, now)| since(key, *now).errors)
            .sum::<u64>();
    let (limited_over, limited_then) = &limited_base;

    let config = state.config.lock().unwrap_or_else(|e| e.into_inner());
    let rl = &config.rate_limit;
    Report {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        uptime_seconds: now.saturating_duration_since(state.started).as_secs_f64(),
        strategy: config.default_pool().strategy.name(),
        health_check: HealthCheckReport::of(&config.default_pool().health_check),
        pools: config
            .pools
            .iter()
            .map(|p| PoolReport {
                name: p.name.to_string(),
                strategy: p.strategy.name(),
                health_check: HealthCheckReport::of(&p.health_check),
            })
            .collect(),
        rates_over_seconds: over.as_secs_f64(),
        totals: Totals {
            requests: counts.requests,
            in_flight: state.metrics.in_flight_now(),
            requests_per_second: per_second(requests, *over),
            error_rate: share(errors.min(requests), requests),
        },
        rate_limit: LimiterReport {
            enabled: rl.enabled,
            requests: rl.requests,
            window_seconds: rl.window.as_secs(),
            store: if rl.redis_url.is_some() {
                "redis"
            } else {
                "in-process"
            },
            shared: rl.redis_url.is_some(),
            store_reachable: !state.breaker.is_open(),
            limited_last_minute: counts
                .rate_limited
                .saturating_sub(limited_then.rate_limited),
            limited_over_seconds: limited_over.as_secs_f64(),
        },
        servers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64) -> Counts {
        Counts {
            requests,
            ..Counts::default()
        }
    }

    #[test]
    fn a_rate_starts_from_the_newest_sample_old_enough_else_the_oldest() {
        let t0 = Instant::now();
        let mut s = Samples::default();
        for i in 0..5 {
            s.push(t0 + Duration::from_secs(i), counts(i));
        }
        let now = t0 + Duration::from_secs(5);
        assert_eq!(s.base(now, Duration::from_secs(2)).unwrap().1.requests, 3);
        assert_eq!(
            s.base(now, Duration::from_secs(10)).unwrap().1.requests,
            0,
            "younger than the span: from the first sample"
        );
    }

    #[test]
    fn samples_reach_back_one_minute_and_no_further() {
        let t0 = Instant::now();
        let mut s = Samples::default();
        for i in 0..200 {
            s.push(t0 + Duration::from_secs(i), counts(i));
        }
        let now = t0 + Duration::from_secs(199);
        assert_eq!(s.0.len(), 61, "a minute of samples and the one before it");
        let (at, base) = s.base(now, LIMITED_SPAN).unwrap();
        assert_eq!(now.duration_since(*at), LIMITED_SPAN);
        assert_eq!(base.requests, 139);
    }

    #[test]
    fn rates_and_shares_of_nothing_are_zero_and_none() {
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
        assert_eq!(per_second(10, Duration::from_secs(5)), 2.0);
        assert_eq!(share(0, 0), None);
        assert_eq!(share(1, 4), Some(0.25));
    }
}
