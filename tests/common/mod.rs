//! The test harness: real backends on loopback, a real `redis-server` on a free port, and
//! the real balancer started in-process on ephemeral ports. One helper, many tests.
#![allow(dead_code)]

mod binary;
pub mod cluster;
pub mod dns;
pub mod handover;
mod raw;
mod redis;
pub mod tls;

// Not every test file uses every helper.
#[allow(unused_imports)]
pub use self::{binary::*, raw::*, redis::*};

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU16, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix_web::{
    dev::ServerHandle, http::StatusCode, web, App, HttpRequest, HttpResponse, HttpServer,
};
use futures_util::StreamExt as _;
use roundabout::{config::Config, Running};
use sha2::{Digest, Sha256};

/// A test backend on `127.0.0.1:<free port>`.
///
/// Routes: `/` and anything unknown answer `name`; `/health` answers `health_status`;
/// `/status/{code}`; `/headers` echoes the request headers as JSON (`[[name, value], …]`);
/// `/sha256` hashes the request body; `/slow/{ms}`; `/bytes/{n}` streams n bytes;
/// `/stall` sends headers then pauses its body for 3 s; `/cookies` sets two cookies;
/// `/redirect` answers 301.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// `http`, or `https` for a backend started with [`Backend::start_tls`].
    pub scheme: &'static str,
    /// Requests seen on every route but `/health`.
    pub hits: Arc<AtomicUsize>,
    /// What `/health` answers.
    pub health_status: Arc<AtomicU16>,
    /// The status `/` (and every path no other route takes) answers with its name.
    pub answer_status: Arc<AtomicU16>,
    handle: ServerHandle,
}

#[derive(Clone)]
struct BackendState {
    name: String,
    hits: Arc<AtomicUsize>,
    health: Arc<AtomicU16>,
    answer: Arc<AtomicU16>,
}

impl Backend {
    /// Starts a backend on a free port.
    pub fn start(name: &str) -> Backend {
        Self::start_on(name, 0)
    }

    /// Three backends named `a`, `b` and `c`.
    pub fn abc() -> (Backend, Backend, Backend) {
        (Self::start("a"), Self::start("b"), Self::start("c"))
    }

    /// Starts a backend on `port` (0 = a free one), e.g. to bring one back where it was.
    pub fn start_on(name: &str, port: u16) -> Backend {
        Self::launch(name, ("127.0.0.1", port), None, Self::routes)
    }

    /// Starts a backend on `ip:port` (another loopback address, say 127.0.0.2).
    pub fn start_at(name: &str, ip: &str, port: u16) -> Backend {
        Self::launch(name, (ip, port), None, Self::routes)
    }

    /// Starts a backend on a free port that speaks HTTPS (HTTP/1.1) with `tls`.
    pub fn start_tls(name: &str, tls: rustls::ServerConfig) -> Backend {
        Self::launch(name, ("127.0.0.1", 0), Some(tls), Self::routes)
    }

    fn routes(cfg: &mut web::ServiceConfig) {
        cfg.route("/headers", web::to(headers))
            .route("/sha256", web::to(sha256))
            .route("/status/{code}", web::to(status))
            .route("/slow/{ms}", web::to(slow))
            .route("/bytes/{n}", web::to(bytes))
            .route("/stall", web::to(stall))
            .route("/cookies", web::to(cookies))
            .route("/redirect", web::to(redirect))
            .route("/drip/{n}", web::to(drip))
            .route(
                "/peer",
                web::to(|req: HttpRequest| async move {
                    HttpResponse::Ok().body(req.peer_addr().unwrap().to_string())
                }),
            )
            .default_service(web::to(name_route));
    }

    /// Starts a backend on a free port whose `/` (and every route but `/health`) waits
    /// `ms` milliseconds before answering `name`: a slow server for the load-aware
    /// strategies, whichever path the proxy is asked for.
    pub fn start_slow(name: &str, ms: u64) -> Backend {
        let delay = Duration::from_millis(ms);
        Self::launch(name, ("127.0.0.1", 0), None, move |cfg| {
            cfg.default_service(web::to(move |state: web::Data<BackendState>| async move {
                state.hits.fetch_add(1, Ordering::SeqCst);
                actix_rt::time::sleep(delay).await;
                HttpResponse::Ok().body(state.name.clone())
            }));
        })
    }

    /// One worker on `ip:port` (port 0: a free one) serving `/health` and the routes of `routes`.
    fn launch(
        name: &str,
        (ip, port): (&str, u16),
        tls: Option<rustls::ServerConfig>,
        routes: impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
    ) -> Backend {
        let listener = bind_retry(ip, port);
        let addr = listener.local_addr().unwrap();
        let state = BackendState {
            name: name.to_string(),
            hits: Arc::new(AtomicUsize::new(0)),
            health: Arc::new(AtomicU16::new(200)),
            answer: Arc::new(AtomicU16::new(200)),
        };
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(app_state.clone()))
                .route("/health", web::get().to(health))
                .configure(routes.clone())
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = match tls {
            None => server.listen(listener),
            Some(tls) => server.listen_rustls_0_23(listener, tls),
        }
        .unwrap()
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Backend {
            name: state.name,
            addr,
            scheme,
            hits: state.hits,
            health_status: state.health,
            answer_status: state.answer,
            handle,
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn set_health(&self, status: u16) {
        self.health_status.store(status, Ordering::SeqCst);
    }

    /// Stops the backend and waits until its port refuses connections.
    pub async fn stop(&self) {
        self.handle.stop(false).await;
        for _ in 0..100 {
            if TcpStream::connect(self.addr).is_err() {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("backend {} still accepts after stop", self.name);
    }
}

/// A port on which nothing listens (bound, then released).
pub fn dead_url() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

/// Binds `127.0.0.1:port`, retrying a little while a just-closed port is released.
fn bind_retry(ip: &str, port: u16) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind((ip, port)) {
            Ok(l) => return l,
            Err(e) if Instant::now() > deadline => panic!("bind {ip}:{port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

async fn name_route(state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let status = StatusCode::from_u16(state.answer.load(Ordering::SeqCst)).unwrap();
    HttpResponse::build(status).body(state.name.clone())
}

async fn health(state: web::Data<BackendState>) -> HttpResponse {
    let code = StatusCode::from_u16(state.health.load(Ordering::SeqCst)).unwrap();
    HttpResponse::build(code).body("health")
}

async fn headers(req: HttpRequest, state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let list: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect();
    HttpResponse::Ok()
        .insert_header(("x-backend", state.name.clone()))
        .json(serde_json::json!({
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
            "headers": list,
        }))
}

async fn sha256(mut body: web::Payload, state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mut hasher = Sha256::new();
    let mut n = 0usize;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        n += chunk.len();
        hasher.update(&chunk);
    }
    HttpResponse::Ok().body(format!("{} {:x}", n, hasher.finalize()))
}

async fn status(path: web::Path<u16>, state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let code = StatusCode::from_u16(path.into_inner()).unwrap();
    if code == StatusCode::NO_CONTENT {
        return HttpResponse::NoContent().finish();
    }
    HttpResponse::build(code).body(format!("status {}", code.as_u16()))
}

async fn slow(path: web::Path<u64>, state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    actix_rt::time::sleep(Duration::from_millis(path.into_inner())).await;
    HttpResponse::Ok().body(state.name.clone())
}

async fn bytes(path: web::Path<u64>, state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let total = path.into_inner();
    let chunk = web::Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = (total - sent).min(chunk.len() as u64);
            Some((
                Ok::<_, actix_web::Error>(chunk.slice(..n as usize)),
                sent + n,
            ))
        }
    });
    HttpResponse::Ok().streaming(stream)
}

async fn stall(state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let stream = futures_util::stream::unfold(0u8, |step| async move {
        match step {
            0 => Some((
                Ok::<_, actix_web::Error>(web::Bytes::from_static(b"first ")),
                1,
            )),
            1 => {
                actix_rt::time::sleep(Duration::from_secs(3)).await;
                Some((Ok(web::Bytes::from_static(b"late")), 2))
            }
            _ => None,
        }
    });
    HttpResponse::Ok().streaming(stream)
}

/// `n` chunks, one every 200 ms: a download that flows but takes a while; `x-backend` says
/// whose it is.
async fn drip(path: web::Path<u32>, state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let n = path.into_inner();
    let stream = futures_util::stream::unfold(0u32, move |i| async move {
        if i == n {
            return None;
        }
        actix_rt::time::sleep(Duration::from_millis(200)).await;
        Some((
            Ok::<_, actix_web::Error>(web::Bytes::from_static(b"drop\n")),
            i + 1,
        ))
    });
    HttpResponse::Ok()
        .insert_header(("x-backend", state.name.clone()))
        .streaming(stream)
}

async fn cookies(state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok()
        .append_header(("set-cookie", "a=1; Path=/"))
        .append_header(("set-cookie", "b=2; HttpOnly"))
        .body("cookies")
}

async fn redirect(state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    HttpResponse::MovedPermanently()
        .insert_header(("location", "/elsewhere"))
        .finish()
}

/// The TOML of a test balancer: one worker, ephemeral ports, fast health checks, no limiter
/// unless `extra` turns it on. `extra` is appended and may add sections or override keys
/// (TOML forbids a key twice, so sections given in `extra` replace the defaults here).
pub fn config_text(servers: &[String], extra: &str) -> String {
    let servers = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sections = vec![
        (
            "listen",
            "address = \"127.0.0.1:0\"\nworkers = 1".to_string(),
        ),
        ("balancer", format!("servers = [{servers}]")),
        (
            "health_check",
            "path = \"/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"".to_string(),
        ),
        ("rate_limit", "enabled = false".to_string()),
        ("admin", "address = \"127.0.0.1:0\"".to_string()),
        ("log", "access_log = false".to_string()),
    ];
    let mut out = String::new();
    for (name, body) in sections.drain(..) {
        if extra.contains(&format!("[{name}]")) {
            continue;
        }
        out.push_str(&format!("[{name}]\n{body}\n\n"));
    }
    out.push_str(extra);
    out
}

/// A validated config for `servers`, with `extra` as in [`config_text`].
pub fn config(servers: &[String], extra: &str) -> Config {
    Config::from_toml_with_env(
        "test.toml",
        &config_text(servers, extra),
        Some(Default::default()),
    )
    .expect("test config is valid")
}

/// Starts the balancer in-process (inside the test's actix system).
pub fn balancer(servers: &[String], extra: &str) -> Running {
    roundabout::start(config(servers, extra)).expect("balancer starts")
}

pub fn urls(backends: &[&Backend]) -> Vec<String> {
    backends.iter().map(|b| b.url()).collect()
}

/// A client for talking to the balancer: no redirects, no timeout of its own past 30 s.
pub fn client() -> awc::Client {
    awc::Client::builder()
        .disable_redirects()
        .timeout(Duration::from_secs(30))
        .finish()
}

/// GETs `url` and returns (status, body).
pub async fn get(url: &str) -> (u16, String) {
    let mut res = client()
        .get(url)
        .send()
        .await
        .expect("request reaches the balancer");
    let body = res.body().limit(64 << 20).await.expect("body");
    (
        res.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The `/metrics` body of `lb`'s admin listener.
pub async fn metrics_of(lb: &Running) -> String {
    let admin = lb.admin_addr.expect("the balancer has an admin listener");
    get(&format!("http://{admin}/metrics")).await.1
}

/// The value of the first line of `text` (a `/metrics` body) that starts with `line_start`
/// (a series and its labels, with the space after them); panics when there is none.
pub fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in {text}"))
}

/// Sends raw bytes on a new connection and returns everything read until the server closes
/// or stays quiet for 500 ms. Async, so the test's own actors keep running meanwhile.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `cond` every 20 ms until it holds or `within` passes; true if it held.
pub async fn eventually(within: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    cond().await
}
