//! Client connection pooling keyed on the authority part of the connection URI.

use std::{
    cell::RefCell,
    collections::{HashMap, VecDeque},
    future::Future,
    io,
    ops::Deref,
    pin::Pin,
    rc::Rc,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use actix_codec::{AsyncRead, AsyncWrite, ReadBuf};
use actix_http::Protocol;
use actix_rt::time::{sleep, Sleep};
use actix_service::Service;
use futures_core::future::LocalBoxFuture;
use futures_util::FutureExt as _;
use http::uri::Authority;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    config::ConnectorConfig,
    connection::{ConnectionInnerType, ConnectionIo, ConnectionType, H2ConnectionInner},
    error::ConnectError,
    h2proto::handshake,
    Connect,
};

/// What pooled connections are kept by: the authority, and the address connected to when
/// the request named one (`ClientRequest::address`). (roundabout patch: servers known by
/// name, VENDORED.md: two addresses of one name are two servers, and a connection to one
/// must not be handed to a request for the other.)
#[derive(Debug, Clone)]
pub struct Key {
    authority: Authority,
    addr: Option<std::net::SocketAddr>,
}

/// Hashed twice per request (a connection taken, then given back). `Authority`'s own hash
/// feeds the hasher one lowercased byte at a time; this hashes the length, the last eight
/// bytes lowercased as one word (the port and the end of the name: what tells a proxy's
/// few servers apart) and the address. Keys that are equal (authorities equal ignoring
/// ASCII case) hash alike, as `Hash` requires.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let bytes = self.authority.as_str().as_bytes();
        let tail = &bytes[bytes.len().saturating_sub(8)..];
        let mut word = [0u8; 8];
        for (w, b) in word.iter_mut().zip(tail) {
            *w = b.to_ascii_lowercase();
        }
        state.write_usize(bytes.len());
        state.write_u64(u64::from_le_bytes(word));
        self.addr.hash(state);
    }
}

/// Compared twice per request, like the hash. `Authority`'s own `==` compares a lowercased
/// byte at a time; a proxy's keys are copies of one spelling, so the bytes are compared
/// whole first (one `memcmp`), and ignoring case only when they differ.
impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        let (a, b) = (
            self.authority.as_str().as_bytes(),
            other.authority.as_str().as_bytes(),
        );
        self.addr == other.addr && (a == b || a.eq_ignore_ascii_case(b))
    }
}

impl Eq for Key {}

impl From<Authority> for Key {
    fn from(authority: Authority) -> Key {
        Key {
            authority,
            addr: None,
        }
    }
}

/// Connections pool to reuse I/O per [`Authority`].
#[doc(hidden)]
pub struct ConnectionPool<S, Io>
where
    Io: AsyncWrite + Unpin + 'static,
{
    connector: S,
    inner: ConnectionPoolInner<Io>,
}

/// Wrapper type for check the ref count of Rc.
pub struct ConnectionPoolInner<Io>(Rc<ConnectionPoolInnerPriv<Io>>)
where
    Io: AsyncWrite + Unpin + 'static;

impl<Io> ConnectionPoolInner<Io>
where
    Io: AsyncWrite + Unpin + 'static,
{
    fn new(config: ConnectorConfig) -> Self {
        // No limit: no semaphore, and no permit to take and give back (an `Arc` and two
        // atomic operations per request).
        let permits = (config.limit < ConnectorConfig::NO_LIMIT)
            .then(|| Arc::new(Semaphore::new(config.limit)));
        let available = RefCell::new(HashMap::default());

        Self(Rc::new(ConnectionPoolInnerPriv {
            config,
            available,
            permits,
        }))
    }

    /// Spawns a graceful shutdown task for the underlying I/O with a timeout.
    fn close(&self, conn: ConnectionInnerType<Io>) {
        if let Some(timeout) = self.config.disconnect_timeout {
            if let ConnectionInnerType::H1(io) = conn {
                if tokio::runtime::Handle::try_current().is_ok() {
                    actix_rt::spawn(CloseConnection::new(io, timeout));
                }
            }
        }
    }
}

impl<Io> Clone for ConnectionPoolInner<Io>
where
    Io: AsyncWrite + Unpin + 'static,
{
    fn clone(&self) -> Self {
        Self(Rc::clone(&self.0))
    }
}

impl<Io> Deref for ConnectionPoolInner<Io>
where
    Io: AsyncWrite + Unpin + 'static,
{
    type Target = ConnectionPoolInnerPriv<Io>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<Io> Drop for ConnectionPoolInner<Io>
where
    Io: AsyncWrite + Unpin + 'static,
{
    fn drop(&mut self) {
        // When strong count is one it means the pool is dropped
        // remove and drop all Io types.
        if Rc::strong_count(&self.0) == 1 {
            if let Some(permits) = &self.permits {
                permits.close();
            }
            std::mem::take(&mut *self.available.borrow_mut())
                .into_iter()
                .for_each(|(_, conns)| {
                    conns.into_iter().for_each(|pooled| self.close(pooled.conn))
                });
        }
    }
}

pub struct ConnectionPoolInnerPriv<Io>
where
    Io: AsyncWrite + Unpin + 'static,
{
    config: ConnectorConfig,
    // Looked up twice per request (take, then give back): a fast hash, not SipHash; the
    // keys are the servers the application talks to.
    available: RefCell<HashMap<Key, VecDeque<PooledConnection<Io>>, foldhash::fast::RandomState>>,
    permits: Option<Arc<Semaphore>>,
}

impl<S, Io> ConnectionPool<S, Io>
where
    Io: AsyncWrite + Unpin + 'static,
{
    /// Construct a new connection pool.
    ///
    /// [`super::config::ConnectorConfig`]'s `limit` is used as the max permits allowed for
    /// in-flight connections.
    ///
    /// The pool can only have equal to `limit` amount of requests spawning/using Io type
    /// concurrently.
    ///
    /// Any requests beyond limit would be wait in fifo order and get notified in async manner
    /// by [`tokio::sync::Semaphore`]
    pub(crate) fn new(connector: S, config: ConnectorConfig) -> Self {
        let inner = ConnectionPoolInner::new(config);

        Self { connector, inner }
    }
}

impl<S, Io> Service<Connect> for ConnectionPool<S, Io>
where
    S: Service<Connect, Response = (Io, Protocol), Error = ConnectError> + Clone + 'static,
    Io: ConnectionIo,
{
    type Response = ConnectionType<Io>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_service::forward_ready!(connector);

    fn call(&self, req: Connect) -> Self::Future {
        let connector = self.connector.clone();
        let inner = self.inner.clone();

        Box::pin(async move {
            let key = if let Some(authority) = req.uri.authority() {
                Key {
                    authority: authority.clone(),
                    addr: req.addr,
                }
            } else {
                return Err(ConnectError::Unresolved);
            };

            // acquire an owned permit and carry it with connection
            let permit = match &inner.permits {
                Some(permits) => Some(Arc::clone(permits).acquire_owned().await.map_err(|_| {
                    ConnectError::Io(io::Error::other(
                        "Failed to acquire semaphore on client connection pool",
                    ))
                })?),
                None => None,
            };

            let conn = {
                let mut conn = None;

                // check if there is idle connection for given key.
                let mut map = inner.available.borrow_mut();

                if let Some(conns) = map.get_mut(&key) {
                    let now = Instant::now();

                    // The oldest idle connection, past its keep-alive, closed: with the
                    // newest taken first (below), the oldest are met only here, one per
                    // request, as nginx's keepalive cache lets them go.
                    if conns.front().is_some_and(|c| c.expired(now)) {
                        if let Some(c) = conns.pop_front() {
                            inner.close(c.conn);
                        }
                    }

                    // The most recently used first (upstream took the oldest): a few busy
                    // connections stay warm, their ACKs ride on the next request, and the
                    // rest idle out, instead of every connection in turn waiting long
                    // enough for its delayed-ACK timer.
                    while let Some(mut c) = conns.pop_back() {
                        if c.expired(now) {
                            // drop connections that are too old
                            inner.close(c.conn);
                        } else {
                            // check if the connection is still usable
                            if let ConnectionInnerType::H1(ref mut io) = c.conn {
                                let check = ConnectionCheckFuture { io };
                                match check.now_or_never().expect(
                                    "ConnectionCheckFuture must never yield with Poll::Pending.",
                                ) {
                                    ConnectionState::Tainted => {
                                        inner.close(c.conn);
                                        continue;
                                    }
                                    ConnectionState::Skip => continue,
                                    ConnectionState::Live => conn = Some(c),
                                }
                            } else {
                                conn = Some(c);
                            }

                            break;
                        }
                    }
                };

                conn
            };

            // construct acquired. It's used to put Io type back to pool/ close the Io type.
            // permit is carried with the whole lifecycle of Acquired.
            let acquired = Acquired { key, inner, permit };

            // match the connection and spawn new one if did not get anything.
            match conn {
                Some(conn) => Ok(ConnectionType::from_pool(conn.conn, conn.created, acquired)),
                // Boxed (roundabout patch): connecting and an HTTP/2 handshake, held inline,
                // made this future 800 bytes, moved into its box on every request though
                // most take a pooled connection.
                None => {
                    Box::pin(async move {
                        let (io, proto) = connector.call(req).await?;

                        // NOTE: remove when http3 is added in support.
                        assert!(proto != Protocol::Http3);

                        if proto == Protocol::Http1 {
                            Ok(ConnectionType::from_h1(io, Instant::now(), acquired))
                        } else {
                            let config = &acquired.inner.config;
                            let (sender, connection) = handshake(io, config).await?;
                            let inner = H2ConnectionInner::new(sender, connection);
                            Ok(ConnectionType::from_h2(inner, Instant::now(), acquired))
                        }
                    })
                    .await
                }
            }
        })
    }
}

/// Type for check the connection and determine if it's usable.
struct ConnectionCheckFuture<'a, Io> {
    io: &'a mut Io,
}

enum ConnectionState {
    /// IO is pending and a new request would wake it.
    Live,

    /// IO unexpectedly has unread data and should be dropped.
    Tainted,

    /// IO should be skipped but not dropped.
    Skip,
}

impl<Io> Future for ConnectionCheckFuture<'_, Io>
where
    Io: AsyncRead + Unpin,
{
    type Output = ConnectionState;

    // this future is only used to get access to Context.
    // It should never return Poll::Pending.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut buf = [0; 2];
        let mut read_buf = ReadBuf::new(&mut buf);

        let state = match Pin::new(&mut this.io).poll_read(cx, &mut read_buf) {
            Poll::Ready(Ok(())) if !read_buf.filled().is_empty() => ConnectionState::Tainted,

            Poll::Pending => ConnectionState::Live,
            _ => ConnectionState::Skip,
        };

        Poll::Ready(state)
    }
}

struct PooledConnection<Io> {
    conn: ConnectionInnerType<Io>,
    created: Instant,
    /// When it stops being reused: its keep-alive after it was given back, or its
    /// lifetime, whichever comes first (`None`: past what an `Instant` holds). Worked out
    /// once when it is given back, not as two differences of times each time the pool
    /// looks at it.
    expires: Option<Instant>,
}

impl<Io> PooledConnection<Io> {
    fn new(conn: ConnectionInnerType<Io>, created: Instant, config: &ConnectorConfig) -> Self {
        let idle_until = Instant::now().checked_add(config.conn_keep_alive);
        let old_at = created.checked_add(config.conn_lifetime);
        let expires = match (idle_until, old_at) {
            (Some(idle), Some(old)) => Some(idle.min(old)),
            (idle, old) => idle.or(old),
        };
        Self {
            conn,
            created,
            expires,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| now > at)
    }
}

pin_project! {
    #[project = CloseConnectionProj]
    struct CloseConnection<Io> {
        io: Io,
        #[pin]
        timeout: Sleep,
    }
}

impl<Io> CloseConnection<Io>
where
    Io: AsyncWrite + Unpin,
{
    fn new(io: Io, timeout: Duration) -> Self {
        CloseConnection {
            io,
            timeout: sleep(timeout),
        }
    }
}

impl<Io> Future for CloseConnection<Io>
where
    Io: AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();

        match this.timeout.poll(cx) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Pin::new(this.io).poll_shutdown(cx).map(|_| ()),
        }
    }
}

pub struct Acquired<Io>
where
    Io: AsyncWrite + Unpin + 'static,
{
    /// authority key for identify connection.
    key: Key,
    /// handle to connection pool.
    inner: ConnectionPoolInner<Io>,
    /// permit for limit concurrent in-flight connection for a Client object.
    permit: Option<OwnedSemaphorePermit>,
}

impl<Io: ConnectionIo> Acquired<Io> {
    /// Close the IO.
    pub(super) fn close(&self, conn: ConnectionInnerType<Io>) {
        self.inner.close(conn);
    }

    /// Release IO back into pool.
    pub(super) fn release(&self, conn: ConnectionInnerType<Io>, created: Instant) {
        let Acquired { key, inner, .. } = self;

        let conn = PooledConnection::new(conn, created, &inner.config);
        // The key's list is there but for the first connection: found without cloning the
        // key (its authority's `Bytes`: a shared count up and down per request).
        let mut available = inner.available.borrow_mut();
        match available.get_mut(key) {
            Some(conns) => conns.push_back(conn),
            None => {
                available.insert(key.clone(), VecDeque::from([conn]));
            }
        }

        let _ = &self.permit;
    }
}

#[cfg(test)]
mod test {
    use std::cell::Cell;

    use http::Uri;

    use super::*;

    /// A stream type that always returns pending on async read.
    ///
    /// Mocks an idle TCP stream that is ready to be used for client connections.
    struct TestStream(Rc<Cell<usize>>);

    impl Drop for TestStream {
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }

    impl AsyncRead for TestStream {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for TestStream {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            unimplemented!()
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            unimplemented!()
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Clone)]
    struct TestPoolConnector {
        generated: Rc<Cell<usize>>,
    }

    impl Service<Connect> for TestPoolConnector {
        type Response = (TestStream, Protocol);
        type Error = ConnectError;
        type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

        actix_service::always_ready!();

        fn call(&self, _: Connect) -> Self::Future {
            self.generated.set(self.generated.get() + 1);
            let generated = self.generated.clone();
            Box::pin(async { Ok((TestStream(generated), Protocol::Http1)) })
        }
    }

    fn release<T>(conn: ConnectionType<T>)
    where
        T: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        match conn {
            ConnectionType::H1(mut conn) => conn.on_release(true),
            ConnectionType::H2(mut conn) => conn.on_release(false),
        }
    }

    #[actix_rt::test]
    async fn test_pool_limit() {
        let connector = TestPoolConnector {
            generated: Rc::new(Cell::new(0)),
        };

        let config = ConnectorConfig {
            limit: 1,
            ..Default::default()
        };

        let pool = super::ConnectionPool::new(connector, config);

        let req = Connect {
            uri: Uri::from_static("http://localhost"),
            addr: None,
        };

        let conn = pool.call(req.clone()).await.unwrap();

        let waiting = Rc::new(Cell::new(true));

        let waiting_clone = waiting.clone();
        actix_rt::spawn(async move {
            actix_rt::time::sleep(Duration::from_millis(100)).await;
            waiting_clone.set(false);
            drop(conn);
        });

        assert!(waiting.get());

        let now = Instant::now();
        let conn = pool.call(req).await.unwrap();

        release(conn);
        assert!(!waiting.get());
        assert!(now.elapsed() >= Duration::from_millis(100));
    }

    #[actix_rt::test]
    async fn the_newest_idle_connection_is_taken_first_and_the_oldest_expired_one_closed() {
        let generated = Rc::new(Cell::new(0));
        let connector = TestPoolConnector {
            generated: generated.clone(),
        };
        let config = ConnectorConfig {
            conn_keep_alive: Duration::from_millis(100),
            disconnect_timeout: None,
            ..Default::default()
        };
        let pool = super::ConnectionPool::new(connector, config);
        let req = Connect {
            uri: Uri::from_static("http://localhost"),
            addr: None,
        };
        let key = Key::from(Authority::from_static("localhost"));
        let idle_created = || -> Vec<Instant> {
            let map = pool.inner.available.borrow();
            map.get(&key)
                .map(|conns| conns.iter().map(|c| c.created).collect())
                .unwrap_or_default()
        };

        let (old, new) = (pool.call(req.clone()).await.unwrap(), {
            actix_rt::time::sleep(Duration::from_millis(2)).await;
            pool.call(req.clone()).await.unwrap()
        });
        release(old);
        release(new);
        let [older, newer] = idle_created()[..] else {
            panic!("two idle connections")
        };
        assert!(older < newer);
        // The newer is taken; the older stays idle.
        let taken = pool.call(req.clone()).await.unwrap();
        assert_eq!(idle_created(), [older]);
        assert_eq!(generated.get(), 2, "no connection made");

        // Past its keep-alive, the older is closed by the next request, which takes the
        // connection given back meanwhile.
        actix_rt::time::sleep(Duration::from_millis(150)).await;
        release(taken);
        let _again = pool.call(req.clone()).await.unwrap();
        assert!(idle_created().is_empty());
        assert_eq!(generated.get(), 1, "the older closed, the newer in use");
    }

    #[actix_rt::test]
    async fn without_a_limit_there_is_no_semaphore_and_no_wait() {
        let generated = Rc::new(Cell::new(0));
        let connector = TestPoolConnector {
            generated: generated.clone(),
        };
        // What `Connector::limit(0)` sets.
        let config = ConnectorConfig {
            limit: ConnectorConfig::NO_LIMIT,
            ..Default::default()
        };
        let pool = super::ConnectionPool::new(connector, config);
        assert!(pool.inner.permits.is_none());
        let req = Connect {
            uri: Uri::from_static("http://localhost"),
            addr: None,
        };
        let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| pool.call(req.clone())))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(generated.get(), 3);
        held.into_iter().for_each(release);
        assert_eq!(
            pool.inner
                .available
                .borrow()
                .values()
                .map(VecDeque::len)
                .sum::<usize>(),
            3
        );
    }

    #[actix_rt::test]
    async fn test_pool_keep_alive() {
        let generated = Rc::new(Cell::new(0));
        let generated_clone = generated.clone();

        let connector = TestPoolConnector { generated };

        let config = ConnectorConfig {
            conn_keep_alive: Duration::from_secs(1),
            ..Default::default()
        };

        let pool = super::ConnectionPool::new(connector, config);

        let req = Connect {
            uri: Uri::from_static("http://localhost"),
            addr: None,
        };

        let conn = pool.call(req.clone()).await.unwrap();
        assert_eq!(1, generated_clone.get());
        release(conn);

        let conn = pool.call(req.clone()).await.unwrap();
        assert_eq!(1, generated_clone.get());
        release(conn);

        actix_rt::time::sleep(Duration::from_millis(1500)).await;
        actix_rt::task::yield_now().await;

        let conn = pool.call(req).await.unwrap();
        // Note: spawned recycle connection is not ran yet.
        // This is tokio current thread runtime specific behavior.
        assert_eq!(2, generated_clone.get());

        // yield task so the old connection is properly dropped.
        actix_rt::task::yield_now().await;
        assert_eq!(1, generated_clone.get());

        release(conn);
    }

    #[actix_rt::test]
    async fn test_pool_lifetime() {
        let generated = Rc::new(Cell::new(0));
        let generated_clone = generated.clone();

        let connector = TestPoolConnector { generated };

        let config = ConnectorConfig {
            conn_lifetime: Duration::from_secs(1),
            ..Default::default()
        };

        let pool = super::ConnectionPool::new(connector, config);

        let req = Connect {
            uri: Uri::from_static("http://localhost"),
            addr: None,
        };

        let conn = pool.call(req.clone()).await.unwrap();
        assert_eq!(1, generated_clone.get());
        release(conn);

        let conn = pool.call(req.clone()).await.unwrap();
        assert_eq!(1, generated_clone.get());
        release(conn);

        actix_rt::time::sleep(Duration::from_millis(1500)).await;
        actix_rt::task::yield_now().await;

        let conn = pool.call(req).await.unwrap();
        // Note: spawned recycle connection is not ran yet.
        // This is tokio current thread runtime specific behavior.
        assert_eq!(2, generated_clone.get());

        // yield task so the old connection is properly dropped.
        actix_rt::task::yield_now().await;
        assert_eq!(1, generated_clone.get());

        release(conn);
    }

    #[actix_rt::test]
    async fn test_pool_authority_key() {
        let generated = Rc::new(Cell::new(0));
        let generated_clone = generated.clone();

        let connector = TestPoolConnector { generated };

        let config = ConnectorConfig::default();

        let pool = super::ConnectionPool::new(connector, config);

        let req = Connect {
            uri: Uri::from_static("https://crates.io"),
            addr: None,
        };

        let conn = pool.call(req.clone()).await.unwrap();
        assert_eq!(1, generated_clone.get());
        release(conn);

        let conn = pool.call(req).await.unwrap();
        assert_eq!(1, generated_clone.get());
        release(conn);

        let req = Connect {
            uri: Uri::from_static("https://google.com"),
            addr: None,
        };

        let conn = pool.call(req.clone()).await.unwrap();
        assert_eq!(2, generated_clone.get());
        release(conn);
        let conn = pool.call(req).await.unwrap();
        assert_eq!(2, generated_clone.get());
        release(conn);
    }

    /// roundabout patch: one authority at two addresses is two keys (VENDORED.md, "Pooled
    /// connections are kept by authority and address").
    #[actix_rt::test]
    async fn test_pool_authority_and_address_key() {
        let generated = Rc::new(Cell::new(0));
        let connector = TestPoolConnector {
            generated: generated.clone(),
        };
        let pool = super::ConnectionPool::new(connector, ConnectorConfig::default());
        let at = |ip: &str| Connect {
            uri: Uri::from_static("http://api.internal:8080"),
            addr: Some(format!("{ip}:8080").parse().unwrap()),
        };

        release(pool.call(at("127.0.0.1")).await.unwrap());
        release(pool.call(at("127.0.0.1")).await.unwrap());
        assert_eq!(1, generated.get(), "the same address reuses its connection");
        release(pool.call(at("127.0.0.2")).await.unwrap());
        assert_eq!(
            2,
            generated.get(),
            "another address of the name gets its own"
        );
        release(pool.call(at("127.0.0.1")).await.unwrap());
        assert_eq!(2, generated.get());
    }

    #[test]
    fn keys_equal_ignoring_case_hash_alike_and_a_shared_tail_does_not_merge_keys() {
        use std::hash::BuildHasher as _;
        let hasher = foldhash::fast::RandomState::default();
        let key = |a: &'static str| Key::from(Authority::from_static(a));
        let (lower, upper) = (key("api.internal:8080"), key("API.Internal:8080"));
        assert_eq!(lower, upper);
        assert_eq!(hasher.hash_one(&lower), hasher.hash_one(&upper));
        assert_ne!(key("api.internal:8080"), key("api.internal:8081"));
        assert_ne!(key("api.internal:8080"), key("api.internal:80"));
        let at = |a: &'static str, addr: &str| Key {
            addr: Some(addr.parse().unwrap()),
            ..key(a)
        };
        assert_eq!(
            at("API.internal:80", "10.0.0.1:80"),
            at("api.internal:80", "10.0.0.1:80")
        );
        assert_ne!(
            at("api.internal:80", "10.0.0.1:80"),
            at("api.internal:80", "10.0.0.2:80")
        );
        assert_ne!(at("api.internal:80", "10.0.0.1:80"), key("api.internal:80"));
        // Same length, same last eight bytes: the same hash, and still two keys.
        let (a, b) = (key("aaa.internal:8080"), key("bbb.internal:8080"));
        assert_eq!(hasher.hash_one(&a), hasher.hash_one(&b));
        let mut map = HashMap::with_hasher(hasher);
        map.insert(a.clone(), 1);
        map.insert(b.clone(), 2);
        assert_eq!((map[&a], map[&b], map.len()), (1, 2, 2));
    }

    #[actix_rt::test]
    async fn test_pool_drop() {
        let generated = Rc::new(Cell::new(0));
        let generated_clone = generated.clone();

        let connector = TestPoolConnector { generated };

        let config = ConnectorConfig::default();

        let pool = Rc::new(super::ConnectionPool::new(connector, config));

        let req = Connect {
            uri: Uri::from_static("https://crates.io"),
            addr: None,
        };

        let conn = pool.call(req.clone()).await.unwrap();
        assert_eq!(1, generated_clone.get());
        release(conn);

        let req = Connect {
            uri: Uri::from_static("https://google.com"),
            addr: None,
        };
        let conn = pool.call(req.clone()).await.unwrap();
        assert_eq!(2, generated_clone.get());
        release(conn);

        let clone1 = pool.clone();
        let clone2 = clone1.clone();

        drop(clone2);
        for _ in 0..2 {
            actix_rt::task::yield_now().await;
        }
        assert_eq!(2, generated_clone.get());

        drop(clone1);
        for _ in 0..2 {
            actix_rt::task::yield_now().await;
        }
        assert_eq!(2, generated_clone.get());

        drop(pool);
        for _ in 0..2 {
            actix_rt::task::yield_now().await;
        }
        assert_eq!(0, generated_clone.get());
    }
}
