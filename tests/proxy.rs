//! The proxy over real sockets: balancing, pass-through, header rules and failure answers.

mod common;

use common::*;
use futures_util::StreamExt as _;
use sha2::{Digest, Sha256};

fn headers_of(body: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON from /headers");
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn header<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[actix_rt::test]
async fn round_robin_sends_each_backend_exactly_n_in_a_fixed_cycle() {
    let (a, b, c) = Backend::abc();
    let lb = balancer(&urls(&[&a, &b, &c]), "");
    let n = 10;
    let mut order = Vec::new();
    for _ in 0..3 * n {
        let (status, body) = get(&format!("http://{}/", lb.proxy_addr)).await;
        assert_eq!(status, 200);
        order.push(body);
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (n, n, n));
    let cycle = &order[..3];
    let mut distinct = cycle.to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "first cycle {cycle:?}");
    for (i, name) in order.iter().enumerate() {
        assert_eq!(
            name,
            &cycle[i % 3],
            "request {i} broke the cycle: {order:?}"
        );
    }
}

#[actix_rt::test]
async fn every_method_path_and_query_reaches_the_backend() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let client = client();
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let url = format!("http://{}/headers?x=1&y=%20two", lb.proxy_addr);
        let mut res = client
            .request(method.parse().unwrap(), &url)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{method}");
        let v: serde_json::Value = serde_json::from_slice(&res.body().await.unwrap()).unwrap();
        assert_eq!(v["method"], method);
        assert_eq!(v["uri"], "/headers?x=1&y=%20two");
    }
    // HEAD: the backend's headers, no body, and the connection still serves the next request.
    let res = client
        .head(format!("http://{}/", lb.proxy_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers().get("content-length").unwrap(), "1");
}

#[actix_rt::test]
async fn statuses_pass_through_and_redirects_are_not_followed() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    for code in [201u16, 204, 404, 500, 503] {
        let (status, body) = get(&format!("http://{}/status/{code}", lb.proxy_addr)).await;
        assert_eq!(status, code);
        if code != 204 {
            assert_eq!(body, format!("status {code}"));
        }
    }
    let res = client()
        .get(format!("http://{}/redirect", lb.proxy_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 301);
    assert_eq!(res.headers().get("location").unwrap(), "/elsewhere");
    assert_eq!(a.hits(), 6, "the redirect was not followed");
}

#[actix_rt::test]
async fn every_set_cookie_comes_back() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let res = client()
        .get(format!("http://{}/cookies", lb.proxy_addr))
        .send()
        .await
        .unwrap();
    let cookies: Vec<_> = res.headers().get_all("set-cookie").collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2; HttpOnly"]);
}

#[actix_rt::test]
async fn a_5mb_body_arrives_intact_with_either_framing() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let body: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let expected = format!("{} {:x}", body.len(), Sha256::digest(&body));
    let url = format!("http://{}/sha256", lb.proxy_addr);

    let mut res = client().post(&url).send_body(body.clone()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.body().await.unwrap(), expected.as_bytes());

    let chunks: Vec<Result<actix_web::web::Bytes, std::io::Error>> = body
        .chunks(100_000)
        .map(|c| Ok(actix_web::web::Bytes::copy_from_slice(c)))
        .collect();
    let mut res = client()
        .post(&url)
        .send_stream(futures_util::stream::iter(chunks))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.body().await.unwrap(), expected.as_bytes());
}

#[actix_rt::test]
async fn a_long_download_streams_back_whole() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let mut res = client()
        .get(format!("http://{}/bytes/{}", lb.proxy_addr, 50 << 20))
        .send()
        .await
        .unwrap();
    let mut n = 0usize;
    while let Some(chunk) = res.next().await {
        n += chunk.unwrap().len();
    }
    assert_eq!(n, 50 << 20);
}

#[actix_rt::test]
async fn hop_by_hop_headers_are_dropped_and_forwarded_headers_set() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    // Raw bytes: an HTTP client library would write its own Connection header.
    let answer = raw(
        lb.proxy_addr,
        b"GET /headers HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive, X-Private\r\n\
X-Private: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n\
Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n\
X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\
X-End-To-End: kept\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let list = headers_of(body);
    for gone in [
        "connection",
        "x-private",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert_eq!(header(&list, gone), None, "{gone} was forwarded");
    }
    assert_eq!(header(&list, "x-end-to-end"), Some("kept"));
    // The client is not trusted: its X-Forwarded-* are replaced, not appended to.
    assert_eq!(header(&list, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header(&list, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(&list, "x-forwarded-host"), Some("shop.example"));
    assert_eq!(header(&list, "host"), Some("shop.example"), "preserve_host");
    assert_eq!(header(&list, "user-agent"), None, "awc added a User-Agent");
    assert_eq!(
        header(&list, "accept-encoding"),
        None,
        "awc added an Accept-Encoding"
    );
    assert_eq!(
        header(&list, "content-length"),
        None,
        "a GET without a body got a length"
    );
    // awc (actix-http's encoder) always writes a Date on requests; it cannot be turned off.
}

#[actix_rt::test]
async fn a_trusted_proxy_x_forwarded_for_is_appended_to() {
    let a = Backend::start("a");
    let lb = balancer(
        &[a.url()],
        "[rate_limit]\nenabled = false\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let mut res = client()
        .get(format!("http://{}/headers", lb.proxy_addr))
        .insert_header(("x-forwarded-for", "203.0.113.7"))
        .send()
        .await
        .unwrap();
    let list = headers_of(std::str::from_utf8(&res.body().await.unwrap()).unwrap());
    assert_eq!(
        header(&list, "x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
}

#[actix_rt::test]
async fn preserve_host_false_sends_the_servers_authority() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "[proxy]\npreserve_host = false\n");
    let mut res = client()
        .get(format!("http://{}/headers", lb.proxy_addr))
        .insert_header(("host", "shop.example"))
        .send()
        .await
        .unwrap();
    let list = headers_of(std::str::from_utf8(&res.body().await.unwrap()).unwrap());
    assert_eq!(header(&list, "host"), Some(a.addr.to_string().as_str()));
    assert_eq!(header(&list, "x-forwarded-host"), Some("shop.example"));
}

#[actix_rt::test]
async fn hop_by_hop_headers_of_the_response_are_dropped() {
    let raw_backend = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nConnection: x-upstream-private\r\nX-Upstream-Private: 1\r\n\
Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
    );
    let lb = balancer(
        &[raw_backend.url()],
        "[health_check]\npath = \"/\"\ninterval = \"1h\"\n",
    );
    let mut res = client()
        .get(format!("http://{}/", lb.proxy_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for gone in ["x-upstream-private", "keep-alive", "proxy-authenticate"] {
        assert!(res.headers().get(gone).is_none(), "{gone} came back");
    }
    assert_eq!(res.headers().get("x-kept").unwrap(), "yes");
    assert_eq!(res.body().await.unwrap(), "ok");
}

#[actix_rt::test]
async fn a_refused_connection_is_retried_on_another_server() {
    let a = Backend::start("a");
    let lb = balancer(
        &[dead_url(), a.url()],
        "[health_check]\npath = \"/health\"\ninterval = \"1h\"\n",
    );
    for _ in 0..4 {
        let (status, body) = get(&format!("http://{}/", lb.proxy_addr)).await;
        assert_eq!((status, body.as_str()), (200, "a"));
    }
}

#[actix_rt::test]
async fn every_try_refused_is_502() {
    let lb = balancer(
        &[dead_url(), dead_url()],
        "[health_check]\npath = \"/health\"\ninterval = \"1h\"\n",
    );
    let (status, body) = get(&format!("http://{}/", lb.proxy_addr)).await;
    assert_eq!(status, 502);
    assert!(body.contains("could not reach"), "{body}");
}

#[actix_rt::test]
async fn no_server_is_503_with_retry_after() {
    let lb = balancer(&[], "");
    let res = client()
        .get(format!("http://{}/", lb.proxy_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers().get("retry-after").unwrap(), "1");
    assert_eq!(
        res.headers().get("content-type").unwrap(),
        "text/plain; charset=utf-8"
    );
}

#[actix_rt::test]
async fn no_answer_within_the_timeout_is_504() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "[proxy]\ntimeout = \"300ms\"\n");
    let (status, _) = get(&format!("http://{}/slow/2000", lb.proxy_addr)).await;
    assert_eq!(status, 504);
}

#[actix_rt::test]
async fn a_flowing_download_is_not_cut_but_a_stalled_one_is() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "[proxy]\ntimeout = \"600ms\"\n");
    // 10 chunks, 200 ms apart: 2 s in all, never a pause of 600 ms.
    let (status, body) = get(&format!("http://{}/drip/10", lb.proxy_addr)).await;
    assert_eq!(status, 200);
    assert_eq!(body, "drop\n".repeat(10));

    // The stalled body is cut: the connection closes without the last chunk.
    let started = std::time::Instant::now();
    let answer = raw(lb.proxy_addr, b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("first "), "{answer}");
    assert!(
        !answer.contains("late"),
        "a 3 s pause went through: {answer}"
    );
    assert!(
        !answer.ends_with("0\r\n\r\n"),
        "the cut body looks complete: {answer:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(2500));
}

#[actix_rt::test]
async fn a_body_over_max_body_bytes_is_413() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "[proxy]\nmax_body_bytes = 1000\n");
    let url = format!("http://{}/sha256", lb.proxy_addr);
    let res = client()
        .post(&url)
        .send_body(vec![0u8; 2000])
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(a.hits(), 0, "a body known too large is never forwarded");

    let chunks: Vec<Result<actix_web::web::Bytes, std::io::Error>> = (0..4)
        .map(|_| Ok(actix_web::web::Bytes::from(vec![1u8; 600])))
        .collect();
    let res = client()
        .post(&url)
        .send_stream(futures_util::stream::iter(chunks))
        .await
        .unwrap();
    assert_eq!(res.status(), 413);

    let (status, body) = {
        let mut res = client()
            .post(&url)
            .send_body(vec![0u8; 1000])
            .await
            .unwrap();
        (res.status(), res.body().await.unwrap())
    };
    assert_eq!(status, 200);
    assert!(body.starts_with(b"1000 "));
}

#[actix_rt::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let mut peers = Vec::new();
    for _ in 0..5 {
        let (status, body) = get(&format!("http://{}/peer", lb.proxy_addr)).await;
        assert_eq!(status, 200);
        peers.push(body);
    }
    peers.dedup();
    assert_eq!(
        peers.len(),
        1,
        "one upstream connection for 5 requests: {peers:?}"
    );
}

#[actix_rt::test]
async fn an_idempotent_request_on_a_connection_the_server_closed_is_retried() {
    // The first connection answers once, then takes the next request and closes without a
    // word, as a server whose keep-alive timer fired just as it came: the pool really
    // reused the connection, and only a retry on a new one can answer.
    let start = |retries: u32| {
        let b = Scripted::start(|connection, request, head| {
            if head.starts_with("GET /health ") {
                return vec![Step::send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")];
            }
            match (connection, request) {
                (_, 0) => vec![Step::send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")],
                _ => vec![Step::Close],
            }
        });
        let lb = balancer(
            &[b.url()],
            &format!(
                "[health_check]\npath = \"/health\"\ninterval = \"1h\"\n[proxy]\nretries = {retries}\n"
            ),
        );
        (b, lb)
    };
    let (b, lb) = start(2);
    let url = format!("http://{}/", lb.proxy_addr);
    for _ in 0..5 {
        assert_eq!(get(&url).await, (200, "ok".into()));
    }
    assert!(
        b.connections() > 1,
        "connections were reused and found closed"
    );

    let (_b, lb) = start(0);
    let url = format!("http://{}/", lb.proxy_addr);
    assert_eq!(get(&url).await, (200, "ok".into()));
    assert_eq!(
        get(&url).await.0,
        502,
        "without a retry the stale connection shows"
    );
}

/// Sends a chunked POST to /sha256 on a raw connection, one chunk per item of `gaps`
/// (the pause before it, in ms), and returns the answer.
async fn trickle(addr: std::net::SocketAddr, gaps: &[u64]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /sha256 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for &gap in gaps {
        actix_rt::time::sleep(std::time::Duration::from_millis(gap)).await;
        // The proxy may have answered (408) and closed meanwhile.
        if s.write_all(b"5\r\nchunk\r\n").await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[actix_rt::test]
async fn a_flowing_upload_is_not_cut_by_the_timeout_but_a_paused_one_is() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "[proxy]\ntimeout = \"500ms\"\n");
    // 10 chunks, 150 ms apart: 1.5 s in all, never a pause of 500 ms.
    let answer = trickle(lb.proxy_addr, &[150; 10]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("50 {:x}", Sha256::digest(b"chunk".repeat(10)))),
        "{answer}"
    );

    // A pause past the timeout is the client's stall (SPEC: 408), not the server's.
    let answer = trickle(lb.proxy_addr, &[0, 1500]).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}
