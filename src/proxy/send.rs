//! Phases **pick** (a server of the pool, from this worker's balancer) and **rewrite** (the
//! upstream request, [`UpstreamHead`]), then the send to the server; the retries on another
//! server of the pool while that is safe. The handler ([`super::forward()`]) makes the
//! [`Target`] and takes the [`Reply`].

use std::{future::Future, rc::Rc, sync::Arc, time::Instant};

use actix_codec::Framed;
use actix_http::h1::ClientCodec;
use actix_web::{
    body::{BodyStream, None as NoBody, SizedStream},
    http::{header, header::HeaderValue, Method},
    HttpRequest,
};
use awc::{error::SendRequestError, BoxedSocket, UpgradeResponse};

use super::{
    body::{head_within, BodyReader, BodyState, Stalled},
    checks::Framing,
    forward::{Rewrite, UpstreamHead},
    headers::upstream_uri,
    settings::{Current, PoolSettings},
    Ctx, ProxyError, Worker,
};
use crate::{
    balancer::{Lease, NextServer},
    health::ConnectFailed,
    upstream::{describe, PoolId, Upstream},
};

/// Where a request goes beyond the server: the protocol it upgrades to, its pool, and the
/// path its route rewrote.
pub(super) struct Target<'a> {
    pub(super) upgrade: Option<&'a HeaderValue>,
    /// The request's hash key, for `consistent_hash`.
    pub(super) key: Option<u64>,
    pub(super) pool: PoolId,
    pub(super) proxy: &'a PoolSettings,
    /// The path and query the server gets when the route strips its prefix.
    pub(super) path: Option<String>,
}

/// A server's answer head, the connection when it switched protocols, and the lease.
pub(super) struct Reply {
    pub(super) response: awc::ClientResponse,
    /// Boxed: rare, and held inline it would add its 152 bytes to every move of a reply.
    pub(super) switched: Option<Box<Framed<BoxedSocket, ClientCodec>>>,
    pub(super) lease: Lease,
    /// When the head came.
    pub(super) at: Instant,
}

/// Phases pick (a server of the pool, from this worker's balancer) and rewrite (the
/// upstream request), then the send; retries on another server of the pool while that is
/// safe. An error comes with the last server tried.
///
/// Not an `async fn`: one keeps each argument twice in its future (as given, and as the
/// local it is moved to), and this future is part of every request's.
#[allow(clippy::manual_async_fn)]
pub(super) fn send<'a>(
    req: &'a HttpRequest,
    body: Option<Rc<BodyState>>,
    framing: Framing,
    to: Target<'a>,
    worker: &'a Worker,
    current: &'a Current,
    ctx: &'a Ctx<'a>,
) -> impl Future<Output = Result<Reply, (ProxyError, Option<Arc<Upstream>>)>> + 'a {
    async move {
        let settings = &current.settings;
        // References, not copies: every byte held here is held by every request's future.
        let pool = &to.proxy.proxy;
        let client = current.client(pool.connect_timeout);
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );

        // Servers that refused a connection: not chosen again for this request.
        let mut tried: Vec<Arc<Upstream>> = Vec::new();
        let mut last: Option<Arc<Upstream>> = None;
        let mut attempts = 0u32;
        let mut last_error = String::new();
        loop {
            attempts += 1;
            // In a block: what picks the server is not kept in this future's room across
            // the send (a local's room lasts to the end of its scope, moved from or not).
            let Some(lease) = ({
                let next = NextServer {
                    pool: to.pool,
                    key: to.key,
                    sticky: ctx.sticky,
                    tried: tried.clone(),
                };
                match worker.balancer.lease_now(&next) {
                    Some(lease) => lease,
                    // Only before the worker's balancer has its first list: boxed, so that
                    // this future does not carry the wait's room on every request.
                    None => Box::pin(worker.balancer.lease(next))
                        .await
                        .map_err(|_| (ProxyError::Unavailable, last.clone()))?,
                }
            }) else {
                let error = if last_error.is_empty() {
                    ProxyError::NoServer {
                        retry_after: to.proxy.retry_after.clone(),
                    }
                } else {
                    ProxyError::BadGateway(last_error)
                };
                return Err((error, last));
            };
            let upstream = lease.upstream().clone();
            last = Some(upstream.clone());

            // Phase **rewrite**: the client's head, forwarded (forward.rs).
            // Boxed (awc takes it boxed): not held inline across the send's awaits.
            let head = UpstreamHead::new(
                req,
                &upstream,
                &Rewrite {
                    peer: ctx.peer,
                    trusted: &settings.trusted_proxies,
                    rules: ctx.route.map(|r| &r.request_headers),
                    path: to.path.as_deref(),
                    request_id: &ctx.request_id,
                    preserve_host: settings.proxy.preserve_host,
                },
            );
            let sent = Instant::now();
            let result = if let Some(protocol) = to.upgrade {
                // Boxed: the upgrade's future is 1.6 KiB, and held inline it would make every
                // request's future (every level above this one) larger by twice that. Made
                // in a block, so that the request it is made from (288 bytes) does not keep
                // its room in this future across the wait.
                let upgrading = {
                    // An upgrade goes through awc's own request (its tunnel takes a head of
                    // its own).
                    let uri = upstream_uri(req, &upstream, to.path.as_deref());
                    let mut creq = client.request(req.method().clone(), uri).no_decompress();
                    if let Some(address) = upstream.address {
                        // A server known by name: this address of the name's, the name in
                        // Host and SNI.
                        creq = creq.address(address);
                    }
                    *creq.headers_mut() = head.header_map();
                    creq.headers_mut().insert(header::UPGRADE, protocol.clone());
                    Box::pin(head_within(
                        creq.send_upgrade(),
                        sent,
                        pool.timeout,
                        None,
                        &worker.timers,
                    ))
                };
                upgrading.await.map(|r| {
                    r.map(|answer| match answer {
                        UpgradeResponse::Switched(res, socket) => (res, Some(Box::new(socket))),
                        UpgradeResponse::NotSwitched(res) => (res, None),
                    })
                })
            } else {
                let sending = match (&body, framing) {
                    (Some(b), Framing::Length(n)) => client.send_forwarded(
                        head,
                        upstream.address,
                        SizedStream::new(n, BodyReader(b.clone())),
                    ),
                    (Some(b), _) => client.send_forwarded(
                        head,
                        upstream.address,
                        BodyStream::new(BodyReader(b.clone())),
                    ),
                    // No body at all (not an empty one): no Content-Length: 0 on a GET.
                    (None, _) => client.send_forwarded(head, upstream.address, NoBody::new()),
                };
                head_within(sending, sent, pool.timeout, body.as_deref(), &worker.timers)
                    .await
                    .map(|r| r.map(|res| (res, None)))
            };

            let body_started = body.as_ref().is_some_and(|b| b.started());
            let error = match result {
                Err(Stalled::Upload) => return Err((ProxyError::RequestTimeout, last)),
                Err(Stalled::Upstream) => {
                    lease.failed();
                    return Err((ProxyError::GatewayTimeout, last));
                }
                Ok(Ok((response, switched))) => {
                    let at = Instant::now();
                    lease.answered(
                        response.status().as_u16(),
                        at.saturating_duration_since(sent),
                    );
                    return Ok(Reply {
                        response,
                        switched,
                        lease,
                        at,
                    });
                }
                Ok(Err(e)) => e,
            };
            if let SendRequestError::Connect(_) = error {
                lease.failed();
            }
            drop(lease);
            if body.as_ref().is_some_and(|b| b.over()) {
                return Err((ProxyError::TooLarge(settings.proxy.max_body_bytes), last));
            }
            // The client went away mid-upload: nothing to answer, nobody to blame.
            if body.as_ref().is_some_and(|b| b.client_failed()) {
                return Err((ProxyError::ClientGone, last));
            }
            let reason = describe(&error, pool.connect_timeout);
            last_error = format!("{upstream}: {reason}");
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
            if !retry || attempts > pool.retries {
                return Err((ProxyError::BadGateway(last_error), last));
            }
            log::debug!("retrying {} {}: {last_error}", req.method(), req.uri());
        }
    }
}
