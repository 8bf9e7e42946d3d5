//! Phase **respond**, its last step: the fields roundabout adds to every answer, the
//! request's `X-Request-Id` and the limiter's count (SPEC; draft-ietf-httpapi-ratelimit-headers),
//! then the route's response rules. Written as wire bytes after the server's fields; nothing
//! here chooses a server or does I/O.

use actix_http::ResponseHead;
use actix_web::{
    http::header::{HeaderName, HeaderValue},
    HttpResponse,
};

use super::headers::X_REQUEST_ID;
use crate::{config::HeaderRules, digits::push_u64, rate_limit::Decision};

const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The limiter's count for the answer's fields (SPEC; draft-ietf-httpapi-ratelimit-headers).
pub struct LimitFields<'a> {
    pub decision: &'a Decision,
    /// The budget's `RateLimit-Policy`.
    pub policy: Option<&'a HeaderValue>,
    /// The budget's name in `RateLimit` (`default`, or a route's).
    pub budget: &'a str,
}

/// The fields roundabout adds to every answer: `X-Request-Id` and, when the limiter counted
/// the request, its five; each replaces any field of its name the server sent. They are
/// written as wire bytes after the map's fields (the vendored actix-http's
/// `ResponseHead::raw_fields_mut`, which HTTP/2 reads back into fields): no name is hashed
/// and no value made, where inserting six fields into the map cost ~2k instructions a
/// request. A route whose response rules name one of them gets them in the map, where
/// the rules see them; then the rules apply.
pub fn own_fields(
    res: &mut HttpResponse,
    request_id: &HeaderValue,
    limit: Option<LimitFields<'_>>,
    rules: Option<&HeaderRules>,
) {
    let limited = limit.is_some();
    if !res.headers().is_empty() {
        if limited {
            res.headers_mut()
                .retain(|name, _| !is_own_field(name, true));
        } else {
            // One name: looked up, rather than every bucket of the table visited.
            res.headers_mut().remove(X_REQUEST_ID);
        }
    }
    let out = res.head_mut().raw_fields_mut();
    let start = out.len();
    field(out, b"x-request-id: ", request_id.as_bytes());
    if let Some(LimitFields {
        decision: d,
        policy,
        budget,
    }) = limit
    {
        let mut digits = itoa::Buffer::new();
        field(
            out,
            b"x-ratelimit-limit: ",
            digits.format(d.limit).as_bytes(),
        );
        field(
            out,
            b"x-ratelimit-remaining: ",
            digits.format(d.remaining).as_bytes(),
        );
        field(
            out,
            b"x-ratelimit-reset: ",
            digits.format(d.reset_secs).as_bytes(),
        );
        if let Some(policy) = policy {
            field(out, b"ratelimit-policy: ", policy.as_bytes());
        }
        // A budget's name is a route's (visible ASCII, checked with the route) or `default`.
        out.extend_from_slice(b"ratelimit: \"");
        out.extend_from_slice(budget.as_bytes());
        out.extend_from_slice(b"\";r=");
        push_u64(out, d.remaining);
        out.extend_from_slice(b";t=");
        push_u64(out, d.reset_secs);
        out.extend_from_slice(b"\r\n");
    }
    let Some(rules) = rules else {
        return;
    };
    let names_ours = |n: &HeaderName| is_own_field(n, limited);
    if rules.remove.iter().any(names_ours) || rules.set.iter().any(|(n, _)| names_ours(n)) {
        let raw = out.split_off(start);
        for (name, value) in ResponseHead::fields_of(&raw) {
            res.headers_mut().insert(name, value);
        }
    }
    rules.apply(res.headers_mut());
}

/// Whether `name` is one of the fields [`own_fields`] writes (the limiter's only when
/// `limited`): by length first, as [`is_hop_by_hop`](super::headers::is_hop_by_hop).
fn is_own_field(name: &HeaderName, limited: bool) -> bool {
    match name.as_str().len() {
        12 => *name == X_REQUEST_ID,
        9 => limited && *name == RATELIMIT,
        16 => limited && *name == RATELIMIT_POLICY,
        17 => limited && (*name == X_RATELIMIT_LIMIT || *name == X_RATELIMIT_RESET),
        21 => limited && *name == X_RATELIMIT_REMAINING,
        _ => false,
    }
}

/// `name: value\r\n`, given `name: ` (a constant: a copy of known size, where a
/// `HeaderName`'s was a call to `memcpy`).
#[inline(always)]
fn field<const N: usize>(out: &mut Vec<u8>, name: &[u8; N], value: &[u8]) {
    out.reserve(N + value.len() + 2);
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use actix_web::http::header;

    use super::*;

    fn wire(res: &HttpResponse) -> String {
        String::from_utf8(res.head().raw_fields().to_vec()).unwrap()
    }

    #[test]
    fn own_fields_go_on_the_wire_and_replace_the_server_s() {
        let id = HeaderValue::from_static("abc");
        let d = Decision {
            allowed: true,
            limit: 1 << 40,
            remaining: 9,
            reset_secs: 60,
            resets_in: std::time::Duration::from_secs(60),
        };
        let policy = HeaderValue::from_static("\"default\";q=100;w=60");
        let mut res = HttpResponse::Ok().finish();
        res.headers_mut()
            .insert(X_REQUEST_ID, HeaderValue::from_static("server's"));
        res.headers_mut()
            .insert(X_RATELIMIT_LIMIT, HeaderValue::from_static("5"));
        res.headers_mut()
            .insert(header::SERVER, HeaderValue::from_static("kept"));
        own_fields(
            &mut res,
            &id,
            Some(LimitFields {
                decision: &d,
                policy: Some(&policy),
                budget: "default",
            }),
            None,
        );
        assert_eq!(
            wire(&res),
            "x-request-id: abc\r\nx-ratelimit-limit: 1099511627776\r\n\
             x-ratelimit-remaining: 9\r\nx-ratelimit-reset: 60\r\n\
             ratelimit-policy: \"default\";q=100;w=60\r\nratelimit: \"default\";r=9;t=60\r\n"
        );
        let names: Vec<&str> = res.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["server"]);

        // Not counted: the server's rate-limit fields pass, the request id is ours.
        let mut res = HttpResponse::Ok().finish();
        res.headers_mut()
            .insert(X_RATELIMIT_LIMIT, HeaderValue::from_static("5"));
        own_fields(&mut res, &id, None, None);
        assert_eq!(wire(&res), "x-request-id: abc\r\n");
        assert_eq!(res.headers().get(X_RATELIMIT_LIMIT).unwrap(), "5");
    }

    #[test]
    fn response_rules_that_name_an_own_field_see_it_in_the_map() {
        let id = HeaderValue::from_static("abc");
        let plain = HeaderRules {
            set: vec![(header::SERVER, HeaderValue::from_static("ours"))],
            remove: vec![],
        };
        let mut res = HttpResponse::Ok().finish();
        own_fields(&mut res, &id, None, Some(&plain));
        assert_eq!(wire(&res), "x-request-id: abc\r\n");
        assert_eq!(res.headers().get(header::SERVER).unwrap(), "ours");

        let removes_id = HeaderRules {
            set: vec![],
            remove: vec![X_REQUEST_ID],
        };
        let mut res = HttpResponse::Ok().finish();
        own_fields(&mut res, &id, None, Some(&removes_id));
        assert_eq!(wire(&res), "");
        assert!(res.headers().is_empty());

        let sets_id = HeaderRules {
            set: vec![(X_REQUEST_ID, HeaderValue::from_static("fixed"))],
            remove: vec![],
        };
        let mut res = HttpResponse::Ok().finish();
        own_fields(&mut res, &id, None, Some(&sets_id));
        assert_eq!(wire(&res), "");
        assert_eq!(res.headers().get(X_REQUEST_ID).unwrap(), "fixed");
    }

    #[test]
    fn the_wire_names_are_the_field_names() {
        let d = Decision {
            allowed: true,
            limit: 1,
            remaining: 0,
            reset_secs: 1,
            resets_in: std::time::Duration::from_secs(1),
        };
        let policy = HeaderValue::from_static("p");
        let mut res = HttpResponse::Ok().finish();
        let limit = LimitFields {
            decision: &d,
            policy: Some(&policy),
            budget: "b",
        };
        own_fields(&mut res, &HeaderValue::from_static("i"), Some(limit), None);
        let names: Vec<HeaderName> = ResponseHead::fields_of(res.head().raw_fields())
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            names,
            [
                X_REQUEST_ID,
                X_RATELIMIT_LIMIT,
                X_RATELIMIT_REMAINING,
                X_RATELIMIT_RESET,
                RATELIMIT_POLICY,
                RATELIMIT
            ]
        );
    }

    #[test]
    fn own_field_names_by_length_are_the_six() {
        for name in [
            &X_REQUEST_ID,
            &X_RATELIMIT_LIMIT,
            &X_RATELIMIT_REMAINING,
            &X_RATELIMIT_RESET,
            &RATELIMIT_POLICY,
            &RATELIMIT,
        ] {
            assert!(is_own_field(name, true), "{name}");
            assert_eq!(is_own_field(name, false), *name == X_REQUEST_ID, "{name}");
        }
        for name in ["x-request-ie", "ratelimiu", "x-ratelimit-limiu", "server"] {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(!is_own_field(&name, true), "{name}");
        }
    }
}
