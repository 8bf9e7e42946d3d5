//! The checked pools: `[balancer]` as the pool `default`, and every `[pools.NAME]`, each
//! with its servers, strategy, and the health checks and proxy timeouts it overrides.

use std::{sync::Arc, time::Duration};

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
        let mut pools = vec![PoolConfig {
            name: DEFAULT_POOL.into(),
            strategy: self.balancer.strategy,
            servers: servers(&self.balancer.servers, "balancer.servers")?,
            health_check: checked_health(self.health_check.clone(), "health_check")?,
            proxy: base_proxy,
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
            pools.push(PoolConfig {
                name: name.as_str().into(),
                strategy: pool.strategy,
                servers: servers(&pool.servers, &format!("{key}.servers"))?,
                health_check: checked_health(health, &format!("{key}.health_check"))?,
                proxy,
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
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?} gave {err:?}, wanted {want:?}");
        }
    }
}
