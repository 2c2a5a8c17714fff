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
//! allocator. The `--allocator` flag reaches that variable through the nanny
//! (it sets it in the worker's environment) or, with `--no-nanny`, through a
//! re-exec of the binary (see `cli`).

pub mod glibc;
pub mod jemalloc;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tikv_jemallocator::Jemalloc;

/// The environment variable read at the first allocation: `jemalloc` or
/// `system` (anything else, or unset, means `system`; `cli` rejects other
/// values with an error before doing any work).
pub const ALLOCATOR_ENV: &str = "AMM_ALLOCATOR";

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const JEMALLOC: u8 = 2;

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
// allocated it. Both targets uphold GlobalAlloc's contract themselves.
unsafe impl GlobalAlloc for Dispatch {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if choice() == JEMALLOC {
            // SAFETY: caller upholds GlobalAlloc::alloc's contract.
            unsafe { Jemalloc.alloc(layout) }
        } else {
            // SAFETY: as above.
            unsafe { System.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if choice() == JEMALLOC {
            // SAFETY: caller upholds the contract.
            unsafe { Jemalloc.alloc_zeroed(layout) }
        } else {
            // SAFETY: as above.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if choice() == JEMALLOC {
            // SAFETY: ptr came from Jemalloc (the choice never changes).
            unsafe { Jemalloc.dealloc(ptr, layout) }
        } else {
            // SAFETY: ptr came from System.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if choice() == JEMALLOC {
            // SAFETY: ptr came from Jemalloc.
            unsafe { Jemalloc.realloc(ptr, layout, new_size) }
        } else {
            // SAFETY: ptr came from System.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

/// What the allocator holds right now, in the terms of the accounting.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "allocator", rename_all = "lowercase")]
pub enum HeapStats {
    /// glibc malloc.
    System(glibc::GlibcStats),
    /// jemalloc.
    Jemalloc(jemalloc::JemallocStats),
}

impl HeapStats {
    /// Bytes handed out and not yet freed (`heap_live`).
    pub fn live(&self) -> u64 {
        match self {
            HeapStats::System(s) => s.live(),
            HeapStats::Jemalloc(s) => s.allocated,
        }
    }

    /// Bytes the allocator holds in physically resident pages: live data,
    /// free-but-resident space, and its metadata.
    pub fn resident(&self) -> u64 {
        match self {
            HeapStats::System(s) => s.resident(),
            HeapStats::Jemalloc(s) => s.resident,
        }
    }

    /// Resident bytes holding no live allocation (`hoarded`).
    pub fn hoarded(&self) -> u64 {
        self.resident().saturating_sub(self.live())
    }
}

/// How much detail to read: the summary numbers every tick needs, or also
/// the per-arena and per-size-class tables the timeline keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Totals only (cheap).
    Totals,
    /// Totals plus arenas and size classes.
    Full,
}

/// Reads the active allocator's statistics.
pub fn heap_stats(detail: Detail) -> std::io::Result<HeapStats> {
    match active() {
        Allocator::Jemalloc => jemalloc::stats(detail).map(HeapStats::Jemalloc),
        Allocator::System => glibc::stats(detail).map(HeapStats::System),
    }
}

/// What one purge (jemalloc) or trim (glibc) gave back.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeReport {
    /// Which allocator was asked.
    pub allocator: Allocator,
    /// Why the purge ran (`threshold`, `pressure`, `workload`, ...).
    pub reason: String,
    /// Process RSS before, in bytes.
    pub rss_before: u64,
    /// Process RSS after, in bytes.
    pub rss_after: u64,
    /// Bytes the kernel saw leave the process (`rss_before - rss_after`, 0 if
    /// other threads grew meanwhile).
    pub returned_bytes: u64,
    /// The allocator's own resident bytes before.
    pub resident_before: u64,
    /// The allocator's own resident bytes after.
    pub resident_after: u64,
    /// Hoarded bytes before (resident - live).
    pub hoarded_before: u64,
    /// Hoarded bytes after.
    pub hoarded_after: u64,
    /// How long the purge took, in microseconds.
    pub duration_us: u64,
    /// CPU time the purging thread spent on it (user + kernel), in
    /// microseconds: the purge's cost, which wall time overstates on a busy
    /// machine.
    pub cpu_us: u64,
}

/// Gives the allocator's hoard back to the kernel: jemalloc
/// `arena.<MALLCTL_ARENAS_ALL>.purge`, glibc `malloc_trim(0)`; measures what
/// came back (kernel RSS and the allocator's own resident figure).
pub fn reclaim(reason: &str) -> std::io::Result<PurgeReport> {
    let allocator = active();
    let before = heap_stats(Detail::Totals)?;
    let rss_before = crate::proc::rss_bytes()?;
    let (cost, purged) = release_hoard();
    purged?;
    let rss_after = crate::proc::rss_bytes()?;
    let after = heap_stats(Detail::Totals)?;
    Ok(PurgeReport {
        allocator,
        reason: reason.to_string(),
        rss_before,
        rss_after,
        returned_bytes: rss_before.saturating_sub(rss_after),
        resident_before: before.resident(),
        resident_after: after.resident(),
        hoarded_before: before.hoarded(),
        hoarded_after: after.hoarded(),
        duration_us: cost.wall_us,
        cpu_us: cost.cpu_us,
    })
}

/// What one purge/trim cost the thread that ran it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PurgeCost {
    /// Wall time, microseconds.
    pub wall_us: u64,
    /// CPU time (user + kernel), microseconds.
    pub cpu_us: u64,
}

/// Purges (jemalloc) or trims (glibc) the hoard, nothing more: no
/// statistics are read (see [`reclaim`] for a purge that says what it
/// returned). The cost is measured even when jemalloc refuses the purge.
pub fn release_hoard() -> (PurgeCost, std::io::Result<()>) {
    let start = Instant::now();
    let cpu_start = thread_cpu_us();
    let result = match active() {
        Allocator::Jemalloc => jemalloc::purge_all(),
        Allocator::System => {
            glibc::trim();
            Ok(())
        }
    };
    let cost = PurgeCost {
        wall_us: duration_micros(start.elapsed()),
        cpu_us: thread_cpu_us().saturating_sub(cpu_start),
    };
    (cost, result)
}

/// CPU time of the calling thread so far (`CLOCK_THREAD_CPUTIME_ID`), in
/// microseconds; 0 if the clock cannot be read.
pub fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
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
