//! Passive ejection (Envoy's outlier detection) and panic mode, on the HealthActor.
//!
//! A worker that counts `eject_after_5xx` failures of a server in a row (5xx answers, failed
//! connections, time-outs) reports it ([`Eject`]); this actor, the one owner of health truth,
//! takes it out of rotation for `eject_time`, doubled each time it is ejected again (at
//! most ten times as long; back to once after it served a whole `eject_time` without being
//! ejected), unless that would take out more than half of its pool. It comes back by itself
//! when the time is up. [`Ejections`] is that arithmetic, with no actor in it.
//!
//! Panic mode (Envoy's panic threshold): when fewer than `panic_threshold` percent of a
//! pool's servers are in rotation, every balancer uses all of them (each works that out from
//! the state it is sent); this actor only says so in the log, once when a pool enters panic
//! and once when it leaves.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;

use super::{key_of, HealthActor, Key};
use crate::{balancer::Eject, upstream::PoolId};

/// The most an ejection lasts, in `eject_time`s.
const MAX_FACTOR: u32 = 10;

/// One server's ejections.
#[derive(Debug, Default)]
struct Record {
    /// Ejections in a row (reset once it served a whole `eject_time`).
    times: u32,
    /// Out until then.
    out_until: Option<Instant>,
    /// When it last came back.
    back_at: Option<Instant>,
    /// Tells this ejection's timer from an older one's.
    generation: u64,
}

/// Every server's ejection record.
#[derive(Debug, Default)]
pub(super) struct Ejections {
    records: HashMap<Key, Record>,
    generations: u64,
}

impl Ejections {
    /// Ejects `key` at `now` for `base` times its factor, unless it is out already or one
    /// more out of `pool_size` (with `ejected` out now) would be more than half: how long,
    /// the ejection's number in a row, and the generation its timer must hand back.
    pub(super) fn eject(
        &mut self,
        key: &Key,
        now: Instant,
        base: Duration,
        pool_size: usize,
        ejected: usize,
    ) -> Option<(Duration, u32, u64)> {
        if (ejected + 1) * 2 > pool_size {
            return None;
        }
        let record = self.records.entry(key.clone()).or_default();
        if record.out_until.is_some_and(|until| until > now) {
            return None;
        }
        if record
            .back_at
            .is_some_and(|back| now.saturating_duration_since(back) >= base)
        {
            record.times = 0;
        }
        record.times = record.times.saturating_add(1);
        let factor = 1u32
            .checked_shl(record.times - 1)
            .unwrap_or(MAX_FACTOR)
            .min(MAX_FACTOR);
        let out_for = base * factor;
        self.generations += 1;
        record.out_until = Some(now + out_for);
        record.generation = self.generations;
        Some((out_for, record.times, self.generations))
    }

    /// The timer of ejection `generation` of `key` fired at `now`: true when that ejection is
    /// still the current one, which then ends.
    pub(super) fn release(&mut self, key: &Key, generation: u64, now: Instant) -> bool {
        match self.records.get_mut(key) {
            Some(r) if r.generation == generation && r.out_until.is_some() => {
                r.out_until = None;
                r.back_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// A server removed: its record goes with it.
    pub(super) fn forget(&mut self, key: &Key) {
        self.records.remove(key);
    }
}

impl Handler<Eject> for HealthActor {
    type Result = ();

    fn handle(&mut self, msg: Eject, ctx: &mut Self::Context) {
        let Some(settings) = self.pools.get(&msg.pool).map(|p| p.settings.clone()) else {
            return;
        };
        let Some(member) = self.registry.get(msg.pool, &msg.label) else {
            return;
        };
        if settings.eject_after_5xx == 0 || member.ejected {
            return;
        }
        let upstream = member.upstream.clone();
        let (_, pool_size) = self.registry.in_rotation(msg.pool);
        let ejected = self.registry.ejected(msg.pool);
        let key: Key = (msg.pool, upstream.label.clone());
        let Some((out_for, times, generation)) = self.ejections.eject(
            &key,
            Instant::now(),
            settings.eject_time,
            pool_size,
            ejected,
        ) else {
            log::debug!("{upstream} not ejected: out already, or half of its pool is");
            return;
        };
        log::warn!(
            "{upstream} ejected for {}: {} 5xx answers, failed connections or time-outs in a \
             row (ejection {times} in a row)",
            humantime::format_duration(out_for),
            settings.eject_after_5xx,
        );
        self.metrics.ejected(&key_of(&upstream));
        self.metrics.set_healthy(&key_of(&upstream), false);
        self.registry.set_ejected(msg.pool, &upstream.label, true);
        self.check_panic(msg.pool);
        ctx.run_later(out_for, move |act, _| act.release(key, generation));
    }
}

impl HealthActor {
    /// An ejection's time is up: the server is back in rotation (if the checks have it).
    fn release(&mut self, key: Key, generation: u64) {
        if !self.ejections.release(&key, generation, Instant::now()) {
            return;
        }
        let Some(member) = self.registry.get(key.0, &key.1) else {
            return;
        };
        let (upstream, healthy) = (member.upstream.clone(), member.healthy);
        log::info!(
            "{upstream} back from its ejection{}",
            if healthy {
                ""
            } else {
                " (still down by its health checks)"
            }
        );
        self.metrics.set_healthy(&key_of(&upstream), healthy);
        self.registry.set_ejected(key.0, &key.1, false);
        self.check_panic(key.0);
    }

    /// Logs `pool` entering or leaving panic, once each way.
    pub(super) fn check_panic(&mut self, pool: PoolId) {
        let Some(spec) = self.registry.pools().iter().find(|p| p.id == pool) else {
            return;
        };
        let (threshold, name): (u8, Arc<str>) = (spec.panic_threshold, spec.name.clone());
        let (up, all) = self.registry.in_rotation(pool);
        let panic = threshold > 0 && all > 0 && up * 100 < usize::from(threshold) * all;
        if panic == self.panicking.contains(&pool) {
            return;
        }
        if panic {
            self.panicking.insert(pool);
            log::warn!(
                "pool {name} in panic: {up} of {all} servers in rotation, below \
                 panic_threshold {threshold}%: sending requests to all {all}"
            );
        } else {
            self.panicking.remove(&pool);
            log::info!("pool {name} out of panic: {up} of {all} servers in rotation");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(30);

    fn key(port: u16) -> Key {
        (PoolId::DEFAULT, Arc::from(format!("127.0.0.1:{port}")))
    }

    #[test]
    fn each_ejection_in_a_row_lasts_twice_as_long_up_to_ten_times() {
        let mut e = Ejections::default();
        let mut now = Instant::now();
        let mut lasted = Vec::new();
        for _ in 0..6 {
            let (out_for, _, generation) = e.eject(&key(1), now, BASE, 10, 0).unwrap();
            lasted.push(out_for.as_secs() / 30);
            now += out_for;
            assert!(e.release(&key(1), generation, now));
            // Ejected again soon after it came back.
            now += Duration::from_secs(1);
        }
        assert_eq!(lasted, [1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn a_whole_eject_time_served_starts_the_count_again() {
        let mut e = Ejections::default();
        let now = Instant::now();
        let (first, _, g) = e.eject(&key(1), now, BASE, 10, 0).unwrap();
        assert!(e.release(&key(1), g, now + first));
        let later = now + first + BASE;
        let (second, times, _) = e.eject(&key(1), later, BASE, 10, 0).unwrap();
        assert_eq!((second, times), (BASE, 1));
    }

    #[test]
    fn never_more_than_half_of_a_pool_and_never_twice_at_once() {
        let mut e = Ejections::default();
        let now = Instant::now();
        assert!(e.eject(&key(1), now, BASE, 1, 0).is_none(), "one of one");
        assert!(
            e.eject(&key(1), now, BASE, 4, 2).is_none(),
            "a third of four"
        );
        let (_, _, g) = e.eject(&key(1), now, BASE, 4, 1).unwrap();
        assert!(e.eject(&key(1), now, BASE, 4, 1).is_none(), "out already");
        assert!(
            !e.release(&key(1), g + 1, now),
            "an older timer changes nothing"
        );
        assert!(e.release(&key(1), g, now + BASE));
        assert!(!e.release(&key(1), g, now + BASE), "once");
    }
}
