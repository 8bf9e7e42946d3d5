//! `roundabout_heap_bytes`: what the allocator holds, by state, read when `/metrics` is.
//!
//! RSS alone cannot tell memory the program keeps from memory the allocator keeps for it:
//! free blocks in its pages that it has not given back to the kernel. `in_use` is the
//! first (the live heap: bytes handed out and not freed, as [`crate::allocator`] counts
//! them), `free` the second (what mimalloc has committed beyond that: free blocks, empty
//! pages not yet purged, its own metadata). A live heap that stays flat while RSS moves is
//! the allocator's doing, not a leak (issue #27, bench/README.md).

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
        "Bytes of the heap: in_use (handed out: the live heap) and free (committed by the allocator beyond that, not given back to the system)",
        HeapBytes,
    );
}

/// `(in use, free)`.
fn read() -> (usize, usize) {
    let in_use = crate::allocator::in_use();
    (in_use, crate::allocator::committed().saturating_sub(in_use))
}
