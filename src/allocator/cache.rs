//! Blocks a worker keeps after they are freed, to hand out again before mimalloc's: the
//! block freed last is taken first. mimalloc reuses a page's freed blocks only once the
//! blocks freed before them are used up, so at c=1000 a request's blocks were ones its
//! worker last touched some 500 requests before: 94% of `mi_malloc`'s samples were the
//! cache miss on the block's free-list link (2.5% of the CPU the proxy and its backends
//! shared), and the block's other lines missed again as the request filled them. glibc's
//! tcache and jemalloc's keep such a stack too (bench/README.md, "Seventh session").
//!
//! Per size of up to [`CACHED_MAX`] bytes in steps of 16; blocks of those sizes come from
//! mimalloc at the size rounded up to the step, so that any block of a size's list holds
//! the largest size of the step. Only the threads that [`enable`](Cache::enable) it keep
//! blocks (the workers, for as long as they run): a thread that ends with blocks in its
//! stacks would leak them.

use std::cell::Cell;

/// The largest size kept: a request's future is 976 bytes.
pub const CACHED_MAX: usize = 1024;
const STEP_SHIFT: u32 = 4;
const SIZES: usize = CACHED_MAX >> STEP_SHIFT;
/// Blocks kept per size: at most 32 × (16 + 32 + … + 1024) = 1 MiB a worker, in
/// practice the dozen sizes a request uses; `give_back` empties it twice a second.
const DEPTH: u32 = 32;

pub struct Cache {
    heads: [Cell<*mut u8>; SIZES],
    lens: [Cell<u32>; SIZES],
    /// 0 on a thread that keeps nothing, else `DEPTH`.
    depth: Cell<u32>,
}

thread_local! {
    // `const`, without a destructor: see `super::MY_SLOT`.
    static CACHE: Cache = const {
        Cache {
            heads: [const { Cell::new(std::ptr::null_mut()) }; SIZES],
            lens: [const { Cell::new(0) }; SIZES],
            depth: Cell::new(0),
        }
    };
}

/// The size a block of `size` bytes at `align` is taken from mimalloc at, and its
/// list; `None` when the layout is not kept (too large, or aligned beyond what every
/// mimalloc block of 16 bytes or more is).
#[inline(always)]
pub fn class(align: usize, size: usize) -> Option<(usize, usize)> {
    if size > CACHED_MAX || align > super::MIN_ALIGN {
        return None;
    }
    let index = (size.wrapping_sub(1)) >> STEP_SHIFT;
    Some(((index + 1) << STEP_SHIFT, index))
}

/// The block freed last of list `index`, if there is one.
#[inline(always)]
pub fn pop(index: usize) -> *mut u8 {
    CACHE.with(|cache| {
        // SAFETY: `index` < SIZES, from `class`.
        let head = unsafe { cache.heads.get_unchecked(index) };
        let block = head.get();
        if !block.is_null() {
            // SAFETY: a block `push` linked: its first word is the next one's address.
            head.set(unsafe { block.cast::<*mut u8>().read() });
            let len = unsafe { cache.lens.get_unchecked(index) };
            len.set(len.get() - 1);
        }
        block
    })
}

/// Keeps `block` for list `index` unless the list is full; false when it is not kept.
#[inline(always)]
pub fn push(index: usize, block: *mut u8) -> bool {
    CACHE.with(|cache| {
        // SAFETY: `index` < SIZES, from `class`.
        let len = unsafe { cache.lens.get_unchecked(index) };
        if len.get() >= cache.depth.get() {
            return false;
        }
        let head = unsafe { cache.heads.get_unchecked(index) };
        // SAFETY: a freed block of at least 16 bytes, 8-aligned: room for the link.
        unsafe { block.cast::<*mut u8>().write(head.get()) };
        head.set(block);
        len.set(len.get() + 1);
        true
    })
}

impl Cache {
    /// How many blocks this thread keeps now.
    #[cfg(test)]
    pub fn kept() -> usize {
        CACHE.with(|cache| cache.lens.iter().map(|len| len.get() as usize).sum())
    }

    /// This thread keeps blocks from now on.
    pub fn enable() {
        CACHE.with(|cache| cache.depth.set(DEPTH));
    }

    /// Gives every kept block back to mimalloc; with `stop`, keeps none from now on.
    pub fn flush(stop: bool) {
        CACHE.with(|cache| {
            if stop {
                cache.depth.set(0);
            }
            for (head, len) in cache.heads.iter().zip(&cache.lens) {
                let mut block = head.replace(std::ptr::null_mut());
                len.set(0);
                while !block.is_null() {
                    // SAFETY: as in `pop`; the block is mimalloc's, freed by no one else.
                    let next = unsafe { block.cast::<*mut u8>().read() };
                    unsafe { libmimalloc_sys::mi_free(block.cast()) };
                    block = next;
                }
            }
        });
    }
}
