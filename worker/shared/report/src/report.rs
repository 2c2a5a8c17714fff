//! The report: what `--json` prints (schema version [`REPORT_VERSION`]) and
//! what the text and HTML renderers draw from. Every field is always
//! present (empty lists and `null`s rather than missing keys), so a reader
//! can rely on the shape; fields are only ever added, and a change of
//! meaning bumps the version. Byte amounts are integers in bytes, times are
//! seconds since the run's first sample, rates are bytes per second.

use serde::Serialize;

use crate::fit::MannKendall;
use amm_timeline::{Levels, PurgeReport};

use crate::input::Source;
use crate::thresholds::Thresholds;

/// Version of the JSON shape.
pub const REPORT_VERSION: u32 = 1;

/// What explains a stretch's unmanaged memory, most serious first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The run's process was killed (the run's verdict only: by the kernel
    /// at the terminate page, the OOM killer, another process, or its own
    /// terminate); the headline says at what level and by whom.
    Killed,
    /// Live unmanaged memory grows while managed data and the workload are
    /// steady, and nothing gives it back.
    Leak,
    /// Memory outside the allocator grows (thread stacks, mmaps, file-backed
    /// or shared pages).
    NonHeapGrowth,
    /// The evidence is too thin for a verdict; the finding says what would
    /// decide it.
    Undecided,
    /// Freed memory stuck in partly used pages or slabs: a purge returns
    /// little of it.
    Fragmentation,
    /// Freed memory the allocator keeps: a purge returns it.
    Hoard,
    /// Live unmanaged memory grew, then stopped growing while the same work
    /// went on: a cache of the size it reached, not a leak.
    BoundedCache,
    /// Task temporaries (or data held for a while) that come and go.
    Transient,
    /// Managed data grows; unmanaged memory only follows it.
    ManagedGrowth,
    /// Nothing to explain.
    Steady,
}

impl Kind {
    /// The name used in text and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Killed => "killed",
            Kind::Leak => "leak",
            Kind::NonHeapGrowth => "non-heap growth",
            Kind::Undecided => "undecided",
            Kind::Fragmentation => "fragmentation",
            Kind::Hoard => "hoard",
            Kind::BoundedCache => "bounded cache",
            Kind::Transient => "transient",
            Kind::ManagedGrowth => "managed growth",
            Kind::Steady => "steady",
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// Where the data came from.
    pub source: Source,
    /// What is known about the allocator.
    pub allocator: AllocatorInfo,
    /// The run as a whole.
    pub run: RunInfo,
    /// The one-line answer.
    pub verdict: Verdict,
    /// Each stretch, in time order.
    pub stretches: Vec<Stretch>,
    /// Every purge/trim of the run.
    pub purges: Vec<PurgeRow>,
    /// The rules the verdicts were made with.
    pub thresholds: Thresholds,
}

/// Whether the allocator's statistics were available.
#[derive(Debug, Clone, Serialize)]
pub struct AllocatorInfo {
    /// True when the report could read the allocator's own statistics.
    pub available: bool,
    /// `jemalloc` or `system` (glibc malloc), when known.
    pub name: Option<String>,
    /// Why not, and what that means for the verdicts.
    pub note: Option<String>,
}

/// The run as a whole.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Seconds from the first sample to the last.
    pub duration_s: f64,
    /// Samples.
    pub ticks: usize,
    /// Processes (a nanny's restarts count).
    pub attempts: u32,
    /// Memory limit, bytes.
    pub limit_bytes: Option<u64>,
    /// Thresholds, bytes.
    pub levels: Levels,
    /// Largest RSS a sample saw.
    pub peak_process_bytes: u64,
    /// Levels reached, in order.
    pub levels_reached: Vec<LevelHit>,
    /// Whether the worker ran with `--probe-purge`.
    pub probe_purge: ProbeInfo,
    /// Each time a process of the run was killed, in order.
    pub killed: Vec<Killed>,
    /// Things the reader should know (lines skipped, teardown left out).
    pub notes: Vec<String>,
}

/// A process of the run that something ended.
#[derive(Debug, Clone, Serialize)]
pub struct Killed {
    /// Which attempt.
    pub attempt: u32,
    /// When, seconds.
    pub t_s: f64,
    /// The signal, when known.
    pub signal: Option<i32>,
    /// Who: `the kernel at the terminate page (...)`, `the kernel's OOM
    /// killer`, a process, its supervisor, the worker's own monitor.
    pub by: String,
    /// The memory level it was at, when known.
    pub level: Option<String>,
    /// RSS then (at the killing page for the kernel's kill), bytes.
    pub rss_bytes: Option<u64>,
    /// The kernel's exact peak RSS, bytes.
    pub peak_rss_bytes: Option<u64>,
    /// `rss_bytes` as a fraction of the limit.
    pub limit_fraction: Option<f64>,
    /// What explains the kill, when the run says (an OOM kill of a worker
    /// that spilled into memory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl Killed {
    /// One sentence: by whom, with which signal, at what level and RSS.
    pub fn describe(&self) -> String {
        let mut s = format!("at {:.1} s by {}", self.t_s, self.by);
        if let Some(sig) = self.signal {
            s.push_str(&format!(" (signal {sig})"));
        }
        if let Some(l) = &self.level {
            s.push_str(&format!(", level {l}"));
        }
        if let Some(r) = self.rss_bytes {
            s.push_str(&format!(", RSS {}", crate::units::bytes(r)));
            if let Some(f) = self.limit_fraction {
                s.push_str(&format!(" ({:.1} % of the limit)", 100.0 * f));
            }
        }
        if let Some(p) = self.peak_rss_bytes {
            s.push_str(&format!(", exact peak {}", crate::units::bytes(p)));
        }
        if let Some(c) = &self.cause {
            s.push_str(&format!("; {c}"));
        }
        s
    }
}

/// A level the process reached.
#[derive(Debug, Clone, Serialize)]
pub struct LevelHit {
    /// `spill`, `pause`, `terminate`.
    pub level: String,
    /// When first reached.
    pub t_s: f64,
    /// RSS then.
    pub process_bytes: u64,
}

/// `--probe-purge`.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeInfo {
    /// On or off.
    pub enabled: bool,
    /// Least time between two probe purges, ms.
    pub interval_ms: Option<u64>,
    /// Probe purges run.
    pub count: usize,
}

/// The one-line answer.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// The most serious verdict of any stretch.
    pub kind: Kind,
    /// Index of that stretch.
    pub stretch: Option<usize>,
    /// One sentence.
    pub headline: String,
    /// The other kinds found elsewhere in the run, one line each.
    pub also: Vec<String>,
}

/// One stretch of the run and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Stretch {
    /// Position in [`Report::stretches`].
    pub index: usize,
    /// First sample, s.
    pub from_s: f64,
    /// Last sample, s.
    pub to_s: f64,
    /// Workload phases it covers.
    pub phases: Vec<String>,
    /// Which process.
    pub attempt: u32,
    /// Samples.
    pub ticks: usize,
    /// Why it starts where it does: `run`, `attempt`, `phase`, `slope change`.
    pub cut: String,
    /// The verdict: the kind of the leading finding, or `steady`.
    pub verdict: Kind,
    /// One sentence.
    pub headline: String,
    /// Every finding, the leading one first.
    pub findings: Vec<Finding>,
    /// First, last, least and largest of each part of memory.
    pub memory: MemoryRanges,
}

/// Ranges of the accounting over a stretch (`null` when not measured).
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRanges {
    /// RSS.
    pub process: Range,
    /// Managed data.
    pub managed: Option<Range>,
    /// Live unmanaged.
    pub unmanaged_live: Option<Range>,
    /// Hoarded by the allocator.
    pub hoarded: Option<Range>,
    /// Outside the allocator.
    pub non_heap: Option<Range>,
    /// Managed data on disk.
    pub spilled: Option<Range>,
}

/// First, last, least, largest.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Range {
    /// At the first sample.
    pub first: u64,
    /// At the last sample.
    pub last: u64,
    /// Least.
    pub min: u64,
    /// Largest.
    pub max: u64,
}

impl Range {
    /// Over `v` (empty: all zero).
    pub fn of(v: &[u64]) -> Range {
        Range {
            first: v.first().copied().unwrap_or(0),
            last: v.last().copied().unwrap_or(0),
            min: v.iter().copied().min().unwrap_or(0),
            max: v.iter().copied().max().unwrap_or(0),
        }
    }
}

/// One thing found in a stretch, with its evidence.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What it is.
    pub kind: Kind,
    /// How much memory it is about, bytes (the growth of a leak, what a
    /// purge returned, the largest temporary, ...).
    pub bytes: u64,
    /// Its average share of the stretch's RSS, bytes: what ranks findings
    /// against each other.
    pub mean_bytes: u64,
    /// One sentence.
    pub headline: String,
    /// The fitted trend behind it, if any.
    pub trend: Option<Trend>,
    /// Purges that bear on it.
    pub purges: Vec<PurgeRef>,
    /// jemalloc size classes that hold it (grow, for a leak; slack, for
    /// fragmentation).
    pub size_classes: Vec<ClassRow>,
    /// Arenas that hold it.
    pub arenas: Vec<ArenaRow>,
    /// For `undecided`: what would decide it.
    pub would_decide: Option<String>,
    /// Other facts, one sentence each.
    pub notes: Vec<String>,
}

impl Finding {
    /// A finding with nothing but its kind, size and headline.
    pub fn new(kind: Kind, bytes: u64, mean_bytes: u64, headline: String) -> Finding {
        Finding {
            kind,
            bytes,
            mean_bytes,
            headline,
            trend: None,
            purges: Vec::new(),
            size_classes: Vec::new(),
            arenas: Vec::new(),
            would_decide: None,
            notes: Vec::new(),
        }
    }
}

/// A trend of one series over a window, fitted to its floor (the minimum
/// of each of [`Thresholds::floor_bins`] time bins).
#[derive(Debug, Clone, Serialize)]
pub struct Trend {
    /// `unmanaged_live`, `hoarded`, `non_heap`, `process`, `rss_file_shmem`.
    pub series: String,
    /// Start of the window, s.
    pub from_s: f64,
    /// End of the window, s.
    pub to_s: f64,
    /// Theil–Sen slope of the floor, bytes/s.
    pub slope_bytes_per_s: f64,
    /// Slope times window, bytes.
    pub growth_bytes: i64,
    /// R² of the least-squares line through the floor.
    pub r2: f64,
    /// Mann–Kendall test of the floor.
    pub mann_kendall: MannKendall,
    /// Floor points (time s, bytes), for the reader to check.
    pub floor: Vec<(f64, u64)>,
}

/// A purge that bears on a finding.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeRef {
    /// When, s.
    pub t_s: f64,
    /// `probe`, `threshold`, `pressure`, `spill`, `workload`.
    pub reason: String,
    /// Bytes the kernel saw leave.
    pub returned_bytes: u64,
    /// Hoarded before.
    pub hoarded_before: u64,
    /// Hoarded after.
    pub hoarded_after: u64,
}

impl PurgeRef {
    /// The reference to the purge `p` of the timeline, at `t_s`.
    pub fn new(t_s: f64, p: &PurgeReport) -> PurgeRef {
        PurgeRef {
            t_s,
            reason: p.reason.clone(),
            returned_bytes: p.returned_bytes,
            hoarded_before: p.hoarded_before,
            hoarded_after: p.hoarded_after,
        }
    }
}

/// Every purge of the run.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeRow {
    /// When, s.
    pub t_s: f64,
    /// Why it ran.
    pub reason: String,
    /// True for `--probe-purge`'s own purges.
    pub probe: bool,
    /// Bytes the kernel saw leave.
    pub returned_bytes: u64,
    /// Hoarded before.
    pub hoarded_before: u64,
    /// Hoarded after.
    pub hoarded_after: u64,
    /// How long it took, µs.
    pub duration_us: u64,
    /// The stretch it counts for.
    pub stretch: Option<usize>,
}

/// One jemalloc size class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassRow {
    /// Allocation size, bytes.
    pub size: u64,
    /// `small` (slabs) or `large` (extents).
    pub class: &'static str,
    /// Live allocations at the start of the window.
    pub count_before: u64,
    /// Live allocations at the end.
    pub count_after: u64,
    /// Live bytes gained over the window.
    pub live_delta_bytes: i64,
    /// Bytes of slabs that hold no live region (small classes).
    pub slack_bytes: u64,
    /// Live bytes over slab bytes, 0..1 (small classes; 1 for large).
    pub utilisation: f64,
}

impl ClassRow {
    /// One line about it: how its live count grew, or how thinly its slabs
    /// are used.
    pub fn describe(&self) -> String {
        if self.live_delta_bytes != 0 {
            format!(
                "size class {} B ({}): {} -> {} live, {}",
                self.size,
                self.class,
                self.count_before,
                self.count_after,
                crate::units::signed(self.live_delta_bytes)
            )
        } else {
            format!(
                "size class {} B ({}): {} live, {} slack, {:.0} % of slab bytes used",
                self.size,
                self.class,
                self.count_after,
                crate::units::bytes(self.slack_bytes),
                100.0 * self.utilisation
            )
        }
    }
}

/// One arena (jemalloc) or one glibc arena (`malloc_info`).
#[derive(Debug, Clone, Serialize)]
pub struct ArenaRow {
    /// Arena index (glibc: 0 is the main arena).
    pub arena: u32,
    /// jemalloc: dirty + muzzy bytes; glibc: bytes in free chunks.
    pub free_bytes: u64,
    /// glibc: bytes the arena has from the system (0 for jemalloc).
    pub system_bytes: u64,
    /// Change of `system_bytes` (glibc) or `free_bytes` (jemalloc) over the
    /// window (`null` when only one moment was looked at).
    pub delta_bytes: Option<i64>,
}
