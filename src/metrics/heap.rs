//! `roundabout_heap_bytes`: the live heap, and what is resident beside it, read when
//! `/metrics` is.
//!
//! RSS alone cannot tell memory the program keeps from memory the allocator keeps for it.
//! `in_use` is the first: the live heap, bytes handed out and not freed, as
//! [`crate::allocator`] counts them. `free` is the resident memory beyond it (RSS minus
//! `in_use`): the allocator's pages not given back, with the program's code, stacks and
//! static data (some 8 MB at start). A live heap that stays flat while `free` moves is the
//! allocator's doing, not a leak (issue #27, bench/README.md). mimalloc's own count of
//! committed bytes is not used: pages it gives back stay counted there.

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder},
    metrics::{gauge::ConstGauge, MetricType},
    registry::Registry,
};

/// Bytes of the heap by state, read when encoded.
#[derive(Debug)]
struct HeapBytes;

impl EncodeMetric for HeapBytes {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (in_use, free) = read();
        for (state, bytes) in [("in_use", in_use), ("free", free)] {
            let gauge = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_family(&[("state", state)])?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// Registers `heap_bytes` in `registry`.
pub(super) fn register(registry: &mut Registry) {
    registry.register(
        "heap_bytes",
        "Bytes of memory: in_use (handed out by the allocator and not freed: the live heap) and free (resident beyond that: the allocator's pages not given back, and the program's code and stacks)",
        HeapBytes,
    );
}

/// `(in use, free)`.
fn read() -> (usize, usize) {
    let in_use = crate::allocator::in_use();
    (in_use, resident().saturating_sub(in_use))
}

/// The process's resident memory (RSS), from `/proc/self/statm`; mimalloc's committed count
/// where there is no such file. A read of procfs: a few microseconds, per scrape.
fn resident() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<usize>().ok())
        // SAFETY: sysconf has no preconditions.
        .map(|pages| pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize)
        .unwrap_or_else(crate::allocator::committed)
}
