//! Configuration: `config.toml` + `ROUNDABOUT__*` environment → [`FileConfig`] → [`Config`].
//!
//! The pipeline has two stages so that every error can name its key:
//! 1. the `config` crate merges the TOML file and the environment overrides, and
//!    `serde_path_to_error` deserializes the result into [`FileConfig`], whose structs reject
//!    unknown keys; a type error or unknown key is reported with its dotted path;
//! 2. [`FileConfig::validate`] turns the raw strings into real types (`Url`, `IpNet`,
//!    `SocketAddr`) and checks the ranges, again naming the key.
//!
//! Defaults are the SPEC's; `config/default.toml` documents each key.

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use url::Url;

/// Why a configuration was refused; the `Display` form is the one line printed at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not valid TOML.
    #[error("{file}: {reason}")]
    Source { file: String, reason: String },
    /// A key has a wrong type, an unknown name, or a value out of range.
    #[error("{file}: {key}: {reason}")]
    Key {
        file: String,
        key: String,
        reason: String,
    },
}

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
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
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
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:8000".into(),
            workers: 0,
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

/// A checked server entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerConfig {
    /// `scheme://host:port`, without path.
    pub url: Url,
    /// Relative share for the weighted strategies; at least 1.
    pub weight: u32,
}

/// The validated configuration the program runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// 0 = one per CPU core.
    pub workers: usize,
    pub strategy: Strategy,
    pub servers: Vec<ServerConfig>,
    pub health_check: HealthCheckSection,
    pub proxy: ProxySection,
    pub rate_limit: RateLimit,
    /// `None` disables the admin listener.
    pub admin: Option<SocketAddr>,
    pub admin_token: String,
    pub log_level: log::LevelFilter,
    pub access_log: bool,
    /// The file as resolved (after environment overrides), for `--check`.
    pub resolved: FileConfig,
}

/// The checked `[rate_limit]` section.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub enabled: bool,
    pub requests: u64,
    pub window: Duration,
    /// `None` = the in-process store.
    pub redis_url: Option<String>,
    pub key_prefix: String,
    pub on_store_error: OnStoreError,
    pub trusted_proxies: Vec<IpNet>,
}

impl Config {
    /// Loads `path`, applies the process's `ROUNDABOUT__*` environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`Config::load`], with the environment given explicitly (`None`: the process's).
    pub fn load_with_env(
        path: &Path,
        env: Option<config::Map<String, String>>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Source {
            file: file.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::from_toml_with_env(&file, &text, env)
    }

    /// Parses TOML `text` (named `file` in errors) with environment overrides, validates.
    pub fn from_toml_with_env(
        file: &str,
        text: &str,
        env: Option<config::Map<String, String>>,
    ) -> Result<Config, ConfigError> {
        // Values stay strings (serde converts numbers and booleans where a key wants one),
        // so that a token such as "007" is not read as the number 7. Only the two list keys
        // are parsed, and only they go through the source that splits on commas.
        let env: config::Map<String, String> = env.unwrap_or_else(|| {
            std::env::vars()
                .filter(|(k, _)| k.starts_with("ROUNDABOUT__"))
                .collect()
        });
        let (lists, scalars): (config::Map<_, _>, config::Map<_, _>) =
            env.into_iter().partition(|(k, _)| {
                LIST_KEYS.iter().any(|l| {
                    k.eq_ignore_ascii_case(&format!("ROUNDABOUT__{}", l.replace('.', "__")))
                })
            });
        let source = |vars| {
            config::Environment::with_prefix("ROUNDABOUT")
                .prefix_separator("__")
                .separator("__")
                .source(Some(vars))
        };
        let mut list_source = source(lists).try_parsing(true).list_separator(",");
        for key in LIST_KEYS {
            list_source = list_source.with_list_parse_key(key);
        }
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(source(scalars))
            .add_source(list_source)
            .build()
            .map_err(|e| ConfigError::Source {
                file: file.into(),
                reason: one_line(&e.to_string()),
            })?;
        let raw: FileConfig = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = e.path().to_string();
            let reason = one_line(&e.into_inner().to_string());
            if key == "." || key.is_empty() {
                ConfigError::Source {
                    file: file.into(),
                    reason,
                }
            } else {
                ConfigError::Key {
                    file: file.into(),
                    key,
                    reason,
                }
            }
        })?;
        raw.validate().map_err(|(key, reason)| ConfigError::Key {
            file: file.into(),
            key,
            reason,
        })
    }

    /// The resolved configuration as TOML, for `--check`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.resolved).unwrap_or_else(|e| format!("# {e}"))
    }
}

/// The keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 2] = ["balancer.servers", "rate_limit.trusted_proxies"];

type KeyError = (String, String);

fn key_err(key: impl fmt::Display, reason: impl fmt::Display) -> KeyError {
    (key.to_string(), reason.to_string())
}

impl FileConfig {
    /// Checks every value and converts it to its real type; errors name the key.
    pub fn validate(self) -> Result<Config, KeyError> {
        let listen = parse_addr(&self.listen.address).map_err(|r| key_err("listen.address", r))?;

        let mut servers = Vec::with_capacity(self.balancer.servers.len());
        for (i, s) in self.balancer.servers.iter().enumerate() {
            let (url, weight) = match s {
                FileServer::Url(u) => (u.as_str(), 1),
                FileServer::Weighted(w) => (w.url.as_str(), w.weight),
            };
            let key = format!("balancer.servers[{i}]");
            let url = parse_server_url(url).map_err(|r| key_err(format!("{key}.url"), r))?;
            if weight == 0 {
                return Err(key_err(format!("{key}.weight"), "must be at least 1"));
            }
            if servers.iter().any(|s: &ServerConfig| s.url == url) {
                return Err(key_err(key, format!("{url} is listed twice")));
            }
            servers.push(ServerConfig { url, weight });
        }

        let hc = &self.health_check;
        if !hc.path.starts_with('/') {
            return Err(key_err("health_check.path", "must start with '/'"));
        }
        if hc
            .path
            .parse::<actix_web::http::uri::PathAndQuery>()
            .is_err()
        {
            return Err(key_err("health_check.path", "is not a valid request path"));
        }
        nonzero(hc.interval, "health_check.interval")?;
        nonzero(hc.timeout, "health_check.timeout")?;
        if hc.unhealthy_threshold == 0 {
            return Err(key_err(
                "health_check.unhealthy_threshold",
                "must be at least 1",
            ));
        }
        if hc.healthy_threshold == 0 {
            return Err(key_err(
                "health_check.healthy_threshold",
                "must be at least 1",
            ));
        }

        nonzero(self.proxy.connect_timeout, "proxy.connect_timeout")?;
        nonzero(self.proxy.timeout, "proxy.timeout")?;

        let rl = &self.rate_limit;
        if rl.requests == 0 {
            return Err(key_err("rate_limit.requests", "must be at least 1"));
        }
        nonzero(rl.window, "rate_limit.window")?;
        if rl.window.subsec_nanos() != 0 {
            return Err(key_err(
                "rate_limit.window",
                "must be a whole number of seconds (Retry-After is in seconds)",
            ));
        }
        let redis_url = if rl.redis_url.is_empty() {
            None
        } else {
            match Url::parse(&rl.redis_url) {
                Ok(u) if matches!(u.scheme(), "redis" | "rediss" | "unix" | "redis+unix") => {
                    Some(rl.redis_url.clone())
                }
                Ok(u) => {
                    return Err(key_err(
                        "rate_limit.redis_url",
                        format!(
                            "scheme {:?} is not redis://, rediss:// or unix://",
                            u.scheme()
                        ),
                    ))
                }
                Err(e) => return Err(key_err("rate_limit.redis_url", format!("not a URL: {e}"))),
            }
        };
        if rl.key_prefix.is_empty() {
            return Err(key_err("rate_limit.key_prefix", "must not be empty"));
        }
        let mut trusted_proxies = Vec::with_capacity(rl.trusted_proxies.len());
        for (i, t) in rl.trusted_proxies.iter().enumerate() {
            let net = parse_net(t.trim())
                .map_err(|r| key_err(format!("rate_limit.trusted_proxies[{i}]"), r))?;
            trusted_proxies.push(net);
        }

        let admin = if self.admin.address.is_empty() {
            None
        } else {
            let addr = parse_addr(&self.admin.address).map_err(|r| key_err("admin.address", r))?;
            if !addr.ip().is_loopback() && self.admin.token.is_empty() {
                return Err(key_err(
                    "admin.token",
                    format!("must be set when admin.address ({addr}) is not a loopback address"),
                ));
            }
            Some(addr)
        };

        let log_level = self.log.level.parse::<log::LevelFilter>().map_err(|_| {
            key_err(
                "log.level",
                format!(
                    "{:?} is not one of off, error, warn, info, debug, trace",
                    self.log.level
                ),
            )
        })?;

        Ok(Config {
            listen,
            workers: self.listen.workers,
            strategy: self.balancer.strategy,
            servers,
            health_check: self.health_check.clone(),
            proxy: self.proxy.clone(),
            rate_limit: RateLimit {
                enabled: rl.enabled,
                requests: rl.requests,
                window: rl.window,
                redis_url,
                key_prefix: rl.key_prefix.clone(),
                on_store_error: rl.on_store_error,
                trusted_proxies,
            },
            admin,
            admin_token: self.admin.token.clone(),
            log_level,
            access_log: self.log.access_log,
            resolved: self,
        })
    }
}

/// Folds a multi-line parser message (TOML errors quote the source with a caret) into the
/// one line that start-up prints.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && l.split_once('|')
                    .is_none_or(|(n, _)| n.trim().parse::<u32>().is_err())
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn nonzero(d: Duration, key: &str) -> Result<(), KeyError> {
    if d.is_zero() {
        Err(key_err(key, "must be greater than zero"))
    } else {
        Ok(())
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an IP:port address (e.g. \"127.0.0.1:8000\")"))
}

/// A CIDR, or a bare address meaning just that address.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. \"10.0.0.0/8\") or an IP address"))
}

/// Checks a server URL: `http://host:port`, no path, query, fragment or credentials.
pub fn parse_server_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "{s:?}: https upstreams are not supported yet; use http://"
            ))
        }
        other => return Err(format!("{s:?}: scheme {other:?} is not http")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{s:?} must not carry credentials"));
    }
    // The url crate lets through hosts (with `{`, `"`, …) that are no HTTP authority.
    let authority = format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(80)
    );
    if authority
        .parse::<actix_web::http::uri::Authority>()
        .is_err()
        || actix_web::http::header::HeaderValue::from_str(&authority).is_err()
    {
        return Err(format!("{s:?}: the host is not valid in an HTTP authority"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{s:?} must be scheme://host:port only (the request's path is appended)"
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env("test.toml", text, Some(Default::default()))
    }

    #[test]
    fn empty_file_gives_the_spec_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(c.health_check.interval, Duration::from_secs(2));
        assert_eq!(c.proxy.retries, 2);
        assert_eq!(c.rate_limit.requests, 100);
        assert_eq!(
            c.rate_limit.redis_url.as_deref(),
            Some("redis://127.0.0.1:6379")
        );
        assert_eq!(c.admin, Some("127.0.0.1:8001".parse().unwrap()));
    }

    #[test]
    fn servers_take_plain_and_weighted_forms() {
        let c = parse(
            r#"[balancer]
servers = ["http://127.0.0.1:5000", { url = "http://127.0.0.1:5002", weight = 2 }]"#,
        )
        .unwrap();
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.servers[0].weight, 1);
        assert_eq!(c.servers[1].weight, 2);
        assert_eq!(c.servers[1].url.port(), Some(5002));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[listen]\nadress = \"x\"", "listen"),
            ("[rate_limit]\nwindow = \"0s\"", "rate_limit.window"),
            ("[rate_limit]\nwindow = \"soon\"", "rate_limit.window"),
            ("[listen]\nworkers = \"many\"", "listen.workers"),
            (
                "[balancer]\nservers = [\"ftp://x:1\"]",
                "balancer.servers[0].url",
            ),
            (
                "[balancer]\nservers = [{ url = \"http://a:1\", weight = 0 }]",
                "balancer.servers[0].weight",
            ),
            ("[balancer]\nstrategy = \"random\"", "balancer.strategy"),
            (
                "[rate_limit]\ntrusted_proxies = [\"10.0.0.0/33\"]",
                "trusted_proxies[0]",
            ),
            ("[admin]\naddress = \"0.0.0.0:8001\"", "admin.token"),
            ("[log]\nlevel = \"loud\"", "log.level"),
            ("[listen\naddress = 1", "line 1"),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with("test.toml: "), "{err}");
            assert!(err.contains(key), "{text:?} gave {err:?}, wanted key {key}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = [
            ("ROUNDABOUT__LISTEN__ADDRESS", "127.0.0.1:9999"),
            ("ROUNDABOUT__RATE_LIMIT__REDIS_URL", ""),
            ("ROUNDABOUT__PROXY__RETRIES", "5"),
            ("ROUNDABOUT__ADMIN__TOKEN", "007"),
            ("ROUNDABOUT__RATE_LIMIT__ENABLED", "false"),
            (
                "ROUNDABOUT__RATE_LIMIT__KEY_PREFIX",
                "12345678901234567890123",
            ),
            (
                "ROUNDABOUT__RATE_LIMIT__TRUSTED_PROXIES",
                "10.0.0.0/8,192.168.1.1",
            ),
            (
                "ROUNDABOUT__BALANCER__SERVERS",
                "http://127.0.0.1:1,http://127.0.0.1:2",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::from_toml_with_env("t.toml", "[proxy]\nretries = 1", Some(env)).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.rate_limit.redis_url, None);
        assert_eq!(c.proxy.retries, 5);
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.admin_token, "007", "text stays text");
        assert_eq!(c.rate_limit.key_prefix, "12345678901234567890123");
        assert!(!c.rate_limit.enabled);
        assert_eq!(c.rate_limit.trusted_proxies.len(), 2);
    }
}
