//! What a service can ask of the HTTP/1 dispatcher beyond its answers: to be told of the
//! requests the dispatcher answers on its own, and how long a client may stall a response.

use std::{fmt, net::SocketAddr, sync::Arc};

use http::StatusCode;

use crate::{body::BoxBody, Response};

/// A request refused by the dispatcher itself: a head it could not parse (`400`), one too
/// large (`431`), or one not complete in time (`408`). No service is called for it, so this
/// is the only way to see it, or to answer it.
pub struct Refused<'a> {
    /// The status the dispatcher answers with.
    pub status: StatusCode,
    /// Why, in the parser's words.
    pub reason: &'a dyn fmt::Display,
    /// The client.
    pub peer_addr: Option<SocketAddr>,
}

/// Called for every [`Refused`] request: given to the service with
/// `HttpServiceBuilder::on_refused` (one for all its connections), or put in a connection's
/// data with `on_connect_ext` (actix-web: `HttpServer::on_connect`), to log or count them,
/// and, made with [`OnRefused::answering`], to answer them.
#[derive(Clone)]
pub struct OnRefused(Arc<dyn Fn(&Refused<'_>) -> Option<Response<BoxBody>> + Send + Sync>);

impl OnRefused {
    /// Tells `f` of each refused request; the dispatcher answers it as upstream does (the
    /// status, no body).
    pub fn new(f: impl Fn(&Refused<'_>) + Send + Sync + 'static) -> Self {
        Self(Arc::new(move |refused| {
            f(refused);
            None
        }))
    }

    /// Tells `f` of each refused request and sends the answer it returns instead of the
    /// dispatcher's bodiless one: a body saying what is wrong, headers of the service's own
    /// (a request id, say). Its status should be [`Refused::status`]; it is sent with
    /// `Connection: close`, as the connection closes after it; its body should be at hand
    /// (bytes, a string): a streaming body is not polled.
    pub fn answering(
        f: impl Fn(&Refused<'_>) -> Response<BoxBody> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(move |refused| Some(f(refused))))
    }

    pub(crate) fn call(&self, refused: &Refused<'_>) -> Option<Response<BoxBody>> {
        (self.0)(refused)
    }
}

impl fmt::Debug for OnRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnRefused")
    }
}
