//! Servers known by name, on the HealthActor: each of a pool's servers given by a host name
//! stands for the name's addresses, one member each; every `resolve_interval` the names are
//! looked up again, off the request path: addresses that appear join at once (as a server
//! new in the file does), addresses gone drain (as a removed server does), and a lookup that
//! fails keeps the last addresses, with one warning until it works again.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use actix::prelude::*;

use super::{state::HealthState, HealthActor};
use crate::{
    config::{PoolConfig, ServerConfig},
    resolve::{NamedServer, Names, Resolved},
    upstream::{PoolId, Upstream},
};

/// One pool's names: what to look up, with what, how often.
pub(super) struct PoolNames {
    /// The pool's servers given by name.
    servers: Vec<ServerConfig>,
    resolver: Option<Names>,
    resolvers: Vec<SocketAddr>,
    interval: Duration,
    timer: Option<SpawnHandle>,
    /// The names whose last lookup failed (warned about once).
    failing: HashSet<String>,
}

impl HealthActor {
    /// The members `pool`'s servers stand for: a server given by an address is one, a
    /// server given by a name one per address in `resolved` (or, for a name missing there,
    /// the addresses it has now). Once each by label: a second server with the same address
    /// in one pool adds nothing.
    pub(super) fn expand(&self, pool: &PoolConfig, resolved: &Resolved) -> Vec<Arc<Upstream>> {
        let id = PoolId::of(&pool.name);
        let mut out: Vec<Arc<Upstream>> = Vec::with_capacity(pool.servers.len());
        let mut labels: HashSet<Arc<str>> = HashSet::new();
        for server in &pool.servers {
            let upstreams: Vec<Arc<Upstream>> = match server.host_name() {
                None => vec![Arc::new(
                    Upstream::new(&pool.name, server).with_metrics(&self.metrics),
                )],
                Some(_) => {
                    let named = NamedServer {
                        pool: pool.name.clone(),
                        url: server.url.to_string(),
                    };
                    match resolved.get(&named) {
                        Some(addrs) => addrs
                            .iter()
                            .map(|&a| {
                                Arc::new(
                                    Upstream::resolved(&pool.name, server, a)
                                        .with_metrics(&self.metrics),
                                )
                            })
                            .collect(),
                        None => self.members_of(id, &Upstream::new(&pool.name, server).label),
                    }
                }
            };
            for u in upstreams {
                if labels.insert(u.label.clone()) {
                    out.push(u);
                }
            }
        }
        out
    }

    /// The members of `pool` that stand for the name `name` (`host:port`).
    fn members_of(&self, pool: PoolId, name: &str) -> Vec<Arc<Upstream>> {
        self.registry
            .members()
            .iter()
            .filter(|m| m.upstream.pool == pool && m.upstream.name.as_deref() == Some(name))
            .map(|m| m.upstream.clone())
            .collect()
    }

    /// Starts (again) the lookups of `pool`'s names, the first one `interval` from now: at
    /// start and on a reload the names were just resolved.
    pub(super) fn schedule_names(&mut self, pool: &PoolConfig, ctx: &mut Context<Self>) {
        let id = PoolId::of(&pool.name);
        let servers: Vec<ServerConfig> = pool
            .servers
            .iter()
            .filter(|s| s.host_name().is_some())
            .cloned()
            .collect();
        let old = self.names.remove(&id);
        if let Some(timer) = old.as_ref().and_then(|o| o.timer) {
            ctx.cancel_future(timer);
        }
        if servers.is_empty() {
            return;
        }
        let same_resolvers = old.as_ref().is_some_and(|o| o.resolvers == pool.resolvers);
        let resolver = match old.and_then(|o| same_resolvers.then_some(o.resolver).flatten()) {
            Some(r) => Some(r),
            None => match Names::new(&pool.resolvers) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!("pool {}: {e}; its names are not looked up again", pool.name);
                    None
                }
            },
        };
        let timer = ctx.run_interval(pool.resolve_interval, move |act, ctx| {
            act.lookup_round(id, ctx)
        });
        self.names.insert(
            id,
            PoolNames {
                servers,
                resolver,
                resolvers: pool.resolvers.clone(),
                interval: pool.resolve_interval,
                timer: Some(timer),
                failing: HashSet::new(),
            },
        );
    }

    /// Looks up every name of `pool` again, each on its own.
    fn lookup_round(&mut self, pool: PoolId, ctx: &mut Context<Self>) {
        let Some(names) = self.names.get(&pool) else {
            return;
        };
        let Some(resolver) = names.resolver.clone() else {
            return;
        };
        // A round cannot outlast the interval: the next one starts fresh.
        let interval = names.interval;
        for server in names.servers.clone() {
            let resolver = resolver.clone();
            let (host, port) = (
                server.host_name().unwrap_or_default().to_string(),
                server.port(),
            );
            ctx.spawn(
                async move {
                    let found = tokio::time::timeout(interval, resolver.lookup(&host, port)).await;
                    found.unwrap_or_else(|_| Err("no answer within resolve_interval".into()))
                }
                .into_actor(self)
                .map(move |found, act, _| act.looked_up(pool, &server, found)),
            );
        }
    }

    /// The names of `pool` whose last lookup failed.
    fn failing(&mut self, pool: PoolId) -> Option<&mut HashSet<String>> {
        self.names.get_mut(&pool).map(|n| &mut n.failing)
    }

    /// A lookup of `server`'s name came back: the pool's members for it follow the answer.
    fn looked_up(
        &mut self,
        pool: PoolId,
        server: &ServerConfig,
        found: Result<Vec<SocketAddr>, String>,
    ) {
        let Some(spec) = self.registry.pools().iter().find(|p| p.id == pool) else {
            return;
        };
        let pool_name = spec.name.clone();
        let name = Upstream::new(&pool_name, server).label.clone();
        let addrs = match found {
            Ok(addrs) => {
                if self.failing(pool).is_some_and(|f| f.remove(&*name)) {
                    log::info!("{name} (pool {pool_name}) resolves again");
                }
                addrs
            }
            Err(e) => {
                if self
                    .failing(pool)
                    .is_some_and(|f| f.insert(name.to_string()))
                {
                    let kept: Vec<String> = self
                        .members_of(pool, &name)
                        .iter()
                        .map(|u| u.label.to_string())
                        .collect();
                    log::warn!(
                        "{name} (pool {pool_name}): lookup failed: {e}; keeping its last \
                         addresses ({})",
                        kept.join(", ")
                    );
                }
                return;
            }
        };
        let upstreams: Vec<Arc<Upstream>> = addrs
            .iter()
            .map(|&a| {
                Arc::new(Upstream::resolved(&pool_name, server, a).with_metrics(&self.metrics))
            })
            .collect();
        let changes = self.registry.resolved(pool, &name, upstreams);
        if changes.added.is_empty() && changes.removed.is_empty() {
            return;
        }
        for u in &changes.added {
            self.track(u, HealthState::default(), true);
        }
        for u in &changes.removed {
            self.untrack(u);
        }
        let labels = |list: &[Arc<Upstream>]| {
            list.iter()
                .map(|u| u.label.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        log::info!(
            "{name} (pool {pool_name}) resolves to {}: {}{}",
            addrs
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            match changes.added.is_empty() {
                true => String::new(),
                false => format!("added {}", labels(&changes.added)),
            },
            match changes.removed.is_empty() {
                true => String::new(),
                false => format!(
                    "{}removed {} (draining)",
                    if changes.added.is_empty() { "" } else { "; " },
                    labels(&changes.removed)
                ),
            },
        );
    }
}

/// The names of every pool, by pool.
pub(super) type ByPool = HashMap<PoolId, PoolNames>;
