//! How an access-log line reads: nginx's `combined` fields followed by the upstream, its
//! time, the whole time and the request id (the default), or one JSON object per line, as
//! Traefik and Envoy users feed to their log stacks. Pure functions into a byte buffer;
//! nothing here writes or waits.
//!
//! `combined`:
//!
//! ```text
//! 10.0.0.7 - - [26/Nov/2026:06:28:41 +0000] "GET /a?b=1 HTTP/1.1" 200 512 "-" "curl/8.1" 127.0.0.1:5001 0.002 0.003 4f1c...e2
//! ```
//!
//! A body the server ended early adds a last field, `upstream_failed="<why>"`.

use std::{
    io::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use actix_web::http::{header::HeaderValue, Version};
use serde::Serialize;

use super::Line;
use crate::config::AccessLogFormat;
use crate::digits::{push_ip, push_u64};

/// Appends `line` to `out` in `format`, with its newline.
pub fn write(format: AccessLogFormat, line: &Line, out: &mut Vec<u8>) {
    match format {
        AccessLogFormat::Combined => combined(line, out),
        AccessLogFormat::Json => json(line, out),
    }
    out.push(b'\n');
}

fn combined(l: &Line, out: &mut Vec<u8>) {
    match l.client {
        Some(ip) => push_ip(out, ip),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" - - [");
    time_local(l.time, out);
    out.extend_from_slice(b"] \"");
    match &l.request {
        Some((method, uri, version)) => {
            // A method is a token (`http::Method` takes nothing else): nothing to escape.
            out.extend_from_slice(method.as_str().as_bytes());
            out.push(b' ');
            // The target as nginx's `$request` shows it: path and query (an HTTP/2
            // request's `:authority` and scheme are not part of it).
            escaped(target(uri).as_bytes(), out);
            out.push(b' ');
            out.extend_from_slice(protocol(*version).as_bytes());
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b"\" ");
    status(l.status, out);
    out.push(b' ');
    push_u64(out, l.bytes);
    out.push(b' ');
    quoted(l.referer.as_ref(), out);
    out.push(b' ');
    quoted(l.user_agent.as_ref(), out);
    out.push(b' ');
    out.extend_from_slice(l.upstream.as_deref().unwrap_or("-").as_bytes());
    out.push(b' ');
    match l.upstream_time {
        Some(t) => seconds(t, out),
        None => out.push(b'-'),
    }
    out.push(b' ');
    seconds(l.request_time, out);
    out.push(b' ');
    match &l.request_id {
        Some(id) => escaped(id.as_bytes(), out),
        None => out.push(b'-'),
    }
    if let Some(why) = l.failure {
        let _ = write!(out, " upstream_failed=\"{why}\"");
    }
}

/// The JSON form: every field named, `null` where there is nothing.
#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    client: Option<String>,
    method: Option<&'a str>,
    uri: Option<String>,
    protocol: Option<&'static str>,
    status: u16,
    bytes: u64,
    referer: Option<String>,
    user_agent: Option<String>,
    pool: Option<&'a str>,
    route: Option<&'a str>,
    upstream: Option<&'a str>,
    upstream_time: Option<f64>,
    request_time: f64,
    request_id: Option<String>,
    upstream_failed: Option<&'a str>,
}

fn json(l: &Line, out: &mut Vec<u8>) {
    let text = |v: &Option<HeaderValue>| {
        v.as_ref()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let line = JsonLine {
        time: humantime::format_rfc3339_millis(l.time).to_string(),
        client: l.client.map(|ip| ip.to_string()),
        method: l.request.as_ref().map(|(m, _, _)| m.as_str()),
        uri: l.request.as_ref().map(|(_, u, _)| target(u).to_string()),
        protocol: l.request.as_ref().map(|(_, _, v)| protocol(*v)),
        status: l.status,
        bytes: l.bytes,
        referer: text(&l.referer),
        user_agent: text(&l.user_agent),
        pool: l.pool.as_deref(),
        route: l.route.as_deref(),
        upstream: l.upstream.as_deref(),
        upstream_time: l.upstream_time.map(|t| t.as_secs_f64()),
        request_time: l.request_time.as_secs_f64(),
        request_id: text(&l.request_id),
        upstream_failed: l.failure,
    };
    // Serializing plain fields into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
}

/// A request's target in origin form: `/path?query`.
fn target(uri: &actix_web::http::Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

/// `"value"`, or `"-"` when there is none.
fn quoted(value: Option<&HeaderValue>, out: &mut Vec<u8>) {
    out.push(b'"');
    match value {
        Some(v) => escaped(v.as_bytes(), out),
        None => out.push(b'-'),
    }
    out.push(b'"');
}

/// Bytes as nginx writes a variable in a log line: `"`, `\` and anything but printable
/// ASCII as `\xHH`, so a client cannot forge a field or a line.
fn escaped(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut rest = bytes;
    loop {
        // Runs of plain bytes copied whole: a byte at a time cost ~1k instructions a line.
        let plain = plain_run(rest);
        out.extend_from_slice(&rest[..plain]);
        let Some(&b) = rest.get(plain) else {
            return;
        };
        out.extend_from_slice(&[
            b'\\',
            b'x',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 15)],
        ]);
        rest = &rest[plain + 1..];
    }
}

/// Whether `b` is written as it is by [`escaped`].
fn is_plain(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'
}

/// The length of the run of plain bytes `bytes` starts with, looked at eight at a time
/// (a request id, a user agent: the fields are tens of bytes, nearly always all plain).
fn plain_run(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Exact as a whole word's yes or no: whether any byte of `v` is below `n` (n <= 0x80).
    let any_below = |v: u64, n: u64| v.wrapping_sub(ONES * n) & !v & HIGH != 0;
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in words.by_ref() {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        if x & HIGH != 0
            || any_below(x, 0x20)
            || any_below(x ^ (ONES * u64::from(b'"')), 1)
            || any_below(x ^ (ONES * u64::from(b'\\')), 1)
            || any_below(x ^ (ONES * 0x7f), 1)
        {
            break;
        }
        at += 8;
    }
    at + bytes[at..].iter().take_while(|&&b| is_plain(b)).count()
}

/// A status: three digits (any other number as it is).
fn status(status: u16, out: &mut Vec<u8>) {
    if (100..1000).contains(&status) {
        out.extend_from_slice(&[
            b'0' + (status / 100) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ]);
    } else {
        push_u64(out, u64::from(status));
    }
}

/// Seconds with millisecond resolution, as nginx's `$request_time`.
fn seconds(d: Duration, out: &mut Vec<u8>) {
    let ms = d.as_millis() as u64;
    let (secs, ms) = (ms / 1000, (ms % 1000) as u16);
    let fraction = [
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
    ];
    // Nearly always under ten seconds: one copy of a fixed size.
    if secs < 10 {
        let [dot, a, b, c] = fraction;
        out.extend_from_slice(&[b'0' + secs as u8, dot, a, b, c]);
    } else {
        push_u64(out, secs);
        out.extend_from_slice(&fraction);
    }
}

/// A request's protocol as the request line names it (`Version`'s `Debug`, without the
/// formatter).
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "-",
    }
}

/// nginx's `$time_local`, in UTC: `26/Nov/2026:06:28:41 +0000`. Made once a second: the
/// writer formats many lines in each.
fn time_local(t: SystemTime, out: &mut Vec<u8>) {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, Vec<u8>)> = const {
            std::cell::RefCell::new((u64::MAX, Vec::new()))
        };
    }
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    LAST.with_borrow_mut(|(at, text)| {
        if *at != secs {
            text.clear();
            format_time_local(secs, text);
            *at = secs;
        }
        out.extend_from_slice(text);
    });
}

fn format_time_local(secs: u64, out: &mut Vec<u8>) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
}

/// Year, month (1..=12) and day of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use actix_web::http::{Method, Version};

    use super::*;

    fn line() -> Line {
        Line {
            // 2026-11-26T06:28:41.5Z
            time: UNIX_EPOCH + Duration::from_millis(1_795_674_521_500),
            client: Some("10.0.0.7".parse().unwrap()),
            request: Some((Method::GET, "/a?b=1".parse().unwrap(), Version::HTTP_11)),
            status: 200,
            bytes: 512,
            referer: None,
            user_agent: Some(HeaderValue::from_static("curl/8.1 \"x\"")),
            upstream: Some(Arc::from("127.0.0.1:5001")),
            pool: Some(Arc::from("api")),
            route: Some(Arc::from("api-v1")),
            upstream_time: Some(Duration::from_micros(2_400)),
            request_time: Duration::from_micros(3_100),
            request_id: Some(HeaderValue::from_static("abc")),
            failure: None,
        }
    }

    #[test]
    fn escaped_writes_quotes_backslashes_and_bytes_outside_printable_ascii_as_hex() {
        let mut out = Vec::new();
        escaped(b"\"a\\b\x00c\x7f\xff", &mut out);
        assert_eq!(out, b"\\x22a\\x5Cb\\x00c\\x7F\\xFF");
        out.clear();
        escaped(b"plain", &mut out);
        assert_eq!(out, b"plain");
    }

    #[test]
    fn the_plain_run_read_by_words_is_the_one_read_by_bytes() {
        // Every byte value at every place of a field longer than two words.
        for b in 0..=255u8 {
            for at in 0..20 {
                let mut field = *b"0123456789abcdefghij";
                field[at] = b;
                let want = field.iter().take_while(|&&b| is_plain(b)).count();
                assert_eq!(plain_run(&field), want, "byte {b:#x} at {at}");
            }
        }
        assert_eq!(plain_run(b""), 0);
    }

    fn text(format: AccessLogFormat, l: &Line) -> String {
        let mut out = Vec::new();
        write(format, l, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn combined_reads_as_nginx_writes_it_with_the_upstream_fields_after() {
        assert_eq!(
            text(AccessLogFormat::Combined, &line()),
            "10.0.0.7 - - [26/Nov/2026:06:28:41 +0000] \"GET /a?b=1 HTTP/1.1\" 200 512 \"-\" \
             \"curl/8.1 \\x22x\\x22\" 127.0.0.1:5001 0.002 0.003 abc\n"
        );
        let refused = Line {
            request: None,
            status: 400,
            bytes: 0,
            upstream: None,
            upstream_time: None,
            user_agent: None,
            request_id: None,
            failure: None,
            ..line()
        };
        assert!(text(AccessLogFormat::Combined, &refused)
            .ends_with("\"-\" 400 0 \"-\" \"-\" - - 0.003 -\n"));
        let cut = Line {
            failure: Some("closed before the end of the body"),
            ..line()
        };
        assert!(text(AccessLogFormat::Combined, &cut)
            .ends_with(" abc upstream_failed=\"closed before the end of the body\"\n"));
    }

    #[test]
    fn json_is_one_object_per_line_with_every_field() {
        let t = text(AccessLogFormat::Json, &line());
        assert_eq!(t.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["time"], "2026-11-26T06:28:41.500Z");
        assert_eq!(v["client"], "10.0.0.7");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["uri"], "/a?b=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["user_agent"], "curl/8.1 \"x\"");
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["upstream"], "127.0.0.1:5001");
        assert_eq!(v["pool"], "api");
        assert_eq!(v["route"], "api-v1");
        assert_eq!(v["request_id"], "abc");
        assert!((v["request_time"].as_f64().unwrap() - 0.0031).abs() < 1e-9);
    }

    #[test]
    fn times_and_protocols_read_as_the_formatter_wrote_them() {
        for ms in [0, 7, 999, 1_000, 1_234, 9_999, 10_000, 61_005, 86_400_123] {
            let mut out = Vec::new();
            seconds(Duration::from_millis(ms), &mut out);
            let want = format!("{}.{:03}", ms / 1000, ms % 1000);
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
        for code in [0, 7, 99, 100, 200, 404, 499, 999, 1000, u16::MAX] {
            let mut out = Vec::new();
            status(code, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), code.to_string());
        }
        for v in [
            Version::HTTP_09,
            Version::HTTP_10,
            Version::HTTP_11,
            Version::HTTP_2,
            Version::HTTP_3,
        ] {
            assert_eq!(protocol(v), format!("{v:?}"));
        }
    }

    #[test]
    fn civil_dates_are_right_across_leap_years() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
    }
}
