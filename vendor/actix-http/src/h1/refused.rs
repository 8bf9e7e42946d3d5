//! What a service can ask of the HTTP/1 dispatcher beyond its answers: to be told of the
//! requests the dispatcher answers on its own, and how long a client may stall a response.

use std::{fmt, net::SocketAddr, sync::Arc};

use http::StatusCode;

/// A request refused by the dispatcher itself: a head it could not parse (`400`), or one
/// too large (`431`). No service is called for it, so this is the only way to see it.
pub struct Refused<'a> {
    /// The status the dispatcher answers with.
    pub status: StatusCode,
    /// Why, in the parser's words.
    pub reason: &'a dyn fmt::Display,
    /// The client.
    pub peer_addr: Option<SocketAddr>,
}

/// Called for every [`Refused`] request, to log or count them: given to the service with
/// `HttpServiceBuilder::on_refused` (one for all its connections), or put in a connection's
/// data with `on_connect_ext` (actix-web: `HttpServer::on_connect`).
#[derive(Clone)]
pub struct OnRefused(Arc<dyn Fn(&Refused<'_>) + Send + Sync>);

impl OnRefused {
    pub fn new(f: impl Fn(&Refused<'_>) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub(crate) fn call(&self, refused: &Refused<'_>) {
        (self.0)(refused)
    }
}

impl fmt::Debug for OnRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnRefused")
    }
}

/// In a response's extensions: the longest the client may accept none of the response's
/// bytes. Past it the connection is closed and the response (its body too) dropped, so a
/// client that stops reading cannot hold what the body holds (say, a proxy's upstream
/// connection) for ever. Without it, a response waits on its client as long as it takes.
#[derive(Debug, Clone, Copy)]
pub struct WriteTimeout(pub std::time::Duration);
