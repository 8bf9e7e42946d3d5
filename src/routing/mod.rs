//! The route table: which pool a request goes to, and what its route asks of it.
//!
//! Routes are data (Envoy's route/cluster split): built once from `[[routes]]` when the
//! configuration is loaded, published to every worker with the rest of the hot path's
//! settings, and swapped as a whole on reload, so a request keeps the table it started
//! with. Matching follows file order (the first route that matches wins), but exact hosts
//! are found in a hash map, so 1,000 host routes cost what one does: the routes of an
//! exact host, the `*.suffix` routes and the routes without a host are three short lists,
//! each in file order, scanned from the front and only as far as an earlier match allows.
//!
//! A path prefix is compared with the path normalized as RFC 3986 §6.2.2 says (the
//! percent-encodings of unreserved characters decoded, dot segments resolved, repeated
//! slashes merged), so that `/static/../v1/x`, `//v1/x` and `/%76%31/x` all match `"/v1"`
//! as nginx's locations would; an encoded `/` (`%2F`) is a character of its segment, not a
//! separator. Nothing here parses configuration or allocates when no route has a path
//! prefix, or when the path is already normal.

mod path;

use std::{borrow::Cow, collections::HashMap, net::IpAddr, sync::Arc};

use actix_web::http::{
    header::{HeaderMap, HeaderName, HeaderValue},
    Method,
};
use ipnet::IpNet;

pub use self::path::normalize_path;
use self::path::{normal_host, under_prefix};
pub(crate) use crate::config::{HeaderRules, RouteLimit};
use crate::{
    config::RouteConfig,
    rate_limit::{budget_id, Budget},
    upstream::PoolId,
};

/// A route's rate limit, as the hot path uses it.
#[derive(Debug, Clone)]
pub enum Limit {
    /// The default budget of `[rate_limit]`, when it is enabled.
    Default,
    /// Not limited.
    Off,
    /// The route's own budget, and its `RateLimit-Policy` value.
    Own { budget: Budget, policy: HeaderValue },
}

/// `rules` with values of this worker's own (see [`RouteTable::for_worker`]).
fn rules_for_worker(rules: &HeaderRules) -> HeaderRules {
    HeaderRules {
        set: rules
            .set
            .iter()
            .map(|(n, v)| (n.clone(), own_value(v)))
            .collect(),
        remove: rules.remove.clone(),
    }
}

fn own_value(v: &HeaderValue) -> HeaderValue {
    let mut own = HeaderValue::from_bytes(v.as_bytes()).expect("was a header value");
    own.set_sensitive(v.is_sensitive());
    own
}

/// One route, as the hot path uses it.
#[derive(Debug, Clone)]
pub struct Route {
    /// `name` from the file, or `route-N`.
    pub name: Arc<str>,
    /// The pool its requests go to.
    pub pool: PoolId,
    /// Lower case, without a trailing dot; `*.example.com` kept as `.example.com`.
    host: Option<Host>,
    /// Without a trailing `/` (but `/` itself).
    path_prefix: Option<Box<str>>,
    headers: Vec<(HeaderName, HeaderValue)>,
    methods: Vec<Method>,
    /// The server gets the normalized path without the matched prefix.
    pub strip_prefix: bool,
    pub limit: Limit,
    /// Client IPs allowed; empty: all.
    pub allow: Vec<IpNet>,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    /// A request on the plain listener gets 308 to the TLS listener.
    pub redirect_https: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Exact(Box<str>),
    /// `.example.com`: any name that ends with it (and is longer).
    Suffix(Box<str>),
}

impl Route {
    /// The route of a checked `[[routes]]` entry, sending to `pool`.
    pub fn new(config: &RouteConfig, pool: PoolId) -> Self {
        let host = config.host.as_deref().map(|h| match h.strip_prefix('*') {
            Some(suffix) => Host::Suffix(suffix.into()),
            None => Host::Exact(h.into()),
        });
        Route {
            name: config.name.clone(),
            pool,
            host,
            path_prefix: config.path_prefix.as_deref().map(prefix),
            headers: config.headers.clone(),
            methods: config.methods.clone(),
            strip_prefix: config.strip_prefix,
            limit: match config.limit {
                RouteLimit::Default => Limit::Default,
                RouteLimit::Off => Limit::Off,
                RouteLimit::Own { requests, window } => {
                    let policy = format!("\"{}\";q={requests};w={}", config.name, window.as_secs());
                    Limit::Own {
                        budget: Budget {
                            id: budget_id(&config.name),
                            name: config.name.clone(),
                            requests,
                            window,
                        },
                        policy: HeaderValue::from_str(&policy)
                            .expect("a route's name, digits and quotes are a header value"),
                    }
                }
            },
            allow: config.allow.clone(),
            request_headers: config.request_headers.clone(),
            response_headers: config.response_headers.clone(),
            redirect_https: config.redirect_https,
        }
    }

    /// The match keys other than the host.
    fn matches_rest(&self, req: &RouteRequest<'_>, path: &str) -> bool {
        if let Some(prefix) = &self.path_prefix {
            if !under_prefix(path, prefix) {
                return false;
            }
        }
        if !self.methods.is_empty() && !self.methods.contains(req.method) {
            return false;
        }
        self.headers.iter().all(|(name, want)| {
            let mut values = req.headers.get_all(name);
            // Exactly this value: one field, equal bytes.
            values.next().is_some_and(|v| v == want) && values.next().is_none()
        })
    }

    /// The path the server gets: the client's target unchanged, or with `strip_prefix` the
    /// normalized path without the prefix (`/` when nothing is left), query unchanged.
    pub fn upstream_path(&self, path: &str, query: Option<&str>) -> Option<String> {
        let prefix = self.path_prefix.as_deref().filter(|_| self.strip_prefix)?;
        let normal = normalize_path(path);
        let rest = if prefix == "/" {
            &normal[..]
        } else {
            &normal[prefix.len()..]
        };
        let rest = if rest.is_empty() { "/" } else { rest };
        Some(match query {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        })
    }

    /// Whether `ip` may use this route.
    pub fn allows(&self, ip: Option<IpAddr>) -> bool {
        self.allow.is_empty() || ip.is_some_and(|ip| self.allow.iter().any(|n| n.contains(&ip)))
    }

    fn for_worker(&self) -> Self {
        let limit = match &self.limit {
            Limit::Own { budget, policy } => Limit::Own {
                budget: Budget {
                    name: Arc::from(&*budget.name),
                    ..budget.clone()
                },
                policy: own_value(policy),
            },
            other => other.clone(),
        };
        Route {
            name: Arc::from(&*self.name),
            limit,
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), own_value(v)))
                .collect(),
            request_headers: rules_for_worker(&self.request_headers),
            response_headers: rules_for_worker(&self.response_headers),
            ..self.clone()
        }
    }
}

/// A prefix as requests are compared with it: normalized, without a trailing `/` (but `/`).
fn prefix(written: &str) -> Box<str> {
    let normal = normalize_path(written);
    let trimmed = normal.trim_end_matches('/');
    if trimmed.is_empty() { "/" } else { trimmed }.into()
}

/// What a route is matched against.
pub struct RouteRequest<'a> {
    /// The `Host` header (or HTTP/2's `:authority`), as sent: port and case are dealt
    /// with here.
    pub host: Option<&'a [u8]>,
    /// The request target's path, as sent.
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

/// Every route, and the indexes that find the first match without trying them all.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Lower-case host → the routes with exactly that host, in file order.
    exact: HashMap<Box<[u8]>, Vec<u32>, foldhash::fast::RandomState>,
    /// `*.suffix` routes, in file order.
    suffixes: Vec<u32>,
    /// Routes without a host, in file order.
    hostless: Vec<u32>,
    /// Some route has a path prefix: the path is normalized for it.
    any_prefix: bool,
}

impl RouteTable {
    /// The table of `routes`, in file order.
    pub fn new(routes: Vec<Route>) -> Self {
        let mut table = RouteTable {
            any_prefix: routes.iter().any(|r| r.path_prefix.is_some()),
            ..Default::default()
        };
        for (i, route) in routes.iter().enumerate() {
            let i = u32::try_from(i).expect("fewer than 4 billion routes");
            match &route.host {
                Some(Host::Exact(h)) => table.exact.entry(h.as_bytes().into()).or_default().push(i),
                Some(Host::Suffix(_)) => table.suffixes.push(i),
                None => table.hostless.push(i),
            }
        }
        table.routes = routes;
        table
    }

    /// The same table for one worker: nothing in it shares a reference count with
    /// another worker's (header values are cloned per request).
    pub fn for_worker(&self) -> Self {
        RouteTable {
            routes: self.routes.iter().map(Route::for_worker).collect(),
            ..self.clone()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route, in file order, that `req` matches; `None`: the default pool.
    pub fn find(&self, req: &RouteRequest<'_>) -> Option<&Route> {
        if self.routes.is_empty() {
            return None;
        }
        let mut buf = [0u8; 256];
        let host = req.host.and_then(|h| normal_host(h, &mut buf));
        let path = if self.any_prefix {
            normalize_path(req.path)
        } else {
            Cow::Borrowed(req.path)
        };
        let mut best: Option<u32> = None;
        let first_of = |candidates: &mut dyn Iterator<Item = u32>, best: &mut Option<u32>| {
            for i in candidates {
                if best.is_some_and(|b| i >= b) {
                    return;
                }
                if self.routes[i as usize].matches_rest(req, &path) {
                    *best = Some(i);
                    return;
                }
            }
        };
        if let Some(host) = host {
            if let Some(list) = self.exact.get(host) {
                first_of(&mut list.iter().copied(), &mut best);
            }
            let mut suffixed = self.suffixes.iter().copied().filter(|&i| {
                matches!(&self.routes[i as usize].host,
                    Some(Host::Suffix(s)) if host.len() > s.len() && host.ends_with(s.as_bytes()))
            });
            first_of(&mut suffixed, &mut best);
        }
        first_of(&mut self.hostless.iter().copied(), &mut best);
        best.map(|i| &self.routes[i as usize])
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
    use actix_web::http::Method;

    use super::*;
    use crate::config::Config;

    /// The route table of `routes` (TOML `[[routes]]` entries), over pools `api` and `web`.
    fn table(routes: &str) -> RouteTable {
        let text = format!("[pools.api]\nservers = []\n[pools.web]\nservers = []\n{routes}");
        let config = Config::from_toml_with_env("t.toml", &text, Some(Default::default())).unwrap();
        RouteTable::new(
            config
                .routes
                .iter()
                .map(|r| Route::new(r, PoolId::of(&r.pool)))
                .collect(),
        )
    }

    /// The name of the route `host`, `path`, `method` and `headers` take, or `-`.
    fn route(
        t: &RouteTable,
        host: &str,
        path: &str,
        method: &str,
        headers: &[(&str, &str)],
    ) -> String {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let req = RouteRequest {
            host: Some(host.as_bytes()).filter(|h| !h.is_empty()),
            path,
            method: &method,
            headers: &map,
        };
        t.find(&req).map_or("-".into(), |r| r.name.to_string())
    }

    #[test]
    fn the_first_route_in_file_order_wins_whichever_index_finds_it() {
        let t = table(
            "[[routes]]\nname = \"canary\"\nheaders = { x-canary = \"1\" }\npool = \"web\"\n\
             [[routes]]\nname = \"wild\"\nhost = \"*.example.com\"\npool = \"web\"\n\
             [[routes]]\nname = \"api\"\nhost = \"api.example.com\"\npool = \"api\"\n\
             [[routes]]\nname = \"static\"\npath_prefix = \"/static\"\n\
             [[routes]]\nname = \"posts\"\nhost = \"api.example.com\"\nmethods = [\"POST\"]\n",
        );
        assert_eq!(
            route(&t, "api.example.com", "/", "GET", &[("x-canary", "1")]),
            "canary"
        );
        assert_eq!(
            route(&t, "api.example.com", "/", "GET", &[]),
            "wild",
            "earlier than the exact host"
        );
        assert_eq!(route(&t, "b.a.example.com", "/x", "GET", &[]), "wild");
        assert_eq!(
            route(&t, "example.com", "/static/x", "GET", &[]),
            "static",
            "not *.example.com itself"
        );
        assert_eq!(route(&t, "other.test", "/staticx", "GET", &[]), "-");
        assert_eq!(
            route(&t, "", "/static", "GET", &[]),
            "static",
            "no host: hostless routes only"
        );
        assert_eq!(route(&t, "example.com", "/", "GET", &[]), "-");
    }

    #[test]
    fn exact_hosts_ignore_case_port_and_trailing_dot_and_methods_and_headers_must_all_match() {
        let t = table(
            "[[routes]]\nname = \"api\"\nhost = \"api.example.com\"\nmethods = [\"GET\", \"HEAD\"]\n\
             headers = { x-env = \"prod\", x-team = \"a\" }\n\
             [[routes]]\nname = \"rest\"\nhost = \"api.example.com\"\n",
        );
        let both = [("x-env", "prod"), ("x-team", "a")];
        assert_eq!(
            route(&t, "API.Example.COM.:8443", "/", "HEAD", &both),
            "api"
        );
        assert_eq!(route(&t, "api.example.com", "/", "POST", &both), "rest");
        assert_eq!(route(&t, "api.example.com", "/", "GET", &both[..1]), "rest");
        assert_eq!(
            route(
                &t,
                "api.example.com",
                "/",
                "GET",
                &[("x-env", "Prod"), ("x-team", "a")]
            ),
            "rest"
        );
        // Two fields of one header are not "exactly this value".
        let twice = [("x-env", "prod"), ("x-env", "prod"), ("x-team", "a")];
        assert_eq!(route(&t, "api.example.com", "/", "GET", &twice), "rest");
    }

    #[test]
    fn prefixes_match_normalized_paths_by_whole_segments() {
        let t = table("[[routes]]\nname = \"v1\"\npath_prefix = \"/v1/\"\n");
        for path in [
            "/v1",
            "/v1/",
            "/v1/users",
            "//v1/x",
            "/static/../v1/x",
            "/%76%31/x",
            "/./v1",
        ] {
            assert_eq!(route(&t, "h", path, "GET", &[]), "v1", "{path}");
        }
        for path in ["/v10", "/v", "/V1", "/v1%2Fx", "/x/v1", "/v1/../x"] {
            assert_eq!(route(&t, "h", path, "GET", &[]), "-", "{path}");
        }
    }

    #[test]
    fn strip_prefix_sends_the_normalized_rest_and_the_query_unchanged() {
        let t = table("[[routes]]\nname = \"v1\"\npath_prefix = \"/v1\"\nstrip_prefix = true\n");
        let r = &t.routes[0];
        assert_eq!(
            r.upstream_path("/v1/users", Some("x=1")).as_deref(),
            Some("/users?x=1")
        );
        assert_eq!(r.upstream_path("/v1", None).as_deref(), Some("/"));
        assert_eq!(
            r.upstream_path("/static/../v1/x", None).as_deref(),
            Some("/x")
        );
        assert_eq!(
            r.upstream_path("//v1//a/./b", Some("")).as_deref(),
            Some("/a/b?")
        );
        let kept = table("[[routes]]\npath_prefix = \"/v1\"\n");
        assert_eq!(
            kept.routes[0].upstream_path("/v1/users", None),
            None,
            "target unchanged"
        );
    }

    #[test]
    fn a_thousand_exact_hosts_are_found_by_one_lookup_and_keep_file_order() {
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!(
                "[[routes]]\nhost = \"h{i}.example.com\"\npool = \"api\"\n"
            ));
        }
        text.push_str("[[routes]]\nname = \"again\"\nhost = \"h7.example.com\"\n");
        let t = table(&text);
        assert_eq!(route(&t, "h999.example.com", "/", "GET", &[]), "route-1000");
        assert_eq!(route(&t, "h7.example.com", "/", "GET", &[]), "route-8");
        assert_eq!(route(&t, "nowhere.example.com", "/", "GET", &[]), "-");
        assert_eq!(t.exact.len(), 1000);
        assert!(t.suffixes.is_empty() && t.hostless.is_empty());
    }

    #[test]
    fn allow_lists_and_header_rules_apply_as_configured() {
        let t = table(
            "[[routes]]\nallow = [\"10.0.0.0/8\", \"192.0.2.7\"]\n\
             request_headers = { set = { x-env = \"prod\" }, remove = [\"x-debug\"] }\n",
        );
        let r = &t.routes[0];
        assert!(r.allows(Some("10.1.2.3".parse().unwrap())));
        assert!(r.allows(Some("192.0.2.7".parse().unwrap())));
        assert!(!r.allows(Some("192.0.2.8".parse().unwrap())));
        assert!(!r.allows(None));
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static("x-debug"),
            HeaderValue::from_static("1"),
        );
        h.insert(
            HeaderName::from_static("x-env"),
            HeaderValue::from_static("dev"),
        );
        r.request_headers.apply(&mut h);
        assert_eq!(h.get("x-env").unwrap(), "prod");
        assert!(h.get("x-debug").is_none());
    }
}
