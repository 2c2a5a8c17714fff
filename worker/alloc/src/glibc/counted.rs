//! glibc malloc's live bytes, counted by the program's own global
//! allocator as it allocates and frees (amm-worker's `Dispatch`), so that a
//! monitor tick need not call `mallinfo2`, which walks every free chunk
//! under every arena's lock.
//!
//! Each chunk is measured by its header, as glibc's own
//! `malloc_usable_size` does: the word before the pointer holds the chunk's
//! size in its upper bits and three flags in its lowest three, of which
//! `IS_MMAPPED` (2) marks a chunk served by `mmap`. So the two counts are
//! what `mallinfo2` calls `uordblks` (chunks in the arenas) and `hblkhd`
//! (mmapped chunks), less what was allocated before counting began or by C
//! code calling `malloc` directly; [`super::Sampler`] adds that difference
//! back, measured at each `mallinfo2` it still reads (rarely).
//!
//! The counters are sharded by thread (a shard per cache line, a thread
//! keeps one for life) and updated with relaxed atomic adds: no lock and no
//! allocation on the allocation path. A block freed by another thread than
//! the one that allocated it moves two shards in opposite directions; only
//! the sum means anything.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

/// glibc's chunk flags (low bits of the size word).
const FLAG_BITS: usize = 0b111;
/// glibc's `IS_MMAPPED` flag.
const IS_MMAPPED: usize = 0b010;

const SHARDS: usize = 64;

#[repr(align(64))]
struct Shard {
    arena: AtomicI64,
    mmapped: AtomicI64,
}

static COUNTS: [Shard; SHARDS] = [const {
    Shard {
        arena: AtomicI64::new(0),
        mmapped: AtomicI64::new(0),
    }
}; SHARDS];
static COUNTING: AtomicBool = AtomicBool::new(false);
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // const-initialised and without a destructor: reading it never
    // allocates and works until the thread's very end.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The live bytes counted so far: allocated less freed since counting
/// began (negative if more was freed than allocated, e.g. blocks from
/// before).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    /// Bytes in live chunks of the arenas (glibc's `uordblks`).
    pub arena: i64,
    /// Bytes in live mmapped chunks (glibc's `hblkhd`).
    pub mmapped: i64,
}

/// Says that this process's global allocator counts from now on: it calls
/// [`allocated`] after every glibc allocation and [`freeing`] before every
/// glibc free. Call it before the first counted allocation returns.
pub fn start() {
    COUNTING.store(true, Ordering::Release);
}

/// Whether [`start`] was called (counts are meaningful).
pub fn counting() -> bool {
    COUNTING.load(Ordering::Acquire)
}

/// The counts summed over every thread, or `None` if nothing counts.
pub fn totals() -> Option<Counted> {
    if !counting() {
        return None;
    }
    let (mut arena, mut mmapped) = (0i64, 0i64);
    for s in &COUNTS {
        arena += s.arena.load(Ordering::Relaxed);
        mmapped += s.mmapped.load(Ordering::Relaxed);
    }
    Some(Counted { arena, mmapped })
}

#[inline]
fn shard() -> &'static Shard {
    let i = SHARD
        .try_with(|s| {
            let mut i = s.get();
            if i == usize::MAX {
                i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
                s.set(i);
            }
            i
        })
        .unwrap_or(0);
    &COUNTS[i]
}

/// The chunk holding `ptr`: its size and whether it is mmapped.
///
/// # Safety
/// `ptr` must be a live block returned by glibc's `malloc`, `calloc`,
/// `realloc`, `posix_memalign` or `aligned_alloc`.
#[inline]
unsafe fn chunk(ptr: *mut u8) -> (i64, bool) {
    // SAFETY: glibc puts the chunk's size word right before every block it
    // returns (`mchunk_size`, what `malloc_usable_size` reads); the caller
    // guarantees ptr is such a block, so the word is mapped and ours.
    let head = unsafe { ptr.cast::<usize>().sub(1).read() };
    ((head & !FLAG_BITS) as i64, head & IS_MMAPPED != 0)
}

/// Counts a block glibc just returned (null is ignored).
///
/// # Safety
/// `ptr` is null or a live block just returned by glibc's allocator.
#[inline]
pub unsafe fn allocated(ptr: *mut u8) {
    if !ptr.is_null() {
        // SAFETY: the caller's guarantee.
        unsafe { add(ptr, 1) }
    }
}

/// Uncounts a block about to be given to glibc's `free` or `realloc`.
///
/// # Safety
/// `ptr` is null or a live block of glibc's allocator that was counted
/// with [`allocated`].
#[inline]
pub unsafe fn freeing(ptr: *mut u8) {
    if !ptr.is_null() {
        // SAFETY: the caller's guarantee.
        unsafe { add(ptr, -1) }
    }
}

#[inline]
unsafe fn add(ptr: *mut u8, sign: i64) {
    // SAFETY: passed on from allocated/freeing.
    let (bytes, mmapped) = unsafe { chunk(ptr) };
    let s = shard();
    if mmapped {
        s.mmapped.fetch_add(sign * bytes, Ordering::Relaxed);
    } else {
        s.arena.fetch_add(sign * bytes, Ordering::Relaxed);
    }
}
