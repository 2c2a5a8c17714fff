//! The record's bytes, version 1.
//!
//! One page of shared memory: an immutable [`Header`] (written once, before
//! the magic), the [`Control`] words that requesters write (purge requests),
//! the seqlock's sequence word, and the [`Stats`] the publisher refreshes,
//! stored as an array of 64-bit atomics. Every field is an atomic because
//! the memory is shared with another process that may be buggy or hostile:
//! plain reads of memory another process writes would be a data race.
//!
//! [`Stats`] is plain data (`#[repr(C)]`, only `u64`s, [`bytemuck::Pod`]):
//! the writer casts it to words and stores them, the reader loads words and
//! casts them back, so the layout is defined once.
//!
//! Compatibility: readers accept `version == VERSION` and a `size` at least
//! as large as the record they know. New fields are appended (the size
//! grows); an incompatible change bumps [`VERSION`].

use std::sync::atomic::{AtomicU32, AtomicU64};

use bytemuck::{Pod, Zeroable};
use serde::Serialize;
use serde::ser::SerializeSeq;

/// `AMM-REC\0`, little-endian: the first eight bytes of every record.
pub const MAGIC: u64 = u64::from_le_bytes(*b"AMM-REC\0");

/// The layout version this crate writes and reads.
pub const VERSION: u32 = 1;

/// How many arenas (jemalloc) the record lists one by one; the totals
/// always cover all of them.
pub const MAX_ARENAS: usize = 64;

/// How many glibc arena heaps the record lists one by one; the totals
/// always cover all of them.
pub const MAX_HEAPS: usize = 64;

/// [`Header::state`]: the publisher refreshes this record.
pub const STATE_LIVE: u32 = 1;
/// [`Header::state`]: the publisher moved to a new record (its uid changed,
/// or the program closed the record's descriptor); open the process again.
pub const STATE_SUPERSEDED: u32 = 2;
/// [`Header::state`]: the publisher stopped; the numbers are the last ones.
pub const STATE_CLOSED: u32 = 3;

/// Written once by the publisher before [`Header::magic`]; never changes
/// afterwards except `state`.
#[repr(C)]
#[derive(Debug)]
pub struct Header {
    /// [`MAGIC`], stored last.
    pub magic: AtomicU64,
    /// [`VERSION`].
    pub version: AtomicU32,
    /// `size_of::<RawRecord>()` of the writer.
    pub size: AtomicU32,
    /// The publisher's pid as `getpid()` returned it (its own PID namespace).
    pub pid: AtomicU32,
    /// The effective uid that created the record.
    pub owner_uid: AtomicU32,
    /// The publisher's start time: field 22 of `/proc/<pid>/stat`, clock
    /// ticks after boot. With `pid` it names one task, not a pid number.
    pub start_time: AtomicU64,
    /// The allocator serving the process: 0 none known (another allocator
    /// serves it), 1 glibc malloc, 2 jemalloc.
    pub allocator: AtomicU32,
    /// [`STATE_LIVE`], [`STATE_SUPERSEDED`] or [`STATE_CLOSED`].
    pub state: AtomicU32,
    /// How often the publisher refreshes the statistics, nanoseconds.
    pub interval_ns: AtomicU64,
    /// When the record was created, `CLOCK_MONOTONIC` nanoseconds.
    pub created_mono_ns: AtomicU64,
}

/// Words written by whoever may write the record (its owner and root):
/// purge requests. Both counters are futex words (shared, not private).
#[repr(C)]
#[derive(Debug)]
pub struct Control {
    /// Purge requests so far (wrapping). A requester adds one and wakes
    /// the publisher with `FUTEX_WAKE` on this word.
    pub request: AtomicU32,
    /// The last request the publisher served (its outcome is already in
    /// [`Stats::purge`]); woken with `FUTEX_WAKE`.
    pub answered: AtomicU32,
    /// The pid of the last requester, as it says (advisory).
    pub requester_pid: AtomicU32,
    /// The uid of the last requester, as it says (advisory).
    pub requester_uid: AtomicU32,
}

/// The whole record as it lies in shared memory.
#[repr(C)]
#[derive(Debug)]
pub struct RawRecord {
    /// Identity and format.
    pub header: Header,
    /// Purge requests.
    pub control: Control,
    /// The seqlock: odd while the publisher writes `data`.
    pub seq: AtomicU64,
    /// [`Stats`] as words.
    pub data: [AtomicU64; STATS_WORDS],
}

/// Bytes of the shared memory object: [`RawRecord`] rounded up to a page.
pub const RECORD_LEN: usize = size_of::<RawRecord>().next_multiple_of(4096);

/// How many 64-bit words [`Stats`] takes.
pub const STATS_WORDS: usize = size_of::<Stats>() / 8;

const _: () = assert!(size_of::<Stats>().is_multiple_of(8));
const _: () = assert!(size_of::<RawRecord>() <= 8192, "keep the record small");

/// What the publisher refreshes every interval, under the seqlock.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, Serialize)]
pub struct Stats {
    /// When and at what cost this publication was made.
    pub publication: Publication,
    /// jemalloc's statistics (zero unless the allocator is jemalloc).
    pub jemalloc: JemallocSection,
    /// glibc malloc's statistics (zero unless the allocator is glibc).
    pub glibc: GlibcSection,
    /// Purges and trims: the policy, the totals, the last one.
    pub purge: PurgeSection,
}

impl Default for Stats {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

/// When the statistics were read, and what publishing costs.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable, Serialize)]
pub struct Publication {
    /// `CLOCK_MONOTONIC` nanoseconds of this publication.
    pub mono_ns: u64,
    /// Wall-clock (`CLOCK_REALTIME`) nanoseconds since the Unix epoch.
    pub unix_ns: u64,
    /// Publications so far.
    pub count: u64,
    /// CPU time the publishing thread has used in total, nanoseconds.
    pub publisher_cpu_ns: u64,
    /// CPU time this publication took, nanoseconds.
    pub last_cpu_ns: u64,
    /// The process's resident set size when the statistics were read.
    pub rss_bytes: u64,
}

/// jemalloc's `stats.*` after an `epoch` advance (bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, Serialize)]
pub struct JemallocSection {
    /// `stats.allocated`: live allocations.
    pub allocated: u64,
    /// `stats.active`: active pages.
    pub active: u64,
    /// `stats.resident`: resident pages the allocator maps.
    pub resident: u64,
    /// `stats.mapped`: active extents mapped.
    pub mapped: u64,
    /// `stats.retained`: virtual memory kept but returned to the kernel.
    pub retained: u64,
    /// `stats.metadata`: the allocator's own metadata.
    pub metadata: u64,
    /// Dirty pages of all arenas (freed, resident, purgeable).
    pub dirty_bytes: u64,
    /// Muzzy pages of all arenas (`MADV_FREE`d, may still be resident).
    pub muzzy_bytes: u64,
    /// `arenas.narenas`: arenas that exist.
    pub narenas: u64,
    /// `opt.dirty_decay_ms` as configured (-1, never, is `u64::MAX`).
    pub dirty_decay_ms: u64,
    /// `opt.muzzy_decay_ms` as configured (-1, never, is `u64::MAX`).
    pub muzzy_decay_ms: u64,
    /// 1 when jemalloc's own background threads run.
    pub background_thread: u64,
    /// The arenas holding the most dirty + muzzy pages, by index.
    pub arenas: ArenaList,
}

/// Unused pages of one jemalloc arena.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable, Serialize)]
pub struct ArenaPages {
    /// Arena index.
    pub index: u64,
    /// Dirty bytes.
    pub dirty_bytes: u64,
    /// Muzzy bytes.
    pub muzzy_bytes: u64,
}

/// A bounded list of arenas.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ArenaList {
    /// Valid entries (readers clamp it to [`MAX_ARENAS`]).
    pub count: u64,
    /// The entries; only the first `count` mean anything.
    pub entries: [ArenaPages; MAX_ARENAS],
}

impl ArenaList {
    /// The valid entries.
    pub fn as_slice(&self) -> &[ArenaPages] {
        &self.entries[..bounded(self.count, MAX_ARENAS)]
    }
}

/// glibc malloc: `mallinfo2` (refreshed less often when it is costly) and
/// the measured residency of its arena heaps (bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, Serialize)]
pub struct GlibcSection {
    /// `arena`: bytes obtained with brk or heap mappings.
    pub arena_bytes: u64,
    /// `uordblks`: bytes in live chunks of the arenas.
    pub in_use_bytes: u64,
    /// `fordblks`: bytes in free chunks (resident or not).
    pub free_bytes: u64,
    /// `ordblks`: free chunks.
    pub free_chunks: u64,
    /// `fsmblks`: bytes in fastbin chunks.
    pub fastbin_bytes: u64,
    /// `keepcost`: free bytes at the top of the main arena (the top pad
    /// a trim can release).
    pub top_pad_bytes: u64,
    /// `hblkhd`: bytes in chunks served by `mmap`.
    pub mmapped_bytes: u64,
    /// `hblks`: chunks served by `mmap`.
    pub mmapped_chunks: u64,
    /// Resident bytes of the arena heaps (`mincore`).
    pub arena_resident: u64,
    /// Arena heaps found (main `[heap]` plus the other arenas' heaps).
    pub heaps_total: u64,
    /// The heaps, one by one (bounded).
    pub heaps: HeapList,
    /// `CLOCK_MONOTONIC` nanoseconds of the `mallinfo2` values above.
    pub mallinfo_mono_ns: u64,
    /// CPU time the last `mallinfo2` took, nanoseconds (it walks every free
    /// chunk under each arena's lock).
    pub mallinfo_cpu_ns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the residency values.
    pub residency_mono_ns: u64,
}

/// Residency of one glibc arena heap.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable, Serialize)]
pub struct HeapResidency {
    /// Start address.
    pub start: u64,
    /// Mapped, readable bytes.
    pub size: u64,
    /// Resident bytes.
    pub resident: u64,
}

/// A bounded list of heaps.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct HeapList {
    /// Valid entries (readers clamp it to [`MAX_HEAPS`]).
    pub count: u64,
    /// The entries; only the first `count` mean anything.
    pub entries: [HeapResidency; MAX_HEAPS],
}

impl HeapList {
    /// The valid entries.
    pub fn as_slice(&self) -> &[HeapResidency] {
        &self.entries[..bounded(self.count, MAX_HEAPS)]
    }
}

/// Why a purge ran ([`PurgeOutcome::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PurgeReason {
    /// Someone asked through the record.
    Request,
    /// The hoard passed `MALLOC_TRIM_THRESHOLD_`.
    Threshold,
}

impl PurgeReason {
    /// The code stored in the record.
    pub fn code(self) -> u64 {
        match self {
            PurgeReason::Request => 1,
            PurgeReason::Threshold => 2,
        }
    }

    /// The reason a stored code means (`None` for 0 or unknown codes).
    pub fn from_code(code: u64) -> Option<PurgeReason> {
        match code {
            1 => Some(PurgeReason::Request),
            2 => Some(PurgeReason::Threshold),
            _ => None,
        }
    }
}

/// Purges: the policy in force, totals, and the last one.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable, Serialize)]
pub struct PurgeSection {
    /// `MALLOC_TRIM_THRESHOLD_` the publisher purges at; `u64::MAX` when
    /// it purges only on request.
    pub threshold_bytes: u64,
    /// Least time between two threshold purges, nanoseconds.
    pub min_interval_ns: u64,
    /// Purges/trims so far.
    pub count: u64,
    /// Of those, asked for through the record.
    pub requested_count: u64,
    /// Of those, because the hoard passed the threshold.
    pub threshold_count: u64,
    /// Bytes the kernel saw leave the process over all purges.
    pub returned_bytes_total: u64,
    /// CPU time of all purges, nanoseconds.
    pub cpu_ns_total: u64,
    /// The last purge.
    pub last: PurgeOutcome,
}

/// One purge (jemalloc `arena.<all>.purge`) or trim (glibc `malloc_trim(0)`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable, Serialize)]
pub struct PurgeOutcome {
    /// The request number it answered (0 when nobody asked).
    pub ticket: u64,
    /// [`PurgeReason::code`].
    pub reason: u64,
    /// Who asked (as the requester said), 0 when nobody asked.
    pub requested_by_pid: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when it finished.
    pub at_mono_ns: u64,
    /// Process RSS before.
    pub rss_before: u64,
    /// Process RSS after.
    pub rss_after: u64,
    /// `rss_before - rss_after` (0 when other threads grew meanwhile).
    pub returned_bytes: u64,
    /// Purgeable bytes before (jemalloc dirty + muzzy; glibc resident - live).
    pub hoarded_before: u64,
    /// Purgeable bytes after.
    pub hoarded_after: u64,
    /// CPU time the purge took, nanoseconds.
    pub cpu_ns: u64,
    /// Wall time the purge took, nanoseconds.
    pub wall_ns: u64,
}

impl PurgeOutcome {
    /// Why it ran.
    pub fn why(&self) -> Option<PurgeReason> {
        PurgeReason::from_code(self.reason)
    }
}

fn bounded(count: u64, max: usize) -> usize {
    usize::try_from(count).unwrap_or(max).min(max)
}

impl Serialize for ArenaList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let items = self.as_slice();
        let mut seq = s.serialize_seq(Some(items.len()))?;
        for a in items {
            seq.serialize_element(a)?;
        }
        seq.end()
    }
}

impl Serialize for HeapList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let items = self.as_slice();
        let mut seq = s.serialize_seq(Some(items.len()))?;
        for h in items {
            seq.serialize_element(h)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_fits_one_page() {
        assert_eq!(RECORD_LEN, 4096, "size {}", size_of::<RawRecord>());
        assert_eq!(STATS_WORDS * 8, size_of::<Stats>());
    }

    #[test]
    fn hostile_counts_are_clamped() {
        let mut s = Stats::default();
        s.jemalloc.arenas.count = u64::MAX;
        s.glibc.heaps.count = 1 << 40;
        assert_eq!(s.jemalloc.arenas.as_slice().len(), MAX_ARENAS);
        assert_eq!(s.glibc.heaps.as_slice().len(), MAX_HEAPS);
    }
}
