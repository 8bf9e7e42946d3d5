//! The in-process store: fixed windows per client IP in memory, one store for the whole
//! process (a client must not get `workers × requests`), bounded in size. It never blocks
//! for longer than one shard's hash lookup and knows nothing of Redis or of actors.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{Decision, Hit, Store, StoreError};

/// The most client IPs the in-process store keeps a window for (about 100 MB), as nginx's
/// `limit_req_zone` has a fixed size: past it, a new IP is a store error and
/// `on_store_error` decides, rather than memory growing with every address an attacker has.
pub const MEMORY_STORE_CAP: usize = 1 << 20;

/// Shards of the in-process store: a sweep or a hit locks one sixteenth of it.
const SHARDS: usize = 16;

/// The in-process store: one per process, shared by every worker.
///
/// std `Mutex`es, not async ones: each critical section is a hash lookup and never spans an
/// `.await` (mini-redis's `Db` makes the same choice). The map is split in `SHARDS` (16) by IP,
/// so two workers rarely wait on each other and dropping ended windows pauses one shard.
pub struct MemoryStore {
    shards: [Mutex<MemoryWindows>; SHARDS],
    cap_per_shard: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_cap(MEMORY_STORE_CAP)
    }
}

#[derive(Default)]
struct MemoryWindows {
    /// Per IP: the count and when its window ends.
    counts: HashMap<IpAddr, (u64, Instant)>,
    /// When expired windows were last dropped.
    swept: Option<Instant>,
}

impl MemoryWindows {
    fn sweep(&mut self, now: Instant) {
        self.counts.retain(|_, (_, end)| *end > now);
        self.swept = Some(now);
    }
}

impl MemoryStore {
    /// A store for at most about `cap` client IPs at once.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
            cap_per_shard: cap.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, ip: &IpAddr) -> std::sync::MutexGuard<'_, MemoryWindows> {
        use std::hash::{BuildHasher as _, Hasher as _};
        // A fixed hasher is enough to spread the IPs; the shard maps hash them again.
        let mut h =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .build_hasher();
        std::hash::Hash::hash(ip, &mut h);
        self.shards[h.finish() as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one request of `ip` at `now`.
    pub fn count(
        &self,
        ip: IpAddr,
        limit: u64,
        window: Duration,
        now: Instant,
    ) -> Result<Decision, StoreError> {
        let mut w = self.shard(&ip);
        // Bound memory: at most once per window, drop every window that has ended.
        if w.swept.is_none_or(|t| now.duration_since(t) >= window) {
            w.sweep(now);
        }
        if !w.counts.contains_key(&ip) && w.counts.len() >= self.cap_per_shard {
            w.sweep(now);
            if w.counts.len() >= self.cap_per_shard {
                return Err(StoreError::Full);
            }
        }
        let entry = w.counts.entry(ip).or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 += 1;
        Ok(Decision::from_count(entry.0, limit, entry.1 - now))
    }

    /// How many windows are kept now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).counts.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store for MemoryStore {
    fn hit(&self, ip: IpAddr, limit: u64, window: Duration, now: Instant) -> Hit {
        Hit::Ready(self.count(ip, limit, window, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_counts_a_fixed_window_per_ip() {
        let m = MemoryStore::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let w = Duration::from_secs(10);
        let remaining: Vec<u64> = (0..3)
            .map(|_| m.count(a, 2, w, t0).unwrap().remaining)
            .collect();
        assert_eq!(remaining, [1, 0, 0]);
        assert!(!m.count(a, 2, w, t0).unwrap().allowed);
        assert!(m.count(b, 2, w, t0).unwrap().allowed);
        let later = m.count(a, 2, w, t0 + Duration::from_millis(2500)).unwrap();
        assert_eq!(later.reset_secs, 8);
        let next_window = m.count(a, 2, w, t0 + w).unwrap();
        assert!(next_window.allowed);
        assert_eq!(next_window.remaining, 1);
    }

    #[test]
    fn memory_store_drops_ended_windows() {
        let m = MemoryStore::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(1);
        for i in 0..100u8 {
            m.count(IpAddr::from([10, 0, 0, i]), 5, w, t0).unwrap();
        }
        assert_eq!(m.len(), 100);
        // A window later new clients arrive; every shard they touch (with these 1000, all:
        // the shard hash has fixed keys) drops its ended windows.
        for i in 0..1000u16 {
            let ip = IpAddr::from([10, 1, (i >> 8) as u8, i as u8]);
            m.count(ip, 5, w, t0 + 2 * w).unwrap();
        }
        assert_eq!(m.len(), 1000, "only the new windows are kept");
    }

    #[test]
    fn a_full_memory_store_is_a_store_error_until_windows_end() {
        let m = MemoryStore::with_cap(SHARDS * 4);
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let ips = (0..=u16::MAX).map(|i| IpAddr::from([10, 9, (i >> 8) as u8, i as u8]));
        let admitted = ips
            .clone()
            .take_while(|&ip| m.count(ip, 5, w, t0).is_ok())
            .count();
        assert!(admitted <= SHARDS * 4, "{admitted}");
        let refused = ips.clone().nth(admitted).unwrap();
        assert!(matches!(m.count(refused, 5, w, t0), Err(StoreError::Full)));
        // IPs already counted go on being counted.
        let first = ips.clone().next().unwrap();
        assert_eq!(m.count(first, 5, w, t0).unwrap().remaining, 3);
        // Once windows end there is room again.
        assert!(m.count(refused, 5, w, t0 + w).is_ok());
    }
}
