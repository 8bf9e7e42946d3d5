//! Paths and hosts as routes compare them: a path in RFC 3986 §6.2.2's normal form (with
//! runs of `/` merged, as nginx merges them), a prefix matched by whole segments, a host
//! without its port or trailing dot, in lower case. No allocation for what is already
//! normal.

use std::borrow::Cow;

/// The host to match, as bytes: without its port or a trailing dot, in lower case (into
/// `buf`, so no allocation); `None` when it does not fit or is no host at all. Bytes, not a
/// `str`: the table is keyed by bytes, so nothing is validated twice (about 200
/// instructions a request saved over `str` methods, `bench/README.md`).
pub(super) fn normal_host<'b>(host: &[u8], buf: &'b mut [u8; 256]) -> Option<&'b [u8]> {
    let name = if host.first() == Some(&b'[') {
        // An IPv6 literal: up to the bracket; no route names one, but it must not match a
        // suffix by its port.
        &host[..=host.iter().position(|&b| b == b']')?]
    } else {
        // A port is the digits after the last colon.
        let digits = host.iter().rev().take_while(|b| b.is_ascii_digit()).count();
        match host.len().checked_sub(digits + 1) {
            Some(colon) if host[colon] == b':' => &host[..colon],
            _ => host,
        }
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > buf.len() {
        return None;
    }
    let out = &mut buf[..name.len()];
    out.copy_from_slice(name);
    out.make_ascii_lowercase();
    Some(out)
}

/// Whether `path` is `prefix` or under it, by whole segments.
pub(super) fn under_prefix(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// RFC 3986 §6.2.2's normal form of a path, plus merged slashes: percent-encoded unreserved
/// characters decoded (other encodings kept, their hex in upper case), `.` and `..`
/// segments resolved (never above the root), runs of `/` made one. Borrowed when the path
/// is already normal (the usual case).
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    // Decode what may be decoded: %2E becomes a dot that the next step resolves.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        decoded.push('/');
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h << 4 | l;
                if is_unreserved(c) {
                    decoded.push(char::from(c));
                } else {
                    decoded.push('%');
                    decoded.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                    decoded.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                }
                i += 3;
                continue;
            }
        }
        // A valid &str: push the whole character.
        let ch = path[i..].chars().next().expect("in bounds");
        decoded.push(ch);
        i += ch.len_utf8();
    }
    // Segments, with `.` dropped, `..` popping, empty ones (from `//`) dropped.
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing || normal.is_empty() {
        normal.push('/');
    }
    Cow::Owned(normal)
}

/// No `//`, no `.` or `..` segment, no `%`, and a leading `/`: nothing to normalize.
fn is_normal(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    if path.contains(&b'%') {
        return false;
    }
    let mut segments = rest.split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if matches!(segment, b"." | b"..") || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use proptest::{prelude::*, sample::select};

    use super::*;

    #[test]
    fn normal_paths_are_borrowed_and_others_normalized_as_nginx_compares_them() {
        for p in ["/", "/v1", "/v1/", "/v1/users", "/a.b/c..d/...", "/~x-y_z"] {
            assert!(matches!(normalize_path(p), Cow::Borrowed(_)), "{p}");
        }
        let cases = [
            ("//v1/x", "/v1/x"),
            ("/static/../v1/x", "/v1/x"),
            ("/./v1/./x", "/v1/x"),
            ("/v1/x/..", "/v1/"),
            ("/v1/x/.", "/v1/x/"),
            ("/../../v1", "/v1"),
            ("/%76%31/x", "/v1/x"),
            ("/%2e%2e/v1", "/v1"),
            ("/v1%2Fx", "/v1%2Fx"),
            ("/v1%2fx", "/v1%2Fx"),
            ("/a%20b", "/a%20b"),
            ("/v1/%zz", "/v1/%zz"),
            ("/v1/%", "/v1/%"),
            ("v1", "/v1"),
            ("", "/"),
            ("/..", "/"),
        ];
        for (path, want) in cases {
            assert_eq!(normalize_path(path), want, "{path:?}");
        }
    }

    #[test]
    fn a_prefix_matches_whole_segments_only() {
        assert!(under_prefix("/v1", "/v1"));
        assert!(under_prefix("/v1/", "/v1"));
        assert!(under_prefix("/v1/users", "/v1"));
        assert!(!under_prefix("/v10", "/v1"));
        assert!(!under_prefix("/v", "/v1"));
        assert!(under_prefix("/anything", "/"));
        assert!(!under_prefix("/V1", "/v1"), "paths are case-sensitive");
    }

    #[test]
    fn hosts_lose_their_port_trailing_dot_and_case() {
        let mut buf = [0u8; 256];
        let mut host = |h: &str| {
            normal_host(h.as_bytes(), &mut buf).map(|h| String::from_utf8(h.to_vec()).unwrap())
        };
        assert_eq!(
            host("API.Example.com:8443").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(host("api.example.com.").as_deref(), Some("api.example.com"));
        assert_eq!(
            host("api.example.com.:80").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(host("[::1]:8000").as_deref(), Some("[::1]"));
        assert_eq!(host(""), None);
        assert_eq!(host(&"a".repeat(300)), None);
    }

    /// A path segment from the pieces parsers disagree on.
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            select(vec![
                "v1", "v10", "V1", "static", "a.b", "..", ".", "", "%2e", "%2E%2e"
            ])
            .prop_map(str::to_string),
            select(vec!["%76%31", "%2F", "%2f", "x%20y", "%41", "~", "-"]).prop_map(str::to_string),
            "[a-z0-9]{1,4}",
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 0..7).prop_map(|s| format!("/{}", s.join("/")))
    }

    /// The same path resolved segment by segment, the slow and obvious way, with every
    /// unreserved escape decoded first.
    fn reference(path: &str) -> String {
        let mut decoded = String::new();
        let b = path.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Ok(c) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                    if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                        decoded.push(c as char);
                    } else {
                        decoded.push_str(&path[i..i + 3].to_ascii_uppercase());
                    }
                    i += 3;
                    continue;
                }
            }
            decoded.push(b[i] as char);
            i += 1;
        }
        let mut out: Vec<&str> = Vec::new();
        let parts: Vec<&str> = decoded.split('/').collect();
        for s in &parts {
            match *s {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        let trailing = matches!(parts.last(), Some(&"" | &"." | &".."));
        let mut normal: String = out.iter().map(|s| format!("/{s}")).collect();
        if trailing || normal.is_empty() {
            normal.push('/');
        }
        normal
    }

    proptest! {
        #[test]
        fn normalizing_agrees_with_the_reference_and_is_idempotent(p in path()) {
            let once = normalize_path(&p).into_owned();
            prop_assert_eq!(&once, &reference(&p));
            prop_assert_eq!(normalize_path(&once), once.as_str());
            prop_assert!(once.starts_with('/'));
            prop_assert!(!once.contains("//"));
            prop_assert!(!once.split('/').any(|s| s == "." || s == ".."));
        }

        #[test]
        fn a_prefix_matches_exactly_the_paths_whose_segments_start_with_it(
            p in path(),
            prefix in select(vec!["/v1", "/static", "/a.b", "/"]),
        ) {
            let normal = normalize_path(&p);
            let segments = |s: &str| {
                s.split('/').filter(|x| !x.is_empty()).map(str::to_string).collect::<Vec<_>>()
            };
            let (have, want) = (segments(&normal), segments(prefix));
            let expected = have.len() >= want.len() && have[..want.len()] == want[..];
            prop_assert_eq!(under_prefix(&normal, prefix), expected, "{} under {}", normal, prefix);
        }

        #[test]
        fn hosts_compare_without_case_port_or_trailing_dot(
            name in "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9]{0,6}){0,3}",
            upper in proptest::collection::vec(any::<bool>(), 32),
            port in proptest::option::of(1u16..),
            dot in any::<bool>(),
        ) {
            let mut written: String = name
                .chars()
                .zip(upper.iter().cycle())
                .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
                .collect();
            if dot {
                written.push('.');
            }
            if let Some(port) = port {
                written.push_str(&format!(":{port}"));
            }
            let mut buf = [0u8; 256];
            prop_assert_eq!(normal_host(written.as_bytes(), &mut buf), Some(name.as_bytes()));
        }
    }
}
