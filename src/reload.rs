//! What the operator's signals do, like nginx's: SIGTERM and SIGINT stop, SIGHUP reloads
//! the config file, SIGUSR1 reopens the access log, SIGUSR2 upgrades the binary in place
//! (`upgrade`).
//!
//! A reload diffs the new configuration against the running one: the servers from the file
//! and the live keys go to the registry, which hands them to every worker; the settings of
//! the hot path are published to the workers; keys that only a restart can change are
//! logged as such and left alone. The reload's log line names what changed: servers and
//! pools, and every other live key, old → new. Nothing here reads the file (that is
//! `config`'s) or keeps state of its own.

use std::{collections::BTreeMap, io, sync::Arc};

use actix::Addr;
use tokio::sync::watch;

use crate::{
    balancer::ListServers,
    config::Config,
    health::{Balancers, HealthActor, Reload},
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
    let keys = live_key_changes(current, next);
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
    // The HealthActor has sent the workers their events, but a handler takes its lease
    // from its worker's lists without a message (DESIGN.md), so it would see a new table
    // before its BalancerActor has read the mailbox: a request routed to a new pool found
    // it empty (503). A message sent now queues behind those events; its answer means
    // they are applied.
    if let Ok(balancers) = health.send(Balancers).await {
        for b in balancers {
            let _ = b.send(ListServers).await;
        }
    }
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
    let mut done = keys;
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
        done.push("nothing changed".into());
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

/// The keys whose new value only a restart applies (SPEC, "Signals").
const RESTART_ONLY: [&str; 11] = [
    "listen.address",
    "listen.workers",
    "listen.tls_address",
    "listen.header_timeout",
    "listen.keepalive_timeout",
    "listen.max_connections",
    "listen.proxy_protocol",
    "admin.address",
    "admin.token",
    "rate_limit.redis_url",
    "rate_limit.key_prefix",
];

/// The restart-only keys that changed, in [`RESTART_ONLY`]'s order.
fn restart_only_changes(current: &Config, next: &Config) -> Vec<&'static str> {
    let (a, b) = (flatten(current), flatten(next));
    RESTART_ONLY
        .into_iter()
        .filter(|key| a.get(*key) != b.get(*key))
        .collect()
}

/// Every other key that changed, as `key old → new`, in key order: the file's values as
/// resolved (with the environment's), compared leaf by leaf, so that a key added to the
/// configuration is reported without a line here. Left out: what the reload line reports
/// in its own words (servers, strategies, pools added or gone, routes, the certificate)
/// and the restart-only keys, which are warned about. Secrets show as `***`.
fn live_key_changes(current: &Config, next: &Config) -> Vec<String> {
    let (a, b) = (flatten(current), flatten(next));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|key| a.get(*key) != b.get(*key) && !reported_apart(key, current, next))
        .map(|key| {
            let shown = |v: Option<&serde_json::Value>| match v {
                None => "(not set)".to_string(),
                Some(_) if key.ends_with("token") => "***".to_string(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            };
            format!("{key} {} → {}", shown(a.get(key)), shown(b.get(key)))
        })
        .collect()
}

/// Whether `key`'s change is another line's business (see [`live_key_changes`]).
fn reported_apart(key: &str, current: &Config, next: &Config) -> bool {
    let under = |section: &str| key == section || key.starts_with(&format!("{section}."));
    if RESTART_ONLY.iter().any(|k| under(k)) || under("routes") || under("listen.tls") {
        return true;
    }
    if let Some(rest) = key.strip_prefix("pools.") {
        // The pool's name may hold dots: the longest name the key starts with is its.
        let (a, b) = (&current.resolved.pools, &next.resolved.pools);
        let pool = a
            .keys()
            .chain(b.keys())
            .filter(|name| rest.starts_with(&format!("{name}.")))
            .max_by_key(|name| name.len());
        return match pool {
            // A pool on one side only is "new pool" or "pool gone".
            Some(name) if a.contains_key(name) && b.contains_key(name) => {
                matches!(&rest[name.len()..], ".servers" | ".strategy")
            }
            _ => true,
        };
    }
    matches!(key, "balancer.servers" | "balancer.strategy")
}

/// The configuration as resolved, one entry per leaf: dotted key → value (lists are
/// leaves).
fn flatten(config: &Config) -> BTreeMap<String, serde_json::Value> {
    fn walk(
        prefix: String,
        value: serde_json::Value,
        out: &mut BTreeMap<String, serde_json::Value>,
    ) {
        match value {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(key, v, out);
                }
            }
            value => {
                out.insert(prefix, value);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        String::new(),
        serde_json::to_value(&config.resolved).unwrap_or_default(),
        &mut out,
    );
    out
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

    #[test]
    fn live_keys_are_named_old_to_new_and_the_rest_left_to_their_own_lines() {
        let a = parse(
            "[balancer]\nservers = [\"http://a:1\"]\n\
             [rate_limit]\nrequests = 5\n[health_check]\ninterval = \"2s\"\n\
             [pools.api]\nservers = [\"http://b:1\"]\n",
        );
        let b = parse(
            "[balancer]\nservers = [\"http://a:1\", \"http://c:1\"]\nstrategy = \"least_requests\"\n\
             [rate_limit]\nrequests = 1000\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
             [health_check]\ninterval = \"1s\"\n\
             [pools.api]\nservers = [\"http://b:1\"]\nhealth_check = { path = \"/ready\" }\n\
             [pools.new]\nservers = [\"http://d:1\"]\n\
             [listen]\naddress = \"127.0.0.1:9000\"\n[admin]\ntoken = \"s3cret\"\n",
        );
        assert_eq!(
            live_key_changes(&a, &b),
            [
                "health_check.interval 2s → 1s",
                "pools.api.health_check.path (not set) → /ready",
                "rate_limit.requests 5 → 1000",
                "rate_limit.trusted_proxies [] → [\"10.0.0.0/8\"]",
            ]
        );
        assert!(live_key_changes(&b, &b).is_empty());
    }
}
