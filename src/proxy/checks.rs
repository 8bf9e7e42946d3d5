//! What is refused before any server is chosen: whatever actix-http lets through that a
//! strict intermediary must not pass on, because the next parser could read it another way
//! (RFC 9112 §3.2, §6.3; RFC 9110 §7.2, §9.1). Pure functions of the request head; nothing
//! here forwards, counts or logs.

use actix_web::{
    http::{
        header::{self, HeaderName},
        Method, Version,
    },
    HttpRequest,
};

use super::error::ProxyError;
use crate::config::ProxySection;

/// The largest request head forwarded (request line and header fields, counted as sent);
/// past it, 431. actix-http itself only stops at 128 KiB of unparsed head; nginx's default
/// is 8 KiB a line, 32 KiB in all.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The longest method token forwarded; the longest registered one has 17 bytes.
const MAX_METHOD_LEN: usize = 32;

const SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");

/// How the request body is framed, once the framing is known to be unambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Every check made before a request is forwarded; the framing when all pass.
///
/// actix-http has already refused a bad request line, bytes outside a header's grammar, a
/// second Host, a missing Host in HTTP/1.1 and the framing errors `check_framing` lists.
/// What it accepts and we do not forward: a method that is not an upper-case token (or is
/// CONNECT: we open no tunnels), `*` outside OPTIONS, an absolute-form target whose
/// authority is not the Host, a Host that is not `host[:port]`, a backslash or an encoded
/// NUL, CR or LF in the path, a head over [`MAX_HEAD_BYTES`], two Content-Types, header
/// names that a CGI-style server reads as Content-Length or Transfer-Encoding, an
/// expectation other than 100-continue, and a WebSocket handshake that cannot be valid.
pub fn check_request(req: &HttpRequest, proxy: &ProxySection) -> Result<Framing, ProxyError> {
    let method = req.method();
    if *method == Method::CONNECT {
        return Err(ProxyError::NotImplemented("CONNECT"));
    }
    let m = method.as_str();
    if m.len() > MAX_METHOD_LEN
        || !m
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Err(ProxyError::BadRequest("invalid method"));
    }

    let headers = req.headers();
    let uri = req.uri();
    let path = uri.path();
    if path == "*" && *method != Method::OPTIONS {
        return Err(ProxyError::BadRequest("'*' is only a target for OPTIONS"));
    }
    if !clean_path(path.as_bytes()) {
        return Err(ProxyError::BadRequest("invalid path"));
    }

    // actix-http refuses a second Host and, in HTTP/1.1, a missing one.
    let host = headers.get(header::HOST);
    if let Some(host) = host {
        if !valid_host(host.as_bytes()) {
            return Err(ProxyError::BadRequest("invalid Host"));
        }
    }
    // Absolute form: the target's authority is the host (RFC 9112 §3.2.2); one that the
    // Host field contradicts would reach the server as the other. (No Host: HTTP/1.0.)
    if let Some(authority) = uri.authority() {
        let same = host.is_none_or(|h| {
            h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        });
        if !same || !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(ProxyError::BadRequest("target and Host disagree"));
        }
    }

    // One pass over the headers: the head's size, and what the checks below look for
    // (looked up only when it is there: most requests have none of it).
    let mut head = m.len() + uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    let (mut types, mut unmet_expect, mut upgrade) = (0u32, false, false);
    let (mut has_length, mut chunked) = (false, false);
    for (name, value) in headers {
        head += name.as_str().len() + value.len() + 4;
        if *name == header::CONTENT_TYPE {
            types += 1;
        } else if *name == header::EXPECT {
            // actix-http answers 100-continue itself; anything else we cannot meet (RFC
            // 9110 §10.1.1).
            unmet_expect |= !value
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        } else if *name == header::UPGRADE {
            upgrade = true;
        } else if *name == header::CONTENT_LENGTH {
            has_length = true;
        } else if *name == header::TRANSFER_ENCODING {
            chunked = true;
        } else if matches!(name.as_str(), "content_length" | "transfer_encoding") {
            return Err(ProxyError::BadRequest("framing header name with '_'"));
        }
    }
    if head > MAX_HEAD_BYTES {
        return Err(ProxyError::HeadTooLarge);
    }
    if types > 1 {
        return Err(ProxyError::BadRequest("more than one Content-Type"));
    }
    if unmet_expect {
        return Err(ProxyError::ExpectationFailed);
    }

    let framing = check_framing(req, proxy, has_length, chunked)?;
    if let Some(upgrade) = headers.get(header::UPGRADE).filter(|_| upgrade) {
        // actix-http reads everything after a WebSocket handshake as its body, whatever the
        // framing says; and no server accepts a version other than 13 (RFC 6455 §4.4).
        let websocket = upgrade
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
        if websocket
            && (framing != Framing::None
                || headers
                    .get(SEC_WEBSOCKET_VERSION)
                    .is_some_and(|v| v.as_bytes() != b"13"))
        {
            return Err(ProxyError::BadRequest("invalid WebSocket handshake"));
        }
    }
    Ok(framing)
}

/// True for a Host value of the form `host[:port]` (RFC 9110 §7.2): a reg-name of letters,
/// digits, `-`, `.`, `_`, `~`, or a bracketed IPv6 literal; a port of 1 to 5 digits. No
/// user info, no path, no list, no empty value.
fn valid_host(value: &[u8]) -> bool {
    let (name_ok, port) = match value.strip_prefix(b"[") {
        Some(rest) => match rest.iter().position(|&b| b == b']') {
            Some(end) => (
                end > 0
                    && rest[..end]
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
                &rest[end + 1..],
            ),
            None => return false,
        },
        None => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            (
                end > 0
                    && value[..end].iter().all(|&b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
                    }),
                &value[end..],
            )
        }
    };
    name_ok
        && (port.is_empty()
            || port
                .strip_prefix(b":")
                .is_some_and(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit)))
}

/// False for a path some servers would read otherwise: a backslash (a separator on
/// Windows), or a percent-encoded NUL, CR or LF (truncation, header injection).
fn clean_path(path: &[u8]) -> bool {
    !path.iter().enumerate().any(|(i, &b)| {
        b == b'\\'
            || (b == b'%'
                && matches!(
                    path.get(i + 1..i + 3),
                    Some(b"00" | b"0a" | b"0A" | b"0d" | b"0D")
                ))
    })
}

/// Refuses what could be read two ways, and bodies known to be too large.
///
/// actix-http already refuses CL + TE, two Content-Length lines, a non-chunked TE and TE in
/// HTTP/1.0 before a handler runs; these checks stay as the proxy's own guarantee.
fn check_framing(
    req: &HttpRequest,
    proxy: &ProxySection,
    has_length: bool,
    chunked: bool,
) -> Result<Framing, ProxyError> {
    let headers = req.headers();
    // Looked up only when the pass over the headers saw one.
    let mut lengths = if has_length {
        headers.get_all(header::CONTENT_LENGTH)
    } else {
        [].iter()
    };
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(one), None) => Some(
            one.to_str()
                .ok()
                // 1*DIGIT, and no leading zero: "007" is read as octal by some parsers.
                .filter(|s| {
                    s.bytes().all(|b| b.is_ascii_digit())
                        && !s.is_empty()
                        && (s.len() == 1 || !s.starts_with('0'))
                })
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(ProxyError::BadRequest("invalid Content-Length"))?,
        ),
        (Some(_), Some(_)) => return Err(ProxyError::BadRequest("more than one Content-Length")),
    };
    if chunked && length.is_some() {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let max = proxy.max_body_bytes;
    match length {
        Some(n) if max > 0 && n > max => Err(ProxyError::TooLarge(max)),
        Some(0) => Ok(Framing::None),
        Some(n) => Ok(Framing::Length(n)),
        None if chunked => Ok(Framing::Chunked),
        // HTTP/2 frames the body itself; a missing length says nothing (RFC 9113 §8.1). The
        // body goes upstream chunked; one that has already ended (a GET's stream ends with
        // its head) awc sends as no body at all.
        None if req.version() == Version::HTTP_2 => Ok(Framing::Chunked),
        None => Ok(Framing::None),
    }
}
