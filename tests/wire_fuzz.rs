//! Arbitrary bytes at a real balancer's socket: random bytes, request heads built from the
//! pieces parsers disagree on, and valid requests with a few bytes changed. Each case is one
//! connection whose sending side is then shut; the answer must be a close, or answers none
//! of which is a 5xx of roundabout's (the backend answers 200 to anything; 501 for a
//! CONNECT is documented), the connection must end within seconds, no worker may panic,
//! and a normal request must still be served every so often and at the end.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use proptest::{
    collection::vec,
    prelude::*,
    sample::select,
    strategy::ValueTree as _,
    test_runner::{Config as RunnerConfig, TestRunner},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Cases per run, unless `PROPTEST_CASES` says otherwise: each is one connection, about a
/// millisecond on loopback. The inputs differ from run to run (`PROPTEST_RNG_SEED` fixes
/// them); a failure prints its input.
const CASES: usize = 400;

/// Requests that are valid as they stand, to be changed a few bytes at a time.
const VALID: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a?b=c HTTP/1.0\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
];

/// A request head from the pieces that parsers read differently.
fn built() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        select(vec![
            "GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "get", "G\0T", ""
        ])
        .prop_map(String::from),
        "[!-~]{1,12}",
    ];
    let target = prop_oneof![
        select(vec![
            "/",
            "*",
            "/a%00b",
            "/a\\b",
            "http://x/",
            "http://y/",
            "//x",
            "/%",
            "x",
            "/ /",
        ])
        .prop_map(String::from),
        "/[!-~]{0,40}",
    ];
    let version = select(vec![
        "HTTP/1.1",
        "HTTP/1.0",
        "HTTP/2.0",
        "HTTP/1.2",
        "http/1.1",
        "HTTP/1.1 ",
        "HTTP/11",
        "",
    ]);
    let eol = select(vec!["\r\n", "\n", "\r", "\r\r\n"]);
    let name = select(vec![
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Expect",
        "Upgrade",
        "Connection",
        "Content-Type",
        "Content_Length",
        " Host",
        "Host ",
        "X-Forwarded-For",
        "",
    ]);
    let value = prop_oneof![
        select(vec![
            "x",
            "0",
            "5",
            "-1",
            "007",
            "5, 6",
            "chunked",
            "chunked, identity",
            "gzip",
            "100-continue",
            "websocket",
            "close",
            "keep-alive",
            "",
            " x ",
            "x\0y",
        ])
        .prop_map(String::from),
        "[0-9]{1,22}",
        "[ -~]{0,30}",
    ];
    let header = (name, value, eol.clone()).prop_map(|(n, v, e)| format!("{n}: {v}{e}"));
    let body = prop_oneof![
        vec(any::<u8>(), 0..64),
        "([0-9a-fA-F]{1,4}(;[ -~]{0,8})?\r\n[a-z]{0,8}\r\n){0,3}0\r\n(\r\n)?"
            .prop_map(String::into_bytes),
    ];
    (
        method,
        target,
        version,
        eol.clone(),
        vec(header, 0..8),
        eol,
        body,
    )
        .prop_map(|(m, t, v, e1, headers, e2, body)| {
            let mut out = format!("{m} {t} {v}{e1}{}{e2}", headers.concat()).into_bytes();
            out.extend(body);
            out
        })
}

/// A valid request with one to four bytes inserted, removed or replaced.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        select(VALID),
        vec((0..3u8, any::<prop::sample::Index>(), any::<u8>()), 1..5),
    )
        .prop_map(|(valid, edits)| {
            let mut out = valid.to_vec();
            for (kind, at, byte) in edits {
                let i = at.index(out.len() + 1);
                match kind {
                    0 => out.insert(i, byte),
                    1 if i < out.len() => {
                        out.remove(i);
                    }
                    _ if i < out.len() => out[i] = byte,
                    _ => out.push(byte),
                }
            }
            out
        })
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..600),
        2 => built(),
        2 => mutated(),
    ]
}

/// Sends `bytes`, shuts the sending side, reads to the close; `None` if the connection is
/// still open after 5 s.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The balancer may answer and close before it has read everything: then writes fail.
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| out)
}

/// The status codes of every response in `answer`: the backend's bodies are one letter, so
/// every `HTTP/1.x NNN` in it starts a response.
fn statuses(answer: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(answer);
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

#[actix_rt::test]
async fn arbitrary_bytes_get_a_client_error_or_a_close_and_the_balancer_keeps_serving() {
    // Panics on a worker thread would not fail this test by themselves: count them.
    let panics = Arc::new(AtomicUsize::new(0));
    let seen = panics.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("actix-server worker"))
        {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));

    let a = Backend::start_slow("a", 0);
    let lb = balancer(&[a.url()], "");
    let url = format!("http://{}/", lb.proxy_addr);
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    let mut runner = TestRunner::new(RunnerConfig::default());
    let strategy = input();
    let (mut closed, mut answered) = (0, 0);
    for case in 0..cases {
        let bytes = strategy.new_tree(&mut runner).unwrap().current();
        let shown = String::from_utf8_lossy(&bytes).into_owned();
        let answer = exchange(lb.proxy_addr, &bytes)
            .await
            .unwrap_or_else(|| panic!("case {case}: still open 5 s after {shown:?}"));
        let codes = statuses(&answer);
        if codes.is_empty() {
            closed += 1;
        } else {
            answered += 1;
        }
        for code in codes {
            let connect = code == 501 && shown.contains("CONNECT");
            assert!(
                code < 500 || connect,
                "case {case}: {shown:?} got {:?}",
                String::from_utf8_lossy(&answer)
            );
        }
        if case % 50 == 49 {
            assert_eq!(get(&url).await, (200, "a".into()), "after case {case}");
        }
    }
    assert_eq!(get(&url).await, (200, "a".into()));
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a worker panicked");
    println!("{cases} cases: {answered} answered, {closed} closed without an answer");
}

/// Found by the test above: a body that ends (the client shut its side) before its
/// Content-Length was answered 502, an error of the server's.
#[actix_rt::test]
async fn a_request_body_cut_short_by_the_client_is_a_client_error() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    for request in [
        &b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhell"[..],
        b"POST /sha256 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ] {
        let answer = exchange(lb.proxy_addr, request).await.expect("closed");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    }
    assert_eq!(get(&format!("http://{}/", lb.proxy_addr)).await.0, 200);
}
