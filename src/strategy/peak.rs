//! `peak_ewma`: Linkerd's balancer. Each server's cost is a peak-sensitive moving average
//! of its time to the response head ([`super::ewma::PeakEwma`]) times its requests in
//! flight plus one; two distinct servers are drawn at random (by weight) and the cheaper
//! wins. A server that becomes slow loses its traffic within a second or two; the average
//! of one that gets no request decays, so it is tried again.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rand::rngs::SmallRng;

use super::{ewma::PeakEwma, PowerOfTwo, Slot, Strategy};

/// How fast an estimate forgets (Linkerd's default).
const DECAY: Duration = Duration::from_secs(10);
/// A first server's estimate before it has answered.
const FIRST_RTT: Duration = Duration::from_millis(1);

/// Power of two choices by peak-EWMA cost.
#[derive(Debug)]
pub struct PeakEwmaStrategy {
    /// Draws the two candidates.
    draw: PowerOfTwo,
    /// Per slot, with the label it belongs to (kept across a resize by label).
    estimates: Vec<(Arc<str>, PeakEwma)>,
}

impl PeakEwmaStrategy {
    pub fn new(rng: SmallRng) -> Self {
        Self {
            draw: PowerOfTwo::new(rng),
            estimates: Vec::new(),
        }
    }
}

impl Strategy for PeakEwmaStrategy {
    fn pick(
        &mut self,
        slots: &[Slot],
        usable: &dyn Fn(usize) -> bool,
        _key: Option<u64>,
    ) -> Option<usize> {
        let first = self.draw.draw(slots, usable, None)?;
        let Some(second) = self.draw.draw(slots, usable, Some(first)) else {
            return Some(first);
        };
        let now = Instant::now();
        let cost = |i: usize| {
            self.estimates
                .get(i)
                .map_or(0.0, |(_, e)| e.cost(slots[i].in_flight, now))
        };
        Some(if cost(second) < cost(first) {
            second
        } else {
            first
        })
    }

    fn resize(&mut self, slots: &[Slot]) {
        let now = Instant::now();
        // A server new to the list starts at the others' mean: not so low that it takes
        // every request until its first answer, not so high that it waits for the decay.
        let known: Vec<f64> = self
            .estimates
            .iter()
            .map(|(_, e)| e.estimate(now).as_secs_f64())
            .collect();
        let start = if known.is_empty() {
            FIRST_RTT
        } else {
            Duration::from_secs_f64(known.iter().sum::<f64>() / known.len() as f64)
        };
        let mut old = std::mem::take(&mut self.estimates);
        self.estimates = slots
            .iter()
            .map(|s| {
                let label = &s.upstream.label;
                match old.iter().position(|(l, _)| l == label) {
                    Some(i) => old.swap_remove(i),
                    None => (label.clone(), PeakEwma::new(start, DECAY, now)),
                }
            })
            .collect();
    }

    fn observe(&mut self, slot: usize, rtt: Duration) {
        if let Some((_, e)) = self.estimates.get_mut(slot) {
            e.observe(rtt, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::{super::test_slots, *};

    fn slots(n: u16) -> Vec<Slot> {
        test_slots(1..=n)
    }

    #[test]
    fn a_slow_server_loses_its_traffic_and_a_fast_one_keeps_it() {
        let s = slots(3);
        let mut p = PeakEwmaStrategy::new(SmallRng::seed_from_u64(5));
        p.resize(&s);
        let mut to_slow = 0;
        for n in 0..600 {
            let i = p.pick(&s, &|_| true, None).unwrap();
            let rtt = if i == 0 { 150 } else { 1 };
            p.observe(i, Duration::from_millis(rtt));
            if n >= 100 && i == 0 {
                to_slow += 1;
            }
        }
        assert!(
            to_slow * 100 <= 15 * 500,
            "the slow server got {to_slow} of 500"
        );
    }

    #[test]
    fn estimates_follow_their_servers_through_a_resize_and_a_new_one_starts_at_the_mean() {
        let s = slots(2);
        let mut p = PeakEwmaStrategy::new(SmallRng::seed_from_u64(1));
        p.resize(&s);
        p.observe(0, Duration::from_millis(100));
        p.observe(1, Duration::from_millis(1));
        let three = slots(3);
        let reordered = vec![three[2].clone(), three[1].clone(), three[0].clone()];
        p.resize(&reordered);
        let now = Instant::now();
        let est = |i: usize| p.estimates[i].1.estimate(now).as_secs_f64() * 1000.0;
        assert!(est(2) > 90.0 && est(1) < 2.0, "kept by label");
        assert!((40.0..=52.0).contains(&est(0)), "the mean: {}", est(0));
    }
}
