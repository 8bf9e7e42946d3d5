//! Property tests of what takes outside input without a socket: the request checks, given
//! arbitrary methods, targets and header fields, and the configuration pipeline, given
//! arbitrary text, arbitrary TOML values for every key and arbitrary environment values.
//! Neither may panic; every refusal of the checks is a 4xx (501 for CONNECT, as
//! documented); every refused configuration is one line naming the file, and the key when
//! a key was at fault. proptest's default of 256 cases per property (`PROPTEST_CASES`
//! changes it).

use actix_web::{
    http::{
        header::{HeaderName, HeaderValue},
        Method, StatusCode, Uri, Version,
    },
    test::TestRequest,
    ResponseError as _,
};
use proptest::{collection::vec, prelude::*, sample::select};
use roundabout::{
    config::{Config, ProxySection},
    proxy::checks::{check_request, Framing},
};

/// Every key of the configuration file, as `section.key`.
const KEYS: &[&str] = &[
    "listen.address",
    "listen.workers",
    "listen.header_timeout",
    "listen.keepalive_timeout",
    "listen.max_connections",
    "listen.proxy_protocol",
    "balancer.strategy",
    "balancer.servers",
    "balancer.hash_on",
    "balancer.sticky_cookie",
    "balancer.panic_threshold",
    "balancer.resolve_interval",
    "balancer.resolvers",
    "health_check.path",
    "health_check.interval",
    "health_check.timeout",
    "health_check.unhealthy_threshold",
    "health_check.healthy_threshold",
    "health_check.eject_after_5xx",
    "health_check.eject_time",
    "proxy.connect_timeout",
    "proxy.timeout",
    "proxy.retries",
    "proxy.preserve_host",
    "proxy.max_body_bytes",
    "rate_limit.enabled",
    "rate_limit.requests",
    "rate_limit.window",
    "rate_limit.redis_url",
    "rate_limit.key_prefix",
    "rate_limit.on_store_error",
    "rate_limit.trusted_proxies",
    "admin.address",
    "admin.token",
    "log.level",
    "log.access_log",
];

/// Header names the checks look at, and a few they do not.
const NAMES: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "content-type",
    "expect",
    "upgrade",
    "connection",
    "sec-websocket-version",
    "content_length",
    "transfer_encoding",
    "x-forwarded-for",
    "x-request-id",
];

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        select(vec![
            "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "CONNECT",
        ])
        .prop_map(String::from),
        // Any token, any case, any length (the checks bound it).
        "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,40}",
    ]
    // `Method` refuses a few tokens of its own (a parser would refuse them before a handler).
    .prop_filter_map("a method", |m| Method::from_bytes(m.as_bytes()).ok())
}

/// A target that `Uri` accepts (what actix-http's parser would give a handler).
fn target() -> impl Strategy<Value = Uri> {
    prop_oneof![
        Just("/".to_string()),
        Just("*".to_string()),
        "/[!-~]{0,60}",
        "/[a-z]{0,5}(%[0-9a-fA-F]{2}|\\\\|/\\.\\./|\\?)[!-~]{0,10}",
        "(http|https|ftp)://[a-z0-9.:@\\[\\]_-]{0,24}(/[!-~]{0,20})?",
        ".{0,40}",
    ]
    .prop_map(|t| t.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/")))
}

fn header() -> impl Strategy<Value = (HeaderName, HeaderValue)> {
    let name = prop_oneof![
        3 => select(NAMES).prop_map(String::from),
        1 => "[!#$%&'*+.^_`|~0-9a-z-]{1,20}",
    ];
    let value = prop_oneof![
        "[0-9]{0,25}",
        "0[0-9]{0,3}|[0-9]+, ?[0-9]+|-1|\\+1| 7",
        "(chunked|gzip|identity|100-continue|websocket|13|upgrade)[ ,;a-z]{0,8}",
        "[a-z0-9.:_~\\[\\]@/-]{0,30}",
        vec(any::<u8>(), 0..40).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        // Near the head's size limit, on either side of it with a few such fields.
        (8_000..40_000usize).prop_map(|n| "v".repeat(n)),
    ];
    (name, value).prop_filter_map("a valid header field", |(n, v)| {
        Some((
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_bytes(v.as_bytes()).ok()?,
        ))
    })
}

fn proxy_section() -> impl Strategy<Value = ProxySection> {
    prop_oneof![Just(0u64), 0..100_000u64, any::<u64>()].prop_map(|max| ProxySection {
        max_body_bytes: max,
        ..ProxySection::default()
    })
}

/// Failures are printed, shrunk, by the test; no regression file is written beside it.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_checks_never_panic_and_refuse_with_a_client_error(
        method in method(),
        target in target(),
        http10 in any::<bool>(),
        headers in vec(header(), 0..8),
        proxy in proxy_section(),
    ) {
        let mut req = TestRequest::default()
            .method(method.clone())
            .uri(&target.to_string())
            .version(if http10 { Version::HTTP_10 } else { Version::HTTP_11 });
        for h in headers {
            req = req.append_header(h);
        }
        let req = req.to_http_request();
        match check_request(&req, &proxy) {
            Ok(Framing::Length(n)) => {
                prop_assert!(n > 0);
                prop_assert!(proxy.max_body_bytes == 0 || n <= proxy.max_body_bytes);
            }
            Ok(_) => {}
            Err(e) => {
                let status = e.status_code();
                let documented = method == Method::CONNECT && status == StatusCode::NOT_IMPLEMENTED;
                prop_assert!(status.is_client_error() || documented, "{e} gave {status}");
                prop_assert_eq!(e.error_response().status(), status);
            }
        }
    }
}

/// Parses `text` with `env` as the environment.
fn parse(text: &str, env: &[(String, String)]) -> Result<Config, String> {
    Config::from_toml_with_env("fuzz.toml", text, Some(env.iter().cloned().collect()))
        .map_err(|e| e.to_string())
}

/// A refusal is the one line printed at start, naming the file (or, for a value from the
/// environment, the variable).
fn assert_one_line(err: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        err.starts_with("fuzz.toml: ") || err.starts_with("ROUNDABOUT__"),
        "{err:?}"
    );
    prop_assert!(!err.contains('\n'), "{err:?}");
    Ok(())
}

/// What a valid configuration prints with `--check` is itself valid, and prints the same.
fn assert_round_trip(config: &Config) -> Result<(), TestCaseError> {
    let printed = config.to_toml();
    let again = parse(&printed, &[]);
    prop_assert!(again.is_ok(), "{printed}\nwas refused: {again:?}");
    prop_assert_eq!(again.unwrap().to_toml(), printed);
    Ok(())
}

/// Any TOML value: what a user could write for a key.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        prop_oneof![Just(0i64), Just(-1), 1..600i64, Just(i64::MAX)].prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        ".{0,30}".prop_map(toml::Value::String),
        "[0-9]{1,12}(ns|ms|s|m|h|d|w|y|years| s)?".prop_map(toml::Value::String),
        "(http|https|redis|ftp)://[a-z0-9.:@_-]{0,20}(/[a-z]{0,5})?".prop_map(toml::Value::String),
        "[0-9.:/\\[\\]a-f]{0,24}".prop_map(toml::Value::String),
        select(vec![
            "round_robin",
            "power_of_two",
            "allow",
            "deny",
            "local",
            "info",
            "off",
            "",
        ])
        .prop_map(|s| toml::Value::String(s.into())),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            vec(("(url|weight|[a-z]{1,6})", inner), 0..3)
                .prop_map(|kv| toml::Value::Table(kv.into_iter().collect())),
        ]
    })
}

/// `[section]\nkey = value` as TOML text.
fn one_key(key: &str, value: &toml::Value) -> String {
    let (section, name) = key.split_once('.').expect("section.key");
    let mut inner = toml::Table::new();
    inner.insert(name.to_string(), value.clone());
    let mut outer = toml::Table::new();
    outer.insert(section.to_string(), toml::Value::Table(inner));
    toml::to_string(&outer).expect("a table is TOML")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_is_parsed_or_refused_in_one_line(text in ".{0,400}") {
        match parse(&text, &[]) {
            Ok(config) => assert_round_trip(&config)?,
            Err(e) => assert_one_line(&e)?,
        }
    }

    #[test]
    fn toml_ish_text_is_parsed_or_refused_in_one_line(
        lines in vec(
            prop_oneof![
                select(vec!["[listen]", "[balancer]", "[health_check]", "[proxy]",
                    "[rate_limit]", "[admin]", "[log]", "[[balancer]]", "[other]", "["])
                    .prop_map(String::from),
                (
                    prop_oneof![
                        select(KEYS).prop_map(|k| k.split_once('.').unwrap().1.to_string()),
                        "[a-z_.\"]{1,12}",
                    ],
                    prop_oneof![
                        toml_value().prop_map(|v| v.to_string()),
                        "[^\\n]{0,20}",
                    ],
                )
                    .prop_map(|(k, v)| format!("{k} = {v}")),
            ],
            0..12,
        ),
    ) {
        let text = lines.join("\n");
        match parse(&text, &[]) {
            Ok(config) => assert_round_trip(&config)?,
            Err(e) => assert_one_line(&e)?,
        }
    }

    #[test]
    fn any_value_for_any_key_is_taken_or_refused_naming_the_key(
        key in select(KEYS),
        value in toml_value(),
    ) {
        let text = one_key(key, &value);
        match parse(&text, &[]) {
            Ok(config) => assert_round_trip(&config)?,
            Err(e) => {
                assert_one_line(&e)?;
                prop_assert!(e.contains(key), "{text:?} gave {e:?}, which does not name {key}");
            }
        }
    }

    #[test]
    fn any_environment_value_for_any_key_is_taken_or_refused_naming_the_key(
        key in select(KEYS),
        value in prop_oneof![
            ".{0,30}",
            "[0-9]{0,20}",
            "-?[0-9]{1,3}(s|ms|m)?",
            "(http|redis)://[a-z0-9.:]{0,15}(,(http|redis)://[a-z0-9.:]{0,15}){0,2}",
            "(true|false|1|0|yes)",
        ],
    ) {
        let var = format!("ROUNDABOUT__{}", key.replace('.', "__").to_ascii_uppercase());
        match parse("", &[(var.clone(), value.clone())]) {
            Ok(config) => assert_round_trip(&config)?,
            Err(e) => {
                assert_one_line(&e)?;
                prop_assert!(
                    e.contains(key) || e.contains(&var),
                    "{var}={value:?} gave {e:?}, which names neither {key} nor {var}"
                );
            }
        }
    }
}
