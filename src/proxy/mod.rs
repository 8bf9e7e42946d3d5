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

mod body;
pub mod checks;
mod error;
mod headers;
mod tunnel;

use std::{cell::RefCell, net::IpAddr, rc::Rc, sync::Arc, time::Instant};

use actix::Addr;
use actix_codec::Framed;
use actix_http::h1::ClientCodec;
use actix_web::{
    body::{BodySize, MessageBody as _, None as NoBody, SizedStream},
    dev::Payload,
    http::{header, header::HeaderValue, Method},
    web, HttpRequest, HttpResponse, ResponseError,
};
use awc::{error::SendRequestError, BoxedSocket, UpgradeResponse};
use ipnet::IpNet;
use tokio::sync::watch;

pub use self::error::ProxyError;
pub(crate) use self::headers::client_ip;
use self::{
    body::{head_within, respond, BodyReader, BodyState, Stalled},
    checks::{check_request, Framing},
    headers::{rate_limit_headers, upstream_headers, upstream_uri, X_REQUEST_ID},
    tunnel::tunnel,
};
use crate::{
    access_log::{AccessEntry, Ending, Record, Sink, CLIENT_CLOSED},
    balancer::{BalancerActor, Lease, NextServer},
    config::{Config, ProxySection},
    health::{ConnectFailed, HealthActor},
    rate_limit::{ceil_secs, Check, Decision, RateLimitActor, Verdict},
    upstream::{self, describe, Upstream},
};

/// What the hot path reads of the configuration, in the form it needs. Published by
/// `lib.rs` at start and on every reload; each worker keeps its own copy.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub proxy: ProxySection,
    pub trusted_proxies: Vec<IpNet>,
    /// `Retry-After` for 503 "no healthy server": the health interval, whole seconds, ≥ 1.
    pub retry_after_no_server: HeaderValue,
    /// `RateLimit-Policy` value; `None` with the limiter off, which skips it.
    pub ratelimit_policy: Option<HeaderValue>,
    pub access_log: bool,
    /// How `https://` servers are verified; a new one (a reload) gets a new client.
    pub upstream_tls: Arc<rustls::ClientConfig>,
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
            access_log: config.access_log.is_some(),
            upstream_tls: config.upstream_tls.clone(),
        }
    }
}

impl Settings {
    /// A copy for one worker, its header values copied rather than cloned: a clone would
    /// share their bytes, and the reference count that each request's clone touches, with
    /// every other worker.
    fn for_worker(&self) -> Settings {
        let own = |v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).expect("was a value");
        Settings {
            retry_after_no_server: own(&self.retry_after_no_server),
            ratelimit_policy: self.ratelimit_policy.as_ref().map(own),
            ..self.clone()
        }
    }
}

/// One worker's handles: its balancer and limiter (same thread), its settings and client.
pub(crate) struct Worker {
    balancer: Addr<BalancerActor>,
    limiter: Addr<RateLimitActor>,
    health: Addr<HealthActor>,
    /// Where this worker's exchanges are counted and logged.
    sink: Rc<Sink>,
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
        sink: Sink,
        updates: watch::Receiver<Arc<Settings>>,
    ) -> Self {
        let settings = updates.borrow().clone();
        let client = upstream::client(
            settings.proxy.connect_timeout,
            None,
            settings.upstream_tls.clone(),
        );
        Self {
            balancer,
            limiter,
            health,
            sink: Rc::new(sink),
            updates: RefCell::new(updates),
            current: RefCell::new((Rc::new(settings.for_worker()), client)),
        }
    }

    /// The settings and client for one request: the last ones published.
    fn current(&self) -> (Rc<Settings>, awc::Client) {
        let mut updates = self.updates.borrow_mut();
        if updates.has_changed().unwrap_or(false) {
            let new = updates.borrow_and_update().clone();
            let mut current = self.current.borrow_mut();
            if new.proxy.connect_timeout != current.0.proxy.connect_timeout
                || !Arc::ptr_eq(&new.upstream_tls, &current.0.upstream_tls)
            {
                // Requests under way keep the old client (and its pool) until they end.
                current.1 =
                    upstream::client(new.proxy.connect_timeout, None, new.upstream_tls.clone());
            }
            current.0 = Rc::new(new.for_worker());
        }
        let current = self.current.borrow();
        (current.0.clone(), current.1.clone())
    }
}

/// The proxy handler: every request on `listen.address` comes here.
pub(crate) async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    worker: web::Data<Worker>,
) -> HttpResponse {
    let started = Instant::now();
    let (settings, client) = worker.current();
    let request_id = headers::request_id(req.headers());
    let peer = req.peer_addr().map(|a| a.ip());
    let client_ip = peer.map(|p| client_ip(p, req.headers(), &settings.trusted_proxies));

    let mut decision = None;
    let limiter = settings
        .ratelimit_policy
        .is_some()
        .then_some(&worker.limiter);
    let outcome = match check_request(&req, &settings.proxy) {
        Err(e) => Err(e),
        Ok(framing) => match limit(limiter, client_ip).await {
            Err(e) => Err(e),
            Ok(d) => {
                decision = d;
                // The body goes to the server; an upgrade's payload (the rest of the
                // connection) waits for the tunnel.
                let mut payload = Some(payload.into_inner());
                let body = (framing != Framing::None).then(|| {
                    let payload = payload.take().unwrap_or(Payload::None);
                    BodyState::new(payload, settings.proxy.max_body_bytes)
                });
                let upgrade = headers::upgrade_of(&req).filter(|_| body.is_none());
                let to = Target {
                    peer,
                    upgrade,
                    request_id: &request_id,
                };
                send(&req, body, framing, to, &worker, &settings, &client)
                    .await
                    .map(|reply| (reply, payload, upgrade))
            }
        },
    };
    let head_at = started.elapsed();
    worker.sink.head_times.observe(head_at);

    let headers = req.headers();
    let mut record = Record {
        sink: worker.sink.clone(),
        upstream: None,
        status: 0,
        started,
        upstream_time: None,
        entry: settings.access_log.then(|| AccessEntry {
            client: client_ip,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            referer: headers.get(header::REFERER).cloned(),
            user_agent: headers.get(header::USER_AGENT).cloned(),
            request_id: Some(request_id.clone()),
        }),
    };
    let idle = settings.proxy.timeout;
    let mut res = match outcome {
        Ok((reply, payload, upgrade)) => {
            record.upstream = Some(reply.lease.upstream().clone());
            record.status = reply.response.status().as_u16();
            record.upstream_time = Some(head_at);
            match (reply.switched, payload, upgrade) {
                (Some(socket), Some(payload), Some(asked)) => {
                    let asked = asked.clone();
                    let tunnel_idle = settings.proxy.tunnel_idle_timeout;
                    tunnel(
                        reply.response,
                        socket,
                        payload,
                        asked,
                        reply.lease,
                        tunnel_idle,
                        record,
                    )
                }
                _ => respond(&req, reply.response, reply.lease, idle, record),
            }
        }
        Err(e) => {
            if let ProxyError::RateLimited(d) = &e {
                decision = Some(d.clone());
                worker.sink.metrics.rate_limited();
            }
            let res = e.error_response();
            record.status = match e {
                ProxyError::ClientGone => CLIENT_CLOSED,
                _ => res.status().as_u16(),
            };
            let bytes = match res.body().size() {
                BodySize::Sized(n) => n,
                _ => 0,
            };
            record.finish(bytes, Ending::Complete);
            res
        }
    };
    if let Some(d) = &decision {
        rate_limit_headers(res.headers_mut(), d, settings.ratelimit_policy.as_ref());
    }
    res.headers_mut().insert(X_REQUEST_ID, request_id);
    res
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

/// Where a request goes beyond the server: whose it is, and the protocol it upgrades to.
struct Target<'a> {
    peer: Option<IpAddr>,
    upgrade: Option<&'a HeaderValue>,
    request_id: &'a HeaderValue,
}

/// A server's answer head, the connection when it switched protocols, and the lease.
struct Reply {
    response: awc::ClientResponse,
    switched: Option<Framed<BoxedSocket, ClientCodec>>,
    lease: Lease,
}

/// Chooses a server and forwards; retries on another server while that is safe.
async fn send(
    req: &HttpRequest,
    body: Option<Rc<BodyState>>,
    framing: Framing,
    to: Target<'_>,
    worker: &Worker,
    settings: &Settings,
    client: &awc::Client,
) -> Result<Reply, ProxyError> {
    let proxy = &settings.proxy;
    let peer = to.peer;
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
        creq.headers_mut()
            .insert(X_REQUEST_ID, to.request_id.clone());
        if !proxy.preserve_host || !creq.headers().contains_key(header::HOST) {
            creq.headers_mut()
                .insert(header::HOST, upstream.host_header.clone());
        }
        let result = if let Some(protocol) = to.upgrade {
            creq.headers_mut().insert(header::UPGRADE, protocol.clone());
            head_within(creq.send_upgrade(), proxy.timeout, None)
                .await
                .map(|r| {
                    r.map(|answer| match answer {
                        UpgradeResponse::Switched(res, socket) => (res, Some(socket)),
                        UpgradeResponse::NotSwitched(res) => (res, None),
                    })
                })
        } else {
            let sending = match (&body, framing) {
                (Some(b), Framing::Length(n)) => {
                    creq.send_body(SizedStream::new(n, BodyReader(b.clone())))
                }
                (Some(b), _) => creq.send_stream(BodyReader(b.clone())),
                // No body at all (not an empty one): no Content-Length: 0 on a GET.
                (None, _) => creq.send_body(NoBody::new()),
            };
            head_within(sending, proxy.timeout, body.as_deref())
                .await
                .map(|r| r.map(|res| (res, None)))
        };

        let body_started = body.as_ref().is_some_and(|b| b.started());
        let error = match result {
            Err(Stalled::Upload) => return Err(ProxyError::RequestTimeout),
            Err(Stalled::Upstream) => return Err(ProxyError::GatewayTimeout),
            Ok(Ok((response, switched))) => {
                return Ok(Reply {
                    response,
                    switched,
                    lease,
                })
            }
            Ok(Err(e)) => e,
        };
        drop(lease);
        if body.as_ref().is_some_and(|b| b.over()) {
            return Err(ProxyError::TooLarge(proxy.max_body_bytes));
        }
        // The client went away mid-upload: nothing to answer, nobody to blame.
        if body.as_ref().is_some_and(|b| b.client_failed()) {
            return Err(ProxyError::ClientGone);
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
