//! The hot path, top to bottom, as named phases over one request's context ([`Ctx`],
//! Pingora's model): **route** (which route takes the request, hence which pool; its
//! `allow` list and `redirect_https`), **limit** (the route's budget, or the default one, in
//! this worker's limiter), **pick** (this worker's balancer chooses a server of the pool),
//! **rewrite** (the upstream request: path, forwarding headers, the route's header rules),
//! **respond** (the answer streamed back, the route's response rules) and **log**. Each
//! phase reads and writes the context; retries stay inside the pool. What is refused
//! before any of them is in [`checks`], what each failure answers in [`error`].
//!
//! What is forwarded: method, path, query, every end-to-end header, the body (streamed, with
//! the client's framing: Content-Length stays Content-Length, chunked stays chunked).
//! What is not: the hop-by-hop headers of [`headers::HOP_BY_HOP`] and every header named in
//! `Connection`, in both directions, and any `X-Forwarded-*` the client sent (we set ours).
//! This module only sequences those steps; it holds no state between requests.

mod body;
pub mod checks;
mod error;
mod forward;
mod headers;
mod own_fields;
mod send;
mod settings;
mod timers;
mod tunnel;

use std::{future::Future, net::IpAddr, sync::Arc, time::Instant};

pub(crate) use self::error::on_refused;
pub use self::error::ProxyError;
use self::{
    body::{respond, BodyState},
    checks::{check_request, Framing},
    own_fields::{own_fields, LimitFields},
    send::{send, Reply, Target},
    settings::PoolSettings,
    tunnel::tunnel,
};
pub(crate) use self::{
    headers::client_ip,
    settings::{Settings, Worker},
};
use crate::{
    access_log::{Ending, Line, Record, CLIENT_CLOSED},
    rate_limit::{Budget, Decision, Verdict},
    routing::{Limit, Route, RouteRequest},
    sticky::ServerId,
    upstream::{PoolId, Upstream},
};
use actix_web::{
    body::{BodySize, MessageBody as _},
    dev::Payload,
    http::{header, header::HeaderValue},
    web, HttpRequest, HttpResponse, ResponseError,
};

/// One request's context: what the phases learn, in order, and the next ones read.
struct Ctx<'a> {
    settings: &'a Settings,
    request_id: HeaderValue,
    /// The TCP peer.
    peer: Option<IpAddr>,
    /// The client, after `trusted_proxies`.
    client_ip: Option<IpAddr>,
    /// The route that took the request; `None`: the default pool.
    route: Option<&'a Route>,
    pool: PoolId,
    /// The limiter's count, for the answer's rate-limit fields.
    decision: Option<Decision>,
    /// The server the request's sticky cookie named (a valid id of this pool's cookie).
    sticky: Option<ServerId>,
}

impl<'a> Ctx<'a> {
    fn new(req: &HttpRequest, settings: &'a Settings) -> Self {
        let peer = req.peer_addr().map(|a| a.ip());
        Ctx {
            settings,
            request_id: headers::request_id(req.headers()),
            peer,
            client_ip: peer.map(|p| client_ip(p, req.headers(), &settings.trusted_proxies)),
            route: None,
            pool: PoolId::DEFAULT,
            decision: None,
            sticky: None,
        }
    }

    /// Phase **pick**, its request side: the key the pool's strategy hashes, and the
    /// server the sticky cookie names.
    fn pick_keys(&mut self, req: &HttpRequest) -> Option<u64> {
        let pool = self.pool();
        if let Some(name) = pool.sticky_cookie.as_deref() {
            self.sticky = headers::cookie(req.headers(), name).and_then(ServerId::parse);
        }
        pool.hash_on
            .as_ref()
            .and_then(|on| headers::hash_key(req, on, self.client_ip))
    }

    /// Phase **respond**, for a server's answer: a sticky pool's cookie naming the server
    /// that answered, unless the request already stuck to it.
    fn stick(&self, req: &HttpRequest, upstream: &Upstream, res: &mut HttpResponse) {
        let Some(name) = self.pool().sticky_cookie.as_deref() else {
            return;
        };
        if self.sticky == Some(upstream.sticky_id) {
            return;
        }
        let secure = if req.app_config().secure() {
            "; Secure"
        } else {
            ""
        };
        let cookie = format!("{name}={}; Path=/; HttpOnly{secure}", upstream.sticky_id);
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }

    fn pool(&self) -> &'a PoolSettings {
        self.settings.pool(self.pool)
    }

    /// Phase **route**: the first route that matches takes the request to its pool; a
    /// client outside its `allow` list is refused, a plain request to a `redirect_https`
    /// route is sent to the TLS listener.
    fn route(&mut self, req: &HttpRequest) -> Result<(), ProxyError> {
        let routes = &self.settings.routes;
        if routes.is_empty() {
            return Ok(());
        }
        let Some(route) = routes.find(&RouteRequest {
            host: match req.headers().get(header::HOST) {
                Some(h) => Some(h.as_bytes()),
                None => req.uri().authority().map(|a| a.as_str().as_bytes()),
            },
            path: req.uri().path(),
            method: req.method(),
            headers: req.headers(),
        }) else {
            return Ok(());
        };
        self.route = Some(route);
        self.pool = route.pool;
        if !route.allows(self.client_ip) {
            return Err(ProxyError::Forbidden);
        }
        if route.redirect_https && !req.app_config().secure() {
            return Err(ProxyError::RedirectHttps(https_location(
                req,
                request_host(req),
                self.settings.tls_port,
            )));
        }
        Ok(())
    }

    /// Phase **limit**: the route's own budget, none, or the default one (when
    /// `rate_limit.enabled`), counted for the client in this worker's limiter.
    async fn limit(&mut self, worker: &Worker) -> Result<(), ProxyError> {
        let budget = match self.route.map(|r| &r.limit) {
            Some(Limit::Off) => return Ok(()),
            Some(Limit::Own { budget, .. }) => Some(budget.clone()),
            Some(Limit::Default) | None if self.settings.ratelimit_policy.is_some() => None,
            Some(Limit::Default) | None => return Ok(()),
        };
        let Some(ip) = self.client_ip else {
            return Ok(());
        };
        self.decision = limit(worker, ip, budget).await?;
        Ok(())
    }

    /// The `RateLimit-Policy` of the budget that counted this request.
    fn policy(&self) -> Option<&'a HeaderValue> {
        match self.route.map(|r| &r.limit) {
            Some(Limit::Own { policy, .. }) => Some(policy),
            _ => self.settings.ratelimit_policy.as_ref(),
        }
    }

    /// The budget's name in the `RateLimit` field.
    fn budget_name(&self) -> &'a str {
        match self.route.map(|r| &r.limit) {
            Some(Limit::Own { budget, .. }) => &budget.name,
            _ => "default",
        }
    }
}

/// The host a request names: `Host`, or HTTP/2's `:authority`.
fn request_host(req: &HttpRequest) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// `https://HOST[:PORT]/target` for `redirect_https` (the port left out when it is 443).
fn https_location(req: &HttpRequest, host: Option<&str>, tls_port: Option<u16>) -> HeaderValue {
    let host = host.unwrap_or("localhost");
    // Without the request's port; an IPv6 literal keeps its brackets.
    let name = match host.rfind(']') {
        Some(end) => &host[..=end],
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = match tls_port {
        Some(443) | None => format!("https://{name}{target}"),
        Some(port) => format!("https://{name}:{port}{target}"),
    };
    HeaderValue::from_str(&location).unwrap_or_else(|_| HeaderValue::from_static("/"))
}

/// The proxy handler: every request on `listen.address` (and the TLS listener) comes here.
///
/// Not an `async fn`, for the reason [`send()`] is not.
#[allow(clippy::manual_async_fn)]
pub(crate) fn forward(
    req: HttpRequest,
    payload: web::Payload,
    worker: web::Data<Worker>,
) -> impl Future<Output = HttpResponse> {
    async move {
        let started = Instant::now();
        let current = worker.current();
        let settings = &current.settings;
        let mut ctx = Ctx::new(&req, settings);
        // Phases route, limit, pick and rewrite, then the send; an error comes with the last
        // server tried, if any. Written out here rather than in a function of its own: each
        // level of futures adds its own locals to the room every request's future takes.
        // That room is allocated and copied whole for every request (actix-web boxes the
        // handler's future): 976 bytes with actix-web's part, under the 1 KiB past which
        // mimalloc takes its slower path (`tests::a_requests_future_stays_under_1_kib`).
        let outcome: Result<Exchanged, (ProxyError, Option<Arc<Upstream>>)> = 'exchange: {
            let framing = match check_request(&req, &settings.proxy) {
                Ok(framing) => framing,
                Err(e) => break 'exchange Err((e, None)),
            };
            if let Err(e) = ctx.route(&req) {
                break 'exchange Err((e, None));
            }
            if let Err(e) = ctx.limit(&worker).await {
                break 'exchange Err((e, None));
            }
            // The body goes to the server; an upgrade's payload (the rest of the connection)
            // waits for the tunnel.
            let mut payload = Some(payload.into_inner());
            let body = (framing != Framing::None).then(|| {
                let payload = payload.take().unwrap_or(Payload::None);
                BodyState::new(payload, settings.proxy.max_body_bytes)
            });
            let upgrade = headers::upgrade_of(&req)
                .filter(|_| body.is_none())
                .cloned();
            let key = ctx.pick_keys(&req);
            let to = Target {
                upgrade: upgrade.as_ref(),
                key,
                pool: ctx.pool,
                proxy: ctx.pool(),
                path: ctx
                    .route
                    .and_then(|r| r.upstream_path(req.uri().path(), req.uri().query())),
            };
            send(&req, body, framing, to, &worker, &current, &ctx)
                .await
                .map(|reply| (reply, payload, upgrade))
        };
        let head_at = match &outcome {
            Ok((reply, ..)) => reply.at.saturating_duration_since(started),
            Err(_) => started.elapsed(),
        };
        worker.sink.head_times.observe(head_at);

        // Phase **log** is the record, finished when the answer's body has been sent.
        let headers = req.headers();
        let pool = ctx.pool();
        let line = settings.access_log.then(|| {
            let mut line = Line::bare(
                // Its time is when the exchange ends: `Record::finish` sets it.
                std::time::UNIX_EPOCH,
                ctx.client_ip,
                Some((req.method().clone(), req.uri().clone(), req.version())),
                0,
            );
            line.referer = headers.get(header::REFERER).cloned();
            line.user_agent = headers.get(header::USER_AGENT).cloned();
            line.request_id = Some(ctx.request_id.clone());
            line.pool = Some(pool.name.clone());
            line.route = ctx.route.map(|r| r.name.clone());
            Box::new(line)
        });
        let mut record = Record::new(worker.sink.clone(), started, line);
        let idle = pool.proxy.timeout;
        // Phase **respond**: the server's answer streamed back, or one of our own.
        let mut res = match outcome {
            Ok((reply, payload, upgrade)) => {
                let upstream = reply.lease.upstream().clone();
                record.upstream = Some(upstream.clone());
                record.status = reply.response.status().as_u16();
                record.upstream_time = Some(head_at);
                let mut res = match (reply.switched, payload, upgrade) {
                    (Some(socket), Some(payload), Some(asked)) => {
                        let tunnel_idle = settings.proxy.tunnel_idle_timeout;
                        tunnel(
                            reply.response,
                            *socket,
                            payload,
                            asked,
                            reply.lease,
                            tunnel_idle,
                            record,
                        )
                    }
                    _ => respond(&req, reply.response, reply.lease, idle, record),
                };
                ctx.stick(&req, &upstream, &mut res);
                res
            }
            Err((e, tried)) => {
                if let ProxyError::RateLimited(d) = &e {
                    ctx.decision = Some(d.clone());
                    worker.sink.metrics.rate_limited();
                }
                // The last server tried, for the log (a 502 names where it went).
                record.upstream = tried;
                let res = e.error_response();
                record.status = match e {
                    ProxyError::ClientGone => CLIENT_CLOSED,
                    _ => res.status().as_u16(),
                };
                let bytes = match res.body().size() {
                    BodySize::Sized(n) => n,
                    _ => 0,
                };
                record.own_answer();
                record.finish(bytes, Ending::Complete);
                res
            }
        };
        let limit = ctx.decision.as_ref().map(|decision| LimitFields {
            decision,
            policy: ctx.policy(),
            budget: ctx.budget_name(),
        });
        let rules = ctx.route.map(|r| &r.response_headers);
        own_fields(&mut res, &ctx.request_id, limit, rules);
        res
    }
}

/// What an exchange that reached a server gives: the answer, the rest of the connection
/// (an upgrade's payload) and the protocol asked for.
type Exchanged = (Reply, Option<Payload>, Option<HeaderValue>);

/// Asks the worker's limiter for `ip`, in `budget` (`None`: the default one).
async fn limit(
    worker: &Worker,
    ip: IpAddr,
    budget: Option<Budget>,
) -> Result<Option<Decision>, ProxyError> {
    match worker.limiter.check(ip, budget).verdict().await {
        Ok(Verdict::Counted(d)) if d.allowed => Ok(Some(d)),
        Ok(Verdict::Counted(d)) => Err(ProxyError::RateLimited(d)),
        Ok(Verdict::Uncounted) => Ok(None),
        Ok(Verdict::Unavailable) | Err(_) => Err(ProxyError::LimiterUnavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(HttpRequest, web::Payload, web::Data<Worker>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// actix-web boxes each request's handler future, with 120 bytes of its own around this
    /// one: past 1 KiB, mimalloc allocates it on its slower path (~70 instructions more a
    /// request), and the copy into the box grows with it.
    #[test]
    fn a_requests_future_stays_under_1_kib() {
        let size = future_size(forward);
        assert!(size + 120 <= 1024, "forward's future is {size} bytes");
    }
}
