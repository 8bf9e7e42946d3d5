//! The hot path, top to bottom: framing checks → client IP → rate limiter → balancer →
//! `awc` → stream the answer back.
//!
//! What is forwarded: method, path, query, every end-to-end header, the body (streamed, with
//! the client's framing: Content-Length stays Content-Length, chunked stays chunked).
//! What is not: the hop-by-hop headers of [`HOP_BY_HOP`] and every header named in
//! `Connection`, in both directions, and any `X-Forwarded-*` the client sent (we set ours).
//! Failures answer with a short plain-text body: 503 no server, 502 no connection, 504 no
//! answer within `proxy.timeout`, 413 body too large, 400 ambiguous framing or a malformed
//! request, 431 header section too large, 417 unknown expectation, 501 CONNECT, 429 limited.
//!
//! What is refused before any server is chosen (`check_request`): whatever actix-http
//! lets through that a strict intermediary must not pass on, because the next parser could
//! read it another way (RFC 9112 §3.2, §6.3; RFC 9110 §7.2, §9.1).

use std::{
    cell::{Cell, RefCell},
    future::Future as _,
    net::IpAddr,
    pin::Pin,
    rc::Rc,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use actix::Addr;
use actix_web::{
    body::{BodySize, BodyStream, BoxBody, MessageBody, None as NoBody, SizedStream},
    dev::Payload,
    error::PayloadError,
    http::{
        header::{self, HeaderMap, HeaderName, HeaderValue},
        uri::{PathAndQuery, Scheme, Uri},
        Method, StatusCode,
    },
    web, HttpRequest, HttpResponse, HttpResponseBuilder, ResponseError,
};
use awc::error::SendRequestError;
use bytes::Bytes;
use futures_util::Stream;
use ipnet::IpNet;

use crate::{
    balancer::{BalancerActor, Lease, NextServer},
    config::{Config, ProxySection},
    health::{describe, ConnectFailed, HealthActor},
    metrics::Metrics,
    rate_limit::{ceil_secs, Check, Decision, RateLimitActor, Verdict},
    upstream::Upstream,
};

/// Headers that describe one connection, not the message; never forwarded (RFC 9110 §7.6.1).
/// `Expect` is among them because it is answered here (actix sends the 100 Continue).
/// `Host` is copied, and replaced by the server's authority when `preserve_host = false`.
pub const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::EXPECT,
];

/// The largest request head forwarded (request line and header fields, counted as sent);
/// past it, 431. actix-http itself only stops at 128 KiB of unparsed head; nginx's default
/// is 8 KiB a line, 32 KiB in all.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The longest method token forwarded; the longest registered one has 17 bytes.
const MAX_METHOD_LEN: usize = 32;

const SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Settings every worker reads, shared (`Arc`) between them.
pub struct Shared {
    pub proxy: ProxySection,
    pub trusted_proxies: Vec<IpNet>,
    /// `Retry-After` for 503 "no healthy server": the health interval, whole seconds, ≥ 1.
    pub retry_after_no_server: HeaderValue,
    /// `RateLimit-Policy` value, fixed by the config.
    pub ratelimit_policy: Option<HeaderValue>,
    pub access_log: bool,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        let rl = &config.rate_limit;
        Self {
            proxy: config.proxy.clone(),
            trusted_proxies: rl.trusted_proxies.clone(),
            retry_after_no_server: HeaderValue::from(ceil_secs(config.health_check.interval)),
            ratelimit_policy: rl.enabled.then(|| {
                let value = format!("\"default\";q={};w={}", rl.requests, rl.window.as_secs());
                HeaderValue::from_str(&value).expect("digits and quotes are a header value")
            }),
            access_log: config.access_log,
            metrics,
        }
    }
}

/// One worker's handles: its balancer and limiter (same thread), its HTTP client.
pub struct Worker {
    /// `awc::Client` is not `Send`: one per worker, built in the worker's factory.
    pub client: awc::Client,
    pub balancer: Addr<BalancerActor>,
    pub limiter: Option<Addr<RateLimitActor>>,
    pub health: Addr<HealthActor>,
    pub shared: Arc<Shared>,
}

impl Worker {
    /// The upstream client a proxy needs: no redirects followed, no headers of its own, no
    /// cap on a whole exchange (we time the head and each body pause ourselves), no cap on
    /// connections, keep-alive on.
    pub fn client(proxy: &ProxySection) -> awc::Client {
        awc::Client::builder()
            .connector(
                awc::Connector::new()
                    .timeout(proxy.connect_timeout)
                    .limit(0)
                    .conn_keep_alive(Duration::from_secs(60))
                    .conn_lifetime(Duration::from_secs(600)),
            )
            .disable_redirects()
            .no_default_headers()
            .disable_timeout()
            .finish()
    }
}

/// Why the proxy answered for itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no healthy upstream server")]
    NoServer { retry_after: HeaderValue },
    #[error("could not reach an upstream server: {0}")]
    BadGateway(String),
    #[error("the upstream server did not answer in time")]
    GatewayTimeout,
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request header fields larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("only the expectation 100-continue is supported")]
    ExpectationFailed,
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("too many requests")]
    RateLimited(Decision),
    #[error("rate limiter unavailable")]
    LimiterUnavailable,
    #[error("balancer unavailable")]
    Unavailable,
}

impl ResponseError for ProxyError {
    fn status_code(&self) -> StatusCode {
        match self {
            ProxyError::NoServer { .. }
            | ProxyError::LimiterUnavailable
            | ProxyError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ProxyError::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::ExpectationFailed => StatusCode::EXPECTATION_FAILED,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        res.content_type("text/plain; charset=utf-8");
        match self {
            ProxyError::NoServer { retry_after } => {
                res.insert_header((header::RETRY_AFTER, retry_after.clone()));
            }
            ProxyError::RateLimited(d) => {
                res.insert_header((header::RETRY_AFTER, d.reset_secs));
            }
            // The body was not read: the connection cannot carry another request.
            ProxyError::TooLarge(_)
            | ProxyError::BadRequest(_)
            | ProxyError::HeadTooLarge
            | ProxyError::ExpectationFailed
            | ProxyError::NotImplemented(_) => {
                res.force_close();
            }
            _ => {}
        }
        res.body(format!("{self}\n"))
    }
}

/// The proxy handler: every request on `listen.address` comes here.
pub async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    worker: web::Data<Worker>,
) -> HttpResponse {
    let started = Instant::now();
    let shared = &worker.shared;
    let peer = req.peer_addr().map(|a| a.ip());
    let client_ip = peer.map(|p| client_ip(p, req.headers(), &shared.trusted_proxies));

    let mut decision = None;
    let outcome = match check_request(&req, &shared.proxy) {
        Err(e) => Err(e),
        Ok(body) => match limit(&worker, client_ip).await {
            Err(e) => Err(e),
            Ok(d) => {
                decision = d;
                send(&req, payload.into_inner(), body, peer, &worker).await
            }
        },
    };

    let (mut res, server) = match outcome {
        Ok((res, upstream)) => (res, Some(upstream)),
        Err(e) => {
            if let ProxyError::RateLimited(d) = &e {
                decision = Some(d.clone());
                shared.metrics.rate_limited();
            }
            (e.error_response(), None)
        }
    };
    if let Some(d) = &decision {
        rate_limit_headers(res.headers_mut(), d, shared.ratelimit_policy.as_ref());
    }

    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    shared.metrics.request(
        server.as_ref().map(|u| &u.counters),
        status,
        Some(elapsed.as_secs_f64()),
    );
    if !shared.access_log {
        return res;
    }
    // The line is written when the body has been sent (or the client went away), with the
    // bytes sent and the whole time taken, as nginx's `$body_bytes_sent` and `$request_time`.
    let entry = AccessEntry {
        client: client_ip,
        method: req.method().clone(),
        uri: req.uri().clone(),
        status,
        upstream: server,
        started,
        bytes: 0,
    };
    res.map_body(|_, body| BoxBody::new(Logged { body, entry }))
}

/// What the access log says of one request.
struct AccessEntry {
    client: Option<IpAddr>,
    method: Method,
    uri: Uri,
    status: u16,
    upstream: Option<Arc<Upstream>>,
    started: Instant,
    bytes: u64,
}

/// A response body that writes the access-log line when it is dropped.
struct Logged {
    body: BoxBody,
    entry: AccessEntry,
}

impl MessageBody for Logged {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let next = Pin::new(&mut self.body).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            self.entry.bytes += chunk.len() as u64;
        }
        next
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let e = &self.entry;
        log::info!(
            target: "roundabout::access",
            "{} \"{} {}\" {} {} {} {:.3}ms",
            DisplayOr(e.client.as_ref()),
            e.method,
            e.uri,
            e.status,
            e.bytes,
            e.upstream.as_ref().map_or("-", |u| &u.label),
            e.started.elapsed().as_secs_f64() * 1000.0,
        );
    }
}

/// Shows the value, or `-` when there is none.
struct DisplayOr<'a, T>(Option<&'a T>);

impl<T: std::fmt::Display> std::fmt::Display for DisplayOr<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// How the request body is framed, once the framing is known to be unambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Every check made before a request is forwarded; the framing when all pass.
///
/// actix-http has already refused a bad request line, bytes outside a header's grammar, a
/// second Host, a missing Host in HTTP/1.1 and the framing errors [`check_framing`] lists.
/// What it accepts and we do not forward: a method that is not an upper-case token (or is
/// CONNECT: we open no tunnels), `*` outside OPTIONS, an absolute-form target whose
/// authority is not the Host, a Host that is not `host[:port]`, a backslash or an encoded
/// NUL, CR or LF in the path, a head over [`MAX_HEAD_BYTES`], two Content-Types, header
/// names that a CGI-style server reads as Content-Length or Transfer-Encoding, an
/// expectation other than 100-continue, and a WebSocket handshake that cannot be valid.
fn check_request(req: &HttpRequest, proxy: &ProxySection) -> Result<Framing, ProxyError> {
    let method = req.method();
    if *method == Method::CONNECT {
        return Err(ProxyError::NotImplemented("CONNECT"));
    }
    let m = method.as_str();
    if m.len() > MAX_METHOD_LEN
        || !m
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Err(ProxyError::BadRequest("invalid method"));
    }

    let headers = req.headers();
    let uri = req.uri();
    let path = uri.path();
    if path == "*" && *method != Method::OPTIONS {
        return Err(ProxyError::BadRequest("'*' is only a target for OPTIONS"));
    }
    if !clean_path(path.as_bytes()) {
        return Err(ProxyError::BadRequest("invalid path"));
    }

    // actix-http refuses a second Host and, in HTTP/1.1, a missing one.
    let host = headers.get(header::HOST);
    if let Some(host) = host {
        if !valid_host(host.as_bytes()) {
            return Err(ProxyError::BadRequest("invalid Host"));
        }
    }
    // Absolute form: the target's authority is the host (RFC 9112 §3.2.2); one that the
    // Host field contradicts would reach the server as the other. (No Host: HTTP/1.0.)
    if let Some(authority) = uri.authority() {
        let same = host.is_none_or(|h| {
            h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        });
        if !same || !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(ProxyError::BadRequest("target and Host disagree"));
        }
    }

    let mut head = m.len() + uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    for (name, value) in headers {
        head += name.as_str().len() + value.len() + 4;
        if matches!(name.as_str(), "content_length" | "transfer_encoding") {
            return Err(ProxyError::BadRequest("framing header name with '_'"));
        }
    }
    if head > MAX_HEAD_BYTES {
        return Err(ProxyError::HeadTooLarge);
    }
    let mut types = headers.get_all(header::CONTENT_TYPE);
    if types.next().is_some() && types.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Content-Type"));
    }
    // actix-http answers 100-continue itself; anything else we cannot meet (RFC 9110 §10.1.1).
    if headers.get_all(header::EXPECT).any(|v| {
        !v.as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"100-continue")
    }) {
        return Err(ProxyError::ExpectationFailed);
    }

    let framing = check_framing(req, proxy)?;
    if let Some(upgrade) = headers.get(header::UPGRADE) {
        // actix-http reads everything after a WebSocket handshake as its body, whatever the
        // framing says; and no server accepts a version other than 13 (RFC 6455 §4.4).
        let websocket = upgrade
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
        if websocket
            && (framing != Framing::None
                || headers
                    .get(SEC_WEBSOCKET_VERSION)
                    .is_some_and(|v| v.as_bytes() != b"13"))
        {
            return Err(ProxyError::BadRequest("invalid WebSocket handshake"));
        }
    }
    Ok(framing)
}

/// True for a Host value of the form `host[:port]` (RFC 9110 §7.2): a reg-name of letters,
/// digits, `-`, `.`, `_`, `~`, or a bracketed IPv6 literal; a port of 1 to 5 digits. No
/// user info, no path, no list, no empty value.
fn valid_host(value: &[u8]) -> bool {
    let (name_ok, port) = match value.strip_prefix(b"[") {
        Some(rest) => match rest.iter().position(|&b| b == b']') {
            Some(end) => (
                end > 0
                    && rest[..end]
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
                &rest[end + 1..],
            ),
            None => return false,
        },
        None => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            (
                end > 0
                    && value[..end].iter().all(|&b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
                    }),
                &value[end..],
            )
        }
    };
    name_ok
        && (port.is_empty()
            || port
                .strip_prefix(b":")
                .is_some_and(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit)))
}

/// False for a path some servers would read otherwise: a backslash (a separator on
/// Windows), or a percent-encoded NUL, CR or LF (truncation, header injection).
fn clean_path(path: &[u8]) -> bool {
    !path.iter().enumerate().any(|(i, &b)| {
        b == b'\\'
            || (b == b'%'
                && matches!(
                    path.get(i + 1..i + 3),
                    Some(b"00" | b"0a" | b"0A" | b"0d" | b"0D")
                ))
    })
}

/// Refuses what could be read two ways, and bodies known to be too large.
///
/// actix-http already refuses CL + TE, two Content-Length lines, a non-chunked TE and TE in
/// HTTP/1.0 before a handler runs; these checks stay as the proxy's own guarantee.
fn check_framing(req: &HttpRequest, proxy: &ProxySection) -> Result<Framing, ProxyError> {
    let headers = req.headers();
    let mut lengths = headers.get_all(header::CONTENT_LENGTH);
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(one), None) => Some(
            one.to_str()
                .ok()
                // 1*DIGIT, and no leading zero: "007" is read as octal by some parsers.
                .filter(|s| {
                    s.bytes().all(|b| b.is_ascii_digit())
                        && !s.is_empty()
                        && (s.len() == 1 || !s.starts_with('0'))
                })
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(ProxyError::BadRequest("invalid Content-Length"))?,
        ),
        (Some(_), Some(_)) => return Err(ProxyError::BadRequest("more than one Content-Length")),
    };
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    if chunked && length.is_some() {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let max = proxy.max_body_bytes;
    match length {
        Some(n) if max > 0 && n > max => Err(ProxyError::TooLarge(max)),
        Some(0) => Ok(Framing::None),
        Some(n) => Ok(Framing::Length(n)),
        None if chunked => Ok(Framing::Chunked),
        None => Ok(Framing::None),
    }
}

/// Asks the worker's limiter, when there is one and we know the client.
async fn limit(worker: &Worker, ip: Option<IpAddr>) -> Result<Option<Decision>, ProxyError> {
    let (Some(limiter), Some(ip)) = (&worker.limiter, ip) else {
        return Ok(None);
    };
    match limiter.send(Check { ip }).await {
        Ok(Verdict::Counted(d)) if d.allowed => Ok(Some(d)),
        Ok(Verdict::Counted(d)) => Err(ProxyError::RateLimited(d)),
        Ok(Verdict::Uncounted) => Ok(None),
        Ok(Verdict::Unavailable) | Err(_) => Err(ProxyError::LimiterUnavailable),
    }
}

/// Chooses a server and forwards; retries on another server while that is safe.
async fn send(
    req: &HttpRequest,
    payload: Payload,
    framing: Framing,
    peer: Option<IpAddr>,
    worker: &Worker,
) -> Result<(HttpResponse, Arc<Upstream>), ProxyError> {
    let shared = &worker.shared;
    let proxy = &shared.proxy;
    let body = match framing {
        Framing::None => None,
        _ => Some(Rc::new(BodyState {
            payload: RefCell::new(payload),
            started: Cell::new(false),
            seen: Cell::new(0),
            max: proxy.max_body_bytes,
            over: Cell::new(false),
            last_chunk: Cell::new(Instant::now()),
        })),
    };
    // Moved into the first try; a retry (rare) builds them again.
    let mut headers = Some(upstream_headers(req, peer, shared));
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );

    // Servers that refused a connection: not chosen again for this request.
    let mut tried: Vec<Arc<Upstream>> = Vec::new();
    let mut attempts = 0u32;
    let mut last_error = String::new();
    loop {
        attempts += 1;
        let lease = worker
            .balancer
            .send(NextServer {
                tried: tried.clone(),
            })
            .await
            .map_err(|_| ProxyError::Unavailable)?;
        let Some(lease) = lease else {
            return Err(if last_error.is_empty() {
                ProxyError::NoServer {
                    retry_after: shared.retry_after_no_server.clone(),
                }
            } else {
                ProxyError::BadGateway(last_error)
            });
        };
        let upstream = lease.upstream().clone();
        let guard = InFlight::new(worker, lease);

        let uri = upstream_uri(req, &upstream);
        // no_decompress: no Accept-Encoding of awc's own when the client sent none.
        let mut creq = worker
            .client
            .request(req.method().clone(), uri)
            .no_decompress();
        *creq.headers_mut() = match headers.take() {
            Some(h) => h,
            None => upstream_headers(req, peer, shared),
        };
        if !proxy.preserve_host || !creq.headers().contains_key(header::HOST) {
            creq.headers_mut()
                .insert(header::HOST, upstream.host_header.clone());
        }
        let sending = match (&body, framing) {
            (Some(b), Framing::Length(n)) => {
                creq.send_body(SizedStream::new(n, BodyReader(b.clone())))
            }
            (Some(b), _) => creq.send_stream(BodyReader(b.clone())),
            // No body at all (not an empty one): no Content-Length: 0 on a GET.
            (None, _) => creq.send_body(NoBody::new()),
        };

        let result = head_within(sending, proxy.timeout, body.as_deref()).await;
        let body_started = body.as_ref().is_some_and(|b| b.started.get());
        let error = match result {
            Err(_elapsed) => return Err(ProxyError::GatewayTimeout),
            Ok(Ok(res)) => return Ok((respond(req, res, guard, proxy.timeout), upstream)),
            Ok(Err(e)) => e,
        };
        drop(guard);
        if body.as_ref().is_some_and(|b| b.over.get()) {
            return Err(ProxyError::TooLarge(proxy.max_body_bytes));
        }
        let reason = describe(&error, proxy.connect_timeout);
        last_error = format!("{}: {reason}", upstream.label);
        let retry = match &error {
            // Nothing reached the server: any method may go to another one.
            SendRequestError::Connect(_) => {
                worker.health.do_send(ConnectFailed {
                    upstream: upstream.clone(),
                    reason,
                });
                tried.push(upstream);
                !body_started
            }
            // Most often a kept-alive connection the server had just closed: repeat only what
            // may be repeated, and only if no byte of a body went out. The server is not at
            // fault, so it may be chosen again.
            SendRequestError::Send(_) | SendRequestError::Response(_) => {
                idempotent && !body_started
            }
            _ => false,
        };
        if !retry || attempts > proxy.retries {
            return Err(ProxyError::BadGateway(last_error));
        }
        log::debug!("retrying {} {}: {last_error}", req.method(), req.uri());
    }
}

/// Waits for the response head, or `Err` past `limit`. The limit counts from the start, or
/// from the last request-body chunk sent, whichever is later: an upload that keeps flowing
/// is never cut, one that pauses longer than the limit is (nginx's `proxy_send_timeout`).
async fn head_within<F: std::future::Future>(
    sending: F,
    limit: Duration,
    body: Option<&BodyState>,
) -> Result<F::Output, ()> {
    let mut sending = std::pin::pin!(sending);
    let mut from = Instant::now();
    loop {
        let deadline = tokio::time::Instant::from_std(from + limit);
        match tokio::time::timeout_at(deadline, &mut sending).await {
            Ok(out) => return Ok(out),
            Err(_) => match body.map(|b| b.last_chunk.get()) {
                Some(last) if last > from => from = last,
                _ => return Err(()),
            },
        }
    }
}

/// The upstream URI: the server's authority, the client's path and query.
fn upstream_uri(req: &HttpRequest, upstream: &Upstream) -> Uri {
    let mut parts = actix_web::http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(upstream.authority.clone());
    parts.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).expect("scheme, authority and path make a URI")
}

/// The hop-by-hop rule for one message: [`HOP_BY_HOP`], plus every header its
/// `Connection` names.
struct HopByHop<'a> {
    /// The message's headers when its `Connection` names more than `keep-alive` or `close`
    /// (rare); `None` skips the per-header look at `Connection`.
    connection: Option<&'a HeaderMap>,
}

impl<'a> HopByHop<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let names_more = headers.get_all(header::CONNECTION).any(|v| {
            v.to_str().map_or(true, |v| {
                v.split(',').map(str::trim).any(|t| {
                    !t.is_empty()
                        && !t.eq_ignore_ascii_case("keep-alive")
                        && !t.eq_ignore_ascii_case("close")
                })
            })
        });
        Self {
            connection: names_more.then_some(headers),
        }
    }

    /// True when `name` must not cross the proxy.
    fn drops(&self, name: &HeaderName) -> bool {
        HOP_BY_HOP.contains(name)
            || self.connection.is_some_and(|headers| {
                headers.get_all(header::CONNECTION).any(|v| {
                    v.to_str().is_ok_and(|v| {
                        v.split(',')
                            .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
                    })
                })
            })
    }
}

/// The request headers to send upstream.
fn upstream_headers(req: &HttpRequest, peer: Option<IpAddr>, shared: &Shared) -> HeaderMap {
    let incoming = req.headers();
    let mut out = HeaderMap::with_capacity(incoming.len() + 3);
    let hop = HopByHop::of(incoming);
    for (name, value) in incoming.iter() {
        if hop.drops(name)
            || *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_HOST
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if let Some(peer) = peer {
        let trusted = shared.trusted_proxies.iter().any(|n| n.contains(&peer));
        let mut xff = String::with_capacity(48);
        if trusted {
            for v in incoming.get_all(X_FORWARDED_FOR) {
                if let Ok(v) = v.to_str() {
                    xff.push_str(v);
                    xff.push_str(", ");
                }
            }
        }
        // Written in place: no String of its own for the address.
        let _ = std::fmt::Write::write_fmt(&mut xff, format_args!("{peer}"));
        if let Ok(v) = HeaderValue::from_str(&xff) {
            out.insert(X_FORWARDED_FOR, v);
        }
    }
    out.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let host = incoming.get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(host) = host {
        out.insert(X_FORWARDED_HOST, host);
    }
    out
}

/// The client's answer: the upstream's status and end-to-end headers, its body streamed.
fn respond(
    req: &HttpRequest,
    res: awc::ClientResponse,
    guard: InFlight,
    idle: Duration,
) -> HttpResponse {
    let status = res.status();
    let mut out = HttpResponseBuilder::new(status);
    let mut built = out.finish();
    let headers = built.headers_mut();
    let hop = HopByHop::of(res.headers());
    for (name, value) in res.headers().iter() {
        if !hop.drops(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let length = res
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // actix writes the framing headers from the body's size, never from these.
    headers.remove(header::CONTENT_LENGTH);

    // No body can follow. A HEAD answer keeps the upstream's length (actix writes the size
    // of a HEAD body but not the body); 304 keeps a Content-Length set by hand.
    if req.method() == Method::HEAD {
        drop(guard);
        let empty = futures_util::stream::empty::<Result<Bytes, PayloadError>>();
        return match length {
            Some(n) => built.set_body(BoxBody::new(SizedStream::new(n, empty))),
            None => built.set_body(BoxBody::new(BodyStream::new(empty))),
        };
    }
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        drop(guard);
        if let (StatusCode::NOT_MODIFIED, Some(n)) = (status, length) {
            built
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        return built.set_body(BoxBody::new(NoBody::new()));
    }
    let stream = UpstreamBody {
        inner: res,
        _guard: guard,
        idle,
        deadline: None,
        armed: false,
    };
    match length {
        Some(n) => built.set_body(BoxBody::new(SizedStream::new(n, stream))),
        None => built.set_body(BoxBody::new(BodyStream::new(stream))),
    }
}

/// Counts a request in flight on its server until it ends, however it ends (also when the
/// client goes away mid-body: the guard lives in the response body).
struct InFlight {
    _lease: Lease,
    metrics: Arc<Metrics>,
}

impl InFlight {
    fn new(worker: &Worker, lease: Lease) -> Self {
        worker.shared.metrics.in_flight(1);
        Self {
            _lease: lease,
            metrics: worker.shared.metrics.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight(-1);
    }
}

/// The client's request body, shared by the tries of one request so that a try that never
/// read it (connection refused) leaves it whole for the next.
struct BodyState {
    payload: RefCell<Payload>,
    /// Some bytes went to an upstream: the body cannot be sent again.
    started: Cell<bool>,
    seen: Cell<u64>,
    /// 0 = unlimited.
    max: u64,
    /// The body passed `max`; the request answers 413.
    over: Cell<bool>,
    /// When the last chunk was read: the response-head timeout counts from it.
    last_chunk: Cell<Instant>,
}

/// One try's view of [`BodyState`].
struct BodyReader(Rc<BodyState>);

/// The body stream's error: the client's, or ours for a body over the limit.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error(transparent)]
    Client(#[from] PayloadError),
    #[error("request body over max_body_bytes")]
    TooLarge,
}

impl Stream for BodyReader {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let state = &*self.0;
        let mut payload = state.payload.borrow_mut();
        let next = Pin::new(&mut *payload).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            state.started.set(true);
            state.last_chunk.set(Instant::now());
            let seen = state.seen.get() + chunk.len() as u64;
            state.seen.set(seen);
            if state.max > 0 && seen > state.max {
                state.over.set(true);
                return Poll::Ready(Some(Err(BodyError::TooLarge)));
            }
        }
        next.map(|item| item.map(|r| r.map_err(BodyError::from)))
    }
}

/// The upstream's body on its way to the client: ends the in-flight count when dropped, and
/// fails when the upstream pauses longer than `proxy.timeout` between two chunks (a flowing
/// download is never cut).
struct UpstreamBody {
    inner: awc::ClientResponse,
    _guard: InFlight,
    idle: Duration,
    /// Made at the first pause only: most bodies arrive without one.
    deadline: Option<Pin<Box<actix_rt::time::Sleep>>>,
    /// The deadline counts from the current pause (set at its start, cleared by a chunk).
    armed: bool,
}

impl Stream for UpstreamBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(item) => {
                this.armed = false;
                Poll::Ready(item)
            }
            Poll::Pending => {
                let until = actix_rt::time::Instant::now() + this.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(actix_rt::time::sleep_until(until)));
                if !this.armed {
                    deadline.as_mut().reset(until);
                    this.armed = true;
                }
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "upstream body paused longer than proxy.timeout",
                        )))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// The client IP per the SPEC: the TCP peer, or, when the peer is a trusted proxy, the
/// rightmost `X-Forwarded-For` address that is not itself trusted (the leftmost when all
/// are). A malformed `X-Forwarded-For` from a trusted peer gives the peer.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut leftmost = None;
    for value in headers.get_all(X_FORWARDED_FOR).rev() {
        let Ok(value) = value.to_str() else {
            return peer;
        };
        for entry in value.rsplit(',') {
            let Some(ip) = parse_forwarded_ip(entry.trim()) else {
                return peer;
            };
            if !is_trusted(&ip) {
                return ip;
            }
            leftmost = Some(ip);
        }
    }
    leftmost.unwrap_or(peer)
}

/// An `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]` or `[::1]:80`.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']')?;
        if tail.is_empty()
            || tail
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok())
        {
            return ip.parse().ok();
        }
        return None;
    }
    s.parse::<std::net::SocketAddrV4>()
        .ok()
        .map(|a| IpAddr::V4(*a.ip()))
}

/// The limiter's fields on an answer it counted (SPEC; draft-ietf-httpapi-ratelimit-headers).
fn rate_limit_headers(headers: &mut HeaderMap, d: &Decision, policy: Option<&HeaderValue>) {
    let reset = d.reset_secs;
    headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(d.limit));
    headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(d.remaining));
    headers.insert(X_RATELIMIT_RESET, HeaderValue::from(reset));
    if let Some(policy) = policy {
        headers.insert(RATELIMIT_POLICY, policy.clone());
    }
    let value = format!("\"default\";r={};t={}", d.remaining, reset);
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(RATELIMIT, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            client_ip(peer, &headers(&["1.1.1.1"]), &nets(&["10.0.0.0/8"])),
            peer
        );
    }

    #[test]
    fn a_trusted_peer_gives_the_rightmost_untrusted_address() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let all_trusted = headers(&["10.1.1.1, 10.2.2.2"]);
        assert_eq!(
            client_ip(peer, &all_trusted, &trusted),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
        let v6 = headers(&["[2001:db8::1]:443"]);
        assert_eq!(
            client_ip(peer, &v6, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_malformed_forwarded_for_from_a_trusted_peer_gives_the_peer() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(peer, &headers(&["not-an-ip"]), &trusted), peer);
        assert_eq!(client_ip(peer, &headers(&[]), &trusted), peer);
    }

    #[test]
    fn connection_named_headers_are_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        let hop = HopByHop::of(&h);
        assert!(hop.drops(&HeaderName::from_static("x-secret")));
        assert!(hop.drops(&header::TE));
        assert!(!hop.drops(&header::ACCEPT));
        let plain = HeaderMap::new();
        assert!(HopByHop::of(&plain).connection.is_none());
    }
}
