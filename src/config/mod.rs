//! Configuration: `config.toml` + `ROUNDABOUT__*` environment → [`FileConfig`] → [`Config`].
//!
//! The pipeline has two stages so that every error can name its key:
//! 1. the `config` crate merges the TOML file and the environment overrides, and
//!    `serde_path_to_error` deserializes the result into [`FileConfig`], whose structs reject
//!    unknown keys; a type error or unknown key is reported with its dotted path;
//! 2. [`FileConfig::validate`] turns the raw strings into real types (`Url`, `IpNet`,
//!    `SocketAddr`) and checks the ranges, again naming the key.
//!
//! An error names where the bad value came from: the file and the dotted key, or the
//! `ROUNDABOUT__*` variable that overrode it. Its reason is in the config's words (no
//! Rust type names, no trailing ``for key `x` `` of the `config` crate).
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
    /// As `Key`, for a value that came from an environment variable (`var`), which wins
    /// over the file; `reason` starts with the dotted key when it is deeper than the
    /// variable's own (`balancer.servers[1].url: ...`).
    #[error("{var}: {reason}")]
    Env { var: String, reason: String },
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
        let names: Vec<String> = env.keys().cloned().collect();
        let key_error = |key: String, reason: String| match env_var(&names, &key) {
            Some((var, var_key)) if var_key == key.to_ascii_lowercase() => {
                ConfigError::Env { var, reason }
            }
            Some((var, _)) => ConfigError::Env {
                var,
                reason: format!("{key}: {reason}"),
            },
            None => ConfigError::Key {
                file: file.into(),
                key,
                reason,
            },
        };
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
        if let Some((key, reason)) = unreadable_number(text) {
            return Err(ConfigError::Key {
                file: file.into(),
                key,
                reason,
            });
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
            let reason = one_line(&in_words(e.inner()));
            if key == "." || key.is_empty() {
                ConfigError::Source {
                    file: file.into(),
                    reason,
                }
            } else {
                key_error(key, reason)
            }
        })?;
        raw.validate()
            .map_err(|(key, reason)| key_error(key, reason))
    }

    /// The resolved configuration as TOML, for `--check`.
    /// Secrets are not printed: the admin token shows as `***`, a Redis password too.
    pub fn to_toml(&self) -> String {
        let mut shown = self.resolved.clone();
        if !shown.admin.token.is_empty() {
            shown.admin.token = "***".into();
        }
        shown.rate_limit.redis_url = match &shown.rate_limit.redis_url {
            RedisUrl::One(url) if url.is_empty() => RedisUrl::One(String::new()),
            RedisUrl::One(url) => RedisUrl::One(redact_url(url)),
            RedisUrl::Cluster(urls) => {
                RedisUrl::Cluster(urls.iter().map(|u| redact_url(u)).collect())
            }
        };
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# {e}"))
    }
}

/// The keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 2] = ["balancer.servers", "rate_limit.trusted_proxies"];

/// The keys whose environment value is one string, or a list when it has a comma:
/// `redis://10.0.0.5:6379` is one Redis, `redis://a:7000,redis://b:7000` a cluster's seeds.
const COMMA_LIST_KEYS: [&str; 1] = ["rate_limit.redis_url"];

/// The environment variable among `names` that set `key` (a dotted path such as
/// `balancer.servers[1].url`) or the section or list holding it, with the key it sets
/// (lower case, as the `config` crate reads it): the value came from there, not the file.
fn env_var(names: &[String], key: &str) -> Option<(String, String)> {
    let segments: Vec<String> = key
        .split('.')
        .map(|s| s.split('[').next().unwrap_or(s).to_ascii_lowercase())
        .collect();
    (1..=segments.len()).rev().find_map(|n| {
        let wanted = format!("ROUNDABOUT__{}", segments[..n].join("__"));
        names
            .iter()
            .find(|v| v.eq_ignore_ascii_case(&wanted))
            .map(|v| (v.clone(), segments[..n].join(".")))
    })
}

/// A deserialization error in the config's words: the reason alone, without the `config`
/// crate's trailing ``for key `x` `` and ``in the environment`` (the caller names where
/// the value came from) or serde's "field" (the file says "key").
fn in_words(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, found {unexpected}"),
        config::ConfigError::At { error, .. } => in_words(error),
        config::ConfigError::Message(m) => match m.strip_prefix("unknown field `") {
            // serde: "unknown field `adress`, expected `address` or `workers`"; the path
            // already ends with the unknown name.
            Some(rest) => match rest.split_once("`, ") {
                Some((_, expected)) => format!("unknown key, {expected}"),
                None => "unknown key".into(),
            },
            // serde: "invalid type: integer `3`, expected struct ListenSection".
            None => match m.split_once(", expected ") {
                Some((found, expected))
                    if found.starts_with("invalid type: ")
                        || found.starts_with("invalid value: ") =>
                {
                    let found = found.split_once(": ").map_or(found, |(_, f)| f);
                    let expected = match expected.strip_prefix("struct ") {
                        Some(_) => "a table",
                        None => expected,
                    };
                    format!("expected {expected}, found {found}")
                }
                _ => m.clone(),
            },
        },
        other => other.to_string(),
    }
}

/// The first number in `text` that the `config` crate cannot hold (an integer past 64-bit
/// signed, a float past `f64`), with its dotted key: that crate refuses it without naming
/// the key. `None` as well for text that is no TOML, which the crate reports itself.
fn unreadable_number(text: &str) -> Option<(String, String)> {
    use toml::de::{DeTable, DeValue};

    fn in_table(path: &str, table: &DeTable<'_>) -> Option<(String, String)> {
        table.iter().find_map(|(key, value)| {
            let key = key.get_ref();
            let path = if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            };
            in_value(path, value.get_ref())
        })
    }
    fn in_value(path: String, value: &DeValue<'_>) -> Option<(String, String)> {
        match value {
            DeValue::Integer(i) if i64::from_str_radix(i.as_str(), i.radix()).is_err() => {
                Some((path, format!("{i} is out of range (at most {})", i64::MAX)))
            }
            DeValue::Float(f)
                if f.as_str()
                    .parse::<f64>()
                    .map_or(true, |v| v.is_infinite() && !f.as_str().contains("inf")) =>
            {
                Some((path, format!("{f} is out of range")))
            }
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(n, item)| in_value(format!("{path}[{n}]"), item.get_ref())),
            DeValue::Table(table) => in_table(&path, table),
            _ => None,
        }
    }
    in_table("", DeTable::parse(text).ok()?.get_ref())
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
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        assert_eq!(c.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(c.max_connections, 10_000);
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
            ("[listen]\nworkers = 513", "listen.workers"),
            ("[listen]\nheader_timeout = \"0s\"", "listen.header_timeout"),
            (
                "[listen]\nheader_timeout = \"soon\"",
                "listen.header_timeout",
            ),
            (
                "[listen]\nkeepalive_timeout = \"2days\"",
                "listen.keepalive_timeout",
            ),
            ("[listen]\nmax_connections = 0", "listen.max_connections"),
            ("[listen]\nmax_connections = -1", "listen.max_connections"),
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
            (
                "[proxy]\nmax_body_bytes = 18446744073709551615",
                "proxy.max_body_bytes",
            ),
            ("[proxy]\nretries = 1e999", "proxy.retries"),
            (
                "[[balancer.servers]]\nurl = \"http://a:1\"\nweight = 0x1_0000_0000_0000_0000",
                "balancer.servers[0].weight",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with("test.toml: "), "{err}");
            assert!(err.contains(key), "{text:?} gave {err:?}, wanted key {key}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn errors_speak_the_config_s_words() {
        let cases = [
            (
                "[balancer]\nstrategy = \"roundrobin\"",
                "test.toml: balancer.strategy: \"roundrobin\" is not one of round_robin, \
                 weighted_round_robin, least_requests, power_of_two",
            ),
            (
                "[health_check]\ninterval = 2",
                "test.toml: health_check.interval: expected a duration such as \"2s\", found \
                 the number 2 (a duration needs a unit: ms, s, m, h)",
            ),
            (
                "[rate_limit]\nwindow = \"soon\"",
                "test.toml: rate_limit.window: expected a duration such as \"2s\", found \
                 \"soon\" (a number and a unit: ms, s, m, h)",
            ),
            (
                "[listen]\nadress = \"x\"",
                "test.toml: listen.adress: unknown key, expected one of `address`, `workers`, ",
            ),
            (
                "[listen]\nworkers = \"many\"",
                "test.toml: listen.workers: expected an integer, found string \"many\"",
            ),
            (
                "listen = 3",
                "test.toml: listen: expected a table, found integer `3`",
            ),
        ];
        // A prefix where the message goes on to list what a section or scheme allows, which
        // grows with the features.
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?} gave {err:?}, not {want:?}");
        }
        // Whatever the variants are (another may be added): each is listed, in config spelling.
        let err = parse("[rate_limit]\non_store_error = \"Allow\"")
            .unwrap_err()
            .to_string();
        let list = err
            .strip_prefix("test.toml: rate_limit.on_store_error: \"Allow\" is not one of ")
            .unwrap_or_else(|| panic!("{err}"));
        for variant in list.split(", ") {
            assert!(parse(&format!("[rate_limit]\non_store_error = \"{variant}\"")).is_ok());
        }
        assert!(list.contains("allow") && list.contains("deny"), "{err}");
    }

    #[test]
    fn an_error_from_the_environment_names_the_variable() {
        let parse_env = |vars: &[(&str, &str)]| {
            let env = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_toml_with_env("t.toml", "[rate_limit]\nwindow = \"1s\"", Some(env))
                .unwrap_err()
                .to_string()
        };
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[("ROUNDABOUT__RATE_LIMIT__WINDOW", "0s")],
                "ROUNDABOUT__RATE_LIMIT__WINDOW: must be greater than zero",
            ),
            (
                &[("ROUNDABOUT__RATE_LIMIT__WINDOW", "2")],
                "ROUNDABOUT__RATE_LIMIT__WINDOW: expected a duration such as \"2s\", found \"2\" \
                 (a duration needs a unit: ms, s, m, h)",
            ),
            (
                &[("ROUNDABOUT__BALANCER__STRATEGY", "fast")],
                "ROUNDABOUT__BALANCER__STRATEGY: \"fast\" is not one of round_robin, \
                 weighted_round_robin, least_requests, power_of_two",
            ),
            (
                &[("ROUNDABOUT__BALANCER__SERVERS", "http://a:1,ftp://b:2")],
                "ROUNDABOUT__BALANCER__SERVERS: balancer.servers[1].url: \"ftp://b:2\": scheme \
                 \"ftp\" is not http",
            ),
            (
                &[("ROUNDABOUT__LISTEN__ADRESS", "x")],
                "ROUNDABOUT__LISTEN__ADRESS: unknown key, expected one of `address`, `workers`, ",
            ),
        ];
        for (vars, want) in cases {
            let err = parse_env(vars);
            assert!(err.starts_with(want), "{vars:?} gave {err:?}, not {want:?}");
        }
        // The file's own errors still name the file, whatever else the environment sets.
        let err = Config::from_toml_with_env(
            "t.toml",
            "[rate_limit]\nwindow = \"0s\"",
            Some([("ROUNDABOUT__PROXY__RETRIES".into(), "1".into())].into()),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "t.toml: rate_limit.window: must be greater than zero");
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
