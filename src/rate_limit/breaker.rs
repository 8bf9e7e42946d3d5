//! The circuit breaker in front of the shared store: one per process, shared by every
//! worker's limiter.
//!
//! Closed, every check asks the store. The first check that fails opens it (and logs the
//! outage, once); while it is open no check asks the store, so an outage costs no time per
//! request: `on_store_error` answers at once. One background probe, started by whoever
//! opened it on the system arbiter (which outlives the workers), asks the store every
//! [`PROBE_INTERVAL`] whether it answers again and closes the breaker when it does (and
//! logs that, once). Each worker has its own connection; the probe goes through every one
//! of them ([`Breaker::watch`]) and closes the breaker only when all answer, so the
//! connection each worker finds on its first check after it closes is one that just
//! answered (a worker's idle connection only notices a dead socket when it is used).
//!
//! The state a request reads is one atomic flag: no lock, no message, no cost while Redis
//! is up.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use futures_util::future::join_all;

use crate::{config::OnStoreError, metrics::Metrics};

use super::{Store, StoreError};

/// How often the probe asks a store that failed, and how long it waits for the answer:
/// the limiter is back at most about this long after the store is.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// The breaker, with what its probe needs.
pub struct Breaker {
    open: AtomicBool,
    /// When the outage started, for the log line that ends it.
    since: Mutex<Option<Instant>>,
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
            open: AtomicBool::new(false),
            since: Mutex::new(None),
            stores: Mutex::new(Vec::new()),
            label,
            metrics,
        }
    }

    /// Adds a worker's store to those the probe asks.
    pub fn watch(&self, store: &Arc<dyn Store>) {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        stores.retain(|s| s.strong_count() > 0);
        stores.push(Arc::downgrade(store));
    }

    /// Is the store being skipped? One relaxed load: a check that reads a stale `false` just
    /// asks the store once more.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// A check failed with `error`: opens the breaker. The call that opens it logs the
    /// outage with the policy (`policy`, in config spelling) that now answers, and starts
    /// the probe.
    pub fn trip(self: &Arc<Self>, error: &StoreError, policy: OnStoreError) {
        // Only the caller that flips the flag goes on: one log line, one probe.
        if self.open.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        log::error!(
            "rate limit store unreachable: {}: {error}; on_store_error = \"{policy}\": {} until it is back",
            self.label,
            match policy {
                OnStoreError::Local => "counting in-process, each instance on its own,",
                OnStoreError::Allow => "requests are forwarded uncounted",
                OnStoreError::Deny => "requests are answered 503",
            }
        );
        actix_rt::System::current()
            .arbiter()
            .spawn(self.clone().probe());
    }

    /// Asks every worker's store every [`PROBE_INTERVAL`] until all answer, then closes.
    async fn probe(self: Arc<Self>) {
        loop {
            let next = Instant::now() + PROBE_INTERVAL;
            // Collected first: the lock is not held across the wait.
            let pings: Vec<_> = self
                .stores
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter_map(|s| s.upgrade()?.ping())
                .map(|ping| actix_rt::time::timeout(PROBE_INTERVAL, ping))
                .collect();
            let answered = join_all(pings)
                .await
                .into_iter()
                .all(|r| matches!(r, Ok(Ok(()))));
            if answered {
                self.close();
                return;
            }
            self.metrics.store_error();
            actix_rt::time::sleep_until(next.into()).await;
        }
    }

    fn close(&self) {
        let since = self.since.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.open.store(false, Ordering::Release);
        let lasted = since.map_or(Duration::ZERO, |t| t.elapsed());
        log::info!(
            "rate limit store reachable again: {}, after {:.1}s; counting there again",
            self.label,
            lasted.as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use futures_util::{future::BoxFuture, FutureExt as _};

    use super::*;
    use crate::rate_limit::{ClientKey, Hit};

    /// A store that answers pings while `up`, and counts them.
    #[derive(Default)]
    struct Flaky {
        up: AtomicBool,
        pings: AtomicUsize,
    }

    impl Store for Flaky {
        fn hit(&self, _: ClientKey, _: u64, _: Duration, _: Instant) -> Hit {
            unreachable!("the breaker only pings")
        }

        fn ping(&self) -> Option<BoxFuture<'static, Result<(), StoreError>>> {
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

    #[actix_rt::test]
    async fn one_failure_opens_it_and_one_probe_closes_it_when_the_store_is_back() {
        let store = Arc::new(Flaky::default());
        let breaker = Arc::new(Breaker::new("test".into(), Arc::new(Metrics::new())));
        let watched: Arc<dyn Store> = store.clone();
        breaker.watch(&watched);
        assert!(!breaker.is_open());
        for _ in 0..50 {
            breaker.trip(&StoreError::Timeout(PROBE_INTERVAL), OnStoreError::Local);
        }
        assert!(breaker.is_open());
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
        let pings = store.pings.load(Ordering::SeqCst);
        actix_rt::time::sleep(PROBE_INTERVAL * 2).await;
        assert_eq!(
            store.pings.load(Ordering::SeqCst),
            pings,
            "the probe has stopped"
        );
    }
}
