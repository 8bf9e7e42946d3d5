//! awc, the proxy's upstream client, against scripted raw-TCP backends: the framing cases
//! that the vendored awc and actix-http fix (see `vendor/awc/VENDORED.md` and
//! `vendor/actix-http/VENDORED.md`). Each test fails on upstream awc 3.11.0 with actix-http
//! 3.20.0; when all pass there, the vendored copies can go.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

/// Each client step is bounded, so a framing bug shows up as a failure, not a hang.
const STEP: Duration = Duration::from_secs(5);

/// A backend on `127.0.0.1:<free port>` that runs `script` on each connection it accepts,
/// each in its own thread, and counts the connections and records the request heads it read.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

/// What a script gets: the connection, and the log of request heads.
struct Conn {
    stream: TcpStream,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Conn {
    /// Reads one request head (no body); `None` if the client closed first.
    fn head(&mut self) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match self.stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return None,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        self.heads.lock().unwrap().push(head.clone());
        Some(head)
    }

    /// Writes `bytes`; a client that has gone is the test's to notice, not the backend's.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Sends what is left, then closes the connection: the end of a response that a
    /// close ends (or cuts).
    fn close(mut self) {
        let _ = self.stream.flush();
        let _ = self.stream.shutdown(Shutdown::Write);
        // Read until the client closes, so that no unread byte turns the close into a reset.
        let mut sink = [0u8; 1024];
        while matches!(self.stream.read(&mut sink), Ok(n) if n > 0) {}
    }
}

impl Scripted {
    fn start(script: impl Fn(Conn) + Send + Sync + 'static) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (connections.clone(), heads.clone());
        let script = Arc::new(script);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                stream.set_read_timeout(Some(STEP * 2)).unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (script, heads) = (script.clone(), log.clone());
                std::thread::spawn(move || script(Conn { stream, heads }));
            }
        });
        Scripted {
            addr,
            connections,
            heads,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// The proxy's way of using awc: keep-alive pool, no decompression, no default headers.
fn client() -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .disable_redirects()
        .no_default_headers()
        .disable_timeout()
        .finish()
}

async fn send(req: awc::ClientRequest) -> awc::ClientResponse {
    actix_rt::time::timeout(STEP, req.no_decompress().send())
        .await
        .expect("response head in time")
        .expect("response head")
}

/// Reads a response body as the proxy does, chunk by chunk: the bytes, or the first error.
async fn body(res: &mut awc::ClientResponse) -> Result<Bytes, awc::error::PayloadError> {
    let mut all = BytesMut::new();
    loop {
        match actix_rt::time::timeout(STEP, res.next()).await {
            Err(_) => panic!("body stream stalled after {:?}", all),
            Ok(None) => return Ok(all.freeze()),
            Ok(Some(Ok(chunk))) => all.extend_from_slice(&chunk),
            Ok(Some(Err(e))) => return Err(e),
        }
    }
}

// --- a close before any answer -----------------------------------------------------------

#[actix_rt::test]
async fn a_close_before_any_answer_is_a_response_error_not_a_connect_error() {
    let backend = Scripted::start(|mut c| {
        c.head();
        c.close();
    });
    let res = client().get(backend.url("/")).send().await;
    match res {
        Err(awc::error::SendRequestError::Response(_)) => {}
        Err(e) => panic!("wrong error: {e:?}"),
        Ok(res) => panic!("an answer: {}", res.status()),
    }
}

// --- 1xx interim responses ---------------------------------------------------------------

#[actix_rt::test]
async fn interim_103_is_skipped_and_the_next_request_gets_its_own_answer() {
    let backend = Scripted::start(|mut c| {
        if c.head().is_some() {
            c.send(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
                  HTTP/1.1 100 Continue\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
            );
        }
        if c.head().is_some() {
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond");
        }
        c.close();
    });
    let client = client();

    let mut res = send(client.get(backend.url("/1"))).await;
    assert_eq!(
        res.status(),
        200,
        "an interim answer taken for the final one"
    );
    assert_eq!(body(&mut res).await.unwrap(), "first");

    let mut res = send(client.get(backend.url("/2"))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(body(&mut res).await.unwrap(), "second");
    assert_eq!(
        backend.connections(),
        1,
        "the second request reused the connection"
    );
    let heads = backend.heads();
    assert!(heads[0].starts_with("GET /1 ") && heads[1].starts_with("GET /2 "));
}

#[actix_rt::test]
async fn expect_100_continue_still_sends_the_body_after_interim_answers() {
    let backend = Scripted::start(|mut c| {
        let Some(head) = c.head() else { return };
        assert!(head.to_ascii_lowercase().contains("expect: 100-continue"));
        c.send(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n");
        let mut sent = [0u8; 4];
        c.stream.read_exact(&mut sent).unwrap();
        c.send(
            b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\n",
        );
        c.send(&sent);
        c.close();
    });

    let req = client()
        .post(backend.url("/"))
        .insert_header(("expect", "100-continue"))
        .no_decompress()
        .send_body("ping");
    let mut res = actix_rt::time::timeout(STEP, req).await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(body(&mut res).await.unwrap(), "ping");
}

// --- bodies cut short --------------------------------------------------------------------

#[actix_rt::test]
async fn chunked_body_cut_before_the_last_chunk_is_an_error() {
    let backend = Scripted::start(|mut c| {
        if c.head().is_some() {
            c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
        }
        c.close();
    });

    let mut res = send(client().get(backend.url("/"))).await;
    assert_eq!(res.status(), 200);
    let got = body(&mut res).await;
    assert!(got.is_err(), "a cut chunked body read as complete: {got:?}");
}

#[actix_rt::test]
async fn chunked_body_cut_inside_a_chunk_is_an_error() {
    let backend = Scripted::start(|mut c| {
        if c.head().is_some() {
            c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nhel");
        }
        c.close();
    });

    let mut res = send(client().get(backend.url("/"))).await;
    let got = body(&mut res).await;
    assert!(got.is_err(), "a cut chunked body read as complete: {got:?}");
}

#[actix_rt::test]
async fn content_length_body_cut_is_an_error() {
    let backend = Scripted::start(|mut c| {
        if c.head().is_some() {
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello");
        }
        c.close();
    });

    let mut res = send(client().get(backend.url("/"))).await;
    assert_eq!(res.status(), 200);
    let got = body(&mut res).await;
    assert!(
        got.is_err(),
        "a cut Content-Length body read as complete: {got:?}"
    );
}

// --- bodies that the close ends ----------------------------------------------------------

async fn close_delimited(version: &'static str) {
    let backend = Scripted::start(move |mut c| {
        if c.head().is_some() {
            c.send(format!("HTTP/{version} 200 OK\r\nX-Kind: close-delimited\r\n\r\n").as_bytes());
            c.send(b"the whole ");
            std::thread::sleep(Duration::from_millis(50));
            c.send(b"body, until the close");
        }
        c.close();
    });
    let client = client();

    let mut res = send(client.get(backend.url("/"))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        body(&mut res).await.unwrap(),
        "the whole body, until the close"
    );

    // The connection ended with the body: never pooled, so a second request opens another.
    let mut res = send(client.get(backend.url("/"))).await;
    assert_eq!(
        body(&mut res).await.unwrap(),
        "the whole body, until the close"
    );
    assert_eq!(backend.connections(), 2);
}

#[actix_rt::test]
async fn close_delimited_bodies_are_read_to_the_close() {
    // RFC 9112 §6.3 rule 8. Upstream reads the HTTP/1.0 one right, and an HTTP/1.1 one as
    // empty (and pools the connection).
    close_delimited("1.1").await;
    close_delimited("1.0").await;
}

#[actix_rt::test]
async fn not_modified_and_no_content_have_no_body_whatever_their_headers() {
    // RFC 9112 §6.3 rule 1: a 304's Content-Length is the representation's, not a body's;
    // and neither a 304 nor a 204 without one is close-delimited. All three on one
    // connection, which stays in the pool.
    let backend = Scripted::start(|mut c| {
        let answers: [&[u8]; 3] = [
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"x\"\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\n\r\n",
        ];
        for answer in answers {
            if c.head().is_none() {
                return;
            }
            c.send(answer);
        }
        c.close();
    });
    let client = client();
    for status in [304, 204, 304] {
        let mut res = send(client.get(backend.url("/"))).await;
        assert_eq!(res.status(), status);
        assert_eq!(body(&mut res).await.unwrap(), "");
    }
    assert_eq!(backend.connections(), 1);
}

// --- upgrades ----------------------------------------------------------------------------

/// Reads from `io` into `buf` until it holds `n` bytes.
async fn read_to_len(io: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut, n: usize) {
    while buf.len() < n {
        let read = actix_rt::time::timeout(STEP, io.read_buf(buf))
            .await
            .expect("tunnel bytes in time")
            .expect("tunnel read");
        assert!(read > 0, "tunnel closed after {buf:?}");
    }
}

#[actix_rt::test]
async fn upgrade_101_gives_a_tunnel_both_ways() {
    const GREETING: &[u8] = b"hello from the server|";
    let backend = Scripted::start(|mut c| {
        if c.head().is_none() {
            return;
        }
        // an interim answer first, then the switch, and the new protocol's first bytes
        // in the same write
        let mut answer = b"HTTP/1.1 103 Early Hints\r\n\r\n\
            HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo/1\r\n\r\n"
            .to_vec();
        answer.extend_from_slice(GREETING);
        c.send(&answer);
        // then echo every byte until the client closes
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = c.stream.read(&mut buf) {
            c.send(&buf[..n]);
        }
    });

    let req = client()
        .get(backend.url("/tunnel"))
        .insert_header(("upgrade", "echo/1"))
        .insert_header(("connection", "Upgrade"))
        .send_upgrade();
    let answer = actix_rt::time::timeout(STEP, req).await.unwrap().unwrap();
    assert_eq!(answer.status(), 101);
    let awc::UpgradeResponse::Switched(res, framed) = answer else {
        panic!("not switched")
    };
    assert_eq!(res.headers().get("upgrade").unwrap(), "echo/1");

    // bytes read past the head come first, then the socket
    let parts = framed.into_parts();
    assert!(parts.write_buf.is_empty());
    let (mut got, mut io) = (parts.read_buf, parts.io);
    read_to_len(&mut io, &mut got, GREETING.len()).await;
    assert_eq!(&got[..], GREETING);

    // both ways, more than one read's worth
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    io.write_all(&sent).await.unwrap();
    let mut echoed = BytesMut::new();
    read_to_len(&mut io, &mut echoed, sent.len()).await;
    assert_eq!(&echoed[..], &sent[..]);

    // the head as sent: our Upgrade header, one Connection header that names it, no body
    let head = backend.heads()[0].to_ascii_lowercase();
    assert!(head.starts_with("get /tunnel http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nupgrade: echo/1\r\n"), "{head}");
    assert_eq!(head.matches("\r\nconnection:").count(), 1, "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(head.contains("\r\nhost: 127.0.0.1:"), "{head}");
    assert!(!head.contains("content-length") && !head.contains("transfer-encoding"));
}

#[actix_rt::test]
async fn upgrade_answered_without_101_is_an_ordinary_response() {
    let backend = Scripted::start(|mut c| {
        if c.head().is_some() {
            c.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  6\r\nno upg\r\n6\r\nrade, \r\n6\r\nthanks\r\n0\r\n\r\n",
            );
        }
        c.close();
    });

    let req = client()
        .get(backend.url("/"))
        .insert_header(("upgrade", "echo/1"))
        .send_upgrade();
    let answer = actix_rt::time::timeout(STEP, req).await.unwrap().unwrap();
    let awc::UpgradeResponse::NotSwitched(mut res) = answer else {
        panic!("switched on a 200")
    };
    assert_eq!(res.status(), 200);
    assert_eq!(body(&mut res).await.unwrap(), "no upgrade, thanks");
}

#[actix_rt::test]
async fn upgrade_request_needs_an_upgrade_header() {
    let res = client().get("http://127.0.0.1:1/").send_upgrade().await;
    assert!(matches!(
        res,
        Err(awc::error::SendRequestError::MissingUpgradeHeader)
    ));
}

// --- a forwarded head (roundabout's patch for issue #25) ----------------------------------

/// A proxy's head: the incoming headers but those it drops, then its own.
struct Forwarded {
    head: actix_http::RequestHead,
    incoming: awc::http::header::HeaderMap,
    own: Vec<(
        awc::http::header::HeaderName,
        awc::http::header::HeaderValue,
    )>,
}

impl actix_http::ForwardedHead for Forwarded {
    fn head(&self) -> &actix_http::RequestHead {
        &self.head
    }

    fn target(&self) -> &str {
        "/from/the/client?q=1"
    }

    fn headers(
        &self,
        f: &mut dyn FnMut(&awc::http::header::HeaderName, &awc::http::header::HeaderValue),
    ) {
        for (name, value) in self.incoming.iter() {
            if name != "x-dropped" {
                f(name, value);
            }
        }
        for (name, value) in &self.own {
            f(name, value);
        }
    }

    fn has(&self, name: &awc::http::header::HeaderName) -> bool {
        self.own.iter().any(|(n, _)| n == name)
            || (name != "x-dropped" && self.incoming.contains_key(name))
    }
}

#[actix_rt::test]
async fn a_forwarded_head_goes_out_as_its_parts_say_on_a_kept_alive_connection() {
    use awc::http::header::{HeaderMap, HeaderName, HeaderValue};
    let backend = Scripted::start(|mut c| {
        while c.head().is_some() {
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let client = client();
    for _ in 0..2 {
        let mut incoming = HeaderMap::new();
        incoming.insert(
            HeaderName::from_static("host"),
            HeaderValue::from_static("client.test"),
        );
        incoming.insert(
            HeaderName::from_static("x-dropped"),
            HeaderValue::from_static("1"),
        );
        incoming.insert(
            HeaderName::from_static("accept"),
            HeaderValue::from_static("*/*"),
        );
        let head = Forwarded {
            head: actix_http::RequestHead::bare(
                awc::http::Method::GET,
                backend.url("/").parse().unwrap(),
            ),
            incoming,
            own: vec![(
                HeaderName::from_static("x-own"),
                HeaderValue::from_static("2"),
            )],
        };
        // No body at all (not an empty one, which has a length of 0), as a proxy sends a GET.
        let sent = client.send_forwarded(Box::new(head), None, actix_http::body::None::new());
        let mut res = actix_rt::time::timeout(STEP, sent)
            .await
            .expect("response head in time")
            .expect("response head");
        assert_eq!(body(&mut res).await.unwrap(), "ok");
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1, "kept alive");
    let heads = backend.heads();
    assert_eq!(heads.len(), 2);
    let head = &heads[1];
    // The target, not the URI's path; the client's Host kept, not the URI's authority;
    // no body, so no length.
    assert!(
        head.starts_with("GET /from/the/client?q=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("host: client.test\r\n"), "{head}");
    assert!(head.contains("accept: */*\r\n"), "{head}");
    assert!(head.contains("x-own: 2\r\n"), "{head}");
    assert!(!head.contains("x-dropped"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
}
