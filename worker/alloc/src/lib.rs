//! This process's allocator: what it holds and how to make it give memory
//! back, for amm-worker (in its own process) and for the preload library
//! (inside any program).
//!
//! - [`jemalloc`]: statistics through `tikv-jemalloc-ctl`, purge, decay.
//! - [`glibc`]: `mallinfo2`, `malloc_info`, the arenas' residency, trim.
//! - [`reclaim`] / [`release_hoard`]: one purge or trim and what it
//!   returned; [`Governor`]: when a threshold purge may run (the
//!   `MALLOC_TRIM_THRESHOLD_` semantics, rate-limited and CPU-budgeted).
//! - [`publisher`]: the thread body that publishes these statistics into
//!   the process's allocator record (`amm-record`) and serves purge
//!   requests.
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

use serde::Serialize;

pub use amm_record::Allocator;
pub use purge::{
    Governor, PURGE_BUDGET, PurgeCost, PurgeReport, reclaim, release_hoard, thread_cpu_us,
};

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

    /// What a purge can give back: jemalloc's dirty and muzzy pages (its
    /// metadata and slab slack, also in `hoarded`, stay); glibc's hoard.
    pub fn purgeable(&self) -> u64 {
        match self {
            HeapStats::System(_) => self.hoarded(),
            HeapStats::Jemalloc(s) => s.dirty_bytes + s.muzzy_bytes,
        }
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

/// Reads `allocator`'s statistics.
pub fn heap_stats(allocator: Allocator, detail: Detail) -> io::Result<HeapStats> {
    match allocator {
        Allocator::Jemalloc => jemalloc::stats(detail).map(HeapStats::Jemalloc),
        Allocator::System => glibc::stats(detail).map(HeapStats::System),
    }
}

/// This process's resident set size (`/proc/self/statm`), bytes.
pub fn rss_bytes() -> io::Result<u64> {
    let statm = procfs::process::Process::myself()
        .and_then(|p| p.statm())
        .map_err(|e| io::Error::other(format!("reading /proc/self/statm: {e}")))?;
    Ok(statm.resident * procfs::page_size())
}
