//! The hot path, top to bottom: [`forward`] checks the request ([`checks`]), finds the
//! client IP ([`headers`]), asks this worker's limiter, asks this worker's balancer for a
//! server, sends the request with `awc` (retrying on another server while that is safe),
//! and streams the answer back ([`body`]). What each failure answers is in [`error`].
//!
//! What is forwarded: method, path, query, every end-to-end header, the body (streamed, with
//! the client's framing: Content-Length stays Content-Length, chunked stays chunked).
//! What is not: the hop-by-hop headers of [`headers::HOP_BY_HOP`] and every header named in
//! `Connection`, in both directions, and any `X-Forwarded-*` the client sent (we set ours).
//! This module only sequences those steps; it holds no state between requests.

pub mod body;
pub mod checks;
pub mod error;
pub mod headers;

use std::{cell::RefCell, net::IpAddr, rc::Rc, sync::Arc, time::Instant};

use actix::Addr;
use actix_web::{
    body::{None as NoBody, SizedStream},
    dev::Payload,
    http::{header, header::HeaderValue, Method},
    web, HttpRequest, HttpResponse, ResponseError,
};
use awc::error::SendRequestError;
use ipnet::IpNet;
use tokio::sync::watch;

use self::{
    body::{head_within, respond, BodyReader, BodyState},
    checks::{check_request, Framing},
    headers::{rate_limit_headers, upstream_headers, upstream_uri},
};
pub use self::{error::ProxyError, headers::client_ip};
use crate::{
    access_log::{self, AccessEntry},
    balancer::{BalancerActor, NextServer},
    config::{Config, ProxySection},
    health::{ConnectFailed, HealthActor},
    metrics::Metrics,
    rate_limit::{ceil_secs, Check, Decision, RateLimitActor, Verdict},
    upstream::{self, describe, Upstream},
};

/// What the hot path reads of the configuration, in the form it needs. Published by
/// `lib.rs` at start and on every reload; each worker keeps its own copy.
#[derive(Debug, Clone)]
pub struct Settings {
    pub proxy: ProxySection,
    pub trusted_proxies: Vec<IpNet>,
    /// `Retry-After` for 503 "no healthy server": the health interval, whole seconds, ≥ 1.
    pub retry_after_no_server: HeaderValue,
    /// `RateLimit-Policy` value; `None` with the limiter off, which skips it.
    pub ratelimit_policy: Option<HeaderValue>,
    pub access_log: bool,
}

impl Settings {
    pub fn new(config: &Config) -> Self {
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
        }
    }
}

/// One worker's handles: its balancer and limiter (same thread), its settings and client.
pub struct Worker {
    balancer: Addr<BalancerActor>,
    limiter: Addr<RateLimitActor>,
    health: Addr<HealthActor>,
    metrics: Arc<Metrics>,
    /// Where reloads are published; looked at (one atomic load) per request.
    updates: RefCell<watch::Receiver<Arc<Settings>>>,
    /// This worker's copy of the settings (an `Rc`: no count shared with other workers)
    /// and its client, rebuilt when `connect_timeout` changes. `awc::Client` is not
    /// `Send`: one per worker, built on the worker's thread.
    current: RefCell<(Rc<Settings>, awc::Client)>,
}

impl Worker {
    /// The handles of the worker whose factory runs this.
    pub fn new(
        balancer: Addr<BalancerActor>,
        limiter: Addr<RateLimitActor>,
        health: Addr<HealthActor>,
        metrics: Arc<Metrics>,
        updates: watch::Receiver<Arc<Settings>>,
    ) -> Self {
        let settings = updates.borrow().clone();
        let client = upstream::client(settings.proxy.connect_timeout, None);
        Self {
            balancer,
            limiter,
            health,
            metrics,
            updates: RefCell::new(updates),
            current: RefCell::new((Rc::new((*settings).clone()), client)),
        }
    }

    /// The settings and client for one request: the last ones published.
    fn current(&self) -> (Rc<Settings>, awc::Client) {
        let mut updates = self.updates.borrow_mut();
        if updates.has_changed().unwrap_or(false) {
            let new = updates.borrow_and_update().clone();
            let mut current = self.current.borrow_mut();
            if new.proxy.connect_timeout != current.0.proxy.connect_timeout {
                // Requests under way keep the old client (and its pool) until they end.
                current.1 = upstream::client(new.proxy.connect_timeout, None);
            }
            current.0 = Rc::new((*new).clone());
        }
        let current = self.current.borrow();
        (current.0.clone(), current.1.clone())
    }
}

/// The proxy handler: every request on `listen.address` comes here.
pub async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    worker: web::Data<Worker>,
) -> HttpResponse {
    let started = Instant::now();
    let (settings, client) = worker.current();
    let peer = req.peer_addr().map(|a| a.ip());
    let client_ip = peer.map(|p| client_ip(p, req.headers(), &settings.trusted_proxies));

    let mut decision = None;
    let limiter = settings
        .ratelimit_policy
        .is_some()
        .then_some(&worker.limiter);
    let outcome = match check_request(&req, &settings.proxy) {
        Err(e) => Err(e),
        Ok(body) => match limit(limiter, client_ip).await {
            Err(e) => Err(e),
            Ok(d) => {
                decision = d;
                let payload = payload.into_inner();
                send(&req, payload, body, peer, &worker, &settings, &client).await
            }
        },
    };

    let (mut res, server) = match outcome {
        Ok((res, upstream)) => (res, Some(upstream)),
        Err(e) => {
            if let ProxyError::RateLimited(d) = &e {
                decision = Some(d.clone());
                worker.metrics.rate_limited();
            }
            (e.error_response(), None)
        }
    };
    if let Some(d) = &decision {
        rate_limit_headers(res.headers_mut(), d, settings.ratelimit_policy.as_ref());
    }

    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    worker.metrics.request(
        server.as_ref().map(|u| &u.counters),
        status,
        Some(elapsed.as_secs_f64()),
    );
    if !settings.access_log {
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
    access_log::logged(res, entry)
}

/// Asks the worker's limiter, when limiting is on and we know the client.
async fn limit(
    limiter: Option<&Addr<RateLimitActor>>,
    ip: Option<IpAddr>,
) -> Result<Option<Decision>, ProxyError> {
    let (Some(limiter), Some(ip)) = (limiter, ip) else {
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
    settings: &Settings,
    client: &awc::Client,
) -> Result<(HttpResponse, Arc<Upstream>), ProxyError> {
    let proxy = &settings.proxy;
    let body = match framing {
        Framing::None => None,
        _ => Some(BodyState::new(payload, proxy.max_body_bytes)),
    };
    // Moved into the first try; a retry (rare) builds them again.
    let mut headers = Some(upstream_headers(req, peer, &settings.trusted_proxies));
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
                    retry_after: settings.retry_after_no_server.clone(),
                }
            } else {
                ProxyError::BadGateway(last_error)
            });
        };
        let upstream = lease.upstream().clone();

        let uri = upstream_uri(req, &upstream);
        // no_decompress: no Accept-Encoding of awc's own when the client sent none.
        let mut creq = client.request(req.method().clone(), uri).no_decompress();
        *creq.headers_mut() = match headers.take() {
            Some(h) => h,
            None => upstream_headers(req, peer, &settings.trusted_proxies),
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
        let body_started = body.as_ref().is_some_and(|b| b.started());
        let error = match result {
            Err(_elapsed) => return Err(ProxyError::GatewayTimeout),
            Ok(Ok(res)) => return Ok((respond(req, res, lease, proxy.timeout), upstream)),
            Ok(Err(e)) => e,
        };
        drop(lease);
        if body.as_ref().is_some_and(|b| b.over()) {
            return Err(ProxyError::TooLarge(proxy.max_body_bytes));
        }
        if body.as_ref().is_some_and(|b| b.failed()) {
            return Err(ProxyError::BadRequest("request body cut short"));
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
