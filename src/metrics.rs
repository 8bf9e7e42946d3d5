//! Prometheus metrics, shared by every worker (`Arc<Metrics>`), and read as plain numbers
//! ([`Counts`]) by the status page.
//!
//! What the request path counts is counted per worker: each worker has its own copy of a
//! server's counters ([`ServerCounters::for_worker`]), its own in-flight gauge and its own
//! head-time histogram, relaxed atomics that no other worker writes, summed when
//! `/metrics` or the status page reads them. So no cache line goes back and forth between
//! the workers' cores per request.
//!
//! Label values that name a server are the upstream's `Arc<str>` label, so recording a
//! request clones a pointer, not a string. A server's series live as long as the server:
//! they are made when it is configured or added, and dropped when it has been removed and
//! its last request has ended, so servers that come and go do not grow `/metrics`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, Weak,
    },
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        MetricType,
    },
    registry::Registry,
};

/// A server's `host:port` as a label value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerName(pub Arc<str>);

impl EncodeLabelValue for ServerName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    server: ServerName,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `1xx`.
    class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServerLabels {
    server: ServerName,
}

/// One server's request counters as one holder counts them: answers by status class
/// (1xx..5xx), then bodies the server ended early.
#[derive(Debug, Default)]
struct Tally([AtomicU64; 6]);

impl Tally {
    const FAILED: usize = 5;

    fn get(&self) -> [u64; 6] {
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
    /// answers of our own, which [`Metrics`] holds directly.
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

    fn inc(&self, status: u16) {
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

/// Answers counted so far: the status page's rates are differences of two of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answers {
    pub all: u64,
    /// 5xx.
    pub errors: u64,
}

impl Answers {
    fn of(totals: [u64; 6]) -> Answers {
        Answers {
            all: totals[..Tally::FAILED].iter().sum(),
            errors: totals[4],
        }
    }
}

/// The counters at one instant, as the status page samples them.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Every answer given since start, ours and those of servers since removed included.
    pub requests: u64,
    /// Answers of our own (429, 502, 503, …), `server=""`.
    pub own: Answers,
    /// Requests refused with 429.
    pub rate_limited: u64,
    /// Each server's answers, by label, for every server that has series now.
    pub servers: HashMap<Arc<str>, Answers>,
}

/// Which servers have series now, by label.
type Live = Arc<Mutex<HashMap<Arc<str>, Weak<ServerSeries>>>>;

/// The families that hold per-server series, and which servers are alive in them.
#[derive(Debug, Clone)]
struct ServerFamilies {
    healthy: Family<ServerLabels, Gauge>,
    health_check_failures: Family<ServerLabels, Counter>,
    live: Live,
    /// Answers of servers whose series are gone, so that the status page's total since
    /// start never goes down.
    retired: Arc<AtomicU64>,
}

/// A server's place in the metrics: its series are removed when the last holder of its
/// counters goes.
#[derive(Debug)]
struct ServerSeries {
    label: Arc<str>,
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
        if live.get(&self.label).is_some_and(|w| w.upgrade().is_some()) {
            return;
        }
        live.remove(&self.label);
        let server = ServerLabels {
            server: ServerName(self.label.clone()),
        };
        f.healthy.remove(&server);
        f.health_check_failures.remove(&server);
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
struct RequestCounts {
    live: Live,
    own: ServerCounters,
}

impl EncodeMetric for RequestCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let own: Arc<str> = Arc::from("");
        let series = live_series(&self.live);
        let rows = std::iter::once((own, self.own.0.tally.get()))
            .chain(series.iter().map(|s| (s.label.clone(), s.totals())));
        for (label, totals) in rows {
            for (class, n) in CLASSES.into_iter().zip(totals) {
                let labels = RequestLabels {
                    server: ServerName(label.clone()),
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
            let labels = ServerLabels {
                server: ServerName(series.label.clone()),
            };
            let failed = series.totals()[Tally::FAILED];
            ConstCounter::new(failed).encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// `roundabout_in_flight_requests`: every worker's own gauge, summed.
#[derive(Debug, Clone, Default)]
struct InFlight(Arc<Mutex<Vec<Arc<AtomicI64>>>>);

impl InFlight {
    fn now(&self) -> i64 {
        let workers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        workers.iter().map(|w| w.load(Relaxed)).sum()
    }
}

impl EncodeMetric for InFlight {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.now())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of the head-time buckets: 1 ms to about 33 s, doubling (then +Inf).
const HEAD_BUCKETS: [f64; 16] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384, 32.768,
];

/// One worker's histogram: relaxed atomics that only that worker writes (no lock, no cache
/// line shared with another worker on the request path), summed when `/metrics` is read.
#[derive(Debug, Default)]
pub struct WorkerHistogram {
    /// Per bucket of [`HEAD_BUCKETS`], then +Inf; not cumulative.
    buckets: [AtomicU64; HEAD_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl WorkerHistogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = HEAD_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(HEAD_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }
}

/// `roundabout_request_duration_seconds`: every worker's [`WorkerHistogram`], summed.
#[derive(Debug, Clone, Default)]
struct HeadTimes(Arc<Mutex<Vec<Arc<WorkerHistogram>>>>);

impl EncodeMetric for HeadTimes {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let workers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut buckets: Vec<(f64, u64)> = HEAD_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .map(|le| (le, 0))
            .collect();
        let (mut count, mut sum) = (0, 0.0);
        for w in workers.iter() {
            for (b, n) in buckets.iter_mut().zip(&w.buckets) {
                b.1 += n.load(Relaxed);
            }
            count += w.count.load(Relaxed);
            sum += w.sum_nanos.load(Relaxed) as f64 / 1e9;
        }
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// `text` with the samples of each counter or gauge family sorted; a family's lines stay
/// together after its `# HELP` and `# TYPE`, and a histogram's keep their bucket order.
fn sorted_series(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut samples: Vec<&str> = Vec::new();
    let mut sortable = false;
    let flush = |samples: &mut Vec<&str>, sortable: bool, out: &mut String| {
        if sortable {
            samples.sort_unstable();
        }
        for line in samples.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut samples, sortable, &mut out);
            if let Some(kind) = line.strip_prefix("# TYPE ") {
                sortable = kind.ends_with(" counter") || kind.ends_with(" gauge");
            }
            out.push_str(line);
            out.push('\n');
        } else {
            samples.push(line);
        }
    }
    flush(&mut samples, sortable, &mut out);
    out
}

/// Every metric roundabout exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    servers: ServerFamilies,
    duration: HeadTimes,
    in_flight: InFlight,
    rate_limited: Counter,
    access_log_dropped: Counter,
    store_errors: Counter,
    fallback: Counter,
    /// Answers of our own (429, 502, …), `server=""`.
    own: ServerCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `roundabout_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("roundabout");
        let live = Live::default();
        let own = ServerCounters::default();
        registry.register(
            "requests",
            "Proxied requests by upstream server and status class (answers of our own: server=\"\")",
            RequestCounts {
                live: live.clone(),
                own: own.clone(),
            },
        );
        // 1 ms to about 33 s.
        let duration = HeadTimes::default();
        registry.register(
            "request_duration_seconds",
            "Time from the request to its response head (the upstream's, or ours for 4xx/5xx of our own)",
            duration.clone(),
        );
        let in_flight = InFlight::default();
        registry.register(
            "in_flight_requests",
            "Requests being proxied now",
            in_flight.clone(),
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
            "Failed health checks and failed connections, by server",
            health_check_failures.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429",
            rate_limited.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "rate_limit_store_errors",
            "Calls to the rate-limit store (Redis) that failed: checks, and the probes that ask it while it is away",
            store_errors.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer could not keep up (its queue was full)",
            access_log_dropped.clone(),
        );
        let fallback = Counter::default();
        registry.register(
            "rate_limit_fallback",
            "Rate-limit checks answered by the in-process fallback store while Redis was unreachable (on_store_error = \"local\")",
            fallback.clone(),
        );
        let servers = ServerFamilies {
            healthy,
            health_check_failures,
            live,
            retired: Arc::default(),
        };
        Self {
            own,
            registry,
            servers,
            duration,
            in_flight,
            rate_limited,
            access_log_dropped,
            store_errors,
            fallback,
        }
    }

    /// The Prometheus text exposition of every metric.
    /// The OpenMetrics text of every metric, each family's series in a stable order (by
    /// labels), so that two scrapes read alike.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        sorted_series(&text)
    }

    /// The request counters of `server`, to keep beside it (each worker then takes its own
    /// with [`ServerCounters::for_worker`]). Every series of the server is present from now
    /// on (at 0), until the last `ServerCounters` of it is dropped.
    pub fn server_counters(&self, server: &Arc<str>) -> ServerCounters {
        let f = &self.servers;
        let series = {
            let mut live = f.live.lock().unwrap_or_else(|e| e.into_inner());
            match live.get(server).and_then(Weak::upgrade) {
                Some(series) => series,
                None => {
                    let series = Arc::new(ServerSeries {
                        label: server.clone(),
                        families: f.clone(),
                        holders: Mutex::default(),
                        gone: Tally::default(),
                    });
                    live.insert(server.clone(), Arc::downgrade(&series));
                    series
                }
            }
        };
        let labels = ServerLabels {
            server: ServerName(server.clone()),
        };
        drop(f.health_check_failures.get_or_create(&labels));
        series.counters()
    }

    /// How many servers have series now (removed ones count until they have drained).
    pub fn servers_tracked(&self) -> usize {
        self.servers
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Counts one answered request by the status sent (499: the client went away);
    /// `server` is `None` for answers of our own (429, 502, …).
    pub fn answered(&self, server: Option<&ServerCounters>, status: u16) {
        server.unwrap_or(&self.own).inc(status);
    }

    /// A worker's own histogram of the time from a request to its response head, counted
    /// in `roundabout_request_duration_seconds` with every other worker's.
    pub fn head_times(&self) -> Arc<WorkerHistogram> {
        let h = Arc::new(WorkerHistogram::default());
        self.duration
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h.clone());
        h
    }

    /// A server ended a response body early.
    pub fn upstream_failed(&self, server: Option<&ServerCounters>) {
        if let Some(s) = server {
            s.0.tally.0[Tally::FAILED].fetch_add(1, Relaxed);
        }
    }

    /// A worker's own in-flight gauge (requests started minus ended there), counted in
    /// `roundabout_in_flight_requests` with every other worker's.
    pub fn worker_in_flight(&self) -> Arc<AtomicI64> {
        let gauge = Arc::new(AtomicI64::new(0));
        self.in_flight
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(gauge.clone());
        gauge
    }

    pub fn set_healthy(&self, server: &Arc<str>, healthy: bool) {
        self.servers
            .healthy
            .get_or_create(&ServerLabels {
                server: ServerName(server.clone()),
            })
            .set(i64::from(healthy));
    }

    pub fn health_check_failed(&self, server: &Arc<str>) {
        self.servers
            .health_check_failures
            .get_or_create(&ServerLabels {
                server: ServerName(server.clone()),
            })
            .inc();
    }

    /// A removed server's health gauge goes away with it (its other series once it has
    /// drained).
    pub fn forget_server(&self, server: &Arc<str>) {
        self.servers.healthy.remove(&ServerLabels {
            server: ServerName(server.clone()),
        });
    }

    pub fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
    }

    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    /// A check answered by the in-process fallback store.
    pub fn fallback(&self) {
        self.fallback.inc();
    }

    /// Every counter the status page shows a rate of, read now. Takes the lock of the
    /// server list (not touched per request) and reads atomics; changes nothing.
    pub fn counts(&self) -> Counts {
        let servers = live_series(&self.servers.live)
            .iter()
            .map(|series| (series.label.clone(), Answers::of(series.totals())))
            .collect::<HashMap<Arc<str>, Answers>>();
        let own = Answers::of(self.own.0.tally.get());
        Counts {
            requests: self.servers.retired.load(Relaxed)
                + own.all
                + servers.values().map(|a| a.all).sum::<u64>(),
            own,
            rate_limited: self.rate_limited.get(),
            servers,
        }
    }

    /// The current in-flight gauge, for tests and the status page.
    pub fn in_flight_now(&self) -> i64 {
        self.in_flight.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_by_server_and_class() {
        let m = Metrics::new();
        let s: Arc<str> = Arc::from("127.0.0.1:5000");
        let counters = m.server_counters(&s);
        m.answered(Some(&counters), 204);
        m.head_times().observe(std::time::Duration::from_millis(2));
        m.answered(None, 503);
        m.set_healthy(&s, true);
        let text = m.encode();
        assert!(
            text.contains(r#"roundabout_requests_total{server="127.0.0.1:5000",class="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"roundabout_requests_total{server="",class="5xx"} 1"#));
        assert!(text.contains(r#"roundabout_server_healthy{server="127.0.0.1:5000"} 1"#));
        assert!(text.contains("roundabout_request_duration_seconds_count 1"));
    }

    #[test]
    fn series_come_in_the_same_order_whatever_the_order_they_were_made_in() {
        let m = Metrics::new();
        let keep: Vec<ServerCounters> = ["127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:1"]
            .into_iter()
            .map(|s| m.server_counters(&Arc::from(s)))
            .collect();
        let text = m.encode();
        let servers: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("roundabout_requests_total{server=\"127") && l.contains("2xx")
            })
            .collect();
        let mut sorted = servers.clone();
        sorted.sort_unstable();
        assert_eq!(servers, sorted);
        assert!(text.ends_with("# EOF\n"), "{text}");
        drop(keep);
    }

    #[test]
    fn a_servers_series_go_with_its_last_counters() {
        let m = Metrics::new();
        let s: Arc<str> = Arc::from("127.0.0.1:5000");
        let first = m.server_counters(&s);
        let second = m.server_counters(&s);
        first.inc(200);
        m.set_healthy(&s, true);
        let text = m.encode();
        assert!(
            text.contains(r#"roundabout_health_check_failures_total{server="127.0.0.1:5000"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"roundabout_requests_total{server="127.0.0.1:5000",class="5xx"} 0"#)
        );
        drop(first);
        assert!(
            m.encode().contains(r#"class="2xx"} 1"#),
            "another holder keeps them"
        );
        m.forget_server(&s);
        drop(second);
        assert!(!m.encode().contains("127.0.0.1:5000"), "{}", m.encode());
        assert_eq!(m.servers_tracked(), 0);
    }

    #[test]
    fn each_workers_counters_are_its_own_and_summed_when_read_even_after_one_goes() {
        let m = Metrics::new();
        let s: Arc<str> = Arc::from("127.0.0.1:5000");
        let shared = m.server_counters(&s);
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
            text.contains(r#"roundabout_requests_total{server="127.0.0.1:5000",class="2xx"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"roundabout_requests_total{server="127.0.0.1:5000",class="5xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"roundabout_upstream_body_failures_total{server="127.0.0.1:5000"} 1"#),
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

    #[test]
    fn counts_keep_the_answers_of_a_server_whose_series_are_gone() {
        let m = Metrics::new();
        let s: Arc<str> = Arc::from("127.0.0.1:5000");
        let counters = m.server_counters(&s);
        m.answered(Some(&counters), 200);
        m.answered(Some(&counters), 502);
        m.answered(None, 429);
        let before = m.counts();
        assert_eq!(before.requests, 3);
        assert_eq!(before.servers[&s], Answers { all: 2, errors: 1 });
        assert_eq!(before.own, Answers { all: 1, errors: 0 });
        drop(counters);
        let after = m.counts();
        assert!(after.servers.is_empty());
        assert_eq!(after.requests, 3, "the total since start never goes down");
    }
}
