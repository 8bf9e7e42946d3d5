//! The listeners, built below actix-web's `HttpServer`: where each listening socket comes
//! from (bound here, or handed over by systemd or by the process a SIGUSR2 upgrade replaces:
//! [`activation`]), and what a connection goes through before the actix-web App sees it:
//!
//! accept (actix-server: the workers, `max_connections`) → the PROXY protocol header when
//! `listen.proxy_protocol` is on ([`proxy_protocol`]: the client's address) → on the TLS
//! listener, the rustls handshake (actix-tls; HTTP/2 or HTTP/1.1 by ALPN) → actix-http's
//! `HttpService` with the App, given the header's address as the peer, so that
//! `HttpRequest::peer_addr()` is the client's everywhere (X-Forwarded-For, the limiter,
//! `allow`, the access log, refused requests' lines).
//!
//! actix-web's `HttpServer` cannot do this: its `on_connect` sees the stream but cannot read
//! from it, and it hands actix-http the TCP peer. What it did is done here the same way (the
//! App per worker and listener, `AppConfig`, the graceful-stop signal, the timeouts), so a
//! listener without the header behaves and costs as before.

pub mod activation;
mod proxy_protocol;

use std::{
    future::Future,
    io,
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use actix_http::{
    body::MessageBody, error::DispatchError, h1::OnRefused, ConnectionType, HttpService, KeepAlive,
    Protocol, Request,
};
use actix_rt::net::TcpStream;
use actix_server::ServerBuilder;
use actix_service::{
    apply_fn_factory, fn_service, map_config, IntoServiceFactory, Service, ServiceFactory,
    ServiceFactoryExt as _,
};
use actix_tls::accept::{
    rustls_0_23::{Acceptor, TlsStream},
    TlsError,
};
use actix_web::dev::{AppConfig, ServiceResponse};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};

use self::activation::Handed;
use crate::config::Config;

/// The listen backlog of the sockets bound here (std's `bind` listens with 128): past
/// `max_connections`, new connections wait in it.
const BACKLOG: i32 = 4096;

/// The listening sockets of one process, by the key that configures each.
#[derive(Debug, Default)]
pub struct Sockets {
    /// `listen.address`.
    pub plain: Option<TcpListener>,
    /// `listen.tls_address`.
    pub tls: Option<TcpListener>,
    /// `admin.address`.
    pub admin: Option<TcpListener>,
}

/// The configured listeners, named by their keys (which also name them when they are
/// handed to a new process: `LISTEN_FDNAMES`).
const KEYS: [&str; 3] = ["listen.address", "listen.tls_address", "admin.address"];

impl Sockets {
    /// The listeners `config` asks for: a socket handed over is used for the key whose
    /// address it is bound to (or whose key it is named by, with the same address or the
    /// configured port 0), the others are bound here. A socket handed over that matches no
    /// configured listener is an error: serving on it, or closing it, would both surprise.
    pub fn open(config: &Config, handed: Vec<Handed>) -> io::Result<Sockets> {
        let wanted = [
            config.listen,
            config.tls.as_ref().map(|t| t.address),
            config.admin,
        ];
        let mut found: [Option<TcpListener>; 3] = Default::default();
        for h in handed {
            let fd = h.fd;
            let (i, listener) = match_handed(h, &wanted, &found)?;
            if let Ok(addr) = listener.local_addr() {
                log::info!(
                    "{}: serving on {addr}, the socket handed over as fd {fd}",
                    KEYS[i]
                );
            }
            found[i] = Some(listener);
        }
        for (i, addr) in wanted.iter().enumerate() {
            if let (None, Some(addr)) = (&found[i], addr) {
                found[i] =
                    Some(bind(*addr).map_err(|e| {
                        io::Error::new(e.kind(), format!("{} {addr}: {e}", KEYS[i]))
                    })?);
            }
        }
        let [plain, tls, admin] = found;
        Ok(Sockets { plain, tls, admin })
    }

    /// Each listening socket with its key, as a new process is to be handed them.
    pub fn named(&self) -> impl Iterator<Item = (&TcpListener, &'static str)> {
        [&self.plain, &self.tls, &self.admin]
            .into_iter()
            .zip(KEYS)
            .filter_map(|(l, key)| l.as_ref().map(|l| (l, key)))
    }
}

/// Which of `wanted` (by [`KEYS`]) the handed-over socket `h` is, checked to be a listening
/// TCP socket.
fn match_handed(
    h: Handed,
    wanted: &[Option<SocketAddr>; 3],
    found: &[Option<TcpListener>; 3],
) -> io::Result<(usize, TcpListener)> {
    let what = format!("socket activation (LISTEN_FDS): fd {}", h.fd);
    let invalid =
        |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} {why}"));
    let bound = h
        .socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .filter(|_| h.socket.r#type().ok() == Some(socket2::Type::STREAM))
        .ok_or_else(|| invalid("is not a TCP socket".into()))?;
    if !h.socket.is_listener().unwrap_or(false) {
        return Err(invalid(format!("({bound}) is not listening")));
    }
    let by_name = h
        .name
        .as_deref()
        .and_then(|n| KEYS.iter().position(|k| *k == n));
    let fits = |i: usize| {
        wanted[i].is_some_and(|w| {
            w == bound || (by_name == Some(i) && w.port() == 0 && w.ip() == bound.ip())
        })
    };
    let i = match by_name {
        Some(i) => Some(i).filter(|&i| fits(i)),
        None => (0..KEYS.len()).find(|&i| fits(i) && found[i].is_none()),
    };
    let Some(i) = i.filter(|&i| found[i].is_none()) else {
        let configured = (0..KEYS.len())
            .map(|i| match wanted[i] {
                Some(a) => format!("{} {a}", KEYS[i]),
                None => format!("{} (none)", KEYS[i]),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let name = h
            .name
            .map_or_else(String::new, |n| format!(" (named {n:?})"));
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what}{name} is bound to {bound}, which is no listener of this configuration \
                 ({configured})"
            ),
        ));
    };
    Ok((i, h.socket.into()))
}

/// A listening socket on `addr`, with [`BACKLOG`]. Address reuse as std's `bind` sets it:
/// a restart does not wait for the old connections' TIME_WAIT.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// How the process's connections end when it stops: shared by every listener and worker.
#[derive(Debug, Clone)]
pub struct Drain(Arc<DrainState>);

#[derive(Debug)]
struct DrainState {
    /// A SIGUSR2 upgrade's old process: each answer says `Connection: close` and its
    /// connection closes after it, so no client sends a request into a connection that is
    /// about to close; idle ones stay until their next request, keepalive_timeout or the
    /// end of the shutdown timeout.
    announce: AtomicBool,
    /// A stop (SIGTERM): idle kept-alive connections are closed at once and answers under
    /// way close theirs (actix-http's graceful shutdown), so the process ends as soon as
    /// the requests in flight have, and a restart under systemd is not held up.
    close_idle: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain(Arc::new(DrainState {
            announce: AtomicBool::new(false),
            close_idle: watch::channel(false).0,
        }))
    }
}

impl Drain {
    /// From now on every answer closes its connection (see [`DrainState::announce`]).
    pub fn announce(&self) {
        self.0.announce.store(true, Ordering::Relaxed);
    }

    /// Idle connections close now; answers under way close theirs.
    pub fn close_idle(&self) {
        self.0.close_idle.send_replace(true);
    }

    /// Resolves when [`Drain::close_idle`] is called: actix-http's graceful-shutdown signal,
    /// asked for once per connection.
    fn closing(&self) -> impl Future<Output = ()> + 'static {
        let mut rx = self.0.close_idle.subscribe();
        async move {
            if rx.wait_for(|closing| *closing).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// What every connection of a listener gets, whatever App serves it.
#[derive(Clone)]
pub struct Http {
    pub keep_alive: KeepAlive,
    /// Every request head must arrive within this (actix-http's `client_request_timeout`;
    /// the vendored copy holds every head to it); also the TLS handshake's deadline, and the
    /// PROXY protocol header's.
    pub request_timeout: Duration,
    /// Every connection opens with a PROXY protocol header (`listen.proxy_protocol`).
    pub proxy_protocol: bool,
    /// Called by actix-http for a request it refuses before any App sees it.
    pub on_refused: Option<OnRefused>,
    pub drain: Drain,
}

/// The client's address for the connection `io`: the PROXY protocol header's, read off it
/// first when `http` expects one, else the TCP peer. An error closes the connection.
async fn client_address(
    io: &mut TcpStream,
    proxy_protocol: Option<Duration>,
) -> Result<Option<SocketAddr>, io::Error> {
    let peer = io.peer_addr().ok();
    let Some(deadline) = proxy_protocol else {
        return Ok(peer);
    };
    match proxy_protocol::read(io, deadline).await {
        Ok(source) => Ok(source.or(peer)),
        Err(why) => {
            proxy_protocol::log_refused(peer, &why);
            Err(io::Error::new(io::ErrorKind::InvalidData, why.to_string()))
        }
    }
}

impl Http {
    /// The client listeners': `listen.*`.
    pub fn clients(config: &Config, on_refused: OnRefused, drain: &Drain) -> Http {
        Http {
            keep_alive: if config.keepalive_timeout.is_zero() {
                KeepAlive::Disabled
            } else {
                KeepAlive::Timeout(config.keepalive_timeout)
            },
            // The vendored actix-http holds every request head to this, not only the first.
            request_timeout: config.header_timeout,
            proxy_protocol: config.proxy_protocol,
            on_refused: Some(on_refused),
            drain: drain.clone(),
        }
    }

    /// The admin API's: actix-web's defaults (it is no client's hot path), no header.
    pub fn admin(drain: &Drain) -> Http {
        Http {
            keep_alive: KeepAlive::default(),
            request_timeout: Duration::from_secs(5),
            proxy_protocol: false,
            on_refused: None,
            drain: drain.clone(),
        }
    }

    fn header_deadline(&self) -> Option<Duration> {
        self.proxy_protocol.then_some(self.request_timeout)
    }

    /// actix-http's service over the App `app` (made for this worker), as actix-web's
    /// `HttpServer` builds it for a listener on `addr`.
    fn service<T, A, S, B>(
        &self,
        app: A,
        addr: SocketAddr,
        secure: bool,
    ) -> impl ServiceFactory<
        (T, Protocol, Option<SocketAddr>),
        Config = (),
        Response = (),
        Error = DispatchError,
        InitError = (),
    >
    where
        T: AsyncRead + AsyncWrite + Unpin + 'static,
        A: IntoServiceFactory<S, Request>,
        S: ServiceFactory<
                Request,
                Config = AppConfig,
                Response = ServiceResponse<B>,
                Error = actix_web::Error,
                InitError = (),
            > + 'static,
        S::Future: 'static,
        <S::Service as Service<Request>>::Future: 'static,
        B: MessageBody + 'static,
    {
        let drain = self.drain.clone();
        let closing = self.drain.clone();
        let app = app
            .into_factory()
            .map(move |mut res: ServiceResponse<B>| {
                if drain.0.announce.load(Ordering::Relaxed) {
                    res.response_mut()
                        .head_mut()
                        .set_connection_type(ConnectionType::Close);
                }
                res
            })
            .map_err(|e: actix_web::Error| e.error_response());
        let mut builder = HttpService::build()
            .graceful_shutdown_signal(move || closing.closing())
            .keep_alive(self.keep_alive)
            .client_request_timeout(self.request_timeout)
            // actix-web's HttpServer default.
            .client_disconnect_timeout(Duration::from_secs(1));
        if !secure {
            builder = builder.local_addr(addr);
        }
        if let Some(on_refused) = self.on_refused.clone() {
            builder = builder.on_connect_ext(move |_: &T, data| {
                data.insert(on_refused.clone());
            });
        }
        let host = addr.to_string();
        // `AppConfig::new` is actix-web's own; this is its constructor for servers built
        // outside `HttpServer` (actix-test's), exempt from semver: a new actix-web that
        // drops it fails to build here rather than behaving differently.
        builder.finish(map_config(app, move |()| {
            AppConfig::__priv_test_new(secure, host.clone(), addr)
        }))
    }
}

/// Serves plain HTTP/1.1 on `listener` with the App that `app` makes, once per worker.
pub fn plain<F, A, S, B>(
    builder: ServerBuilder,
    name: &str,
    listener: TcpListener,
    http: Http,
    app: F,
) -> io::Result<ServerBuilder>
where
    F: Fn() -> A + Send + Clone + 'static,
    A: IntoServiceFactory<S, Request>,
    S: ServiceFactory<
            Request,
            Config = AppConfig,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    S::Future: 'static,
    <S::Service as Service<Request>>::Future: 'static,
    B: MessageBody + 'static,
{
    let addr = listener.local_addr()?;
    builder.listen(name, listener, move || {
        let header = http.header_deadline();
        fn_service(move |mut io: TcpStream| async move {
            let peer = client_address(&mut io, header).await;
            Ok((io, Protocol::Http1, peer.map_err(DispatchError::Io)?))
        })
        .and_then(http.service(app(), addr, false))
    })
}

/// Serves HTTPS on `listener`: HTTP/2 or HTTP/1.1 by ALPN, with `tls` (whose certificate
/// resolver a reload updates), and the App that `app` makes, once per worker.
pub fn tls<F, A, S, B>(
    builder: ServerBuilder,
    name: &str,
    listener: TcpListener,
    http: Http,
    mut tls: rustls::ServerConfig,
    app: F,
) -> io::Result<ServerBuilder>
where
    F: Fn() -> A + Send + Clone + 'static,
    A: IntoServiceFactory<S, Request>,
    S: ServiceFactory<
            Request,
            Config = AppConfig,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    S::Future: 'static,
    <S::Service as Service<Request>>::Future: 'static,
    B: MessageBody + 'static,
{
    let addr = listener.local_addr()?;
    // As actix-http offers them: HTTP/2 first.
    let mut alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    alpn.append(&mut tls.alpn_protocols);
    tls.alpn_protocols = alpn;
    let mut acceptor = Acceptor::new(tls);
    // A TLS handshake is the start of a request head: the same deadline.
    acceptor.set_handshake_timeout(http.request_timeout);
    builder.listen(name, listener, move || {
        let header = http.header_deadline();
        let handshake = apply_fn_factory(
            acceptor.clone().map_err(|e| match e {
                TlsError::Timeout => io::Error::new(io::ErrorKind::TimedOut, "TLS handshake"),
                TlsError::Tls(e) => e,
                TlsError::Service(never) => match never {},
            }),
            |(io, peer): (TcpStream, Option<SocketAddr>), acceptor| {
                let handshake = acceptor.call(io);
                async move {
                    let tls: TlsStream<TcpStream> = handshake.await?;
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
                    Ok((tls, protocol, peer))
                }
            },
        );
        fn_service(move |mut io: TcpStream| async move {
            let peer = client_address(&mut io, header).await?;
            Ok((io, peer))
        })
        .and_then(handshake)
        .map_err(DispatchError::Io)
        .and_then(http.service(app(), addr, true))
    })
}
