//! Phase **rewrite**: the request head the server gets. It is the client's head as actix
//! parsed it, forwarded (HAProxy and nginx forward the head they parsed, edited in place):
//! the client's headers are written out from the client's own map, less those that do not
//! cross the proxy (the hop-by-hop headers, every header `Connection` names, any
//! `X-Forwarded-*`, the route's `remove`), with roundabout's own after them (`X-Forwarded-*`, the request
//! id, `Host` when it is replaced, the route's `set`), each replacing a client header of
//! its name. Nothing is copied into a map of its own and no URI is built: the vendored
//! actix-http writes the head from this ([`ForwardedHead`], vendor/actix-http/VENDORED.md).

use std::net::IpAddr;

use actix_http::{ForwardedHead, RequestHead};
use actix_web::{
    http::{
        header::{self, HeaderMap, HeaderName, HeaderValue},
        uri::PathAndQuery,
        Version,
    },
    HttpRequest,
};
use bytes::Bytes;
use ipnet::IpNet;
use smallvec::SmallVec;

use super::headers::{
    connection_named, is_forwarded_field, is_hop_by_hop, X_FORWARDED_FOR, X_FORWARDED_HOST,
    X_FORWARDED_PROTO, X_REQUEST_ID,
};
use crate::{config::HeaderRules, digits::push_ip, upstream::Upstream};

/// What the rewrite needs beyond the client's request and the server.
pub struct Rewrite<'a> {
    /// The TCP peer (`X-Forwarded-For` names it).
    pub peer: Option<IpAddr>,
    /// Proxies whose `X-Forwarded-For` is kept and added to.
    pub trusted: &'a [IpNet],
    /// The route's header rules, if a route took the request.
    pub rules: Option<&'a HeaderRules>,
    /// The path and query the route rewrote the target to.
    pub path: Option<&'a str>,
    pub request_id: &'a HeaderValue,
    /// `proxy.preserve_host`: the client's `Host` goes on, else the server's.
    pub preserve_host: bool,
}

/// The head of one try's upstream request (see the module's doc).
pub struct UpstreamHead {
    /// Method, the server's URI (where to connect), HTTP/1.1; no headers of its own.
    head: RequestHead,
    /// The client's request: its headers are forwarded from its map.
    req: HttpRequest,
    /// The route's rewrite of the target, when it made one.
    target: Option<String>,
    /// roundabout's headers, written after the client's and replacing those of their name.
    own: SmallVec<[(HeaderName, HeaderValue); 6]>,
    /// Client headers that do not cross besides the hop-by-hop ones and `X-Forwarded-*`: those
    /// the client's `Connection` names (rare) and the route's `remove` (rarer).
    dropped: Vec<HeaderName>,
}

impl UpstreamHead {
    /// The head `req` goes to `upstream` with, boxed (awc takes it so): made in its box,
    /// where a head made on the stack and boxed after was copied whole (~660 bytes).
    pub fn new(req: &HttpRequest, upstream: &Upstream, rewrite: &Rewrite<'_>) -> Box<Self> {
        let incoming = req.headers();
        let mut dropped = connection_named(incoming);
        let mut up = Box::new(UpstreamHead {
            head: RequestHead::bare(req.method().clone(), upstream.uri.clone()),
            req: req.clone(),
            // A rewrite that is not a valid target (it cannot be, from a valid one) leaves
            // the client's.
            target: rewrite
                .path
                .filter(|p| PathAndQuery::try_from(*p).is_ok())
                .map(str::to_owned),
            own: SmallVec::new(),
            dropped: Vec::new(),
        });
        // The first of roundabout's headers have names of their own: pushed, not looked
        // for (`set`, from the route's rules on, replaces).
        if let Some(peer) = rewrite.peer {
            up.own.push((
                X_FORWARDED_FOR,
                forwarded_for(peer, incoming, rewrite.trusted),
            ));
        }
        // `secure` is the listener's (TLS or not), never anything the client sent.
        let proto = if req.app_config().secure() {
            "https"
        } else {
            "http"
        };
        up.own
            .push((X_FORWARDED_PROTO, HeaderValue::from_static(proto)));
        let client_host = incoming.get(header::HOST);
        let host = match client_host {
            Some(host) => Some(host.clone()),
            // HTTP/2 carries the host as `:authority`, which is the Host an HTTP/1.1
            // server needs (RFC 9113 §8.3.1).
            None => {
                let host = req
                    .uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                if let Some(host) = &host {
                    up.own.push((header::HOST, host.clone()));
                }
                host
            }
        };
        if let Some(host) = host {
            up.own.push((X_FORWARDED_HOST, host));
        }
        if req.version() == Version::HTTP_2 {
            if let Some(cookie) = joined_cookies(incoming) {
                up.own.push((header::COOKIE, cookie));
            }
        }
        if let Some(rules) = rewrite.rules {
            for name in &rules.remove {
                up.own.retain(|(n, _)| n != name);
                dropped.push(name.clone());
            }
            for (name, value) in &rules.set {
                up.set(name.clone(), value.clone());
            }
        }
        up.dropped = dropped;
        match rewrite.rules {
            Some(_) => up.set(X_REQUEST_ID, rewrite.request_id.clone()),
            None => up.own.push((X_REQUEST_ID, rewrite.request_id.clone())),
        }
        // Whether the client's Host is known from the lookup above: not looked up again.
        if !rewrite.preserve_host || !up.has_given(&header::HOST, || client_host.is_some()) {
            up.set(header::HOST, upstream.host_header.clone());
        }
        up
    }

    /// Sets one of roundabout's headers, replacing any of its name set before.
    pub fn set(&mut self, name: HeaderName, value: HeaderValue) {
        match self.own.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.own.push((name, value)),
        }
    }

    /// Whether the client's header `name` crosses the proxy.
    fn forwards(&self, name: &HeaderName) -> bool {
        !is_hop_by_hop(name)
            && !is_forwarded_field(name)
            && !self.dropped.contains(name)
            && !self.own.iter().any(|(n, _)| n == name)
    }

    /// Whether the head has `name`, `in_client` telling whether the client's request has it
    /// (asked only when roundabout's own fields do not have it).
    fn has_given(&self, name: &HeaderName, in_client: impl FnOnce() -> bool) -> bool {
        self.own.iter().any(|(n, _)| n == name) || (in_client() && self.forwards(name))
    }

    /// The headers as one map: for what is not forwarded this way (an upgrade).
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.req.headers().len() + self.own.len());
        self.headers(&mut |name, value| map.append(name.clone(), value.clone()));
        map
    }
}

impl ForwardedHead for UpstreamHead {
    fn head(&self) -> &RequestHead {
        &self.head
    }

    fn target(&self) -> &str {
        match &self.target {
            Some(target) => target,
            None => self
                .req
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str()),
        }
    }

    fn headers(&self, f: &mut dyn FnMut(&HeaderName, &HeaderValue)) {
        for (name, value) in self.req.headers().iter() {
            if self.forwards(name) {
                f(name, value);
            }
        }
        for (name, value) in &self.own {
            f(name, value);
        }
    }

    fn has(&self, name: &HeaderName) -> bool {
        self.has_given(name, || self.req.headers().contains_key(name))
    }
}

/// `X-Forwarded-For`: the peer, after what a trusted peer's own `X-Forwarded-For` says.
fn forwarded_for(peer: IpAddr, incoming: &HeaderMap, trusted: &[IpNet]) -> HeaderValue {
    let mut xff = Vec::with_capacity(48);
    if trusted.iter().any(|n| n.contains(&peer)) {
        for v in incoming.get_all(X_FORWARDED_FOR) {
            if let Ok(v) = v.to_str() {
                xff.extend_from_slice(v.as_bytes());
                xff.extend_from_slice(b", ");
            }
        }
    }
    push_ip(&mut xff, peer);
    // Moved into the value, not copied; an address and visible ASCII are always valid.
    HeaderValue::from_maybe_shared(Bytes::from(xff))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// HTTP/2 may split `Cookie` into one field per cookie; an HTTP/1.1 server expects one
/// field, joined with "; " (RFC 9113 §8.2.3). `None` when there are not two or more.
fn joined_cookies(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(header::COOKIE);
    if values.next().is_none() || values.next().is_none() {
        return None;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn sent(head: &UpstreamHead) -> Vec<(String, String)> {
        let mut all = Vec::new();
        head.headers(&mut |n, v| all.push((n.to_string(), v.to_str().unwrap().to_owned())));
        all.sort();
        all
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all: Vec<_> = list
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn the_client_head_goes_on_less_what_does_not_cross_with_ours_on_top() {
        let req = TestRequest::get()
            .uri("/p?q=1")
            .peer_addr("203.0.113.9:4000".parse().unwrap())
            .insert_header(("host", "shop.test"))
            .insert_header(("connection", "keep-alive, X-Secret"))
            .insert_header(("x-secret", "1"))
            .insert_header(("te", "trailers"))
            .insert_header(("x-forwarded-for", "6.6.6.6"))
            .insert_header(("x-request-id", "theirs"))
            .insert_header(("accept", "*/*"))
            .to_http_request();
        let id = HeaderValue::from_static("ours");
        let rewrite = Rewrite {
            peer: Some("203.0.113.9".parse().unwrap()),
            trusted: &[],
            rules: None,
            path: None,
            request_id: &id,
            preserve_host: true,
        };
        let head = UpstreamHead::new(&req, &Upstream::local(9), &rewrite);
        assert_eq!(head.target(), "/p?q=1");
        assert_eq!(head.head().uri.to_string(), "http://127.0.0.1:9/");
        assert_eq!(
            sent(&head),
            pairs(&[
                ("accept", "*/*"),
                ("host", "shop.test"),
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-host", "shop.test"),
                ("x-forwarded-proto", "http"),
                ("x-request-id", "ours"),
            ])
        );
        assert!(head.has(&header::HOST) && !head.has(&header::TE));
        assert_eq!(head.header_map().len(), 6);
    }

    #[test]
    fn a_route_rewrites_the_target_and_its_rules_apply_and_the_host_may_be_the_server() {
        let req = TestRequest::get()
            .uri("/api/p")
            .insert_header(("host", "shop.test"))
            .insert_header(("x-debug", "1"))
            .insert_header(("x-env", "client"))
            .to_http_request();
        let rules = HeaderRules {
            set: vec![(
                HeaderName::from_static("x-env"),
                HeaderValue::from_static("prod"),
            )],
            remove: vec![
                HeaderName::from_static("x-debug"),
                HeaderName::from_static("x-forwarded-host"),
            ],
        };
        let id = HeaderValue::from_static("id");
        let mut rewrite = Rewrite {
            peer: None,
            trusted: &[],
            rules: Some(&rules),
            path: Some("/p"),
            request_id: &id,
            preserve_host: false,
        };
        let head = UpstreamHead::new(&req, &Upstream::local(9), &rewrite);
        assert_eq!(head.target(), "/p");
        assert_eq!(
            sent(&head),
            pairs(&[
                ("host", "127.0.0.1:9"),
                ("x-env", "prod"),
                ("x-forwarded-proto", "http"),
                ("x-request-id", "id"),
            ])
        );
        // A rewrite that is no target (it never is, from a valid one) leaves the client's.
        rewrite.path = Some("/has space");
        let head = UpstreamHead::new(&req, &Upstream::local(9), &rewrite);
        assert_eq!(head.target(), "/api/p");
    }

    #[test]
    fn split_cookies_are_joined_into_one_field() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        assert!(joined_cookies(&h).is_none(), "one is left alone");
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(joined_cookies(&h).unwrap(), "a=1; b=2");
    }
}
