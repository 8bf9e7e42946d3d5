//! What the config file and DNS change in the membership: a reload's pools and servers,
//! a name's addresses, a retired pool's end. Each change is broadcast to the workers as it
//! is made.

use std::{collections::HashSet, sync::Arc};

use super::{Changes, Member, Registry};
use crate::{
    balancer::{PoolSpec, ServerEvent},
    upstream::{PoolId, Upstream},
};

impl Registry {
    /// Applies the pools of a reloaded config file: new pools are made, strategies change,
    /// pools gone from the file are retired (their servers go with [`Registry::forget`]);
    /// in each pool new servers join in rotation, servers gone from the file drain
    /// (servers added through the admin API stay), a new weight applies at once.
    pub fn reload(&mut self, pools: Vec<(PoolSpec, Vec<Arc<Upstream>>)>) -> Changes {
        let mut changes = Changes::default();
        let listed: HashSet<PoolId> = pools.iter().map(|(p, _)| p.id).collect();
        let mut specs: Vec<PoolSpec> = Vec::with_capacity(pools.len());
        for (spec, _) in &pools {
            match self.pools.iter().find(|p| p.id == spec.id) {
                None => changes.pools_added.push(spec.name.clone()),
                Some(old) if old.strategy != spec.strategy => changes
                    .strategies
                    .push((spec.name.clone(), spec.strategy.name())),
                Some(_) => {}
            }
            specs.push(spec.clone());
        }
        for old in &self.pools {
            if !listed.contains(&old.id) {
                if !old.retired {
                    changes.pools_retired.push(old.id);
                }
                specs.push(PoolSpec {
                    retired: true,
                    ..old.clone()
                });
            }
        }
        // The pools first: a server added below goes to a pool the balancers have.
        self.pools = specs;
        self.broadcast(ServerEvent::Pools(self.pools.clone()));

        for (spec, servers) in pools {
            let names: HashSet<Arc<str>> = servers.iter().map(|u| u.label.clone()).collect();
            for upstream in servers {
                match self.index.get(&(spec.id, upstream.label.clone())) {
                    Some(&i) => {
                        let member = &mut self.members[i];
                        member.from_file = true;
                        let old = &member.upstream;
                        if old.weight != upstream.weight
                            || old.name != upstream.name
                            || old.url != upstream.url
                        {
                            // Another weight, or the same address now known by another
                            // name (or by none): the workers take the new one.
                            let reweighted = old.weight != upstream.weight;
                            member.upstream = upstream.clone();
                            match reweighted {
                                true => changes.reweighted.push(upstream.clone()),
                                false => changes.renamed.push(upstream.clone()),
                            }
                            self.broadcast(ServerEvent::Reweighted { upstream });
                        }
                    }
                    None => self.join_from_file(upstream, &mut changes),
                }
            }
            let gone: Vec<Arc<str>> = self
                .members
                .iter()
                .filter(|m| {
                    m.upstream.pool == spec.id && m.from_file && !names.contains(&m.upstream.label)
                })
                .map(|m| m.upstream.label.clone())
                .collect();
            for label in gone {
                if let Ok(member) = self.remove(spec.id, &label) {
                    changes.removed.push(member.upstream);
                }
            }
        }
        changes
    }

    /// The name `name` (`host:port`) of `pool` resolves to `upstreams` now: addresses new
    /// to it join in rotation, as a server new in the file does; the members that stood for
    /// it and are gone drain.
    pub fn resolved(&mut self, pool: PoolId, name: &str, upstreams: Vec<Arc<Upstream>>) -> Changes {
        let mut changes = Changes::default();
        let listed: HashSet<Arc<str>> = upstreams.iter().map(|u| u.label.clone()).collect();
        for upstream in upstreams {
            if !self.index.contains_key(&(pool, upstream.label.clone())) {
                self.join_from_file(upstream, &mut changes);
            }
        }
        let gone: Vec<Arc<str>> = self
            .members
            .iter()
            .filter(|m| {
                let u = &m.upstream;
                u.pool == pool
                    && m.from_file
                    && u.name.as_deref() == Some(name)
                    && !listed.contains(&u.label)
            })
            .map(|m| m.upstream.label.clone())
            .collect();
        for label in gone {
            if let Ok(member) = self.remove(pool, &label) {
                changes.removed.push(member.upstream);
            }
        }
        changes
    }

    /// A server new in the file (or a name's new address) joins in rotation, as at start.
    fn join_from_file(&mut self, upstream: Arc<Upstream>, changes: &mut Changes) {
        self.insert(Member {
            upstream: upstream.clone(),
            healthy: true,
            ejected: false,
            from_file: true,
        });
        changes.added.push(upstream.clone());
        self.broadcast(ServerEvent::Added {
            upstream,
            healthy: true,
        });
    }

    /// A retired pool goes: its members are removed (they drain) and it leaves the list
    /// once the workers have no requests on them. Nothing happens to a pool that a later
    /// reload brought back meanwhile.
    pub fn forget(&mut self, pool: PoolId) -> Vec<Member> {
        if !self.pools.iter().any(|p| p.id == pool && p.retired) {
            return Vec::new();
        }
        let labels: Vec<Arc<str>> = self
            .members
            .iter()
            .filter(|m| m.upstream.pool == pool)
            .map(|m| m.upstream.label.clone())
            .collect();
        let removed = labels
            .iter()
            .filter_map(|label| self.remove(pool, label).ok())
            .collect();
        self.pools.retain(|p| p.id != pool);
        self.broadcast(ServerEvent::Pools(self.pools.clone()));
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::tests::{labels, one_pool, spec, upstream, weighted},
        *,
    };

    #[test]
    fn a_reload_adds_removes_and_reweights_file_servers_and_keeps_admin_ones() {
        let d = PoolId::DEFAULT;
        let mut r = one_pool(vec![upstream(1), upstream(2)]);
        r.add(upstream(3)).unwrap();
        let changes = r.reload(vec![(
            spec("default"),
            vec![weighted("default", 2, 5), upstream(4)],
        )]);
        let names = |v: &[Arc<Upstream>]| v.iter().map(|u| u.label.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&changes.added), ["127.0.0.1:4"]);
        assert_eq!(names(&changes.removed), ["127.0.0.1:1"]);
        assert_eq!(names(&changes.reweighted), ["127.0.0.1:2"]);
        assert_eq!(
            labels(&r),
            [
                "default/127.0.0.1:2",
                "default/127.0.0.1:3",
                "default/127.0.0.1:4"
            ]
        );
        assert_eq!(r.get(d, "127.0.0.1:2").unwrap().upstream.weight, 5);
        assert!(
            r.get(d, "127.0.0.1:4").unwrap().healthy,
            "a file server starts in rotation"
        );
        // The same file again changes nothing; the admin-added server is never removed.
        let again = r.reload(vec![(
            spec("default"),
            vec![weighted("default", 2, 5), upstream(4)],
        )]);
        assert!(again.added.is_empty() && again.removed.is_empty() && again.reweighted.is_empty());
        assert!(r.get(d, "127.0.0.1:3").is_some());
    }

    #[test]
    fn one_url_in_two_pools_is_two_members_and_a_pool_gone_is_retired_then_forgotten() {
        let api = PoolId::of("reg-api");
        let mut r = Registry::new([
            (spec("default"), vec![upstream(1)]),
            (spec("reg-api"), vec![weighted("reg-api", 1, 1)]),
        ]);
        assert!(r.set_healthy(api, "127.0.0.1:1", false));
        assert!(
            r.get(PoolId::DEFAULT, "127.0.0.1:1").unwrap().healthy,
            "counted apart"
        );
        let changes = r.reload(vec![(spec("default"), vec![upstream(1)])]);
        assert_eq!(changes.pools_retired, [api]);
        assert!(r.pools().iter().any(|p| p.id == api && p.retired));
        assert!(r.pool("reg-api").is_none(), "not offered to the admin API");
        assert!(
            r.get(api, "127.0.0.1:1").is_some(),
            "still serving an older route table"
        );
        assert_eq!(r.forget(api).len(), 1);
        assert!(r.get(api, "127.0.0.1:1").is_none());
        assert_eq!(r.pools().len(), 1);
    }

    #[test]
    fn a_pool_retired_and_brought_back_before_it_was_forgotten_stays() {
        let mut r = Registry::new([
            (spec("default"), vec![]),
            (spec("reg-back"), vec![weighted("reg-back", 1, 1)]),
        ]);
        r.reload(vec![(spec("default"), vec![])]);
        let changes = r.reload(vec![
            (spec("default"), vec![]),
            (spec("reg-back"), vec![weighted("reg-back", 1, 1)]),
        ]);
        assert!(changes.pools_added.is_empty() && changes.added.is_empty());
        assert!(r.forget(PoolId::of("reg-back")).is_empty());
        assert!(r.pool("reg-back").is_some());
    }
}
