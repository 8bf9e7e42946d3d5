//! A per-thread pool of I/O buffers for HTTP/1 connections.
//!
//! A connection takes a buffer when bytes arrive or a message is to be written, and gives it
//! back as soon as no bytes wait in it, so a connection that waits (an idle keep-alive client
//! connection, a request waiting for its answer, a pooled client connection) holds no buffer:
//! the discipline of HAProxy's and sozu's buffer pools. Each thread keeps up to
//! [`MAX_FREE`] free buffers, so a busy connection's take and give are a pop and a push on a
//! thread-local list rather than an allocation and a free.
//!
//! Buffers are [`BytesMut`]: a request head decoded from a read buffer keeps the bytes it was
//! split from, so a read buffer may come back as the unused tail of an allocation that heads
//! still share. Such a tail is pooled like a whole buffer: the next connection reads into it,
//! so the heads of requests in flight share allocations rather than pin one each, and when a
//! reader needs more room than the tail has, `reserve` takes the whole allocation back if
//! nothing shares it any more (or allocates a new one, the old one being freed with its last
//! head).

use std::{cell::RefCell, mem};

use bytes::BytesMut;

/// The size of a new buffer: what the dispatcher and `Framed` reserve for a read.
pub const BUFFER_SIZE: usize = 8 * 1024;

/// A buffer with less room than this is not kept: a read would reserve more before using it.
const MIN_KEPT: usize = 1024;

/// A buffer that grew past this for a large message is freed when given back, so the pool
/// holds at most `MAX_FREE * MAX_KEPT` bytes per thread of its own (see [`sweep`] for the
/// tails whose allocation is larger than they show).
const MAX_KEPT: usize = 2 * BUFFER_SIZE;

/// Free buffers kept per thread: enough for the connections of a busy worker to take and give
/// without allocating, few enough that a burst leaves at most 1 MiB behind per thread.
pub const MAX_FREE: usize = 64;

/// Counts of this thread's pool, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Buffers in the pool now.
    pub free: usize,

    /// Buffers the pool allocated (takes that found it empty).
    pub allocated: u64,

    /// Buffers given back and freed rather than kept (the pool was full, or the buffer had
    /// outgrown [`BUFFER_SIZE`] or was nearly used up), and free ones found to be the last holder of a larger allocation.
    pub released: u64,

    /// Buffers taken and not given back: those held by connections now (and any dropped by
    /// their holder instead of given back, as when a connection is dropped mid-message).
    pub lent: usize,
}

struct Pool {
    free: Vec<BytesMut>,
    /// One past the free buffer [`sweep`] looked at last (it walks down).
    sweep: usize,
    allocated: u64,
    released: u64,
    lent: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            free: Vec::new(),
            sweep: 0,
            allocated: 0,
            released: 0,
            lent: 0,
        })
    };
}

/// Takes an empty buffer from this thread's pool, or allocates one of [`BUFFER_SIZE`].
///
/// Its capacity is at least 1 KiB; a reader reserves more as usual if it wants more room.
pub fn take() -> BytesMut {
    POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.lent += 1;
        match pool.free.pop() {
            Some(buf) => buf,
            None => {
                pool.allocated += 1;
                BytesMut::with_capacity(BUFFER_SIZE)
            }
        }
    })
    // the thread is ending: no pool to take from
    .unwrap_or_else(|_| BytesMut::with_capacity(BUFFER_SIZE))
}

/// Gives a buffer back to this thread's pool; bytes left in it are discarded.
///
/// It is kept unless the pool is full, the buffer has outgrown the pool's size, or it has less
/// than 1 KiB of room left even once reclaimed (the tail of an allocation that decoded messages
/// still share); then it is freed. A buffer with no capacity (never taken) is ignored.
pub fn give(mut buf: BytesMut) {
    give_from(&mut buf);
}

/// Gives `buf` back to the pool if it holds a buffer and no bytes wait in it, leaving it
/// without capacity.
#[inline]
pub(crate) fn give_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() != 0 {
        give_from(buf);
    }
}

/// Gives back a buffer [`take`]n in this same step and neither read into nor written into
/// (a read that found nothing to read): it is as the pool handed it out, so it goes back
/// without [`give`]'s checks. `buf` is left without capacity.
///
/// A connection's read takes a buffer before it knows whether bytes are there; once per
/// request on each side there are none yet, and the whole `give` cost ~120 instructions.
pub fn give_untouched(buf: &mut BytesMut) {
    debug_assert!(buf.is_empty());
    if POOL
        .try_with(|pool| put(&mut pool.borrow_mut(), buf, true))
        .is_err()
    {
        *buf = BytesMut::new();
    }
}

/// [`give`], taking the buffer out of `buf` (moved once, into the pool).
fn give_from(buf: &mut BytesMut) {
    let cap = buf.capacity();
    if cap == 0 {
        return;
    }

    buf.clear();
    // A view can hide most of its allocation (a write buffer advanced past the bytes written,
    // the tail of a large read): an allocation larger than the pool keeps is taken back whole
    // when nothing else shares it, so that its size shows and it is freed. A buffer of the
    // usual size is left as it is (a reader reserves, and so reclaims, when it needs room),
    // unless too little of it shows to be worth keeping.
    let _ = buf.try_reclaim(MAX_KEPT + 1);
    if buf.capacity() < MIN_KEPT {
        let _ = buf.try_reclaim(BUFFER_SIZE);
    }
    let keep = (MIN_KEPT..=MAX_KEPT).contains(&buf.capacity());

    let given = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        sweep(&mut pool);
        put(&mut pool, buf, keep);
    });
    if given.is_err() {
        *buf = BytesMut::new();
    }
}

/// A lent buffer back: into the free list if `keep` and there is room, else freed and
/// counted as released. `buf` is left without capacity either way.
#[inline(always)]
fn put(pool: &mut Pool, buf: &mut BytesMut, keep: bool) {
    pool.lent = pool.lent.saturating_sub(1);
    if keep && pool.free.len() < MAX_FREE {
        pool.free.push(mem::take(buf));
    } else {
        pool.released += 1;
        *buf = BytesMut::new();
    }
}

/// Looks at one free buffer per give, in turn, and frees it if it turns out to be the only
/// holder of an allocation larger than the pool keeps.
///
/// A tail pooled while decoded messages still shared its allocation (a request body's
/// chunks on their way upstream) shows only its own few KiB, but once those are gone it
/// alone keeps the whole allocation alive: up to the 128 KiB and more a read buffer grows
/// to for a body. A tail taken again is reclaimed whole by the next `reserve` and freed when
/// given back, but a tail deep in this last-in-first-out list may not be taken for hours, so
/// over a long run the free list could fill with such tails (issue #27: bench/soak's heap
/// profile after 26 minutes held read buffers of 100 KiB each behind this pool's
/// allocations, where the one after 5 minutes held 8 KiB ones).
/// With one look per give, walking down from the top to the bottom and starting again
/// (upward, the cursor would chase the top as gives push), every free buffer is looked at
/// within `MAX_FREE` gives of its last sharer going away, so what the pool alone keeps
/// stays within `MAX_FREE * MAX_KEPT`.
fn sweep(pool: &mut Pool) {
    if pool.free.is_empty() {
        return;
    }
    if pool.sweep == 0 || pool.sweep > pool.free.len() {
        pool.sweep = pool.free.len();
    }
    pool.sweep -= 1;
    let i = pool.sweep;
    // Only succeeds for a buffer nothing else shares whose allocation is larger than what
    // the pool keeps (it takes the whole allocation back to show it); a shared tail is
    // looked at again on a later round.
    if pool.free[i].try_reclaim(MAX_KEPT + 1) {
        drop(pool.free.swap_remove(i));
        pool.released += 1;
    }
}

/// Makes sure `buf` holds a buffer, taking one from the pool if it has no capacity.
#[inline]
pub(crate) fn ensure(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = take();
    }
}

/// This thread's pool counts.
pub fn stats() -> PoolStats {
    POOL.try_with(|pool| {
        let pool = pool.borrow();
        PoolStats {
            free: pool.free.len(),
            allocated: pool.allocated,
            released: pool.released,
            lent: pool.lent,
        }
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use bytes::Buf as _;

    use super::*;

    // Each test runs on a thread of its own, so it sees a pool of its own.

    #[test]
    fn a_given_buffer_is_taken_again_without_allocating() {
        let buf = take();
        assert_eq!(buf.capacity(), BUFFER_SIZE);
        let ptr = buf.as_ptr();
        give(buf);
        assert_eq!(stats().free, 1);

        let again = take();
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(stats().allocated, 1);
        assert_eq!(stats().lent, 1);
        give(again);
        assert_eq!(stats().lent, 0);
    }

    #[test]
    fn an_untouched_buffer_goes_back_as_it_was_taken() {
        let mut buf = take();
        let ptr = buf.as_ptr();
        give_untouched(&mut buf);
        assert_eq!(buf.capacity(), 0);
        assert_eq!((stats().free, stats().lent, stats().released), (1, 0, 0));

        let again = take();
        assert_eq!((again.as_ptr(), again.capacity()), (ptr, BUFFER_SIZE));
        assert_eq!(stats().allocated, 1);
        give(again);
    }

    #[test]
    fn a_shared_tail_is_pooled_and_whole_again_once_nothing_shares_it() {
        let mut buf = take();
        let start = buf.as_ptr();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = buf.split().freeze();

        // The head still shares the allocation: the tail is pooled as it is.
        give(buf);
        let tail = take();
        assert_eq!(tail.capacity(), BUFFER_SIZE - head.len());

        // Once the head is gone, a reader that wants room gets the whole allocation back.
        drop(head);
        give(tail);
        let mut whole = take();
        whole.reserve(BUFFER_SIZE);
        assert_eq!(whole.as_ptr(), start);
        assert_eq!(whole.capacity(), BUFFER_SIZE);

        // And a nearly used-up tail is reclaimed when it comes back, rather than freed.
        whole.extend_from_slice(&[0; BUFFER_SIZE - 100]);
        whole.advance(BUFFER_SIZE - 100);
        give(whole);
        assert_eq!(take().capacity(), BUFFER_SIZE);
        assert_eq!(stats().released, 0);
    }

    #[test]
    fn outgrown_and_used_up_buffers_are_freed() {
        let mut big = take();
        big.reserve(4 * BUFFER_SIZE);
        give(big);

        let mut buf = take();
        buf.extend_from_slice(&[0; BUFFER_SIZE - 100]);
        let _head = buf.split();
        give(buf);

        let stats = stats();
        assert_eq!((stats.free, stats.released, stats.lent), (0, 2, 0));
    }

    #[test]
    fn a_large_allocation_is_freed_however_little_of_it_shows() {
        let mut buf = take();
        buf.extend_from_slice(&[0; 1024 * 1024]);
        // As a write buffer is after a partial write: most of it advanced past.
        buf.advance(1024 * 1024 - 10);
        assert!(buf.capacity() < 2 * BUFFER_SIZE);
        give(buf);
        assert_eq!((stats().free, stats().released), (0, 1));
    }

    #[test]
    fn a_pooled_tail_that_alone_keeps_a_large_allocation_is_freed() {
        // A read buffer grown for a body, its bytes split off (chunks on their way
        // upstream) but for a little room at its end: that tail is pooled while the chunks
        // still share the allocation.
        let mut buf = take();
        buf.reserve(128 * 1024);
        let grown = buf.capacity();
        buf.extend_from_slice(&vec![0; grown - 2 * 1024]);
        let body = buf.split().freeze();
        give(buf);
        assert_eq!(stats().free, 1, "the shared tail is pooled");

        // Once the chunks are gone, the pooled tail alone keeps the 128 KiB alive: the next
        // give looks at it and frees it, and keeps what it was given.
        drop(body);
        give(take_fresh());
        let stats = stats();
        assert_eq!((stats.free, stats.released), (1, 1));
        let left = take();
        assert!(left.capacity() <= MAX_KEPT, "{}", left.capacity());
    }

    #[test]
    fn a_pooled_tail_still_shared_is_kept() {
        let mut buf = take();
        buf.reserve(128 * 1024);
        let grown = buf.capacity();
        buf.extend_from_slice(&vec![0; grown - 2 * 1024]);
        let _body = buf.split().freeze();
        give(buf);
        give(take_fresh());
        give(take_fresh());
        let stats = stats();
        assert_eq!((stats.free, stats.released), (3, 0));
    }

    /// A buffer of the pool's size that is not one of the pool's free ones.
    fn take_fresh() -> BytesMut {
        BytesMut::with_capacity(BUFFER_SIZE)
    }

    #[test]
    fn the_pool_keeps_at_most_max_free_buffers() {
        let bufs: Vec<_> = (0..MAX_FREE + 3).map(|_| take()).collect();
        bufs.into_iter().for_each(give);
        let stats = stats();
        assert_eq!((stats.free, stats.released), (MAX_FREE, 3));
    }

    #[test]
    fn bytes_left_in_a_given_buffer_are_discarded() {
        let mut buf = take();
        buf.extend_from_slice(b"left over");
        give(buf);
        assert!(take().is_empty());
    }
}
