//! Per-server series, labelled by pool and server: `roundabout_requests_total` (with our own
//! answers as `pool="",server=""`),
//! `roundabout_upstream_body_failures_total`, `roundabout_server_healthy` and
//! `roundabout_health_check_failures_total`.
//!
//! Each holder of a server (the HealthActor, and each worker's copy) counts in its own
//! [`ServerCounters`], relaxed atomics that no one else writes; the exposition sums every
//! holder's counts. A server's series live as long as one of its counters does, so servers
//! that come and go do not grow `/metrics`; label values are the upstream's `Arc<str>`
//! label, so counting a request clones a pointer, not a string.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, Weak,
    },
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        MetricType,
    },
    registry::Registry,
};

/// A pool's name or a server's `host:port` as a label value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServerName(Arc<str>);

impl EncodeLabelValue for ServerName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    pool: ServerName,
    server: ServerName,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `1xx`.
    class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServerLabels {
    pool: ServerName,
    server: ServerName,
}

/// One server's request counters as one holder counts them: answers by status class
/// (1xx..5xx), then bodies the server ended early.
#[derive(Debug, Default)]
pub(super) struct Tally([AtomicU64; 6]);

impl Tally {
    pub(super) const FAILED: usize = 5;

    pub(super) fn get(&self) -> [u64; 6] {
        std::array::from_fn(|i| self.0[i].load(Relaxed))
    }

    fn add(&self, counts: [u64; 6]) {
        for (c, n) in self.0.iter().zip(counts) {
            c.fetch_add(n, Relaxed);
        }
    }
}

/// One holder's counters of one server, registered with the server's series; what it
/// counted passes to the series when it goes.
#[derive(Debug, Default)]
struct Counting {
    tally: Tally,
    /// `None` for counters counted nowhere (an upstream not yet given its metrics) and for
    /// answers of our own, which [`Metrics`](super::Metrics) holds directly.
    series: Option<Arc<ServerSeries>>,
}

impl Drop for Counting {
    fn drop(&mut self) {
        if let Some(series) = &self.series {
            series.gone.add(self.tally.get());
        }
    }
}

/// One server's request counters, as one worker (or the health checker) holds them: counting
/// a request is one relaxed increment of an atomic that only this holder writes.
#[derive(Debug, Clone, Default)]
pub struct ServerCounters(Arc<Counting>);

impl ServerCounters {
    /// Counters of the same server for another worker: counted apart, summed when read.
    pub fn for_worker(&self) -> ServerCounters {
        match &self.0.series {
            Some(series) => series.counters(),
            None => ServerCounters::default(),
        }
    }

    pub(super) fn inc(&self, status: u16) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.0.tally.0[class].fetch_add(1, Relaxed);
    }
}

/// A server's identity: its pool's name and its `host:port`.
pub type ServerKey = (Arc<str>, Arc<str>);

/// Which servers have series now, by pool and label.
type Live = Arc<Mutex<HashMap<ServerKey, Weak<ServerSeries>>>>;

/// The families that hold per-server series, and which servers are alive in them.
#[derive(Debug, Clone)]
pub(super) struct ServerFamilies {
    healthy: Family<ServerLabels, Gauge>,
    health_check_failures: Family<ServerLabels, Counter>,
    ejections: Family<ServerLabels, Counter>,
    live: Live,
    /// Answers of servers whose series are gone, so that the status page's total since
    /// start never goes down.
    retired: Arc<AtomicU64>,
}

/// A server's place in the metrics: its series are removed when the last holder of its
/// counters goes.
#[derive(Debug)]
struct ServerSeries {
    key: ServerKey,
    families: ServerFamilies,
    /// Every holder's counters; dead entries are pruned when one is added.
    holders: Mutex<Vec<Weak<Counting>>>,
    /// What holders that have gone counted.
    gone: Tally,
}

impl ServerSeries {
    /// New counters of this server for one more holder.
    fn counters(self: &Arc<Self>) -> ServerCounters {
        let counting = Arc::new(Counting {
            tally: Tally::default(),
            series: Some(self.clone()),
        });
        let mut holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        holders.retain(|h| h.strong_count() > 0);
        holders.push(Arc::downgrade(&counting));
        ServerCounters(counting)
    }

    /// Every holder's counts summed, those gone included.
    fn totals(&self) -> [u64; 6] {
        let mut sum = self.gone.get();
        let holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        for counting in holders.iter().filter_map(Weak::upgrade) {
            for (s, n) in sum.iter_mut().zip(counting.tally.get()) {
                *s += n;
            }
        }
        sum
    }
}

impl Drop for ServerSeries {
    fn drop(&mut self) {
        let f = &self.families;
        let answered: u64 = self.gone.get()[..Tally::FAILED].iter().sum();
        f.retired.fetch_add(answered, Relaxed);
        let mut live = f.live.lock().unwrap_or_else(|e| e.into_inner());
        // A new handle may have been made for the same server meanwhile; it keeps them.
        if live.get(&self.key).is_some_and(|w| w.upgrade().is_some()) {
            return;
        }
        live.remove(&self.key);
        let server = ServerLabels::of(&self.key);
        f.healthy.remove(&server);
        f.health_check_failures.remove(&server);
        f.ejections.remove(&server);
    }
}

/// The series alive now, in no particular order (the exposition is sorted afterwards).
fn live_series(live: &Live) -> Vec<Arc<ServerSeries>> {
    let live = live.lock().unwrap_or_else(|e| e.into_inner());
    live.values().filter_map(Weak::upgrade).collect()
}

/// `roundabout_requests_total`: per server and class, every holder's counts summed; our
/// own answers under `server=""`.
#[derive(Debug, Clone)]
pub(super) struct RequestCounts {
    live: Live,
    own: ServerCounters,
}

impl EncodeMetric for RequestCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let own: Arc<str> = Arc::from("");
        let series = live_series(&self.live);
        let rows = std::iter::once(((own.clone(), own), self.own.0.tally.get()))
            .chain(series.iter().map(|s| (s.key.clone(), s.totals())));
        for ((pool, server), totals) in rows {
            for (class, n) in CLASSES.into_iter().zip(totals) {
                let labels = RequestLabels {
                    pool: ServerName(pool.clone()),
                    server: ServerName(server.clone()),
                    class,
                };
                ConstCounter::new(n).encode(encoder.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// `roundabout_upstream_body_failures_total`: per server, every holder's counts summed.
#[derive(Debug, Clone)]
struct BodyFailures(Live);

impl EncodeMetric for BodyFailures {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for series in live_series(&self.0) {
            let labels = ServerLabels::of(&series.key);
            let failed = series.totals()[Tally::FAILED];
            ConstCounter::new(failed).encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Answers counted so far: the status page's rates are differences of two of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answers {
    pub all: u64,
    /// 5xx.
    pub errors: u64,
}

impl Answers {
    pub(super) fn of(totals: [u64; 6]) -> Answers {
        Answers {
            all: totals[..Tally::FAILED].iter().sum(),
            errors: totals[4],
        }
    }
}

impl ServerFamilies {
    /// Registers the per-server families in `registry`; `own` counts the answers of our
    /// own, shown as `server=""` beside the servers' in `roundabout_requests_total`.
    pub(super) fn register(registry: &mut Registry, own: &ServerCounters) -> Self {
        let live = Live::default();
        registry.register(
            "requests",
            "Proxied requests by pool, upstream server and status class (answers of our own: pool=\"\", server=\"\")",
            RequestCounts {
                live: live.clone(),
                own: own.clone(),
            },
        );
        registry.register(
            "upstream_body_failures",
            "Response bodies the server ended early (closed, reset, or paused past proxy.timeout); the client's connection was closed without a clean end",
            BodyFailures(live.clone()),
        );
        let healthy = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "server_healthy",
            "1 when the server is in rotation, else 0",
            healthy.clone(),
        );
        let health_check_failures = Family::<ServerLabels, Counter>::default();
        registry.register(
            "health_check_failures",
            "Failed health checks and failed connections, by pool and server",
            health_check_failures.clone(),
        );
        let ejections = Family::<ServerLabels, Counter>::default();
        registry.register(
            "ejections",
            "Times a server was taken out for its 5xx answers, failed connections or time-outs in a row (health_check.eject_after_5xx)",
            ejections.clone(),
        );
        Self {
            healthy,
            health_check_failures,
            ejections,
            live,
            retired: Arc::default(),
        }
    }

    /// The request counters of `server`; see [`Metrics::server_counters`](super::Metrics::server_counters).
    pub(super) fn counters(&self, server: &ServerKey) -> ServerCounters {
        let series = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            match live.get(server).and_then(Weak::upgrade) {
                Some(series) => series,
                None => {
                    let series = Arc::new(ServerSeries {
                        key: server.clone(),
                        families: self.clone(),
                        holders: Mutex::default(),
                        gone: Tally::default(),
                    });
                    live.insert(server.clone(), Arc::downgrade(&series));
                    series
                }
            }
        };
        drop(
            self.health_check_failures
                .get_or_create(&ServerLabels::of(server)),
        );
        drop(self.ejections.get_or_create(&ServerLabels::of(server)));
        series.counters()
    }

    /// How many servers have series now (removed ones count until they have drained).
    #[cfg(test)]
    pub(super) fn tracked(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(super) fn set_healthy(&self, server: &ServerKey, healthy: bool) {
        self.healthy
            .get_or_create(&ServerLabels::of(server))
            .set(i64::from(healthy));
    }

    pub(super) fn ejected(&self, server: &ServerKey) {
        self.ejections
            .get_or_create(&ServerLabels::of(server))
            .inc();
    }

    pub(super) fn health_check_failed(&self, server: &ServerKey) {
        self.health_check_failures
            .get_or_create(&ServerLabels::of(server))
            .inc();
    }

    /// A removed server's health gauge goes at once (its other series once it drained).
    pub(super) fn forget(&self, server: &ServerKey) {
        self.healthy.remove(&ServerLabels::of(server));
    }

    /// Each live server's answers, by pool and label.
    pub(super) fn answers(&self) -> HashMap<ServerKey, Answers> {
        live_series(&self.live)
            .iter()
            .map(|series| (series.key.clone(), Answers::of(series.totals())))
            .collect()
    }

    /// The answers of servers whose series are gone.
    pub(super) fn retired(&self) -> u64 {
        self.retired.load(Relaxed)
    }
}

impl ServerLabels {
    fn of((pool, server): &ServerKey) -> Self {
        ServerLabels {
            pool: ServerName(pool.clone()),
            server: ServerName(server.clone()),
        }
    }
}

impl ServerCounters {
    /// A server ended a response body early.
    pub(super) fn body_failed(&self) {
        self.0.tally.0[Tally::FAILED].fetch_add(1, Relaxed);
    }

    /// What these counters counted.
    pub(super) fn totals(&self) -> [u64; 6] {
        self.0.tally.get()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{atomic::Ordering::Relaxed, Arc};

    use super::{super::Metrics, Answers, ServerKey};

    #[test]
    fn a_servers_series_go_with_its_last_counters() {
        let m = Metrics::new();
        let s: ServerKey = (Arc::from("default"), Arc::from("127.0.0.1:5000"));
        let first = m.server_counters(&s.0, &s.1);
        let second = m.server_counters(&s.0, &s.1);
        first.inc(200);
        m.set_healthy(&s, true);
        let text = m.encode();
        assert!(
            text.contains(r#"roundabout_health_check_failures_total{pool="default",server="127.0.0.1:5000"} 0"#),
            "{text}"
        );
        assert!(text.contains(
            r#"roundabout_requests_total{pool="default",server="127.0.0.1:5000",class="5xx"} 0"#
        ));
        drop(first);
        assert!(
            m.encode().contains(r#"class="2xx"} 1"#),
            "another holder keeps them"
        );
        m.forget_server(&s);
        drop(second);
        assert!(!m.encode().contains("127.0.0.1:5000"), "{}", m.encode());
        assert_eq!(m.servers.tracked(), 0);
    }

    #[test]
    fn each_workers_counters_are_its_own_and_summed_when_read_even_after_one_goes() {
        let m = Metrics::new();
        let s: ServerKey = (Arc::from("default"), Arc::from("127.0.0.1:5000"));
        let shared = m.server_counters(&s.0, &s.1);
        let (one, two) = (shared.for_worker(), shared.for_worker());
        assert!(
            !Arc::ptr_eq(&one.0, &two.0),
            "no atomic written by two workers"
        );
        m.answered(Some(&one), 200);
        m.answered(Some(&two), 200);
        m.answered(Some(&two), 503);
        m.upstream_failed(Some(&one));
        let text = m.encode();
        assert!(
            text.contains(
                r#"roundabout_requests_total{pool="default",server="127.0.0.1:5000",class="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"roundabout_requests_total{pool="default",server="127.0.0.1:5000",class="5xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"roundabout_upstream_body_failures_total{pool="default",server="127.0.0.1:5000"} 1"#),
            "{text}"
        );
        // A worker's copy replaced (a reload): what it counted stays counted.
        drop(one);
        assert!(m.encode().contains(r#"class="2xx"} 2"#));
        assert_eq!(m.counts().servers[&s], Answers { all: 3, errors: 1 });

        let (a, b) = (m.worker_in_flight(), m.worker_in_flight());
        a.fetch_add(2, Relaxed);
        b.fetch_sub(1, Relaxed);
        assert_eq!(m.in_flight_now(), 1);
        assert!(m.encode().contains("roundabout_in_flight_requests 1\n"));
        drop((shared, two));
        assert_eq!(m.counts().requests, 3);
    }
}
