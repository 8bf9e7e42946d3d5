//! Environment overrides: `ROUNDABOUT__SECTION__KEY=value` over the file's keys, as the
//! `config` crate's sources, and the error that names the variable a bad value came from.

use super::ConfigError;

/// The `ROUNDABOUT__*` variables that override the file.
pub(super) struct Overrides {
    vars: config::Map<String, String>,
}

impl Overrides {
    /// The variables given, or (`None`) the process's own.
    pub(super) fn new(vars: Option<config::Map<String, String>>) -> Self {
        let vars = vars.unwrap_or_else(|| {
            std::env::vars()
                .filter(|(k, _)| k.starts_with("ROUNDABOUT__"))
                .collect()
        });
        Self { vars }
    }

    /// The variables as two `config` sources: scalars, then lists. Values stay strings
    /// (serde converts numbers and booleans where a key wants one), so that a token such
    /// as "007" is not read as the number 7. Only the list keys are parsed, and only they
    /// go through the source that splits on commas.
    pub(super) fn sources(&self) -> (config::Environment, config::Environment) {
        let named = |k: &str, key: &str| {
            k.eq_ignore_ascii_case(&format!("ROUNDABOUT__{}", key.replace('.', "__")))
        };
        let (lists, scalars): (config::Map<_, _>, config::Map<_, _>) =
            self.vars.clone().into_iter().partition(|(k, v)| {
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
        (source(scalars), list_source)
    }

    /// The error for a bad value at `key`: named by the variable that set it (or set the
    /// section or list holding it), else by the file and the key.
    pub(super) fn error(&self, file: &str, key: String, reason: String) -> ConfigError {
        let names: Vec<&String> = self.vars.keys().collect();
        match env_var(&names, &key) {
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
        }
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
fn env_var(names: &[&String], key: &str) -> Option<(String, String)> {
    let segments: Vec<String> = key
        .split('.')
        .map(|s| s.split('[').next().unwrap_or(s).to_ascii_lowercase())
        .collect();
    (1..=segments.len()).rev().find_map(|n| {
        let wanted = format!("ROUNDABOUT__{}", segments[..n].join("__"));
        names
            .iter()
            .find(|v| v.eq_ignore_ascii_case(&wanted))
            .map(|v| (v.to_string(), segments[..n].join(".")))
    })
}

#[cfg(test)]
mod tests {
    use super::super::Config;

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
        let cases: [(&[(&str, &str)], &str); 6] = [
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
                &[("ROUNDABOUT__ADMIN__ADDRESS", "0.0.0.0:28001")],
                "ROUNDABOUT__ADMIN__ADDRESS: 0.0.0.0:28001 is not a loopback address, so \
                 admin.token must be set too",
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
        assert_eq!(c.default_pool().servers.len(), 2);
        assert_eq!(c.admin_token, "007", "text stays text");
        assert_eq!(c.rate_limit.key_prefix, "12345678901234567890123");
        assert!(!c.rate_limit.enabled);
        assert_eq!(c.rate_limit.trusted_proxies.len(), 2);
    }
}
