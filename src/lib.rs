//! roundabout: a small HTTP (layer 7) load balancer, built as an actor system on actix.
//!
//! # The path of a request
//! handler ([`proxy::forward`]) → framing checks → the phases over one per-request context:
//! **route** (the [`routing`] table: which pool) → **limit** ([`rate_limit::RateLimitActor`],
//! this worker's) → **pick** ([`balancer::BalancerActor`], this worker's, in the pool) →
//! **rewrite** the upstream request → `awc` → **respond** (streamed back) → **log**. The
//! actors on that path live on the handler's own worker thread, so asking them never
//! crosses a thread; the handler reads and writes their state there directly when no wait
//! is needed (a lease, an in-process count), without a message (DESIGN.md).
//!
//! # Layout
//! - [`config`]: TOML + environment → `FileConfig` → validated [`config::Config`].
//! - [`proxy`]: the hot path, in `proxy/mod.rs` top to bottom; beside it what is refused
//!   (`checks`), which headers cross (`headers`), how bodies stream (`body`), what each
//!   failure answers (`error`) and what it reads of the configuration (`settings`).
//! - [`routing`]: the route table (hosts, path prefixes, headers, methods → pools), data
//!   swapped as a whole on reload.
//! - [`balancer`]: `BalancerActor`, one per worker: every pool's server list, cursor and
//!   in-flight counts (shared with the worker's handlers), and the [`balancer::Lease`]
//!   each request holds.
//! - [`strategy`]: round robin, smooth weighted, least requests, power of two, consistent
//!   hashing (Maglev), peak EWMA; no actors.
//! - [`sticky`]: the opaque server ids sticky cookies carry.
//! - [`registry`]: the pools, who the servers are and which are in rotation; the workers'
//!   recipients.
//! - [`health`]: `HealthActor`, one per process: probes, rise/fall, owner of the registry.
//! - [`rate_limit`]: `RateLimitActor`, one per worker, over Redis or a Redis Cluster (the
//!   worker's own connection, behind a breaker, with an in-process fallback) or an
//!   in-process store; the default budget and each route's own.
//! - [`upstream`]: a server as the hot path sees it (its identity is pool and server), and
//!   the one `awc` client builder.
//! - [`access_log`]: one line per request, when its body is done.
//! - [`admin`]: the admin API (pools, servers, routes, metrics, healthz).
//! - [`status`]: the status page beside it (`GET /`, `GET /status.json`): reads only.
//! - [`resolve`]: servers known by name: their addresses, at start and every
//!   `resolve_interval`.
//! - [`reload`]: what SIGHUP does: the config file read again and applied where it can be.
//! - [`listen`]: the listening sockets (bound, or handed over: socket activation) and what a
//!   connection goes through before the App (the PROXY protocol header, TLS, actix-http).
//! - [`upgrade`]: what SIGUSR2 does: the executable started again, handed the listeners.
//! - [`tls`]: rustls: the listener's certificate (swapped on reload), `https://` servers.
//! - [`metrics`]: Prometheus metrics shared by all of the above.
//! - [`allocator`]: mimalloc, with the live heap counted, and its pages given back.
//! - [`lifecycle`]: [`run`]: the process from start to stop, answering signals.
//!
//! No two modules import each other: the HealthActor knows the balancers only as
//! `Recipient`s, which this file's worker factory registers.

// The crate's docs are its developers' map (`cargo doc --document-private-items`): the
// map above links the private modules it describes.
#![allow(rustdoc::private_intra_doc_links)]

// Every binary and test that links the crate allocates through it, so the tests see the
// allocator and the heap gauge the release runs with. The heap-profiling build has dhat's
// instead (src/dhat_heap.rs).
#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static ALLOCATOR: allocator::Counted = allocator::Counted;

// Public: what the binary and the tests drive (the configuration pipeline, the request
// checks, the TLS loaders). Everything else is the crate's own, so that rustc's dead-code
// lint sees it.
mod access_log;
mod admin;
#[cfg(not(feature = "dhat-heap"))]
pub mod allocator;
mod balancer;
pub mod config;
mod digits;
mod health;
mod lifecycle;
mod listen;
mod metrics;
pub mod proxy;
mod rate_limit;
mod registry;
mod reload;
mod resolve;
mod routing;
mod status;
mod sticky;
mod strategy;
pub mod tls;
mod upgrade;
mod upstream;

pub use lifecycle::run;
pub use listen::activation::Inherited;

use std::{
    cell::RefCell,
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use actix::{Actor, Addr};
use actix_web::{dev::ServerHandle, web, App};
use tokio::sync::watch;

use crate::{
    access_log::{AccessLog, Sink},
    admin::AdminState,
    balancer::BalancerActor,
    config::{Config, ConfigError},
    health::{HealthActor, Register},
    listen::{Drain, Http, Sockets},
    metrics::Metrics,
    proxy::{Settings, Worker},
    rate_limit::{RateLimitActor, Stores},
    status::StatusState,
    tls::CertStore,
};

/// How long a graceful stop waits for in-flight requests (SPEC, "Signals").
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// After a hand-over's pause, how long the old process still takes the connections its
/// accept thread took before it paused: actix-server's `pause` returns before that thread
/// has stopped, and a worker that is told to stop drops the connections still queued to it.
const ACCEPT_SETTLE: Duration = Duration::from_millis(250);

/// Tells apart the balancers started in one process (tests start several).
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This worker thread's handles, with the instance that made them. actix calls the app
    /// factory once per listener on each worker; the plain and the TLS listener of one
    /// worker must share one BalancerActor (one round-robin cycle) and one limiter.
    static WORKER: RefCell<Option<(u64, web::Data<Worker>)>> = const { RefCell::new(None) };
}

/// A started balancer: its bound addresses and the handles to stop or reload it.
pub struct Running {
    /// Where the proxy listens (the real port when the config said `:0`): the plain
    /// listener, or the TLS one when there is no plain one.
    pub proxy_addr: SocketAddr,
    /// Where the TLS listener is, if there is one.
    pub tls_addr: Option<SocketAddr>,
    /// Where the admin API listens, if enabled.
    pub admin_addr: Option<SocketAddr>,
    health: Addr<HealthActor>,
    metrics: Arc<Metrics>,
    proxy: ServerHandle,
    admin: Option<ServerHandle>,
    tasks: Vec<actix_rt::task::JoinHandle<io::Result<()>>>,
    /// Where the workers' settings are published.
    settings: watch::Sender<Arc<Settings>>,
    access_log: AccessLog,
    /// The configuration running now; a reload replaces it. Shared with the status page.
    config: Arc<Mutex<Config>>,
    /// The TLS listener's certificate, which a reload replaces.
    certs: Option<Arc<CertStore>>,
    /// Copies of the listening sockets, each with its key, for a SIGUSR2 upgrade to hand
    /// over; closed when the process stops, so that the sockets close with actix-server's.
    sockets: Vec<(OwnedFd, &'static str)>,
    /// How the connections end when this process stops or hands over.
    drain: Drain,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to [`SHUTDOWN_TIMEOUT`]) when
    /// `graceful`, and returns once both listeners are down. Idle kept-alive connections are
    /// closed at once, and answers under way close theirs.
    pub async fn stop(self, graceful: bool) {
        if graceful {
            self.drain.close_idle();
        }
        self.finish(graceful).await;
    }

    /// What a SIGUSR2 upgrade's old process does once the new one serves: accepts no more
    /// (the connections waiting in the sockets' backlog are the new process's), answers each
    /// request still coming on an open connection with `Connection: close` and closes it
    /// after, and returns when none is left (at most [`SHUTDOWN_TIMEOUT`]). An idle
    /// connection is never closed unannounced before that, keepalive_timeout aside.
    pub async fn hand_over(self) {
        self.drain.announce();
        let admin = self.admin.clone();
        futures_util::future::join(self.proxy.pause(), async move {
            if let Some(a) = admin {
                a.pause().await;
            }
        })
        .await;
        actix_rt::time::sleep(ACCEPT_SETTLE).await;
        self.finish(true).await;
    }

    async fn finish(self, graceful: bool) {
        // This process's copies of the sockets go first: the listeners close with
        // actix-server's, and a client is refused rather than left in a backlog.
        drop(self.sockets);
        let admin = self.admin.clone();
        let proxy = self.proxy.stop(graceful);
        let admin = async move {
            if let Some(a) = admin {
                a.stop(graceful).await;
            }
        };
        futures_util::future::join(proxy, admin).await;
        for t in self.tasks {
            let _ = t.await;
        }
        // The writer thread writes in batches: the last requests' lines are written before
        // the process ends (waiting on it off the runtime's thread).
        let log = self.access_log.clone();
        let _ = actix_rt::task::spawn_blocking(move || log.flush(Duration::from_secs(1))).await;
    }

    /// Requests in flight to servers now, summed over the workers (the
    /// `roundabout_in_flight_requests` gauge).
    pub fn in_flight(&self) -> i64 {
        self.metrics.in_flight_now()
    }

    /// Starts `exec` as a new process handed this one's listeners (SIGUSR2); the future
    /// resolves with its pid once it serves, or with why it will not.
    fn upgrade(
        &self,
        exec: &io::Result<upgrade::Exec>,
    ) -> io::Result<impl std::future::Future<Output = Result<i32, String>>> {
        let sockets: Vec<_> = self
            .sockets
            .iter()
            .map(|(fd, key)| (fd.as_fd(), *key))
            .collect();
        upgrade::start(exec, &sockets)
    }

    /// Reopens the access log file, as SIGUSR1 does (for logrotate).
    pub fn reopen_logs(&self) {
        self.access_log.reopen();
    }

    /// Reads the config file again and applies it, as SIGHUP does; `by` names who asked, for
    /// the log. A bad file is refused (and logged) and the running configuration stays.
    pub async fn reload(&self, by: &str) -> Result<(), ConfigError> {
        let current = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let next = match current.reload() {
            Ok(next) => next,
            Err(e) => {
                log::error!(
                    "reload ({by}) refused: invalid configuration: {e}; the running configuration stays"
                );
                return Err(e);
            }
        };
        let resolved = match resolve::resolve_for_reload(&current.pools, &next.pools).await {
            Ok(resolved) => resolved,
            Err(reason) => {
                log::error!("reload ({by}) refused: {reason}; the running configuration stays");
                return Err(ConfigError::Source {
                    file: "(servers by name)".into(),
                    reason,
                });
            }
        };
        if next.access_log != current.access_log {
            self.access_log.configure(next.access_log.clone());
        }
        reload::apply(&current, &next, resolved, &self.health, &self.settings, by).await;
        reload::certificate(&current, &next, self.certs.as_deref(), by);
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }
}

/// Starts the balancer inside the current actix system: binds its listeners (before which
/// nothing is started that could outlive a bind error), starts the HealthActor on this
/// thread and one BalancerActor and RateLimitActor per worker.
pub fn start(config: Config) -> io::Result<Running> {
    start_with(config, Inherited::none())
}

/// [`start`], serving on the sockets `inherited` hands over (socket activation) where they
/// match a configured listener.
pub fn start_with(config: Config, inherited: Inherited) -> io::Result<Running> {
    if let Some(e) = inherited.error {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
    }
    let metrics = Arc::new(Metrics::new());
    // Made even with limiting off, so that a reload can turn it on; each worker's Redis
    // connection is made lazily, on its thread.
    let stores = Stores::open(&config.rate_limit, metrics.clone()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("rate_limit.redis_url: {e}"),
        )
    })?;
    let access_log = AccessLog::start(config.access_log.clone(), metrics.clone())?;

    // Bind first: a port in use is reported before any actor starts.
    let sockets = Sockets::open(&config, inherited.sockets)?;
    let kept = sockets
        .named()
        .map(|(l, key)| Ok((l.as_fd().try_clone_to_owned()?, key)))
        .collect::<io::Result<Vec<_>>>()?;
    let Sockets { plain, tls, admin } = sockets;
    let tls_addr = tls.as_ref().map(|l| l.local_addr()).transpose()?;
    let proxy_addr = match &plain {
        Some(l) => l.local_addr()?,
        None => tls_addr.expect("validation asks for at least one listener"),
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
    let (settings, updates) = watch::channel(Arc::new(Settings::new(&config, tls_addr)));
    if config.default_pool().servers.is_empty() {
        // Not an error (servers can come at runtime), but a new user's first 503s need a why.
        match admin_addr {
            Some(a) => log::warn!(
                "no servers (balancer.servers is empty): every request gets 503 until servers \
                 are added through the admin API (POST http://{a}/servers)"
            ),
            None => log::warn!(
                "no servers (balancer.servers is empty) and no admin API (admin.address = \"\"): \
                 every request gets 503 until servers are added to the file and it is reloaded (SIGHUP)"
            ),
        }
    }

    // Servers given by name: resolved before anything serves; one that does not resolve
    // stops the start.
    let resolved = resolve::resolve_at_start(&config.pools)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let health = HealthActor::new(
        &config.pools,
        &resolved,
        config.upstream_tls.clone(),
        metrics.clone(),
    )
    .start();

    let rate_limit = config.rate_limit.clone();
    // A route's own budget counts whatever `rate_limit.enabled` says.
    let limiting = rate_limit.enabled
        || config
            .routes
            .iter()
            .any(|r| matches!(r.limit, routing::RouteLimit::Own { .. }));
    let running_config = Arc::new(Mutex::new(config.clone()));
    let status_breaker = stores.breaker.clone();
    let factory_health = health.clone();
    let factory_metrics = metrics.clone();
    let factory_log = access_log.clone();
    // Requests actix-http refuses before any handler runs still get their access line, and
    // an answer of our own (a body saying why, an X-Request-Id).
    let on_refused = proxy::on_refused(access_log.clone());
    let instance = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
    let app = move || {
        // Runs once per worker and listener, on that worker's thread: its actors live
        // there, and the listeners of one worker share them.
        if let Some(worker) = WORKER.with_borrow(|w| {
            w.as_ref()
                .filter(|(id, _)| *id == instance)
                .map(|(_, worker)| worker.clone())
        }) {
            return App::new().default_service(proxy_service(worker));
        }
        let store = stores.for_worker();
        if limiting {
            actix_rt::spawn(
                stores
                    .clone()
                    .warm_up(store.clone(), rate_limit.on_store_error),
            );
        }
        let limiter =
            RateLimitActor::start(&rate_limit, store, stores.clone(), factory_metrics.clone());
        let limiter_handle = Some(limiter.actor().clone().recipient());
        let registry = factory_health.clone();
        let eject = factory_health.clone().recipient();
        let balancer = BalancerActor::start(factory_metrics.clone(), eject, move |balancer| {
            registry.send(Register {
                balancer,
                limiter: limiter_handle,
            })
        });
        let worker = web::Data::new(Worker::new(
            balancer,
            limiter,
            factory_health.clone(),
            Sink {
                metrics: factory_metrics.clone(),
                head_times: factory_metrics.head_times(),
                log: factory_log.clone(),
            },
            updates.clone(),
        ));
        WORKER.set(Some((instance, worker.clone())));
        #[cfg(not(feature = "dhat-heap"))]
        actix_rt::spawn(allocator::give_back());
        App::new().default_service(proxy_service(worker))
    };
    let drain = Drain::default();
    let http = Http::clients(&config, on_refused, &drain);
    // actix-server counts connections per worker; the config's count is the process's.
    let workers = worker_count(config.workers);
    let mut server = actix_server::Server::build()
        .workers(workers)
        .max_concurrent_connections((config.max_connections / workers).max(1))
        .shutdown_timeout(SHUTDOWN_TIMEOUT.as_secs())
        .disable_signals();
    if let Some(listener) = plain {
        server = listen::plain(
            server,
            "listen.address",
            listener,
            http.clone(),
            app.clone(),
        )?;
    }
    let certs = config.tls.as_ref().map(|t| {
        t.cert.warn_if_expired();
        CertStore::new(&t.cert)
    });
    if let (Some(listener), Some(certs)) = (tls, &certs) {
        let tls = tls::server_config(certs.clone());
        server = listen::tls(server, "listen.tls_address", listener, http, tls, app)?;
    }
    let proxy_server = server.run();
    let proxy = proxy_server.handle();
    let mut tasks = vec![actix_rt::spawn(proxy_server)];

    let admin = match admin {
        None => None,
        Some(listener) => {
            let state = web::Data::new(AdminState {
                health: health.clone(),
                metrics: metrics.clone(),
                token: config.admin_token.clone(),
                config: running_config.clone(),
            });
            let status = Arc::new(StatusState::new(
                running_config.clone(),
                status_breaker,
                metrics.clone(),
            ));
            status::start_sampling(&status);
            let status = web::Data::from(status);
            let http = Http::admin(&drain);
            let server = actix_server::Server::build()
                .workers(1)
                .shutdown_timeout(SHUTDOWN_TIMEOUT.as_secs())
                .disable_signals();
            let admin_server = listen::plain(server, "admin.address", listener, http, move || {
                App::new()
                    .app_data(state.clone())
                    .app_data(status.clone())
                    .configure(status::routes)
                    .configure(admin::routes)
            })?
            .run();
            let handle = admin_server.handle();
            tasks.push(actix_rt::spawn(admin_server));
            Some(handle)
        }
    };

    log::info!(
        "roundabout {} listening on {} ({}, {}{}); {}{}",
        env!("CARGO_PKG_VERSION"),
        match (config.listen.map(|_| proxy_addr), tls_addr) {
            (Some(plain), Some(tls)) => format!("{plain} and {tls} (TLS)"),
            (Some(plain), None) => plain.to_string(),
            (None, _) => format!("{proxy_addr} (TLS)"),
        },
        plural(config.default_pool().servers.len(), "server"),
        config.default_pool().strategy.name(),
        match (config.pools.len() - 1, config.routes.len()) {
            (0, 0) => String::new(),
            (pools, routes) => format!(
                "; {} more, {}",
                plural(pools, "pool"),
                plural(routes, "route")
            ),
        },
        config.rate_limit.summary(),
        admin_addr.map_or_else(String::new, |a| format!("; admin on {a}")),
    );
    Ok(Running {
        proxy_addr,
        tls_addr,
        certs,
        admin_addr,
        health,
        metrics,
        proxy,
        admin,
        tasks,
        settings,
        access_log,
        config: running_config,
        sockets: kept,
        drain,
    })
}

/// `n thing` or `n things`.
fn plural(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// The number of proxy workers: `listen.workers`, or one per core as actix-server counts
/// them when it is 0.
fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get().min(512))
    }
}

/// Every request on a proxy listener goes to [`proxy::forward`] with its worker's state,
/// handed in by the closure: not `app_data`, which actix-web looks up in a map by type on
/// every request.
fn proxy_service(worker: web::Data<Worker>) -> actix_web::Route {
    web::to(move |req: actix_web::HttpRequest, payload: web::Payload| {
        proxy::forward(req, payload, worker.clone())
    })
}
