//! The circuit breaker in front of the shared store: one per process, shared by every
//! worker's limiter.
//!
//! Closed, every check asks the store. The first check that fails opens a circuit (and
//! logs the outage, once); while it is open no check it covers asks the store, so an outage
//! costs no time per request: `on_store_error` answers at once. One background probe per
//! circuit, started by whoever opened it on the system arbiter (which outlives the
//! workers), asks every [`PROBE_INTERVAL`] whether the store answers again and closes the
//! circuit when it does (and logs that, once).
//!
//! One Redis is one circuit. A Redis Cluster has one per master: a check that fails opens
//! the circuit of the slots its master serves (known from the cluster's own slot table,
//! read at start and after each recovery), so while one master is away, and until its
//! replica has taken over, only the clients whose keys live there get `on_store_error`;
//! the others are still counted in the cluster. Before the table is known, a failure opens
//! one circuit for the whole cluster.
//!
//! Each worker has its own connection; the probe goes through every one of them
//! ([`Breaker::watch`]) and closes a circuit only when all answer, so the connection each
//! worker finds on its first check after it closes is one that just answered (an idle
//! connection only notices a dead socket, or a cluster client a moved slot, when used).
//!
//! What a request reads is one atomic counter, bumped when a circuit opens or closes; only
//! then does a worker take the lock to copy the set of open circuits ([`View`]). No lock,
//! no message, no shared write while the store is up.

use std::{
    fmt::Write as _,
    ops::RangeInclusive,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use futures_util::future::join_all;

use crate::{config::OnStoreError, metrics::Metrics};

use super::{ClientKey, Store, StoreError};

/// How often the probe asks a store that failed, and how long it waits for the answer:
/// the limiter is back at most about this long after the store is.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// The slots one master of a cluster serves, as its slot table says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// `host:port` of the master.
    pub master: String,
    pub slots: Vec<RangeInclusive<u16>>,
}

/// An open circuit: the checks it covers are not sent to the store.
#[derive(Debug)]
pub struct Circuit {
    /// The cluster slots it covers; empty: every check (one Redis, or a cluster whose slot
    /// table is not known).
    slots: Vec<RangeInclusive<u16>>,
    /// A client whose check failed in it, and the route whose budget it counted in: the
    /// probe asks about that key, which a cluster routes where that client's checks go.
    key: ClientKey,
    scope: Option<Arc<str>>,
    /// The store, or the cluster node, as logged.
    label: String,
    since: Instant,
    /// How many probe rounds in a row must be answered before it closes: 1 for one Redis;
    /// 2 for a cluster, whose nodes learn of a failover one after another (for a moment
    /// after the replica answers, a node that has not heard yet still sends MOVED to the
    /// master that is gone).
    rounds: u32,
}

impl Circuit {
    fn covers(&self, slot: Option<u16>) -> bool {
        self.slots.is_empty() || slot.is_some_and(|s| self.slots.iter().any(|r| r.contains(&s)))
    }
}

/// A worker's copy of the open circuits, renewed when the breaker's generation moves.
#[derive(Debug, Clone, Default)]
pub struct View {
    generation: u64,
    open: Arc<Vec<Arc<Circuit>>>,
}

impl View {
    /// No circuit is open: every check asks the store.
    pub fn is_clear(&self) -> bool {
        self.open.is_empty()
    }

    /// Does an open circuit cover a check of `slot` (`None`: not a cluster)?
    pub fn covers(&self, slot: Option<u16>) -> bool {
        // The common case, nothing open, without a look at the slot.
        !self.open.is_empty() && self.open.iter().any(|c| c.covers(slot))
    }
}

/// The breaker, with what its probes need.
pub struct Breaker {
    /// Bumped after every change of `open`: a worker reads the set again only then.
    generation: AtomicU64,
    open: Mutex<Arc<Vec<Arc<Circuit>>>>,
    /// The cluster's slot table as last read; empty for one Redis, or not read yet.
    shards: Mutex<Vec<Shard>>,
    /// The workers' stores, each with its own connection: what the probe asks. Weak, so
    /// that a stopped worker's connection is not kept alive (nor waited for) by the probe.
    stores: Mutex<Vec<Weak<dyn Store>>>,
    /// The store as logged: `redis://host:port (shared)`, password hidden.
    label: String,
    metrics: Arc<Metrics>,
}

impl Breaker {
    pub fn new(label: String, metrics: Arc<Metrics>) -> Self {
        Self {
            generation: AtomicU64::new(0),
            open: Mutex::new(Arc::default()),
            shards: Mutex::new(Vec::new()),
            stores: Mutex::new(Vec::new()),
            label,
            metrics,
        }
    }

    /// Adds a worker's store to those the probe asks.
    pub fn watch(&self, store: &Arc<dyn Store>) {
        let mut stores = lock(&self.stores);
        stores.retain(|s| s.strong_count() > 0);
        stores.push(Arc::downgrade(store));
    }

    /// Renews `view` if a circuit opened or closed since it was taken: one relaxed load
    /// when nothing did.
    pub fn refresh(&self, view: &mut View) {
        let generation = self.generation.load(Ordering::Acquire);
        if generation != view.generation {
            *view = View {
                generation,
                open: lock(&self.open).clone(),
            };
        }
    }

    /// Is any circuit open (the store, or a node of it, being skipped)?
    pub fn is_open(&self) -> bool {
        !lock(&self.open).is_empty()
    }

    /// Replaces the cluster's slot table (read at start and after a recovery).
    pub fn set_shards(&self, shards: Vec<Shard>) {
        *lock(&self.shards) = shards;
    }

    /// A check of `key` (in cluster slot `slot`) failed with `error`: opens the circuit
    /// that covers it, unless one already does. The call that opens it logs the outage with
    /// the policy (`policy`, in config spelling) that now answers, and starts its probe.
    pub fn trip(
        self: &Arc<Self>,
        key: ClientKey,
        scope: Option<Arc<str>>,
        slot: Option<u16>,
        error: &StoreError,
        policy: OnStoreError,
    ) {
        let circuit = {
            // Only the caller that adds the circuit goes on: one log line, one probe.
            let mut open = lock(&self.open);
            if open.iter().any(|c| c.covers(slot)) {
                return;
            }
            let (slots, label) = self.circuit_for(slot);
            let circuit = Arc::new(Circuit {
                slots,
                key,
                scope,
                label,
                since: Instant::now(),
                rounds: if slot.is_some() { 2 } else { 1 },
            });
            let mut next = Vec::clone(&open);
            next.push(circuit.clone());
            *open = Arc::new(next);
            self.generation.fetch_add(1, Ordering::Release);
            circuit
        };
        // With the local fallback every request is still served and limited: a warning.
        // Forwarded uncounted or refused, the service is not what was configured: an error.
        let level = match policy {
            OnStoreError::Local => log::Level::Warn,
            OnStoreError::Allow | OnStoreError::Deny => log::Level::Error,
        };
        // What to do, for a whole store (one Redis) down: often no Redis was ever started.
        let hint = match slot {
            None => {
                "; start Redis there, or set rate_limit.redis_url = \"\" to count in-process \
                     (one instance only)"
            }
            Some(_) => "",
        };
        log::log!(
            level,
            "rate limit store unreachable: {}: {error}; on_store_error = \"{policy}\": {} until it is back{hint}",
            circuit.label,
            match policy {
                OnStoreError::Local => "counting in-process, each instance on its own,",
                OnStoreError::Allow => "requests are forwarded uncounted",
                OnStoreError::Deny => "requests are answered 503",
            }
        );
        actix_rt::System::current()
            .arbiter()
            .spawn(self.clone().probe(circuit));
    }

    /// The slots and label of the circuit for a failure in `slot`: its master's, when the
    /// slot table says which; else every check.
    fn circuit_for(&self, slot: Option<u16>) -> (Vec<RangeInclusive<u16>>, String) {
        let shards = lock(&self.shards);
        match slot.and_then(|s| {
            shards
                .iter()
                .find(|sh| sh.slots.iter().any(|r| r.contains(&s)))
        }) {
            Some(shard) => {
                let mut label = format!("redis cluster node {} (slots ", shard.master);
                for (i, r) in shard.slots.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    let _ = write!(label, "{sep}{}-{}", r.start(), r.end());
                }
                label.push(')');
                (shard.slots.clone(), label)
            }
            None => (Vec::new(), self.label.clone()),
        }
    }

    /// Asks every worker's store every [`PROBE_INTERVAL`] about the circuit's key until all
    /// answer (in `rounds` rounds in a row), then closes the circuit and reads the
    /// cluster's slot table again.
    async fn probe(self: Arc<Self>, circuit: Arc<Circuit>) {
        let mut answered_rounds = 0;
        loop {
            let next = Instant::now() + PROBE_INTERVAL;
            // Collected first: the lock is not held across the wait.
            let stores: Vec<Arc<dyn Store>> = lock(&self.stores)
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            let pings = stores
                .iter()
                .filter_map(|s| s.ping(circuit.key, circuit.scope.as_deref()))
                .map(|ping| actix_rt::time::timeout(PROBE_INTERVAL, ping));
            let answered = join_all(pings)
                .await
                .into_iter()
                .all(|r| matches!(r, Ok(Ok(()))));
            answered_rounds = if answered { answered_rounds + 1 } else { 0 };
            if answered_rounds >= circuit.rounds {
                self.close(&circuit);
                if let Some(read) = stores.iter().find_map(|s| s.shards()) {
                    if let Ok(Ok(shards)) = actix_rt::time::timeout(PROBE_INTERVAL, read).await {
                        self.set_shards(shards);
                    }
                }
                return;
            }
            if !answered {
                self.metrics.store_error();
            }
            actix_rt::time::sleep_until(next.into()).await;
        }
    }

    fn close(&self, circuit: &Arc<Circuit>) {
        {
            let mut open = lock(&self.open);
            let next: Vec<_> = open
                .iter()
                .filter(|c| !Arc::ptr_eq(c, circuit))
                .cloned()
                .collect();
            *open = Arc::new(next);
            self.generation.fetch_add(1, Ordering::Release);
        }
        log::info!(
            "rate limit store reachable again: {}, after {:.1}s; counting there again",
            circuit.label,
            circuit.since.elapsed().as_secs_f64()
        );
    }
}

/// A poisoned lock still holds valid data here: every critical section is a plain swap.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use futures_util::{future::BoxFuture, FutureExt as _};

    use super::*;
    use crate::rate_limit::Hit;

    /// A store that answers pings while `up`, and counts them.
    #[derive(Default)]
    struct Flaky {
        up: AtomicBool,
        pings: AtomicUsize,
    }

    impl Store for Flaky {
        fn hit(&self, _: ClientKey, _: Option<&str>, _: u64, _: Duration, _: Instant) -> Hit {
            unreachable!("the breaker only pings")
        }

        fn ping(
            &self,
            _: ClientKey,
            _: Option<&str>,
        ) -> Option<BoxFuture<'static, Result<(), StoreError>>> {
            self.pings.fetch_add(1, Ordering::SeqCst);
            let up = self.up.load(Ordering::SeqCst);
            Some(
                async move {
                    if up {
                        Ok(())
                    } else {
                        Err(StoreError::Timeout(PROBE_INTERVAL))
                    }
                }
                .boxed(),
            )
        }
    }

    fn key() -> ClientKey {
        ClientKey::new("192.0.2.1".parse().unwrap(), 64, 0)
    }

    fn breaker(store: &Arc<Flaky>) -> Arc<Breaker> {
        let breaker = Arc::new(Breaker::new("test".into(), Arc::new(Metrics::new())));
        let watched: Arc<dyn Store> = store.clone();
        breaker.watch(&watched);
        breaker
    }

    #[actix_rt::test]
    async fn one_failure_opens_it_and_one_probe_closes_it_when_the_store_is_back() {
        let store = Arc::new(Flaky::default());
        let breaker = breaker(&store);
        let mut view = View::default();
        breaker.refresh(&mut view);
        assert!(!breaker.is_open() && !view.covers(None));
        for _ in 0..50 {
            let error = StoreError::Timeout(PROBE_INTERVAL);
            breaker.trip(key(), None, None, &error, OnStoreError::Local);
        }
        assert!(breaker.is_open());
        assert!(!view.covers(None), "a view is a copy");
        breaker.refresh(&mut view);
        assert!(view.covers(None) && view.covers(Some(7)));
        actix_rt::time::sleep(PROBE_INTERVAL * 4 + PROBE_INTERVAL / 2).await;
        assert!(breaker.is_open(), "the store is still down");
        let pings = store.pings.load(Ordering::SeqCst);
        assert!(
            (4..=6).contains(&pings),
            "one probe, every interval: {pings}"
        );

        store.up.store(true, Ordering::SeqCst);
        actix_rt::time::sleep(PROBE_INTERVAL * 2).await;
        assert!(!breaker.is_open(), "closed by the probe");
        breaker.refresh(&mut view);
        assert!(!view.covers(None));
        let pings = store.pings.load(Ordering::SeqCst);
        actix_rt::time::sleep(PROBE_INTERVAL * 2).await;
        assert_eq!(
            store.pings.load(Ordering::SeqCst),
            pings,
            "the probe has stopped"
        );
    }

    #[actix_rt::test]
    async fn in_a_cluster_a_failure_opens_only_its_masters_slots() {
        let store = Arc::new(Flaky::default());
        let breaker = breaker(&store);
        breaker.set_shards(vec![
            Shard {
                master: "10.0.0.1:7000".into(),
                slots: vec![0..=5460, 16000..=16383],
            },
            Shard {
                master: "10.0.0.2:7000".into(),
                slots: vec![5461..=15999],
            },
        ]);
        let error = StoreError::Timeout(PROBE_INTERVAL);
        breaker.trip(key(), None, Some(100), &error, OnStoreError::Local);
        // Another slot of the same master: the same circuit, not a second one.
        breaker.trip(key(), None, Some(16100), &error, OnStoreError::Local);
        let mut view = View::default();
        breaker.refresh(&mut view);
        assert_eq!(view.open.len(), 1);
        assert_eq!(
            view.open[0].label,
            "redis cluster node 10.0.0.1:7000 (slots 0-5460,16000-16383)"
        );
        for (slot, open) in [(0, true), (5460, true), (16383, true), (5461, false)] {
            assert_eq!(view.covers(Some(slot)), open, "slot {slot}");
        }

        // The other master fails too: its own circuit.
        breaker.trip(key(), None, Some(9000), &error, OnStoreError::Local);
        breaker.refresh(&mut view);
        assert_eq!(view.open.len(), 2);
        assert!(view.covers(Some(5461)));

        // Two probes (one per circuit) ask once per round each; a cluster's circuits close
        // only after two rounds answered in a row.
        let pinged = |n: usize| {
            let store = store.clone();
            async move {
                while store.pings.load(Ordering::SeqCst) < n {
                    actix_rt::time::sleep(Duration::from_millis(5)).await;
                }
                actix_rt::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let pings = store.pings.load(Ordering::SeqCst);
        store.up.store(true, Ordering::SeqCst);
        pinged(pings + 2).await;
        breaker.refresh(&mut view);
        assert!(view.covers(Some(0)), "one round answered: still open");
        pinged(pings + 4).await;
        breaker.refresh(&mut view);
        assert!(!view.covers(Some(0)) && !view.covers(Some(9000)));
    }

    #[actix_rt::test]
    async fn in_a_cluster_whose_slots_are_not_known_a_failure_opens_every_slot() {
        let store = Arc::new(Flaky::default());
        let breaker = breaker(&store);
        let error = StoreError::Timeout(PROBE_INTERVAL);
        breaker.trip(key(), None, Some(100), &error, OnStoreError::Local);
        let mut view = View::default();
        breaker.refresh(&mut view);
        assert!(view.covers(Some(100)) && view.covers(Some(9000)));
    }
}
