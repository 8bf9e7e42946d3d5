//! The headers that cross the proxy: what is dropped both ways (hop-by-hop), what is set
//! upstream (`X-Forwarded-*`), who the client is (trusted proxies); the fields roundabout
//! adds to the answer are [`own_fields`](mod@super::own_fields)'s. Pure functions over
//! header maps; nothing here chooses a server or does I/O.

use std::net::IpAddr;

use actix_web::{
    http::{
        header::{self, HeaderMap, HeaderName, HeaderValue},
        uri::{PathAndQuery, Uri},
    },
    HttpRequest,
};
use ipnet::IpNet;
use rand::{rngs::SmallRng, RngCore, SeedableRng};

use crate::{config::HashOn, strategy::maglev::hash_key as hash_key_of, upstream::Upstream};

/// Headers that describe one connection, not the message; never forwarded (RFC 9110 §7.6.1).
/// `Expect` is among them because it is answered here (actix sends the 100 Continue).
/// `Host` is copied, and replaced by the server's authority when `preserve_host = false`.
/// A `static`, not a `const`: a `const` of names is built and dropped again at every use.
pub static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::EXPECT,
];

/// Whether `name` is one of [`HOP_BY_HOP`]. Asked of every header both ways: the length
/// first (one compare rules out most names), then the one or two names of that length.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    match name.as_str().len() {
        2 => *name == header::TE,
        6 => *name == header::EXPECT,
        7 => *name == header::TRAILER || *name == header::UPGRADE,
        10 => *name == header::CONNECTION || *name == HOP_BY_HOP[1],
        16 => *name == HOP_BY_HOP[2],
        17 => *name == header::TRANSFER_ENCODING,
        18 => *name == header::PROXY_AUTHENTICATE,
        19 => *name == header::PROXY_AUTHORIZATION,
        _ => false,
    }
}

/// Whether `name` is an `X-Forwarded-*` roundabout sets (a client's is never passed on).
pub fn is_forwarded_field(name: &HeaderName) -> bool {
    matches!(name.as_str().len(), 15..=17)
        && (*name == X_FORWARDED_FOR || *name == X_FORWARDED_HOST || *name == X_FORWARDED_PROTO)
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The upstream URI: the server's scheme and authority, the client's path and query (or
/// `path`, the route's rewrite of them).
pub fn upstream_uri(req: &HttpRequest, upstream: &Upstream, path: Option<&str>) -> Uri {
    let mut parts = actix_web::http::uri::Parts::default();
    parts.scheme = Some(upstream.scheme.clone());
    parts.authority = Some(upstream.authority.clone());
    let rewritten = path.and_then(|p| PathAndQuery::try_from(p).ok());
    parts.path_and_query = Some(rewritten.unwrap_or_else(|| {
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    }));
    Uri::from_parts(parts).expect("scheme, authority and path make a URI")
}

/// The request id header: passed on, or set (SPEC, "X-Request-Id").
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client request id passed on.
const MAX_REQUEST_ID: usize = 200;

/// The request's id: the client's `X-Request-Id` when it is 1 to 200 visible ASCII
/// characters, else a new random one (128 bits, hex).
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(X_REQUEST_ID) {
        let bytes = id.as_bytes();
        if (1..=MAX_REQUEST_ID).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic) {
            return id.clone();
        }
    }
    let mut hex = [0u8; 32];
    for (out, word) in hex.chunks_exact_mut(8).zip(random_words()) {
        out.copy_from_slice(&hex_digits(word).to_le_bytes());
    }
    // SAFETY: `hex_digits` gives only `0-9a-f`, each a valid header value byte.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes::Bytes::copy_from_slice(&hex)) }
}

thread_local! {
    /// Request ids only have to be unique, not unguessable: a fast generator per thread,
    /// seeded from the OS's entropy, where `rand::random` ran ChaCha12 (~150 instructions a
    /// request of the ~400 an id cost).
    static IDS: std::cell::RefCell<SmallRng> = std::cell::RefCell::new(SmallRng::from_os_rng());
}

/// Four random 32-bit words.
fn random_words() -> [u32; 4] {
    let (a, b) = IDS.with(|rng| {
        let mut rng = rng.borrow_mut();
        (rng.next_u64(), rng.next_u64())
    });
    [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32]
}

/// The eight hex digits of `word`'s nibbles, one per byte (least significant first),
/// without a loop: each nibble is spread to a byte of its own, and `a-f` are the ones that
/// carry into bit 4 when 6 is added.
fn hex_digits(word: u32) -> u64 {
    let x = u64::from(word);
    let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    let x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    x + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64
}

/// The protocol a request asks to upgrade to, when it is an upgrade roundabout tunnels:
/// `Connection: upgrade` with an `Upgrade` token and no body. actix-http reads the rest of
/// such a connection as the request's payload (vendor/actix-http/VENDORED.md): the tunnel's
/// client side. An upgrade request with a body is forwarded as an ordinary request.
pub fn upgrade_of(req: &HttpRequest) -> Option<&HeaderValue> {
    let headers = req.headers();
    if !req.head().upgrade()
        || headers.contains_key(header::CONTENT_LENGTH)
        || headers.contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    headers
        .get(header::UPGRADE)
        .filter(|v| !v.as_bytes().trim_ascii().is_empty())
}

/// Removes a message's hop-by-hop headers in place: [`HOP_BY_HOP`] and every header its
/// `Connection` names. One pass over the map; nothing is copied.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = connection_named(headers);
    headers.retain(|name, _| !is_hop_by_hop(name) && !named.contains(name));
}

/// Moves a response's end-to-end headers from `from` (the server's answer) into `to` (the
/// client's), leaving out what [`strip_hop_by_hop`] drops and `Content-Length`, whose value
/// is returned (actix writes the framing headers from the body's size). Names and values
/// are moved, not copied; into an empty `to` the server's table itself moves, which the
/// vendored decoder made with room for the few headers roundabout adds.
pub fn move_end_to_end(from: &mut HeaderMap, to: &mut HeaderMap) -> Option<HeaderValue> {
    let named = connection_named(from);
    let length = from.get(header::CONTENT_LENGTH).cloned();
    to.move_from(from, |name| {
        *name != header::CONTENT_LENGTH && !is_hop_by_hop(name) && !named.contains(name)
    });
    length
}

/// The header fields a message's `Connection` names (RFC 9110 §7.6.1): hop-by-hop too.
/// Empty, and allocating nothing, for a message without such options (nearly all).
pub fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    // Asked first: the map answers for a name it lacks from a bit, where the walk below
    // builds its chain of iterators either way (~100 instructions a message).
    if !headers.contains_key(header::CONNECTION) {
        return Vec::new();
    }
    connection_options(headers)
        .filter(|t| names_a_field(t))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

/// The options a message's `Connection` fields list (those that are text), trimmed.
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A `Connection` option that names a header field, not only the connection's fate.
fn names_a_field(option: &str) -> bool {
    !option.eq_ignore_ascii_case("keep-alive") && !option.eq_ignore_ascii_case("close")
}

/// The client IP per the SPEC: the TCP peer, or, when the peer is a trusted proxy, the
/// rightmost `X-Forwarded-For` address that is not itself trusted (the leftmost when all
/// are). A malformed `X-Forwarded-For` from a trusted peer gives the peer.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut leftmost = None;
    for value in headers.get_all(X_FORWARDED_FOR).rev() {
        let Ok(value) = value.to_str() else {
            return peer;
        };
        for entry in value.rsplit(',') {
            let Some(ip) = parse_forwarded_ip(entry.trim()) else {
                return peer;
            };
            if !is_trusted(&ip) {
                return ip;
            }
            leftmost = Some(ip);
        }
    }
    leftmost.unwrap_or(peer)
}

/// An `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]` or `[::1]:80`.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']')?;
        if tail.is_empty()
            || tail
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok())
        {
            return ip.parse().ok();
        }
        return None;
    }
    s.parse::<std::net::SocketAddrV4>()
        .ok()
        .map(|a| IpAddr::V4(*a.ip()))
}

/// The value of the cookie `name` in the request's `Cookie` fields (HTTP/2 may send
/// several), if it has one.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (n, value) = pair.trim().split_once('=')?;
            (n == name).then_some(value)
        })
}

/// The hash of the part of `req` that `on` names, for `consistent_hash`; `None` when the
/// request has no such part (no such header, cookie or query parameter).
pub fn hash_key(req: &HttpRequest, on: &HashOn, client: Option<IpAddr>) -> Option<u64> {
    let bytes: &[u8] = match on {
        HashOn::ClientIp => {
            return client.map(|ip| match ip.to_canonical() {
                IpAddr::V4(v4) => hash_key_of(&v4.octets()),
                IpAddr::V6(v6) => hash_key_of(&v6.octets()),
            })
        }
        HashOn::Header(name) => req.headers().get(name)?.as_bytes(),
        HashOn::Cookie(name) => cookie(req.headers(), name)?.as_bytes(),
        HashOn::Query(name) => req
            .uri()
            .query()?
            .split('&')
            .find_map(|pair| match pair.split_once('=') {
                Some((n, v)) if n == name => Some(v),
                None if pair == name => Some(""),
                _ => None,
            })?
            .as_bytes(),
        HashOn::Path => req.uri().path().as_bytes(),
    };
    Some(hash_key_of(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            client_ip(peer, &headers(&["1.1.1.1"]), &nets(&["10.0.0.0/8"])),
            peer
        );
    }

    #[test]
    fn a_trusted_peer_gives_the_rightmost_untrusted_address() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let all_trusted = headers(&["10.1.1.1, 10.2.2.2"]);
        assert_eq!(
            client_ip(peer, &all_trusted, &trusted),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
        let v6 = headers(&["[2001:db8::1]:443"]);
        assert_eq!(
            client_ip(peer, &v6, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_malformed_forwarded_for_from_a_trusted_peer_gives_the_peer() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(peer, &headers(&["not-an-ip"]), &trusted), peer);
        assert_eq!(client_ip(peer, &headers(&[]), &trusted), peer);
    }

    #[test]
    fn hex_digits_are_each_nibble_in_lower_case() {
        assert_eq!(&hex_digits(0x0123_4567).to_le_bytes(), b"76543210");
        assert_eq!(&hex_digits(0x89ab_cdef).to_le_bytes(), b"fedcba98");
        for word in [0, u32::MAX, 0xdead_beef, 0x1a2b_3c4d] {
            let mut expected: Vec<u8> = format!("{word:08x}").into_bytes();
            expected.reverse();
            assert_eq!(
                hex_digits(word).to_le_bytes().to_vec(),
                expected,
                "{word:#x}"
            );
        }
    }

    #[test]
    fn a_new_request_id_is_32_lower_case_hex_digits_and_differs_each_time() {
        let ids: std::collections::HashSet<_> =
            (0..1000).map(|_| request_id(&HeaderMap::new())).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)));
        }
        // Every digit turns up in every place (1000 ids: a missing one is a bug, not luck).
        for place in 0..32 {
            let seen: std::collections::HashSet<u8> =
                ids.iter().map(|id| id.as_bytes()[place]).collect();
            assert_eq!(seen.len(), 16, "place {place}");
        }
    }

    #[test]
    fn a_client_request_id_is_kept_only_when_it_is_short_visible_ascii() {
        let mut h = HeaderMap::new();
        let fresh = request_id(&h);
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&h), "random");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        for bad in ["has space", &"x".repeat(201)] {
            h.insert(X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            assert_eq!(request_id(&h).len(), 32, "{bad:?} replaced");
        }
    }

    /// A server's headers with some that do not cross: `Connection` naming `X-Secret`,
    /// `X-Secret`, `Transfer-Encoding`; and two `Set-Cookie`s, which do.
    fn with_hop_by_hop() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        h.insert(
            HeaderName::from_static("x-secret"),
            HeaderValue::from_static("1"),
        );
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        h
    }

    #[test]
    fn stripping_in_place_drops_what_the_rule_drops() {
        let mut h = with_hop_by_hop();
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["set-cookie"]);
        assert_eq!(h.get_all(header::SET_COOKIE).count(), 2);
    }

    #[test]
    fn moving_end_to_end_headers_drops_what_stripping_drops_and_keeps_repeats() {
        let mut from = with_hop_by_hop();
        from.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        from.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let mut to = HeaderMap::with_capacity(12);
        to.insert(header::SERVER, HeaderValue::from_static("kept"));
        let length = move_end_to_end(&mut from, &mut to);
        assert_eq!(length.unwrap(), "12");
        assert!(from.is_empty());
        let mut all: Vec<(&str, &str)> = to
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        all.sort();
        assert_eq!(
            all,
            [
                ("content-type", "text/plain"),
                ("server", "kept"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
            ]
        );
    }

    #[test]
    fn hop_by_hop_by_length_is_the_list() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "host",
            "accept",
            "keep-alivf",
            "content-length",
            "x-forwarded-for",
            "proxy-connectioN",
            "set-cookie",
            "upgrade-insecure-requests",
        ] {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(is_hop_by_hop(&name), HOP_BY_HOP.contains(&name), "{name}");
        }
        for (name, is) in [
            ("x-forwarded-for", true),
            ("x-forwarded-host", true),
            ("x-forwarded-proto", true),
            ("x-forwarded-port", false),
            ("x-request-id", false),
        ] {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(is_forwarded_field(&name), is, "{name}");
        }
    }
}
