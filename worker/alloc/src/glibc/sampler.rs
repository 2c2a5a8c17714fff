//! glibc statistics read tick after tick at a bounded cost.
//!
//! What a tick needs is cheap when this process counts its own live bytes
//! ([`super::counted`], amm-worker): the counts, and the arenas' residency
//! with `mincore` over ranges kept from the last `/proc/self/maps` scan.
//! The expensive parts are read only as often as keeps each of them under
//! a share of one CPU ([`Sampler::new`]'s `budget`, of the CPU time the
//! read took: `mallinfo2` and `malloc_info` hold the arenas' locks while
//! they walk the free chunks, for as long as the walk's CPU time unless the
//! scheduler preempts the reader. Its wall time is not the read's cost: on
//! a busy machine a 20 µs walk took milliseconds of wall time, its next
//! read was put off by a thousand times that, so the live bytes of a
//! program on the glibc preload were always about [`UNCOUNTED_MAX_AGE`]
//! old, while the arenas' residency was read fresh every tick: what a fill
//! added in the last second read as hoarded, what a free returned still
//! read as live):
//!
//! - `mallinfo2`: the free-chunk numbers (`fordblks`, `ordblks`,
//!   `keepcost`, ...) and, when nothing counts, the live bytes; when
//!   something counts, it also measures what the counts miss (allocations
//!   made before counting began or by C code), added to them until the next
//!   one — but only from a quiet read ([`counted::bracket`]: no counted
//!   allocation or free in flight during it). A busy read keeps the last
//!   quiet estimate (none yet: the counts alone, which miss only the C
//!   side's few bytes): one allocation in flight during the walk would
//!   otherwise leave the live bytes off by its size, in either direction,
//!   until the next `mallinfo2`, seconds away on a fragmented heap, and the
//!   accounting split off by as much;
//! - the `/proc/self/maps` scan that finds the arena heaps: when a heap
//!   vanished, or every [`HEAP_RESCAN`]; and, within a larger budget
//!   ([`MISSING_HEAPS_BUDGET`]), when more is live in the arenas than the
//!   known heaps hold (a new arena or heap);
//! - `malloc_info` (per-arena detail, only for [`Detail::Full`]).
//!
//! Where nothing counts, `mallinfo2` is the live bytes' only source and
//! runs at least every [`UNCOUNTED_MAX_AGE`] whatever its budget.
//! Every other tick reuses their last values; [`GlibcStats::mallinfo_age_ms`]
//! says how old they are.

use std::io;
use std::time::{Duration, Instant};

use super::counted::{self, During};
use super::{ArenaHeaps, GlibcArena, GlibcStats, Mallinfo, RegionResidency};
use crate::Detail;

/// The share of one CPU each expensive read may take by default.
pub const DEFAULT_BUDGET: f64 = 0.001;

/// How often the arena heaps are looked for again in `/proc/self/maps` at
/// most (new threads create arenas), unless a heap vanished.
pub const HEAP_RESCAN: Duration = Duration::from_secs(1);

/// The share of one CPU the scans for heaps known to be missing may take:
/// more than the periodic ones, since the residency (and so the hoard) is
/// wrong until they run; they stop once the heaps are found. A sampler
/// whose own budget is larger uses its own.
pub const MISSING_HEAPS_BUDGET: f64 = 0.01;

/// The oldest the live bytes may be where `mallinfo2` is their only source
/// (nothing counts them): its cost then is at most one read a second,
/// whatever the budget.
pub const UNCOUNTED_MAX_AGE: Duration = Duration::from_secs(1);

/// When an expensive read may run again.
#[derive(Debug, Default, Clone, Copy)]
struct Due(Option<Instant>);

impl Due {
    fn now(&self, now: Instant) -> bool {
        self.0.is_none_or(|t| now >= t)
    }

    /// Schedules the next run after one that began at `began` and cost
    /// `cpu_ns` of CPU, so it takes at most `budget` of one CPU, and never
    /// sooner than `floor` (see the module docs for why not its wall time).
    fn after(&mut self, began: Instant, cpu_ns: u64, budget: f64, floor: Duration) {
        self.0 = Some(began + budgeted(cpu_ns as f64 / 1e9, budget, floor));
    }
}

/// How long to wait before repeating something that cost `secs` so that it
/// takes at most `budget` of one CPU (and never more often than `floor`).
pub fn budgeted(secs: f64, budget: f64, floor: Duration) -> Duration {
    let gap = if budget > 0.0 {
        Duration::from_secs_f64((secs / budget).min(3600.0))
    } else {
        Duration::from_secs(3600)
    };
    gap.max(floor)
}

/// Whether a read measures the arenas' residency: always where the live
/// bytes are counted (they are as fresh), else only with a `mallinfo2`
/// (their only source there) or when it was never measured, so the hoard a
/// tick shows (resident less live) is of one moment. Measured every tick
/// against a `mallinfo2` up to a second old, what a fill added since read
/// as hoarded (a 100 MiB cache on the glibc preload showed 4–16 MiB of
/// "free chunks" while it filled under load, and the report said
/// "undecided" over it).
fn residency_due(mallinfo_read: bool, counted: bool, never: bool) -> bool {
    mallinfo_read || counted || never
}

/// What the counts miss: `mallinfo2` less the counts, from the last quiet
/// read (see the module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Uncounted {
    /// Bytes live in the arenas that the counts do not hold.
    pub arena: i64,
    /// Bytes in mmapped chunks that the counts do not hold.
    pub mmapped: i64,
    /// Reads that measured it.
    pub quiet_reads: u64,
    /// Reads that left it as it was (counted operations overlapped them).
    pub busy_reads: u64,
}

impl Uncounted {
    /// Takes the estimate from `mallinfo` if the counts were quiet during
    /// it; keeps it otherwise.
    fn update(&mut self, mallinfo: &Mallinfo, during: During) {
        match during {
            During::Quiet(c) => {
                self.arena = mallinfo.uordblks as i64 - c.arena;
                self.mmapped = mallinfo.hblkhd as i64 - c.mmapped;
                self.quiet_reads += 1;
            }
            During::Busy => self.busy_reads += 1,
            During::Uncounted => {}
        }
    }
}

/// glibc's statistics, kept between reads (see the module docs).
#[derive(Debug)]
pub struct Sampler {
    budget: f64,
    floor: Duration,
    mallinfo: Mallinfo,
    mallinfo_at: Option<Instant>,
    mallinfo_mono_ns: u64,
    next_mallinfo: Due,
    uncounted: Uncounted,
    heaps: Option<ArenaHeaps>,
    next_scan: Due,
    next_missing_scan: Due,
    residency: Vec<RegionResidency>,
    arenas: Vec<GlibcArena>,
    next_info: Due,
}

impl Sampler {
    /// A sampler whose expensive reads each take at most `budget` of one
    /// CPU, and run at most once per `floor` (the caller's interval).
    pub fn new(budget: f64, floor: Duration) -> Sampler {
        Sampler {
            budget,
            floor,
            mallinfo: Mallinfo::default(),
            mallinfo_at: None,
            mallinfo_mono_ns: 0,
            next_mallinfo: Due::default(),
            uncounted: Uncounted::default(),
            heaps: None,
            next_scan: Due::default(),
            next_missing_scan: Due::default(),
            residency: Vec::new(),
            arenas: Vec::new(),
            next_info: Due::default(),
        }
    }

    /// A sampler that reads everything on every call (one-off readers).
    pub fn every_time() -> Sampler {
        Sampler::new(f64::INFINITY, Duration::ZERO)
    }

    /// Reads the statistics: the cheap parts now, the expensive ones when
    /// they are due.
    pub fn stats(&mut self, detail: Detail) -> io::Result<GlibcStats> {
        let now = Instant::now();
        let mallinfo = self.next_mallinfo.now(now) || self.live_too_old(now);
        self.scan_heaps(now)?;
        // residency first: a fill while the reader is preempted between the
        // two then reads as live memory not yet resident (no hoard), a free
        // as the hoard it is, never as a hoard that is not there
        let counted = counted::totals().is_some();
        if residency_due(mallinfo, counted, self.residency.is_empty()) {
            self.measure_residency();
        }
        if mallinfo {
            self.read_mallinfo(now);
        }
        if detail == Detail::Full && self.next_info.now(now) {
            let cpu = amm_record::sys::thread_cpu_ns();
            self.arenas = super::parse_malloc_info(&super::malloc_info_xml()?);
            let cost = amm_record::sys::thread_cpu_ns().saturating_sub(cpu);
            self.next_info.after(now, cost, self.budget, self.floor);
        }
        Ok(self.current(detail))
    }

    /// Whether `mallinfo2` must run although its budget says wait: where
    /// nothing counts (a program on the glibc preload), it is the only
    /// source of the live bytes, and one slow read (its wall time under
    /// load, divided by the budget) must not leave them stale for a minute.
    fn live_too_old(&self, now: Instant) -> bool {
        counted::totals().is_none()
            && self
                .mallinfo_at
                .is_none_or(|t| now.duration_since(t) >= UNCOUNTED_MAX_AGE.max(self.floor))
    }

    fn read_mallinfo(&mut self, now: Instant) {
        let (mallinfo, during) = counted::bracket(super::mallinfo);
        self.mallinfo = mallinfo;
        self.uncounted.update(&mallinfo, during);
        self.mallinfo_at = Some(now);
        self.mallinfo_mono_ns = amm_record::sys::monotonic_ns();
        let cost = self.mallinfo.cpu_ns;
        self.next_mallinfo.after(now, cost, self.budget, self.floor);
    }

    fn scan_heaps(&mut self, now: Instant) -> io::Result<()> {
        let stale = self.heaps.as_ref().is_none_or(|h| h.is_stale(HEAP_RESCAN));
        let periodic = stale && self.next_scan.now(now);
        let missing = self.heaps_missing() && self.next_missing_scan.now(now);
        if !(periodic || missing) {
            return Ok(());
        }
        let cpu = amm_record::sys::thread_cpu_ns();
        let scanned = ArenaHeaps::scan();
        let cost = amm_record::sys::thread_cpu_ns().saturating_sub(cpu);
        self.next_scan
            .after(now, cost, self.budget, self.floor.min(HEAP_RESCAN));
        let gap = budgeted(cost as f64 / 1e9, self.missing_heaps_budget(), self.floor);
        self.next_missing_scan = Due(Some(now + gap));
        match scanned {
            Ok(h) => {
                self.heaps = Some(h);
                Ok(())
            }
            // keep using the last ranges; fail only if there are none
            Err(e) if self.heaps.is_none() => Err(e),
            Err(_) => Ok(()),
        }
    }

    /// The share of one CPU the scans for missing heaps may take: never
    /// less than the periodic ones' (a caller that lifts the budget lifts
    /// it for these too: with the fixed 1 %, a 0.15–0.4 ms scan put the
    /// next one 15–40 ms away, as long as a thread takes to fill a new
    /// arena, so whether a tick found it was a race).
    fn missing_heaps_budget(&self) -> f64 {
        self.budget.max(MISSING_HEAPS_BUDGET)
    }

    /// Makes the expensive reads due at the next call (after a trim, which
    /// changes what the free chunks and the arenas' tops hold).
    pub fn expire(&mut self) {
        self.next_mallinfo = Due::default();
        self.next_info = Due::default();
    }

    /// Whether more is live in the arenas than is resident in the known
    /// heaps: a thread made a new arena, or an arena a new heap, since the
    /// scan (or blocks were allocated and not touched yet, which the CPU
    /// budget keeps from costing much).
    fn heaps_missing(&self) -> bool {
        let known: u64 = self.residency.iter().map(|r| r.resident).sum();
        let (arena_live, _) = self.live();
        arena_live > known + (known / 100).max(1 << 20)
    }

    /// Measures the arena heaps' residency now (cheap: `mincore` over the
    /// kept ranges); a trim changes it, so the publisher calls this after
    /// one.
    pub fn measure_residency(&mut self) {
        if let Some(h) = self.heaps.as_mut() {
            self.residency = h.residency();
        }
    }

    /// Each arena heap's residency at the last measurement.
    pub fn residency(&self) -> &[RegionResidency] {
        &self.residency
    }

    /// How many arena heaps the last scan found.
    pub fn heap_count(&self) -> u32 {
        self.heaps.as_ref().map_or(0, ArenaHeaps::heap_count)
    }

    /// The last `mallinfo2`, and its `CLOCK_MONOTONIC` time (0: never).
    pub fn last_mallinfo(&self) -> (&Mallinfo, u64) {
        (&self.mallinfo, self.mallinfo_mono_ns)
    }

    /// What the counts miss, and how many `mallinfo2` reads measured it
    /// (quiet) or left it as it was (busy).
    pub fn uncounted(&self) -> Uncounted {
        self.uncounted
    }

    /// Live bytes in the arenas and in mmapped chunks: counted plus what
    /// the counts missed at the last quiet `mallinfo2`, or that
    /// `mallinfo2`'s where nothing counts.
    pub fn live(&self) -> (u64, u64) {
        match counted::totals() {
            Some(c) => (
                (c.arena + self.uncounted.arena).max(0) as u64,
                (c.mmapped + self.uncounted.mmapped).max(0) as u64,
            ),
            None => (self.mallinfo.uordblks, self.mallinfo.hblkhd),
        }
    }

    fn current(&self, detail: Detail) -> GlibcStats {
        let mi = &self.mallinfo;
        let (uordblks, hblkhd) = self.live();
        GlibcStats {
            arena: mi.arena,
            ordblks: mi.ordblks,
            hblks: mi.hblks,
            hblkhd,
            uordblks,
            fordblks: mi.fordblks,
            fsmblks: mi.fsmblks,
            keepcost: mi.keepcost,
            arena_resident: self.residency.iter().map(|h| h.resident).sum(),
            arena_heaps: self.heap_count(),
            live_counted: counted::counting(),
            mallinfo_age_ms: self
                .mallinfo_at
                .map_or(0, |t| t.elapsed().as_millis() as u64),
            arenas: if detail == Detail::Full {
                self.arenas.clone()
            } else {
                Vec::new()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_read_keeps_the_last_quiet_estimate() {
        let read = |uordblks, hblkhd| Mallinfo {
            uordblks,
            hblkhd,
            ..Mallinfo::default()
        };
        let mut u = Uncounted::default();
        let counts = counted::Counted {
            arena: 10 << 20,
            mmapped: 50 << 20,
        };
        u.update(&read((10 << 20) + 300_000, 50 << 20), During::Quiet(counts));
        assert_eq!((u.arena, u.mmapped), (300_000, 0));
        // the walk missed three 1 MiB blocks the counts already hold (the
        // session-4 failure: live 2.7 MB below the managed bytes)
        u.update(&read((10 << 20) + 300_000, 47 << 20), During::Busy);
        assert_eq!((u.arena, u.mmapped), (300_000, 0), "a busy read moved it");
        assert_eq!((u.quiet_reads, u.busy_reads), (1, 1));
        u.update(&read(0, 0), During::Uncounted);
        assert_eq!((u.arena, u.mmapped), (300_000, 0));
    }

    #[test]
    fn where_nothing_counts_residency_is_measured_with_mallinfo_only() {
        // nothing counts: only with a mallinfo2, or the first time
        assert!(residency_due(true, false, false));
        assert!(!residency_due(false, false, false));
        assert!(residency_due(false, false, true));
        // counted live bytes are fresh every tick: so is the residency
        assert!(residency_due(false, true, false));
    }

    /// A read that only waited for the CPU is not a costly read: the next
    /// one is due after the CPU it took over the budget, whatever the wall
    /// time (a busy machine's preemption put it off a thousand times).
    #[test]
    fn the_budget_counts_cpu_time_not_waiting() {
        let floor = Duration::from_millis(100);
        let began = Instant::now() - Duration::from_millis(50);
        let mut due = Due::default();
        // 20 µs of CPU in 50 ms of wall time
        due.after(began, 20_000, DEFAULT_BUDGET, floor);
        assert!(due.0.is_some_and(|t| t <= began + floor));
    }

    /// The scans for missing heaps take at least their own 1 % and never
    /// less than the sampler's budget: a caller with no budget limit finds
    /// a new arena at its next read (glibc_counted's CI failure).
    #[test]
    fn missing_heap_scans_get_at_least_the_samplers_budget() {
        let small = Sampler::new(DEFAULT_BUDGET, Duration::ZERO);
        assert_eq!(small.missing_heaps_budget(), MISSING_HEAPS_BUDGET);
        let unlimited = Sampler::new(1.0, Duration::ZERO);
        assert_eq!(unlimited.missing_heaps_budget(), 1.0);
        let cost = 400e-6;
        assert_eq!(
            budgeted(cost, unlimited.missing_heaps_budget(), Duration::ZERO),
            Duration::from_secs_f64(cost),
            "a 0.4 ms scan may run again 0.4 ms later, not 40 ms"
        );
    }

    #[test]
    fn costly_reads_run_less_often() {
        let i = Duration::from_millis(100);
        assert_eq!(budgeted(10e-6, 0.001, i), i, "10 µs: every interval");
        assert_eq!(
            budgeted(5e-3, 0.001, i),
            Duration::from_secs(5),
            "5 ms: every 5 s"
        );
        assert_eq!(budgeted(5e-3, 0.0, i), Duration::from_secs(3600));
        assert_eq!(
            budgeted(5e-3, f64::INFINITY, Duration::ZERO),
            Duration::ZERO
        );
    }

    #[test]
    fn where_nothing_counts_the_live_bytes_are_never_older_than_a_second() {
        // a budget so small that one read would wait for an hour
        assert!(
            counted::totals().is_none(),
            "this test process counts nothing"
        );
        let mut s = Sampler::new(1e-12, Duration::ZERO);
        s.stats(Detail::Totals).expect("first read");
        let (_, t0) = s.last_mallinfo();
        s.stats(Detail::Totals).expect("read within the budget");
        assert_eq!(s.last_mallinfo().1, t0, "the budget holds within a second");
        std::thread::sleep(UNCOUNTED_MAX_AGE + Duration::from_millis(20));
        s.stats(Detail::Totals).expect("read past the age");
        assert!(
            s.last_mallinfo().1 > t0,
            "mallinfo2 is read again after a second"
        );
    }

    #[test]
    fn a_sampler_keeps_the_expensive_parts_between_reads() {
        let mut s = Sampler::new(0.001, Duration::from_secs(60));
        let a = s.stats(Detail::Full).expect("first read");
        let (_, t0) = s.last_mallinfo();
        assert!(t0 > 0 && a.arena_heaps >= 1 && !a.arenas.is_empty());
        let b = s.stats(Detail::Full).expect("second read");
        assert_eq!(
            s.last_mallinfo().1,
            t0,
            "mallinfo2 read again within its floor"
        );
        assert_eq!(b.fordblks, a.fordblks);
        assert!(b.arena_resident > 0);
        let mut every = Sampler::every_time();
        every.stats(Detail::Totals).expect("read");
        let (_, t1) = every.last_mallinfo();
        every.stats(Detail::Totals).expect("read");
        assert!(
            every.last_mallinfo().1 > t1,
            "every_time reads mallinfo2 each call"
        );
    }
}
