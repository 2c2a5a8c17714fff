//! Which allocator serves this process, what it holds, and how to make it
//! give memory back.
//!
//! One binary carries both allocators. [`Dispatch`] is the `#[global_allocator]`
//! of the `amm-worker` binary: on the very first allocation of the process it
//! reads the environment variable [`ALLOCATOR_ENV`] (with `getenv`, which does
//! not allocate) and from then on sends every allocation, reallocation and
//! free to the same allocator: jemalloc (`tikv-jemallocator`, its symbols
//! prefixed so glibc's `malloc` stays intact) or glibc's `malloc`. The choice
//! can never change afterwards, so no pointer is ever freed by the other
//! allocator. On glibc, `Dispatch` also counts the live bytes of every
//! chunk it allocates and frees ([`glibc::counted`]), so a monitor tick
//! reads them without `mallinfo2`'s walk of every free chunk. The `--allocator` flag reaches that variable through the nanny
//! (it sets it in the worker's environment) or, with `--no-nanny`, through a
//! re-exec of the binary (see `cli`).

pub use amm_alloc::{Detail, HeapStats, PurgeCost, PurgeReport, glibc, jemalloc, thread_cpu_us};

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use glibc::counted::Op;
use serde::Serialize;
use tikv_jemallocator::Jemalloc;

/// The environment variable read at the first allocation: `jemalloc` or
/// `system` (anything else, or unset, means `system`; `cli` rejects other
/// values with an error before doing any work).
pub const ALLOCATOR_ENV: &str = "AMM_ALLOCATOR";

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const JEMALLOC: u8 = 2;
/// glibc, and `Dispatch` serves (and counts) the allocations.
const SYSTEM_COUNTED: u8 = 3;

static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

pub use amm_record::Allocator;

/// Decides the allocator from the environment, once. Runs inside the first
/// allocation, so it must not allocate: `getenv` returns a pointer into the
/// environment block.
#[cold]
fn decide() -> u8 {
    // SAFETY: the name is a NUL-terminated literal; getenv only reads.
    let p = unsafe { libc::getenv(c"AMM_ALLOCATOR".as_ptr()) };
    let want = if p.is_null() {
        SYSTEM
    } else {
        // SAFETY: getenv returned a NUL-terminated string that lives as long
        // as the environment is not modified; we read it at once.
        let v = unsafe { std::ffi::CStr::from_ptr(p) };
        if v.to_bytes().eq_ignore_ascii_case(b"jemalloc") || v.to_bytes() == b"je" {
            JEMALLOC
        } else {
            SYSTEM
        }
    };
    match CHOICE.compare_exchange(UNDECIDED, want, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => want,
        Err(already) => already,
    }
}

#[inline(always)]
fn choice() -> u8 {
    let c = CHOICE.load(Ordering::Relaxed);
    if c != UNDECIDED { c } else { decide() }
}

/// The choice, for `Dispatch` itself: on glibc, the first allocation it
/// serves starts the live-byte counts (a binary whose global allocator is
/// not `Dispatch` never counts, so its counts are never trusted).
#[inline(always)]
fn serving() -> u8 {
    let c = CHOICE.load(Ordering::Relaxed);
    if c == JEMALLOC || c == SYSTEM_COUNTED {
        c
    } else {
        begin_serving()
    }
}

#[cold]
fn begin_serving() -> u8 {
    if choice() == JEMALLOC {
        return JEMALLOC;
    }
    // before this allocation returns, so every block Dispatch serves is
    // counted
    glibc::counted::start();
    CHOICE.store(SYSTEM_COUNTED, Ordering::Release);
    SYSTEM_COUNTED
}

/// The allocator serving this process (deciding it now if nothing has been
/// allocated yet). In a binary without [`Dispatch`] as its global allocator
/// (the library's tests), this is what `Dispatch` *would* use; such a process
/// really runs on glibc malloc.
pub fn active() -> Allocator {
    if choice() == JEMALLOC {
        Allocator::Jemalloc
    } else {
        Allocator::System
    }
}

/// The global allocator of `amm-worker`: forwards to jemalloc or to glibc's
/// malloc, chosen once at the first allocation (see the module docs).
pub struct Dispatch;

// SAFETY: every method forwards to one allocator, the same one for the whole
// life of the process (CHOICE is written once, before the first allocation
// returns), so memory is always freed/reallocated by the allocator that
// allocated it. Both targets uphold GlobalAlloc's contract themselves. On
// glibc every block passed to `counted` is one glibc returned and that is
// still live (counted after it is returned, uncounted before it is freed),
// each inside one `Op` from before glibc is called until its count moved.
unsafe impl GlobalAlloc for Dispatch {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if serving() == JEMALLOC {
            // SAFETY: caller upholds GlobalAlloc::alloc's contract.
            unsafe { Jemalloc.alloc(layout) }
        } else {
            let op = Op::begin();
            // SAFETY: as above; the block is glibc's and just returned.
            unsafe {
                let p = System.alloc(layout);
                op.allocated(p);
                p
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if serving() == JEMALLOC {
            // SAFETY: caller upholds the contract.
            unsafe { Jemalloc.alloc_zeroed(layout) }
        } else {
            let op = Op::begin();
            // SAFETY: as above; the block is glibc's and just returned.
            unsafe {
                let p = System.alloc_zeroed(layout);
                op.allocated(p);
                p
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if serving() == JEMALLOC {
            // SAFETY: ptr came from Jemalloc (the choice never changes).
            unsafe { Jemalloc.dealloc(ptr, layout) }
        } else {
            let op = Op::begin();
            // SAFETY: ptr came from System, counted, and is still live.
            unsafe {
                op.freeing(ptr);
                System.dealloc(ptr, layout);
            }
            op.done();
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if serving() == JEMALLOC {
            // SAFETY: ptr came from Jemalloc.
            unsafe { Jemalloc.realloc(ptr, layout, new_size) }
        } else {
            let op = Op::begin();
            // SAFETY: ptr came from System, counted, and is live until the
            // realloc; a failed realloc leaves it live, so count it again.
            unsafe {
                op.freeing(ptr);
                let p = System.realloc(ptr, layout, new_size);
                op.allocated(if p.is_null() { ptr } else { p });
                p
            }
        }
    }
}

/// Reads the active allocator's statistics.
pub fn heap_stats(detail: Detail) -> std::io::Result<HeapStats> {
    amm_alloc::heap_stats(active(), detail)
}

/// Gives the active allocator's hoard back to the kernel and measures what
/// came back (see [`amm_alloc::reclaim`]).
pub fn reclaim(reason: &str) -> std::io::Result<PurgeReport> {
    amm_alloc::reclaim(active(), reason)
}

/// Purges (jemalloc) or trims (glibc) the active allocator's hoard, nothing
/// more (see [`amm_alloc::release_hoard`]).
pub fn release_hoard() -> (PurgeCost, std::io::Result<()>) {
    amm_alloc::release_hoard(active())
}

/// The outcome of [`verify_serving`]: which allocator's counters moved when
/// this process allocated a block.
#[derive(Debug, Clone, Serialize)]
pub struct ServingCheck {
    /// The allocator the dispatcher chose.
    pub chosen: Allocator,
    /// Growth of jemalloc's `stats.allocated` across the probe allocation.
    pub jemalloc_allocated_delta: i64,
    /// Growth of glibc's `uordblks + hblkhd` across the probe allocation.
    pub glibc_live_delta: i64,
    /// Size of the probe allocation.
    pub probe_bytes: u64,
    /// True when only the chosen allocator's counter grew by the probe size.
    pub verified: bool,
    /// Probes it took (other threads allocating or freeing between the two
    /// reads move the counters too, so an unclear probe is repeated).
    pub attempts: u32,
}

/// How many probes [`verify_serving`] makes before it says "not verified".
const SERVING_ATTEMPTS: u32 = 5;

/// Proves which allocator serves this process: allocates `probe_bytes`
/// through the global allocator and reads both allocators' counters before
/// and after. Only meaningful in a binary whose global allocator is
/// [`Dispatch`]. Reading jemalloc's counters initialises jemalloc in a
/// system-allocator process (a few hundred KiB).
pub fn verify_serving(probe_bytes: usize) -> std::io::Result<ServingCheck> {
    let mut attempts = 1;
    loop {
        let check = probe_serving(probe_bytes, attempts)?;
        if check.verified || attempts == SERVING_ATTEMPTS {
            return Ok(check);
        }
        tracing::debug!(
            jemalloc_delta = check.jemalloc_allocated_delta,
            glibc_delta = check.glibc_live_delta,
            "allocator probe unclear (other threads allocated meanwhile); probing again"
        );
        std::thread::sleep(Duration::from_millis(2));
        attempts += 1;
    }
}

fn probe_serving(probe_bytes: usize, attempts: u32) -> std::io::Result<ServingCheck> {
    let je_before = jemalloc::allocated_now()?;
    let gl_before = glibc::live_now();
    let mut probe: Vec<u8> = Vec::with_capacity(probe_bytes);
    probe.resize(probe_bytes, 1);
    let je_after = jemalloc::allocated_now()?;
    let gl_after = glibc::live_now();
    std::hint::black_box(&probe);
    drop(probe);
    let je = je_after as i64 - je_before as i64;
    let gl = gl_after as i64 - gl_before as i64;
    let chosen = active();
    let big = probe_bytes as i64;
    let small = big / 8;
    let verified = match chosen {
        Allocator::Jemalloc => je >= big && gl < small,
        Allocator::System => gl >= big && je < small,
    };
    Ok(ServingCheck {
        chosen,
        jemalloc_allocated_delta: je,
        glibc_live_delta: gl,
        probe_bytes: probe_bytes as u64,
        verified,
        attempts,
    })
}
