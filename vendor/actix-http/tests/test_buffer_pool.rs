//! roundabout patch "Buffers from a per-thread pool" (VENDORED.md): connections that wait hold
//! no read or write buffer, over real sockets.

use std::{
    convert::Infallible,
    io::{Read as _, Write as _},
    net::TcpStream,
};

use actix_http::{h1::buffer_pool, HttpService, Request, Response};
use actix_http_test::test_server;
use actix_service::fn_service;

/// Sends `GET path` and reads the answer's head and its body (as long as `content-length`).
fn get(stream: &mut TcpStream, path: &str) -> String {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let mut buf = [0; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            if answer.len() >= end + 4 + len {
                return text[end + 4..].to_string();
            }
        }
    }
}

#[actix_rt::test]
async fn idle_keep_alive_connections_hold_no_buffer() {
    let srv = test_server(|| {
        HttpService::build()
            .h1(fn_service(|req: Request| async move {
                // The server's worker thread reports its pool.
                let body = if req.path() == "/stats" {
                    let stats = buffer_pool::stats();
                    format!("lent={} allocated={}", stats.lent, stats.allocated)
                } else {
                    "ok".to_owned()
                };
                Ok::<_, Infallible>(Response::ok().set_body(body))
            }))
            .tcp()
    })
    .await;
    let addr = srv.addr();

    // Connections made and used in turn, all kept open and idle.
    let idle = tokio::task::spawn_blocking(move || {
        (0..50)
            .map(|_| {
                let mut stream = TcpStream::connect(addr).unwrap();
                assert_eq!(get(&mut stream, "/"), "ok");
                stream
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();

    let stats = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        get(&mut stream, "/stats")
    })
    .await
    .unwrap();

    // Only the connection asking holds a buffer (its read buffer, while its request is
    // served); the 50 idle ones hold none (upstream: 16 KiB each), and were all read and
    // answered with the same few buffers.
    let lent: usize = stats["lent=".len()..stats.find(' ').unwrap()]
        .parse()
        .unwrap();
    let allocated: u64 = stats[stats.find("allocated=").unwrap() + "allocated=".len()..]
        .parse()
        .unwrap();
    assert_eq!(lent, 1, "{stats}");
    assert!(allocated <= 4, "{stats}");

    drop(idle);
}
