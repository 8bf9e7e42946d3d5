//! The checked `[[routes]]`: each entry's match keys, pool and rules in the types the route
//! table uses, every error naming the route as `routes[N]` (from 1, in file order, as the
//! default name `route-N` counts).

use std::{sync::Arc, time::Duration};

use actix_web::http::{
    header::{HeaderMap, HeaderName, HeaderValue},
    Method,
};
use ipnet::IpNet;

use super::{
    file::{FileConfig, HeaderRulesSection, RouteRateLimit, RouteSection},
    pools::{check_name, PoolConfig, DEFAULT_POOL},
    validate::{key_err, parse_net, KeyError},
};

/// A route's rate limit, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteLimit {
    /// The default budget of `[rate_limit]`, when it is enabled.
    Default,
    /// Not limited.
    Off,
    /// A budget of the route's own, counted apart (`key_prefix:ROUTE:IP`).
    Own {
        requests: u64,
        window: std::time::Duration,
    },
}

/// `set` and `remove` rules for a message's headers, applied after roundabout's own.
#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderRules {
    /// Applies the rules: every `set` header replaces (or adds) its field, every `remove`
    /// header goes.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// A checked route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: Arc<str>,
    /// Lower case, without a trailing dot; a wildcard as `*.example.com`.
    pub host: Option<String>,
    /// As written (checked to be a path); the route table normalizes it.
    pub path_prefix: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub methods: Vec<Method>,
    /// The pool's name (one of the configuration's pools).
    pub pool: Arc<str>,
    pub strip_prefix: bool,
    pub limit: RouteLimit,
    pub allow: Vec<IpNet>,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    pub redirect_https: bool,
    /// The entry as written, for `GET /routes`.
    pub written: RouteSection,
}

/// Headers a rule may not set or remove: the hop-by-hop ones (they never cross), the
/// `X-Forwarded-*` ones roundabout sets itself, and the body's framing.
const RESERVED: [&str; 13] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "content-length",
];

impl FileConfig {
    /// Every route, checked against the pools and the listeners.
    pub(super) fn validate_routes(
        &self,
        pools: &[PoolConfig],
        tls_listener: bool,
    ) -> Result<Vec<RouteConfig>, KeyError> {
        let mut routes: Vec<RouteConfig> = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{}]", i + 1);
            let route = self.validate_route(r, &at, pools, tls_listener)?;
            if routes.iter().any(|other| other.name == route.name) {
                return Err(key_err(
                    format!("{at}.name"),
                    format!("{:?} is the name of an earlier route", &*route.name),
                ));
            }
            routes.push(route);
        }
        Ok(routes)
    }

    fn validate_route(
        &self,
        r: &RouteSection,
        at: &str,
        pools: &[PoolConfig],
        tls_listener: bool,
    ) -> Result<RouteConfig, KeyError> {
        let key = |k: &str| format!("{at}.{k}");
        let name = match &r.name {
            Some(n) => {
                check_name(n).map_err(|e| key_err(key("name"), e))?;
                n.clone()
            }
            None => format!("route-{}", &at["routes[".len()..at.len() - 1]),
        };
        let host = r
            .host
            .as_deref()
            .map(|h| route_host(h).map_err(|e| key_err(key("host"), e)))
            .transpose()?;
        let path_prefix = r
            .path_prefix
            .as_deref()
            .map(|p| prefix(p).map_err(|e| key_err(key("path_prefix"), e)))
            .transpose()?;
        let mut headers = Vec::with_capacity(r.headers.len());
        for (n, v) in &r.headers {
            let k = key(&format!("headers.{n}"));
            let name = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| key_err(&k, format!("{n:?} is not a header name")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| key_err(&k, format!("{v:?} is not a header value")))?;
            headers.push((name, value));
        }
        let mut methods = Vec::with_capacity(r.methods.len());
        for (j, m) in r.methods.iter().enumerate() {
            // Methods are case-sensitive on the wire, but written in lower case here they
            // can only mean the standard ones.
            let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                key_err(
                    key(&format!("methods[{j}]")),
                    format!("{m:?} is not a method"),
                )
            })?;
            methods.push(method);
        }
        let pool_name = r.pool.as_deref().unwrap_or(DEFAULT_POOL);
        let Some(pool) = pools.iter().find(|p| &*p.name == pool_name) else {
            let known: Vec<&str> = pools.iter().map(|p| &*p.name).collect();
            return Err(key_err(
                key("pool"),
                format!("{pool_name:?} is not a pool (pools: {})", known.join(", ")),
            ));
        };
        if r.strip_prefix && path_prefix.is_none() {
            return Err(key_err(
                key("strip_prefix"),
                "needs path_prefix (the prefix to strip)",
            ));
        }
        let limit = match &r.rate_limit {
            None => RouteLimit::Default,
            Some(RouteRateLimit::Switch(false)) => RouteLimit::Off,
            Some(RouteRateLimit::Switch(true)) => {
                return Err(key_err(
                    key("rate_limit"),
                    "true is no budget: give { requests = N, window = \"1s\" }, or false",
                ))
            }
            Some(RouteRateLimit::Budget(b)) => {
                if b.requests == 0 {
                    return Err(key_err(key("rate_limit.requests"), "must be at least 1"));
                }
                if b.requests > i64::MAX as u64 {
                    return Err(key_err(
                        key("rate_limit.requests"),
                        format!("must be at most {}", i64::MAX),
                    ));
                }
                let window = b.window.unwrap_or(self.rate_limit.window);
                whole_seconds(window).map_err(|e| key_err(key("rate_limit.window"), e))?;
                RouteLimit::Own {
                    requests: b.requests,
                    window,
                }
            }
        };
        let mut allow = Vec::with_capacity(r.allow.len());
        for (j, net) in r.allow.iter().enumerate() {
            allow.push(parse_net(net.trim()).map_err(|e| key_err(key(&format!("allow[{j}]")), e))?);
        }
        let request_headers = rules(r.request_headers.as_ref(), &key("request_headers"))?;
        let response_headers = rules(r.response_headers.as_ref(), &key("response_headers"))?;
        if r.redirect_https && !tls_listener {
            return Err(key_err(
                key("redirect_https"),
                "needs listen.tls_address (the TLS listener to redirect to)",
            ));
        }
        Ok(RouteConfig {
            name: name.into(),
            host,
            path_prefix,
            headers,
            methods,
            pool: pool.name.clone(),
            strip_prefix: r.strip_prefix,
            limit,
            allow,
            request_headers,
            response_headers,
            redirect_https: r.redirect_https,
            written: r.clone(),
        })
    }
}

/// A route's host: a DNS name, or `*.` and a DNS name; lower case, no trailing dot.
fn route_host(host: &str) -> Result<String, String> {
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(label_ok) {
        return Err(format!(
            "{host:?} is not a DNS name (\"api.example.com\") or a wildcard (\"*.example.com\")"
        ));
    }
    Ok(name.to_string())
}

/// A path prefix: starts with `/`, a path and nothing else.
fn prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with '/'"));
    }
    if p.contains(['?', '#']) || p.parse::<actix_web::http::uri::PathAndQuery>().is_err() {
        return Err(format!("{p:?} is not a path"));
    }
    Ok(p.to_string())
}

fn whole_seconds(d: Duration) -> Result<(), String> {
    if d.is_zero() {
        Err("must be greater than zero".into())
    } else if d.subsec_nanos() != 0 {
        Err("must be a whole number of seconds (Retry-After is in seconds)".into())
    } else {
        Ok(())
    }
}

/// `set` and `remove` rules, checked: names are header names and none is reserved.
fn rules(section: Option<&HeaderRulesSection>, at: &str) -> Result<HeaderRules, KeyError> {
    let Some(section) = section else {
        return Ok(HeaderRules::default());
    };
    let name_of = |n: &str, k: &str| {
        let name = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| key_err(k, format!("{n:?} is not a header name")))?;
        if RESERVED.contains(&name.as_str()) {
            return Err(key_err(
                k,
                format!(
                    "{n} cannot be set or removed by a rule (hop-by-hop headers, X-Forwarded-* \
                     and Content-Length are roundabout's)"
                ),
            ));
        }
        Ok(name)
    };
    let mut rules = HeaderRules::default();
    for (n, v) in &section.set {
        let k = format!("{at}.set.{n}");
        let name = name_of(n, &k)?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| key_err(&k, format!("{v:?} is not a header value")))?;
        rules.set.push((name, value));
    }
    for (j, n) in section.remove.iter().enumerate() {
        rules.remove.push(name_of(n, &format!("{at}.remove[{j}]"))?);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use super::RouteLimit;

    const POOLS: &str = "[pools.api]\nservers = [\"http://127.0.0.1:7001\"]\n";

    #[test]
    fn routes_are_checked_and_named_by_position() {
        let c = parse(&format!(
            "{POOLS}[[routes]]\nhost = \"API.Example.com.\"\npool = \"api\"\n\
             [[routes]]\nname = \"static\"\npath_prefix = \"/static/\"\nstrip_prefix = true\n\
             rate_limit = {{ requests = 5 }}\nmethods = [\"get\", \"HEAD\"]\n\
             [[routes]]\npath_prefix = \"/x/../v1//\"\nrate_limit = false\n"
        ))
        .unwrap();
        let r = &c.routes;
        assert_eq!(&*r[0].name, "route-1");
        assert_eq!(r[0].host.as_deref(), Some("api.example.com"));
        assert_eq!(&*r[0].pool, "api");
        assert_eq!(&*r[1].name, "static");
        assert_eq!(&*r[1].pool, "default");
        assert_eq!(r[1].path_prefix.as_deref(), Some("/static/"));
        assert_eq!(r[1].methods, ["GET", "HEAD"]);
        assert_eq!(
            r[1].limit,
            RouteLimit::Own {
                requests: 5,
                window: std::time::Duration::from_secs(60)
            }
        );
        assert_eq!(
            r[2].path_prefix.as_deref(),
            Some("/x/../v1//"),
            "as written"
        );
        assert_eq!(r[2].limit, RouteLimit::Off);
    }

    #[test]
    fn route_errors_name_the_route_in_the_configs_words() {
        let cases = [
            (
                "[[routes]]\n[[routes]]\n[[routes]]\npool = \"apii\"",
                "routes[3].pool: \"apii\" is not a pool (pools: default, api)",
            ),
            (
                "[[routes]]\nhost = \"a b\"",
                "routes[1].host: \"a b\" is not a DNS name",
            ),
            ("[[routes]]\nhost = \"*.\"", "routes[1].host"),
            (
                "[[routes]]\npath_prefix = \"v1\"",
                "routes[1].path_prefix: \"v1\" must start with '/'",
            ),
            (
                "[[routes]]\nstrip_prefix = true",
                "routes[1].strip_prefix: needs path_prefix",
            ),
            (
                "[[routes]]\nrate_limit = true",
                "routes[1].rate_limit: true is no budget",
            ),
            (
                "[[routes]]\nrate_limit = { requests = 0 }",
                "routes[1].rate_limit.requests: must be at least 1",
            ),
            (
                "[[routes]]\nrate_limit = { requests = 1, window = \"1500ms\" }",
                "routes[1].rate_limit.window: must be a whole number of seconds",
            ),
            (
                "[[routes]]\nallow = [\"10.0.0.0/33\"]",
                "routes[1].allow[0]",
            ),
            (
                "[[routes]]\nrequest_headers = { set = { X-Forwarded-For = \"1.2.3.4\" } }",
                "routes[1].request_headers.set.X-Forwarded-For: X-Forwarded-For cannot be set",
            ),
            (
                "[[routes]]\nresponse_headers = { remove = [\"Connection\"] }",
                "routes[1].response_headers.remove[0]: Connection cannot be set or removed",
            ),
            (
                "[[routes]]\nredirect_https = true",
                "routes[1].redirect_https: needs listen.tls_address",
            ),
            (
                "[[routes]]\nname = \"a\"\n[[routes]]\nname = \"a\"",
                "routes[2].name: \"a\" is the name",
            ),
            ("[[routes]]\nhots = \"a\"", "routes[1].hots: unknown key"),
            (
                "[[routes]]\nmethods = [\"GE T\"]",
                "routes[1].methods[0]: \"GE T\" is not a method",
            ),
        ];
        for (text, want) in cases {
            let err = parse(&format!("{POOLS}{text}")).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?} gave {err:?}, wanted {want:?}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
