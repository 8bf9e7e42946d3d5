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
//! written live in `file`; the checks and the validated types in `validate` (and, for
//! `[rate_limit]`, `limits`); the environment's overrides in `env`; errors in the config's
//! words in `words`. This module is the pipeline between them and the error it reports.

mod env;
mod file;
mod limits;
mod pools;
mod readers;
mod routes;
mod validate;
mod words;

use std::path::Path;

use self::{
    env::Overrides,
    words::{in_words, one_line, unreadable_number},
};

// Public: what the binary and the tests need (the request checks take `ProxySection`).
pub use file::ProxySection;
pub(crate) use file::{
    default_weight, AccessLogFormat, FileConfig, HealthCheckSection, OnStoreError, RedisUrl,
    Strategy,
};
pub(crate) use limits::{redact_url, RateLimit, RedisTarget};
pub(crate) use pools::{HashOn, PoolConfig, PoolProxy, DEFAULT_POOL};
pub(crate) use routes::{HeaderRules, RouteConfig, RouteLimit};
pub use validate::Config;
pub(crate) use validate::{authority, parse_server_url, AccessLog, ServerConfig, Source};

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
        let env = Overrides::new(env);
        let key_error = |key: String, reason: String| env.error(file, key, reason);
        let (scalars, lists) = env.sources();
        if let Some((key, reason)) = unreadable_number(text) {
            return Err(ConfigError::Key {
                file: file.into(),
                key,
                reason,
            });
        }
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(scalars)
            .add_source(lists)
            .build()
            .map_err(|e| ConfigError::Source {
                file: file.into(),
                reason: one_line(&e.to_string()),
            })?;
        let raw: FileConfig = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = routes_from_one(e.path().to_string());
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

    /// The default pool: `[balancer]`.
    pub(crate) fn default_pool(&self) -> &PoolConfig {
        &self.pools[0]
    }

    /// The log level of `log.level`.
    pub fn log_level(&self) -> log::LevelFilter {
        self.log_level
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

/// `routes[i]` in a serde path counts from 0; the SPEC's `routes[N]` from 1, as the
/// default name `route-N` does.
fn routes_from_one(key: String) -> String {
    let Some(rest) = key.strip_prefix("routes[") else {
        return key;
    };
    match rest.split_once(']') {
        Some((n, tail)) => match n.parse::<usize>() {
            Ok(n) => format!("routes[{}]{tail}", n + 1),
            Err(_) => key,
        },
        None => key,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::time::Duration;

    /// `text` as a config file named `test.toml`, with no environment.
    pub(in crate::config) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env("test.toml", text, Some(Default::default()))
    }

    #[test]
    fn empty_file_gives_the_spec_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:8000".parse().unwrap()));
        assert!(c.tls.is_none());
        assert_eq!(
            c.default_pool().health_check.interval,
            Duration::from_secs(2)
        );
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
    fn the_shipped_file_limits_in_process_while_redis_is_away() {
        let c = Config::load_with_env(Path::new("config/default.toml"), Some(Default::default()))
            .unwrap();
        assert!(c.rate_limit.enabled);
        assert_eq!(c.rate_limit.on_store_error, OnStoreError::Local);
        assert_eq!(c.rate_limit.ipv6_prefix, 64);
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
}
