//! The configuration file as written: [`FileConfig`], one struct per `[section]`, with the
//! SPEC's defaults. serde reads it (unknown keys refused), with readers of our own for the
//! values whose serde errors would speak Rust (enums, durations); nothing here checks a
//! value's meaning, which is [`validate`](super::validate)'s job.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::readers::{duration, one_of, opt_duration};

/// How the next server is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastRequests,
    PowerOfTwo,
    ConsistentHash,
    PeakEwma,
}

impl Strategy {
    /// The name as the config file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::WeightedRoundRobin => "weighted_round_robin",
            Strategy::LeastRequests => "least_requests",
            Strategy::PowerOfTwo => "power_of_two",
            Strategy::ConsistentHash => "consistent_hash",
            Strategy::PeakEwma => "peak_ewma",
        }
    }
}

/// What the rate limiter does while its shared store (Redis) cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Count in the in-process store meanwhile: each instance limits on its own.
    #[default]
    Local,
    /// Fail open: forward the request, uncounted.
    Allow,
    /// Fail closed: answer 503.
    Deny,
}

impl std::fmt::Display for OnStoreError {
    /// The config spelling (`local`), for log lines that quote the setting.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnStoreError::Local => "local",
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        })
    }
}

/// `rate_limit.redis_url` as written: one URL (`""` = the in-process store), or a list of
/// URLs, the seed nodes of a Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RedisUrl {
    One(String),
    Cluster(Vec<String>),
}

/// A server as written in the file: a plain URL or `{ url, weight }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "expected a URL such as \"http://127.0.0.1:5001\" or a table { url = \"...\", weight = N }"
)]
pub enum FileServer {
    Url(String),
    Weighted(WeightedServer),
}

/// The table form of a server entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedServer {
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// A server's weight when none is given (config file and admin API alike).
pub fn default_weight() -> u32 {
    1
}

/// The file as written, after environment overrides; strings not yet checked.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub listen: ListenSection,
    pub balancer: BalancerSection,
    pub health_check: HealthCheckSection,
    pub proxy: ProxySection,
    pub rate_limit: RateLimitSection,
    pub admin: AdminSection,
    pub log: LogSection,
    /// Pools beside `[balancer]` (the pool `default`), by name.
    pub pools: BTreeMap<String, PoolSection>,
    /// `[[routes]]`, in file order.
    pub routes: Vec<RouteSection>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// The plain HTTP listener; "" = none (then `tls_address` must be set).
    pub address: String,
    pub workers: usize,
    /// The TLS listener beside `address`; "" = none.
    pub tls_address: String,
    /// The TLS listener's certificate; required with `tls_address`, and only with it.
    pub tls: Option<TlsFiles>,
    /// Every request head, first or later on a connection, must arrive within this.
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// An idle kept-alive connection is closed after this; zero turns keep-alive off.
    #[serde(with = "duration")]
    pub keepalive_timeout: Duration,
    /// Open client connections, for the whole process.
    pub max_connections: usize,
    /// Every client connection (plain and TLS) opens with a PROXY protocol header, whose
    /// source address is the client's.
    pub proxy_protocol: bool,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:8000".into(),
            workers: 0,
            tls_address: String::new(),
            tls: None,
            header_timeout: Duration::from_secs(10),
            // nginx's keepalive_timeout.
            keepalive_timeout: Duration::from_secs(75),
            max_connections: 10_000,
            proxy_protocol: false,
        }
    }
}

/// `listen.tls`: PEM files, relative to the working directory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: String,
    /// The leaf's private key.
    pub key: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerSection {
    #[serde(deserialize_with = "one_of")]
    pub strategy: Strategy,
    pub servers: Vec<FileServer>,
    /// `consistent_hash`'s key: `client_ip`, `header:NAME`, `cookie:NAME`, `query:NAME`,
    /// `path`.
    pub hash_on: String,
    /// A cookie name turns stickiness on; "" = off.
    pub sticky_cookie: String,
    /// Percent; below this share of servers in rotation, the pool uses them all.
    pub panic_threshold: u8,
    /// Host names in `servers` are resolved again this often.
    #[serde(with = "duration")]
    pub resolve_interval: Duration,
    /// DNS servers (`10.0.0.2:53`); `[]` = the system's.
    pub resolvers: Vec<String>,
}

impl Default for BalancerSection {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            servers: Vec::new(),
            hash_on: "client_ip".into(),
            sticky_cookie: String::new(),
            panic_threshold: 0,
            resolve_interval: Duration::from_secs(30),
            resolvers: Vec::new(),
        }
    }
}

/// `[pools.NAME]`: `[balancer]`'s keys, and the health checks and proxy timeouts of this
/// pool where they differ from `[health_check]` and `[proxy]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    #[serde(deserialize_with = "one_of")]
    pub strategy: Strategy,
    pub servers: Vec<FileServer>,
    /// As `[balancer]`'s.
    pub hash_on: String,
    pub sticky_cookie: String,
    pub panic_threshold: u8,
    #[serde(with = "duration")]
    pub resolve_interval: Duration,
    pub resolvers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckOverrides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyOverrides>,
}

impl Default for PoolSection {
    fn default() -> Self {
        let b = BalancerSection::default();
        Self {
            strategy: b.strategy,
            servers: b.servers,
            hash_on: b.hash_on,
            sticky_cookie: b.sticky_cookie,
            panic_threshold: b.panic_threshold,
            resolve_interval: b.resolve_interval,
            resolvers: b.resolvers,
            health_check: None,
            proxy: None,
        }
    }
}

/// A pool's `health_check` table: any `[health_check]` key, for this pool only.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eject_after_5xx: Option<u32>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub eject_time: Option<Duration>,
}

/// A pool's `proxy` table: the `[proxy]` keys that may differ per pool.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyOverrides {
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// One `[[routes]]` entry as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteSection {
    /// Default `route-N`, N its position from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// A `[pools]` name, or `default` (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub strip_prefix: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RouteRateLimit>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRulesSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRulesSection>,
    pub redirect_https: bool,
}

/// A route's `rate_limit`: `false`, or a budget of its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "expected false or a table { requests = N, window = \"1s\" }"
)]
pub enum RouteRateLimit {
    Switch(bool),
    Budget(RouteBudget),
}

/// A route's own budget; `window` defaults to `rate_limit.window`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteBudget {
    pub requests: u64,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
}

/// A route's `request_headers` or `response_headers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderRulesSection {
    /// Replaced (or added), name → value.
    pub set: BTreeMap<String, String>,
    /// Dropped.
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckSection {
    pub path: String,
    #[serde(with = "duration")]
    pub interval: Duration,
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// Passive: > 0 takes a server out after this many 5xx answers (or failed
    /// connections, or timeouts) in a row, for `eject_time`.
    pub eject_after_5xx: u32,
    /// How long an ejected server stays out, doubled each time it is ejected again.
    #[serde(with = "duration")]
    pub eject_time: Duration,
}

impl Default for HealthCheckSection {
    fn default() -> Self {
        Self {
            path: "/".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            eject_after_5xx: 0,
            eject_time: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub retries: u32,
    pub preserve_host: bool,
    pub max_body_bytes: u64,
    /// An upgraded connection (WebSocket) idle this long either way is closed.
    #[serde(with = "duration")]
    pub tunnel_idle_timeout: Duration,
    /// A PEM file of CA certificates trusted for `https://` servers besides the system's
    /// roots; "" = the system's roots only.
    pub upstream_ca: String,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            retries: 2,
            preserve_host: true,
            max_body_bytes: 0,
            tunnel_idle_timeout: Duration::from_secs(3600),
            upstream_ca: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    pub enabled: bool,
    pub requests: u64,
    #[serde(with = "duration")]
    pub window: Duration,
    pub redis_url: RedisUrl,
    pub key_prefix: String,
    #[serde(deserialize_with = "one_of")]
    pub on_store_error: OnStoreError,
    /// IPv6 clients are counted per network of this many leading bits (one budget each).
    pub ipv6_prefix: u8,
    pub trusted_proxies: Vec<String>,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            enabled: true,
            requests: 100,
            window: Duration::from_secs(60),
            redis_url: RedisUrl::One("redis://127.0.0.1:6379".into()),
            key_prefix: "roundabout:rl".into(),
            on_store_error: OnStoreError::Local,
            ipv6_prefix: 64,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub address: String,
    pub token: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:8001".into(),
            token: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub level: String,
    pub access_log: AccessLogTarget,
    #[serde(deserialize_with = "one_of")]
    pub access_log_format: AccessLogFormat,
}

/// Where the access log goes: `true` = stderr, `false` = off, or a file's path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged, expecting = "expected true, false or a file's path")]
pub enum AccessLogTarget {
    Switch(bool),
    Path(String),
}

/// How an access-log line reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// nginx's `combined` fields, then upstream, upstream time, total time, request id.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            access_log: AccessLogTarget::Switch(true),
            access_log_format: AccessLogFormat::Combined,
        }
    }
}
