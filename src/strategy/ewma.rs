//! Peak-EWMA: one server's estimated response time, which jumps up at once on a slow answer
//! and comes down only gradually, and the cost a balancer compares to pick between servers.
//!
//! Follows tower's `tower::load::peak_ewma` (itself from Finagle's `PeakEwma`, the load
//! measure of Linkerd's balancer): cost = estimate × (requests in flight + 1), two servers
//! drawn at random, the cheaper wins. The estimate is in nanoseconds of time to the response
//! head. Time is a parameter everywhere, so callers (and tests) own the clock.
//!
//! One difference from tower: there, reading the load moves the estimate (it decays it and
//! restarts its clock), so the weight a later answer gets depends on how often the load was
//! read. Here [`PeakEwma::cost`] only reads, and the estimate at any instant is a function
//! of the answers observed and their times alone.

use std::time::{Duration, Instant};

/// A server's peak-sensitive moving average of response time.
#[derive(Debug, Clone)]
pub(crate) struct PeakEwma {
    /// Nanoseconds, as of `at`; it decays from then on.
    estimate: f64,
    /// When `estimate` was last set: construction or the last observed answer.
    at: Instant,
    /// The time constant, in nanoseconds: after this long without an answer the estimate is
    /// down to 1/e of itself, and an answer this long after the previous one weighs 1 - 1/e.
    decay: f64,
}

impl PeakEwma {
    /// A server with no answer yet: its estimate starts at `default_rtt`, so a new server
    /// is not flooded before its first answer says how fast it is, and decays from `now`, so
    /// a default above what the other servers answer in does not keep it out for good.
    /// `decay` is the time constant (Linkerd uses 10 s, with a 30 ms default).
    pub(crate) fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate: nanos(default_rtt),
            at: now,
            // A zero decay would make 0 / 0 of an answer observed at `at`.
            decay: nanos(decay).max(1.0),
        }
    }

    /// Takes an answer's time to its response head, `rtt`, observed at `now`. Slower than the
    /// current estimate: the estimate becomes `rtt` (the peak). Otherwise it moves toward
    /// `rtt` by the share 1 - exp(-elapsed / decay) of the way, elapsed since the last answer
    /// (or since [`PeakEwma::new`]).
    pub(crate) fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = nanos(rtt);
        let kept = self.kept(now);
        // The peak is judged against the estimate as `cost` sees it now, decayed for the
        // time without an answer.
        self.estimate = if rtt > self.estimate * kept {
            rtt
        } else {
            self.estimate * kept + rtt * (1.0 - kept)
        };
        // Never back: an answer timed before the last one must not stretch the next decay.
        self.at = self.at.max(now);
    }

    /// The estimate at `now` times `in_flight + 1`: what a balancer compares, lower is
    /// better. In nanoseconds; only comparable between estimators of one balancer.
    ///
    /// Between answers the estimate decays toward zero (as tower's does), not toward the
    /// default: only a target below every busy server's cost makes sure that a server which
    /// lost its traffic (it was slow, so nothing is observed any more) becomes the cheaper
    /// one again and is tried, however fast the others are. With a 10 s decay, a server 150
    /// times slower than the others is tried again after about 10 s × ln 150 = 50 s; if it
    /// is still slow, that one answer puts it back at its peak.
    pub(crate) fn cost(&self, in_flight: u32, now: Instant) -> f64 {
        self.estimate * self.kept(now) * f64::from(in_flight.saturating_add(1))
    }

    /// The estimated response time at `now` (for the status page and tests).
    pub(crate) fn estimate(&self, now: Instant) -> Duration {
        // `as` saturates: a NaN or negative cannot arise, an absurd estimate caps.
        Duration::from_nanos((self.estimate * self.kept(now)).round() as u64)
    }

    /// The share of the estimate still standing at `now`: exp(-elapsed / decay).
    fn kept(&self, now: Instant) -> f64 {
        // An answer timed before the last one (two ends handled out of order) counts as
        // simultaneous with it.
        let elapsed = nanos(now.saturating_duration_since(self.at));
        (-elapsed / self.decay).exp()
    }
}

/// Exact below 2^53 ns (104 days).
fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

#[cfg(test)]
mod tests {
    use std::{cmp::Reverse, collections::BinaryHeap};

    use rand::{rngs::SmallRng, Rng, SeedableRng};

    use super::*;

    const MS: Duration = Duration::from_millis(1);
    /// Linkerd's defaults.
    const DEFAULT_RTT: Duration = Duration::from_millis(30);
    const DECAY: Duration = Duration::from_secs(10);

    /// A balancer over simulated servers: requests arrive at a fixed rate, each goes to the
    /// cheaper of two distinct servers drawn at random, and its answer is observed when the
    /// server's latency at that moment has passed.
    struct Sim {
        start: Instant,
        now: Instant,
        estimators: Vec<PeakEwma>,
        in_flight: Vec<u32>,
        /// Answers not yet observed: (when, server, rtt).
        pending: BinaryHeap<Reverse<(Instant, usize, Duration)>>,
        rng: SmallRng,
        /// Every pick: (seconds since the start, server).
        picks: Vec<(f64, usize)>,
    }

    impl Sim {
        fn new(servers: usize) -> Self {
            let start = Instant::now();
            Self {
                start,
                now: start,
                estimators: vec![PeakEwma::new(DEFAULT_RTT, DECAY, start); servers],
                in_flight: vec![0; servers],
                pending: BinaryHeap::new(),
                rng: SmallRng::seed_from_u64(23),
                picks: Vec::new(),
            }
        }

        /// Sends `rate` requests a second until `until` seconds from the start; `latency`
        /// gives a server's latency at a second.
        fn run(&mut self, rate: u32, until: f64, latency: impl Fn(usize, f64) -> Duration) {
            let gap = Duration::from_secs(1) / rate;
            while self.now < self.start + Duration::from_secs_f64(until) {
                self.now += gap;
                self.observe_answers();
                let server = self.pick();
                let at = (self.now - self.start).as_secs_f64();
                // ±10% of jitter, as real servers have.
                let rtt = latency(server, at).mul_f64(self.rng.random_range(0.9..1.1));
                self.in_flight[server] += 1;
                self.pending.push(Reverse((self.now + rtt, server, rtt)));
                self.picks.push((at, server));
            }
        }

        fn observe_answers(&mut self) {
            while let Some(&Reverse((when, server, rtt))) = self.pending.peek() {
                if when > self.now {
                    break;
                }
                self.pending.pop();
                self.in_flight[server] -= 1;
                self.estimators[server].observe(rtt, when);
            }
        }

        fn pick(&mut self) -> usize {
            let n = self.estimators.len();
            let first = self.rng.random_range(0..n);
            let second = (first + self.rng.random_range(1..n)) % n;
            let cost = |i: usize| self.estimators[i].cost(self.in_flight[i], self.now);
            if cost(second) < cost(first) {
                second
            } else {
                first
            }
        }

        /// The share of the picks from `from` to `to` seconds that went to `server`, and
        /// how many those were.
        fn share(&self, server: usize, from: f64, to: f64) -> (f64, usize) {
            let window: Vec<usize> = self
                .picks
                .iter()
                .filter(|(at, _)| (from..to).contains(at))
                .map(|&(_, s)| s)
                .collect();
            let hits = window.iter().filter(|&&s| s == server).count();
            (hits as f64 / window.len() as f64, hits)
        }
    }

    /// Server 1 answers in 1 ms, then from `slow_from` seconds in 150 ms, until `slow_until`.
    fn slowed(slow_from: f64, slow_until: f64) -> impl Fn(usize, f64) -> Duration {
        move |server, at| {
            if server == 1 && (slow_from..slow_until).contains(&at) {
                150 * MS
            } else {
                MS
            }
        }
    }

    #[test]
    fn a_server_slowed_from_1_ms_to_150_ms_loses_its_traffic_within_3_seconds() {
        let mut sim = Sim::new(2);
        sim.run(200, 5.0, slowed(2.0, f64::INFINITY));
        let (before, _) = sim.share(1, 1.0, 2.0);
        // Two equally fast servers do not split evenly second by second (while one's recent
        // peak is the lower it wins every pick), but each takes a real part.
        assert!(
            (0.1..0.9).contains(&before),
            "before the slowdown: {before:.3}"
        );
        let (during, _) = sim.share(1, 2.0, 5.0);
        assert!(during <= 0.15, "in the 3 s after the slowdown: {during:.3}");
        let (after, _) = sim.share(1, 3.0, 5.0);
        assert!(after <= 0.01, "from 1 s after the slowdown: {after:.3}");
    }

    #[test]
    fn a_server_without_requests_for_a_while_is_tried_again_and_gets_its_share_back() {
        let mut sim = Sim::new(2);
        // Slow for 3 s, then fast again; nothing tells the balancer but a request to it.
        sim.run(200, 90.0, slowed(2.0, 5.0));
        let (out, hits) = sim.share(1, 3.0, 20.0);
        assert!(out < 0.001, "still out: {out:.4} ({hits} requests)");
        // Its estimate (150 ms) decays under the other's (1 ms) after 10 s × ln 150 ≈ 50 s.
        let retried = sim.picks.iter().find(|&&(at, s)| s == 1 && at >= 5.0);
        assert!(
            retried.is_some_and(|&(at, _)| (45.0..60.0).contains(&at)),
            "first tried again at {retried:?}"
        );
        // From there its answers, fast again, win it its part back.
        let (back, _) = sim.share(1, 70.0, 90.0);
        assert!((0.2..0.8).contains(&back), "back in rotation: {back:.3}");
    }

    #[test]
    fn one_slow_answer_raises_the_cost_at_once_and_fast_answers_lower_it_gradually() {
        let start = Instant::now();
        let mut ewma = PeakEwma::new(DEFAULT_RTT, DECAY, start);
        let mut now = start;
        let every = 5 * MS;
        // 100 s: the default's 30 ms has decayed to within 0.2% of the 1 ms answers.
        for _ in 0..20_000 {
            now += every;
            ewma.observe(MS, now);
        }
        let steady = ewma.cost(0, now);
        assert!(
            (steady / 1e6 - 1.0).abs() < 0.05,
            "steady at {steady:.0} ns"
        );

        now += every;
        ewma.observe(100 * MS, now);
        assert_eq!(ewma.estimate(now), 100 * MS);
        assert!(ewma.cost(0, now) > 99.0 * steady);

        let mut last = ewma.cost(0, now);
        for step in 1..=6000 {
            now += every;
            ewma.observe(MS, now);
            let cost = ewma.cost(0, now);
            assert!(cost < last, "fast answers only lower the cost");
            last = cost;
            match step {
                // After 1 s of fast answers: down by only about 1 - exp(-0.1) of the way.
                200 => assert!(ewma.estimate(now) > 90 * MS, "{:?}", ewma.estimate(now)),
                // After 30 s, most of the way back.
                6000 => assert!(ewma.estimate(now) < 7 * MS, "{:?}", ewma.estimate(now)),
                _ => {}
            }
        }
    }

    #[test]
    fn an_idle_estimate_decays_toward_zero_and_in_flight_requests_multiply_the_cost() {
        let start = Instant::now();
        let mut ewma = PeakEwma::new(DEFAULT_RTT, DECAY, start);
        assert_eq!(ewma.estimate(start), DEFAULT_RTT);
        ewma.observe(150 * MS, start + MS);
        let later = start + MS + DECAY;
        let decayed = ewma.estimate(later).as_secs_f64();
        assert!((decayed / (0.150 / std::f64::consts::E) - 1.0).abs() < 1e-6);
        assert!((ewma.cost(3, later) / ewma.cost(0, later) - 4.0).abs() < 1e-12);
        // Far enough on, cheaper than an idle server answering in 1 ms, so it is tried again.
        let far = later + 6 * DECAY;
        let mut fast = PeakEwma::new(DEFAULT_RTT, DECAY, start);
        fast.observe(MS, far);
        assert!(ewma.cost(0, far) < fast.cost(0, far));
        // An answer timed before the last one counts as simultaneous with it.
        ewma.observe(MS, start);
        assert_eq!(ewma.estimate(start + MS), 150 * MS);
    }
}
