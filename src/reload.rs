//! What the operator's signals do, like nginx's: SIGTERM and SIGINT stop, SIGHUP reloads
//! the config file, SIGUSR1 reopens the access log, SIGUSR2 upgrades the binary in place
//! (`upgrade`).
//!
//! A reload diffs the new configuration against the running one: the servers from the file
//! and the live keys go to the registry, which hands them to every worker; the settings of
//! the hot path are published to the workers; keys that only a restart can change are
//! logged as such and left alone. Nothing here reads the file (that is `config`'s) or keeps
//! state of its own.

use std::{io, sync::Arc};

use actix::Addr;
use tokio::sync::watch;

use crate::{
    config::Config,
    health::{HealthActor, Reload},
    proxy::Settings,
    rate_limit::Reconfigure,
    resolve::Resolved,
    tls::CertStore,
};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: stop gracefully.
    Stop,
    /// SIGHUP: read the config file again.
    Reload,
    /// SIGUSR1: reopen the access log file.
    ReopenLogs,
    /// SIGUSR2: start the executable again and hand it the listeners.
    Upgrade,
}

/// The signals roundabout handles; installed at once, so that none of them keeps its
/// default action (SIGHUP, SIGUSR1 and SIGUSR2 would end the process).
pub struct Signals {
    #[cfg(unix)]
    streams: [(tokio::signal::unix::Signal, Signal); 5],
}

impl Signals {
    pub fn new() -> io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                streams: [
                    (signal(SignalKind::terminate())?, Signal::Stop),
                    (signal(SignalKind::interrupt())?, Signal::Stop),
                    (signal(SignalKind::hangup())?, Signal::Reload),
                    (signal(SignalKind::user_defined1())?, Signal::ReopenLogs),
                    (signal(SignalKind::user_defined2())?, Signal::Upgrade),
                ],
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal received.
    pub async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            std::future::poll_fn(|cx| {
                for (stream, what) in &mut self.streams {
                    if stream.poll_recv(cx).is_ready() {
                        return std::task::Poll::Ready(*what);
                    }
                }
                std::task::Poll::Pending
            })
            .await
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}

/// Applies `next` over `current`: servers and live keys to the registry and the workers,
/// the hot path's settings published, the log level set; restart-only keys logged.
pub async fn apply(
    current: &Config,
    next: &Config,
    resolved: Resolved,
    health: &Addr<HealthActor>,
    settings: &watch::Sender<Arc<Settings>>,
    by: &str,
) {
    for key in restart_only_changes(current, next) {
        log::warn!("reload ({by}): {key} changed; it takes effect at the next restart");
    }
    let reload = Reload {
        pools: next.pools.clone(),
        resolved,
        limiter: Reconfigure(next.rate_limit.clone()),
        upstream_tls: next.upstream_tls.clone(),
    };
    // The registry first: a pool new in the file is in every balancer before a route
    // table that names it is published. One gone from the file is retired, and keeps
    // serving requests the old table sent to it for a grace, then drains.
    let changes = health.send(reload).await.unwrap_or_default();
    let tls = settings.borrow().tls_port;
    settings.send_replace(Arc::new(Settings::with_tls_port(next, tls)));
    // RUST_LOG, when set, wins over the file (as at start).
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(next.log_level);
    }

    let labels = |list: &[Arc<crate::upstream::Upstream>]| {
        list.iter()
            .map(|u| u.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut done = Vec::new();
    if !changes.pools_added.is_empty() {
        let names: Vec<&str> = changes.pools_added.iter().map(|n| &**n).collect();
        done.push(format!("new pool {}", names.join(", ")));
    }
    let retired: Vec<&str> = current
        .pools
        .iter()
        .filter(|p| !next.pools.iter().any(|n| n.name == p.name))
        .map(|p| &*p.name)
        .collect();
    if !retired.is_empty() {
        done.push(format!("pool {} gone (draining)", retired.join(", ")));
    }
    if !changes.added.is_empty() {
        done.push(format!("added {}", labels(&changes.added)));
    }
    if !changes.removed.is_empty() {
        done.push(format!("removed {} (draining)", labels(&changes.removed)));
    }
    if !changes.reweighted.is_empty() {
        done.push(format!("new weight for {}", labels(&changes.reweighted)));
    }
    if !changes.renamed.is_empty() {
        done.push(format!("now known as {}", labels(&changes.renamed)));
    }
    for (pool, strategy) in &changes.strategies {
        done.push(format!("pool {pool}: strategy {strategy}"));
    }
    if current.routes.len() != next.routes.len()
        || current
            .routes
            .iter()
            .zip(&next.routes)
            .any(|(a, b)| a.written != b.written)
    {
        done.push(format!("{} routes", next.routes.len()));
    }
    if done.is_empty() {
        done.push("no server changes".into());
    }
    log::info!("configuration reloaded ({by}): {}", done.join("; "));
}

/// Gives new handshakes the certificate of `next` when it differs from the running one;
/// open connections keep theirs. (A certificate that did not load refused the whole file.)
pub fn certificate(current: &Config, next: &Config, store: Option<&CertStore>, by: &str) {
    let (Some(store), Some(new)) = (store, &next.tls) else {
        return;
    };
    if current
        .tls
        .as_ref()
        .is_some_and(|old| old.cert.same_chain(&new.cert))
    {
        return;
    }
    store.replace(&new.cert);
    log::info!(
        "reload ({by}): new TLS certificate from {} for new connections",
        new.cert.cert_path.display()
    );
    new.cert.warn_if_expired();
}

/// The keys whose new value only a restart applies (SPEC, "Signals"), where they changed.
fn restart_only_changes(current: &Config, next: &Config) -> Vec<&'static str> {
    let (a, b) = (&current.resolved, &next.resolved);
    [
        ("listen.address", a.listen.address != b.listen.address),
        ("listen.workers", a.listen.workers != b.listen.workers),
        (
            "listen.tls_address",
            a.listen.tls_address != b.listen.tls_address,
        ),
        (
            "listen.header_timeout",
            a.listen.header_timeout != b.listen.header_timeout,
        ),
        (
            "listen.keepalive_timeout",
            a.listen.keepalive_timeout != b.listen.keepalive_timeout,
        ),
        (
            "listen.max_connections",
            a.listen.max_connections != b.listen.max_connections,
        ),
        (
            "listen.proxy_protocol",
            a.listen.proxy_protocol != b.listen.proxy_protocol,
        ),
        ("admin.address", a.admin.address != b.admin.address),
        ("admin.token", a.admin.token != b.admin.token),
        (
            "rate_limit.redis_url",
            a.rate_limit.redis_url != b.rate_limit.redis_url,
        ),
        (
            "rate_limit.key_prefix",
            a.rate_limit.key_prefix != b.rate_limit.key_prefix,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::from_toml_with_env("t.toml", text, Some(Default::default())).unwrap()
    }

    #[test]
    fn restart_only_keys_are_named_and_live_ones_are_not() {
        let a = parse("[listen]\naddress = \"127.0.0.1:8000\"\n[proxy]\nretries = 1");
        let b = parse(
            "[listen]\naddress = \"127.0.0.1:9000\"\nproxy_protocol = true\n[proxy]\nretries = 3\n[rate_limit]\nkey_prefix = \"x\"",
        );
        assert_eq!(
            restart_only_changes(&a, &b),
            [
                "listen.address",
                "listen.proxy_protocol",
                "rate_limit.key_prefix"
            ]
        );
        assert!(restart_only_changes(&a, &a).is_empty());
    }
}
