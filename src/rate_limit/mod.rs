//! `RateLimitActor`: one per worker, a fixed window per client IP.
//!
//! The count lives in a [`Store`]: Redis (one multiplexed, reconnecting connection per
//! process, cloned into every worker, so every instance on the same `redis_url` and
//! `key_prefix` shares one budget) or, with `redis_url = ""`, one in-process map for the
//! whole process. A Redis check is ONE round trip: a Lua script (`EVALSHA`) that increments,
//! sets the expiry on the first hit, and returns the count and the time left; no key is
//! ever left without an expiry. Each check is bounded by [`STORE_TIMEOUT`]; a time-out or
//! an error is a store error, and `on_store_error` decides. An IP found over its budget is
//! remembered by the worker until its window ends, and refused without asking the store.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use actix::prelude::*;

use crate::{
    config::{OnStoreError, RateLimit},
    metrics::Metrics,
};

/// The longest a limiter check may wait on the store before it counts as a store error.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(50);

/// A counted answer: what the client is told in the rate-limit headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Whole seconds until the window resets, rounded up and at least 1: what the client is told.
    pub reset_secs: u64,
    /// Exactly how long until the window resets: how long a refused IP stays blocked
    /// locally (blocking for `reset_secs` would refuse up to a second into the next window).
    pub resets_in: Duration,
}

impl Decision {
    fn from_count(count: u64, limit: u64, ttl: Duration) -> Self {
        Decision {
            allowed: count <= limit,
            limit,
            remaining: limit.saturating_sub(count),
            reset_secs: ceil_secs(ttl),
            resets_in: ttl,
        }
    }
}

/// Whole seconds in `d`, rounded up, at least 1: the unit of `Retry-After`.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// What the handler does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The store counted it (allowed or not).
    Counted(Decision),
    /// The store failed and `on_store_error = "allow"`: forward, uncounted.
    Uncounted,
    /// The store failed and `on_store_error = "deny"`: answer 503.
    Unavailable,
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {}ms", STORE_TIMEOUT.as_millis())]
    Timeout,
    /// The in-process store holds [`MEMORY_STORE_CAP`] windows that have not ended.
    #[error("in-process store full ({MEMORY_STORE_CAP} client IPs in their window)")]
    Full,
}

/// The most client IPs the in-process store keeps a window for (about 100 MB), as nginx's
/// `limit_req_zone` has a fixed size: past it, a new IP is a store error and
/// `on_store_error` decides, rather than memory growing with every address an attacker has.
pub const MEMORY_STORE_CAP: usize = 1 << 20;

/// Shards of the in-process store: a sweep or a hit locks one sixteenth of it.
const SHARDS: usize = 16;

/// Increments the window counter, starting the window on its first hit; returns
/// `{count, milliseconds left}`. The `ttl < 0` branch mends a key that lost its expiry, so
/// none can live forever.
const WINDOW_SCRIPT: &str = r"
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

/// Where the counts are kept.
#[derive(Clone)]
pub enum Store {
    Redis {
        conn: redis::aio::ConnectionManager,
        script: Arc<redis::Script>,
    },
    Memory(Arc<MemoryStore>),
}

impl Store {
    /// The store for `config`: a lazily connecting Redis connection (so the balancer starts,
    /// and fails open or closed, while Redis is down), or a new in-process map.
    pub fn new(config: &RateLimit) -> Result<Store, redis::RedisError> {
        match &config.redis_url {
            None => Ok(Store::Memory(Arc::new(MemoryStore::default()))),
            Some(url) => {
                let client = redis::Client::open(url.as_str())?;
                let settings = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_millis(500)))
                    .set_response_timeout(Some(Duration::from_millis(500)))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, settings)?;
                Ok(Store::Redis {
                    conn,
                    script: Arc::new(redis::Script::new(WINDOW_SCRIPT)),
                })
            }
        }
    }

    /// Opens the Redis connection now, on the calling thread, so that the first request
    /// does not pay for the connect and an unreachable Redis is reported at start (once).
    pub async fn warm_up(self, outage: Arc<Outage>, policy: OnStoreError) {
        let Store::Redis { mut conn, .. } = self else {
            return;
        };
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match actix_rt::time::timeout(Duration::from_secs(2), ping).await {
            Ok(Ok(_)) => log::debug!("rate limit store reachable"),
            Ok(Err(e)) => outage.failed(&StoreError::Redis(e), policy),
            Err(_) => outage.failed(&StoreError::Timeout, policy),
        }
    }

    /// Counts one request of `ip` in the current window.
    async fn hit(
        self,
        key: String,
        ip: IpAddr,
        limit: u64,
        window: Duration,
    ) -> Result<Decision, StoreError> {
        match self {
            Store::Memory(m) => m.hit(ip, limit, window, Instant::now()),
            Store::Redis { mut conn, script } => {
                let mut invocation = script.key(key);
                invocation.arg(window.as_millis() as u64);
                let call = invocation.invoke_async::<(u64, i64)>(&mut conn);
                let (count, ttl_ms) = actix_rt::time::timeout(STORE_TIMEOUT, call)
                    .await
                    .map_err(|_| StoreError::Timeout)??;
                let ttl = Duration::from_millis(ttl_ms.max(0) as u64);
                Ok(Decision::from_count(count, limit, ttl))
            }
        }
    }
}

/// The in-process store: one per process, shared by every worker.
///
/// std `Mutex`es, not async ones: each critical section is a hash lookup and never spans an
/// `.await` (mini-redis's `Db` makes the same choice). The map is split in `SHARDS` (16) by IP,
/// so two workers rarely wait on each other and dropping ended windows pauses one shard.
pub struct MemoryStore {
    shards: [Mutex<MemoryWindows>; SHARDS],
    cap_per_shard: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_cap(MEMORY_STORE_CAP)
    }
}

#[derive(Default)]
struct MemoryWindows {
    /// Per IP: the count and when its window ends.
    counts: HashMap<IpAddr, (u64, Instant)>,
    /// When expired windows were last dropped.
    swept: Option<Instant>,
}

impl MemoryWindows {
    fn sweep(&mut self, now: Instant) {
        self.counts.retain(|_, (_, end)| *end > now);
        self.swept = Some(now);
    }
}

impl MemoryStore {
    /// A store for at most about `cap` client IPs at once.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
            cap_per_shard: cap.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, ip: &IpAddr) -> std::sync::MutexGuard<'_, MemoryWindows> {
        use std::hash::{BuildHasher as _, Hasher as _};
        // A fixed hasher is enough to spread the IPs; the shard maps hash them again.
        let mut h =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .build_hasher();
        std::hash::Hash::hash(ip, &mut h);
        self.shards[h.finish() as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one request of `ip` at `now`.
    pub fn hit(
        &self,
        ip: IpAddr,
        limit: u64,
        window: Duration,
        now: Instant,
    ) -> Result<Decision, StoreError> {
        let mut w = self.shard(&ip);
        // Bound memory: at most once per window, drop every window that has ended.
        if w.swept.is_none_or(|t| now.duration_since(t) >= window) {
            w.sweep(now);
        }
        if !w.counts.contains_key(&ip) && w.counts.len() >= self.cap_per_shard {
            w.sweep(now);
            if w.counts.len() >= self.cap_per_shard {
                return Err(StoreError::Full);
            }
        }
        let entry = w.counts.entry(ip).or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 += 1;
        Ok(Decision::from_count(entry.0, limit, entry.1 - now))
    }

    /// How many windows are kept now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).counts.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Store outages are logged once per process, when they start and when they end.
#[derive(Default)]
pub struct Outage(AtomicBool);

impl Outage {
    fn failed(&self, error: &StoreError, policy: OnStoreError) {
        if !self.0.swap(true, Ordering::Relaxed) {
            log::error!(
                "rate limit store unreachable ({error}); on_store_error = {policy:?}: {} until it is back",
                match policy {
                    OnStoreError::Allow => "requests are forwarded uncounted",
                    OnStoreError::Deny => "requests are answered 503",
                }
            );
        }
    }

    fn succeeded(&self) {
        if self.0.swap(false, Ordering::Relaxed) {
            log::info!("rate limit store reachable again; limiting resumed");
        }
    }
}

/// The worker-local limiter.
pub struct RateLimitActor {
    store: Store,
    limit: u64,
    window: Duration,
    prefix: String,
    on_store_error: OnStoreError,
    outage: Arc<Outage>,
    metrics: Arc<Metrics>,
    /// IPs known to be over budget, and when their window ends: refused locally.
    blocked: HashMap<IpAddr, Instant>,
}

impl RateLimitActor {
    pub fn new(
        config: &RateLimit,
        store: Store,
        outage: Arc<Outage>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            limit: config.requests,
            window: config.window,
            prefix: config.key_prefix.clone(),
            on_store_error: config.on_store_error,
            outage,
            metrics,
            blocked: HashMap::new(),
        }
    }
}

impl Actor for RateLimitActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Forget blocks whose window ended, so the map stays as small as the abuse.
        ctx.run_interval(self.window, |act, _| {
            let now = Instant::now();
            act.blocked.retain(|_, until| *until > now);
        });
    }
}

/// May this client IP send one more request?
#[derive(Debug, Message)]
#[rtype(result = "Verdict")]
pub struct Check {
    pub ip: IpAddr,
}

impl RateLimitActor {
    /// Turns the store's answer into a verdict, remembering an IP found over budget.
    fn settle(&mut self, ip: IpAddr, result: Result<Decision, StoreError>) -> Verdict {
        match result {
            Ok(d) => {
                self.outage.succeeded();
                if !d.allowed {
                    // Until the window ends, not the rounded-up second after it.
                    self.blocked.insert(ip, Instant::now() + d.resets_in);
                }
                Verdict::Counted(d)
            }
            Err(e) => {
                self.metrics.store_error();
                self.outage.failed(&e, self.on_store_error);
                match self.on_store_error {
                    OnStoreError::Allow => Verdict::Uncounted,
                    OnStoreError::Deny => Verdict::Unavailable,
                }
            }
        }
    }
}

impl Handler<Check> for RateLimitActor {
    type Result = ActorResponse<Self, Verdict>;

    fn handle(&mut self, Check { ip }: Check, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        if let Some(&until) = self.blocked.get(&ip) {
            if until > now {
                let d = Decision::from_count(self.limit + 1, self.limit, until - now);
                return ActorResponse::reply(Verdict::Counted(d));
            }
            self.blocked.remove(&ip);
        }
        match &self.store {
            // Answered at once: no key to build, no future to box.
            Store::Memory(m) => {
                let d = m.hit(ip, self.limit, self.window, now);
                ActorResponse::reply(self.settle(ip, d))
            }
            Store::Redis { .. } => {
                let key = format!("{}:{}", self.prefix, ip);
                let hit = self.store.clone().hit(key, ip, self.limit, self.window);
                ActorResponse::r#async(
                    hit.into_actor(self)
                        .map(move |result, act, _| act.settle(ip, result)),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_counts_a_fixed_window_per_ip() {
        let m = MemoryStore::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let w = Duration::from_secs(10);
        let remaining: Vec<u64> = (0..3)
            .map(|_| m.hit(a, 2, w, t0).unwrap().remaining)
            .collect();
        assert_eq!(remaining, [1, 0, 0]);
        assert!(!m.hit(a, 2, w, t0).unwrap().allowed);
        assert!(m.hit(b, 2, w, t0).unwrap().allowed);
        let later = m.hit(a, 2, w, t0 + Duration::from_millis(2500)).unwrap();
        assert_eq!(later.reset_secs, 8);
        let next_window = m.hit(a, 2, w, t0 + w).unwrap();
        assert!(next_window.allowed);
        assert_eq!(next_window.remaining, 1);
    }

    #[test]
    fn memory_store_drops_ended_windows() {
        let m = MemoryStore::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(1);
        for i in 0..100u8 {
            m.hit(IpAddr::from([10, 0, 0, i]), 5, w, t0).unwrap();
        }
        assert_eq!(m.len(), 100);
        // A window later new clients arrive; every shard they touch (with these 1000, all:
        // the shard hash has fixed keys) drops its ended windows.
        for i in 0..1000u16 {
            let ip = IpAddr::from([10, 1, (i >> 8) as u8, i as u8]);
            m.hit(ip, 5, w, t0 + 2 * w).unwrap();
        }
        assert_eq!(m.len(), 1000, "only the new windows are kept");
    }

    #[test]
    fn a_full_memory_store_is_a_store_error_until_windows_end() {
        let m = MemoryStore::with_cap(SHARDS * 4);
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let ips = (0..=u16::MAX).map(|i| IpAddr::from([10, 9, (i >> 8) as u8, i as u8]));
        let admitted = ips
            .clone()
            .take_while(|&ip| m.hit(ip, 5, w, t0).is_ok())
            .count();
        assert!(admitted <= SHARDS * 4, "{admitted}");
        let refused = ips.clone().nth(admitted).unwrap();
        assert!(matches!(m.hit(refused, 5, w, t0), Err(StoreError::Full)));
        // IPs already counted go on being counted.
        let first = ips.clone().next().unwrap();
        assert_eq!(m.hit(first, 5, w, t0).unwrap().remaining, 3);
        // Once windows end there is room again.
        assert!(m.hit(refused, 5, w, t0 + w).is_ok());
    }

    #[test]
    fn reset_is_rounded_up_and_at_least_one_second() {
        let d = Decision::from_count(1, 5, Duration::from_millis(1));
        assert_eq!(d.reset_secs, 1);
        let d = Decision::from_count(6, 5, Duration::from_millis(59_001));
        assert_eq!((d.allowed, d.remaining, d.reset_secs), (false, 0, 60));
        assert_eq!(d.resets_in, Duration::from_millis(59_001), "kept exact");
    }
}
