//! What the proxy refuses before any server is chosen, over real sockets: ambiguous
//! framing, malformed heads, odd methods and targets, oversized heads, chunk lines other
//! parsers read differently. Each refusal is checked to reach no backend.

mod common;

use common::*;
use sha2::{Digest, Sha256};

#[actix_rt::test]
async fn ambiguous_framing_is_400_and_never_forwarded() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let cases: [&[u8]; 3] = [
        b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd",
    ];
    for case in cases {
        let answer = raw(lb.proxy_addr, case).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(case)
        );
    }
    assert_eq!(a.hits(), 0);
    // The balancer keeps serving.
    assert_eq!(get(&format!("http://{}/", lb.proxy_addr)).await.0, 200);
}

#[actix_rt::test]
async fn a_malformed_request_gets_400_and_the_balancer_keeps_serving() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    for case in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    ] {
        let answer = raw(lb.proxy_addr, case).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    }
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let answer = raw(lb.proxy_addr, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert_eq!(get(&format!("http://{}/", lb.proxy_addr)).await.0, 200);
    assert_eq!(a.hits(), 1);
}

/// Sends each raw request on its own connection and asserts the answer's status.
async fn assert_each_answered(addr: std::net::SocketAddr, cases: &[&[u8]], status: &str) {
    for case in cases {
        let answer = raw(addr, case).await;
        assert!(
            answer.starts_with("HTTP/1.") && answer.get(9..12) == Some(status),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(case)
        );
    }
}

#[actix_rt::test]
async fn a_host_that_is_not_host_and_port_is_400_and_never_forwarded() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    assert_each_answered(
        lb.proxy_addr,
        &[
            b"GET / HTTP/1.1\r\nHost: user@shop.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: shop.example/path\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: shop.example, other.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: shop.example:80x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
            // Absolute form naming another host than Host.
            b"GET http://other.example/ HTTP/1.1\r\nHost: shop.example\r\n\r\n",
        ],
        "400",
    )
    .await;
    assert_eq!(a.hits(), 0);
    // What a real client sends still goes through.
    assert_each_answered(
        lb.proxy_addr,
        &[
            b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: Shop-1.example.:443\r\n\r\n",
            b"GET http://shop.example/ HTTP/1.1\r\nHost: shop.example\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET http://shop.example/ HTTP/1.0\r\n\r\n",
        ],
        "200",
    )
    .await;
    assert_eq!(a.hits(), 5);
}

#[actix_rt::test]
async fn odd_methods_and_targets_are_refused_before_any_server_is_chosen() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let long_method = format!("{} / HTTP/1.1\r\nHost: x\r\n\r\n", "A".repeat(1000));
    assert_each_answered(
        lb.proxy_addr,
        &[
            b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
            long_method.as_bytes(),
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /path\\file HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /path%00.html HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a%0d%0aX-Injected:%20true HTTP/1.1\r\nHost: x\r\n\r\n",
        ],
        "400",
    )
    .await;
    // We open no tunnels.
    assert_each_answered(
        lb.proxy_addr,
        &[b"CONNECT shop.example:443 HTTP/1.1\r\nHost: shop.example:443\r\n\r\n"],
        "501",
    )
    .await;
    assert_eq!(a.hits(), 0);
    // Extension methods, OPTIONS * and other encoded bytes are still forwarded.
    assert_each_answered(
        lb.proxy_addr,
        &[
            b"PROPFIND /dav HTTP/1.1\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a%2Fb%25?q=%00 HTTP/1.1\r\nHost: x\r\n\r\n",
        ],
        "200",
    )
    .await;
    assert_eq!(a.hits(), 3);
}

#[actix_rt::test]
async fn a_head_over_64_kib_is_431_and_never_forwarded() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    // Under actix-http's own 128 KiB limit, over ours.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(100 * 1024)
    );
    let many: String = (0..40)
        .map(|i| format!("X-Part-{i}: {}\r\n", "c".repeat(2000)))
        .collect();
    let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_each_answered(lb.proxy_addr, &[big.as_bytes(), many.as_bytes()], "431").await;
    assert_eq!(a.hits(), 0);
    let fits = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nCookie: {}\r\n\r\n",
        "d".repeat(16 * 1024)
    );
    assert_each_answered(lb.proxy_addr, &[fits.as_bytes()], "200").await;
}

#[actix_rt::test]
async fn framing_a_backend_could_read_otherwise_is_400() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    assert_each_answered(
        lb.proxy_addr,
        &[
            b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 005\r\n\r\nhello",
            b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 00\r\n\r\n",
            b"POST /sha256 HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent_Length: 5\r\n\r\nhello",
            b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\n\r\nhello",
            // actix-http reads all that follows a WebSocket handshake as its body.
            b"POST /sha256 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 99\r\n\r\n",
        ],
        "400",
    )
    .await;
    assert_eq!(a.hits(), 0);
    assert_each_answered(
        lb.proxy_addr,
        &[b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"],
        "200",
    )
    .await;
}

#[actix_rt::test]
async fn an_expectation_other_than_100_continue_is_417() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    assert_each_answered(
        lb.proxy_addr,
        &[b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n"],
        "417",
    )
    .await;
    assert_eq!(a.hits(), 0);
    let answer = raw(
        lb.proxy_addr,
        b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n\r\nhello",
    )
    .await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains(&format!("5 {:x}", Sha256::digest(b"hello"))));
}

#[actix_rt::test]
async fn chunked_bodies_with_extensions_trailers_and_upper_case_sizes_arrive_whole() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let expected = format!("10 {:x}", Sha256::digest(b"helloworld"));
    for case in [
        &b"POST /sha256 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nA\r\nhelloworld\r\n0\r\n\r\n"[..],
        b"POST /sha256 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=value\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n",
        b"POST /sha256 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\nX-Checksum: abc\r\n\r\n",
    ] {
        let answer = raw(lb.proxy_addr, case).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with(&expected), "{answer:?}");
    }
}

#[actix_rt::test]
async fn chunk_lines_other_parsers_read_differently_are_refused() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let head = "POST /sha256 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for body in [
        "5;\r\nhello\r\n0\r\n\r\n",
        "5;bad[=x\r\nhello\r\n0\r\n\r\n",
        "5 \r\nhello\r\n0\r\n\r\n",
        "5;a=\"open\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\n0\r\n\n",
    ] {
        let answer = raw(lb.proxy_addr, format!("{head}{body}").as_bytes()).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{body:?} got {answer:?}"
        );
        assert!(!answer.contains(" 200 "), "{body:?} got {answer:?}");
    }
    assert_eq!(a.hits(), 0, "the backend saw none of them");
    // Well-formed extensions still pass.
    let answer = raw(
        lb.proxy_addr,
        format!("{head}5 ; a = b ; c=\"q \\\" d\"\r\nhello\r\n0\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.ends_with(&format!("5 {:x}", Sha256::digest(b"hello"))),
        "{answer:?}"
    );
}
