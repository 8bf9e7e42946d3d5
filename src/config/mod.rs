//! Configuration: `config.toml` + `ROUNDABOUT__*` environment → [`FileConfig`] → [`Config`].
//!
//! The pipeline has two stages so that every error can name its key:
//! 1. the `config` crate merges the TOML file and the environment overrides, and
//!    `serde_path_to_error` deserializes the result into [`FileConfig`], whose structs reject
//!    unknown keys; a type error or unknown key is reported with its dotted path;
//! 2. [`FileConfig::validate`] turns the raw strings into real types (`Url`, `IpNet`,
//!    `SocketAddr`) and checks the ranges, again naming the key.
//!
//! Defaults are the SPEC's; `config/default.toml` documents each key. The sections as
//! written live in `file`, the checks and the validated types in `validate`; this module
//! is the pipeline between them and the error it reports.

mod file;
mod validate;

use std::path::Path;

pub use file::{
    default_weight, AccessLogFormat, AccessLogTarget, AdminSection, BalancerSection, FileConfig,
    FileServer, HealthCheckSection, ListenSection, LogSection, OnStoreError, ProxySection,
    RateLimitSection, RedisUrl, Strategy, TlsFiles, WeightedServer,
};
pub use validate::{
    parse_net, parse_server_url, redact_url, AccessLog, Config, RateLimit, RedisTarget,
    ServerConfig, Source, TlsListen,
};

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
        let mut config = Self::from_toml_with_env(&file, &text, env.clone())?;
        config.source = Some(Source {
            path: path.to_path_buf(),
            env,
        });
        Ok(config)
    }

    /// Reads the configuration again from where it came from (a reload). Refused for a
    /// configuration that came from no file.
    pub fn reload(&self) -> Result<Config, ConfigError> {
        match &self.source {
            Some(source) => Self::load_with_env(&source.path, source.env.clone()),
            None => Err(ConfigError::Source {
                file: "(none)".into(),
                reason: "this configuration was not read from a file".into(),
            }),
        }
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
        let named = |k: &str, key: &str| {
            k.eq_ignore_ascii_case(&format!("ROUNDABOUT__{}", key.replace('.', "__")))
        };
        let (lists, scalars): (config::Map<_, _>, config::Map<_, _>) =
            env.into_iter().partition(|(k, v)| {
                LIST_KEYS.iter().any(|l| named(k, l))
                    || (v.contains(',') && COMMA_LIST_KEYS.iter().any(|l| named(k, l)))
            });
        let source = |vars| {
            config::Environment::with_prefix("ROUNDABOUT")
                .prefix_separator("__")
                .separator("__")
                .source(Some(vars))
        };
        let mut list_source = source(lists).try_parsing(true).list_separator(",");
        for key in LIST_KEYS.iter().chain(&COMMA_LIST_KEYS) {
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

/// The keys whose environment value is one string, or a list when it has a comma:
/// `redis://10.0.0.5:6379` is one Redis, `redis://a:7000,redis://b:7000` a cluster's seeds.
const COMMA_LIST_KEYS: [&str; 1] = ["rate_limit.redis_url"];

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env("test.toml", text, Some(Default::default()))
    }

    #[test]
    fn empty_file_gives_the_spec_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:8000".parse().unwrap()));
        assert!(c.tls.is_none());
        assert_eq!(c.health_check.interval, Duration::from_secs(2));
        assert_eq!(c.proxy.retries, 2);
        assert_eq!(c.rate_limit.requests, 100);
        assert_eq!(
            c.rate_limit.redis_url,
            Some(RedisTarget::Server("redis://127.0.0.1:6379".into()))
        );
        assert_eq!(c.admin, Some("127.0.0.1:8001".parse().unwrap()));
        assert_eq!(c.rate_limit.on_store_error, OnStoreError::Local);
        assert_eq!(c.rate_limit.ipv6_prefix, 64);
    }

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
    fn the_shipped_file_limits_in_process_while_redis_is_away() {
        let c = Config::load_with_env(Path::new("config/default.toml"), Some(Default::default()))
            .unwrap();
        assert!(c.rate_limit.enabled);
        assert_eq!(c.rate_limit.on_store_error, OnStoreError::Local);
        assert_eq!(c.rate_limit.ipv6_prefix, 64);
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
            ("[listen]\naddress = \"\"", "listen.address"),
            (
                "[listen]\ntls_address = \"127.0.0.1:8443\"",
                "listen.tls:",
            ),
            (
                "[listen]\ntls = { cert = \"c.pem\", key = \"k.pem\" }",
                "listen.tls_address",
            ),
            (
                "[listen]\ntls_address = \"127.0.0.1:8443\"\ntls = { cert = \"/nonexistent/c.pem\", key = \"k.pem\" }",
                "listen.tls.cert: /nonexistent/c.pem: cannot read",
            ),
            (
                "[listen]\ntls_address = \"127.0.0.1:8443\"\ntls = { cert = \"c.pem\" }",
                "listen.tls",
            ),
            (
                "[proxy]\nupstream_ca = \"/nonexistent/ca.pem\"",
                "proxy.upstream_ca: /nonexistent/ca.pem: cannot read",
            ),
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
        assert_eq!(c.listen.map(|a| a.port()), Some(9999));
        assert_eq!(c.rate_limit.redis_url, None);
        assert_eq!(c.proxy.retries, 5);
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.admin_token, "007", "text stays text");
        assert_eq!(c.rate_limit.key_prefix, "12345678901234567890123");
        assert!(!c.rate_limit.enabled);
        assert_eq!(c.rate_limit.trusted_proxies.len(), 2);
    }
}
