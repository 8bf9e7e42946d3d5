//! Bodies on their way through: the client's request body (shared by the tries of one
//! request, bounded by `max_body_bytes`) and the upstream's response body (streamed back,
//! cut when it pauses longer than `proxy.timeout`), and the response built around it. The
//! per-request [`Lease`] rides in the response body, so the in-flight count ends when the
//! body does, however it ends. Nothing here chooses a server or retries.

use std::{
    cell::{Cell, RefCell},
    future::Future as _,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use actix_web::{
    body::{BodyStream, BoxBody, None as NoBody, SizedStream},
    dev::Payload,
    error::PayloadError,
    http::{
        header::{self, HeaderValue},
        Method, StatusCode,
    },
    HttpRequest, HttpResponse,
};
use bytes::Bytes;
use futures_util::Stream;

use super::{headers::move_end_to_end, timers::Timers};
use crate::{
    access_log::{Ending, Record},
    balancer::Lease,
};

/// Why no response head came in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stalled {
    /// The server did not answer (504).
    Upstream,
    /// The client's body stopped arriving before it was complete (408).
    Upload,
}

/// Waits for the response head, or `Err` past `limit`. The limit counts from `sent`, or
/// from the last request-body chunk sent, whichever is later: an upload that keeps flowing
/// is never cut, one that pauses longer than the limit is (nginx's `proxy_send_timeout`),
/// and then it is the client's stall, not the server's.
/// The deadline is one of the worker's kept timers.
pub async fn head_within<F: std::future::Future>(
    sending: F,
    sent: Instant,
    limit: Duration,
    body: Option<&BodyState>,
    timers: &Timers,
) -> Result<F::Output, Stalled> {
    let mut sending = std::pin::pin!(sending);
    let mut from = sent;
    let mut timer = timers.at(tokio::time::Instant::from_std(from + limit));
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(out) = sending.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if timer.poll_elapsed(cx).is_pending() {
            return Poll::Pending;
        }
        match body {
            Some(b) if b.last_chunk.get() > from => {
                from = b.last_chunk.get();
                timer.reset(tokio::time::Instant::from_std(from + limit));
            }
            Some(b) if !b.finished.get() => return Poll::Ready(Err(Stalled::Upload)),
            _ => return Poll::Ready(Err(Stalled::Upstream)),
        }
    })
    .await
}

/// The client's answer: the upstream's status and end-to-end headers, its body streamed.
/// `record` is finished when the body has been sent, however that ends.
pub fn respond(
    req: &HttpRequest,
    mut res: awc::ClientResponse,
    lease: Lease,
    idle: Duration,
    record: Record,
) -> HttpResponse {
    let status = res.status();
    let mut built = HttpResponse::new(status);
    // The server's headers (their table) become the answer's, less what does not cross;
    // actix writes the framing headers from the body's size, never from these.
    let length = move_end_to_end(res.headers_mut(), built.headers_mut())
        .and_then(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));

    // No body can follow. A HEAD answer keeps the upstream's length (actix writes the size
    // of a HEAD body but not the body); 304 keeps a Content-Length set by hand.
    if req.method() == Method::HEAD {
        drop(lease);
        record.finish(0, Ending::Complete);
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
        drop(lease);
        record.finish(0, Ending::Complete);
        if let (StatusCode::NOT_MODIFIED, Some(n)) = (status, length) {
            built
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        return built.set_body(BoxBody::new(NoBody::new()));
    }
    // A client that stops reading for `proxy.timeout` loses its connection, and the
    // upstream one with this body (vendor/actix-http: `ResponseHead::set_write_timeout`).
    built.head_mut().set_write_timeout(Some(idle));
    let stream = UpstreamBody {
        inner: res,
        _lease: lease,
        idle,
        deadline: None,
        armed: false,
        record: Some(record),
        bytes: 0,
        // actix-http never polls a body of size 0: it writes the head and drops the body,
        // so such an answer is complete once dropped. Any other body is complete only
        // when polled to its end; dropped before, the client has gone away.
        ending: if length == Some(0) {
            Ending::Complete
        } else {
            Ending::ClientGone
        },
    };
    match length {
        Some(n) => built.set_body(BoxBody::new(SizedStream::new(n, stream))),
        None => built.set_body(BoxBody::new(BodyStream::new(stream))),
    }
}

/// The client's request body, shared by the tries of one request so that a try that never
/// read it (connection refused) leaves it whole for the next.
pub struct BodyState {
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
    /// The whole body has been read.
    finished: Cell<bool>,
    /// The client's body failed before its end (it went away, or shut its side, or broke
    /// its framing): the client's fault, never the server's.
    client_failed: Cell<bool>,
}

impl BodyState {
    /// The body of a request, not read yet; `max` is `max_body_bytes` (0 = unlimited).
    pub fn new(payload: Payload, max: u64) -> Rc<Self> {
        Rc::new(Self {
            payload: RefCell::new(payload),
            started: Cell::new(false),
            seen: Cell::new(0),
            max,
            over: Cell::new(false),
            last_chunk: Cell::new(Instant::now()),
            finished: Cell::new(false),
            client_failed: Cell::new(false),
        })
    }

    /// The client went away (or broke its framing) mid-body.
    pub fn client_failed(&self) -> bool {
        self.client_failed.get()
    }

    /// Some bytes went to an upstream: the body cannot be sent again.
    pub fn started(&self) -> bool {
        self.started.get()
    }

    /// The body passed `max_body_bytes`.
    pub fn over(&self) -> bool {
        self.over.get()
    }
}

/// One try's view of [`BodyState`].
pub struct BodyReader(pub Rc<BodyState>);

/// The body stream's error: the client's, or ours for a body over the limit.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
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
        match &next {
            Poll::Ready(Some(Ok(chunk))) => {
                state.started.set(true);
                state.last_chunk.set(Instant::now());
                let seen = state.seen.get() + chunk.len() as u64;
                state.seen.set(seen);
                if state.max > 0 && seen > state.max {
                    state.over.set(true);
                    return Poll::Ready(Some(Err(BodyError::TooLarge)));
                }
            }
            Poll::Ready(Some(Err(_))) => state.client_failed.set(true),
            Poll::Ready(None) => state.finished.set(true),
            Poll::Pending => {}
        }
        next.map(|item| item.map(|r| r.map_err(BodyError::from)))
    }
}

/// The upstream's body on its way to the client: ends the in-flight count and finishes the
/// record when dropped, and fails when the upstream pauses longer than `proxy.timeout`
/// between two chunks (a flowing download is never cut). A failure ends the client's
/// connection without a clean end (actix closes it), so a cut body never looks complete.
struct UpstreamBody {
    inner: awc::ClientResponse,
    _lease: Lease,
    idle: Duration,
    /// Made at the first pause only: most bodies arrive without one.
    deadline: Option<Pin<Box<actix_rt::time::Sleep>>>,
    /// The deadline counts from the current pause (set at its start, cleared by a chunk).
    armed: bool,
    record: Option<Record>,
    /// Body bytes handed to the client so far.
    bytes: u64,
    /// How it ends if dropped now: before the end, the client has gone away.
    ending: Ending,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(self.bytes, self.ending);
        }
    }
}

impl Stream for UpstreamBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(item) => {
                this.armed = false;
                match &item {
                    Some(Ok(chunk)) => this.bytes += chunk.len() as u64,
                    Some(Err(e)) => this.ending = Ending::UpstreamFailed(why(e)),
                    None => this.ending = Ending::Complete,
                }
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
                        this.ending = Ending::UpstreamFailed(PAUSED);
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

/// The access log's words for a body the server paused past `proxy.timeout`.
const PAUSED: &str = "paused longer than proxy.timeout";

/// The access log's words for a body that failed.
fn why(e: &PayloadError) -> &'static str {
    match e {
        PayloadError::Incomplete(_) => "closed before the end of the body",
        PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => PAUSED,
        PayloadError::Io(_) => "connection error mid-body",
        _ => "malformed body",
    }
}
