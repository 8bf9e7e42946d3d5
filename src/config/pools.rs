//! The checked pools: `[balancer]` as the pool `default`, and every `[pools.NAME]`, each
//! with its servers, strategy, and the health checks and proxy timeouts it overrides.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use actix_web::http::header::HeaderName;

use super::{
    file::{
        FileConfig, FileServer, HealthCheckOverrides, HealthCheckSection, ProxyOverrides,
        ProxySection, Strategy,
    },
    validate::{key_err, nonzero, parse_server_url, KeyError, ServerConfig},
};

/// The name of the pool `[balancer]` describes.
pub const DEFAULT_POOL: &str = "default";

/// A checked pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// `default`, or the `NAME` of `[pools.NAME]`.
    pub name: Arc<str>,
    pub strategy: Strategy,
    pub servers: Vec<ServerConfig>,
    /// `[health_check]` with the pool's own keys over it.
    pub health_check: HealthCheckSection,
    /// `[proxy]`'s per-pool keys, with the pool's own over them.
    pub proxy: PoolProxy,
    /// What `consistent_hash` hashes.
    pub hash_on: HashOn,
    /// The sticky cookie's name; `None`: no stickiness.
    pub sticky_cookie: Option<Arc<str>>,
    /// Percent of servers in rotation below which the pool uses them all (0: never).
    pub panic_threshold: u8,
    /// How often host names in `servers` are resolved again.
    pub resolve_interval: Duration,
    /// DNS servers to ask; empty: the system's.
    pub resolvers: Vec<SocketAddr>,
}

/// The part of a request `consistent_hash` keys on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// The client IP, as the limiter sees it (after `trusted_proxies`).
    ClientIp,
    Header(HeaderName),
    Cookie(String),
    Query(String),
    /// The request's path, without its query.
    Path,
}

impl HashOn {
    fn parse(written: &str) -> Result<HashOn, String> {
        let name_of = |name: &str| {
            (!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b'='))
                .then(|| name.to_string())
        };
        let parsed = match written.split_once(':') {
            None if written == "client_ip" => Some(HashOn::ClientIp),
            None if written == "path" => Some(HashOn::Path),
            Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(HashOn::Header),
            Some(("cookie", name)) => name_of(name).map(HashOn::Cookie),
            Some(("query", name)) => name_of(name).map(HashOn::Query),
            _ => None,
        };
        parsed.ok_or_else(|| {
            format!(
                "{written:?} is not one of client_ip, header:NAME, cookie:NAME, query:NAME, path"
            )
        })
    }
}

/// A cookie name (RFC 6265: an HTTP token).
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The parts of a pool as written that `[balancer]` and `[pools.NAME]` share.
struct Written<'a> {
    hash_on: &'a str,
    sticky_cookie: &'a str,
    panic_threshold: u8,
    resolve_interval: Duration,
    resolvers: &'a [String],
}

/// The pool keys `Written::check` reads, checked.
struct Checked {
    hash_on: HashOn,
    sticky_cookie: Option<Arc<str>>,
    panic_threshold: u8,
    resolve_interval: Duration,
    resolvers: Vec<SocketAddr>,
}

impl Written<'_> {
    /// Checked; errors name `at.KEY`.
    fn check(&self, at: &str) -> Result<Checked, KeyError> {
        let hash_on =
            HashOn::parse(self.hash_on).map_err(|e| key_err(format!("{at}.hash_on"), e))?;
        let sticky = match self.sticky_cookie {
            "" => None,
            name if is_cookie_name(name) => Some(name.into()),
            name => {
                return Err(key_err(
                    format!("{at}.sticky_cookie"),
                    format!("{name:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"),
                ))
            }
        };
        if self.panic_threshold > 100 {
            return Err(key_err(
                format!("{at}.panic_threshold"),
                format!("{} is not a percentage (0 to 100)", self.panic_threshold),
            ));
        }
        nonzero(self.resolve_interval, &format!("{at}.resolve_interval"))?;
        let mut resolvers = Vec::with_capacity(self.resolvers.len());
        for (i, r) in self.resolvers.iter().enumerate() {
            let r = r.trim();
            let addr = r
                .parse::<SocketAddr>()
                .or_else(|_| r.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| {
                    key_err(
                        format!("{at}.resolvers[{i}]"),
                        format!("{r:?} is not an address of a DNS server (\"10.0.0.2\" or \"10.0.0.2:53\")"),
                    )
                })?;
            resolvers.push(addr);
        }
        Ok(Checked {
            hash_on,
            sticky_cookie: sticky,
            panic_threshold: self.panic_threshold,
            resolve_interval: self.resolve_interval,
            resolvers,
        })
    }
}

/// The `[proxy]` keys a pool may set for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolProxy {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub retries: u32,
}

impl PoolProxy {
    fn of(proxy: &ProxySection) -> Self {
        PoolProxy {
            connect_timeout: proxy.connect_timeout,
            timeout: proxy.timeout,
            retries: proxy.retries,
        }
    }
}

impl FileConfig {
    /// The default pool, then every `[pools.NAME]` in name order.
    pub(super) fn validate_pools(&self) -> Result<Vec<PoolConfig>, KeyError> {
        let base_proxy = PoolProxy::of(&self.proxy);
        let b = &self.balancer;
        let checked = Written {
            hash_on: &b.hash_on,
            sticky_cookie: &b.sticky_cookie,
            panic_threshold: b.panic_threshold,
            resolve_interval: b.resolve_interval,
            resolvers: &b.resolvers,
        }
        .check("balancer")?;
        let mut pools = vec![PoolConfig {
            name: DEFAULT_POOL.into(),
            strategy: b.strategy,
            servers: servers(&b.servers, "balancer.servers")?,
            health_check: checked_health(self.health_check.clone(), "health_check")?,
            proxy: base_proxy,
            hash_on: checked.hash_on,
            sticky_cookie: checked.sticky_cookie,
            panic_threshold: checked.panic_threshold,
            resolve_interval: checked.resolve_interval,
            resolvers: checked.resolvers,
        }];
        for (name, pool) in &self.pools {
            let key = format!("pools.{name}");
            if name == DEFAULT_POOL {
                return Err(key_err(
                    key,
                    "the pool \"default\" is [balancer]; give this pool another name",
                ));
            }
            check_name(name).map_err(|r| key_err(&key, r))?;
            let health = match &pool.health_check {
                Some(o) => over_health(&self.health_check, o),
                None => self.health_check.clone(),
            };
            let proxy = match &pool.proxy {
                Some(o) => PoolProxy {
                    connect_timeout: o.connect_timeout.unwrap_or(base_proxy.connect_timeout),
                    timeout: o.timeout.unwrap_or(base_proxy.timeout),
                    retries: o.retries.unwrap_or(base_proxy.retries),
                },
                None => base_proxy,
            };
            if let Some(ProxyOverrides {
                connect_timeout,
                timeout,
                ..
            }) = &pool.proxy
            {
                if connect_timeout.is_some() {
                    nonzero(
                        proxy.connect_timeout,
                        &format!("{key}.proxy.connect_timeout"),
                    )?;
                }
                if timeout.is_some() {
                    nonzero(proxy.timeout, &format!("{key}.proxy.timeout"))?;
                }
            }
            let checked = Written {
                hash_on: &pool.hash_on,
                sticky_cookie: &pool.sticky_cookie,
                panic_threshold: pool.panic_threshold,
                resolve_interval: pool.resolve_interval,
                resolvers: &pool.resolvers,
            }
            .check(&key)?;
            pools.push(PoolConfig {
                name: name.as_str().into(),
                strategy: pool.strategy,
                servers: servers(&pool.servers, &format!("{key}.servers"))?,
                health_check: checked_health(health, &format!("{key}.health_check"))?,
                proxy,
                hash_on: checked.hash_on,
                sticky_cookie: checked.sticky_cookie,
                panic_threshold: checked.panic_threshold,
                resolve_interval: checked.resolve_interval,
                resolvers: checked.resolvers,
            });
        }
        Ok(pools)
    }
}

/// A pool's (or a route's) name: it appears in URLs of the admin API, metric labels, Redis
/// keys and header values, so letters, digits, `-`, `_` and `.` only.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if fine {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a name: up to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// `[health_check]` with a pool's keys over it.
fn over_health(base: &HealthCheckSection, o: &HealthCheckOverrides) -> HealthCheckSection {
    HealthCheckSection {
        path: o.path.clone().unwrap_or_else(|| base.path.clone()),
        interval: o.interval.unwrap_or(base.interval),
        timeout: o.timeout.unwrap_or(base.timeout),
        unhealthy_threshold: o.unhealthy_threshold.unwrap_or(base.unhealthy_threshold),
        healthy_threshold: o.healthy_threshold.unwrap_or(base.healthy_threshold),
        eject_after_5xx: o.eject_after_5xx.unwrap_or(base.eject_after_5xx),
        eject_time: o.eject_time.unwrap_or(base.eject_time),
    }
}

/// Health settings, checked; errors name `at.KEY`.
fn checked_health(hc: HealthCheckSection, at: &str) -> Result<HealthCheckSection, KeyError> {
    if !hc.path.starts_with('/') {
        return Err(key_err(format!("{at}.path"), "must start with '/'"));
    }
    if hc
        .path
        .parse::<actix_web::http::uri::PathAndQuery>()
        .is_err()
    {
        return Err(key_err(format!("{at}.path"), "is not a valid request path"));
    }
    nonzero(hc.interval, &format!("{at}.interval"))?;
    nonzero(hc.timeout, &format!("{at}.timeout"))?;
    if hc.unhealthy_threshold == 0 {
        return Err(key_err(
            format!("{at}.unhealthy_threshold"),
            "must be at least 1",
        ));
    }
    if hc.healthy_threshold == 0 {
        return Err(key_err(
            format!("{at}.healthy_threshold"),
            "must be at least 1",
        ));
    }
    nonzero(hc.eject_time, &format!("{at}.eject_time"))?;
    // Doubled up to 10 times as long, then added to `Instant::now()`.
    if hc.eject_time > Duration::from_secs(24 * 3600) {
        return Err(key_err(format!("{at}.eject_time"), "must be at most 1 day"));
    }
    Ok(hc)
}

/// A pool's server list, checked; errors name `at[i]`.
fn servers(list: &[FileServer], at: &str) -> Result<Vec<ServerConfig>, KeyError> {
    let mut servers: Vec<ServerConfig> = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let (url, weight) = match s {
            FileServer::Url(u) => (u.as_str(), 1),
            FileServer::Weighted(w) => (w.url.as_str(), w.weight),
        };
        let key = format!("{at}[{i}]");
        let url = parse_server_url(url).map_err(|r| key_err(format!("{key}.url"), r))?;
        if weight == 0 {
            return Err(key_err(format!("{key}.weight"), "must be at least 1"));
        }
        if servers.iter().any(|s| s.url == url) {
            return Err(key_err(key, format!("{url} is listed twice")));
        }
        servers.push(ServerConfig { url, weight });
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use std::time::Duration;

    #[test]
    fn a_pool_overrides_health_checks_and_proxy_timeouts_key_by_key() {
        let c = parse(
            "[health_check]\ninterval = \"3s\"\npath = \"/h\"\n[proxy]\nretries = 4\n\
             [pools.api]\nstrategy = \"least_requests\"\nservers = [\"http://127.0.0.1:7001\"]\n\
             health_check = { path = \"/ready\" }\nproxy = { timeout = \"5s\" }\n\
             [pools.web]\nservers = [\"http://127.0.0.1:7001\"]\n",
        )
        .unwrap();
        let names: Vec<&str> = c.pools.iter().map(|p| &*p.name).collect();
        assert_eq!(names, ["default", "api", "web"]);
        let api = &c.pools[1];
        assert_eq!(api.health_check.path, "/ready");
        assert_eq!(api.health_check.interval, Duration::from_secs(3));
        assert_eq!(api.proxy.timeout, Duration::from_secs(5));
        assert_eq!(api.proxy.retries, 4);
        assert_eq!(api.strategy.name(), "least_requests");
        assert_eq!(c.pools[2].health_check.path, "/h");
        assert_eq!(
            c.pools[2].servers[0].url, api.servers[0].url,
            "a server in two pools"
        );
    }

    #[test]
    fn pool_errors_name_the_pool_and_key() {
        let cases = [
            (
                "[pools.default]\nservers = []",
                "pools.default: the pool \"default\" is [balancer]",
            ),
            (
                "[pools.\"a b\"]\nservers = []",
                "pools.a b: \"a b\" is not a name",
            ),
            (
                "[pools.api]\nservers = [\"ftp://x:1\"]",
                "pools.api.servers[0].url: \"ftp://x:1\": scheme",
            ),
            (
                "[pools.api]\nhealth_check = { interval = \"0s\" }",
                "pools.api.health_check.interval: must be greater than zero",
            ),
            (
                "[pools.api]\nhealth_check = { intervall = \"1s\" }",
                "pools.api.health_check.intervall: unknown key",
            ),
            (
                "[pools.api]\nproxy = { connect_timeout = \"0s\" }",
                "pools.api.proxy.connect_timeout: must be greater than zero",
            ),
            (
                "[pools.api]\nproxy = { max_body_bytes = 1 }",
                "pools.api.proxy.max_body_bytes: unknown key",
            ),
            (
                "[balancer]\nhash_on = \"ip\"",
                "balancer.hash_on: \"ip\" is not one of client_ip, header:NAME, cookie:NAME",
            ),
            ("[pools.api]\nhash_on = \"header:a b\"", "pools.api.hash_on"),
            ("[pools.api]\nhash_on = \"cookie:\"", "pools.api.hash_on"),
            (
                "[balancer]\nsticky_cookie = \"a;b\"",
                "balancer.sticky_cookie: \"a;b\" is not a cookie name",
            ),
            (
                "[pools.api]\npanic_threshold = 101",
                "pools.api.panic_threshold: 101 is not a percentage",
            ),
            (
                "[balancer]\npanic_threshold = 300",
                "balancer.panic_threshold",
            ),
            (
                "[health_check]\neject_time = \"0s\"",
                "health_check.eject_time: must be greater than zero",
            ),
            (
                "[pools.api]\nhealth_check = { eject_time = \"2d\" }",
                "pools.api.health_check.eject_time: must be at most 1 day",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?} gave {err:?}, wanted {want:?}");
        }
    }

    #[test]
    fn hashing_stickiness_panic_and_ejection_are_pool_keys() {
        use super::HashOn;
        let c = parse(
            "[balancer]\nstrategy = \"consistent_hash\"\nhash_on = \"header:X-User\"\n\
             sticky_cookie = \"lb\"\npanic_threshold = 50\n\
             [health_check]\neject_after_5xx = 5\n\
             [pools.api]\nstrategy = \"peak_ewma\"\nhash_on = \"query:id\"\n\
             health_check = { eject_time = \"10s\" }\n",
        )
        .unwrap();
        let (d, api) = (&c.pools[0], &c.pools[1]);
        assert_eq!(d.hash_on, HashOn::Header("x-user".parse().unwrap()));
        assert_eq!(d.sticky_cookie.as_deref(), Some("lb"));
        assert_eq!(d.panic_threshold, 50);
        assert_eq!(d.health_check.eject_after_5xx, 5);
        assert_eq!(d.health_check.eject_time, Duration::from_secs(30));
        assert_eq!(api.hash_on, HashOn::Query("id".into()));
        assert_eq!(api.sticky_cookie, None);
        assert_eq!(api.health_check.eject_after_5xx, 5, "from [health_check]");
        assert_eq!(api.health_check.eject_time, Duration::from_secs(10));
        assert_eq!(parse("").unwrap().pools[0].hash_on, HashOn::ClientIp);
    }
}
