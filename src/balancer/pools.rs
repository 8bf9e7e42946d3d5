//! [`Pools`]: every pool of a worker's balancer, by number, each a
//! [`ServerList`](super::list::ServerList); the pool set follows the registry's broadcasts
//! (a pool gone drains and goes with its last request). A plain struct: unit-tested as it is.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{list::ServerList, Outcome, PoolSpec, ServerEvent, ServerState, ServerView};
use crate::{
    sticky::ServerId,
    upstream::{PoolId, Upstream},
};

/// Every pool of a worker, by number.
#[derive(Default)]
pub struct Pools {
    /// By [`PoolId::index`]; `None` for numbers of pools this worker does not have.
    lists: Vec<Option<ServerList>>,
}

impl Pools {
    fn get_mut(&mut self, pool: PoolId) -> Option<&mut ServerList> {
        self.lists.get_mut(pool.index()).and_then(Option::as_mut)
    }

    /// The pool set as the registry has it: new pools made, strategies and the retired
    /// mark applied; a pool not listed drains and goes once its servers have.
    fn set_pools(&mut self, specs: &[PoolSpec]) {
        let listed: HashSet<usize> = specs.iter().map(|p| p.id.index()).collect();
        for (i, list) in self.lists.iter_mut().enumerate() {
            if list.is_some() && !listed.contains(&i) {
                if let Some(l) = list.as_mut() {
                    l.drain_all();
                }
                if list.as_ref().is_some_and(ServerList::is_empty) {
                    *list = None;
                }
            }
        }
        for spec in specs {
            let i = spec.id.index();
            if self.lists.len() <= i {
                self.lists.resize_with(i + 1, || None);
            }
            let list = self.lists[i].get_or_insert_with(|| ServerList::new(spec.strategy));
            list.set_strategy(spec.strategy);
            list.retired = spec.retired;
            list.eject_after = spec.eject_after_5xx;
            if list.panic_threshold != spec.panic_threshold {
                list.panic_threshold = spec.panic_threshold;
                list.rotation_changed();
            }
        }
    }

    /// Applies a change broadcast by the registry.
    pub fn apply(&mut self, event: ServerEvent) {
        match event {
            ServerEvent::Snapshot { pools, servers } => {
                self.set_pools(&pools);
                let mut by_pool: HashMap<PoolId, Vec<ServerState>> = HashMap::new();
                for s in servers {
                    by_pool.entry(s.upstream.pool).or_default().push(s);
                }
                for spec in &pools {
                    let servers = by_pool.remove(&spec.id).unwrap_or_default();
                    if let Some(list) = self.get_mut(spec.id) {
                        list.snapshot(servers);
                    }
                }
            }
            ServerEvent::Pools(pools) => self.set_pools(&pools),
            ServerEvent::Health {
                pool,
                label,
                healthy,
            } => {
                if let Some(list) = self.get_mut(pool) {
                    list.set_health(&label, healthy);
                }
            }
            ServerEvent::Added { upstream, healthy } => {
                if let Some(list) = self.get_mut(upstream.pool) {
                    list.add(upstream, healthy);
                }
            }
            ServerEvent::Reweighted { upstream } => {
                if let Some(list) = self.get_mut(upstream.pool) {
                    list.reweight(upstream);
                }
            }
            ServerEvent::Removed { pool, label } => {
                if let Some(list) = self.get_mut(pool) {
                    list.remove(&label);
                }
            }
            ServerEvent::Ejected {
                pool,
                label,
                ejected,
            } => {
                if let Some(list) = self.get_mut(pool) {
                    list.set_ejected(&label, ejected);
                }
            }
        }
    }

    /// Chooses a server of `pool` for a request (see [`ServerList::begin`]); `None` when
    /// the pool has none in rotation, or this worker has no such pool.
    pub fn begin(
        &mut self,
        pool: PoolId,
        tried: &[Arc<Upstream>],
        key: Option<u64>,
        sticky: Option<ServerId>,
    ) -> Option<Arc<Upstream>> {
        self.get_mut(pool)?.begin(tried, key, sticky)
    }

    /// A request on `upstream` ended so; true when it is to be reported for ejection.
    pub fn end(&mut self, upstream: &Upstream, outcome: Outcome) -> bool {
        self.get_mut(upstream.pool)
            .is_some_and(|list| list.end(&upstream.label, outcome))
    }

    /// This worker's view of every server of every pool.
    pub fn views(&self) -> Vec<ServerView> {
        self.lists
            .iter()
            .flatten()
            .flat_map(ServerList::views)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Strategy as Kind;

    fn up(upstream: Arc<Upstream>) -> ServerState {
        ServerState {
            upstream,
            healthy: true,
            ejected: false,
        }
    }

    fn in_pool(pool: &str, port: u16) -> Arc<Upstream> {
        Arc::new(Upstream::new(
            pool,
            &crate::config::ServerConfig {
                url: format!("http://127.0.0.1:{port}").parse().unwrap(),
                weight: 1,
            },
        ))
    }

    fn spec(name: &str, retired: bool) -> PoolSpec {
        PoolSpec {
            id: PoolId::of(name),
            name: name.into(),
            strategy: Kind::RoundRobin,
            retired,
            panic_threshold: 0,
            eject_after_5xx: 0,
        }
    }

    #[test]
    fn each_pool_balances_its_own_servers_and_one_url_may_be_in_two() {
        let mut pools = Pools::default();
        pools.apply(ServerEvent::Snapshot {
            pools: vec![spec("default", false), spec("list-api", false)],
            servers: vec![
                up(in_pool("default", 1)),
                up(in_pool("default", 2)),
                up(in_pool("list-api", 2)),
            ],
        });
        let api = PoolId::of("list-api");
        for _ in 0..3 {
            let u = pools.begin(api, &[], None, None).unwrap();
            assert_eq!((u.url.port(), u.pool), (Some(2), api));
        }
        let d: Vec<u16> = (0..2)
            .map(|_| {
                pools
                    .begin(PoolId::DEFAULT, &[], None, None)
                    .unwrap()
                    .url
                    .port()
                    .unwrap()
            })
            .collect();
        assert_eq!(d, [1, 2]);
        // Taking port 2 out of the api pool leaves it in the default one.
        pools.apply(ServerEvent::Health {
            pool: api,
            label: in_pool("list-api", 2).label.clone(),
            healthy: false,
        });
        assert!(pools.begin(api, &[], None, None).is_none());
        assert!(pools.begin(PoolId::DEFAULT, &[], None, None).is_some());
        assert!(pools
            .begin(PoolId::of("list-nowhere"), &[], None, None)
            .is_none());
    }

    #[test]
    fn a_retired_pool_still_serves_and_a_pool_gone_goes_with_its_last_request() {
        let mut pools = Pools::default();
        let old = PoolId::of("list-old");
        pools.apply(ServerEvent::Snapshot {
            pools: vec![spec("default", false), spec("list-old", false)],
            servers: vec![up(in_pool("list-old", 1))],
        });
        pools.apply(ServerEvent::Pools(vec![
            spec("default", false),
            spec("list-old", true),
        ]));
        let lease = pools
            .begin(old, &[], None, None)
            .expect("served for an older route table");
        assert!(pools.views().iter().all(|v| v.draining));
        pools.apply(ServerEvent::Pools(vec![spec("default", false)]));
        assert!(pools.begin(old, &[], None, None).is_none());
        assert_eq!(pools.views().len(), 1, "drains while its request runs");
        pools.end(&lease, Outcome::default());
        assert!(pools.views().is_empty());
    }
}
