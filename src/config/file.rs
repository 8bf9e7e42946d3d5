//! The configuration file as written: [`FileConfig`], one struct per `[section]`, with the
//! SPEC's defaults. serde reads it (unknown keys refused); nothing here checks a value's
//! meaning, which is [`validate`](super::validate)'s job.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the next server is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastRequests,
    PowerOfTwo,
}

impl Strategy {
    /// The name as the config file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::WeightedRoundRobin => "weighted_round_robin",
            Strategy::LeastRequests => "least_requests",
            Strategy::PowerOfTwo => "power_of_two",
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
#[serde(untagged)]
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
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:8000".into(),
            workers: 0,
            tls_address: String::new(),
            tls: None,
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

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerSection {
    pub strategy: Strategy,
    pub servers: Vec<FileServer>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckSection {
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthCheckSection {
    fn default() -> Self {
        Self {
            path: "/".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub retries: u32,
    pub preserve_host: bool,
    pub max_body_bytes: u64,
    /// An upgraded connection (WebSocket) idle this long either way is closed.
    #[serde(with = "humantime_serde")]
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
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub redis_url: RedisUrl,
    pub key_prefix: String,
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
    pub access_log_format: AccessLogFormat,
}

/// Where the access log goes: `true` = stderr, `false` = off, or a file's path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
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
