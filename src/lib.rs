//! roundabout: a small HTTP (layer 7) load balancer, built as an actor system on actix.
//!
//! # The path of a request
//! handler ([`proxy::forward`]) → framing checks → client IP → [`rate_limit::RateLimitActor`]
//! (this worker's) → [`balancer::BalancerActor`] (this worker's) → `awc` to the upstream →
//! the answer streamed back. The actors on that path live on the handler's own worker
//! thread, so asking them never crosses a thread (DESIGN.md).
//!
//! # Layout
//! - [`config`]: TOML + environment → `FileConfig` → validated [`config::Config`].
//! - [`proxy`]: the hot path, in `proxy/mod.rs` top to bottom; beside it what is refused
//!   (`checks`), which headers cross (`headers`), how bodies stream (`body`) and what each
//!   failure answers (`error`).
//! - [`balancer`]: `BalancerActor`, one per worker: server list, cursor, in-flight counts,
//!   and the [`balancer::Lease`] each request holds.
//! - [`strategy`]: round robin, smooth weighted, least requests, power of two; no actors.
//! - [`registry`]: who the servers are and which are in rotation; the workers' recipients.
//! - [`health`]: `HealthActor`, one per process: probes, rise/fall, owner of the registry.
//! - [`rate_limit`]: `RateLimitActor`, one per worker, over Redis or an in-process store.
//! - [`upstream`]: a server as the hot path sees it, and the one `awc` client builder.
//! - [`access_log`]: one line per request, when its body is done.
//! - [`admin`]: the admin API (servers, metrics, healthz).
//! - [`reload`]: what SIGHUP does: the config file read again and applied where it can be.
//! - [`metrics`]: Prometheus metrics shared by all of the above.
//!
//! No two modules import each other: the HealthActor knows the balancers only as
//! `Recipient`s, which this file's worker factory registers.

pub mod access_log;
pub mod admin;
pub mod balancer;
pub mod config;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod rate_limit;
pub mod registry;
pub mod reload;
pub mod strategy;
pub mod upstream;

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use actix::{Actor, Addr};
use actix_web::{dev::ServerHandle, http::KeepAlive, web, App, HttpServer};
use tokio::sync::watch;

use crate::{
    admin::AdminState,
    balancer::BalancerActor,
    config::{Config, ConfigError},
    health::{HealthActor, Register},
    metrics::Metrics,
    proxy::{Settings, Worker},
    rate_limit::{Outage, RateLimitActor},
};

/// How long a graceful stop waits for in-flight requests (SPEC, "Signals").
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A started balancer: its bound addresses and the handles to stop or reload it.
pub struct Running {
    /// Where the proxy listens (the real port when the config said `:0`).
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens, if enabled.
    pub admin_addr: Option<SocketAddr>,
    pub health: Addr<HealthActor>,
    pub metrics: Arc<Metrics>,
    proxy: ServerHandle,
    admin: Option<ServerHandle>,
    tasks: Vec<actix_rt::task::JoinHandle<io::Result<()>>>,
    /// Where the workers' settings are published.
    settings: watch::Sender<Arc<Settings>>,
    /// The configuration running now; a reload replaces it.
    config: Mutex<Config>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to [`SHUTDOWN_TIMEOUT`]) when
    /// `graceful`, and returns once both listeners are down.
    pub async fn stop(self, graceful: bool) {
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
        reload::apply(&current, &next, &self.health, &self.settings, by).await;
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }
}

/// Starts the balancer inside the current actix system: binds both listeners (before which
/// nothing is started that could outlive a bind error), starts the HealthActor on this
/// thread and one BalancerActor and RateLimitActor per worker.
pub fn start(config: Config) -> io::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    // Made even with limiting off, so that a reload can turn it on; Redis connects lazily.
    let store = rate_limit::open(&config.rate_limit).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("rate_limit.redis_url: {e}"),
        )
    })?;
    let outage = Arc::new(Outage::default());
    let (settings, updates) = watch::channel(Arc::new(Settings::new(&config)));

    // Bind first: a port in use is reported before any actor starts.
    let proxy_listener = std::net::TcpListener::bind(config.listen)
        .map_err(|e| io::Error::new(e.kind(), format!("listen.address {}: {e}", config.listen)))?;
    let admin_listener = match config.admin {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("admin.address {addr}: {e}")))?,
        ),
        None => None,
    };
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;

    if config.rate_limit.enabled {
        actix_rt::spawn(rate_limit::warm_up(
            store.clone(),
            outage.clone(),
            config.rate_limit.on_store_error,
        ));
    }
    let health = HealthActor::new(
        &config.servers,
        config.health_check.clone(),
        metrics.clone(),
    )
    .start();

    let strategy = config.strategy;
    let rate_limit = config.rate_limit.clone();
    let factory_health = health.clone();
    let factory_metrics = metrics.clone();
    let mut server = HttpServer::new(move || {
        // Runs once per worker, on that worker's thread: its actors live there.
        let limiter = RateLimitActor::new(
            &rate_limit,
            store.clone(),
            outage.clone(),
            factory_metrics.clone(),
        )
        .start();
        let limiter_handle = Some(limiter.clone().recipient());
        let registry = factory_health.clone();
        let balancer = BalancerActor::start(
            strategy::from_config(strategy),
            factory_metrics.clone(),
            move |balancer| {
                registry.send(Register {
                    balancer,
                    limiter: limiter_handle,
                })
            },
        );
        let worker = Worker::new(
            balancer,
            limiter,
            factory_health.clone(),
            factory_metrics.clone(),
            updates.clone(),
        );
        App::new()
            .app_data(web::Data::new(worker))
            .default_service(web::to(proxy::forward))
    })
    .keep_alive(if config.keepalive_timeout.is_zero() {
        KeepAlive::Disabled
    } else {
        KeepAlive::Timeout(config.keepalive_timeout)
    })
    // The vendored actix-http holds every request head to this, not only the first.
    .client_request_timeout(config.header_timeout)
    .backlog(4096)
    .shutdown_timeout(SHUTDOWN_TIMEOUT.as_secs())
    .disable_signals();
    // actix-server counts connections per worker; the config's count is the process's.
    let workers = worker_count(config.workers);
    server = server
        .workers(workers)
        .max_connections((config.max_connections / workers).max(1));
    let proxy_server = server.listen(proxy_listener)?.run();
    let proxy = proxy_server.handle();
    let mut tasks = vec![actix_rt::spawn(proxy_server)];

    let admin = match admin_listener {
        None => None,
        Some(listener) => {
            let state = web::Data::new(AdminState {
                health: health.clone(),
                metrics: metrics.clone(),
                token: config.admin_token.clone(),
            });
            let admin_server = HttpServer::new(move || {
                App::new().app_data(state.clone()).configure(admin::routes)
            })
            .workers(1)
            .shutdown_timeout(SHUTDOWN_TIMEOUT.as_secs())
            .disable_signals()
            .listen(listener)?
            .run();
            let handle = admin_server.handle();
            tasks.push(actix_rt::spawn(admin_server));
            Some(handle)
        }
    };

    log::info!(
        "roundabout {} listening on {proxy_addr} ({} servers, {:?}){}",
        env!("CARGO_PKG_VERSION"),
        config.servers.len(),
        config.strategy,
        admin_addr.map_or_else(String::new, |a| format!("; admin on {a}")),
    );
    Ok(Running {
        proxy_addr,
        admin_addr,
        health,
        metrics,
        proxy,
        admin,
        tasks,
        settings,
        config: Mutex::new(config),
    })
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

/// Runs the balancer until SIGTERM or SIGINT, then stops gracefully. SIGHUP reloads the
/// configuration file; SIGUSR1 reopens the access log.
pub async fn run(config: Config) -> io::Result<()> {
    // Before the listeners: a SIGHUP that finds the port open must not find its default
    // action (the end of the process) still in place.
    let mut signals = reload::Signals::new()?;
    let running = start(config)?;
    loop {
        match signals.next().await {
            reload::Signal::Stop => break,
            reload::Signal::Reload => {
                let _ = running.reload("SIGHUP").await;
            }
            reload::Signal::ReopenLogs => access_log::reopen(),
        }
    }
    log::info!(
        "stopping: no new connections; waiting up to {}s for in-flight requests",
        SHUTDOWN_TIMEOUT.as_secs()
    );
    running.stop(true).await;
    log::info!("stopped");
    Ok(())
}
