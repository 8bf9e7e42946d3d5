//! Client connections held to their deadlines and their cap, over real sockets: every
//! request head (first or later on a connection) within `listen.header_timeout`, else 408
//! and close; an idle kept-alive connection closed after `listen.keepalive_timeout`; past
//! `listen.max_connections`, a new connection waits until one closes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// A deadline short enough for a test, long enough for a loaded machine to meet.
const DEADLINE: &str =
    "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 1\nheader_timeout = \"1s\"\n";

/// Reads one response with a Content-Length body; returns its head and body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if buf.len() >= end + 4 + length {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                    return (head, body.into_owned());
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a whole response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a response within 5 s")
}

/// Sends a plain `GET /` on `s` and reads its answer, which must be a 200: head and body.
async fn get_ok(s: &mut TcpStream) -> (String, String) {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    (head, body)
}

/// What a connection gives while `head` is sent one byte every `every`, then nothing:
/// everything read, whether the server closed, and when the first byte of an answer or the
/// close came (from the first byte sent). Gives up after `limit`.
async fn trickle(
    s: &mut TcpStream,
    head: &[u8],
    every: Duration,
    limit: Duration,
) -> (String, bool, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut answered = None;
    let mut unsent = head.iter();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match tokio::time::timeout(every, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (text(&out), true, *answered.get_or_insert(started.elapsed()))
            }
            Ok(Ok(n)) => {
                answered.get_or_insert(started.elapsed());
                out.extend_from_slice(&buf[..n]);
            }
            Err(_) => {
                if let Some(b) = unsent.next() {
                    // Once the server has closed, a write may fail; the read says so next.
                    let _ = s.write_all(&[*b]).await;
                }
            }
        }
    }
    (text(&out), false, answered.unwrap_or(limit))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A head that never ends within the test: one header line longer than any deadline here.
fn endless_head() -> Vec<u8> {
    let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 200));
    head
}

#[actix_rt::test]
async fn a_head_trickled_on_a_kept_alive_connection_gets_408_and_close() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], DEADLINE);
    let mut s = TcpStream::connect(lb.proxy_addr).await.unwrap();
    let (_, body) = get_ok(&mut s).await;
    assert_eq!(body, "a");

    let (answer, closed, after) = trickle(
        &mut s,
        &endless_head(),
        Duration::from_millis(300),
        Duration::from_secs(6),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {after:?}: {answer:?}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer:?}"
    );
    assert!(closed, "the connection is closed after the 408");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "408 at {after:?}, the deadline being 1 s"
    );
    assert_eq!(a.hits(), 1, "the trickled request never reaches a server");
}

#[actix_rt::test]
async fn a_head_begun_behind_a_pipelined_request_gets_408_and_close() {
    // The second head's first bytes come with the first request, before its answer.
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], DEADLINE);
    let mut s = TcpStream::connect(lb.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (answer, closed, after) = trickle(
        &mut s,
        &endless_head()[25..],
        Duration::from_millis(300),
        Duration::from_secs(6),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 408") && closed,
        "after {after:?}: {answer:?}"
    );
    assert!(after < Duration::from_millis(2500), "408 at {after:?}");
    assert_eq!(a.hits(), 1);
}

#[actix_rt::test]
async fn a_first_head_trickled_gets_408_and_close() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], DEADLINE);
    let mut s = TcpStream::connect(lb.proxy_addr).await.unwrap();
    let (answer, closed, after) = trickle(
        &mut s,
        &endless_head(),
        Duration::from_millis(300),
        Duration::from_secs(6),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {after:?}: {answer:?}"
    );
    assert!(closed);
    assert!(after < Duration::from_millis(2500), "408 at {after:?}");
    assert_eq!(a.hits(), 0);
}

#[actix_rt::test]
async fn each_head_on_a_connection_has_a_deadline_of_its_own() {
    // Three heads, each sent over ~0.6 s on one connection: 1.8 s in all, each in time.
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], DEADLINE);
    let mut s = TcpStream::connect(lb.proxy_addr).await.unwrap();
    for _ in 0..3 {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for piece in head.chunks(head.len().div_ceil(4)) {
            s.write_all(piece).await.unwrap();
            actix_rt::time::sleep(Duration::from_millis(150)).await;
        }
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "a");
    }
    assert_eq!(a.hits(), 3);
}

#[actix_rt::test]
async fn an_idle_kept_alive_connection_is_closed_after_keepalive_timeout() {
    let a = Backend::start("a");
    let lb = balancer(
        &[a.url()],
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 1\nkeepalive_timeout = \"1s\"\n",
    );
    let mut s = TcpStream::connect(lb.proxy_addr).await.unwrap();
    // Idle for half the timeout between two requests: kept.
    for _ in 0..2 {
        get_ok(&mut s).await;
        actix_rt::time::sleep(Duration::from_millis(500)).await;
    }
    let idle = Instant::now() - Duration::from_millis(500);
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed without a word: {read:?}"
    );
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "closed after {after:?} idle, the timeout being 1 s"
    );
}

#[actix_rt::test]
async fn past_max_connections_a_new_connection_waits_until_one_closes() {
    let a = Backend::start("a");
    let lb = balancer(
        &[a.url()],
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 1\nmax_connections = 2\n",
    );
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(lb.proxy_addr).await.unwrap();
        get_ok(&mut s).await;
        open.push(s);
    }

    // The kernel completes the handshake (the backlog); roundabout does not take it yet.
    let mut third = TcpStream::connect(lb.proxy_addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
    assert!(early.is_err(), "the third connection waits: {early:?}");
    assert_eq!(a.hits(), 2);

    drop(open.pop());
    let (head, body) = read_response(&mut third).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "a");
    assert_eq!(a.hits(), 3);
}

#[actix_rt::test]
async fn keepalive_timeout_zero_closes_each_connection_after_its_answer() {
    let a = Backend::start("a");
    let lb = balancer(
        &[a.url()],
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 1\nkeepalive_timeout = \"0s\"\n",
    );
    let mut s = TcpStream::connect(lb.proxy_addr).await.unwrap();
    let (head, _) = get_ok(&mut s).await;
    assert!(head.contains("connection: close"), "{head}");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
}
