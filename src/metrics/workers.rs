//! Per-worker tallies: each worker's own in-flight gauge and head-time histogram, relaxed
//! atomics that only that worker writes (no lock, no cache line shared with another worker
//! on the request path), summed when `/metrics` or the status page reads them.

use std::sync::{
    atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    Arc, Mutex,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

/// `roundabout_in_flight_requests`: every worker's own gauge, summed.
#[derive(Debug, Clone, Default)]
pub(super) struct InFlight(Arc<Mutex<Vec<Arc<AtomicI64>>>>);

impl InFlight {
    pub(super) fn now(&self) -> i64 {
        let workers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        workers.iter().map(|w| w.load(Relaxed)).sum()
    }
}

impl EncodeMetric for InFlight {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.now())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// Upper bounds of the head-time buckets: 1 ms to about 33 s, doubling (then +Inf).
const HEAD_BUCKETS: [f64; 16] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384, 32.768,
];

/// One worker's histogram: relaxed atomics that only that worker writes (no lock, no cache
/// line shared with another worker on the request path), summed when `/metrics` is read.
#[derive(Debug, Default)]
pub struct WorkerHistogram {
    /// Per bucket of [`HEAD_BUCKETS`], then +Inf; not cumulative.
    buckets: [AtomicU64; HEAD_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl WorkerHistogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = HEAD_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(HEAD_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }
}

/// `roundabout_request_duration_seconds`: every worker's [`WorkerHistogram`], summed.
#[derive(Debug, Clone, Default)]
pub(super) struct HeadTimes(Arc<Mutex<Vec<Arc<WorkerHistogram>>>>);

impl EncodeMetric for HeadTimes {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let workers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut buckets: Vec<(f64, u64)> = HEAD_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .map(|le| (le, 0))
            .collect();
        let (mut count, mut sum) = (0, 0.0);
        for w in workers.iter() {
            for (b, n) in buckets.iter_mut().zip(&w.buckets) {
                b.1 += n.load(Relaxed);
            }
            count += w.count.load(Relaxed);
            sum += w.sum_nanos.load(Relaxed) as f64 / 1e9;
        }
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl InFlight {
    /// A new worker's gauge, summed with the others'.
    pub(super) fn for_worker(&self) -> Arc<AtomicI64> {
        let gauge = Arc::new(AtomicI64::new(0));
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(gauge.clone());
        gauge
    }
}

impl HeadTimes {
    /// A new worker's histogram, summed with the others'.
    pub(super) fn for_worker(&self) -> Arc<WorkerHistogram> {
        let h = Arc::new(WorkerHistogram::default());
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h.clone());
        h
    }
}
