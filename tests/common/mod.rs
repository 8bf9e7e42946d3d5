//! The test harness: real backends on loopback, a real `redis-server` on a free port, and
//! the real balancer started in-process on ephemeral ports. One helper, many tests.
#![allow(dead_code)]

pub mod cluster;
pub mod tls;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU16, AtomicUsize, Ordering},
        Arc, Mutex,
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
    handle: ServerHandle,
}

#[derive(Clone)]
struct BackendState {
    name: String,
    hits: Arc<AtomicUsize>,
    health: Arc<AtomicU16>,
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
        Self::launch(name, port, None, Self::routes)
    }

    /// Starts a backend on a free port that speaks HTTPS (HTTP/1.1) with `tls`.
    pub fn start_tls(name: &str, tls: rustls::ServerConfig) -> Backend {
        Self::launch(name, 0, Some(tls), Self::routes)
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
        Self::launch(name, 0, None, move |cfg| {
            cfg.default_service(web::to(move |state: web::Data<BackendState>| async move {
                state.hits.fetch_add(1, Ordering::SeqCst);
                actix_rt::time::sleep(delay).await;
                HttpResponse::Ok().body(state.name.clone())
            }));
        })
    }

    /// One worker on `127.0.0.1:port` serving `/health` and the routes of `routes`.
    fn launch(
        name: &str,
        port: u16,
        tls: Option<rustls::ServerConfig>,
        routes: impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
    ) -> Backend {
        let listener = bind_retry(port);
        let addr = listener.local_addr().unwrap();
        let state = BackendState {
            name: name.to_string(),
            hits: Arc::new(AtomicUsize::new(0)),
            health: Arc::new(AtomicU16::new(200)),
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

/// What a [`Scripted`] backend does after reading a request.
pub enum Step {
    /// Writes these bytes.
    Send(Vec<u8>),
    /// Waits this many milliseconds.
    Sleep(u64),
    /// Closes the connection (without answering, if nothing was sent).
    Close,
    /// Sends back everything it reads, until the peer closes: a tunnel's far end.
    Echo,
}

impl Step {
    pub fn send(bytes: impl AsRef<[u8]>) -> Step {
        Step::Send(bytes.as_ref().to_vec())
    }
}

/// A backend that speaks raw bytes, for what an actix backend cannot send: for every
/// request it reads (head, and a Content-Length body), `script(connection, request, head)`
/// says what to do. Connections and requests count from 0; each connection has a thread.
pub struct Scripted {
    pub addr: SocketAddr,
    /// Every request head read, with the connection it came on.
    pub requests: Arc<Mutex<Vec<(usize, String)>>>,
}

type Script = dyn Fn(usize, usize, &str) -> Vec<Step> + Send + Sync;

impl Scripted {
    pub fn start(script: impl Fn(usize, usize, &str) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let script: Arc<Script> = Arc::new(script);
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { continue };
                let (seen, script) = (seen.clone(), script.clone());
                std::thread::spawn(move || Self::serve(conn, n, &seen, &*script));
            }
        });
        Scripted { addr, requests }
    }

    fn serve(mut conn: TcpStream, n: usize, seen: &Mutex<Vec<(usize, String)>>, script: &Script) {
        for i in 0.. {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => return,
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<u64>().ok())?
                })
                .unwrap_or(0);
            if std::io::copy(&mut (&mut conn).take(length), &mut std::io::sink()).is_err() {
                return;
            }
            seen.lock().unwrap().push((n, head.clone()));
            for step in script(n, i, &head) {
                match step {
                    Step::Send(bytes) => {
                        if conn.write_all(&bytes).is_err() {
                            return;
                        }
                    }
                    Step::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
                    Step::Close => return,
                    Step::Echo => {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(k @ 1..) = conn.read(&mut buf) {
                            if conn.write_all(&buf[..k]).is_err() {
                                return;
                            }
                        }
                        return;
                    }
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request heads read so far.
    pub fn heads(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, h)| h.clone())
            .collect()
    }

    /// How many connections the requests came on.
    pub fn connections(&self) -> usize {
        let seen = self.requests.lock().unwrap();
        seen.iter()
            .map(|(c, _)| *c)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }
}

/// A backend that answers every request with `response`, raw bytes, then closes.
pub struct RawBackend(pub Scripted);

impl RawBackend {
    pub fn start(response: &'static [u8]) -> RawBackend {
        RawBackend(Scripted::start(move |_, _, _| {
            vec![Step::send(response), Step::Close]
        }))
    }

    pub fn url(&self) -> String {
        self.0.url()
    }
}

/// Binds `127.0.0.1:port`, retrying a little while a just-closed port is released.
fn bind_retry(port: u16) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => return l,
            Err(e) if Instant::now() > deadline => panic!("bind 127.0.0.1:{port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

async fn name_route(state: web::Data<BackendState>) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok().body(state.name.clone())
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

/// A `redis-server` of the test's own, on a free port, with no persistence; stopped on drop.
pub struct Redis {
    pub port: u16,
    child: Mutex<Option<Child>>,
}

impl Redis {
    /// Starts `redis-server` on a free port and waits until it answers PING.
    pub fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = Redis {
            port,
            child: Mutex::new(None),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port.
    pub fn restart(&self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    /// Stops the server (the port then refuses connections).
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ping(&self) -> bool {
        self.command(&["PING"]).is_some_and(|r| r.contains("PONG"))
    }

    /// Runs one command with the inline protocol and returns the raw reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on now (bound, then released), for a listener of the binary.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The built `roundabout` binary, run on a config file of the test's, its stderr kept in a
/// file the test can read; killed on drop.
pub struct Binary {
    pub child: Child,
    /// `listen.address`'s port.
    pub port: u16,
    pub config: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
}

impl Binary {
    /// Starts the binary on `config` (TOML), which must listen on `127.0.0.1:port`, and
    /// waits until it accepts connections.
    pub async fn start(port: u16, config: &str) -> Binary {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(config.as_bytes()).unwrap();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_roundabout"))
            .args(["--config", file.path().to_str().unwrap()])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr.reopen().unwrap()))
            .spawn()
            .unwrap();
        let b = Binary {
            child,
            port,
            config: file,
            stderr,
        };
        assert!(
            eventually(Duration::from_secs(10), async || {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await,
            "the binary listens on {port}: {}",
            b.log()
        );
        b
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything it has written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap()
    }

    /// Replaces its config file's text (to be read on the next SIGHUP).
    pub fn rewrite_config(&self, text: &str) {
        std::fs::write(self.config.path(), text).unwrap();
    }

    /// Sends it `signal` (e.g. `libc::SIGHUP`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "signal {signal} sent");
    }

    /// Waits until its log has `n` lines containing `needle`; panics with the log if not.
    pub async fn wait_log(&self, needle: &str, n: usize) {
        let seen = eventually(Duration::from_secs(10), async || {
            self.log().lines().filter(|l| l.contains(needle)).count() >= n
        })
        .await;
        assert!(seen, "no {n}× {needle:?} in the log:\n{}", self.log());
    }

    /// Peak resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
