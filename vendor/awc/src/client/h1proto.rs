use std::{
    future::Future,
    io::{self, Write},
    mem,
    pin::{pin, Pin},
    task::{Context, Poll},
};

use actix_codec::{AsyncRead, AsyncWrite, Decoder as _, Encoder as _, Framed};
use actix_http::{
    body::{BodySize, MessageBody},
    error::{ParseError, PayloadError},
    h1::{self, buffer_pool},
    header::{HeaderMap, TryIntoHeaderValue, EXPECT, HOST},
    BoxedPayloadStream, Payload, RequestHeadType, ResponseHead, StatusCode,
};
use actix_utils::future::poll_fn;
use bytes::{buf::BufMut, Bytes, BytesMut};
use futures_core::{ready, Stream};
use futures_util::SinkExt as _;

use super::{
    connection::{ConnectionIo, H1Connection},
    error::{ConnectError, SendRequestError},
};
use crate::BoxError;

// Not an `async fn` (roundabout patch): an async fn's future keeps its arguments and its
// own copies of them, so `io` (136 bytes) sat beside the exchange made of it, in a future
// moved whole into the connection's boxed send on every request.
pub(crate) fn send_request<Io, B>(
    io: H1Connection<Io>,
    mut head: RequestHeadType,
    body: B,
) -> impl Future<Output = Result<(ResponseHead, Payload), SendRequestError>>
where
    Io: ConnectionIo,
    B: MessageBody,
    B::Error: Into<BoxError>,
{
    let mut exchange = Exchange::new(io);
    async move {
        let mut body = pin!(body);

        let orig_length = body.size();
        let mut length = orig_length;
        let mut first_chunk = None;

        // This avoids sending `Transfer-Encoding: chunked` for requests with an empty body stream.
        // https://github.com/actix/actix-web/issues/2320
        if matches!(orig_length, BodySize::Stream) {
            enum Peek<E> {
                Pending,
                Item(Result<Bytes, E>),
                Eof,
            }

            match poll_fn(|cx| match body.as_mut().poll_next(cx) {
                Poll::Pending => Poll::Ready(Peek::Pending),
                Poll::Ready(Some(res)) => Poll::Ready(Peek::Item(res)),
                Poll::Ready(None) => Poll::Ready(Peek::Eof),
            })
            .await
            {
                Peek::Pending => {}
                Peek::Eof => length = BodySize::Sized(0),
                Peek::Item(Ok(chunk)) => first_chunk = Some(chunk),
                Peek::Item(Err(err)) => return Err(SendRequestError::Body(err.into())),
            }
        }

        // set request host header
        if !head.has_header(&HOST) {
            if let Some(host) = head.as_ref().uri.host() {
                let mut wrt = BytesMut::with_capacity(host.len() + 5).writer();

                match head.as_ref().uri.port_u16() {
                    None | Some(80) | Some(443) => write!(wrt, "{}", host)?,
                    Some(port) => write!(wrt, "{}:{}", host, port)?,
                };

                match wrt.get_mut().split().freeze().try_into_value() {
                    Ok(value) => match head {
                        RequestHeadType::Owned(ref mut head) => {
                            head.headers.insert(HOST, value);
                        }
                        RequestHeadType::Rc(_, ref mut extra_headers) => {
                            let headers = extra_headers.get_or_insert(HeaderMap::new());
                            headers.insert(HOST, value);
                        }
                        // A forwarded head carries the Host its proxy chose.
                        RequestHeadType::Forward(_) => {}
                    },
                    Err(err) => log::error!("Can not set HOST header {err}"),
                }
            }
        }

        // Check EXPECT header and enable expect handle flag accordingly.
        // See https://datatracker.ietf.org/doc/html/rfc7231#section-5.1.1
        let is_expect = if head.has_header(&EXPECT) {
            match orig_length {
                BodySize::None | BodySize::Sized(0) => {
                    let keep_alive = exchange.codec.keep_alive();
                    exchange.io.on_release(keep_alive);

                    // TODO: use a new variant or a new type better describing error violate
                    // `Requirements for clients` session of above RFC
                    return Err(SendRequestError::Connect(ConnectError::Disconnected));
                }
                _ => true,
            }
        } else {
            false
        };

        // special handle for EXPECT request.
        let (do_send, mut res_head) = if is_expect {
            exchange.write(h1::Message::Item((head, length)))?;
            poll_fn(|cx| exchange.poll_flush(cx)).await?;

            let head = exchange.read_response_head(true).await?;

            // return response head in case status code is not continue
            // and current head would be used as final response head.
            (head.status == StatusCode::CONTINUE, Some(head))
        } else {
            exchange.write(h1::Message::Item((head, length)))?;

            (true, None)
        };

        if do_send {
            // send request body
            match length {
                BodySize::None | BodySize::Sized(0) => {
                    poll_fn(|cx| exchange.poll_flush(cx)).await?;
                }
                _ => send_body(body.as_mut(), &mut exchange, first_chunk).await?,
            };

            // read response and init read body
            let head = exchange.read_response_head(false).await?;

            res_head = Some(head);
        }

        let head = res_head.unwrap();

        match exchange.codec.message_type() {
            h1::MessageType::None => {
                let keep_alive = exchange.codec.keep_alive();
                exchange.io.on_release(keep_alive);

                Ok((head, Payload::None))
            }
            _ => Ok((
                head,
                Payload::Stream {
                    payload: Box::pin(PlStream::new(exchange)) as BoxedPayloadStream,
                },
            )),
        }
    }
}

/// One request and its answer on an HTTP/1 connection: the codec (`C`: the request's, then
/// the body's), and the exchange's read and write buffers, which come from the thread's
/// [`buffer_pool`] while bytes wait in them and go back as soon as none do: the request's
/// buffer once it is written, the answer's while the exchange waits for the server and when
/// the body has been read. A pooled connection and an exchange waiting for its answer hold
/// no buffer.
///
/// Upstream made a `Framed` per exchange, with two 8 KiB buffers of its own held until the
/// body had been read; `Framed` has no way to hand its buffers back. The reads and writes
/// here are `Framed`'s.
struct Exchange<Io: ConnectionIo, C> {
    io: H1Connection<Io>,
    codec: C,
    bufs: Buffers,
    /// The connection has closed its read half (`Framed`'s `EOF`).
    eof: bool,
}

/// An exchange's buffers; they go back to the pool when it ends, however it ends.
#[derive(Default)]
struct Buffers {
    read: BytesMut,
    write: BytesMut,
}

impl Drop for Buffers {
    fn drop(&mut self) {
        buffer_pool::give(mem::take(&mut self.read));
        buffer_pool::give(mem::take(&mut self.write));
    }
}

/// `Framed`'s watermarks: a read wants at least `LW` of room and reserves up to `HW`; a
/// write buffer holding `HW` is full.
const LW: usize = 1024;
const HW: usize = 8 * 1024;

impl<Io: ConnectionIo> Exchange<Io, h1::ClientCodec> {
    fn new(io: H1Connection<Io>) -> Self {
        Self {
            io,
            codec: h1::ClientCodec::default(),
            bufs: Buffers::default(),
            eof: false,
        }
    }

    /// Encodes `item` into the write buffer.
    fn write(&mut self, item: h1::Message<(RequestHeadType, BodySize)>) -> Result<(), io::Error> {
        let buf = &mut self.bufs.write;
        if buf.capacity() == 0 {
            *buf = buffer_pool::take();
        }
        let remaining = buf.capacity() - buf.len();
        if remaining < LW {
            buf.reserve(HW - remaining);
        }
        self.codec.encode(item, buf)
    }

    fn is_write_buf_full(&self) -> bool {
        self.bufs.write.len() >= HW
    }

    /// One response head, as `Framed`'s `poll_next` decodes it: `None` at a close that left
    /// no partial head.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<ResponseHead, ParseError>>> {
        loop {
            if self.eof {
                return Poll::Ready(self.codec.decode_eof(&mut self.bufs.read).transpose());
            }
            if !self.bufs.read.is_empty() {
                if let Some(head) = self.codec.decode(&mut self.bufs.read)? {
                    return Poll::Ready(Some(Ok(head)));
                }
            }
            if !ready!(self.poll_read(cx))? {
                self.eof = true;
            }
        }
    }

    /// Reads response heads until one that answers the request: interim (1xx) responses
    /// are skipped (RFC 9110 §15.2: a client must be able to parse and ignore unexpected
    /// ones), but for `101 Switching Protocols`, and for `100 Continue` when
    /// `until_continue` (the wait for it after an `Expect: 100-continue` head).
    async fn read_response_head(
        &mut self,
        until_continue: bool,
    ) -> Result<ResponseHead, SendRequestError> {
        loop {
            // The connection closed before an answer: see `read_response_head` below.
            let head = poll_fn(|cx| self.poll_head(cx))
                .await
                .ok_or(SendRequestError::Response(ParseError::Incomplete))??;

            let wanted = !head.status.is_informational()
                || head.status == StatusCode::SWITCHING_PROTOCOLS
                || (until_continue && head.status == StatusCode::CONTINUE);

            if wanted {
                return Ok(head);
            }

            log::trace!("skipping interim response: {}", head.status);
        }
    }

    /// The rest of the exchange reads the body.
    fn into_payload(self) -> Exchange<Io, h1::ClientPayloadCodec> {
        let Exchange {
            io,
            codec,
            bufs,
            eof,
        } = self;

        Exchange {
            io,
            codec: codec.into_payload_codec(),
            bufs,
            eof,
        }
    }
}

impl<Io: ConnectionIo, C> Exchange<Io, C> {
    /// Writes the write buffer out, gives it back to the pool, and flushes the connection.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        let buf = &mut self.bufs.write;
        let mut written = 0;
        while written < buf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &buf[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "failed to write frame to transport",
                    )));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    bytes::Buf::advance(buf, written);
                    return Poll::Pending;
                }
            }
        }
        buffer_pool::give(mem::take(buf));

        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Reads more of the answer into the read buffer, taking one from the pool for it.
    ///
    /// `Ok(true)` when bytes came, `Ok(false)` at the close. While none have come, the
    /// exchange holds no read buffer: it goes back to the pool if it holds no bytes.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, io::Error>> {
        let buf = &mut self.bufs.read;
        let taken = buf.capacity() == 0;
        if taken {
            *buf = buffer_pool::take();
        }
        let remaining = buf.capacity() - buf.len();
        if remaining < LW {
            buf.reserve(HW - remaining);
        }

        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, buf) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(n != 0)),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                if taken && buf.is_empty() {
                    buffer_pool::give_untouched(buf);
                } else if buf.is_empty() {
                    buffer_pool::give(mem::take(buf));
                }
                Poll::Pending
            }
        }
    }
}

pub(crate) async fn open_tunnel<Io>(
    io: Io,
    head: RequestHeadType,
) -> Result<(ResponseHead, Framed<Io, h1::ClientCodec>), SendRequestError>
where
    Io: ConnectionIo,
{
    // create Framed and send request.
    let mut framed = Framed::new(io, h1::ClientCodec::default());
    framed.send((head, BodySize::None).into()).await?;

    // read response head.
    let head = read_response_head(Pin::new(&mut framed), false).await?;

    Ok((head, framed))
}

/// Reads response heads until one that answers the request: interim (1xx) responses are
/// skipped (RFC 9110 §15.2: a client must be able to parse and ignore unexpected ones), but
/// for `101 Switching Protocols`, and for `100 Continue` when `until_continue` (the wait for
/// it after an `Expect: 100-continue` head).
async fn read_response_head<T: AsyncRead>(
    mut framed: Pin<&mut Framed<T, h1::ClientCodec>>,
    until_continue: bool,
) -> Result<ResponseHead, SendRequestError> {
    loop {
        // The connection closed before an answer: the request may not even have arrived (a
        // kept-alive connection the server had just closed), so it is a response error, not
        // a connect one (which says the server could not be reached at all).
        let head = poll_fn(|cx| framed.as_mut().poll_next(cx))
            .await
            .ok_or(SendRequestError::Response(ParseError::Incomplete))??;

        let wanted = !head.status.is_informational()
            || head.status == StatusCode::SWITCHING_PROTOCOLS
            || (until_continue && head.status == StatusCode::CONTINUE);

        if wanted {
            return Ok(head);
        }

        log::trace!("skipping interim response: {}", head.status);
    }
}

/// send request body to the peer
async fn send_body<Io, B>(
    mut body: Pin<&mut B>,
    exchange: &mut Exchange<Io, h1::ClientCodec>,
    first_chunk: Option<Bytes>,
) -> Result<(), SendRequestError>
where
    Io: ConnectionIo,
    B: MessageBody,
    B::Error: Into<BoxError>,
{
    if let Some(chunk) = first_chunk {
        exchange.write(h1::Message::Chunk(Some(chunk)))?;
    }

    let mut eof = false;
    while !eof {
        while !eof && !exchange.is_write_buf_full() {
            match poll_fn(|cx| body.as_mut().poll_next(cx)).await {
                Some(Ok(chunk)) => {
                    exchange.write(h1::Message::Chunk(Some(chunk)))?;
                }
                Some(Err(err)) => return Err(SendRequestError::Body(err.into())),
                None => {
                    eof = true;
                    exchange.write(h1::Message::Chunk(None))?;
                }
            }
        }

        if !exchange.bufs.write.is_empty() {
            poll_fn(|cx| match exchange.poll_flush(cx) {
                Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
                Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                Poll::Pending => {
                    if !exchange.is_write_buf_full() {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    }
                }
            })
            .await?;
        }
    }

    poll_fn(|cx| exchange.poll_flush(cx)).await?;
    Ok(())
}

/// The answer's body: the rest of the exchange, read with the payload codec.
pub(crate) struct PlStream<Io: ConnectionIo> {
    exchange: Exchange<Io, h1::ClientPayloadCodec>,
    /// The read buffer may hold bytes the codec has not seen (`Framed`'s `READABLE`).
    readable: bool,
}

impl<Io: ConnectionIo> PlStream<Io> {
    fn new(exchange: Exchange<Io, h1::ClientCodec>) -> Self {
        PlStream {
            exchange: exchange.into_payload(),
            readable: true,
        }
    }

    /// `Framed::next_item`, with the exchange's reads.
    fn next_item(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Option<Bytes>, PayloadError>>> {
        let exchange = &mut self.exchange;
        loop {
            if self.readable {
                if exchange.eof {
                    return Poll::Ready(
                        exchange
                            .codec
                            .decode_eof(&mut exchange.bufs.read)
                            .transpose(),
                    );
                }

                if let Some(item) = exchange.codec.decode(&mut exchange.bufs.read)? {
                    return Poll::Ready(Some(Ok(item)));
                }

                self.readable = false;
            }

            if !ready!(exchange.poll_read(cx))? {
                exchange.eof = true;
            }
            self.readable = true;
        }
    }
}

impl<Io: ConnectionIo> Stream for PlStream<Io> {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();

        match ready!(this.next_item(cx)?) {
            Some(Some(chunk)) => Poll::Ready(Some(Ok(chunk))),
            Some(None) => {
                let exchange = &mut this.exchange;
                let keep_alive = exchange.codec.keep_alive();
                exchange.io.on_release(keep_alive);
                // The body is read: its buffer goes back now, not when the stream is dropped.
                buffer_pool::give(mem::take(&mut exchange.bufs.read));
                Poll::Ready(None)
            }
            // The payload codec ends a body, even a close-delimited one, with `Some(None)`:
            // a stream that ends without it was cut short.
            None => Poll::Ready(Some(Err(PayloadError::Incomplete(None)))),
        }
    }
}
