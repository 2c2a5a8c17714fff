//! The verdicts: for each stretch, what explains its unmanaged memory.
//!
//! Rules, in the order they are tried (numbers in [`Thresholds`]; "counts"
//! means at least [`Thresholds::significant`] of the stretch):
//!
//! * **Leak** — the *floor* of `unmanaged_live` (the minimum of each of 6
//!   time bins, so task temporaries do not count) rises: Mann–Kendall
//!   p ≤ 0.01, the growth counts (the Theil–Sen slope times the window, but
//!   never more than the rise actually seen), the window is at
//!   least 4 s; managed data grew by at most a tenth of that; and the growth
//!   is not freed later in the workload. A purge cannot return live memory;
//!   the purges that ran are listed as having failed to.
//! * **Undecided** (instead of a leak) — the floor rises but too little,
//!   too briefly or not surely enough (p ≤ 0.05); or it rises while managed
//!   data grows by more than bookkeeping explains; or (glibc) memory is
//!   hoarded and no trim has shown whether it comes back. Each says what
//!   would decide it: a window of N s, a stretch of steady managed data, a
//!   purge (`--probe-purge`).
//! * **Hoard** — freed memory the allocator keeps: a purge returned it
//!   (the kernel saw it leave), or jemalloc counts it as dirty/muzzy pages,
//!   which a purge always returns.
//! * **Fragmentation** — freed memory a purge cannot return: jemalloc slab
//!   slack (`active − allocated`, listed by size class), or what glibc still
//!   hoards right after a trim (listed by arena).
//! * **Bounded cache** (instead of a leak) — the floor rose, then stayed
//!   flat for at least as long as the leak window while the same phase went
//!   on: growth that stops while the workload is unchanged is a cache of
//!   the size it reached.
//! * **Transient** — `unmanaged_live` rose above its floor and fell back
//!   (task temporaries; a rise that never falls, like a staircase's steps
//!   above a line fitted through them, is not one), or a growth freed later
//!   in the workload (data held for a while).
//! * **Non-heap growth** — the floor of `non_heap` (RSS outside the
//!   allocator) rises as a leak's would.
//! * **Managed growth** — managed data grew; unmanaged memory only followed.
//!
//! The stretch's verdict is its most serious finding: leak, then non-heap
//! growth, then undecided (but an undecided between a hoard and
//! fragmentation, which only a trim decides, ranks with them); hoard,
//! fragmentation, bounded cache and managed
//! growth, which can all be true at once, are ranked by their average share
//! of the stretch's memory (jemalloc's dirty pages, its slab slack, glibc's
//! hoard split by what a trim returned, the cache's size, managed data
//! above its start); then transient: temporaries that came back rank below
//! memory that stays when the allocator kept a good part of them (a hoard of
//! at least half their bytes: freed temporaries glibc kept until a trim make
//! the stretch a hoard), and are weighed by bytes with the others when it
//! kept only a few pages. The run's verdict is the most serious
//! stretch verdict, and among stretches as serious the one whose finding
//! holds the most bytes (a trim's 238 MiB hoard outweighs the 17 MiB it
//! left). A run whose process was killed (by the kernel at the terminate
//! page, the OOM killer, a signal from another process, or its own
//! terminate) says so first: `killed`, at what level, by whom, and what its
//! memory was before.
//!
//! From kernel data alone (no allocator statistics) only RSS is known: a
//! rise of anonymous memory stays undecided (a leak, a hoard and
//! fragmentation look alike there), a rise of file-backed/shared memory is
//! non-heap growth, RSS that falls back is transient.

mod heap;
mod kernel;
mod kill;
#[cfg(test)]
mod tests;
mod trend;
mod unmanaged;

use amm_timeline::{Event, PurgeReport, Split, Tick};

use crate::input::{At, Run, Source};
use crate::report::{
    AllocatorInfo, Finding, Killed, Kind, LevelHit, MemoryRanges, ProbeInfo, PurgeRef, PurgeRow,
    REPORT_VERSION, Range, Report, RunInfo, Stretch, Verdict,
};
use crate::segment::{self, Span};
use crate::thresholds::Thresholds;
use crate::units::bytes;

/// Analyses a run with the given thresholds.
pub fn analyze(run: &Run, th: &Thresholds) -> Report {
    let spans = segment::segment(run, th);
    // each purge counts for the stretch of the last tick before it
    let purge_owner: Vec<Option<usize>> = run
        .purges()
        .map(|(t, _)| {
            spans.iter().position(|s| {
                let ticks = &run.ticks[s.range.clone()];
                ticks.first().is_some_and(|a| a.t <= t)
                    && run.ticks.get(s.range.end).is_none_or(|n| n.t > t)
            })
        })
        .collect();
    let mut stretches: Vec<Stretch> = Vec::new();
    for i in 0..spans.len() {
        let owned: Vec<usize> = purge_owner
            .iter()
            .enumerate()
            .filter(|(_, o)| **o == Some(i))
            .map(|(k, _)| k)
            .collect();
        let ctx = Ctx {
            run,
            th,
            spans: &spans,
            index: i,
            purges: owned,
        };
        stretches.push(ctx.stretch());
    }
    let kills = kill::kills(run);
    let verdict = overall(&stretches, &kills);
    let purges = run
        .purges()
        .zip(&purge_owner)
        .map(|((t, p), owner)| PurgeRow {
            t_s: t,
            reason: p.reason.clone(),
            probe: p.is_probe(),
            returned_bytes: p.returned_bytes,
            hoarded_before: p.hoarded_before,
            hoarded_after: p.hoarded_after,
            duration_us: p.duration_us,
            stretch: *owner,
        })
        .collect::<Vec<_>>();
    let probe_count = purges.iter().filter(|p| p.probe).count();
    Report {
        version: REPORT_VERSION,
        source: run.source,
        allocator: allocator_info(run),
        run: run_info(run, &spans, probe_count, kills),
        verdict,
        stretches,
        purges,
        thresholds: *th,
    }
}

fn allocator_info(run: &Run) -> AllocatorInfo {
    match run.source {
        // amm-agent watch of a process on the preload library: its record
        Source::Kernel if run.ticks.iter().any(|t| t.heap.is_some()) => AllocatorInfo {
            available: true,
            name: run.allocator.map(|a| a.name().to_string()),
            note: None,
        },
        Source::Kernel => AllocatorInfo {
            available: false,
            name: None,
            note: Some(
                "kernel data only (RSS, faults, levels): the allocator's statistics are \
                 unavailable, so a leak, a hoard and fragmentation look alike here and a rise \
                 of anonymous memory stays undecided. To decide, run the workload under \
                 amm-worker, or purge/trim the process (malloc_trim(0) for glibc) and watch \
                 whether RSS falls."
                    .into(),
            ),
        },
        Source::AgentTimeline if run.ticks.iter().any(|t| t.heap.is_some()) => AllocatorInfo {
            available: true,
            name: run.allocator.map(|a| a.name().to_string()),
            note: None,
        },
        Source::AgentTimeline => AllocatorInfo {
            available: false,
            name: None,
            note: Some(
                "live from amm-agent's timeline: the worker's accounting split and the kernel's \
                 levels, without the allocator's statistics, phases or purges, so hoard and \
                 fragmentation cannot be told apart here. For them, run `amm-worker report` \
                 on the worker's --timeline file."
                    .into(),
            ),
        },
        Source::WorkerTimeline => {
            let available = run.ticks.iter().any(|t| t.heap.is_some());
            AllocatorInfo {
                available,
                name: run.allocator.map(|a| a.name().to_string()),
                note: (!available).then(|| {
                    "the timeline has no allocator statistics: hoard and fragmentation \
                     cannot be told apart"
                        .to_string()
                }),
            }
        }
    }
}

fn run_info(run: &Run, spans: &[Span], probe_count: usize, killed: Vec<Killed>) -> RunInfo {
    let (t0, t1) = run.span();
    let mut hits: Vec<LevelHit> = Vec::new();
    let mut hit = |level: &str, t: f64, p: u64| {
        if !hits.iter().any(|h| h.level == level) {
            hits.push(LevelHit {
                level: level.to_string(),
                t_s: t,
                process_bytes: p,
            });
        }
    };
    for t in &run.ticks {
        for (name, l) in [
            ("spill", run.levels.spill),
            ("pause", run.levels.pause),
            ("terminate", run.levels.terminate),
        ] {
            if l.is_some_and(|l| t.process > l) {
                hit(name, t.t, t.process);
            }
        }
    }
    for e in &run.events {
        match &e.item {
            Event::Level(l) if l.to != amm_timeline::Level::Below && l.to != l.from => {
                hit(l.to.name(), e.t, l.rss)
            }
            Event::Terminate(x) => hit("terminate", e.t, x.process),
            _ => {}
        }
    }
    hits.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    let mut notes = run.notes.clone();
    let left_out: Vec<usize> = (0..run.ticks.len())
        .filter(|&i| !spans.iter().any(|s| s.range.contains(&i)))
        .collect();
    let early = left_out
        .iter()
        .filter(|&&i| segment::before_the_record(run, i))
        .count();
    if early > 0 {
        notes.push(format!(
            "{early} kernel-only sample(s) before the allocator's record appeared are not analysed"
        ));
    }
    if left_out.len() > early {
        notes.push(format!(
            "{} sample(s) after the workload ended (the process tearing down) are not analysed",
            left_out.len() - early
        ));
    }
    RunInfo {
        duration_s: t1 - t0,
        ticks: run.ticks.len(),
        attempts: run
            .ticks
            .iter()
            .map(|t| t.attempt)
            .max()
            .map_or(1, |a| a.saturating_add(1)),
        limit_bytes: run.limit,
        levels: run.levels,
        peak_process_bytes: peak_process_bytes(run),
        levels_reached: hits,
        probe_purge: ProbeInfo {
            enabled: run.probe_purge_ms.is_some(),
            interval_ms: run.probe_purge_ms,
            count: probe_count,
        },
        killed,
        notes,
    }
}

/// The tier of a stretch's verdict ([`tier_in`] of its leading finding).
/// The run's peak RSS: the kernel's exact peak when an exit event carries
/// it (samples every 200 ms miss the top of a fast rise), else the highest
/// sample.
fn peak_process_bytes(run: &Run) -> u64 {
    let sampled = run.ticks.iter().map(|t| t.process).max().unwrap_or(0);
    let exact = run
        .events
        .iter()
        .filter_map(|e| match &e.item {
            Event::Exit(x) => x.peak_rss_bytes,
            _ => None,
        })
        .max()
        .unwrap_or(0);
    sampled.max(exact)
}

fn stretch_tier(s: &Stretch) -> u8 {
    match s.findings.first() {
        Some(f) => tier_in(f, kept(&s.findings)),
        None => tier(s.verdict),
    }
}

/// The run's verdict: a kill first, then the most serious stretch verdict
/// and, among those as serious, the one whose finding explains the most
/// memory over time (its mean bytes times the stretch's length: 216 MiB of
/// temporaries for 0.4 s explain less of a run than the 179 MiB of slab
/// slack it then holds for seconds), then the most bytes.
fn overall(stretches: &[Stretch], kills: &[Killed]) -> Verdict {
    let weight = |s: &Stretch| {
        s.findings.first().map_or((0.0, 0), |f| {
            (f.mean_bytes as f64 * (s.to_s - s.from_s).max(0.0), f.bytes)
        })
    };
    let lead = stretches
        .iter()
        .filter(|s| !answered_later(s, stretches))
        .min_by(|a, b| {
            stretch_tier(a).cmp(&stretch_tier(b)).then_with(|| {
                let (wa, ba) = weight(a);
                let (wb, bb) = weight(b);
                wb.total_cmp(&wa).then(bb.cmp(&ba))
            })
        });
    let mut also = Vec::new();
    let mut seen = vec![Kind::Steady];
    let memory = match lead {
        Some(lead) => {
            seen.push(lead.verdict);
            format!(
                "{} in {}: {}",
                lead.verdict.name(),
                place(lead),
                lead.headline
            )
        }
        None => "no samples".to_string(),
    };
    for s in stretches {
        for f in &s.findings {
            if !seen.contains(&f.kind) {
                seen.push(f.kind);
                also.push(format!("{} in {}: {}", f.kind.name(), place(s), f.headline));
            }
        }
    }
    if let Some(k) = kills.last() {
        let times = if kills.len() > 1 {
            format!(" ({} times; the last)", kills.len())
        } else {
            String::new()
        };
        also.insert(0, format!("memory before: {memory}"));
        return Verdict {
            kind: Kind::Killed,
            stretch: lead.map(|l| l.index),
            headline: format!("killed{times}: {}", k.describe()),
            also,
        };
    }
    Verdict {
        kind: lead.map_or(Kind::Steady, |l| l.verdict),
        stretch: lead.map(|l| l.index),
        headline: memory,
        also,
    }
}

/// Whether `s` is undecided only for want of a trim that a later stretch
/// of the same process ran: that trim saw at least the hoard `s` could not
/// place, so its answer (hoard or fragmentation) is the run's, and `s`
/// keeps its own "undecided" in its row.
fn answered_later(s: &Stretch, stretches: &[Stretch]) -> bool {
    let Some(f) = s.findings.first() else {
        return false;
    };
    if s.verdict != Kind::Undecided || f.would_decide.as_deref() != Some(heap::TRIM_DECIDES) {
        return false;
    }
    stretches.iter().any(|l| {
        l.index > s.index
            && l.attempt == s.attempt
            && matches!(l.verdict, Kind::Hoard | Kind::Fragmentation)
            && l.findings.iter().any(|lf| {
                lf.purges
                    .iter()
                    .any(|p| p.t_s >= s.to_s && p.hoarded_before >= f.bytes)
            })
    })
}

/// "phase leak (2.0-26.1 s)" or "2.0-26.1 s".
pub fn place(s: &Stretch) -> String {
    let span = format!("{:.1}-{:.1} s", s.from_s, s.to_s);
    if s.phases.is_empty() {
        span
    } else {
        let mut names: Vec<&str> = Vec::new();
        for p in &s.phases {
            if !names.contains(&p.as_str()) {
                names.push(p);
            }
        }
        format!("phase {} ({span})", names.join("+"))
    }
}

/// One stretch being classified, and the run around it.
struct Ctx<'a> {
    run: &'a Run,
    th: &'a Thresholds,
    spans: &'a [Span],
    index: usize,
    /// Indices (into `run.purges()`) of the purges this stretch owns.
    purges: Vec<usize>,
}

/// The series of one stretch.
pub(super) struct Series {
    pub t: Vec<f64>,
    pub process: Vec<u64>,
    pub managed: Vec<u64>,
    pub unmanaged: Vec<u64>,
    pub hoarded: Vec<u64>,
    pub non_heap: Vec<u64>,
    pub spilled: Vec<u64>,
    pub file: Vec<u64>,
    pub has_split: bool,
}

impl Series {
    /// The series of `ticks`. A few ticks without the allocator's numbers
    /// among many with them (at most a quarter: a program's record read
    /// while its publisher was starved on a busy machine) are missing
    /// measurements, left out, not a reason to judge the whole stretch
    /// from kernel data alone (a C leak read "undecided" that way).
    fn of(all: &[At<Tick>]) -> Series {
        let with = all.iter().filter(|t| t.split.is_some()).count();
        let has_split = with > 0 && with * 4 >= all.len() * 3;
        let ticks: Vec<&At<Tick>> = all
            .iter()
            .filter(|t| !has_split || t.split.is_some())
            .collect();
        let part = |f: fn(&Split) -> u64| -> Vec<u64> {
            if has_split {
                ticks
                    .iter()
                    .filter_map(|t| t.split.as_ref().map(f))
                    .collect()
            } else {
                Vec::new()
            }
        };
        Series {
            t: ticks.iter().map(|t| t.t).collect(),
            process: ticks.iter().map(|t| t.process).collect(),
            managed: part(|s| s.managed),
            unmanaged: part(|s| s.unmanaged_live),
            hoarded: part(|s| s.hoarded),
            non_heap: part(|s| s.non_heap),
            spilled: part(|s| s.spilled),
            file: ticks.iter().filter_map(|t| t.rss_file_shmem).collect(),
            has_split,
        }
    }
}

impl Ctx<'_> {
    fn span(&self) -> &Span {
        &self.spans[self.index]
    }

    fn ticks(&self) -> &[At<Tick>] {
        &self.run.ticks[self.span().range.clone()]
    }

    fn purge_refs(&self) -> Vec<PurgeRef> {
        let all: Vec<(f64, &PurgeReport)> = self.run.purges().collect();
        self.purges
            .iter()
            .filter_map(|&k| all.get(k))
            .map(|(t, p)| PurgeRef::new(*t, p))
            .collect()
    }

    /// The time the workload of this stretch's attempt ended (or the process
    /// was stopped, or killed): what comes after is teardown, never a
    /// release ([`segment::workload_end`]).
    fn workload_end(&self) -> f64 {
        segment::workload_end(self.run, self.span().attempt)
    }

    /// The first later tick of the same attempt, before the workload ended,
    /// where `value` is at or under `level`: when and in which stretch.
    fn released(&self, level: f64, value: fn(&Tick) -> Option<u64>) -> Option<(f64, String)> {
        let end = self.workload_end();
        let a = self.span().attempt;
        let from = self.span().range.end;
        for (k, t) in self.run.ticks.iter().enumerate().skip(from) {
            if t.attempt != a || t.t >= end {
                break;
            }
            if value(t).is_some_and(|v| (v as f64) <= level) {
                let where_ = self
                    .spans
                    .iter()
                    .find(|s| s.range.contains(&k))
                    .map_or_else(String::new, |s| {
                        if s.phases.is_empty() {
                            String::new()
                        } else {
                            format!(" (phase {})", s.phases.join("+"))
                        }
                    });
                return Some((t.t, where_));
            }
        }
        None
    }

    fn stretch(&self) -> Stretch {
        let ticks = self.ticks();
        let s = Series::of(ticks);
        let mut median = s.process.clone();
        median.sort_unstable();
        let sig = self
            .th
            .significant(median.get(median.len() / 2).copied().unwrap_or(0));
        let mut findings = if s.has_split {
            self.worker_findings(&s, sig)
        } else {
            self.kernel_findings(&s, sig)
        };
        rank(&mut findings);
        let verdict = findings.first().map_or(Kind::Steady, |f| f.kind);
        let headline = match findings.first() {
            Some(f) => f.headline.clone(),
            None if s.has_split => format!(
                "nothing grows: unmanaged_live {}, hoarded {}, non-heap {} (changes under {} do not count)",
                bytes(s.unmanaged.last().copied().unwrap_or(0)),
                bytes(s.hoarded.last().copied().unwrap_or(0)),
                bytes(s.non_heap.last().copied().unwrap_or(0)),
                bytes(sig)
            ),
            None => format!(
                "RSS {} and flat (changes under {} do not count)",
                bytes(s.process.last().copied().unwrap_or(0)),
                bytes(sig)
            ),
        };
        let opt = |v: &Vec<u64>| s.has_split.then(|| Range::of(v));
        Stretch {
            index: self.index,
            from_s: s.t.first().copied().unwrap_or(0.0),
            to_s: s.t.last().copied().unwrap_or(0.0),
            phases: self.span().phases.clone(),
            attempt: self.span().attempt,
            ticks: ticks.len(),
            cut: self.span().cut.to_string(),
            verdict,
            headline,
            findings,
            memory: MemoryRanges {
                process: Range::of(&s.process),
                managed: opt(&s.managed),
                unmanaged_live: opt(&s.unmanaged),
                hoarded: opt(&s.hoarded),
                non_heap: opt(&s.non_heap),
                spilled: opt(&s.spilled),
            },
        }
    }

    fn phase_words(&self) -> String {
        let p = &self.span().phases;
        if p.is_empty() {
            String::new()
        } else {
            let mut names: Vec<&str> = Vec::new();
            for x in p {
                if !names.contains(&x.as_str()) {
                    names.push(x);
                }
            }
            format!(" in phase {}", names.join("+"))
        }
    }
}

/// How serious a kind is: leak, then non-heap growth, then undecided; the
/// kinds of memory that stays and can all be true at once share a tier and
/// are weighed by bytes; temporaries that came back rank below them (when
/// the allocator kept the freed temporaries until a trim, the stretch is a
/// hoard, not "transient"), but see [`tier_in`].
fn tier(k: Kind) -> u8 {
    match k {
        Kind::Killed => 0,
        Kind::Leak => 1,
        Kind::NonHeapGrowth => 2,
        Kind::Undecided => 3,
        Kind::Fragmentation | Kind::Hoard | Kind::BoundedCache | Kind::ManagedGrowth => 4,
        Kind::Transient => 5,
        Kind::Steady => 6,
    }
}

/// The tier of `f` in a stretch whose largest hoard holds `kept` bytes:
/// temporaries rank below memory that stays only when the allocator kept a
/// good part of them (a hoard of at least half their bytes: freed
/// temporaries glibc kept until a trim). Beside a hoard of a few dirty
/// pages, which jemalloc keeps between purges, temporaries hundreds of MiB
/// high are the stretch's story and are weighed by bytes with the rest.
///
/// An undecided that only a trim decides is a hoard or fragmentation,
/// never a leak: it ranks with them, by bytes, not above them. A glibc
/// cache's one tick of 4 MiB "hoarded" (a trim's residency read while the
/// program filled on, paired with live bytes from before it) led a stretch
/// whose 98.5 MiB bounded cache it sat beside, and the run said
/// "undecided" about a cache.
fn tier_in(f: &Finding, kept: u64) -> u8 {
    match f.kind {
        Kind::Transient if kept.saturating_mul(2) < f.bytes => tier(Kind::Hoard),
        Kind::Undecided if f.would_decide.as_deref() == Some(heap::TRIM_DECIDES) => {
            tier(Kind::Hoard)
        }
        k => tier(k),
    }
}

/// The bytes of the largest hoard among `findings`.
fn kept(findings: &[Finding]) -> u64 {
    findings
        .iter()
        .filter(|x| x.kind == Kind::Hoard)
        .map(|x| x.bytes)
        .max()
        .unwrap_or(0)
}

/// Most serious first; hoard, fragmentation, caches, managed growth (and
/// temporaries the allocator did not keep) by their average share of
/// memory.
fn rank(f: &mut [Finding]) {
    let kept = kept(f);
    f.sort_by(|a, b| {
        tier_in(a, kept)
            .cmp(&tier_in(b, kept))
            .then(b.mean_bytes.cmp(&a.mean_bytes))
            .then(b.bytes.cmp(&a.bytes))
            .then(a.kind.cmp(&b.kind))
    });
}
