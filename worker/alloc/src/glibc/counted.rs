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
//! code calling `malloc` directly (and the freed chunks glibc's per-thread
//! cache still holds); [`super::Sampler`] adds that difference back,
//! measured at the last quiet `mallinfo2` it read (see below).
//!
//! The counters are sharded by thread (a shard per cache line, a thread
//! keeps one for life) and updated with atomic adds: no lock and no
//! allocation on the allocation path. A block freed by another thread than
//! the one that allocated it moves two shards in opposite directions; only
//! the sum means anything.
//!
//! **What the counts miss** is `mallinfo2` less the counts, and it is only
//! true if no counted operation ran while `mallinfo2` walked the arenas: a
//! block allocated after the walk passed its arena but counted before the
//! counts were read again (or freed the other way round) would leave the
//! difference off by its size until the next `mallinfo2`, which the CPU
//! budget may put seconds away. So every counted operation is bracketed:
//! each shard counts the operations that `begun` (before glibc is called)
//! and `ended` (after the count moved), and [`bracket`] says a read was
//! [`During::Quiet`] only if no operation was in flight when it began and
//! none began until it ended: then `mallinfo2` and the counts describe the
//! same set of blocks, exactly. A count that is merely equal before and
//! after is not enough (a block allocated and freed during the walk, or an
//! allocation in flight across it, leaves the sums equal).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering, fence};

/// glibc's chunk flags (low bits of the size word).
const FLAG_BITS: usize = 0b111;
/// glibc's `IS_MMAPPED` flag.
const IS_MMAPPED: usize = 0b010;

const SHARDS: usize = 64;

#[repr(align(64))]
struct Shard {
    begun: AtomicU64,
    arena: AtomicI64,
    mmapped: AtomicI64,
    ended: AtomicU64,
}

/// A set of sharded counts (the process has one, [`COUNTS`]; tests make
/// their own).
struct Counts([Shard; SHARDS]);

impl Counts {
    const fn new() -> Counts {
        Counts(
            [const {
                Shard {
                    begun: AtomicU64::new(0),
                    arena: AtomicI64::new(0),
                    mmapped: AtomicI64::new(0),
                    ended: AtomicU64::new(0),
                }
            }; SHARDS],
        )
    }

    /// Begins one counted operation on this thread's shard.
    #[inline]
    fn op(&self) -> Op<'_> {
        let s = &self.0[shard_index()];
        s.begun.fetch_add(1, Ordering::SeqCst);
        Op(s)
    }

    /// The counts, and the operations begun and ended, read in the order
    /// that makes [`Counts::bracket`] sound: `ended` before `begun` (so
    /// every operation seen ended was seen begun), the counts last.
    fn read(&self) -> (u64, u64, Counted) {
        let ended = self.0.iter().map(|s| s.ended.load(Ordering::SeqCst)).sum();
        let begun = self.0.iter().map(|s| s.begun.load(Ordering::SeqCst)).sum();
        let (mut arena, mut mmapped) = (0i64, 0i64);
        for s in &self.0 {
            arena += s.arena.load(Ordering::SeqCst);
            mmapped += s.mmapped.load(Ordering::SeqCst);
        }
        (begun, ended, Counted { arena, mmapped })
    }

    fn begun(&self) -> u64 {
        self.0.iter().map(|s| s.begun.load(Ordering::SeqCst)).sum()
    }

    /// Runs `f` and says whether any counted operation overlapped it.
    fn bracket<T>(&self, f: impl FnOnce() -> T) -> (T, During) {
        let (begun, ended, counts) = self.read();
        fence(Ordering::SeqCst);
        let value = f();
        fence(Ordering::SeqCst);
        let quiet = begun == ended && self.begun() == begun;
        (
            value,
            if quiet {
                During::Quiet(counts)
            } else {
                During::Busy
            },
        )
    }
}

static COUNTS: Counts = Counts::new();
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

/// What the counted operations did while [`bracket`] ran a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum During {
    /// Nothing counts in this process.
    Uncounted,
    /// An operation was in flight or began meanwhile: the read and the
    /// counts may describe different blocks.
    Busy,
    /// No operation overlapped the read: these counts describe exactly the
    /// blocks it saw.
    Quiet(Counted),
}

/// Says that this process's global allocator counts from now on: it wraps
/// every glibc allocation, reallocation and free in an [`Op`]. Call it
/// before the first counted allocation returns.
pub fn start() {
    COUNTING.store(true, Ordering::Release);
}

/// Whether [`start`] was called (counts are meaningful).
pub fn counting() -> bool {
    COUNTING.load(Ordering::Acquire)
}

/// The counts summed over every thread, or `None` if nothing counts.
pub fn totals() -> Option<Counted> {
    counting().then(|| COUNTS.read().2)
}

/// Runs `f` (a read of glibc's own numbers, `mallinfo2`) and says whether
/// the counts describe the same blocks as that read (see the module docs).
pub fn bracket<T>(f: impl FnOnce() -> T) -> (T, During) {
    if !counting() {
        return (f(), During::Uncounted);
    }
    COUNTS.bracket(f)
}

#[inline]
fn shard_index() -> usize {
    SHARD
        .try_with(|s| {
            let mut i = s.get();
            if i == usize::MAX {
                i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
                s.set(i);
            }
            i
        })
        .unwrap_or(0)
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

/// One counted glibc operation, from before glibc is called until its
/// count moved: begin it with [`Op::begin`], then [`Op::freeing`] before
/// glibc frees, and end it with [`Op::allocated`] or [`Op::done`].
#[must_use = "an operation that never ends makes every read busy"]
pub struct Op<'a>(&'a Shard);

impl Op<'static> {
    /// Begins an operation (before calling glibc).
    #[inline]
    pub fn begin() -> Op<'static> {
        COUNTS.op()
    }
}

impl Op<'_> {
    /// Uncounts a block about to be given to glibc's `free` or `realloc`
    /// (null is ignored).
    ///
    /// # Safety
    /// `ptr` is null or a live block of glibc's allocator that was counted.
    #[inline]
    pub unsafe fn freeing(&self, ptr: *mut u8) {
        if !ptr.is_null() {
            // SAFETY: the caller's guarantee.
            let (bytes, mmapped) = unsafe { chunk(ptr) };
            self.add(-bytes, mmapped);
        }
    }

    /// Counts a block glibc just returned (null is ignored) and ends the
    /// operation.
    ///
    /// # Safety
    /// `ptr` is null or a live block just returned by glibc's allocator.
    #[inline]
    pub unsafe fn allocated(self, ptr: *mut u8) {
        if !ptr.is_null() {
            // SAFETY: the caller's guarantee.
            let (bytes, mmapped) = unsafe { chunk(ptr) };
            self.add(bytes, mmapped);
        }
        self.done();
    }

    /// Ends the operation (after glibc returned and the count moved).
    #[inline]
    pub fn done(self) {
        self.0.ended.fetch_add(1, Ordering::SeqCst);
    }

    #[inline]
    fn add(&self, bytes: i64, mmapped: bool) {
        if mmapped {
            self.0.mmapped.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.0.arena.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet(c: &Counts) -> Option<Counted> {
        match c.bracket(|| ()).1 {
            During::Quiet(counts) => Some(counts),
            _ => None,
        }
    }

    #[test]
    fn a_read_with_nothing_in_flight_is_quiet_and_has_the_counts() {
        let c = Counts::new();
        let op = c.op();
        op.add(4096, false);
        op.done();
        let op = c.op();
        op.add(1 << 20, true);
        op.done();
        assert_eq!(
            quiet(&c),
            Some(Counted {
                arena: 4096,
                mmapped: 1 << 20
            })
        );
    }

    #[test]
    fn an_operation_in_flight_across_the_whole_read_makes_it_busy() {
        // glibc already returned the block, its count not yet moved: the
        // read would see a block the counts do not
        let c = Counts::new();
        let op = c.op();
        assert_eq!(quiet(&c), None);
        op.add(2 << 20, true);
        op.done();
        assert!(quiet(&c).is_some());
    }

    #[test]
    fn a_block_allocated_and_freed_during_the_read_makes_it_busy() {
        // the counts are equal before and after, yet the walk may have
        // seen the block live (what a "counts unchanged" check misses)
        let c = Counts::new();
        let (_, during) = c.bracket(|| {
            let op = c.op();
            op.add(3 << 20, true);
            op.done();
            let op = c.op();
            op.add(-(3 << 20), true);
            op.done();
        });
        assert_eq!(during, During::Busy);
        assert_eq!(quiet(&c), Some(Counted::default()));
    }

    #[test]
    fn an_operation_that_begins_during_the_read_makes_it_busy() {
        let c = Counts::new();
        let (op, during) = c.bracket(|| c.op());
        assert_eq!(during, During::Busy);
        op.done();
    }
}
