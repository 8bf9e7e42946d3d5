//! `roundabout_heap_bytes`: what the allocator holds, by state, read from glibc's malloc
//! (Rust's `System` allocator on Linux) with `mallinfo2(3)` when `/metrics` is read.
//!
//! RSS alone cannot tell memory the program keeps from memory the allocator keeps for it:
//! free chunks in its arenas that it has not given back to the kernel. `in_use` is the
//! first (the live heap, with malloc's few bytes of overhead per chunk), `free` the
//! second; a live heap that stays flat while RSS moves is the allocator's doing, not a
//! leak (issue #27, bench/README.md). Only on glibc targets: elsewhere the family is not
//! registered.
//!
//! `mallinfo2` takes each arena's lock in turn and walks its free lists, a few
//! microseconds per arena, so it is read per scrape, never per request.

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
        "Bytes of the C allocator's heap: in_use (handed out: the live heap) and free (held in its arenas, not given back to the system)",
        HeapBytes,
    );
}

/// `(in use, free)`: in use is the arenas' chunks handed out plus the chunks mapped on
/// their own (large ones); free is what the arenas hold unused.
fn read() -> (usize, usize) {
    // SAFETY: mallinfo2 has no preconditions; it only reads the allocator's state, under
    // its locks.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd, info.fordblks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_live_block_counts_as_in_use_until_it_is_freed() {
        let before = read().0;
        // 32 MiB: far more than the other tests, on their threads, free or take meanwhile.
        let block = vec![1u8; 32 << 20];
        let during = read().0;
        assert!(during >= before + (24 << 20), "{before} -> {during}");
        drop(block);
        assert!(read().0 < during, "freed");
    }
}
