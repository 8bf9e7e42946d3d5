//! What the hot path reads of the configuration, in the form it needs ([`Settings`]: the
//! route table, each pool's timeouts, the limiter's header values), and one worker's
//! handles ([`Worker`]): its balancer, limiter, settings and `awc` clients.
//!
//! `lib.rs` publishes the settings at start and on every reload; each worker keeps its own
//! copy ([`Settings::for_worker`]), so that nothing a request clones is shared with another
//! worker.

use std::{cell::RefCell, net::SocketAddr, rc::Rc, sync::Arc, time::Duration};

use actix::Addr;
use actix_web::http::header::HeaderValue;
use ipnet::IpNet;
use tokio::sync::watch;

use crate::{
    access_log::Sink,
    balancer::BalancerHandle,
    config::{Config, HashOn, PoolProxy, ProxySection, Strategy},
    health::HealthActor,
    rate_limit::{ceil_secs, LimiterHandle},
    routing::{Route, RouteTable},
    upstream::{self, PoolId},
};

/// One pool as the hot path needs it.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    /// For the access log (this worker's own copy: it is cloned per request).
    pub name: Arc<str>,
    pub proxy: PoolProxy,
    /// `Retry-After` for 503 "no healthy server": its health interval, whole seconds, ≥ 1.
    pub retry_after: HeaderValue,
    /// What `consistent_hash` keys on; `None` for the other strategies.
    pub hash_on: Option<HashOn>,
    /// The sticky cookie's name, if the pool has one.
    pub sticky_cookie: Option<Arc<str>>,
}

/// What the hot path reads of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub proxy: ProxySection,
    pub trusted_proxies: Vec<IpNet>,
    /// `RateLimit-Policy` value of the default budget; `None` with `rate_limit.enabled =
    /// false`, which turns the default budget off (a route's own budget still applies).
    pub ratelimit_policy: Option<HeaderValue>,
    pub access_log: bool,
    /// How `https://` servers are verified; a new one (a reload) gets new clients.
    pub upstream_tls: Arc<rustls::ClientConfig>,
    pub routes: RouteTable,
    /// By [`PoolId::index`].
    pools: Vec<Option<PoolSettings>>,
    /// The TLS listener's port, for `redirect_https`.
    pub tls_port: Option<u16>,
}

impl Settings {
    /// The settings of `config`; `tls` is where the TLS listener is bound, if there is one.
    pub fn new(config: &Config, tls: Option<SocketAddr>) -> Self {
        Self::with_tls_port(config, tls.map(|a| a.port()))
    }

    /// As [`Settings::new`], with the TLS listener's port.
    pub fn with_tls_port(config: &Config, tls_port: Option<u16>) -> Self {
        let rl = &config.rate_limit;
        let mut pools: Vec<Option<PoolSettings>> = Vec::new();
        for pool in &config.pools {
            let id = PoolId::of(&pool.name);
            if pools.len() <= id.index() {
                pools.resize(id.index() + 1, None);
            }
            pools[id.index()] = Some(PoolSettings {
                name: pool.name.clone(),
                proxy: pool.proxy,
                retry_after: HeaderValue::from(ceil_secs(pool.health_check.interval)),
                hash_on: (pool.strategy == Strategy::ConsistentHash).then(|| pool.hash_on.clone()),
                sticky_cookie: pool.sticky_cookie.clone(),
            });
        }
        let routes = config
            .routes
            .iter()
            .map(|r| Route::new(r, PoolId::of(&r.pool)))
            .collect();
        Self {
            proxy: config.proxy.clone(),
            trusted_proxies: rl.trusted_proxies.clone(),
            ratelimit_policy: rl.enabled.then(|| {
                let value = format!("\"default\";q={};w={}", rl.requests, rl.window.as_secs());
                HeaderValue::from_str(&value).expect("digits and quotes are a header value")
            }),
            access_log: config.access_log.is_some(),
            upstream_tls: config.upstream_tls.clone(),
            routes: RouteTable::new(routes),
            pools,
            tls_port,
        }
    }

    /// The settings of `pool`; the default pool's for a pool this table does not know
    /// (none: routes name only pools of the same configuration).
    pub fn pool(&self, pool: PoolId) -> &PoolSettings {
        self.pools
            .get(pool.index())
            .and_then(Option::as_ref)
            .or_else(|| self.pools[PoolId::DEFAULT.index()].as_ref())
            .expect("the default pool is always configured")
    }

    /// A copy for one worker, its header values and names copied rather than cloned: a
    /// clone would share their bytes, and the reference count that each request's clone
    /// touches, with every other worker.
    fn for_worker(&self) -> Settings {
        let own = |v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).expect("was a value");
        Settings {
            ratelimit_policy: self.ratelimit_policy.as_ref().map(own),
            routes: self.routes.for_worker(),
            pools: self
                .pools
                .iter()
                .map(|p| {
                    p.as_ref().map(|p| PoolSettings {
                        name: Arc::from(&*p.name),
                        proxy: p.proxy,
                        retry_after: own(&p.retry_after),
                        hash_on: p.hash_on.clone(),
                        sticky_cookie: p.sticky_cookie.as_deref().map(Arc::from),
                    })
                })
                .collect(),
            ..self.clone()
        }
    }

    /// The connect timeouts the pools use: one `awc` client each.
    fn connect_timeouts(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = self
            .pools
            .iter()
            .flatten()
            .map(|p| p.proxy.connect_timeout)
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// One worker's settings and its clients.
pub(crate) struct Current {
    pub settings: Settings,
    /// One per connect timeout in use (awc sets it per client); usually one.
    clients: Vec<(Duration, awc::Client)>,
}

impl Current {
    fn new(settings: Settings, old: Option<&Current>) -> Self {
        let clients = settings
            .connect_timeouts()
            .into_iter()
            .map(|timeout| {
                // Requests under way keep the old client (and its pool) until they end; a
                // client whose settings did not change is kept, with its connections.
                let kept = old.and_then(|old| {
                    (Arc::ptr_eq(&old.settings.upstream_tls, &settings.upstream_tls))
                        .then(|| old.clients.iter().find(|(t, _)| *t == timeout))
                        .flatten()
                });
                match kept {
                    Some((_, client)) => (timeout, client.clone()),
                    None => (
                        timeout,
                        upstream::client(timeout, None, settings.upstream_tls.clone()),
                    ),
                }
            })
            .collect();
        Self { settings, clients }
    }

    /// The client that connects within `timeout`.
    pub fn client(&self, timeout: Duration) -> &awc::Client {
        self.clients
            .iter()
            .find(|(t, _)| *t == timeout)
            .or_else(|| self.clients.first())
            .map(|(_, c)| c)
            .expect("every pool has a connect timeout")
    }
}

/// One worker's handles: its balancer and limiter (same thread), its settings and clients.
pub(crate) struct Worker {
    pub balancer: BalancerHandle,
    pub limiter: LimiterHandle,
    pub health: Addr<HealthActor>,
    /// Where this worker's exchanges are counted and logged.
    pub sink: Rc<Sink>,
    /// Where reloads are published; looked at (one atomic load) per request.
    updates: RefCell<watch::Receiver<Arc<Settings>>>,
    /// This worker's copy of the settings (an `Rc`: no count shared with other workers)
    /// and its clients. `awc::Client` is not `Send`: built on the worker's thread.
    current: RefCell<Rc<Current>>,
    /// The deadlines of this worker's exchanges, kept between requests.
    pub timers: super::timers::Timers,
}

impl Worker {
    /// The handles of the worker whose factory runs this.
    pub fn new(
        balancer: BalancerHandle,
        limiter: LimiterHandle,
        health: Addr<HealthActor>,
        sink: Sink,
        updates: watch::Receiver<Arc<Settings>>,
    ) -> Self {
        let settings = updates.borrow().for_worker();
        Self {
            balancer,
            limiter,
            health,
            sink: Rc::new(sink),
            updates: RefCell::new(updates),
            current: RefCell::new(Rc::new(Current::new(settings, None))),
            timers: Default::default(),
        }
    }

    /// The settings and clients for one request: the last ones published.
    pub fn current(&self) -> Rc<Current> {
        let mut updates = self.updates.borrow_mut();
        if updates.has_changed().unwrap_or(false) {
            let new = updates.borrow_and_update().for_worker();
            let mut current = self.current.borrow_mut();
            let old = current.clone();
            *current = Rc::new(Current::new(new, Some(&old)));
        }
        self.current.borrow().clone()
    }
}
