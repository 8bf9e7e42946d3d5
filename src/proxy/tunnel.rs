//! The byte tunnel an upgrade becomes (WebSocket, or any other `Upgrade` token) once the
//! server answers `101 Switching Protocols`: the client's bytes go to the server and the
//! server's to the client, unchanged, until either side closes or the tunnel has been idle
//! for `proxy.tunnel_idle_timeout`. The tunnel holds the request's [`Lease`], so it counts
//! as one request in flight on its server for as long as it lives. Nothing here reads or
//! rewrites what crosses it.

use std::{
    cell::Cell,
    future::Future as _,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use actix_codec::Framed;
use actix_http::h1::ClientCodec;
use actix_web::{
    dev::Payload,
    error::PayloadError,
    http::{header, StatusCode},
    HttpResponse, HttpResponseBuilder,
};
use awc::{BoxedSocket, ClientResponse};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWriteExt as _, ReadBuf, ReadHalf, WriteHalf};

use super::headers::strip_hop_by_hop;
use crate::{
    access_log::{Ending, Record},
    balancer::Lease,
};

/// How much is read from the server at a time.
const READ_SIZE: usize = 16 * 1024;

/// The client's `101` answer, whose body is the server's side of the tunnel; the client's
/// side (`payload`, the rest of its connection) is copied to the server meanwhile.
/// `asked` is the request's `Upgrade`, used when the server's 101 does not repeat it.
pub fn tunnel(
    mut res: ClientResponse,
    socket: Framed<BoxedSocket, ClientCodec>,
    payload: Payload,
    asked: header::HeaderValue,
    lease: Lease,
    idle: Duration,
    record: Record,
) -> HttpResponse {
    // The protocol the server switched to; `Upgrade` itself is hop-by-hop.
    let protocol = res.headers().get(header::UPGRADE).unwrap_or(&asked).clone();
    let mut headers = std::mem::take(res.headers_mut());
    strip_hop_by_hop(&mut headers);
    let mut out = HttpResponseBuilder::new(StatusCode::SWITCHING_PROTOCOLS);
    // Sets `Connection: upgrade` and `Upgrade`.
    out.upgrade(protocol);

    let parts = socket.into_parts();
    let (read, write) = tokio::io::split(parts.io);
    let activity = Rc::new(Cell::new(Instant::now()));
    let writer = actix_rt::spawn(to_server(payload, write, activity.clone()));
    let mut answer = out.streaming(TunnelBody {
        // What the server sent right after its 101, read with the head.
        first: (!parts.read_buf.is_empty()).then(|| parts.read_buf.freeze()),
        read,
        buf: BytesMut::new(),
        activity,
        idle,
        timer: None,
        writer,
        _lease: lease,
        record: Some(record),
        bytes: 0,
    });
    for (name, value) in headers {
        answer.headers_mut().append(name, value);
    }
    answer
}

/// The client's side: its bytes to the server until it closes, then the server's write side
/// is shut down, so the server sees the end too.
async fn to_server(
    mut payload: Payload,
    mut server: WriteHalf<BoxedSocket>,
    activity: Rc<Cell<Instant>>,
) {
    while let Some(Ok(chunk)) = payload.next().await {
        activity.set(Instant::now());
        if server.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = server.shutdown().await;
}

/// The server's side of a tunnel, as the body of the client's 101.
struct TunnelBody {
    first: Option<Bytes>,
    read: ReadHalf<BoxedSocket>,
    buf: BytesMut,
    /// When a byte last crossed, either way.
    activity: Rc<Cell<Instant>>,
    idle: Duration,
    /// Made at the first pause.
    timer: Option<Pin<Box<actix_rt::time::Sleep>>>,
    /// The client's side; stopped when this side ends.
    writer: actix_rt::task::JoinHandle<()>,
    _lease: Lease,
    record: Option<Record>,
    bytes: u64,
}

impl Drop for TunnelBody {
    fn drop(&mut self) {
        self.writer.abort();
        if let Some(record) = self.record.take() {
            // However a tunnel ends (either side closing, or idle), it ended normally.
            record.finish(self.bytes, Ending::Complete);
        }
    }
}

impl Stream for TunnelBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            this.activity.set(Instant::now());
            this.bytes += first.len() as u64;
            return Poll::Ready(Some(Ok(first)));
        }
        this.buf.resize(READ_SIZE, 0);
        let mut read = ReadBuf::new(&mut this.buf);
        match Pin::new(&mut this.read).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(None);
                }
                this.activity.set(Instant::now());
                this.bytes += n as u64;
                Poll::Ready(Some(Ok(this.buf.split_to(n).freeze())))
            }
            // A reset ends a tunnel as a close does.
            Poll::Ready(Err(_)) => Poll::Ready(None),
            Poll::Pending => {
                let idle = this.idle;
                let until = || actix_rt::time::Instant::from_std(this.activity.get() + idle);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(actix_rt::time::sleep_until(until())));
                loop {
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The deadline passed; traffic the other way may have moved it on.
                    if Instant::now() >= this.activity.get() + idle {
                        log::debug!("tunnel idle for {idle:?}: closed");
                        return Poll::Ready(None);
                    }
                    timer.as_mut().reset(until());
                }
            }
        }
    }
}
