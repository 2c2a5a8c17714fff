//! This process's allocator: what it holds and how to make it give memory
//! back, for amm-worker (in its own process) and for the preload library
//! (inside any program).
//!
//! - [`jemalloc`]: statistics through `tikv-jemalloc-ctl`, purge, decay.
//! - [`glibc`]: `mallinfo2`, `malloc_info`, the arenas' residency with
//!   `mincore`, trim; [`glibc::counted`]: live bytes counted by the global
//!   allocator; [`glibc::Sampler`]: the expensive reads within a CPU budget.
//! - [`HeapReader`]: a tick's reads, kept from tick to tick.
//! - [`reclaim`] / [`release_hoard`]: one purge or trim and what it
//!   returned; [`Governor`]: when a threshold purge may run (the
//!   `MALLOC_TRIM_THRESHOLD_` semantics: threshold, interval, a 2 % CPU
//!   budget).
//! - [`publisher`]: the thread body that publishes these statistics into
//!   the process's allocator record (`amm-record`) and serves purge
//!   requests; [`host`]: runs it inside a foreign program (the preload
//!   libraries: constructor, fork, exit; see `worker/preload/README.md`).
//!
//! It never chooses or installs an allocator (amm-worker's `Dispatch` and
//! the preload library do): callers say which one serves the process.
//! Reading jemalloc's statistics initialises jemalloc.

pub mod glibc;
pub mod host;
pub mod jemalloc;
pub mod publisher;
mod purge;

use std::io;

use procfs::FromRead;

pub use amm_record::Allocator;
pub use purge::{
    Governor, PURGE_BUDGET, PurgeCost, PurgeReport, reclaim, release_hoard, thread_cpu_us,
};

/// What the allocator holds right now: the timeline contract's type, so
/// what amm-worker, the preload library and the report read is one thing.
pub use amm_timeline::Heap as HeapStats;

/// How much detail to read: the summary numbers every tick needs, or also
/// the per-arena and per-size-class tables the timeline keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Totals only (cheap).
    Totals,
    /// Totals plus arenas and size classes.
    Full,
}

/// Reads `allocator`'s statistics once, everything fresh (a caller that
/// reads every tick keeps a [`HeapReader`]).
pub fn heap_stats(allocator: Allocator, detail: Detail) -> io::Result<HeapStats> {
    match allocator {
        Allocator::Jemalloc => jemalloc::stats(detail).map(HeapStats::Jemalloc),
        Allocator::System => glibc::stats(detail).map(HeapStats::System),
    }
}

/// Reads an allocator's statistics tick after tick at a bounded cost:
/// jemalloc's are cheap every time; glibc's expensive parts are read only
/// as often as [`glibc::Sampler`]'s budget allows.
#[derive(Debug)]
pub struct HeapReader {
    allocator: Allocator,
    glibc: glibc::Sampler,
}

impl HeapReader {
    /// A reader for `allocator`, called about every `interval`.
    pub fn new(allocator: Allocator, interval: std::time::Duration) -> HeapReader {
        HeapReader {
            allocator,
            glibc: glibc::Sampler::new(glibc::DEFAULT_BUDGET, interval),
        }
    }

    /// Has the next read refresh everything (after a purge or trim).
    pub fn expire(&mut self) {
        self.glibc.expire();
    }

    /// Reads the statistics.
    pub fn read(&mut self, detail: Detail) -> io::Result<HeapStats> {
        match self.allocator {
            Allocator::Jemalloc => jemalloc::stats(detail).map(HeapStats::Jemalloc),
            Allocator::System => self.glibc.stats(detail).map(HeapStats::System),
        }
    }
}

/// This process's resident set size (`/proc/self/statm`), bytes.
pub fn rss_bytes() -> io::Result<u64> {
    // never through a `File`: see `amm_record::sys::read_proc_self`
    let text = amm_record::sys::read_proc_self("statm")?;
    let statm = procfs::process::StatM::from_read(text.as_slice())
        .map_err(|e| io::Error::other(format!("reading /proc/self/statm: {e}")))?;
    Ok(statm.resident * procfs::page_size())
}
