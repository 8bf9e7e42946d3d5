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
    match own_slot() {
        Some(slot) => add(slot, delta),
        None => count_unslotted(delta),
    }
}

/// This thread's slot, once it has one.
#[inline(always)]
fn own_slot() -> Option<&'static AtomicIsize> {
    // SAFETY: null or a slot of the static `LIVE`, given to this thread alone
    // (`count_unslotted`).
    unsafe { MY_SLOT.get().as_ref() }
}

/// Adds `delta` to this thread's own slot.
#[inline(always)]
fn add(slot: &AtomicIsize, delta: isize) {
    // A plain load and store: no other thread writes this slot; readers may see it late.
    slot.store(slot.load(Relaxed).wrapping_add(delta), Relaxed);
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
    /// Stops the worker's cache when the worker stops (its tasks are dropped on its thread).
    struct Keeping;
    impl Drop for Keeping {
        fn drop(&mut self) {
            Cache::flush(true);
        }
    }
    Cache::enable();
    let _keeping = Keeping;
    let mut every = tokio::time::interval(PURGE_DELAY * 5);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        Cache::flush(false);
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

mod cache;

pub use cache::Cache;

/// A block for `layout`: a kept one when its size is kept and one is there, else from
/// mimalloc's `plain` call when it gives the layout's alignment, else from its `aligned`
/// one; counted when there is one.
#[inline(always)]
unsafe fn take(
    layout: &Layout,
    zero: bool,
    plain_call: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_call: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    // A layout aligned past `MIN_ALIGN` goes straight to the aligned call: `class` would
    // refuse it too, but tested apart here the cache's hit path tests with two compares and
    // branches, where rustc folded `class` and `plain` into six instructions (+2 a take).
    let ptr = if layout.align() > MIN_ALIGN {
        aligned_call(layout.size(), layout.align())
    } else {
        match cache::class(layout.align(), layout.size()) {
            Some((size, index)) => {
                let block = cache::pop(index);
                if block.is_null() {
                    plain_call(size)
                } else {
                    if zero {
                        block.write_bytes(0, size);
                    }
                    block.cast()
                }
            }
            None if plain(layout.align(), layout.size()) => plain_call(layout.size()),
            None => aligned_call(layout.size(), layout.align()),
        }
    };
    if !ptr.is_null() {
        count(layout.size() as isize);
    }
    ptr as *mut u8
}

/// The size to ask mimalloc for, for `size` bytes at `align`: a kept size's step, so that
/// the block may go to its list when freed.
#[inline(always)]
fn asked(align: usize, size: usize) -> usize {
    cache::class(align, size).map_or(size, |(step, _)| step)
}

/// A free on a thread without a count slot of its own yet: counted there, then freed as
/// `dealloc` frees.
#[cold]
#[inline(never)]
unsafe fn dealloc_unslotted(ptr: *mut u8, layout: Layout) {
    count_unslotted(-(layout.size() as isize));
    release(ptr, layout);
}

/// A freed block to the cache when its size is kept and its stack has room, else to
/// mimalloc.
#[inline(always)]
unsafe fn release(ptr: *mut u8, layout: Layout) {
    if let Some((_, index)) = cache::class(layout.align(), layout.size()) {
        if cache::push(index, ptr) {
            return;
        }
    }
    mi::mi_free(ptr as *mut c_void);
}

// SAFETY: every block is mimalloc's own, taken with at least the layout's size and
// alignment, and freed once: to mimalloc, or to the cache that hands it out again for a
// layout no larger than its size's step; the count only follows them.
unsafe impl GlobalAlloc for Counted {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        take(&layout, false, mi::mi_malloc, mi::mi_malloc_aligned)
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        take(&layout, true, mi::mi_zalloc, mi::mi_zalloc_aligned)
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // `count`'s two cases apart: with its call to `count_unslotted` inline, this
        // function saved and restored three registers on every free.
        match own_slot() {
            Some(slot) => add(slot, -(layout.size() as isize)),
            None => return dealloc_unslotted(ptr, layout),
        }
        release(ptr, layout);
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A kept size's step here too: mimalloc keeps the block where it is when the new
        // size fits, and the block must then hold the step of the size it is freed at.
        let new = if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr as *mut c_void, asked(layout.align(), new_size))
        } else {
            mi::mi_realloc_aligned(
                ptr as *mut c_void,
                asked(layout.align(), new_size),
                layout.align(),
            )
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

    /// A worker's cache, on a thread of the test's own.
    fn on_a_caching_thread(test: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            Cache::enable();
            test();
            Cache::flush(true);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_worker_takes_first_the_block_of_its_size_it_freed_last() {
        on_a_caching_thread(|| {
            let first = Box::new([1u8; 700]);
            let second = Box::new([2u8; 700]);
            let (first_at, second_at) = (first.as_ptr(), second.as_ptr());
            drop(first);
            drop(second);
            assert_eq!(Cache::kept(), 2);
            // 690 bytes is the step of 700 (689..=704): the block freed last, then the other.
            let again = Box::new([3u8; 690]);
            assert_eq!(again.as_ptr(), second_at);
            let again_too = Box::new([4u8; 704]);
            assert_eq!(again_too.as_ptr(), first_at);
            assert_eq!(Cache::kept(), 0);
            // Another step's list is another list.
            drop(again);
            let other = Box::new([5u8; 720]);
            assert_ne!(other.as_ptr(), second_at);
            assert_eq!(Cache::kept(), 1);
            // Zeroed, even when it was kept.
            drop(other);
            let zeroed = vec![0u8; 715];
            assert!(zeroed.iter().all(|&b| b == 0));
            drop(again_too);
        });
    }

    #[test]
    fn a_thread_that_has_not_enabled_it_keeps_nothing_and_flush_gives_all_back() {
        std::thread::spawn(|| {
            drop(Box::new([0u8; 100]));
            assert_eq!(Cache::kept(), 0);
            Cache::enable();
            let blocks: Vec<Box<[u8; 100]>> = (0..100).map(|_| Box::new([0u8; 100])).collect();
            drop(blocks);
            // The Vec's own 800 bytes, and 32 of the hundred: a list holds no more.
            assert_eq!(Cache::kept(), 33);
            Cache::flush(false);
            assert_eq!(Cache::kept(), 0);
            drop(Box::new([0u8; 100]));
            assert_eq!(Cache::kept(), 1);
            Cache::flush(true);
            drop(Box::new([0u8; 100]));
            assert_eq!(Cache::kept(), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn every_block_holds_its_layout_through_random_takes_grows_and_frees() {
        use rand::{Rng, SeedableRng};
        on_a_caching_thread(|| {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(25);
            let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
            let check = |ptr: *mut u8, layout: Layout, fill: u8| {
                assert_eq!(ptr as usize % layout.align(), 0, "{layout:?}");
                // SAFETY: a live block of the layout, filled with `fill`.
                let bytes = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
                assert!(bytes.iter().all(|&b| b == fill), "{layout:?}");
                if let Some((step, _)) = cache::class(layout.align(), layout.size()) {
                    // SAFETY: a live mimalloc block.
                    let usable = unsafe { mi::mi_usable_size(ptr.cast()) };
                    assert!(usable >= step, "{layout:?}: {usable} < {step}");
                }
            };
            for round in 0..20_000u32 {
                let fill = round as u8;
                match rng.random_range(0..4) {
                    0 | 1 if live.len() < 200 => {
                        let size = if rng.random_bool(0.8) {
                            rng.random_range(1..=1100)
                        } else {
                            rng.random_range(1100..=5000)
                        };
                        let align = 1 << rng.random_range(0..7);
                        let layout = Layout::from_size_align(size, align).unwrap();
                        let zeroed = rng.random_bool(0.2);
                        // SAFETY: a layout of nonzero size.
                        let ptr = unsafe {
                            if zeroed {
                                Counted.alloc_zeroed(layout)
                            } else {
                                Counted.alloc(layout)
                            }
                        };
                        assert!(!ptr.is_null());
                        if zeroed {
                            check(ptr, layout, 0);
                        }
                        // SAFETY: the block holds the layout's size.
                        unsafe { ptr.write_bytes(fill, size) };
                        live.push((ptr, layout, fill));
                    }
                    2 if !live.is_empty() => {
                        let at = rng.random_range(0..live.len());
                        let (ptr, layout, old) = live[at];
                        check(ptr, layout, old);
                        let size = rng.random_range(1..=2000);
                        // SAFETY: a live block of `layout`, a nonzero new size.
                        let new = unsafe { Counted.realloc(ptr, layout, size) };
                        assert!(!new.is_null());
                        let kept = size.min(layout.size());
                        // SAFETY: realloc kept the first `kept` bytes; the block holds `size`.
                        let bytes = unsafe { std::slice::from_raw_parts(new, kept) };
                        assert!(bytes.iter().all(|&b| b == old));
                        unsafe { new.write_bytes(fill, size) };
                        let layout = Layout::from_size_align(size, layout.align()).unwrap();
                        live[at] = (new, layout, fill);
                    }
                    _ if !live.is_empty() => {
                        let (ptr, layout, old) = live.swap_remove(rng.random_range(0..live.len()));
                        check(ptr, layout, old);
                        // SAFETY: a live block of `layout`, freed once.
                        unsafe { Counted.dealloc(ptr, layout) };
                    }
                    _ => {}
                }
            }
            for (ptr, layout, old) in live {
                check(ptr, layout, old);
                // SAFETY: as above.
                unsafe { Counted.dealloc(ptr, layout) };
            }
        });
    }

    #[test]
    fn a_worker_keeps_blocks_while_give_back_runs_and_none_after() {
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            tokio::task::LocalSet::new().block_on(&runtime, async {
                let task = tokio::task::spawn_local(give_back());
                tokio::task::yield_now().await;
                drop(Box::new([0u8; 300]));
                assert_eq!(Cache::kept(), 1);
                task.abort();
                let _ = task.await;
                assert_eq!(Cache::kept(), 0);
                drop(Box::new([0u8; 300]));
                assert_eq!(Cache::kept(), 0);
            });
        })
        .join()
        .unwrap();
    }
}
