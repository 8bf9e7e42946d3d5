//! `listen.proxy_protocol` over real sockets: raw PROXY protocol v1 and v2 headers (and
//! v2 LOCAL, v1 UNKNOWN) before requests on the plain and the TLS listener, the header's
//! address seen by X-Forwarded-For, the limiter, a route's `allow` list and the access log;
//! garbage, a malformed header and a late one closing the connection with nothing answered
//! and nothing forwarded.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use common::{tls::Ca, *};

/// A v2 header: `command` 0x20 LOCAL or 0x21 PROXY, `family` 0x11 TCP/IPv4 or 0x21
/// TCP/IPv6, then the addresses and ports as the specification lays them out.
fn v2(command: u8, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut addresses = Vec::new();
    let family = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            addresses.extend_from_slice(&s.ip().octets());
            addresses.extend_from_slice(&d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            addresses.extend_from_slice(&s.ip().octets());
            addresses.extend_from_slice(&d.ip().octets());
            0x21
        }
        _ => unreachable!("one family"),
    };
    addresses.extend_from_slice(&src.port().to_be_bytes());
    addresses.extend_from_slice(&dst.port().to_be_bytes());
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(command);
    h.push(family);
    h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    h.extend_from_slice(&addresses);
    h
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `[listen]` with the header expected and a 1 s deadline for it, the in-process limiter
/// at 2 requests a minute, and the access log written to `log`.
fn proxied(log: &Path, more: &str) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 1\nproxy_protocol = true\nheader_timeout = \"1s\"\n\
         [rate_limit]\nredis_url = \"\"\nrequests = 2\nwindow = \"60s\"\n\
         [log]\naccess_log = \"{}\"\n{more}",
        log.display()
    )
}

/// `header`, then `GET path` with `Connection: close`; everything answered.
async fn request(lb: SocketAddr, header: &[u8], path: &str) -> String {
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    raw(lb, &bytes).await
}

/// The X-Forwarded-For the backend's `/headers` saw, in the answer `res`.
fn forwarded_for(res: &str) -> String {
    let body = &res[res.find("\r\n\r\n").expect("a whole answer") + 4..];
    let json: serde_json::Value = serde_json::from_str(body).expect(res);
    json["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "x-forwarded-for")
        .map(|h| h[1].as_str().unwrap().to_string())
        .expect(res)
}

#[actix_rt::test]
async fn v1_and_v2_headers_give_the_client_address_to_the_forwarded_header_limiter_and_log() {
    let a = Backend::start("a");
    let log = tempfile::NamedTempFile::new().unwrap();
    let lb = balancer(&urls(&[&a]), &proxied(log.path(), ""));
    let to = lb.proxy_addr;
    let cases: [(Vec<u8>, &str); 6] = [
        (
            format!("PROXY TCP4 203.0.113.7 {} 50000 {}\r\n", to.ip(), to.port()).into_bytes(),
            "203.0.113.7",
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 50000 80\r\n".to_vec(),
            "2001:db8::7",
        ),
        (v2(0x21, addr("198.51.100.9:41000"), to), "198.51.100.9"),
        (
            v2(
                0x21,
                addr("[2001:db8:0:1::9]:41000"),
                addr("[2001:db8::1]:80"),
            ),
            "2001:db8:0:1::9",
        ),
        // The balancer's own health check: the TCP peer is the client.
        (v2(0x20, addr("192.0.2.1:1"), to), "127.0.0.1"),
        (b"PROXY UNKNOWN\r\n".to_vec(), "127.0.0.1"),
    ];
    for (header, client) in &cases {
        let res = request(to, header, "/headers").await;
        assert!(res.starts_with("HTTP/1.1 200"), "{client}: {res}");
        assert_eq!(forwarded_for(&res), *client, "{res}");
    }
    // The limiter counts the header's address: 203.0.113.7 has one request left, a client
    // it has not seen has its whole budget.
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 50000 80\r\n").into_bytes();
    let res = request(to, &v1("203.0.113.7"), "/").await;
    assert!(res.contains("x-ratelimit-remaining: 0\r\n"), "{res}");
    let res = request(to, &v1("203.0.113.7"), "/").await;
    assert!(res.starts_with("HTTP/1.1 429"), "{res}");
    let res = request(to, &v1("203.0.113.8"), "/").await;
    assert!(res.contains("x-ratelimit-remaining: 1\r\n"), "{res}");
    assert_eq!(a.hits(), cases.len() + 2);
    // A request actix-http refuses (a malformed header line) is logged with it too.
    let refused = [
        v1("203.0.113.9"),
        b"GET / HTTP/1.1\r\nHost shop\r\n\r\n".to_vec(),
    ]
    .concat();
    assert!(raw(to, &refused).await.starts_with("HTTP/1.1 400"));

    let read = || std::fs::read_to_string(log.path()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || read().lines().count()
            == 10)
        .await,
        "{}",
        read()
    );
    let clients: Vec<String> = read()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(
        clients,
        [
            "203.0.113.7",
            "2001:db8::7",
            "198.51.100.9",
            "2001:db8:0:1::9",
            "127.0.0.1",
            "127.0.0.1",
            "203.0.113.7",
            "203.0.113.7",
            "203.0.113.8",
            "203.0.113.9",
        ],
        "{}",
        read()
    );
    assert!(
        read().lines().last().unwrap().contains("\"-\" 400 "),
        "{}",
        read()
    );
}

#[actix_rt::test]
async fn a_route_allow_list_lets_in_the_header_address_not_the_peer() {
    let a = Backend::start("a");
    let log = tempfile::NamedTempFile::new().unwrap();
    let routes = "[[routes]]\nallow = [\"203.0.113.0/24\"]\npool = \"default\"\n";
    let lb = balancer(&urls(&[&a]), &proxied(log.path(), routes));
    let inside = request(
        lb.proxy_addr,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1 80\r\n",
        "/",
    )
    .await;
    assert!(inside.starts_with("HTTP/1.1 200"), "{inside}");
    let outside = request(
        lb.proxy_addr,
        b"PROXY TCP4 198.51.100.9 127.0.0.1 1 80\r\n",
        "/",
    )
    .await;
    assert!(outside.starts_with("HTTP/1.1 403"), "{outside}");
    // LOCAL: the TCP peer, 127.0.0.1, which the list leaves out.
    let local = v2(0x20, addr("203.0.113.7:1"), lb.proxy_addr);
    assert!(request(lb.proxy_addr, &local, "/")
        .await
        .starts_with("HTTP/1.1 403"));
    assert_eq!(a.hits(), 1);
}

/// Runs `f` (blocking socket work) off the test's thread, where the balancer's server runs.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    actix_rt::task::spawn_blocking(f).await.unwrap()
}

/// Sends `bytes` and a request, and reads until the connection closes (a reset counts):
/// what was answered, and when it closed (panics if it stays open 5 s).
fn unanswered(lb: SocketAddr, bytes: &[u8]) -> (String, Duration) {
    let mut s = TcpStream::connect(lb).unwrap();
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {:?}: {e}", started.elapsed()),
        }
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[actix_rt::test]
async fn garbage_a_malformed_or_a_late_header_closes_the_connection_with_nothing_forwarded() {
    let a = Backend::start("a");
    let log = tempfile::NamedTempFile::new().unwrap();
    let lb = balancer(&urls(&[&a]), &proxied(log.path(), ""));
    let mut bad_version = v2(0x21, addr("198.51.100.9:1"), lb.proxy_addr);
    bad_version[12] = 0x11;
    // UNIX addresses take 216 bytes; these are 12.
    let mut unix_too_short = v2(0x21, addr("198.51.100.9:1"), lb.proxy_addr);
    unix_too_short[13] = 0x31;
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 random bytes of a ClientHello"[..],
        b"PROXY TCP4 203.0.113.7 127.0.0.1 50000\r\n",
        b"PROXY TCP4 203.0.113.7 127.0.0.1 50000 80\n",
        b"PROXY TCP4 203.0.113.7 127.0.0.1 050000 80\r\n",
        b"PROXY TCP9 203.0.113.7 127.0.0.1 50000 80\r\n",
        &bad_version,
        &unix_too_short,
        &[b'P'; 200],
    ] {
        let (to, bytes) = (lb.proxy_addr, garbage.to_vec());
        let (answer, closed_after) = blocking(move || unanswered(to, &bytes)).await;
        let shown = String::from_utf8_lossy(garbage);
        assert_eq!(answer, "", "{shown:?}");
        // At once, not at the header's deadline.
        assert!(
            closed_after < Duration::from_millis(500),
            "{shown:?}: {closed_after:?}"
        );
    }

    // A header that stops arriving is given `header_timeout` (1 s), then closed unanswered.
    let to = lb.proxy_addr;
    let (read, rest, waited) = blocking(move || {
        let mut slow = TcpStream::connect(to).unwrap();
        slow.write_all(b"PROXY TCP4 203.0.1").unwrap();
        let started = Instant::now();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        let read = slow.read_to_end(&mut rest).map(|_| ());
        (read, rest, started.elapsed())
    })
    .await;
    assert!(read.is_ok() && rest.is_empty(), "{read:?} {rest:?}");
    assert!(
        waited > Duration::from_millis(800) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(a.hits(), 0);
    // Nothing reached the log either: no request was read.
    assert_eq!(std::fs::read_to_string(log.path()).unwrap(), "");
}

#[actix_rt::test]
async fn on_the_tls_listener_the_header_comes_before_the_handshake() {
    let a = Backend::start("a");
    let ca = Ca::new("test CA");
    let (cert, key) = ca.leaf("leaf", "localhost", false);
    let log = tempfile::NamedTempFile::new().unwrap();
    let tls = format!(
        "tls_address = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let lb = balancer(
        &urls(&[&a]),
        &proxied(log.path(), "").replace("header_timeout", &format!("{tls}header_timeout")),
    );
    let to = lb.tls_addr.unwrap();

    // HTTP/1.1 by ALPN, over rustls, after a v1 header on the same socket.
    let client = ca.client(&["http/1.1"]);
    let res = blocking(move || {
        let tcp = TcpStream::connect(to).unwrap();
        (&tcp)
            .write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 50000 443\r\n")
            .unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let name = "localhost".try_into().unwrap();
        let conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream
            .write_all(b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut res = Vec::new();
        let _ = stream.read_to_end(&mut res);
        String::from_utf8_lossy(&res).into_owned()
    })
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(forwarded_for(&res), "203.0.113.7");
    assert!(res.contains("[\"x-forwarded-proto\",\"https\"]"), "{res}");

    // HTTP/2 from curl, which sends a v1 header with its own addresses.
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "--http2", "--haproxy-protocol", "--cacert"])
        .arg(ca.pem())
        .args(["-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .arg(format!("https://localhost:{}/", to.port()));
    let out = actix_rt::task::spawn_blocking(move || curl.output().unwrap())
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{out:?}");

    // A handshake with no header before it is closed unanswered.
    let client = ca.client(&["http/1.1"]);
    let refused = blocking(move || common::tls::connect(to, "localhost", client).is_err()).await;
    assert!(refused, "a handshake without a header");
    assert_eq!(a.hits(), 2);
}
