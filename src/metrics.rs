//! Prometheus metrics, shared by every worker (`Arc<Metrics>`; the counters are atomics).
//!
//! Label values that name a server are the upstream's `Arc<str>` label, so recording a
//! request clones a pointer, not a string.

use std::sync::{atomic::AtomicI64, Arc};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
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

/// One server's request counters, one per status class, looked up in the family once (when
/// the server is configured), so that counting a request is one atomic increment.
#[derive(Debug, Clone, Default)]
pub struct ServerCounters([Counter; 5]);

impl ServerCounters {
    fn inc(&self, status: u16) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.0[class].inc();
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every metric roundabout exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    in_flight: Gauge<i64, AtomicI64>,
    healthy: Family<ServerLabels, Gauge>,
    health_check_failures: Family<ServerLabels, Counter>,
    rate_limited: Counter,
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
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Proxied requests by upstream server and status class (answers of our own: server=\"\")",
            requests.clone(),
        );
        // 1 ms to about 33 s.
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 16,
        ));
        registry.register(
            "request_duration_seconds",
            "Time from the request to its response head (the upstream's, or ours for 4xx/5xx of our own)",
            duration.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "in_flight_requests",
            "Requests being proxied now",
            in_flight.clone(),
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
        let fallback = Counter::default();
        registry.register(
            "rate_limit_fallback",
            "Rate-limit checks answered by the in-process fallback store while Redis was unreachable (on_store_error = \"local\")",
            fallback.clone(),
        );
        let own = Self::counters_in(&requests, &Arc::from(""));
        Self {
            own,
            registry,
            requests,
            duration,
            in_flight,
            healthy,
            health_check_failures,
            rate_limited,
            store_errors,
            fallback,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn counters_in(family: &Family<RequestLabels, Counter>, server: &Arc<str>) -> ServerCounters {
        ServerCounters(CLASSES.map(|class| {
            family
                .get_or_create(&RequestLabels {
                    server: ServerName(server.clone()),
                    class,
                })
                .clone()
        }))
    }

    /// The request counters of `server`, to keep beside it.
    pub fn server_counters(&self, server: &Arc<str>) -> ServerCounters {
        Self::counters_in(&self.requests, server)
    }

    /// Counts one answered request; `server` is `None` for answers of our own (429, 502, …).
    pub fn request(&self, server: Option<&ServerCounters>, status: u16, seconds: Option<f64>) {
        server.unwrap_or(&self.own).inc(status);
        if let Some(s) = seconds {
            self.duration.observe(s);
        }
    }

    /// A request started (`+1`) or ended (`-1`).
    pub fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    pub fn set_healthy(&self, server: &Arc<str>, healthy: bool) {
        self.healthy
            .get_or_create(&ServerLabels {
                server: ServerName(server.clone()),
            })
            .set(i64::from(healthy));
    }

    pub fn health_check_failed(&self, server: &Arc<str>) {
        self.health_check_failures
            .get_or_create(&ServerLabels {
                server: ServerName(server.clone()),
            })
            .inc();
    }

    /// A removed server's health gauge goes away with it.
    pub fn forget_server(&self, server: &Arc<str>) {
        self.healthy.remove(&ServerLabels {
            server: ServerName(server.clone()),
        });
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

    /// The current in-flight gauge, for tests and the admin API.
    pub fn in_flight_now(&self) -> i64 {
        self.in_flight.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_by_server_and_class() {
        let m = Metrics::new();
        let s: Arc<str> = Arc::from("127.0.0.1:5000");
        m.request(Some(&m.server_counters(&s)), 204, Some(0.002));
        m.request(None, 503, None);
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
}
