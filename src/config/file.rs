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

/// What the rate limiter does when its store (Redis) cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Fail open: forward the request.
    #[default]
    Allow,
    /// Fail closed: answer 503.
    Deny,
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
    pub address: String,
    pub workers: usize,
    /// Every request head, first or later on a connection, must arrive within this.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// An idle kept-alive connection is closed after this; zero turns keep-alive off.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Open client connections, for the whole process.
    pub max_connections: usize,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:8000".into(),
            workers: 0,
            header_timeout: Duration::from_secs(10),
            // nginx's keepalive_timeout.
            keepalive_timeout: Duration::from_secs(75),
            max_connections: 10_000,
        }
    }
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
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            retries: 2,
            preserve_host: true,
            max_body_bytes: 0,
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
    pub redis_url: String,
    pub key_prefix: String,
    pub on_store_error: OnStoreError,
    pub trusted_proxies: Vec<String>,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            enabled: true,
            requests: 100,
            window: Duration::from_secs(60),
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "roundabout:rl".into(),
            on_store_error: OnStoreError::Allow,
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
    pub access_log: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            access_log: true,
        }
    }
}
