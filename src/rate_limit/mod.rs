//! The limiter: a fixed window per client, one [`RateLimitActor`] per worker
//! (`worker.rs`: the worker's state, checked by its handlers at once when no wait is
//! needed, and the actor for the checks that wait on Redis).
//!
//! A client is its IP address, or for IPv6 its network of `ipv6_prefix` bits
//! ([`ClientKey`]): one IPv6 host is given a whole /64, and must not get a budget per
//! address in it. The count lives in a [`Store`]: Redis ([`redis::RedisStore`]: every
//! instance on the same `redis_url` and `key_prefix` shares one budget; each worker has a
//! connection of its own) or, with `redis_url = ""`, one in-process map for the whole
//! process ([`memory::MemoryStore`]).
//!
//! A Redis error (down, or a check slower than [`STORE_TIMEOUT`](redis::STORE_TIMEOUT)) opens the process's
//! [`breaker::Breaker`] (on a Redis Cluster, [`cluster::ClusterStore`], the circuit of the
//! failed master's slots only): from then until its background probe sees Redis answer
//! again, no check it covers asks Redis and `on_store_error` answers at once: `local` counts in the process's
//! fallback `MemoryStore` (separate from Redis's counts, one for all workers), `allow`
//! forwards uncounted, `deny` answers 503. A client found over its budget is remembered by
//! the worker until its window ends, and refused without asking any store. Nothing
//! blocks: the in-process store answers at once, Redis's answer is awaited inside the
//! actor's own future.

pub mod breaker;
pub mod cluster;
pub mod memory;
pub mod redis;
mod worker;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{
    future::{BoxFuture, LocalBoxFuture},
    FutureExt as _,
};

use crate::{
    config::{OnStoreError, RateLimit, RedisTarget},
    metrics::Metrics,
};

pub use self::{
    breaker::{Breaker, Shard, View},
    cluster::ClusterStore,
    memory::MemoryStore,
    redis::RedisStore,
    worker::{LimiterHandle, RateLimitActor, Reconfigure},
};

/// Who a budget belongs to: an IPv4 address, or the IPv6 network of `ipv6_prefix` leading
/// bits that an IPv6 address is in. The same key in the Redis key, the in-process stores
/// and the worker's blocked list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The address with the host bits cleared; IPv4 as IPv4-mapped IPv6.
    net: Ipv6Addr,
    /// 0 for IPv4, else the IPv6 prefix length.
    prefix: u8,
    /// Whose budget: 0 for `[rate_limit]`'s, else a route's ([`budget_id`]).
    budget: u32,
}

impl ClientKey {
    /// `ip`'s key in the budget `budget` (0: the default one): an IPv4-mapped IPv6
    /// address counts as the IPv4 address it carries.
    pub fn new(ip: IpAddr, ipv6_prefix: u8, budget: u32) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey {
                net: v4.to_ipv6_mapped(),
                prefix: 0,
                budget,
            },
            IpAddr::V6(v6) => {
                let prefix = ipv6_prefix.clamp(1, 128);
                let mask = u128::MAX << (128 - u32::from(prefix));
                ClientKey {
                    net: Ipv6Addr::from(u128::from(v6) & mask),
                    prefix,
                    budget,
                }
            }
        }
    }

    /// The key in 20 bytes, for the in-process store. IPv4 keys are IPv4-mapped and no
    /// IPv6 key is (those addresses are taken as IPv4), so the two never meet.
    pub(crate) fn packed(self) -> (u64, u64, u32) {
        let bits = u128::from(self.net);
        ((bits >> 64) as u64, bits as u64, self.budget)
    }
}

impl fmt::Display for ClientKey {
    /// `192.0.2.7`, or an IPv6 network in CIDR form: `2001:db8::/64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net.to_ipv4_mapped() {
            Some(v4) if self.prefix == 0 => write!(f, "{v4}"),
            _ => write!(f, "{}/{}", self.net, self.prefix),
        }
    }
}

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
    #[error("no answer within {}ms", .0.as_millis())]
    Timeout(Duration),
}

/// A store's answer to one hit: at once, or later.
pub enum Hit {
    Ready(Result<Decision, StoreError>),
    Pending(LocalBoxFuture<'static, Result<Decision, StoreError>>),
}

/// Where the counts are kept: the in-process store (one per process, shared by every
/// worker's actor) or a worker's own connection to Redis.
pub trait Store: Send + Sync {
    /// Counts one request of `key` at `now` in its current window. `scope` is the route
    /// whose budget `key` counts in (`None`: the default budget); a Redis store keys it
    /// `key_prefix:ROUTE:IP`.
    fn hit(
        &self,
        key: ClientKey,
        scope: Option<&str>,
        limit: u64,
        window: Duration,
        now: Instant,
    ) -> Hit;

    /// Whether [`Store::hit`] always answers at once ([`Hit::Ready`]): the in-process store.
    /// A worker's handlers then count in it themselves, without a message to the actor.
    fn answers_at_once(&self) -> bool {
        false
    }

    /// The Redis Cluster slot `key`'s count lives in (which circuit of the breaker its
    /// checks go through); `None`: not a cluster.
    fn slot(&self, _key: ClientKey, _scope: Option<&str>) -> Option<u16> {
        None
    }

    /// Asks whether the store answers for `key` (opening its connection if need be): at
    /// start, and from the breaker's probe, which runs on the system arbiter (hence
    /// `Send`). `None`: it cannot fail.
    fn ping(
        &self,
        _key: ClientKey,
        _scope: Option<&str>,
    ) -> Option<BoxFuture<'static, Result<(), StoreError>>> {
        None
    }

    /// Reads a cluster's slot table (which master serves which slots); `None`: not a
    /// cluster.
    fn shards(&self) -> Option<BoxFuture<'static, Result<Vec<Shard>, StoreError>>> {
        None
    }
}

/// How long the first ping at start may take (it opens the connection).
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(2);

/// The limiter's state shared by every worker of the process: where the counts live, the
/// breaker and the fallback store. Cloning it clones a few `Arc`s.
#[derive(Clone)]
pub struct Stores {
    shared: Shared,
    pub breaker: Arc<Breaker>,
    /// Counts while the store is unreachable and `on_store_error = "local"`: one for the
    /// whole process (a client must not get `workers × requests`), apart from Redis's.
    pub fallback: Arc<MemoryStore>,
}

/// Where the counts live, as [`Stores::for_worker`] hands them out.
#[derive(Clone)]
enum Shared {
    /// `redis_url = ""`: one in-process store that every worker uses.
    Memory(Arc<MemoryStore>),
    /// Redis: each worker opens its own connection, on its own thread, so a check never
    /// crosses threads (DESIGN.md: one shared connection measured 0.65x nginx, one per
    /// worker 0.71x).
    Redis {
        client: ::redis::Client,
        prefix: Arc<str>,
    },
    /// A Redis Cluster: each worker has its own cluster client (a connection per node).
    Cluster {
        client: Arc<::redis::cluster::ClusterClient>,
        prefix: Arc<str>,
    },
}

impl Stores {
    /// The stores `config` asks for: Redis when `redis_url` is set, else in-process. A
    /// `redis_url` the client cannot use is refused here, at start.
    pub fn open(config: &RateLimit, metrics: Arc<Metrics>) -> Result<Self, ::redis::RedisError> {
        let prefix: Arc<str> = config.key_prefix.as_str().into();
        let shared = match &config.redis_url {
            None => Shared::Memory(Arc::new(MemoryStore::default())),
            Some(RedisTarget::Server(url)) => Shared::Redis {
                client: ::redis::Client::open(url.as_str())?,
                prefix,
            },
            Some(RedisTarget::Cluster(seeds)) => Shared::Cluster {
                client: Arc::new(ClusterStore::client(seeds)?),
                prefix,
            },
        };
        Ok(Self {
            shared,
            breaker: Arc::new(Breaker::new(config.store_label(), metrics)),
            fallback: Arc::new(MemoryStore::default()),
        })
    }

    /// The store a worker counts in, made on the calling thread (the worker's, in the
    /// `HttpServer::new` factory): the in-process store is the process's one; a Redis
    /// store is a connection of the worker's own, which the breaker's probe also asks.
    pub fn for_worker(&self) -> Arc<dyn Store> {
        let store: Arc<dyn Store> = match &self.shared {
            Shared::Memory(store) => return store.clone(),
            Shared::Redis { client, prefix } => Arc::new(
                RedisStore::new(client.clone(), prefix.clone())
                    .expect("a lazy connection with this configuration is always made"),
            ),
            Shared::Cluster { client, prefix } => {
                Arc::new(ClusterStore::new(client, prefix.clone()))
            }
        };
        self.breaker.watch(&store);
        store
    }

    /// Readies a worker's store on the calling thread (a cluster's: reads its slot table):
    /// an unreachable one is the start of an outage (logged once, the breaker opened)
    /// before the first request.
    pub async fn warm_up(self, store: Arc<dyn Store>, policy: OnStoreError) {
        // No client's key: the probe of an outage found here asks about 0.0.0.0's.
        let key = ClientKey::new(Ipv4Addr::UNSPECIFIED.into(), 64, 0);
        let breaker = self.breaker.clone();
        let ready = match store.shards() {
            Some(read) => read
                .map(move |shards| shards.map(|shards| breaker.set_shards(shards)))
                .boxed(),
            None => match store.ping(key, None) {
                Some(ping) => ping,
                None => return,
            },
        };
        let failed = match actix_rt::time::timeout(WARM_UP_TIMEOUT, ready).await {
            Ok(Ok(())) => return log::debug!("rate limit store reachable"),
            Ok(Err(e)) => e,
            Err(_) => StoreError::Timeout(WARM_UP_TIMEOUT),
        };
        self.breaker.trip(key, None, None, &failed, policy);
    }
}

/// A route's own budget, as a check carries it.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Tells the route's counts apart in the in-process stores ([`budget_id`]).
    pub id: u32,
    /// The route's name: its Redis key is `key_prefix:NAME:IP`.
    pub name: Arc<str>,
    pub requests: u64,
    pub window: Duration,
}

/// The number of the budget of the route named `name`, given out on its first use (when
/// a configuration is loaded, never per request); 0 is `[rate_limit]`'s budget. By name,
/// so a reload that reorders the routes keeps each one's counts.
pub fn budget_id(name: &str) -> u32 {
    static NAMES: std::sync::Mutex<Vec<Box<str>>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let i = match names.iter().position(|n| &**n == name) {
        Some(i) => i,
        None => {
            names.push(name.into());
            names.len() - 1
        }
    };
    u32::try_from(i + 1).expect("fewer than 4 billion route names")
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

    fn key(ip: &str, prefix: u8) -> String {
        ClientKey::new(ip.parse().unwrap(), prefix, 0).to_string()
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_prefix_and_ipv4_by_address() {
        assert_eq!(key("192.0.2.7", 64), "192.0.2.7");
        assert_eq!(
            key("::ffff:192.0.2.7", 64),
            "192.0.2.7",
            "IPv4-mapped is IPv4"
        );
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 64), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff::", 64), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 48), "2001:db8:1::/48");
        assert_eq!(key("2001:db8::1", 128), "2001:db8::1/128");
        assert_eq!(key("::1", 64), "::/64");
        let a = ClientKey::new("2001:db8::1".parse().unwrap(), 64, 0);
        let b = ClientKey::new("2001:db8::2".parse().unwrap(), 64, 0);
        assert_eq!((a, a.packed()), (b, b.packed()));
        let v4 = ClientKey::new("0.0.0.1".parse().unwrap(), 96, 0);
        let v6 = ClientKey::new("::1".parse().unwrap(), 128, 0);
        assert_ne!(v4.packed(), v6.packed());
    }
}
