//! Balancing strategies: plain types behind one trait, with no actor in sight.
//!
//! The balancer (`BalancerActor`, in `balancer/`) owns, per pool, a list of [`Slot`]s and one
//! `Box<dyn Strategy>`; on every request it asks the strategy for an index among the slots
//! that are usable (in rotation, or every one that is not draining while the pool is in
//! panic, and not already tried by this request), giving it the request's hash key.
//! Strategies keep only their own cursor, weights, table or estimates; they never pick a
//! slot that is not usable. Tables they need (Maglev's) are built when the slots or their
//! rotation change, never per request.

mod consistent;
pub(crate) mod ewma;
pub(crate) mod maglev;
mod peak;

pub use self::{consistent::ConsistentHash, peak::PeakEwmaStrategy};

use std::sync::Arc;

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::{config, upstream::Upstream};

/// One server as a worker's balancer sees it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub upstream: Arc<Upstream>,
    /// In rotation by the health checks.
    pub healthy: bool,
    /// Removed through the admin API; kept until its in-flight requests end.
    pub draining: bool,
    /// Taken out for a while after 5xx answers in a row (passive ejection).
    pub ejected: bool,
    /// Requests this worker has sent to it that have not ended yet.
    pub in_flight: u32,
}

impl Slot {
    /// In rotation: healthy, not ejected, not draining.
    pub fn in_rotation(&self) -> bool {
        self.healthy && !self.ejected && !self.draining
    }
}

/// Chooses the next server.
pub trait Strategy {
    /// Returns the index of the chosen slot, among those for which `usable` is true, or
    /// `None` when there is none. `key` is the request's hash key (`hash_on`), when the
    /// pool has one and the request carries it.
    fn pick(
        &mut self,
        slots: &[Slot],
        usable: &dyn Fn(usize) -> bool,
        key: Option<u64>,
    ) -> Option<usize>;

    /// Called after a slot was added or removed (indices may have moved).
    fn resize(&mut self, slots: &[Slot]);

    /// Called when which slots are in rotation changed (health, ejection) without the list
    /// changing shape.
    fn rotation_changed(&mut self, _slots: &[Slot]) {}

    /// A request sent to `slot` got its answer's head `rtt` after it was sent.
    fn observe(&mut self, _slot: usize, _rtt: std::time::Duration) {}
}

/// Builds the strategy named in the configuration.
pub fn from_config(strategy: config::Strategy) -> Box<dyn Strategy> {
    match strategy {
        config::Strategy::RoundRobin => Box::new(RoundRobin::default()),
        config::Strategy::WeightedRoundRobin => Box::new(SmoothWeighted::default()),
        config::Strategy::LeastRequests => Box::new(LeastRequests::default()),
        config::Strategy::PowerOfTwo => Box::new(PowerOfTwo::new(SmallRng::from_os_rng())),
        config::Strategy::ConsistentHash => Box::new(ConsistentHash::default()),
        config::Strategy::PeakEwma => Box::new(PeakEwmaStrategy::new(SmallRng::from_os_rng())),
    }
}

/// A round-robin position that survives changes to the list. It remembers the servers by
/// label, so that removing one does not hand the turn to the server just served, and adding
/// one does not skip the server whose turn it was.
#[derive(Debug, Default)]
struct Cursor {
    /// Index of the next server in turn.
    next: usize,
    /// The labels of the list `next` points into, as of the last resize (empty before).
    order: Vec<Arc<str>>,
}

impl Cursor {
    /// Moves the cursor onto the new `slots`: the first server at or after the old position
    /// that is still listed keeps its turn.
    fn resize(&mut self, slots: &[Slot]) {
        let old = std::mem::replace(
            &mut self.order,
            slots.iter().map(|s| s.upstream.label.clone()).collect(),
        );
        self.next = if slots.is_empty() {
            0
        } else if old.is_empty() {
            self.next % slots.len()
        } else {
            (0..old.len())
                .map(|k| &old[(self.next + k) % old.len()])
                .find_map(|label| slots.iter().position(|s| s.upstream.label == *label))
                .unwrap_or(0)
        };
    }
}

/// Every usable server in turn, in list order; weights are ignored.
#[derive(Debug, Default)]
pub struct RoundRobin {
    cursor: Cursor,
}

impl Strategy for RoundRobin {
    fn pick(
        &mut self,
        slots: &[Slot],
        usable: &dyn Fn(usize) -> bool,
        _key: Option<u64>,
    ) -> Option<usize> {
        let n = slots.len();
        let next = self.cursor.next;
        let found = (0..n).map(|i| (next + i) % n).find(|&i| usable(i))?;
        self.cursor.next = (found + 1) % n;
        Some(found)
    }

    fn resize(&mut self, slots: &[Slot]) {
        self.cursor.resize(slots);
    }
}

/// nginx's smooth weighted round robin: weights 5,1,1 give `a a b a c a a`, never a burst.
///
/// Each pick adds every usable server's weight to its running score, takes the highest
/// (the first one on ties, as nginx does) and subtracts the total from the winner.
/// When the set of servers in rotation changes (a health change, a server added, removed or
/// draining), every score starts again from zero, so the left-over credit of one server
/// cannot turn into a burst. A server skipped only because this request already tried it
/// is not a change: restarting then would hand the first server an extra turn per retry.
#[derive(Debug, Default)]
pub struct SmoothWeighted {
    current: Vec<i64>,
    /// Which slots were in rotation (healthy, not draining) when the scores last restarted.
    in_rotation: Vec<bool>,
}

impl SmoothWeighted {
    fn in_rotation(slot: &Slot) -> bool {
        slot.in_rotation()
    }

    /// Starts every score from zero and records the rotation it starts for.
    fn restart(&mut self, slots: &[Slot]) {
        self.current.clear();
        self.current.resize(slots.len(), 0);
        self.in_rotation.clear();
        self.in_rotation.extend(slots.iter().map(Self::in_rotation));
    }
}

impl Strategy for SmoothWeighted {
    fn pick(
        &mut self,
        slots: &[Slot],
        usable: &dyn Fn(usize) -> bool,
        _key: Option<u64>,
    ) -> Option<usize> {
        // The rotation is read from the slots, not from `usable`, which also leaves out the
        // servers this request already tried.
        if self.current.len() != slots.len()
            || self.in_rotation.len() != slots.len()
            || slots
                .iter()
                .zip(&self.in_rotation)
                .any(|(s, &was)| Self::in_rotation(s) != was)
        {
            self.restart(slots);
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, slot) in slots.iter().enumerate() {
            if !usable(i) {
                continue;
            }
            let w = i64::from(slot.upstream.weight);
            self.current[i] += w;
            total += w;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
    }

    fn resize(&mut self, slots: &[Slot]) {
        // nginx starts every score from zero when the peer list changes.
        self.restart(slots);
    }
}

/// The usable server with the fewest in-flight requests; ties go round robin.
#[derive(Debug, Default)]
pub struct LeastRequests {
    cursor: Cursor,
}

impl Strategy for LeastRequests {
    fn pick(
        &mut self,
        slots: &[Slot],
        usable: &dyn Fn(usize) -> bool,
        _key: Option<u64>,
    ) -> Option<usize> {
        let n = slots.len();
        let next = self.cursor.next;
        let mut best: Option<usize> = None;
        // Scanning from the cursor makes the first of several equals the next in turn.
        for i in (0..n).map(|i| (next + i) % n) {
            if usable(i) && best.is_none_or(|b| slots[i].in_flight < slots[b].in_flight) {
                best = Some(i);
            }
        }
        let best = best?;
        self.cursor.next = (best + 1) % n;
        Some(best)
    }

    fn resize(&mut self, slots: &[Slot]) {
        self.cursor.resize(slots);
    }
}

/// Envoy's power of two choices: two distinct servers drawn at random (by weight), the one
/// with fewer in-flight requests wins.
#[derive(Debug)]
pub struct PowerOfTwo {
    rng: SmallRng,
}

impl PowerOfTwo {
    /// A strategy drawing from `rng` (seeded, in tests, for repeatable draws).
    pub fn new(rng: SmallRng) -> Self {
        Self { rng }
    }

    /// Draws one usable index by weight, leaving out `except`.
    pub(crate) fn draw(
        &mut self,
        slots: &[Slot],
        usable: &dyn Fn(usize) -> bool,
        except: Option<usize>,
    ) -> Option<usize> {
        let eligible = |i: usize| usable(i) && Some(i) != except;
        let total: u64 = (0..slots.len())
            .filter(|&i| eligible(i))
            .map(|i| u64::from(slots[i].upstream.weight))
            .sum();
        if total == 0 {
            return None;
        }
        let mut ticket = self.rng.random_range(0..total);
        for i in (0..slots.len()).filter(|&i| eligible(i)) {
            let w = u64::from(slots[i].upstream.weight);
            if ticket < w {
                return Some(i);
            }
            ticket -= w;
        }
        None
    }
}

impl Strategy for PowerOfTwo {
    fn pick(
        &mut self,
        slots: &[Slot],
        usable: &dyn Fn(usize) -> bool,
        _key: Option<u64>,
    ) -> Option<usize> {
        let first = self.draw(slots, usable, None)?;
        let Some(second) = self.draw(slots, usable, Some(first)) else {
            return Some(first);
        };
        if slots[second].in_flight < slots[first].in_flight {
            Some(second)
        } else {
            Some(first)
        }
    }

    fn resize(&mut self, _slots: &[Slot]) {}
}

/// Slots for tests: `http://10.0.0.1:PORT` for each port, weight 1, all in rotation.
#[cfg(test)]
pub(crate) fn test_slots(ports: impl IntoIterator<Item = u16>) -> Vec<Slot> {
    ports
        .into_iter()
        .map(|port| Slot {
            upstream: Arc::new(Upstream::new(
                crate::config::DEFAULT_POOL,
                &crate::config::ServerConfig {
                    url: format!("http://10.0.0.1:{port}").parse().unwrap(),
                    weight: 1,
                },
            )),
            healthy: true,
            draining: false,
            ejected: false,
            in_flight: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn slots(weights: &[u32]) -> Vec<Slot> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Slot {
                upstream: Arc::new(Upstream::new(
                    "default",
                    &ServerConfig {
                        url: url::Url::parse(&format!("http://127.0.0.1:{}", 5000 + i)).unwrap(),
                        weight,
                    },
                )),
                healthy: true,
                draining: false,
                ejected: false,
                in_flight: 0,
            })
            .collect()
    }

    fn run(s: &mut dyn Strategy, slots: &[Slot], n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| s.pick(slots, &|i| slots[i].healthy, None).unwrap())
            .collect()
    }

    #[test]
    fn round_robin_cycles_in_list_order() {
        let s = slots(&[1, 5, 1]);
        assert_eq!(run(&mut RoundRobin::default(), &s, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_skips_unusable_servers_and_keeps_its_cycle() {
        let mut s = slots(&[1, 1, 1]);
        let mut rr = RoundRobin::default();
        assert_eq!(run(&mut rr, &s, 1), [0]);
        s[1].healthy = false;
        assert_eq!(run(&mut rr, &s, 4), [2, 0, 2, 0]);
        s[1].healthy = true;
        assert_eq!(run(&mut rr, &s, 3), [1, 2, 0]);
        s.iter_mut().for_each(|s| s.healthy = false);
        assert_eq!(rr.pick(&s, &|i| s[i].healthy, None), None);
    }

    #[test]
    fn smooth_weighted_spreads_5_1_1_as_nginx_does() {
        let s = slots(&[5, 1, 1]);
        let order = run(&mut SmoothWeighted::default(), &s, 7);
        assert_eq!(order, [0, 0, 1, 0, 2, 0, 0]);
        let many = run(&mut SmoothWeighted::default(), &s, 70);
        let count = |k| many.iter().filter(|&&i| i == k).count();
        assert_eq!((count(0), count(1), count(2)), (50, 10, 10));
    }

    #[test]
    fn smooth_weighted_keeps_shares_among_the_usable_after_a_health_change() {
        let mut s = slots(&[5, 1, 1]);
        let mut w = SmoothWeighted::default();
        run(&mut w, &s, 3);
        s[0].healthy = false;
        let order = run(&mut w, &s, 10);
        assert_eq!(order.iter().filter(|&&i| i == 1).count(), 5);
        assert!(!order.contains(&0));
    }

    #[test]
    fn round_robin_keeps_the_turn_of_the_next_server_when_one_is_removed() {
        let mut s = slots(&[1, 1, 1]);
        let mut rr = RoundRobin::default();
        rr.resize(&s);
        assert_eq!(run(&mut rr, &s, 2), [0, 1]);
        // The first server leaves: the third (now second) was next, and still is.
        let third = s[2].upstream.clone();
        s.remove(0);
        rr.resize(&s);
        let order = run(&mut rr, &s, 3);
        assert!(Arc::ptr_eq(&s[order[0]].upstream, &third));
        assert_eq!(order, [1, 0, 1]);
        // The server whose turn it is leaves: the one after it takes the turn.
        let mut s = slots(&[1, 1, 1]);
        rr = RoundRobin::default();
        rr.resize(&s);
        assert_eq!(run(&mut rr, &s, 1), [0]);
        s.remove(1);
        rr.resize(&s);
        assert_eq!(run(&mut rr, &s, 2), [1, 0]);
    }

    #[test]
    fn smooth_weighted_restarts_after_a_health_change_even_once_resized() {
        // As the balancer drives it: a resize first, then picks.
        let mut s = slots(&[5, 1, 1]);
        let mut w = SmoothWeighted::default();
        w.resize(&s);
        assert_eq!(run(&mut w, &s, 3), [0, 0, 1]);
        s[1].healthy = false;
        assert_eq!(run(&mut w, &s, 6), [0, 0, 0, 2, 0, 0]);
        s[1].healthy = true;
        assert_eq!(run(&mut w, &s, 7), [0, 0, 1, 0, 2, 0, 0]);
        // Removing a server resizes; the scores restart over the shorter list.
        s.remove(0);
        w.resize(&s);
        assert_eq!(run(&mut w, &s, 4), [0, 1, 0, 1]);
        // Draining takes a server out of rotation like a failed check does.
        s[0].draining = true;
        let usable = |i: usize| s[i].healthy && !s[i].draining;
        assert_eq!(w.pick(&s, &usable, None), Some(1));
    }

    #[test]
    fn smooth_weighted_does_not_restart_for_a_retry() {
        let s = slots(&[1, 1, 1]);
        let mut w = SmoothWeighted::default();
        w.resize(&s);
        assert_eq!(run(&mut w, &s, 1), [0]);
        // A retry that must avoid server 1 goes on with the cycle instead of starting it
        // again at server 0; the next ordinary pick takes the one left out.
        assert_eq!(w.pick(&s, &|i| i != 1, None), Some(2));
        assert_eq!(run(&mut w, &s, 1), [1]);
    }

    #[test]
    fn least_requests_prefers_the_idlest_and_breaks_ties_round_robin() {
        let mut s = slots(&[1, 1, 1]);
        let mut lr = LeastRequests::default();
        assert_eq!(run(&mut lr, &s, 3), [0, 1, 2]);
        s[0].in_flight = 3;
        s[1].in_flight = 1;
        s[2].in_flight = 2;
        assert_eq!(run(&mut lr, &s, 2), [1, 1]);
    }

    #[test]
    fn power_of_two_picks_the_less_loaded_of_two_and_spreads_evenly() {
        let mut s = slots(&[1, 1]);
        s[0].in_flight = 10;
        let mut p2 = PowerOfTwo::new(SmallRng::seed_from_u64(7));
        assert_eq!(run(&mut p2, &s, 20), vec![1; 20]);

        let s = slots(&[1, 1, 1, 1]);
        let picks = run(&mut p2, &s, 4000);
        for k in 0..4 {
            let c = picks.iter().filter(|&&i| i == k).count();
            assert!((800..1200).contains(&c), "server {k} got {c} of 4000");
        }
    }

    #[test]
    fn power_of_two_draws_by_weight() {
        let s = slots(&[3, 1]);
        let mut p2 = PowerOfTwo::new(SmallRng::seed_from_u64(1));
        // With equal load the first drawn wins, so the shares follow the weights.
        let picks = run(&mut p2, &s, 4000);
        let heavy = picks.iter().filter(|&&i| i == 0).count();
        assert!((2700..3300).contains(&heavy), "weight 3 of 4 got {heavy}");
    }

    #[test]
    fn strategies_never_pick_an_unusable_server() {
        let s = slots(&[2, 1, 1]);
        for name in [
            config::Strategy::RoundRobin,
            config::Strategy::WeightedRoundRobin,
            config::Strategy::LeastRequests,
            config::Strategy::PowerOfTwo,
            config::Strategy::ConsistentHash,
            config::Strategy::PeakEwma,
        ] {
            let mut st = from_config(name);
            for _ in 0..50 {
                assert_ne!(st.pick(&s, &|i| i != 1, None), Some(1), "{name:?}");
            }
            assert_eq!(st.pick(&s, &|_| false, None), None, "{name:?}");
        }
    }
}
