//! HTTP/1.1 protocol upgrades (RFC 9110 §7.8) for any `Upgrade` token.
//!
//! See [`ClientRequest::send_upgrade`](crate::ClientRequest::send_upgrade).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use actix_codec::Framed;
use actix_http::{
    error::PayloadError,
    h1::{ClientCodec, ClientPayloadCodec, MessageType},
    Payload, StatusCode,
};
use bytes::Bytes;
use futures_core::{ready, Stream};
use pin_project_lite::pin_project;

use crate::{BoxedSocket, ClientResponse};

/// The answer to an upgrade request sent with
/// [`ClientRequest::send_upgrade`](crate::ClientRequest::send_upgrade).
pub enum UpgradeResponse {
    /// `101 Switching Protocols`: the response head (it has no body), and the connection,
    /// which now speaks the protocol that the server switched to.
    ///
    /// `Framed::into_parts` gives the socket (`parts.io`) and the bytes that the server sent
    /// after the 101 head and that were already read (`parts.read_buf`, possibly empty):
    /// they come before anything read from the socket. Nothing is left to write. The
    /// connection is the caller's: it is never returned to the pool.
    Switched(ClientResponse, Framed<BoxedSocket, ClientCodec>),

    /// Any other final answer: an ordinary response, whose body is read as usual (it is not
    /// decompressed). Its connection is closed, not pooled, once the response is dropped.
    NotSwitched(ClientResponse),
}

impl UpgradeResponse {
    /// The status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            UpgradeResponse::Switched(res, _) | UpgradeResponse::NotSwitched(res) => res.status(),
        }
    }

    /// Builds the answer from the head and the connection that the tunnel path returns.
    pub(crate) fn new(
        head: actix_http::ResponseHead,
        framed: Framed<BoxedSocket, ClientCodec>,
    ) -> Self {
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            return UpgradeResponse::Switched(ClientResponse::new(head, Payload::None), framed);
        }

        let payload: Payload = match framed.codec_ref().message_type() {
            MessageType::None => Payload::None,
            _ => Payload::Stream {
                payload: Box::pin(ClosingPayload {
                    framed: framed.into_map_codec(ClientCodec::into_payload_codec),
                    done: false,
                }),
            },
        };

        UpgradeResponse::NotSwitched(ClientResponse::new(head, payload))
    }
}

pin_project! {
    /// The body of a response on a connection that is not pooled: read to its end, then
    /// the connection closes when this is dropped.
    struct ClosingPayload {
        #[pin]
        framed: Framed<BoxedSocket, ClientPayloadCodec>,
        done: bool,
    }
}

impl Stream for ClosingPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();

        if *this.done {
            return Poll::Ready(None);
        }

        match ready!(this.framed.next_item(cx)?) {
            Some(Some(chunk)) => Poll::Ready(Some(Ok(chunk))),
            Some(None) => {
                *this.done = true;
                Poll::Ready(None)
            }
            None => Poll::Ready(Some(Err(PayloadError::Incomplete(None)))),
        }
    }
}
