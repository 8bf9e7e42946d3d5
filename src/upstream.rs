//! An upstream server as the hot path needs it, and the one way roundabout talks to servers.
//!
//! [`Upstream`] holds everything derived from a server's URL, computed once when it is
//! configured or added, so that forwarding a request copies nothing but an `Arc`.
//! [`client`] builds the `awc` client that both the proxy and the health checks use, and
//! [`describe`] turns its errors into the words the logs use. Nothing here chooses a server
//! or keeps state about one.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use actix_web::http::{
    header::HeaderValue,
    uri::{Authority, Scheme},
};
use awc::error::{ConnectError, SendRequestError};
use url::Url;

use crate::{
    config::{self, ServerConfig, DEFAULT_POOL},
    metrics::{Metrics, ServerCounters},
    sticky::ServerId,
};

/// A pool, by number: the same number for the same name for the whole life of the process
/// (reloads included), so that the hot path indexes and compares numbers, never names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(u32);

impl PoolId {
    /// `[balancer]`, the pool named `default`.
    pub const DEFAULT: PoolId = PoolId(0);

    /// The number of the pool named `name`, given out on its first use. Called when a
    /// configuration is loaded or a pool named in the admin API, never per request.
    pub fn of(name: &str) -> PoolId {
        static NAMES: Mutex<Vec<Box<str>>> = Mutex::new(Vec::new());
        let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
        if names.is_empty() {
            names.push(DEFAULT_POOL.into());
        }
        let i = match names.iter().position(|n| &**n == name) {
            Some(i) => i,
            None => {
                names.push(name.into());
                names.len() - 1
            }
        };
        PoolId(u32::try_from(i).expect("fewer than 4 billion pool names"))
    }

    /// The number, as an index into per-pool tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One backend server, immutable once built. The HealthActor holds one; each worker's
/// balancer its own copy ([`Upstream::for_worker`]), shared as `Arc<Upstream>` with that
/// worker's handlers only.
#[derive(Debug)]
pub struct Upstream {
    /// The pool it serves in: a server listed in two pools is two `Upstream`s.
    pub pool: PoolId,
    /// The pool's name, for logs, metrics and the admin API.
    pub pool_name: Arc<str>,
    /// `host:port`, the server's name in logs, metrics and the admin API.
    pub label: Arc<str>,
    /// The URL as configured (`http://host:port/` or `https://…`).
    pub url: Url,
    /// `http` or `https`, for the upstream request URI.
    pub scheme: Scheme,
    /// The authority for the upstream request URI; cheap to clone (shared bytes, this
    /// worker's own: see [`Upstream::for_worker`]).
    pub authority: Authority,
    /// `Host` to send when `proxy.preserve_host = false`.
    pub host_header: HeaderValue,
    /// Relative share for the weighted strategies.
    pub weight: u32,
    /// This server's request counters (unregistered ones until [`Upstream::with_metrics`]).
    pub counters: ServerCounters,
    /// What a sticky cookie names it by: the same on every worker and instance, and not
    /// its address.
    pub sticky_id: ServerId,
    /// What consistent hashing and sticky ids know it by, the same on every instance: its
    /// URL, or for a server known by name the URL of its address.
    pub key: Arc<str>,
    /// For a server known by name: the address of the name's it stands for (connections go
    /// there; `Host` and the TLS name stay the name's).
    pub address: Option<SocketAddr>,
    /// For a server known by name: the name and port (`api.internal:8080`).
    pub name: Option<Arc<str>>,
}

impl Upstream {
    /// Builds an upstream of the pool `pool` from a checked server entry.
    pub fn new(pool: &str, server: &ServerConfig) -> Upstream {
        let url = &server.url;
        let label = config::authority(url);
        // `label` came from a parsed URL, so it is a valid authority and header value.
        let authority: Authority = label.parse().expect("URL host:port is an authority");
        let host_header = HeaderValue::from_str(&label).expect("URL host:port is a header value");
        let scheme = match url.scheme() {
            "https" => Scheme::HTTPS,
            _ => Scheme::HTTP,
        };
        Upstream {
            pool: PoolId::of(pool),
            pool_name: pool.into(),
            label: label.into(),
            url: url.clone(),
            scheme,
            authority,
            host_header,
            weight: server.weight,
            counters: ServerCounters::default(),
            sticky_id: ServerId::of(pool, url.as_str()),
            key: url.as_str().into(),
            address: None,
            name: None,
        }
    }

    /// One address of a server known by name: labelled by the address (its identity in the
    /// pool, the metrics and the admin API), sent to it with the name's authority and Host.
    pub fn resolved(pool: &str, server: &ServerConfig, address: SocketAddr) -> Upstream {
        let by_name = Upstream::new(pool, server);
        let label = address.to_string();
        let key = format!("{}://{label}/", by_name.scheme);
        Upstream {
            name: Some(by_name.label.clone()),
            label: label.into(),
            sticky_id: ServerId::of(pool, &key),
            key: key.into(),
            address: Some(address),
            ..by_name
        }
    }

    /// For a server known by name, its URL with the name, shown beside its address's.
    pub fn shown_name(&self) -> Option<String> {
        self.name.as_ref().map(|n| format!("{}://{n}", self.scheme))
    }

    /// The URL the admin API shows: the configured one, or for a server known by name its
    /// address's (the name beside it).
    pub fn shown_url(&self) -> String {
        match self.address {
            Some(_) => format!("{}://{}", self.scheme, self.label),
            None => self.url.as_str().trim_end_matches('/').to_string(),
        }
    }

    /// The same upstream, counting its requests in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Upstream {
        self.counters = metrics.server_counters(&self.pool_name, &self.label);
        self
    }

    /// A copy for one worker: the same server, with that worker's own counters.
    pub fn for_worker(&self) -> Upstream {
        Upstream {
            pool: self.pool,
            // Strings of its own too: the access log clones them per request.
            pool_name: Arc::from(&*self.pool_name),
            label: Arc::from(&*self.label),
            url: self.url.clone(),
            scheme: self.scheme.clone(),
            // Parsed again, not cloned: a clone would share the bytes (and their reference
            // count, touched per request) with every other worker.
            authority: self
                .authority
                .as_str()
                .parse()
                .expect("parsed once already"),
            host_header: HeaderValue::from_bytes(self.host_header.as_bytes())
                .expect("parsed once already"),
            weight: self.weight,
            counters: self.counters.for_worker(),
            sticky_id: self.sticky_id,
            key: self.key.clone(),
            address: self.address,
            name: self.name.clone(),
        }
    }

    /// The URL to probe for health: the server's URL with `path` (for a server known by
    /// name, the name's: the probe connects to [`Upstream::address`]).
    pub fn health_url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.authority, path)
    }
}

#[cfg(test)]
impl Upstream {
    /// `http://127.0.0.1:port`, weight 1: a server for unit tests.
    pub fn local(port: u16) -> Arc<Upstream> {
        Arc::new(Upstream::new(
            DEFAULT_POOL,
            &ServerConfig {
                url: format!("http://127.0.0.1:{port}").parse().expect("a URL"),
                weight: 1,
            },
        ))
    }
}

impl fmt::Display for Upstream {
    /// As logs name it: `host:port`, and its pool unless it is the default one
    /// (`10.0.0.7:8080 (pool api)`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)?;
        match (&self.name, self.pool == PoolId::DEFAULT) {
            (Some(name), true) => write!(f, " ({name})"),
            (Some(name), false) => write!(f, " ({name}, pool {})", self.pool_name),
            (None, false) => write!(f, " (pool {})", self.pool_name),
            (None, true) => Ok(()),
        }
    }
}

/// The `awc` client roundabout talks to servers with: no redirects followed, no headers of
/// its own but `user_agent` (the proxy sends none: the client's goes through), no cap on a
/// whole exchange (callers time the head and each body pause themselves), no cap on
/// connections, keep-alive on; `tls` verifies `https://` servers (SNI is the server's host).
/// `awc::Client` is not `Send`: build one per thread.
pub fn client(
    connect_timeout: Duration,
    user_agent: Option<&'static str>,
    tls: Arc<rustls::ClientConfig>,
) -> awc::Client {
    let mut builder = awc::Client::builder()
        .connector(
            awc::Connector::new()
                .rustls_0_23(tls)
                .timeout(connect_timeout)
                // The TLS handshake is part of connecting: the same limit, and a failure
                // of it is a failed connection (retried, reported to health).
                .handshake_timeout(connect_timeout)
                .limit(0)
                .conn_keep_alive(Duration::from_secs(60))
                .conn_lifetime(Duration::from_secs(600)),
        )
        .disable_redirects()
        .no_default_headers()
        .disable_timeout();
    if let Some(agent) = user_agent {
        builder = builder.add_default_header(("user-agent", agent));
    }
    builder.finish()
}

/// A short reason for a failed probe or forward, for the log line.
pub fn describe(e: &SendRequestError, timeout: Duration) -> String {
    match e {
        SendRequestError::Connect(ConnectError::Io(io)) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            _ => format!("connect: {io}"),
        },
        SendRequestError::Connect(ConnectError::Timeout) | SendRequestError::Timeout => {
            format!("timed out after {}", humantime::format_duration(timeout))
        }
        SendRequestError::Connect(other) => format!("connect: {other}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_is_host_and_port_even_when_the_port_is_implicit() {
        let u = Upstream::new(
            DEFAULT_POOL,
            &ServerConfig {
                url: Url::parse("http://example.test").unwrap(),
                weight: 1,
            },
        );
        assert_eq!(&*u.label, "example.test:80");
        let v6 = Upstream::new(
            DEFAULT_POOL,
            &ServerConfig {
                url: Url::parse("http://[::1]:5000").unwrap(),
                weight: 3,
            },
        );
        assert_eq!(&*v6.label, "[::1]:5000");
        assert_eq!(v6.authority.as_str(), "[::1]:5000");
        let tls = Upstream::new(
            DEFAULT_POOL,
            &ServerConfig {
                url: Url::parse("https://example.test").unwrap(),
                weight: 1,
            },
        );
        assert_eq!(&*tls.label, "example.test:443");
        assert_eq!(tls.health_url("/h"), "https://example.test:443/h");
    }
}
