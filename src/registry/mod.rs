//! The server registry: the pools, who is a member of each, whether each member is in
//! rotation, and the recipients of every worker, to which each change is broadcast.
//!
//! A server's identity is (pool, `host:port`): a URL listed in two pools is two members,
//! probed and counted apart. A plain struct, owned by the HealthActor (the single writer);
//! it knows the workers' actors only as `Recipient`s of the messages they handle. It
//! decides nothing about health (that is the rise/fall counting in `health.rs`) and never
//! probes a server.

use std::{collections::HashMap, sync::Arc};

use actix::Recipient;

use crate::{
    balancer::{ListServers, PoolSpec, ServerEvent, ServerState},
    rate_limit::Reconfigure,
    upstream::{PoolId, Upstream},
};

/// One registered server.
#[derive(Debug, Clone)]
pub struct Member {
    pub upstream: Arc<Upstream>,
    /// In rotation by the health checks.
    pub healthy: bool,
    /// Taken out for a while after failures in a row (passive ejection).
    pub ejected: bool,
    /// Listed in the config file (else added through the admin API): a reload may remove
    /// it, never one that was added at runtime.
    pub from_file: bool,
}

/// What a reload changed in the membership.
#[derive(Debug, Default)]
pub struct Changes {
    /// New in the file: in rotation at once, as at start.
    pub added: Vec<Arc<Upstream>>,
    /// Gone from the file: draining.
    pub removed: Vec<Arc<Upstream>>,
    /// Still in the file with another weight.
    pub reweighted: Vec<Arc<Upstream>>,
    /// Still in the file at the same address, known by another name (or by none).
    pub renamed: Vec<Arc<Upstream>>,
    /// Pools new in the file.
    pub pools_added: Vec<Arc<str>>,
    /// Pools gone from the file: retired now, their servers removed after a grace.
    pub pools_retired: Vec<PoolId>,
    /// Pools whose strategy changed, with the new one's name.
    pub strategies: Vec<(Arc<str>, &'static str)>,
}

/// What a worker registers: where to send server changes, where to ask for its view, and
/// its limiter (so that a reload reaches every worker).
pub struct WorkerHandles {
    pub events: Recipient<ServerEvent>,
    pub list: Recipient<ListServers>,
    pub limiter: Option<Recipient<Reconfigure>>,
}

/// Why a runtime membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("server {0} is already present")]
    Duplicate(String),
    #[error("no server {0}")]
    Unknown(String),
    #[error("no pool {0}")]
    UnknownPool(String),
}

/// A member's key: its pool and label.
type Key = (PoolId, Arc<str>);

/// The pools, their members in the order they were configured or added, and the workers.
#[derive(Default)]
pub struct Registry {
    /// The pools as the balancers know them: `default` first, then by name.
    pools: Vec<PoolSpec>,
    members: Vec<Member>,
    /// (pool, label) → index in `members`.
    index: HashMap<Key, usize>,
    workers: Vec<WorkerHandles>,
}

impl Registry {
    /// A registry of `pools`, with their servers all in rotation (servers from the config
    /// file are, until checks say otherwise).
    pub fn new(pools: impl IntoIterator<Item = (PoolSpec, Vec<Arc<Upstream>>)>) -> Self {
        let mut registry = Self::default();
        for (spec, servers) in pools {
            registry.pools.push(spec);
            for upstream in servers {
                registry.insert(Member {
                    upstream,
                    healthy: true,
                    ejected: false,
                    from_file: true,
                });
            }
        }
        registry
    }

    fn insert(&mut self, member: Member) {
        let u = &member.upstream;
        self.index
            .insert((u.pool, u.label.clone()), self.members.len());
        self.members.push(member);
    }

    /// Every member, in order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The pools, `default` first.
    pub fn pools(&self) -> &[PoolSpec] {
        &self.pools
    }

    /// The pool named `name`, unless it is retired.
    pub fn pool(&self, name: &str) -> Option<&PoolSpec> {
        self.pools.iter().find(|p| &*p.name == name && !p.retired)
    }

    /// The member named `label` (`host:port`) in `pool`.
    pub fn get(&self, pool: PoolId, label: &str) -> Option<&Member> {
        self.index
            .get(&(pool, Arc::from(label)))
            .map(|&i| &self.members[i])
    }

    /// Every pool, and every member with its health, as a worker needs them at start.
    pub fn snapshot(&self) -> ServerEvent {
        ServerEvent::Snapshot {
            pools: self.pools.clone(),
            servers: self
                .members
                .iter()
                .map(|m| ServerState {
                    upstream: m.upstream.clone(),
                    healthy: m.healthy,
                    ejected: m.ejected,
                })
                .collect(),
        }
    }

    /// A worker joins the broadcast; the answer is the current list.
    pub fn join(&mut self, worker: WorkerHandles) -> ServerEvent {
        self.workers.push(worker);
        self.snapshot()
    }

    /// Adds a member out of rotation (a server added at runtime waits for its first check).
    pub fn add(&mut self, upstream: Arc<Upstream>) -> Result<(), MembershipError> {
        if !self
            .pools
            .iter()
            .any(|p| p.id == upstream.pool && !p.retired)
        {
            return Err(MembershipError::UnknownPool(upstream.pool_name.to_string()));
        }
        if self
            .index
            .contains_key(&(upstream.pool, upstream.label.clone()))
        {
            return Err(MembershipError::Duplicate(upstream.label.to_string()));
        }
        self.insert(Member {
            upstream: upstream.clone(),
            healthy: false,
            ejected: false,
            from_file: false,
        });
        self.broadcast(ServerEvent::Added {
            upstream,
            healthy: false,
        });
        Ok(())
    }

    /// Removes a member; the workers drain it.
    pub fn remove(&mut self, pool: PoolId, label: &str) -> Result<Member, MembershipError> {
        let key = (pool, Arc::from(label));
        let i = self
            .index
            .remove(&key)
            .ok_or_else(|| MembershipError::Unknown(label.to_string()))?;
        let removed = self.members.remove(i);
        for slot in self.index.values_mut() {
            if *slot > i {
                *slot -= 1;
            }
        }
        self.broadcast(ServerEvent::Removed {
            pool,
            label: removed.upstream.label.clone(),
        });
        Ok(removed)
    }

    /// Puts a member in or out of rotation and tells the workers; false when it already was.
    pub fn set_healthy(&mut self, pool: PoolId, label: &str, healthy: bool) -> bool {
        let Some(&i) = self.index.get(&(pool, Arc::from(label))) else {
            return false;
        };
        let member = &mut self.members[i];
        if member.healthy == healthy {
            return false;
        }
        member.healthy = healthy;
        let label = member.upstream.label.clone();
        self.broadcast(ServerEvent::Health {
            pool,
            label,
            healthy,
        });
        true
    }

    /// Ejects a member, or brings it back, and tells the workers; false when it already was.
    pub fn set_ejected(&mut self, pool: PoolId, label: &str, ejected: bool) -> bool {
        let Some(&i) = self.index.get(&(pool, Arc::from(label))) else {
            return false;
        };
        let member = &mut self.members[i];
        if member.ejected == ejected {
            return false;
        }
        member.ejected = ejected;
        let label = member.upstream.label.clone();
        self.broadcast(ServerEvent::Ejected {
            pool,
            label,
            ejected,
        });
        true
    }

    /// `pool`'s members in rotation (healthy, not ejected), and all its members.
    pub fn in_rotation(&self, pool: PoolId) -> (usize, usize) {
        let members = self.members.iter().filter(|m| m.upstream.pool == pool);
        let (mut up, mut all) = (0, 0);
        for m in members {
            all += 1;
            up += usize::from(m.healthy && !m.ejected);
        }
        (up, all)
    }

    /// `pool`'s members ejected now.
    pub fn ejected(&self, pool: PoolId) -> usize {
        self.members
            .iter()
            .filter(|m| m.upstream.pool == pool && m.ejected)
            .count()
    }

    /// Every live worker's limiter takes new settings.
    pub fn reconfigure_limiters(&mut self, message: &Reconfigure) {
        self.forget_stopped();
        for limiter in self.workers.iter().filter_map(|w| w.limiter.as_ref()) {
            limiter.do_send(message.clone());
        }
    }

    /// Every live worker's balancer, to ask for its view.
    pub fn listers(&mut self) -> Vec<Recipient<ListServers>> {
        self.forget_stopped();
        self.workers.iter().map(|w| w.list.clone()).collect()
    }

    /// A worker that stopped (actix restarts a worker that panicked) leaves a dead entry.
    fn forget_stopped(&mut self) {
        self.workers.retain(|w| w.events.connected());
    }

    fn broadcast(&mut self, event: ServerEvent) {
        self.forget_stopped();
        for w in &self.workers {
            w.events.do_send(event.clone());
        }
    }
}

mod changes;

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::{ServerConfig, Strategy};

    pub(super) fn upstream(port: u16) -> Arc<Upstream> {
        Upstream::local(port)
    }

    pub(super) fn weighted(pool: &str, port: u16, weight: u32) -> Arc<Upstream> {
        Arc::new(Upstream::new(
            pool,
            &ServerConfig {
                url: format!("http://127.0.0.1:{port}").parse().unwrap(),
                weight,
            },
        ))
    }

    pub(super) fn spec(name: &str) -> PoolSpec {
        PoolSpec {
            id: PoolId::of(name),
            name: name.into(),
            strategy: Strategy::RoundRobin,
            retired: false,
            panic_threshold: 0,
            eject_after_5xx: 0,
        }
    }

    pub(super) fn one_pool(servers: Vec<Arc<Upstream>>) -> Registry {
        Registry::new([(spec("default"), servers)])
    }

    pub(super) fn labels(r: &Registry) -> Vec<String> {
        r.members()
            .iter()
            .map(|m| format!("{}/{}", m.upstream.pool_name, m.upstream.label))
            .collect()
    }

    #[test]
    fn configured_servers_start_in_rotation_and_added_ones_out_of_it() {
        let mut r = one_pool(vec![upstream(1), upstream(2)]);
        r.add(upstream(3)).unwrap();
        let healthy: Vec<bool> = r.members().iter().map(|m| m.healthy).collect();
        assert_eq!(healthy, [true, true, false]);
        assert!(matches!(
            r.add(upstream(3)),
            Err(MembershipError::Duplicate(_))
        ));
        assert!(matches!(
            r.add(weighted("reg-nowhere", 3, 1)),
            Err(MembershipError::UnknownPool(_))
        ));
    }

    #[test]
    fn removing_a_member_keeps_the_others_findable_by_label() {
        let d = PoolId::DEFAULT;
        let mut r = one_pool(vec![upstream(1), upstream(2), upstream(3)]);
        r.remove(d, "127.0.0.1:1").unwrap();
        assert_eq!(labels(&r), ["default/127.0.0.1:2", "default/127.0.0.1:3"]);
        assert_eq!(
            &*r.get(d, "127.0.0.1:3").unwrap().upstream.label,
            "127.0.0.1:3"
        );
        assert!(r.get(d, "127.0.0.1:1").is_none());
        assert!(matches!(
            r.remove(d, "127.0.0.1:1"),
            Err(MembershipError::Unknown(_))
        ));
    }

    #[test]
    fn set_healthy_reports_only_a_change() {
        let d = PoolId::DEFAULT;
        let mut r = one_pool(vec![upstream(1)]);
        assert!(!r.set_healthy(d, "127.0.0.1:1", true));
        assert!(r.set_healthy(d, "127.0.0.1:1", false));
        assert!(!r.get(d, "127.0.0.1:1").unwrap().healthy);
        assert!(
            !r.set_healthy(d, "127.0.0.1:9", false),
            "unknown: no change"
        );
        let ServerEvent::Snapshot { servers, .. } = r.snapshot() else {
            panic!("a snapshot")
        };
        assert_eq!(servers.len(), 1);
        assert!(!servers[0].healthy);
    }
}
