//! The in-process store: fixed windows per client in memory, one store for the whole
//! process (a client must not get `workers × requests`), bounded in size. It serves
//! `redis_url = ""` and the `local` fallback while Redis is away. It never blocks for
//! longer than one shard's hash lookup and knows nothing of Redis or of actors.
//!
//! Bounded, and never refusing: each shard keeps its windows in the order they started
//! (all windows have one length, so that is the order they end). Ended windows are dropped
//! from the front as hits arrive, and when a shard is full the window at the front, the
//! one closest to its end, is evicted to make room. Both cost O(1) amortized per hit: a
//! window is queued once when it starts and leaves the queue once. A new client is always
//! counted.

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher as _,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::{ClientKey, Decision, Hit, Store};

/// The hash of shards and windows: foldhash's `quality` variant, seeded at random per
/// process (per map), for keys a client chooses (its address, within its prefix). Two
/// SipHash rounds of the key were 0.8k of the 43k instructions a request costs with the
/// limiter on (issue #25).
type RandomState = foldhash::quality::RandomState;

/// The most clients the in-process store keeps a window for, as nginx's `limit_req_zone`
/// has a fixed size. Past it, the windows closest to their end are evicted (an evicted
/// client starts a new window on its next request). At about 100 bytes a client, a full
/// store holds about 100 MB (README, "Rate limiting").
pub const MEMORY_STORE_CAP: usize = 1 << 20;

/// Shards of the in-process store: a hit locks one sixteenth of it.
const SHARDS: usize = 16;

/// A shard's map shrinks once it is this large and at most a quarter full, so that the
/// memory a flood of clients took is given back when their windows end.
const SHRINK_FROM: usize = 1024;

/// A client as the store keys it: its address (IPv4 as IPv4-mapped IPv6) in two words
/// and its budget (0: the default; a route's own), 20 bytes where an `IpAddr` and the
/// budget would pad to 24.
type Packed = (u64, u64, u32);

/// The in-process store: one per process, shared by every worker.
///
/// std `Mutex`es, not async ones: each critical section is a hash lookup and never spans an
/// `.await` (mini-redis's `Db` makes the same choice). The map is split in `SHARDS` (16) by
/// a hash with a per-process random key, so two workers rarely wait on each other and no
/// client can choose which shard its addresses fill.
pub struct MemoryStore {
    shards: [Mutex<Shard>; SHARDS],
    cap_per_shard: usize,
    shard_of: RandomState,
    /// Times are kept as nanoseconds since this instant: 8 bytes, where an `Instant` is 16.
    epoch: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_cap(MEMORY_STORE_CAP)
    }
}

/// One client's window: 16 bytes.
#[derive(Debug, Clone, Copy)]
struct Window {
    count: u64,
    /// When it ends, in nanoseconds since the store's epoch.
    end: u64,
}

#[derive(Default)]
struct Shard {
    windows: HashMap<Packed, Window, RandomState>,
    /// Every window started, oldest first, with the end it started with: the front is the
    /// next to end, so the first to drop and, when the shard is full, the first evicted. A
    /// record whose client has since started another window (its end differs) is stale and
    /// skipped.
    order: VecDeque<(Packed, u64)>,
}

impl Shard {
    /// Drops the windows that have ended, front first; stops at the first that has not.
    fn expire(&mut self, now: u64) {
        while let Some(&(key, end)) = self.order.front() {
            if end > now {
                break;
            }
            self.order.pop_front();
            self.remove_if_current(key, end);
        }
        if self.windows.capacity() >= SHRINK_FROM
            && self.windows.len() * 4 < self.windows.capacity()
        {
            self.windows.shrink_to(self.windows.len() * 2);
            self.order.shrink_to(self.order.len() * 2);
        }
    }

    /// Evicts the live window closest to its end.
    fn evict_one(&mut self) {
        while let Some((key, end)) = self.order.pop_front() {
            if self.remove_if_current(key, end) {
                return;
            }
        }
    }

    /// Removes `key`'s window if the record `(key, end)` is still its current one.
    fn remove_if_current(&mut self, key: Packed, end: u64) -> bool {
        if self.windows.get(&key).is_some_and(|w| w.end == end) {
            self.windows.remove(&key);
            true
        } else {
            false
        }
    }

    /// Counts one hit of `key` at `now` in a window of `window` nanoseconds.
    fn hit(&mut self, key: Packed, window: u64, now: u64, cap: usize) -> Window {
        self.expire(now);
        let fresh = Window {
            count: 1,
            end: now.saturating_add(window),
        };
        match self.windows.get_mut(&key) {
            Some(w) if w.end > now => {
                w.count += 1;
                return *w;
            }
            // Ended but not yet dropped: its record waits behind one that ends later (a
            // longer window before a reload, or microseconds of disorder between workers).
            // It starts again; the old record becomes stale.
            Some(w) => *w = fresh,
            None => {
                if self.windows.len() >= cap {
                    self.evict_one();
                }
                self.windows.insert(key, fresh);
            }
        }
        self.order.push_back((key, fresh.end));
        // Stale records only come from the case above; keep them from piling up (rare,
        // O(n) once per n stale records).
        if self.order.len() > 2 * self.windows.len() + 64 {
            let windows = &self.windows;
            self.order
                .retain(|(k, end)| windows.get(k).is_some_and(|w| w.end == *end));
        }
        fresh
    }
}

impl MemoryStore {
    /// A store for at most about `cap` clients at once (rounded up to a multiple of 16).
    pub fn with_cap(cap: usize) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
            cap_per_shard: cap.div_ceil(SHARDS).max(1),
            shard_of: RandomState::default(),
            epoch: Instant::now(),
        }
    }

    fn shard(&self, key: &Packed) -> MutexGuard<'_, Shard> {
        let i = self.shard_of.hash_one(key) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one request of `key` at `now`.
    pub fn count(&self, key: ClientKey, limit: u64, window: Duration, now: Instant) -> Decision {
        let packed = key.packed();
        let now = nanos(now.saturating_duration_since(self.epoch));
        let w = self
            .shard(&packed)
            .hit(packed, nanos(window), now, self.cap_per_shard);
        Decision::from_count(w.count, limit, Duration::from_nanos(w.end - now))
    }

    /// How many windows are kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).windows.len())
            .sum()
    }
}

/// Nanoseconds in `d`, saturating (u64 nanoseconds last 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Store for MemoryStore {
    fn answers_at_once(&self) -> bool {
        true
    }

    fn hit(
        &self,
        key: ClientKey,
        _scope: Option<&str>,
        limit: u64,
        window: Duration,
        now: Instant,
    ) -> Hit {
        Hit::Ready(Ok(self.count(key, limit, window, now)))
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn key(ip: &str) -> ClientKey {
        ClientKey::new(ip.parse().unwrap(), 64, 0)
    }

    fn v4(i: u32) -> ClientKey {
        ClientKey::new(
            IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
            64,
            0,
        )
    }

    #[test]
    fn memory_store_counts_a_fixed_window_per_client() {
        let m = MemoryStore::default();
        let t0 = Instant::now();
        let a = key("192.0.2.1");
        let b = key("2001:db8::1");
        let w = Duration::from_secs(10);
        let remaining: Vec<u64> = (0..3).map(|_| m.count(a, 2, w, t0).remaining).collect();
        assert_eq!(remaining, [1, 0, 0]);
        assert!(!m.count(a, 2, w, t0).allowed);
        assert!(m.count(b, 2, w, t0).allowed);
        let later = m.count(a, 2, w, t0 + Duration::from_millis(2500));
        assert_eq!(later.reset_secs, 8);
        assert_eq!(later.resets_in, Duration::from_millis(7500), "exact");
        let next_window = m.count(a, 2, w, t0 + w);
        assert!(next_window.allowed);
        assert_eq!(next_window.remaining, 1);
    }

    #[test]
    fn ipv6_clients_in_one_prefix_share_a_window() {
        let m = MemoryStore::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        assert_eq!(m.count(key("2001:db8:1:2::1"), 5, w, t0).remaining, 4);
        assert_eq!(m.count(key("2001:db8:1:2:ffff::9"), 5, w, t0).remaining, 3);
        assert_eq!(m.count(key("2001:db8:1:3::1"), 5, w, t0).remaining, 4);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn memory_store_drops_ended_windows() {
        let m = MemoryStore::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(1);
        for i in 0..100 {
            m.count(v4(i), 5, w, t0);
        }
        assert_eq!(m.len(), 100);
        // A window later new clients arrive; every shard they touch (with these 1000, all
        // sixteen but with odds of 1 in 10^27) drops its ended windows.
        for i in 0..1000 {
            m.count(v4(1000 + i), 5, w, t0 + 2 * w);
        }
        assert_eq!(m.len(), 1000, "only the new windows are kept");
    }

    #[test]
    fn a_full_memory_store_evicts_the_oldest_window_and_counts_the_new_client() {
        let cap = SHARDS * 4;
        let m = MemoryStore::with_cap(cap);
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let first = v4(0);
        assert_eq!(m.count(first, 5, w, t0).remaining, 4);
        // Ten times the cap, all in the first window's time: every one is counted.
        for i in 1..10 * cap as u32 {
            let d = m.count(v4(i), 5, w, t0 + Duration::from_millis(i.into()));
            assert_eq!((d.allowed, d.remaining), (true, 4), "client {i}");
            assert!(m.len() <= cap, "{} windows kept", m.len());
        }
        // The first window, the oldest of all, was evicted: that client starts again.
        let again = m.count(first, 5, w, t0 + Duration::from_secs(1));
        assert_eq!(again.remaining, 4);
        // A recent client keeps its count.
        let recent = v4(10 * cap as u32 - 1);
        assert_eq!(
            m.count(recent, 5, w, t0 + Duration::from_secs(1)).remaining,
            3
        );
    }

    #[test]
    fn a_window_restarted_before_it_was_dropped_is_counted_once() {
        // Two clients of one shard: a 10 s window started first, then a 1 s one (a reload
        // shortened the window). The short one ends behind the long one's record and
        // starts again in place, many times over.
        let m = MemoryStore::default();
        let shard = |k: ClientKey| m.shard_of.hash_one(k.packed()) as usize % SHARDS;
        let long = v4(1);
        let short = (2..).map(v4).find(|&k| shard(k) == shard(long)).unwrap();
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        m.count(long, 5, 10 * second, t0);
        m.count(short, 5, second, t0);
        for s in 2..10 {
            let d = m.count(short, 5, second, t0 + s * second);
            assert_eq!(d.remaining, 4, "a new window at {s}s");
        }
        assert_eq!(m.len(), 2);
        let records = m.shards[shard(long)].lock().unwrap().order.len();
        assert!(
            records <= 2 * 2 + 64,
            "stale records are bounded: {records}"
        );
        // Once the long window ends, the front moves on and both are dropped in turn.
        let third = (2..)
            .map(v4)
            .find(|&k| k != short && shard(k) == shard(long))
            .unwrap();
        assert!(m.count(third, 5, second, t0 + 30 * second).allowed);
        assert_eq!(m.len(), 1);
    }
}
