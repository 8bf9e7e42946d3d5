//! `RateLimitActor`: one per worker, a fixed window per client IP.
//!
//! The count lives in a [`Store`]: Redis ([`redis::RedisStore`]: every instance on the same
//! `redis_url` and `key_prefix` shares one budget) or, with `redis_url = ""`, one in-process
//! map for the whole process ([`memory::MemoryStore`]). A store error (Redis down, a check
//! slower than [`STORE_TIMEOUT`]) is handled as `on_store_error` says. An IP found over its
//! budget is remembered by the worker until its window ends, and refused without asking the
//! store. The actor never blocks: the in-process store answers at once, Redis's answer is
//! awaited inside the actor's own future.

pub mod memory;
pub mod redis;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;

use crate::{
    config::{OnStoreError, RateLimit},
    metrics::Metrics,
};

pub use self::{
    memory::{MemoryStore, MEMORY_STORE_CAP},
    redis::{RedisStore, STORE_TIMEOUT},
};

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
    Redis(#[from] ::redis::RedisError),
    #[error("no answer within {}ms", STORE_TIMEOUT.as_millis())]
    Timeout,
    /// The in-process store holds [`MEMORY_STORE_CAP`] windows that have not ended.
    #[error("in-process store full ({MEMORY_STORE_CAP} client IPs in their window)")]
    Full,
}

/// A store's answer to one hit: at once, or later.
pub enum Hit {
    Ready(Result<Decision, StoreError>),
    Pending(LocalBoxFuture<'static, Result<Decision, StoreError>>),
}

/// Where the counts are kept: one per process, shared by every worker's actor.
pub trait Store: Send + Sync {
    /// Counts one request of `ip` at `now` in its current window.
    fn hit(&self, ip: IpAddr, limit: u64, window: Duration, now: Instant) -> Hit;

    /// Makes the store ready before the first request (opens connections); `None` when
    /// there is nothing to do.
    fn warm_up(&self) -> Option<LocalBoxFuture<'static, Result<(), StoreError>>> {
        None
    }
}

/// The store `config` asks for: Redis when `redis_url` is set, else in-process.
pub fn open(config: &RateLimit) -> Result<Arc<dyn Store>, ::redis::RedisError> {
    Ok(match &config.redis_url {
        None => Arc::new(MemoryStore::default()),
        Some(url) => Arc::new(RedisStore::new(url, &config.key_prefix)?),
    })
}

/// Readies `store` on the calling thread; a failure is logged as the start of an outage.
pub async fn warm_up(store: Arc<dyn Store>, outage: Arc<Outage>, policy: OnStoreError) {
    let Some(ready) = store.warm_up() else { return };
    match ready.await {
        Ok(()) => log::debug!("rate limit store reachable"),
        Err(e) => outage.failed(&e, policy),
    }
}

/// Store outages are logged once per process, when they start and when they end.
#[derive(Default)]
pub struct Outage(AtomicBool);

impl Outage {
    /// True while the store is unreachable (from the first failed check to the next one
    /// that succeeds); read by the status page.
    pub fn is_down(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

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
    store: Arc<dyn Store>,
    limit: u64,
    window: Duration,
    on_store_error: OnStoreError,
    outage: Arc<Outage>,
    metrics: Arc<Metrics>,
    /// IPs known to be over budget, and when their window ends: refused locally.
    blocked: HashMap<IpAddr, Instant>,
}

impl RateLimitActor {
    pub fn new(
        config: &RateLimit,
        store: Arc<dyn Store>,
        outage: Arc<Outage>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            limit: config.requests,
            window: config.window,
            on_store_error: config.on_store_error,
            outage,
            metrics,
            blocked: HashMap::new(),
        }
    }

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
        match self.store.hit(ip, self.limit, self.window, now) {
            // Answered at once: no future to box.
            Hit::Ready(result) => ActorResponse::reply(self.settle(ip, result)),
            Hit::Pending(hit) => ActorResponse::r#async(
                hit.into_actor(self)
                    .map(move |result, act, _| act.settle(ip, result)),
            ),
        }
    }
}

/// New values for the keys a running limiter can change (a config reload).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Reconfigure(pub RateLimit);

impl Handler<Reconfigure> for RateLimitActor {
    type Result = ();

    fn handle(&mut self, Reconfigure(config): Reconfigure, _: &mut Self::Context) {
        // Blocks were decided under the old limit and window.
        if (config.requests, config.window) != (self.limit, self.window) {
            self.blocked.clear();
        }
        self.limit = config.requests;
        self.window = config.window;
        self.on_store_error = config.on_store_error;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_is_rounded_up_and_at_least_one_second() {
        let d = Decision::from_count(1, 5, Duration::from_millis(1));
        assert_eq!(d.reset_secs, 1);
        let d = Decision::from_count(6, 5, Duration::from_millis(59_001));
        assert_eq!((d.allowed, d.remaining, d.reset_secs), (false, 0, 60));
        assert_eq!(d.resets_in, Duration::from_millis(59_001), "kept exact");
    }
}
