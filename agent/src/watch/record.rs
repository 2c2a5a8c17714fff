//! The allocator record of a watched process that runs on the preload
//! library (`LD_PRELOAD=libamm_preload.so`, or under `amm-worker -- CMD`):
//! opened through `amm-record`'s verified reader, bound to the watched
//! task's start time, read every tick. Its statistics turn the kernel-only
//! report into an allocator-aware one (live, hoarded, purges), so leak,
//! hoard and fragmentation can be told apart for any program.

use std::time::{Duration, Instant};

use amm_record::{Access, Allocator, OpenError, Reader, Snapshot};
use amm_timeline::{ArenaPages, GlibcStats, Heap, JemallocStats, PurgeReport};

/// How often to look again for a record that is not there (yet).
const RETRY: Duration = Duration::from_secs(1);

/// Follows one process's record.
#[derive(Debug)]
pub struct RecordFollower {
    pid: u32,
    start_time: u64,
    reader: Option<Reader>,
    next_try: Instant,
    /// The refusal already said (said once).
    said: Option<String>,
    /// The last consistent, fresh read.
    pub last: Option<Snapshot>,
}

impl RecordFollower {
    /// For the process `pid` that started at `start_time` (clock ticks).
    pub fn new(pid: u32, start_time: u64) -> Self {
        Self {
            pid,
            start_time,
            reader: None,
            next_try: Instant::now(),
            said: None,
            last: None,
        }
    }

    /// Opens the record if not yet open (retrying every second: the
    /// preload publishes within its first interval), reads it, and returns
    /// the read when it is fresh. A refused record (forged, another
    /// task's, not sealed) is said once on stderr and never read.
    pub fn read(&mut self) -> Option<&Snapshot> {
        if self.reader.is_none() && Instant::now() >= self.next_try {
            self.next_try = Instant::now() + RETRY;
            match self.open() {
                Ok(r) => {
                    let what = r.info().allocator.map_or("unknown allocator", |a| a.name());
                    eprintln!(
                        "pid {}: reading its allocator record ({what}, published every {} ms)",
                        self.pid,
                        r.info().interval_ns / 1_000_000
                    );
                    self.reader = Some(r);
                }
                // not on the preload (yet): kernel data only
                Err(OpenError::NoRecord(_)) | Err(OpenError::NoProcess(_)) => {}
                Err(e) => {
                    let e = e.to_string();
                    if self.said.as_deref() != Some(e.as_str()) {
                        eprintln!("pid {}: {e}", self.pid);
                        self.said = Some(e);
                    }
                }
            }
        }
        let snap = self.reader.as_ref()?.snapshot().ok()?;
        if snap.is_stale() || snap.allocator.is_none() {
            return None;
        }
        self.last = Some(snap);
        self.last.as_ref()
    }

    /// The reader bound to the watched task: refused if the pid now names
    /// another task.
    fn open(&self) -> Result<Reader, OpenError> {
        let task = amm_record::Task::of(self.pid as i32)?;
        if task.start_time != self.start_time {
            return Err(OpenError::Replaced {
                pid: self.pid as i32,
                expected: self.start_time,
                found: task.start_time,
            });
        }
        amm_record::open_task(&task, Access::Read)
    }
}

/// The timeline's allocator statistics from a record's read.
pub fn heap_of(s: &Snapshot) -> Option<Heap> {
    let heap = match s.allocator? {
        Allocator::Jemalloc => {
            let j = &s.stats.jemalloc;
            Heap::Jemalloc(JemallocStats {
                allocated: j.allocated,
                active: j.active,
                resident: j.resident,
                metadata: j.metadata,
                dirty_bytes: j.dirty_bytes,
                muzzy_bytes: j.muzzy_bytes,
                arenas: j
                    .arenas
                    .as_slice()
                    .iter()
                    .map(|a| ArenaPages {
                        arena: a.index.min(u64::from(u32::MAX)) as u32,
                        dirty_bytes: a.dirty_bytes,
                        muzzy_bytes: a.muzzy_bytes,
                    })
                    .collect(),
                ..JemallocStats::default()
            })
        }
        Allocator::System => {
            let g = &s.stats.glibc;
            Heap::System(GlibcStats {
                uordblks: g.in_use_bytes,
                fordblks: g.free_bytes,
                hblkhd: g.mmapped_bytes,
                keepcost: g.top_pad_bytes,
                arena_resident: g.arena_resident,
                ..GlibcStats::default()
            })
        }
    };
    Some(heap)
}

/// The last purge, when the count says a new one ran since `seen`.
pub fn new_purge(s: &Snapshot, seen: u64) -> Option<PurgeReport> {
    let p = &s.stats.purge;
    if p.count <= seen || p.last.at_mono_ns == 0 {
        return None;
    }
    let reason = match p.last.why() {
        Some(amm_record::PurgeReason::Threshold) => "threshold",
        Some(amm_record::PurgeReason::Request) => "request",
        _ => "allocator",
    };
    Some(PurgeReport {
        allocator: s.allocator,
        reason: reason.to_string(),
        returned_bytes: p.last.returned_bytes,
        rss_before: p.last.rss_before,
        rss_after: p.last.rss_after,
        hoarded_before: p.last.hoarded_before,
        hoarded_after: p.last.hoarded_after,
        duration_us: p.last.wall_ns / 1000,
        ..PurgeReport::default()
    })
}
