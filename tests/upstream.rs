//! The upstream leg over real sockets, with scripted raw backends for every framing a
//! backend can send: interim answers, bodies cut short, bodies delimited by the close,
//! upgrades and their tunnels, answers given before an upload was read, and clients that
//! leave or stall mid-way.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const OK_HEALTH: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// A scripted backend whose `/health` always passes; `script` gets the other requests, with
/// their index among them on the connection.
fn backend(script: impl Fn(usize, &str) -> Vec<Step> + Send + Sync + 'static) -> Scripted {
    Scripted::start(move |_, i, head| {
        if head.starts_with("GET /health ") {
            vec![Step::send(OK_HEALTH)]
        } else {
            script(i, head)
        }
    })
}

/// The requests a scripted backend saw, health checks left out.
fn seen(b: &Scripted) -> Vec<(usize, String)> {
    b.requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, h)| !h.starts_with("GET /health "))
        .cloned()
        .collect()
}

/// `[proxy]` as most tests here want it.
const PROXY: &str = "timeout = \"3s\"\n";

/// One worker, health checks every hour after the first, `proxy` as the `[proxy]` section.
fn proxy_to(b: &Scripted, proxy: &str) -> roundabout::Running {
    balancer(
        &[b.url()],
        &format!("[health_check]\npath = \"/health\"\ninterval = \"1h\"\n[proxy]\n{proxy}"),
    )
}

/// Sends `request` on a new connection and reads until the proxy closes it (or 10 s pass);
/// returns what was read and how long the close took.
async fn until_closed(addr: std::net::SocketAddr, request: &[u8]) -> (String, Duration) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[actix_rt::test]
async fn an_interim_103_is_consumed_and_the_next_request_gets_its_own_answer() {
    let b = backend(|i, _| {
        let body = if i == 0 { "first" } else { "second" };
        vec![Step::send(format!(
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))]
    });
    let lb = proxy_to(&b, PROXY);
    let url = format!("http://{}/", lb.proxy_addr);
    assert_eq!(get(&url).await, (200, "first".into()));
    assert_eq!(get(&url).await, (200, "second".into()));
    let requests = seen(&b);
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].0, requests[1].0,
        "one upstream connection, reused"
    );
}

#[actix_rt::test]
async fn a_chunked_body_cut_before_the_last_chunk_ends_the_client_connection_uncleanly() {
    let b = backend(|_, _| {
        vec![
            Step::send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
            Step::Sleep(100),
            Step::Close,
        ]
    });
    let lb = proxy_to(&b, PROXY);
    let (answer, took) = until_closed(lb.proxy_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("hello"), "{answer:?}");
    assert!(
        !answer.ends_with("0\r\n\r\n"),
        "a clean end on a cut body: {answer:?}"
    );
    assert!(took < Duration::from_secs(2), "closed after {took:?}");

    let label = b.addr.to_string();
    let text = metrics_of(&lb).await;
    assert_eq!(
        metric(
            &text,
            &format!(
                "roundabout_upstream_body_failures_total{{pool=\"default\",server=\"{label}\"}}"
            )
        ),
        1.0
    );
    // A cut body is not a refused connection: the server stays in rotation.
    assert_eq!(
        metric(
            &text,
            &format!("roundabout_server_healthy{{pool=\"default\",server=\"{label}\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "roundabout_health_check_failures_total{{pool=\"default\",server=\"{label}\"}}"
            )
        ),
        0.0
    );
}

#[actix_rt::test]
async fn a_content_length_body_cut_short_ends_the_client_connection_at_once() {
    let b = backend(|_, _| {
        vec![
            Step::send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"),
            Step::Close,
        ]
    });
    let lb = proxy_to(&b, PROXY);
    let (answer, took) = until_closed(lb.proxy_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("only this"), "{answer:?}");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
}

#[actix_rt::test]
async fn a_body_delimited_by_the_close_arrives_whole() {
    let body: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let reply = format!("{version} 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}");
        let b = backend(move |_, _| vec![Step::send(&reply), Step::Close]);
        let lb = proxy_to(&b, PROXY);
        let url = format!("http://{}/", lb.proxy_addr);
        for _ in 0..2 {
            let (status, got) = get(&url).await;
            assert_eq!(status, 200, "{version}");
            assert_eq!(got.len(), body.len(), "{version}");
            assert_eq!(got, body, "{version}");
        }
    }
}

const WS_HANDSHAKE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

/// A backend that switches to `protocol` and then echoes.
fn switching(protocol: &'static str) -> Scripted {
    backend(move |_, _| {
        vec![
            Step::send(format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {protocol}\r\n\
                 Connection: Upgrade\r\nKeep-Alive: timeout=5\r\n\
                 Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\
                 hello from upstream"
            )),
            Step::Echo,
        ]
    })
}

/// Reads from `s` until `want` has arrived (or 5 s pass).
async fn read_until(s: &mut tokio::net::TcpStream, want: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&out).contains(want) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn in_flight(lb: &roundabout::Running) -> f64 {
    metric(&metrics_of(lb).await, "roundabout_in_flight_requests ")
}

#[actix_rt::test]
async fn a_websocket_upgrade_becomes_a_tunnel_both_ways_held_as_one_request() {
    let b = switching("websocket");
    let lb = proxy_to(&b, PROXY);
    let mut s = tokio::net::TcpStream::connect(lb.proxy_addr).await.unwrap();
    s.write_all(WS_HANDSHAKE).await.unwrap();
    let head = read_until(&mut s, "hello from upstream").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head:?}");
    assert!(lower.contains("connection: upgrade"), "{head:?}");
    assert!(lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="));
    assert!(!lower.contains("keep-alive"), "hop-by-hop: {head:?}");

    // Bytes go both ways, unchanged; a 100 KB message crosses whole.
    let message: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&message).await.unwrap();
    let mut echoed = vec![0u8; message.len()];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, message);
    assert_eq!(
        in_flight(&lb).await,
        1.0,
        "the tunnel is one request in flight"
    );

    let sent = &seen(&b)[0].1.to_ascii_lowercase();
    assert!(sent.contains("upgrade: websocket"), "{sent}");
    assert!(sent.contains("connection: upgrade"), "{sent}");
    assert!(
        sent.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{sent}"
    );

    drop(s);
    assert!(
        eventually(Duration::from_secs(3), async || in_flight(&lb).await == 0.0).await,
        "the tunnel ended with the client"
    );
}

#[actix_rt::test]
async fn any_upgrade_token_is_tunnelled_and_an_idle_tunnel_is_closed() {
    let b = switching("foo/1");
    let lb = proxy_to(&b, "timeout = \"3s\"\ntunnel_idle_timeout = \"700ms\"\n");
    let mut s = tokio::net::TcpStream::connect(lb.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: foo/1\r\nConnection: upgrade\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut s, "hello from upstream").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    for round in 0..3 {
        // Traffic keeps it open past the idle limit...
        actix_rt::time::sleep(Duration::from_millis(400)).await;
        let ping = format!("ping {round}");
        s.write_all(ping.as_bytes()).await.unwrap();
        assert!(read_until(&mut s, &ping).await.contains(&ping));
    }
    // ...silence closes it.
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert!(eventually(Duration::from_secs(2), async || in_flight(&lb).await == 0.0).await);
}

#[actix_rt::test]
async fn an_upgrade_the_server_declines_is_an_ordinary_answer() {
    let b = backend(|_, _| {
        vec![Step::send(
            "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope",
        )]
    });
    let lb = proxy_to(&b, PROXY);
    let (answer, _) = until_closed(lb.proxy_addr, WS_HANDSHAKE).await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer:?}");
    assert!(answer.ends_with("\r\n\r\nnope"), "{answer:?}");
}

#[actix_rt::test]
async fn an_answer_given_before_the_upload_was_read_reaches_the_client() {
    // A scripted backend reads the whole body before answering; this one answers at once,
    // having read only the head.
    let early = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = early.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for conn in early.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = [0u8; 512];
            let n = conn.read(&mut head).unwrap_or(0);
            if head[..n].starts_with(b"GET /health ") {
                let _ = conn.write_all(OK_HEALTH);
                continue;
            }
            let _ = conn.write_all(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n",
            );
            // As servers do (nginx's lingering close): the rest is read and dropped, so the
            // close does not reset the connection under the answer.
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = std::io::copy(&mut conn, &mut std::io::sink());
        }
    });
    let lb = balancer(
        &[format!("http://{addr}")],
        "[health_check]\npath = \"/health\"\ninterval = \"1h\"\n",
    );
    let body = vec![b'x'; 5 << 20];
    let mut res = client()
        .post(format!("http://{}/upload", lb.proxy_addr))
        .send_body(body)
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(res.body().await.unwrap(), "too big\n");
}

#[actix_rt::test]
async fn a_client_that_leaves_mid_download_is_counted_as_499_and_the_server_not_blamed() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let mut s = tokio::net::TcpStream::connect(lb.proxy_addr).await.unwrap();
    s.write_all(b"GET /drip/20 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut s, "drop").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    drop(s);
    let label = a.addr.to_string();
    assert!(
        eventually(Duration::from_secs(3), async || {
            let text = metrics_of(&lb).await;
            metric(
                &text,
                &format!("roundabout_requests_total{{pool=\"default\",server=\"{label}\",class=\"4xx\"}}"),
            ) == 1.0
        })
        .await,
        "{}",
        metrics_of(&lb).await
    );
    let text = metrics_of(&lb).await;
    assert_eq!(
        metric(
            &text,
            &format!(
                "roundabout_requests_total{{pool=\"default\",server=\"{label}\",class=\"2xx\"}}"
            )
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "roundabout_upstream_body_failures_total{{pool=\"default\",server=\"{label}\"}}"
            )
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            &format!("roundabout_server_healthy{{pool=\"default\",server=\"{label}\"}}")
        ),
        1.0
    );
    assert_eq!(in_flight(&lb).await, 0.0);
}

#[actix_rt::test]
async fn a_client_that_leaves_mid_upload_is_counted_as_499_not_502() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let mut s = tokio::net::TcpStream::connect(lb.proxy_addr).await.unwrap();
    s.write_all(b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[b'x'; 10_000]).await.unwrap();
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    assert!(
        eventually(Duration::from_secs(3), async || {
            metric(
                &metrics_of(&lb).await,
                "roundabout_requests_total{pool=\"\",server=\"\",class=\"4xx\"}",
            ) == 1.0
        })
        .await,
        "{}",
        metrics_of(&lb).await
    );
    let text = metrics_of(&lb).await;
    assert_eq!(
        metric(
            &text,
            "roundabout_requests_total{pool=\"\",server=\"\",class=\"5xx\"}"
        ),
        0.0
    );
    let label = a.addr.to_string();
    assert_eq!(
        metric(
            &text,
            &format!("roundabout_server_healthy{{pool=\"default\",server=\"{label}\"}}")
        ),
        1.0
    );
}

#[actix_rt::test]
async fn an_upload_that_stops_arriving_gets_408_and_the_upstream_connection_is_closed() {
    let b = backend(|_, _| vec![Step::send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]);
    // The scripted backend waits for the whole announced body, as a real server would.
    let lb = proxy_to(&b, "timeout = \"1s\"\n");
    let mut s = tokio::net::TcpStream::connect(lb.proxy_addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nten bytes.")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    assert!(seen(&b).is_empty(), "the backend never got a whole request");
}

#[actix_rt::test]
async fn a_client_that_stops_reading_loses_its_connection_and_frees_the_upstream_one() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "[proxy]\ntimeout = \"1s\"\n");
    let mut s = tokio::net::TcpStream::connect(lb.proxy_addr).await.unwrap();
    // 200 MB: far more than the sockets on the way can hold.
    s.write_all(b"GET /bytes/200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut s, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(in_flight(&lb).await, 1.0);
    // It reads no more: within proxy.timeout of the stall both connections go.
    assert!(
        eventually(Duration::from_secs(10), async || in_flight(&lb).await
            == 0.0)
        .await,
        "the stalled download still holds its upstream"
    );
    let label = a.addr.to_string();
    let text = metrics_of(&lb).await;
    assert_eq!(
        metric(
            &text,
            &format!(
                "roundabout_requests_total{{pool=\"default\",server=\"{label}\",class=\"4xx\"}}"
            )
        ),
        1.0,
        "counted as 499"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buf[..n.min(16)]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the client connection was closed");
    assert_eq!(get(&format!("http://{}/", lb.proxy_addr)).await.0, 200);
}
