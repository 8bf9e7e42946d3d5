//! The server registry: who is a member, whether each member is in rotation, and the
//! recipients of every worker, to which each change is broadcast.
//!
//! A plain struct, owned by the HealthActor (the single writer); it knows the workers'
//! actors only as `Recipient`s of the messages they handle. It decides nothing about health
//! (that is the rise/fall counting in `health.rs`) and never probes a server.

use std::{collections::HashMap, sync::Arc};

use actix::Recipient;

use crate::{
    balancer::{ListServers, Rebalance, ServerEvent},
    config::Strategy,
    rate_limit::Reconfigure,
    upstream::Upstream,
};

/// One registered server.
#[derive(Debug, Clone)]
pub struct Member {
    pub upstream: Arc<Upstream>,
    /// In rotation: the balancers send it requests.
    pub healthy: bool,
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
}

/// What a worker registers: where to send server changes, where to ask for its view, and
/// its limiter (so that a reload reaches every worker).
pub struct WorkerHandles {
    pub events: Recipient<ServerEvent>,
    pub list: Recipient<ListServers>,
    pub rebalance: Recipient<Rebalance>,
    pub limiter: Option<Recipient<Reconfigure>>,
}

/// Why a runtime membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("server {0} is already present")]
    Duplicate(String),
    #[error("no server {0}")]
    Unknown(String),
}

/// The members, in the order they were configured or added, and the workers.
#[derive(Default)]
pub struct Registry {
    members: Vec<Member>,
    /// Label → index in `members`.
    index: HashMap<Arc<str>, usize>,
    workers: Vec<WorkerHandles>,
}

impl Registry {
    /// A registry of `servers`, all in rotation (servers from the config file are, until
    /// checks say otherwise).
    pub fn new(servers: impl IntoIterator<Item = Arc<Upstream>>) -> Self {
        let mut registry = Self::default();
        for upstream in servers {
            registry.insert(Member {
                upstream,
                healthy: true,
                from_file: true,
            });
        }
        registry
    }

    fn insert(&mut self, member: Member) {
        self.index
            .insert(member.upstream.label.clone(), self.members.len());
        self.members.push(member);
    }

    /// Every member, in order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member named `label` (`host:port`).
    pub fn get(&self, label: &str) -> Option<&Member> {
        self.index.get(label).map(|&i| &self.members[i])
    }

    /// The whole list with each member's health, as a worker needs it at start.
    pub fn snapshot(&self) -> ServerEvent {
        ServerEvent::Snapshot(
            self.members
                .iter()
                .map(|m| (m.upstream.clone(), m.healthy))
                .collect(),
        )
    }

    /// A worker joins the broadcast; the answer is the current list.
    pub fn join(&mut self, worker: WorkerHandles) -> ServerEvent {
        self.workers.push(worker);
        self.snapshot()
    }

    /// Adds a member out of rotation (a server added at runtime waits for its first check).
    pub fn add(&mut self, upstream: Arc<Upstream>) -> Result<(), MembershipError> {
        if self.index.contains_key(&upstream.label) {
            return Err(MembershipError::Duplicate(upstream.label.to_string()));
        }
        self.insert(Member {
            upstream: upstream.clone(),
            healthy: false,
            from_file: false,
        });
        self.broadcast(ServerEvent::Added {
            upstream,
            healthy: false,
        });
        Ok(())
    }

    /// Removes a member; the workers drain it.
    pub fn remove(&mut self, label: &str) -> Result<Member, MembershipError> {
        let i = self
            .index
            .get(label)
            .copied()
            .ok_or_else(|| MembershipError::Unknown(label.to_string()))?;
        let removed = self.members.remove(i);
        self.index.remove(label);
        for slot in self.index.values_mut() {
            if *slot > i {
                *slot -= 1;
            }
        }
        self.broadcast(ServerEvent::Removed {
            label: removed.upstream.label.clone(),
        });
        Ok(removed)
    }

    /// Puts a member in or out of rotation and tells the workers; false when it already was.
    pub fn set_healthy(&mut self, label: &str, healthy: bool) -> bool {
        let Some(&i) = self.index.get(label) else {
            return false;
        };
        let member = &mut self.members[i];
        if member.healthy == healthy {
            return false;
        }
        member.healthy = healthy;
        let label = member.upstream.label.clone();
        self.broadcast(ServerEvent::Health { label, healthy });
        true
    }

    /// Applies the servers of a reloaded config file: new ones join in rotation, ones gone
    /// from the file drain (servers added through the admin API stay), a new weight applies
    /// at once.
    pub fn reload(&mut self, servers: Vec<Arc<Upstream>>) -> Changes {
        let mut changes = Changes::default();
        let listed: std::collections::HashSet<Arc<str>> =
            servers.iter().map(|u| u.label.clone()).collect();
        for upstream in servers {
            match self.index.get(&upstream.label) {
                Some(&i) => {
                    let member = &mut self.members[i];
                    member.from_file = true;
                    if member.upstream.weight != upstream.weight {
                        member.upstream = upstream.clone();
                        changes.reweighted.push(upstream.clone());
                        self.broadcast(ServerEvent::Reweighted { upstream });
                    }
                }
                None => {
                    self.insert(Member {
                        upstream: upstream.clone(),
                        healthy: true,
                        from_file: true,
                    });
                    changes.added.push(upstream.clone());
                    self.broadcast(ServerEvent::Added {
                        upstream,
                        healthy: true,
                    });
                }
            }
        }
        let gone: Vec<Arc<str>> = self
            .members
            .iter()
            .filter(|m| m.from_file && !listed.contains(&m.upstream.label))
            .map(|m| m.upstream.label.clone())
            .collect();
        for label in gone {
            if let Ok(member) = self.remove(&label) {
                changes.removed.push(member.upstream);
            }
        }
        changes
    }

    /// Every live worker's balancer changes strategy.
    pub fn rebalance(&mut self, strategy: Strategy) {
        self.forget_stopped();
        for w in &self.workers {
            w.rebalance.do_send(Rebalance(strategy));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn upstream(port: u16) -> Arc<Upstream> {
        Upstream::local(port)
    }

    fn labels(r: &Registry) -> Vec<String> {
        r.members()
            .iter()
            .map(|m| m.upstream.label.to_string())
            .collect()
    }

    #[test]
    fn configured_servers_start_in_rotation_and_added_ones_out_of_it() {
        let mut r = Registry::new([upstream(1), upstream(2)]);
        r.add(upstream(3)).unwrap();
        let healthy: Vec<bool> = r.members().iter().map(|m| m.healthy).collect();
        assert_eq!(healthy, [true, true, false]);
        assert!(matches!(
            r.add(upstream(3)),
            Err(MembershipError::Duplicate(_))
        ));
    }

    #[test]
    fn removing_a_member_keeps_the_others_findable_by_label() {
        let mut r = Registry::new([upstream(1), upstream(2), upstream(3)]);
        r.remove("127.0.0.1:1").unwrap();
        assert_eq!(labels(&r), ["127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!(
            &*r.get("127.0.0.1:3").unwrap().upstream.label,
            "127.0.0.1:3"
        );
        assert!(r.get("127.0.0.1:1").is_none());
        assert!(matches!(
            r.remove("127.0.0.1:1"),
            Err(MembershipError::Unknown(_))
        ));
    }

    #[test]
    fn a_reload_adds_removes_and_reweights_file_servers_and_keeps_admin_ones() {
        let mut r = Registry::new([upstream(1), upstream(2)]);
        r.add(upstream(3)).unwrap();
        let heavy = Arc::new(Upstream::new(&ServerConfig {
            url: "http://127.0.0.1:2".parse().unwrap(),
            weight: 5,
        }));
        let changes = r.reload(vec![heavy, upstream(4)]);
        let names = |v: &[Arc<Upstream>]| v.iter().map(|u| u.label.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&changes.added), ["127.0.0.1:4"]);
        assert_eq!(names(&changes.removed), ["127.0.0.1:1"]);
        assert_eq!(names(&changes.reweighted), ["127.0.0.1:2"]);
        assert_eq!(labels(&r), ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]);
        assert_eq!(r.get("127.0.0.1:2").unwrap().upstream.weight, 5);
        assert!(
            r.get("127.0.0.1:4").unwrap().healthy,
            "a file server starts in rotation"
        );
        // The same file again changes nothing; the admin-added server is never removed.
        let again = r.reload(vec![
            Arc::new(Upstream::new(&ServerConfig {
                url: "http://127.0.0.1:2".parse().unwrap(),
                weight: 5,
            })),
            upstream(4),
        ]);
        assert!(again.added.is_empty() && again.removed.is_empty() && again.reweighted.is_empty());
        assert!(r.get("127.0.0.1:3").is_some());
    }

    #[test]
    fn set_healthy_reports_only_a_change() {
        let mut r = Registry::new([upstream(1)]);
        assert!(!r.set_healthy("127.0.0.1:1", true));
        assert!(r.set_healthy("127.0.0.1:1", false));
        assert!(!r.get("127.0.0.1:1").unwrap().healthy);
        assert!(!r.set_healthy("127.0.0.1:9", false), "unknown: no change");
        let ServerEvent::Snapshot(list) = r.snapshot() else {
            panic!("a snapshot")
        };
        assert_eq!(list.len(), 1);
        assert!(!list[0].1);
    }
}
