//! The checked `[rate_limit]` section: budgets, where the shared counts live (one Redis or a
//! Redis Cluster's seeds), and how they are written in logs without their passwords.

use std::time::Duration;

use ipnet::IpNet;
use url::Url;

use super::{
    file::{FileConfig, OnStoreError, RedisUrl},
    validate::{in_toml_range, key_err, nonzero, parse_net, KeyError},
};

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

impl FileConfig {
    /// `[rate_limit]`, checked.
    pub(super) fn validate_rate_limit(&self) -> Result<RateLimit, KeyError> {
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
        Ok(RateLimit {
            enabled: rl.enabled,
            requests: rl.requests,
            window: rl.window,
            redis_url,
            key_prefix: rl.key_prefix.clone(),
            on_store_error: rl.on_store_error,
            ipv6_prefix: rl.ipv6_prefix,
            trusted_proxies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{super::tests::parse, *};
    use crate::config::Config;

    #[test]
    fn ipv6_prefix_is_a_prefix_length_named_in_errors() {
        for bad in ["0", "129", "300", "-1"] {
            let err = parse(&format!("[rate_limit]\nipv6_prefix = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("rate_limit.ipv6_prefix"), "{bad}: {err}");
        }
        for good in [1, 48, 128] {
            let c = parse(&format!("[rate_limit]\nipv6_prefix = {good}")).unwrap();
            assert_eq!(c.rate_limit.ipv6_prefix, good);
        }
    }

    #[test]
    fn the_limiter_summary_names_the_store_and_hides_passwords() {
        let summary = |extra: &str| {
            parse(&format!("[rate_limit]\n{extra}"))
                .unwrap()
                .rate_limit
                .summary()
        };
        assert_eq!(
            summary(""),
            "rate limit 100/60s, store redis://127.0.0.1:6379 (shared), on_store_error = \"local\""
        );
        assert_eq!(
            summary("redis_url = \"redis://:s3cret@10.0.0.5:6380/2\"\non_store_error = \"deny\""),
            "rate limit 100/60s, store redis://:***@10.0.0.5:6380/2 (shared), on_store_error = \"deny\""
        );
        assert_eq!(
            summary("redis_url = \"rediss://app:s3cret@cache.internal\""),
            "rate limit 100/60s, store rediss://app:***@cache.internal:6379 (shared), on_store_error = \"local\""
        );
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            summary("redis_url = \"\"\nrequests = 7\nwindow = \"10s\""),
            "rate limit 7/10s, store in-process"
        );
        assert_eq!(summary("enabled = false"), "rate limit off");
    }

    #[test]
    fn a_list_of_redis_urls_is_a_cluster_from_the_file_and_from_the_environment() {
        let c = parse(
            "[rate_limit]\nredis_url = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]",
        )
        .unwrap();
        let seeds = vec![
            "redis://127.0.0.1:7000".to_string(),
            "redis://127.0.0.1:7001".to_string(),
        ];
        assert_eq!(c.rate_limit.redis_url, Some(RedisTarget::Cluster(seeds)));
        assert_eq!(
            c.rate_limit.summary(),
            "rate limit 100/60s, store redis cluster redis://127.0.0.1:7000,redis://127.0.0.1:7001 (shared), on_store_error = \"local\""
        );

        let env = |value: &str| {
            let env = [("ROUNDABOUT__RATE_LIMIT__REDIS_URL", value)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_toml_with_env("t.toml", "", Some(env))
                .unwrap()
                .rate_limit
                .redis_url
        };
        assert_eq!(
            env("redis://10.0.0.5:6379"),
            Some(RedisTarget::Server("redis://10.0.0.5:6379".into())),
            "one URL is one server"
        );
        assert_eq!(
            env("redis://:pw@10.0.0.5:7000,redis://:pw@10.0.0.6:7000"),
            Some(RedisTarget::Cluster(vec![
                "redis://:pw@10.0.0.5:7000".into(),
                "redis://:pw@10.0.0.6:7000".into()
            ]))
        );
        assert_eq!(env(""), None);

        let summary = parse(
            "[rate_limit]\nredis_url = [\"redis://:s3cret@10.0.0.5:7000\", \"redis://:s3cret@10.0.0.6\"]",
        )
        .unwrap()
        .rate_limit
        .summary();
        assert!(
            summary.contains(
                "store redis cluster redis://:***@10.0.0.5:7000,redis://:***@10.0.0.6:6379 (shared)"
            ),
            "{summary}"
        );
    }

    #[test]
    fn a_bad_cluster_list_names_the_entry() {
        let cases = [
            ("redis_url = []", "rate_limit.redis_url: an empty list"),
            (
                "redis_url = [\"redis://a:7000\", \"http://b:7000\"]",
                "rate_limit.redis_url[1]: scheme \"http\"",
            ),
            (
                "redis_url = [\"unix:///run/redis.sock\"]",
                "rate_limit.redis_url[0]: scheme \"unix\"",
            ),
            (
                "redis_url = [\"redis://:a@x:7000\", \"redis://:b@y:7000\"]",
                "rate_limit.redis_url[1]: every cluster node must have the user and password",
            ),
            (
                "redis_url = [\"not a url\"]",
                "rate_limit.redis_url[0]: not a URL",
            ),
            ("redis_url = 7", "rate_limit.redis_url"),
        ];
        for (text, want) in cases {
            let err = parse(&format!("[rate_limit]\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text:?} gave {err:?}, wanted {want:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }
}
