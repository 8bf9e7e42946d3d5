//! Prometheus metrics, shared by every worker (`Arc<Metrics>`), and read as plain numbers
//! ([`Counts`]) by the status page.
//!
//! What the request path counts is counted per worker, summed when `/metrics` or the status
//! page reads it (DESIGN.md's hot-path rule): each worker has its own copy of a server's
//! counters ([`servers`]), its own in-flight gauge and head-time histogram ([`workers`]).
//! So no cache line goes back and forth between the workers' cores per request. This file
//! holds the registry, what the rest of the crate calls to count, and the exposition.

#[cfg(not(feature = "dhat-heap"))]
mod heap;
mod servers;
mod workers;

use std::{
    collections::HashMap,
    sync::{atomic::AtomicI64, Arc},
};

use prometheus_client::{metrics::counter::Counter, registry::Registry};

use self::{
    servers::ServerFamilies,
    workers::{HeadTimes, InFlight},
};
pub use self::{
    servers::{Answers, ServerCounters, ServerKey},
    workers::WorkerHistogram,
};

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
    pub servers: HashMap<ServerKey, Answers>,
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
        let own = ServerCounters::default();
        let servers = ServerFamilies::register(&mut registry, &own);
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
        #[cfg(not(feature = "dhat-heap"))]
        heap::register(&mut registry);
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
    pub fn server_counters(&self, pool: &Arc<str>, server: &Arc<str>) -> ServerCounters {
        self.servers.counters(&(pool.clone(), server.clone()))
    }

    /// Counts one answered request by the status sent (499: the client went away);
    /// `server` is `None` for answers of our own (429, 502, …).
    pub fn answered(&self, server: Option<&ServerCounters>, status: u16) {
        server.unwrap_or(&self.own).inc(status);
    }

    /// A worker's own histogram of the time from a request to its response head, counted
    /// in `roundabout_request_duration_seconds` with every other worker's.
    pub fn head_times(&self) -> Arc<WorkerHistogram> {
        self.duration.for_worker()
    }

    /// A server ended a response body early.
    pub fn upstream_failed(&self, server: Option<&ServerCounters>) {
        if let Some(s) = server {
            s.body_failed();
        }
    }

    /// A worker's own in-flight gauge (requests started minus ended there), counted in
    /// `roundabout_in_flight_requests` with every other worker's.
    pub fn worker_in_flight(&self) -> Arc<AtomicI64> {
        self.in_flight.for_worker()
    }

    pub fn set_healthy(&self, server: &ServerKey, healthy: bool) {
        self.servers.set_healthy(server, healthy);
    }

    /// A server was ejected (`roundabout_ejections_total`).
    pub fn ejected(&self, server: &ServerKey) {
        self.servers.ejected(server);
    }

    pub fn health_check_failed(&self, server: &ServerKey) {
        self.servers.health_check_failed(server);
    }

    /// A removed server's health gauge goes away with it (its other series once it has
    /// drained).
    pub fn forget_server(&self, server: &ServerKey) {
        self.servers.forget(server);
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
        let servers = self.servers.answers();
        let own = Answers::of(self.own.totals());
        Counts {
            requests: self.servers.retired()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_by_server_and_class() {
        let m = Metrics::new();
        let s: ServerKey = (Arc::from("default"), Arc::from("127.0.0.1:5000"));
        let counters = m.server_counters(&s.0, &s.1);
        m.answered(Some(&counters), 204);
        m.head_times().observe(std::time::Duration::from_millis(2));
        m.answered(None, 503);
        m.set_healthy(&s, true);
        let text = m.encode();
        assert!(
            text.contains(
                r#"roundabout_requests_total{pool="default",server="127.0.0.1:5000",class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"roundabout_requests_total{pool="",server="",class="5xx"} 1"#));
        assert!(
            text.contains(r#"roundabout_server_healthy{pool="default",server="127.0.0.1:5000"} 1"#)
        );
        assert!(text.contains("roundabout_request_duration_seconds_count 1"));
    }

    #[test]
    fn series_come_in_the_same_order_whatever_the_order_they_were_made_in() {
        let m = Metrics::new();
        let keep: Vec<ServerCounters> = ["127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:1"]
            .into_iter()
            .map(|s| m.server_counters(&Arc::from("default"), &Arc::from(s)))
            .collect();
        let text = m.encode();
        let servers: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("roundabout_requests_total{pool=\"default\",server=\"127")
                    && l.contains("2xx")
            })
            .collect();
        let mut sorted = servers.clone();
        sorted.sort_unstable();
        assert_eq!(servers, sorted);
        assert!(text.ends_with("# EOF\n"), "{text}");
        drop(keep);
    }

    #[test]
    fn counts_keep_the_answers_of_a_server_whose_series_are_gone() {
        let m = Metrics::new();
        let s: ServerKey = (Arc::from("default"), Arc::from("127.0.0.1:5000"));
        let counters = m.server_counters(&s.0, &s.1);
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
