//! The access log: one line per request, written when its response body has been sent (or
//! the client went away), with the bytes sent and the whole time taken, as nginx's
//! `$body_bytes_sent` and `$request_time`. It only observes: it never changes an answer.

use std::{
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use actix_web::{
    body::{BodySize, BoxBody, MessageBody},
    http::{Method, Uri},
    HttpResponse,
};
use bytes::Bytes;

use crate::upstream::Upstream;

/// What the access log says of one request.
pub struct AccessEntry {
    pub client: Option<IpAddr>,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    pub upstream: Option<Arc<Upstream>>,
    pub started: Instant,
    /// Body bytes sent so far.
    pub bytes: u64,
}

/// Reopens the access log file (SIGUSR1, for logrotate). The log goes to stderr today,
/// which needs no reopening.
pub fn reopen() {
    log::debug!("SIGUSR1: the access log goes to stderr; nothing to reopen");
}

/// `res`, whose body writes `entry`'s line once it has been sent or dropped.
pub fn logged(res: HttpResponse, entry: AccessEntry) -> HttpResponse {
    res.map_body(|_, body| BoxBody::new(Logged { body, entry }))
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
