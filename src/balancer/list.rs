//! One pool's [`ServerList`] as a worker's balancer keeps it: servers, their health as last
//! broadcast, in-flight counts, the strategy's cursor, panic and failure counts. A plain
//! struct, no actor, no lock: unit-tested as it is.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{Outcome, ServerState, ServerView};
use crate::{
    sticky::ServerId,
    strategy::{self, Slot, Strategy},
    upstream::Upstream,
};

/// One pool's servers, their health as last broadcast, and the strategy's cursor.
pub struct ServerList {
    slots: Vec<Slot>,
    /// Label → index in `slots`; rebuilt whenever the list changes shape. Read on every
    /// request's end: a fast hash.
    index: HashMap<Arc<str>, usize, foldhash::fast::RandomState>,
    strategy: Box<dyn Strategy>,
    kind: crate::config::Strategy,
    /// Gone from the configuration: shown as draining; requests routed to it by an older
    /// route table are still served until its servers go.
    pub(super) retired: bool,
    /// Percent of servers in rotation below which every server not draining is used.
    pub(super) panic_threshold: u8,
    /// Below `panic_threshold` now.
    panic: bool,
    /// Failures (5xx, failed connections, time-outs) in a row that this worker reports for
    /// ejection; 0: none.
    pub(super) eject_after: u32,
    /// Per slot: failures in a row, this worker's count.
    failures: Vec<u32>,
}

impl ServerList {
    /// An empty list balanced by `kind`.
    pub fn new(kind: crate::config::Strategy) -> Self {
        Self {
            slots: Vec::new(),
            index: HashMap::default(),
            strategy: strategy::from_config(kind),
            kind,
            retired: false,
            panic_threshold: 0,
            panic: false,
            eject_after: 0,
            failures: Vec::new(),
        }
    }

    /// Which servers are in rotation changed: the strategy's tables follow, and whether
    /// the pool is in panic is worked out again.
    pub(super) fn rotation_changed(&mut self) {
        self.strategy.rotation_changed(&self.slots);
        self.panic = in_panic(&self.slots, self.panic_threshold);
    }

    fn position(&self, label: &str) -> Option<usize> {
        self.index.get(label).copied()
    }

    /// After an insertion or removal: indices moved, the strategy's cursor follows.
    fn reshaped(&mut self) {
        let old: HashMap<Arc<str>, u32> = self
            .index
            .iter()
            .filter_map(|(l, &i)| self.failures.get(i).map(|&f| (l.clone(), f)))
            .collect();
        self.index = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.upstream.label.clone(), i))
            .collect();
        self.failures = self
            .slots
            .iter()
            .map(|s| old.get(&s.upstream.label).copied().unwrap_or(0))
            .collect();
        self.strategy.resize(&self.slots);
        self.panic = in_panic(&self.slots, self.panic_threshold);
    }

    /// The whole list with each server's health; replaces what the list had, keeping the
    /// in-flight counts of servers that stay and draining those that leave.
    pub fn snapshot(&mut self, servers: Vec<ServerState>) {
        let mut next: Vec<Slot> = servers
            .into_iter()
            .map(|s| {
                let in_flight = self
                    .position(&s.upstream.label)
                    .map_or(0, |i| self.slots[i].in_flight);
                Slot {
                    upstream: s.upstream,
                    healthy: s.healthy,
                    draining: false,
                    ejected: s.ejected,
                    in_flight,
                }
            })
            .collect();
        let listed: HashSet<Arc<str>> = next.iter().map(|s| s.upstream.label.clone()).collect();
        for old in self.slots.drain(..) {
            if old.in_flight > 0 && !listed.contains(&old.upstream.label) {
                next.push(Slot {
                    draining: true,
                    ..old
                });
            }
        }
        self.slots = next;
        self.reshaped();
    }

    /// A server went in or out of rotation.
    pub fn set_health(&mut self, label: &str, healthy: bool) {
        if let Some(i) = self.position(label) {
            self.slots[i].healthy = healthy;
            self.rotation_changed();
        }
    }

    /// A server was ejected for its failures, or came back.
    pub fn set_ejected(&mut self, label: &str, ejected: bool) {
        if let Some(i) = self.position(label) {
            self.slots[i].ejected = ejected;
            if let Some(f) = self.failures.get_mut(i) {
                *f = 0;
            }
            self.rotation_changed();
        }
    }

    /// A server joined (at runtime, or by a reload).
    pub fn add(&mut self, upstream: Arc<Upstream>, healthy: bool) {
        match self.position(&upstream.label) {
            // Re-added while still draining: it simply stays.
            Some(i) => {
                let slot = &mut self.slots[i];
                slot.upstream = upstream;
                slot.healthy = healthy;
                slot.draining = false;
                self.rotation_changed();
            }
            None => {
                self.slots.push(Slot {
                    upstream,
                    healthy,
                    draining: false,
                    ejected: false,
                    in_flight: 0,
                });
                self.reshaped();
            }
        }
    }

    /// A server's weight changed (a reload).
    pub fn reweight(&mut self, upstream: Arc<Upstream>) {
        if let Some(i) = self.position(&upstream.label) {
            self.slots[i].upstream = upstream;
            // nginx starts the weighted scores again when the peers change.
            self.strategy.resize(&self.slots);
        }
    }

    /// A server was removed: no new requests; gone once its in-flight ones end.
    pub fn remove(&mut self, label: &str) {
        if let Some(i) = self.position(label) {
            if self.slots[i].in_flight == 0 {
                self.slots.remove(i);
                self.reshaped();
            } else {
                self.slots[i].draining = true;
                self.rotation_changed();
            }
        }
    }

    /// Every server drains (the pool is gone).
    pub(super) fn drain_all(&mut self) {
        self.slots.retain(|s| s.in_flight > 0);
        for slot in &mut self.slots {
            slot.draining = true;
        }
        self.reshaped();
    }

    /// Chooses the server for a request, skipping those in `tried`, and counts the request
    /// in flight there: the server `sticky` names when it may be used, else the strategy's
    /// pick for `key`. In panic (fewer servers in rotation than `panic_threshold`), every
    /// server that is not draining may be used.
    pub fn begin(
        &mut self,
        tried: &[Arc<Upstream>],
        key: Option<u64>,
        sticky: Option<ServerId>,
    ) -> Option<Arc<Upstream>> {
        let slots = &self.slots;
        let panic = self.panic;
        let usable = |i: usize| {
            let s = &slots[i];
            (s.in_rotation() || (panic && !s.draining))
                && !tried.iter().any(|t| t.label == s.upstream.label)
        };
        let stuck = sticky.and_then(|id| {
            (0..slots.len()).find(|&i| slots[i].upstream.sticky_id == id && usable(i))
        });
        let i = match stuck {
            Some(i) => i,
            None => self.strategy.pick(slots, &usable, key)?,
        };
        let slot = &mut self.slots[i];
        slot.in_flight += 1;
        Some(slot.upstream.clone())
    }

    /// A request on `label` ended so; a draining server goes once its last one has. Returns
    /// true when its failures in a row reached the pool's `eject_after_5xx`: the caller
    /// reports it for ejection.
    pub fn end(&mut self, label: &str, outcome: Outcome) -> bool {
        // By label, not by `Arc`: a server removed and added back while this request was in
        // flight keeps its slot (and count) under a new `Upstream`; labels are unique here.
        let Some(i) = self.position(label) else {
            return false;
        };
        if let Some(rtt) = outcome.head_time {
            self.strategy.observe(i, rtt);
        }
        let mut eject = false;
        if self.eject_after > 0 {
            let failures = &mut self.failures[i];
            if outcome.failed || outcome.status.is_some_and(|s| s >= 500) {
                *failures += 1;
                if *failures >= self.eject_after {
                    *failures = 0;
                    eject = !self.slots[i].ejected;
                }
            } else if outcome.status.is_some() {
                *failures = 0;
            }
        }
        let slot = &mut self.slots[i];
        slot.in_flight = slot.in_flight.saturating_sub(1);
        if slot.draining && slot.in_flight == 0 {
            self.slots.remove(i);
            self.reshaped();
        }
        eject
    }

    /// Balances by `kind` from now on (the cursor starts again when it changes).
    pub fn set_strategy(&mut self, kind: crate::config::Strategy) {
        if kind != self.kind {
            let mut strategy = strategy::from_config(kind);
            strategy.resize(&self.slots);
            self.strategy = strategy;
            self.kind = kind;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// This worker's view of every server, draining ones included.
    pub fn views(&self) -> impl Iterator<Item = ServerView> + '_ {
        self.slots.iter().map(|s| ServerView {
            upstream: s.upstream.clone(),
            healthy: s.healthy && !s.ejected,
            draining: s.draining || self.retired,
            ejected: s.ejected,
            in_flight: s.in_flight,
        })
    }
}

/// Whether fewer of `slots` (those not draining) are in rotation than `threshold` percent.
fn in_panic(slots: &[Slot], threshold: u8) -> bool {
    let total = slots.iter().filter(|s| !s.draining).count();
    let in_rotation = slots.iter().filter(|s| s.in_rotation()).count();
    total > 0 && in_rotation * 100 < usize::from(threshold) * total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Strategy as Kind;

    fn upstream(port: u16) -> Arc<Upstream> {
        Upstream::local(port)
    }

    fn up(upstream: Arc<Upstream>) -> ServerState {
        ServerState {
            upstream,
            healthy: true,
            ejected: false,
        }
    }

    fn list_of(ports: &[u16]) -> ServerList {
        let mut list = ServerList::new(Kind::RoundRobin);
        list.snapshot(ports.iter().map(|&p| up(upstream(p))).collect());
        list
    }

    fn ports(list: &ServerList) -> Vec<u16> {
        list.views()
            .map(|v| v.upstream.url.port().unwrap())
            .collect()
    }

    #[test]
    fn requests_go_round_and_skip_the_servers_already_tried() {
        let mut list = list_of(&[1, 2, 3]);
        let picked: Vec<u16> = (0..4)
            .map(|_| list.begin(&[], None, None).unwrap().url.port().unwrap())
            .collect();
        assert_eq!(picked, [1, 2, 3, 1]);
        let tried = [upstream(2)];
        assert_eq!(list.begin(&tried, None, None).unwrap().url.port(), Some(3));
    }

    #[test]
    fn a_removed_server_drains_and_goes_with_its_last_request() {
        let mut list = list_of(&[1, 2]);
        let first = list.begin(&[], None, None).unwrap();
        list.remove(&first.label);
        assert_eq!(
            ports(&list),
            [1, 2],
            "still listed while a request is in flight"
        );
        assert!(list.views().next().unwrap().draining);
        assert_eq!(
            list.begin(&[], None, None).unwrap().url.port(),
            Some(2),
            "no new requests"
        );
        list.end(&first.label, Outcome::default());
        assert_eq!(ports(&list), [2]);
    }

    #[test]
    fn a_snapshot_keeps_the_counts_of_servers_that_stay_and_drains_those_that_leave() {
        let mut list = list_of(&[1, 2]);
        let one = list.begin(&[], None, None).unwrap();
        let two = list.begin(&[], None, None).unwrap();
        list.snapshot(vec![up(upstream(2))]);
        let views: Vec<ServerView> = list.views().collect();
        assert_eq!(ports(&list), [2, 1]);
        assert_eq!((views[0].in_flight, views[0].draining), (1, false));
        assert_eq!((views[1].in_flight, views[1].draining), (1, true));
        list.end(&one.label, Outcome::default());
        list.end(&two.label, Outcome::default());
        assert_eq!(ports(&list), [2]);
        assert_eq!(list.views().next().unwrap().in_flight, 0);
    }

    #[test]
    fn a_server_re_added_while_draining_stays_in_rotation() {
        let mut list = list_of(&[1]);
        let lease = list.begin(&[], None, None).unwrap();
        list.remove(&lease.label);
        list.add(upstream(1), true);
        list.end(&lease.label, Outcome::default());
        assert_eq!(ports(&list), [1]);
        assert!(!list.views().next().unwrap().draining);
        assert!(list.begin(&[], None, None).is_some());
    }

    #[test]
    fn an_unhealthy_server_gets_nothing_until_it_is_back() {
        let mut list = list_of(&[1]);
        let label = upstream(1).label.clone();
        list.set_health(&label, false);
        assert!(list.begin(&[], None, None).is_none());
        list.set_health(&label, true);
        assert!(list.begin(&[], None, None).is_some());
    }

    #[test]
    fn a_pool_below_its_panic_threshold_uses_every_server_not_draining() {
        let mut list = list_of(&[1, 2, 3, 4]);
        list.panic_threshold = 50;
        for port in [2, 3, 4] {
            list.set_health(&upstream(port).label, false);
        }
        let picked: Vec<u16> = (0..4)
            .map(|_| list.begin(&[], None, None).unwrap().url.port().unwrap())
            .collect();
        assert_eq!(picked, [1, 2, 3, 4], "in panic: all of them");
        list.set_health(&upstream(2).label, true);
        let picked: Vec<u16> = (0..4)
            .map(|_| list.begin(&[], None, None).unwrap().url.port().unwrap())
            .collect();
        assert_eq!(picked, [1, 2, 1, 2], "half in rotation: out of panic");
    }

    #[test]
    fn failures_in_a_row_are_reported_once_and_an_answer_resets_the_count() {
        let mut list = list_of(&[1]);
        list.eject_after = 3;
        let label = upstream(1).label.clone();
        let fail = Outcome {
            status: Some(503),
            failed: false,
            head_time: None,
        };
        let ok = Outcome {
            status: Some(404),
            ..fail
        };
        let gone = Outcome::default();
        for outcome in [fail, fail, ok, fail, gone, fail] {
            list.begin(&[], None, None);
            assert!(!list.end(&label, outcome), "not three in a row yet");
        }
        list.begin(&[], None, None);
        let timeout = Outcome {
            status: None,
            failed: true,
            head_time: None,
        };
        assert!(list.end(&label, timeout), "the third failure in a row");
        list.set_ejected(&label, true);
        assert!(
            list.begin(&[], None, None).is_none(),
            "ejected: out of rotation"
        );
        assert!(!list.views().next().unwrap().healthy);
        list.set_ejected(&label, false);
        assert!(list.begin(&[], None, None).is_some());
    }

    #[test]
    fn a_sticky_id_picks_its_server_while_it_may_be_used() {
        let mut list = list_of(&[1, 2, 3]);
        let two = upstream(2);
        let id = Some(two.sticky_id);
        for _ in 0..3 {
            assert_eq!(list.begin(&[], None, id).unwrap().url.port(), Some(2));
        }
        assert_ne!(
            list.begin(std::slice::from_ref(&two), None, id)
                .unwrap()
                .url
                .port(),
            Some(2),
            "tried"
        );
        list.set_health(&two.label, false);
        assert_ne!(
            list.begin(&[], None, id).unwrap().url.port(),
            Some(2),
            "out of rotation"
        );
    }
}
