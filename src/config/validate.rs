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

use super::file::{AccessLogFormat, AccessLogTarget, FileConfig, ProxySection};
use super::{limits::RateLimit, pools::PoolConfig, routes::RouteConfig};
use crate::tls::{self, ServerCert};

/// A checked server entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerConfig {
    /// `scheme://host:port`, without path.
    pub url: Url,
    /// Relative share for the weighted strategies; at least 1.
    pub weight: u32,
}

impl ServerConfig {
    /// The host name, when the URL has one rather than an IP address: it stands for every
    /// address the name resolves to.
    pub fn host_name(&self) -> Option<&str> {
        match self.url.host()? {
            url::Host::Domain(name) => Some(name),
            url::Host::Ipv4(_) | url::Host::Ipv6(_) => None,
        }
    }

    /// The port, written or the scheme's.
    pub fn port(&self) -> u16 {
        self.url.port_or_known_default().unwrap_or(80)
    }
}

/// The validated configuration the program runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The plain HTTP listener; `None` when only the TLS one is wanted.
    pub(crate) listen: Option<SocketAddr>,
    /// The TLS listener and its certificate, read and checked.
    pub(crate) tls: Option<TlsListen>,
    /// How `https://` servers are verified: the system's roots and `proxy.upstream_ca`.
    pub(crate) upstream_tls: Arc<rustls::ClientConfig>,
    /// 0 = one per CPU core.
    pub(crate) workers: usize,
    /// Every request head, first or later on a connection, must arrive within this.
    pub(crate) header_timeout: Duration,
    /// An idle kept-alive client connection is closed after this; zero: no keep-alive.
    pub(crate) keepalive_timeout: Duration,
    /// Open client connections for the whole process (at least 1).
    pub(crate) max_connections: usize,
    /// Every client connection opens with a PROXY protocol header (`listen.proxy_protocol`).
    pub(crate) proxy_protocol: bool,
    /// The default pool (`[balancer]`) first, then `[pools.*]` by name.
    pub(crate) pools: Vec<PoolConfig>,
    /// `[[routes]]`, in file order.
    pub(crate) routes: Vec<RouteConfig>,
    pub(crate) proxy: ProxySection,
    pub(crate) rate_limit: RateLimit,
    /// `None` disables the admin listener.
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) admin_token: String,
    pub(crate) log_level: log::LevelFilter,
    /// `None`: no access log.
    pub(crate) access_log: Option<AccessLog>,
    /// The file as resolved (after environment overrides), for `--check`.
    pub(crate) resolved: FileConfig,
    /// Where it was read from; `None` when it was parsed from text.
    pub(crate) source: Option<Source>,
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

/// A refused value: its dotted key and what is wrong with it.
pub(super) type KeyError = (String, String);

pub(super) fn key_err(key: impl fmt::Display, reason: impl fmt::Display) -> KeyError {
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

        nonzero(self.proxy.connect_timeout, "proxy.connect_timeout")?;
        nonzero(self.proxy.timeout, "proxy.timeout")?;
        nonzero(self.proxy.tunnel_idle_timeout, "proxy.tunnel_idle_timeout")?;
        let upstream_ca =
            Some(Path::new(&self.proxy.upstream_ca)).filter(|p| !p.as_os_str().is_empty());
        let upstream_tls =
            tls::client_config(upstream_ca).map_err(|e| key_err("proxy.upstream_ca", e))?;
        in_toml_range(self.proxy.max_body_bytes, "proxy.max_body_bytes")?;

        let rate_limit = self.validate_rate_limit()?;
        let pools = self.validate_pools()?;
        let routes = self.validate_routes(&pools, tls.is_some())?;

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
            proxy_protocol: self.listen.proxy_protocol,
            pools,
            routes,
            proxy: self.proxy.clone(),
            rate_limit,
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
pub(super) fn in_toml_range(n: u64, key: &str) -> Result<(), KeyError> {
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

pub(super) fn nonzero(d: Duration, key: &str) -> Result<(), KeyError> {
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
pub(super) fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. \"10.0.0.0/8\") or an IP address"))
}

/// A server URL's `host:port`, the port written even when it is the scheme's default: the
/// server's name in logs, metrics and the admin API, and the authority it is sent. (`url`
/// already writes an IPv6 host in brackets.)
pub fn authority(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(80)
    )
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
    let authority = authority(&url);
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
    use super::super::tests::parse;

    #[test]
    fn servers_take_plain_and_weighted_forms() {
        let c = parse(
            r#"[balancer]
servers = ["http://127.0.0.1:5000", { url = "http://127.0.0.1:5002", weight = 2 }]"#,
        )
        .unwrap();
        assert_eq!(c.default_pool().servers.len(), 2);
        assert_eq!(c.default_pool().servers[0].weight, 1);
        assert_eq!(c.default_pool().servers[1].weight, 2);
        assert_eq!(c.default_pool().servers[1].url.port(), Some(5002));
    }
}
