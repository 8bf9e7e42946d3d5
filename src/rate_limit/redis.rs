//! The shared store: one fixed window per client IP in Redis, so that every instance on the
//! same `redis_url` and `key_prefix` shares one budget.
//!
//! A check is ONE round trip: a Lua script (`EVALSHA`) that increments, sets the expiry on
//! the first hit, and returns the count and the time left; no key is ever left without an
//! expiry. Each check is bounded by [`STORE_TIMEOUT`]. Each worker has its own store: a
//! multiplexed connection that reconnects by itself, driven on the worker's thread (the
//! probe's pings, from another thread, are run there too). Nothing here blocks, and nothing
//! decides what a failure means (that is `on_store_error`'s, in the actor).

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{future::BoxFuture, FutureExt as _};

use super::{ClientKey, Decision, Hit, Store, StoreError};

/// The longest a limiter check may wait on the store before it counts as a store error.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(50);

/// Increments the window counter, starting the window on its first hit; returns
/// `{count, milliseconds left}`. The `ttl < 0` branch mends a key that lost its expiry, so
/// none can live forever.
pub(super) const WINDOW_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
";

/// Counts in Redis, keyed `key_prefix:IP` (`key_prefix:2001:db8::/64` for IPv6).
#[derive(Clone)]
pub struct RedisStore {
    conn: redis::aio::ConnectionManager,
    script: Arc<redis::Script>,
    prefix: Arc<str>,
    /// The runtime of the thread that made the store (a worker's): where its connection is
    /// opened and driven, whoever asks.
    runtime: tokio::runtime::Handle,
}

impl RedisStore {
    /// A lazily connecting store (so the balancer starts, and fails open or closed, while
    /// Redis is down), driven on the calling thread's runtime.
    pub fn new(client: redis::Client, prefix: Arc<str>) -> Result<Self, redis::RedisError> {
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, settings)?;
        Ok(Self {
            conn,
            script: Arc::new(redis::Script::new(WINDOW_SCRIPT)),
            prefix,
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

impl Store for RedisStore {
    fn hit(
        &self,
        client: ClientKey,
        scope: Option<&str>,
        limit: u64,
        window: Duration,
        _now: Instant,
    ) -> Hit {
        check(
            self.conn.clone(),
            self.script.clone(),
            key(&self.prefix, scope, client),
            limit,
            window,
        )
    }

    /// PING over the checks' own connection: an answer means the connection the checks
    /// use is up again (the probe's PING is what makes it reconnect while none are sent).
    fn ping(
        &self,
        _key: ClientKey,
        _scope: Option<&str>,
    ) -> Option<BoxFuture<'static, Result<(), StoreError>>> {
        let mut conn = self.conn.clone();
        Some(on(&self.runtime, Ok(()), async move {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(drop)
                .map_err(StoreError::Redis)
        }))
    }
}

/// The Redis key of a client's count: `key_prefix:IP`, or in a route's own budget
/// `key_prefix:ROUTE:IP`.
pub(super) fn key(prefix: &str, scope: Option<&str>, client: ClientKey) -> String {
    match scope {
        None => format!("{prefix}:{client}"),
        Some(route) => format!("{prefix}:{route}:{client}"),
    }
}

/// One check of `key` over `conn` (one Redis, or a cluster client): the window script,
/// bounded by [`STORE_TIMEOUT`].
pub(super) fn check<C>(
    mut conn: C,
    script: Arc<redis::Script>,
    key: String,
    limit: u64,
    window: Duration,
) -> Hit
where
    C: redis::aio::ConnectionLike + Send + 'static,
{
    Hit::Pending(
        async move {
            let mut invocation = script.key(key);
            invocation.arg(window.as_millis() as u64);
            let call = invocation.invoke_async::<(u64, i64)>(&mut conn);
            let (count, ttl_ms) = actix_rt::time::timeout(STORE_TIMEOUT, call)
                .await
                .map_err(|_| StoreError::Timeout(STORE_TIMEOUT))??;
            let ttl = Duration::from_millis(ttl_ms.max(0) as u64);
            Ok(Decision::from_count(count, limit, ttl))
        }
        .boxed_local(),
    )
}

/// Runs `work` on `runtime` (a worker's), whoever asks: a connection it opens is then
/// driven on that worker's thread, not on the asker's. `gone` is the answer when the
/// worker has stopped (its runtime shut down).
pub(super) fn on<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    gone: Result<T, StoreError>,
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> BoxFuture<'static, Result<T, StoreError>> {
    let task = runtime.spawn(work);
    async move { task.await.unwrap_or(gone) }.boxed()
}
