//! [`FileConfig`] → [`Config`]: every value checked and turned into its real type (`Url`,
//! `IpNet`, `SocketAddr`, `LevelFilter`), every error naming its dotted key. Nothing here
//! reads the environment, and no file but the TLS certificates, keys and CAs the config
//! names (through [`crate::tls`], so that a bad one is a config error like any other).

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use serde::Serialize;
use url::Url;

use super::file::{
    AccessLogFormat, AccessLogTarget, FileConfig, FileServer, HealthCheckSection, OnStoreError,
    ProxySection, RedisUrl, Strategy,
};
use crate::tls::{self, ServerCert};

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
    /// The plain HTTP listener; `None` when only the TLS one is wanted.
    pub listen: Option<SocketAddr>,
    /// The TLS listener and its certificate, read and checked.
    pub tls: Option<TlsListen>,
    /// How `https://` servers are verified: the system's roots and `proxy.upstream_ca`.
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// 0 = one per CPU core.
    pub workers: usize,
    /// Every request head, first or later on a connection, must arrive within this.
    pub header_timeout: Duration,
    /// An idle kept-alive client connection is closed after this; zero: no keep-alive.
    pub keepalive_timeout: Duration,
    /// Open client connections for the whole process (at least 1).
    pub max_connections: usize,
    pub strategy: Strategy,
    pub servers: Vec<ServerConfig>,
    pub health_check: HealthCheckSection,
    pub proxy: ProxySection,
    pub rate_limit: RateLimit,
    /// `None` disables the admin listener.
    pub admin: Option<SocketAddr>,
    pub admin_token: String,
    pub log_level: log::LevelFilter,
    /// `None`: no access log.
    pub access_log: Option<AccessLog>,
    /// The file as resolved (after environment overrides), for `--check`.
    pub resolved: FileConfig,
    /// Where it was read from; `None` when it was parsed from text.
    pub source: Option<Source>,
}

/// The checked `listen.tls_address` and `listen.tls`.
#[derive(Debug, Clone)]
pub struct TlsListen {
    pub address: SocketAddr,
    pub cert: ServerCert,
}

/// Where a configuration was read from, to read it again on reload.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: std::path::PathBuf,
    /// The environment given explicitly (`None`: the process's, read again on reload).
    pub env: Option<config::Map<String, String>>,
}

/// Where the access log goes and how it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// `None`: stderr.
    pub file: Option<std::path::PathBuf>,
    pub format: AccessLogFormat,
}

/// The checked `[rate_limit]` section.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub enabled: bool,
    pub requests: u64,
    pub window: Duration,
    /// `None` = the in-process store.
    pub redis_url: Option<RedisTarget>,
    pub key_prefix: String,
    pub on_store_error: OnStoreError,
    /// 1..=128: IPv6 clients share one budget per network of this many leading bits.
    pub ipv6_prefix: u8,
    pub trusted_proxies: Vec<IpNet>,
}

/// Where the shared counts live: `rate_limit.redis_url`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis server (or a unix socket).
    Server(String),
    /// A Redis Cluster, by its seed nodes (at least one; the others are found from them).
    Cluster(Vec<String>),
}

impl RateLimit {
    /// Where the counts live, for log lines: `redis://host:port (shared)` with any password
    /// hidden, `redis cluster redis://a:7000,redis://b:7000 (shared)`, or `in-process`.
    pub fn store_label(&self) -> String {
        match &self.redis_url {
            None => "in-process".into(),
            Some(RedisTarget::Server(url)) => format!("{} (shared)", redact_url(url)),
            Some(RedisTarget::Cluster(seeds)) => {
                let seeds: Vec<String> = seeds.iter().map(|u| redact_url(u)).collect();
                format!("redis cluster {} (shared)", seeds.join(","))
            }
        }
    }

    /// The limiter's part of the start-up line, in config spelling:
    /// `rate limit 100/60s, store redis://127.0.0.1:6379 (shared), on_store_error = "local"`.
    pub fn summary(&self) -> String {
        if !self.enabled {
            return "rate limit off".into();
        }
        let head = format!(
            "rate limit {}/{}s, store {}",
            self.requests,
            self.window.as_secs(),
            self.store_label()
        );
        match self.redis_url {
            // The in-process store cannot become unreachable: no policy applies.
            None => head,
            Some(_) => format!("{head}, on_store_error = \"{}\"", self.on_store_error),
        }
    }
}

/// `url` as it may be logged: a password (in the authority, or as a `pass`/`password`
/// query parameter of a unix-socket URL) becomes `***`, and a `redis://` URL without a
/// port shows the default one.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = Url::parse(url) else {
        return "(unparseable URL)".into();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.port().is_none() && matches!(u.scheme(), "redis" | "rediss") && u.host().is_some() {
        let _ = u.set_port(Some(6379));
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if matches!(&*k, "pass" | "password") {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

type KeyError = (String, String);

/// A Redis URL the client can use: `redis://`, `rediss://`, or (not for a cluster's nodes)
/// a unix socket.
fn redis_server_url(url: &str, cluster: bool) -> Result<String, String> {
    let u = Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    match u.scheme() {
        "redis" | "rediss" => Ok(url.to_string()),
        "unix" | "redis+unix" if !cluster => Ok(url.to_string()),
        scheme if cluster => Err(format!(
            "scheme {scheme:?} is not redis:// or rediss:// (a cluster's nodes are reached over TCP)"
        )),
        scheme => Err(format!(
            "scheme {scheme:?} is not redis://, rediss:// or unix://"
        )),
    }
}

/// `rate_limit.redis_url` as a list: a Redis Cluster's seed nodes, which must agree on the
/// credentials (the cluster client uses one set for every node).
fn cluster_seeds(seeds: &[String]) -> Result<Vec<String>, KeyError> {
    if seeds.is_empty() {
        return Err(key_err(
            "rate_limit.redis_url",
            "an empty list names no cluster node (\"\" is the in-process store)",
        ));
    }
    let mut checked: Vec<String> = Vec::with_capacity(seeds.len());
    for (i, seed) in seeds.iter().enumerate() {
        let key = format!("rate_limit.redis_url[{i}]");
        let seed = seed.trim();
        let url = redis_server_url(seed, true).map_err(|r| key_err(&key, r))?;
        let credentials = |u: &str| {
            Url::parse(u)
                .map(|u| (u.username().to_string(), u.password().map(str::to_string)))
                .ok()
        };
        if i > 0 && credentials(&url) != credentials(&checked[0]) {
            return Err(key_err(
                &key,
                "every cluster node must have the user and password of the first",
            ));
        }
        checked.push(url);
    }
    Ok(checked)
}

fn key_err(key: impl fmt::Display, reason: impl fmt::Display) -> KeyError {
    (key.to_string(), reason.to_string())
}

impl FileConfig {
    /// Checks every value and converts it to its real type; errors name the key.
    pub fn validate(self) -> Result<Config, KeyError> {
        let (listen, tls) = self.validate_listen()?;
        if self.listen.workers > MAX_WORKERS {
            return Err(key_err(
                "listen.workers",
                format!("must be at most {MAX_WORKERS}"),
            ));
        }
        nonzero(self.listen.header_timeout, "listen.header_timeout")?;
        at_most_a_day(self.listen.header_timeout, "listen.header_timeout")?;
        at_most_a_day(self.listen.keepalive_timeout, "listen.keepalive_timeout")?;
        if self.listen.max_connections == 0 {
            return Err(key_err("listen.max_connections", "must be at least 1"));
        }
        in_toml_range(self.listen.max_connections as u64, "listen.max_connections")?;

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
        nonzero(self.proxy.tunnel_idle_timeout, "proxy.tunnel_idle_timeout")?;
        let upstream_ca =
            Some(Path::new(&self.proxy.upstream_ca)).filter(|p| !p.as_os_str().is_empty());
        let upstream_tls =
            tls::client_config(upstream_ca).map_err(|e| key_err("proxy.upstream_ca", e))?;
        in_toml_range(self.proxy.max_body_bytes, "proxy.max_body_bytes")?;

        let rl = &self.rate_limit;
        if rl.requests == 0 {
            return Err(key_err("rate_limit.requests", "must be at least 1"));
        }
        in_toml_range(rl.requests, "rate_limit.requests")?;
        nonzero(rl.window, "rate_limit.window")?;
        if rl.window.subsec_nanos() != 0 {
            return Err(key_err(
                "rate_limit.window",
                "must be a whole number of seconds (Retry-After is in seconds)",
            ));
        }
        let redis_url = match &rl.redis_url {
            RedisUrl::One(url) if url.is_empty() => None,
            RedisUrl::One(url) => Some(RedisTarget::Server(
                redis_server_url(url, false).map_err(|r| key_err("rate_limit.redis_url", r))?,
            )),
            RedisUrl::Cluster(seeds) => Some(RedisTarget::Cluster(cluster_seeds(seeds)?)),
        };
        if rl.key_prefix.is_empty() {
            return Err(key_err("rate_limit.key_prefix", "must not be empty"));
        }
        if !(1..=128).contains(&rl.ipv6_prefix) {
            return Err(key_err(
                "rate_limit.ipv6_prefix",
                format!("{} is not a prefix length from 1 to 128", rl.ipv6_prefix),
            ));
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

        // An environment override is text: "true" and "false" are the switches, not paths.
        let target = match &self.log.access_log {
            AccessLogTarget::Path(p) if p == "true" => AccessLogTarget::Switch(true),
            AccessLogTarget::Path(p) if p == "false" => AccessLogTarget::Switch(false),
            other => other.clone(),
        };
        let access_log = match &target {
            AccessLogTarget::Switch(false) => None,
            AccessLogTarget::Switch(true) => Some(AccessLog {
                file: None,
                format: self.log.access_log_format,
            }),
            AccessLogTarget::Path(p) if p.trim().is_empty() => {
                return Err(key_err(
                    "log.access_log",
                    "must be true, false or a file's path",
                ))
            }
            AccessLogTarget::Path(p) => Some(AccessLog {
                file: Some(p.into()),
                format: self.log.access_log_format,
            }),
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
            tls,
            upstream_tls,
            workers: self.listen.workers,
            header_timeout: self.listen.header_timeout,
            keepalive_timeout: self.listen.keepalive_timeout,
            max_connections: self.listen.max_connections,
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
                ipv6_prefix: rl.ipv6_prefix,
                trusted_proxies,
            },
            admin,
            admin_token: self.admin.token.clone(),
            log_level,
            access_log,
            resolved: self,
            source: None,
        })
    }
}

/// actix-server's limit: it refuses to start more worker threads.
const MAX_WORKERS: usize = 512;

/// The connection deadlines are added to `Instant::now()`, which panics past its range: a
/// day is far longer than any deadline that makes sense, and far inside that range.
fn at_most_a_day(d: Duration, key: &str) -> Result<(), KeyError> {
    if d > Duration::from_secs(24 * 3600) {
        Err(key_err(key, "must be at most 1 day"))
    } else {
        Ok(())
    }
}

/// A count given as text (the environment, or a quoted value) can exceed what TOML can
/// write, and `--check` prints the configuration as TOML that must read back the same.
fn in_toml_range(n: u64, key: &str) -> Result<(), KeyError> {
    if n > i64::MAX as u64 {
        Err(key_err(key, format!("must be at most {}", i64::MAX)))
    } else {
        Ok(())
    }
}

impl FileConfig {
    /// `listen.address`, `listen.tls_address` and `listen.tls`: at least one listener, and
    /// a certificate exactly when there is a TLS listener.
    fn validate_listen(&self) -> Result<(Option<SocketAddr>, Option<TlsListen>), KeyError> {
        let l = &self.listen;
        let listen = (!l.address.is_empty())
            .then(|| parse_addr(&l.address).map_err(|r| key_err("listen.address", r)))
            .transpose()?;
        let tls_address = (!l.tls_address.is_empty())
            .then(|| parse_addr(&l.tls_address).map_err(|r| key_err("listen.tls_address", r)))
            .transpose()?;
        let tls = match (tls_address, &l.tls) {
            (None, None) if listen.is_none() => {
                return Err(key_err(
                    "listen.address",
                    "is empty and listen.tls_address is not set: no listener at all",
                ))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(key_err(
                    "listen.tls",
                    "is required with listen.tls_address: tls = { cert = \"fullchain.pem\", key = \"key.pem\" }",
                ))
            }
            (None, Some(_)) => {
                return Err(key_err(
                    "listen.tls_address",
                    "is required with listen.tls (e.g. \"0.0.0.0:8443\")",
                ))
            }
            (Some(address), Some(files)) => {
                if listen == Some(address) && address.port() != 0 {
                    return Err(key_err(
                        "listen.tls_address",
                        format!("{address} is listen.address too"),
                    ));
                }
                let (cert, key) = (PathBuf::from(&files.cert), PathBuf::from(&files.key));
                let loaded = ServerCert::load(&cert, &key).map_err(|e| {
                    let which = if e.is_key(&key) { "listen.tls.key" } else { "listen.tls.cert" };
                    key_err(which, e)
                })?;
                Some(TlsListen {
                    address,
                    cert: loaded,
                })
            }
        };
        Ok((listen, tls))
    }
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

/// Checks a server URL: `http://host:port` or `https://host:port`, no path, query,
/// fragment or credentials.
pub fn parse_server_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(format!("{s:?}: scheme {other:?} is not http or https")),
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
