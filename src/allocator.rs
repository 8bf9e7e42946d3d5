//! The process's allocator: mimalloc, with the bytes handed out counted for
//! `roundabout_heap_bytes` (issue #27's live heap).
//!
//! mimalloc, not glibc's malloc: a request's ~17 allocations cost ~1.8k fewer instructions
//! in all (~2.8k with the default config), and with its empty pages given back, a burst
//! leaves less behind in an idle process than glibc's free lists do (bench/README.md,
//! issue #25). Two settings make that so:
//! - no transparent huge pages (the `no_thp` build feature): with them every thread's first
//!   pages came as 2 MiB, and the process started at 21 MB instead of 12;
//! - `purge_delay` 100 ms, set by [`configure`] (`MIMALLOC_PURGE_DELAY` in the environment
//!   still wins), with [`give_back`] running on every worker: mimalloc purges only from
//!   inside its own calls once the delay has passed, so a worker that goes quiet after a
//!   burst would keep the burst's pages until its next request. A delay of 0 purged at once
//!   without the task, but under load it gave back pages that were wanted again a moment
//!   later: 0.43 page faults per request at c=1000, against 0.09 this way.
//!
//! The count is per thread: each thread adds to its own slot with a plain load and store (no
//! locked instruction on the hot path), and a scrape sums the slots. A block freed on
//! another thread than the one that took it subtracts from the freeing thread's slot; the
//! sum is still right. Threads past the slots share one slot, with atomic adds: by then
//! they are the short-lived threads of a blocking pool, not the workers.

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    ffi::c_void,
    sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed},
    time::Duration,
};

use libmimalloc_sys as mi;

/// mimalloc, counting the bytes it hands out.
#[derive(Debug)]
pub struct Counted;

/// Slots for threads with one of their own; one more, shared, for the rest.
const SLOTS: usize = 64;

/// A slot per cache line, so that two workers' counts do not share one.
#[repr(align(64))]
struct Slot(AtomicIsize);

static LIVE: [Slot; SLOTS + 1] = [const { Slot(AtomicIsize::new(0)) }; SLOTS + 1];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // `const` and without a destructor: reading it never allocates or registers anything,
    // which the allocator itself must not do. Null until the thread's first allocation.
    static MY_SLOT: Cell<*const AtomicIsize> = const { Cell::new(std::ptr::null()) };
}

#[inline]
fn count(delta: isize) {
    let slot = MY_SLOT.get();
    if slot.is_null() {
        return count_unslotted(delta);
    }
    // SAFETY: a slot of the static `LIVE`, given to this thread alone (`count_unslotted`).
    let cell = unsafe { &*slot };
    // A plain load and store: no other thread writes this slot; readers may see it late.
    cell.store(cell.load(Relaxed).wrapping_add(delta), Relaxed);
}

/// A count of a thread without a slot: its first, when it takes one of its own, or any of
/// a thread that came after the slots ran out, into the shared slot, atomically.
#[cold]
#[inline(never)]
fn count_unslotted(delta: isize) {
    if NEXT_SLOT.load(Relaxed) < SLOTS {
        let slot = NEXT_SLOT.fetch_add(1, Relaxed);
        if slot < SLOTS {
            MY_SLOT.set(&LIVE[slot].0);
            return count(delta);
        }
    }
    LIVE[SLOTS].0.fetch_add(delta, Relaxed);
}

/// Bytes handed out and not yet freed, summed over every thread.
pub fn in_use() -> usize {
    let sum = LIVE
        .iter()
        .fold(0isize, |sum, slot| sum.wrapping_add(slot.0.load(Relaxed)));
    usize::try_from(sum).unwrap_or(0)
}

/// Bytes mimalloc has committed from the system (pages it holds: handed out, free in its
/// pages, or its own metadata), as it counts them.
pub fn committed() -> usize {
    let mut commit = 0;
    // SAFETY: every pointer is either null (not wanted) or a live usize to write.
    unsafe {
        mi::mi_process_info(
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut commit,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
    commit
}

/// `mi_option_purge_delay` in the mimalloc this build compiles (libmimalloc-sys 0.1.49,
/// mimalloc 3.3; its Rust bindings name only the options of mimalloc 2, and Cargo.toml pins
/// the version for this number).
const OPTION_PURGE_DELAY: mi::mi_option_t = 15;

/// How long a free page waits before it is given back, unless the environment says.
const PURGE_DELAY: Duration = Duration::from_millis(100);

/// Sets the allocator's options that differ from mimalloc's defaults. Called first thing in
/// `main`: mimalloc has read its environment at load, so these override it unless the user
/// set one there.
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: options are plain values; main has one thread here.
        unsafe { mi::mi_option_set(OPTION_PURGE_DELAY, PURGE_DELAY.as_millis() as _) };
    }
}

/// Runs on a worker for as long as it does: every few purge delays, has mimalloc give back
/// every page this thread's heap holds empty (`mi_collect(true)`: a walk of the thread's
/// pages, microseconds, twice a second). Under load mimalloc purges by itself on its slow
/// paths; this is for when the worker goes quiet. Without force, the pages an empty size
/// class keeps for reuse stayed: 1.8 KiB per idle connection against 1.6 (idle.py).
pub async fn give_back() {
    let mut every = tokio::time::interval(PURGE_DELAY * 5);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // SAFETY: no arguments to get wrong; it works on the calling thread's heap.
        unsafe { mi::mi_collect(true) };
    }
}

/// What `mi_malloc` aligns every block to (`MI_MAX_ALIGN_SIZE`), and smaller blocks to their
/// size's power of two, as malloc does.
const MIN_ALIGN: usize = 16;

/// Whether plain `mi_malloc` gives a block of `size` bytes `align`ment: its aligned variant
/// takes a longer path (the rule Rust's `System` allocator follows for malloc).
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

/// A block from mimalloc's `plain` call when it gives the layout's alignment, else from its
/// `aligned` one; counted when there is one.
#[inline(always)]
unsafe fn take(
    layout: &Layout,
    plain_call: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_call: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let ptr = if plain(layout.align(), layout.size()) {
        plain_call(layout.size())
    } else {
        aligned_call(layout.size(), layout.align())
    };
    if !ptr.is_null() {
        count(layout.size() as isize);
    }
    ptr as *mut u8
}

// SAFETY: every call is mimalloc's own, with the layout's size and alignment; the count
// only follows them.
unsafe impl GlobalAlloc for Counted {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        take(&layout, mi::mi_malloc, mi::mi_malloc_aligned)
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        take(&layout, mi::mi_zalloc, mi::mi_zalloc_aligned)
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        mi::mi_free(ptr as *mut c_void);
        count(-(layout.size() as isize));
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr as *mut c_void, new_size)
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align())
        } as *mut u8;
        if !new.is_null() {
            count((new_size as isize).wrapping_sub(layout.size() as isize));
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: two tests holding large blocks at once would see each other's.
    #[test]
    fn a_live_block_counts_as_in_use_until_it_is_freed_on_any_thread() {
        let before = in_use();
        // 32 MiB: far more than the other tests, on their threads, free or take meanwhile.
        let mut block = vec![1u8; 32 << 20];
        let during = in_use();
        assert!(during >= before + (24 << 20), "{before} -> {during}");
        assert!(committed() >= 32 << 20, "committed {}", committed());
        block.resize(64 << 20, 2);
        let grown = in_use();
        assert!(grown >= during + (24 << 20), "{during} -> {grown} grown");
        drop(block);
        let freed = in_use();
        assert!(freed < during, "{grown} -> {freed} freed");

        let block = vec![1u8; 32 << 20];
        let during = in_use();
        std::thread::spawn(move || drop(block)).join().unwrap();
        let freed = in_use();
        assert!(
            freed + (24 << 20) <= during,
            "{during} -> {freed} freed elsewhere"
        );
    }
}
