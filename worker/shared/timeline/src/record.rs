//! A read of a process's allocator record (`amm-record`) in the timeline's
//! terms: its statistics as a [`Heap`], a tick completed with them
//! ([`Tick::add_record`]), and the purge it ran as a [`PurgeReport`]. The
//! one conversion every reader of a foreign process's record uses: the
//! supervisor of `amm-worker -- CMD` and `amm-agent watch`.
//!
//! The record is written by the process itself, which may be hostile or
//! broken: every byte count is clamped to [`MAX_BYTES`] (more than any
//! process can map), so sums of a few of them never overflow and an absurd
//! value stays inside that process's own report.

use amm_record::{Allocator, PurgeReason, Snapshot};

use crate::event::PurgeReport;
use crate::heap::{ArenaPages, GlibcStats, Heap, JemallocStats};
use crate::split::Split;
use crate::tick::Tick;

/// The largest byte count believed from a record: 2^48 (256 TiB, twice the
/// x86-64 user address space).
pub const MAX_BYTES: u64 = 1 << 48;

fn b(v: u64) -> u64 {
    v.min(MAX_BYTES)
}

/// When a purge the record shows goes on a timeline: when it finished
/// (`finished_ns`, the record's `at_mono_ns`), so that it lies before the
/// reader's tick whose statistics already show what it returned. The
/// process wrote that time: one not after `after_ns` (the reader's previous
/// read began: the purge is new since then; 0 among them) or later than
/// `now_ns` is not believed, and the purge is put at `now_ns`.
pub fn purge_time_ns(finished_ns: u64, after_ns: u64, now_ns: u64) -> u64 {
    if finished_ns > after_ns && finished_ns <= now_ns {
        finished_ns
    } else {
        now_ns
    }
}

impl Heap {
    /// The record's statistics (`None` when it names no allocator amm
    /// knows).
    pub fn from_record(s: &Snapshot) -> Option<Heap> {
        let heap = match s.allocator? {
            Allocator::Jemalloc => {
                let j = &s.stats.jemalloc;
                Heap::Jemalloc(JemallocStats {
                    allocated: b(j.allocated),
                    active: b(j.active),
                    resident: b(j.resident),
                    mapped: b(j.mapped),
                    retained: b(j.retained),
                    metadata: b(j.metadata),
                    dirty_bytes: b(j.dirty_bytes),
                    muzzy_bytes: b(j.muzzy_bytes),
                    arenas: j
                        .arenas
                        .as_slice()
                        .iter()
                        .map(|a| ArenaPages {
                            arena: a.index.min(u64::from(u32::MAX)) as u32,
                            dirty_bytes: b(a.dirty_bytes),
                            muzzy_bytes: b(a.muzzy_bytes),
                        })
                        .collect(),
                    ..JemallocStats::default()
                })
            }
            Allocator::System => {
                let g = &s.stats.glibc;
                Heap::System(GlibcStats {
                    arena: b(g.arena_bytes),
                    ordblks: g.free_chunks.min(MAX_BYTES),
                    hblks: g.mmapped_chunks.min(MAX_BYTES),
                    uordblks: b(g.in_use_bytes),
                    fordblks: b(g.free_bytes),
                    hblkhd: b(g.mmapped_bytes),
                    keepcost: b(g.top_pad_bytes),
                    arena_resident: b(g.arena_resident),
                    arena_heaps: g.heaps_total.min(u64::from(u32::MAX)) as u32,
                    ..GlibcStats::default()
                })
            }
        };
        Some(heap)
    }
}

impl Tick {
    /// Completes a tick of the process's RSS with its record's read: the
    /// allocator's statistics, the split they give (nothing managed: amm
    /// holds none of a foreign program's data), how old they were, and how
    /// far RSS moved between the record's publication and this tick (the
    /// split's error bound). A record naming no allocator adds nothing.
    pub fn add_record(&mut self, s: &Snapshot) {
        let Some(heap) = Heap::from_record(s) else {
            return;
        };
        let (live, resident) = (heap.live(), heap.resident());
        self.split = Some(Split::of(self.process, 0, live, resident));
        self.heap_live = Some(live);
        self.allocator_resident = Some(resident);
        self.rss_moved = Some(self.process.abs_diff(b(s.stats.publication.rss_bytes)));
        self.stats_age_ms = Some(u64::try_from(s.age().as_millis()).unwrap_or(u64::MAX));
        self.heap = Some(heap);
    }
}

impl PurgeReport {
    /// The purge the record's publisher ran last, when its count says one
    /// ran since `seen` purges. A requested purge is `pressure` when
    /// `pressure_from` (the supervisor's pid) asked for it, `request` when
    /// someone else did; the publisher's own is `threshold`. Only the last
    /// of several purges between two reads has its details in the record.
    pub fn from_record(s: &Snapshot, seen: u64, pressure_from: Option<u32>) -> Option<PurgeReport> {
        let p = &s.stats.purge;
        if p.count <= seen || p.last.at_mono_ns == 0 {
            return None;
        }
        let o = &p.last;
        let reason = match o.why() {
            Some(PurgeReason::Threshold) => "threshold",
            Some(PurgeReason::Request)
                if pressure_from.is_some_and(|me| o.requested_by_pid == u64::from(me)) =>
            {
                "pressure"
            }
            Some(PurgeReason::Request) => "request",
            None => "allocator",
        };
        Some(PurgeReport {
            allocator: s.allocator,
            reason: reason.to_string(),
            returned_bytes: b(o.returned_bytes),
            rss_before: b(o.rss_before),
            rss_after: b(o.rss_after),
            hoarded_before: b(o.hoarded_before),
            hoarded_after: b(o.hoarded_after),
            duration_us: o.wall_ns / 1000,
            cpu_us: o.cpu_ns / 1000,
            ..PurgeReport::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amm_record::{PurgeOutcome, Stats};

    fn snapshot(allocator: Allocator, stats: Stats) -> Snapshot {
        Snapshot {
            allocator: Some(allocator),
            interval_ns: 100_000_000,
            state: "live",
            stats,
        }
    }

    #[test]
    fn absurd_numbers_from_a_record_are_clamped_and_never_overflow() {
        let mut st = Stats::default();
        st.jemalloc.allocated = u64::MAX;
        st.jemalloc.resident = u64::MAX;
        st.jemalloc.dirty_bytes = u64::MAX;
        st.jemalloc.muzzy_bytes = u64::MAX;
        st.publication.rss_bytes = u64::MAX;
        let mut t = Tick::rss(100 << 20);
        t.add_record(&snapshot(Allocator::Jemalloc, st));
        let h = t.heap.as_ref().expect("heap");
        assert_eq!(h.live(), MAX_BYTES);
        assert_eq!(h.purgeable(), 2 * MAX_BYTES);
        let s = t.split.expect("split");
        assert_eq!(s.unmanaged_live, MAX_BYTES);
        assert!(
            s.identity_error() > 0,
            "the record's lie shows as the split's error"
        );
        let mut st = Stats::default();
        st.glibc.in_use_bytes = u64::MAX;
        st.glibc.mmapped_bytes = u64::MAX;
        st.glibc.arena_resident = u64::MAX;
        let mut t = Tick::rss(1);
        t.add_record(&snapshot(Allocator::System, st));
        assert_eq!(t.heap_live, Some(2 * MAX_BYTES));
    }

    #[test]
    fn a_purge_is_pressure_only_when_this_supervisor_asked() {
        let mut st = Stats::default();
        st.purge.count = 1;
        st.purge.last = PurgeOutcome {
            reason: PurgeReason::Request.code(),
            requested_by_pid: 42,
            at_mono_ns: 1,
            returned_bytes: 7 << 20,
            cpu_ns: 3000,
            ..PurgeOutcome::default()
        };
        let s = snapshot(Allocator::System, st);
        let p = PurgeReport::from_record(&s, 0, Some(42)).expect("a new purge");
        assert_eq!(
            (p.reason.as_str(), p.returned_bytes, p.cpu_us),
            ("pressure", 7 << 20, 3)
        );
        let p = PurgeReport::from_record(&s, 0, Some(43)).expect("a new purge");
        assert_eq!(p.reason, "request");
        assert!(
            PurgeReport::from_record(&s, 1, Some(42)).is_none(),
            "already seen"
        );
        st.purge.last.reason = PurgeReason::Threshold.code();
        let p = PurgeReport::from_record(&snapshot(Allocator::System, st), 0, None);
        assert_eq!(p.map(|p| p.reason), Some("threshold".to_string()));
    }

    #[test]
    fn a_purge_is_placed_when_it_finished_unless_that_time_is_impossible() {
        let (after, now) = (1_000_000_000, 1_200_000_000);
        assert_eq!(purge_time_ns(1_150_000_000, after, now), 1_150_000_000);
        assert_eq!(purge_time_ns(now, after, now), now);
        // a broken or hostile record: never at or before the previous read,
        // never in the future, never 0
        for wrong in [0, after - 1, after, now + 1, u64::MAX] {
            assert_eq!(purge_time_ns(wrong, after, now), now, "{wrong}");
        }
    }
}
