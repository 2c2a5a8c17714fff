//! The verdicts: for each stretch, what explains its unmanaged memory.
//!
//! Rules, in the order they are tried (numbers in [`Thresholds`]; "counts"
//! means at least [`Thresholds::significant`] of the stretch):
//!
//! * **Leak** — the *floor* of `unmanaged_live` (the minimum of each of 6
//!   time bins, so task temporaries do not count) rises: Mann–Kendall
//!   p ≤ 0.01, the Theil–Sen slope times the window counts, the window is at
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
//! * **Transient** — `unmanaged_live` above its floor (task temporaries), or
//!   a growth freed later in the workload (data held for a while).
//! * **Non-heap growth** — the floor of `non_heap` (RSS outside the
//!   allocator) rises as a leak's would.
//! * **Managed growth** — managed data grew; unmanaged memory only followed.
//!
//! The stretch's verdict is its most serious finding: leak, then non-heap
//! growth, then undecided; hoard, fragmentation, transient and managed
//! growth, which can all be true at once, are ranked by their average share
//! of the stretch's memory (jemalloc's dirty pages, its slab slack, glibc's
//! hoard split by what a trim returned, temporaries above the floor,
//! managed data above its start). The run's verdict is the most serious
//! stretch verdict.
//!
//! From kernel data alone (no allocator statistics) only RSS is known: a
//! rise of anonymous memory stays undecided (a leak, a hoard and
//! fragmentation look alike there), a rise of file-backed/shared memory is
//! non-heap growth, RSS that falls back is transient.

use crate::evidence;
use crate::fit::{self, Line};
use amm_timeline::{Event, Heap, PurgeReport, Split, Tick};

use crate::input::{At, Run, Source};
use crate::report::{
    AllocatorInfo, Finding, Kind, LevelHit, MemoryRanges, ProbeInfo, PurgeRef, PurgeRow,
    REPORT_VERSION, Range, Report, RunInfo, Stretch, Trend, Verdict,
};
use crate::segment::{self, Span};
use crate::thresholds::Thresholds;
use crate::units::{bytes, rate, signed};

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
    let verdict = overall(&stretches);
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
        run: run_info(run, &spans, probe_count),
        verdict,
        stretches,
        purges,
        thresholds: *th,
    }
}

fn allocator_info(run: &Run) -> AllocatorInfo {
    match run.source {
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

fn run_info(run: &Run, spans: &[Span], probe_count: usize) -> RunInfo {
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
    let analysed: usize = spans.iter().map(|s| s.range.len()).sum();
    let mut notes = run.notes.clone();
    if analysed < run.ticks.len() {
        notes.push(format!(
            "{} sample(s) after the workload ended (the process tearing down) are not analysed",
            run.ticks.len() - analysed
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
        peak_process_bytes: run.ticks.iter().map(|t| t.process).max().unwrap_or(0),
        levels_reached: hits,
        probe_purge: ProbeInfo {
            enabled: run.probe_purge_ms.is_some(),
            interval_ms: run.probe_purge_ms,
            count: probe_count,
        },
        notes,
    }
}

fn overall(stretches: &[Stretch]) -> Verdict {
    let lead = stretches.iter().min_by(|a, b| {
        a.verdict.cmp(&b.verdict).then_with(|| {
            let ba = a.findings.first().map_or(0, |f| f.bytes);
            let bb = b.findings.first().map_or(0, |f| f.bytes);
            bb.cmp(&ba)
        })
    });
    let Some(lead) = lead else {
        return Verdict {
            kind: Kind::Steady,
            stretch: None,
            headline: "no samples".into(),
            also: Vec::new(),
        };
    };
    let mut also = Vec::new();
    let mut seen = vec![lead.verdict, Kind::Steady];
    for s in stretches {
        for f in &s.findings {
            if !seen.contains(&f.kind) {
                seen.push(f.kind);
                also.push(format!("{} in {}: {}", f.kind.name(), place(s), f.headline));
            }
        }
    }
    Verdict {
        kind: lead.verdict,
        stretch: Some(lead.index),
        headline: format!(
            "{} in {}: {}",
            lead.verdict.name(),
            place(lead),
            lead.headline
        ),
        also,
    }
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

/// A trend and the line through its floor.
struct Fitted {
    trend: Trend,
    line: Line,
}

fn fit_trend(name: &str, t: &[f64], v: &[u64], th: &Thresholds, sig: u64) -> Option<Fitted> {
    let tol = sig as f64 * th.tie_fraction;
    if v.len() < th.floor_bins * th.min_ticks_per_bin || t.len() != v.len() {
        return None;
    }
    let pts: Vec<(f64, f64)> = t.iter().zip(v).map(|(&a, &b)| (a, b as f64)).collect();
    let floor = fit::floor_points(&pts, th.floor_bins);
    if floor.len() < 3 {
        return None;
    }
    let line = fit::theil_sen(&floor)?;
    let mk = fit::mann_kendall_tol(&floor.iter().map(|p| p.1).collect::<Vec<_>>(), tol);
    let window = t[t.len() - 1] - t[0];
    Some(Fitted {
        trend: Trend {
            series: name.to_string(),
            from_s: t[0],
            to_s: t[t.len() - 1],
            slope_bytes_per_s: line.slope,
            growth_bytes: (line.slope * window) as i64,
            r2: line.r2,
            mann_kendall: mk,
            floor: floor.iter().map(|p| (p.0, p.1.max(0.0) as u64)).collect(),
        },
        line,
    })
}

/// Excursions above a floor line: (peak, mean, how many).
fn excursions(t: &[f64], v: &[u64], line: Option<&Line>) -> (u64, u64, usize) {
    // without a fitted floor (a short stretch), the floor is the 20th
    // percentile: robust to a first sample taken before the stretch's work
    let low = {
        let mut s = v.to_vec();
        s.sort_unstable();
        s.get(s.len() / 5).copied().unwrap_or(0) as f64
    };
    let base = |i: usize| match line {
        Some(l) => l.at(t[i]),
        None => low,
    };
    let exc: Vec<f64> = (0..v.len())
        .map(|i| (v[i] as f64 - base(i)).max(0.0))
        .collect();
    let peak = exc.iter().copied().fold(0.0, f64::max);
    let mean = if exc.is_empty() {
        0.0
    } else {
        exc.iter().sum::<f64>() / exc.len() as f64
    };
    let mut count = 0;
    let mut above = false;
    for &e in &exc {
        let now = peak > 0.0 && e > peak / 2.0;
        if now && !above {
            count += 1;
        }
        above = now;
    }
    (peak as u64, mean as u64, count)
}

fn mean(v: &[u64]) -> u64 {
    if v.is_empty() {
        0
    } else {
        (v.iter().map(|&x| x as u128).sum::<u128>() / v.len() as u128) as u64
    }
}

/// Change from the first floor bin to the last, by their medians (robust to
/// a single odd tick), bytes.
fn robust_delta(v: &[u64], bins: usize) -> i64 {
    if v.len() < 2 {
        return 0;
    }
    let w = (v.len() / bins.max(1)).max(1);
    let med = |s: &[u64]| {
        let mut s = s.to_vec();
        s.sort_unstable();
        s[s.len() / 2] as i64
    };
    med(&v[v.len() - w..]) - med(&v[..w])
}

struct Ctx<'a> {
    run: &'a Run,
    th: &'a Thresholds,
    spans: &'a [Span],
    index: usize,
    /// Indices (into `run.purges()`) of the purges this stretch owns.
    purges: Vec<usize>,
}

/// The series of one stretch.
struct Series {
    t: Vec<f64>,
    process: Vec<u64>,
    managed: Vec<u64>,
    unmanaged: Vec<u64>,
    hoarded: Vec<u64>,
    non_heap: Vec<u64>,
    spilled: Vec<u64>,
    file: Vec<u64>,
    has_split: bool,
}

impl Series {
    fn of(ticks: &[At<Tick>]) -> Series {
        let has_split = !ticks.is_empty() && ticks.iter().all(|t| t.split.is_some());
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
    /// was stopped): what comes after is teardown.
    fn workload_end(&self) -> f64 {
        let a = self.span().attempt;
        self.run
            .events
            .iter()
            .find(|e| e.attempt == a && matches!(e.item, Event::End(_) | Event::Terminate(_)))
            .map_or(f64::INFINITY, |e| e.t)
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

    fn worker_findings(&self, s: &Series, sig: u64) -> Vec<Finding> {
        let th = self.th;
        let ticks = self.ticks();
        let mut out: Vec<Finding> = Vec::new();
        let window = s.t.last().copied().unwrap_or(0.0) - s.t.first().copied().unwrap_or(0.0);
        let dm = robust_delta(&s.managed, th.floor_bins);
        let m_up = dm.max(0) as u64;
        let purges = self.purge_refs();
        let u_fit = fit_trend("unmanaged_live", &s.t, &s.unmanaged, th, sig);
        let mut transient: Option<Finding> = None;

        // --- unmanaged_live: leak, undecided, or held for a while
        match &u_fit {
            None => {
                let rise = s.unmanaged.last().copied().unwrap_or(0) as i64
                    - s.unmanaged.first().copied().unwrap_or(0) as i64;
                let need = th.floor_bins * th.min_ticks_per_bin;
                // a rise through the stretch, not one step at its start
                let pts: Vec<(f64, f64)> =
                    s.t.iter()
                        .zip(&s.unmanaged)
                        .map(|(&a, &b)| (a, b as f64))
                        .collect();
                let steady_rise = s.unmanaged.len() >= 4
                    && fit::mann_kendall_tol(
                        &s.unmanaged.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                        sig as f64 * th.tie_fraction,
                    )
                    .p_increasing
                        <= th.hint_p
                    && fit::theil_sen(&pts).is_some_and(|l| l.slope * window >= sig as f64);
                if steady_rise
                    && rise >= sig as i64
                    && m_up <= sig.max((th.managed_steady_ratio * rise as f64) as u64)
                {
                    let released = self.released(
                        s.unmanaged.last().copied().unwrap_or(0) as f64
                            - th.released_fraction * rise as f64,
                        |t| t.split.map(|x| x.unmanaged_live),
                    );
                    if released.is_none() {
                        let mut f = Finding::new(
                            Kind::Undecided,
                            rise as u64,
                            0,
                            format!(
                                "unmanaged_live rose {} in {:.1} s{}: too short to tell a leak from a temporary",
                                bytes(rise as u64),
                                window,
                                self.phase_words()
                            ),
                        );
                        f.would_decide = Some(format!(
                            "a stretch of at least {:.0} s and {need} samples (this one has {:.1} s, {} samples)",
                            th.leak_min_window_s,
                            window,
                            s.t.len()
                        ));
                        out.push(f);
                    }
                }
            }
            Some(fit) => {
                let tr = &fit.trend;
                let growth = tr.growth_bytes;
                let p = tr.mann_kendall.p_increasing;
                let rising = tr.slope_bytes_per_s > 0.0;
                let end_floor = fit.line.at(tr.to_s);
                let released = if rising && growth > 0 {
                    self.released(end_floor - th.released_fraction * growth as f64, |t| {
                        t.split.map(|x| x.unmanaged_live)
                    })
                } else {
                    None
                };
                let managed_moves =
                    m_up > sig.max((th.managed_steady_ratio * growth.max(0) as f64) as u64);
                let u_mean_rise = {
                    let base = fit.line.at(tr.from_s);
                    mean(
                        &s.unmanaged
                            .iter()
                            .map(|&v| (v as f64 - base).max(0.0) as u64)
                            .collect::<Vec<_>>(),
                    )
                };
                let confident = p <= th.leak_p && growth >= sig as i64;
                let hint = rising && p <= th.hint_p && growth as f64 >= 0.25 * sig as f64;
                if (confident || hint) && managed_moves {
                    if growth as f64 >= th.managed_overhead_ratio * m_up as f64 {
                        let mut f = Finding::new(
                            Kind::Undecided,
                            growth as u64,
                            u_mean_rise,
                            format!(
                                "unmanaged_live grew {} ({}) while managed data grew {}: more than \
                                 bookkeeping, but managed data is not steady, so not called a leak",
                                bytes(growth as u64),
                                rate(tr.slope_bytes_per_s),
                                bytes(m_up)
                            ),
                        );
                        f.trend = Some(tr.clone());
                        f.would_decide = Some(
                            "a stretch where managed data is steady (a phase that only computes), \
                             at least as long as this one"
                                .into(),
                        );
                        out.push(f);
                    }
                    // else: the managed-growth finding below says it
                } else if (confident || hint)
                    && let Some((t_rel, where_)) = released.clone()
                {
                    let mut f = Finding::new(
                        Kind::Transient,
                        growth as u64,
                        u_mean_rise,
                        format!(
                            "unmanaged_live grew {}{} and was freed at {:.1} s{}: data held for a while, not a leak",
                            bytes(growth as u64),
                            self.phase_words(),
                            t_rel,
                            where_
                        ),
                    );
                    f.trend = Some(tr.clone());
                    transient = Some(f);
                } else if confident && window >= th.leak_min_window_s {
                    out.push(self.leak(s, fit, &purges, dm, ticks, sig));
                } else if confident || hint {
                    let needed = if tr.slope_bytes_per_s > 0.0 {
                        (sig as f64 / tr.slope_bytes_per_s)
                            .max(th.leak_min_window_s)
                            .max(window * 1.5)
                    } else {
                        window * 2.0
                    };
                    let why = if window < th.leak_min_window_s {
                        format!("{window:.1} s is too short to call it")
                    } else if growth < sig as i64 {
                        format!("that is less than the {} that counts", bytes(sig))
                    } else {
                        format!("the rise is not steady enough yet (Mann–Kendall p {p:.3})")
                    };
                    let mut f = Finding::new(
                        Kind::Undecided,
                        growth.max(0) as u64,
                        u_mean_rise,
                        format!(
                            "unmanaged_live rose {} ({}){}; {}",
                            bytes(growth.max(0) as u64),
                            rate(tr.slope_bytes_per_s),
                            self.phase_words(),
                            why
                        ),
                    );
                    f.trend = Some(tr.clone());
                    f.would_decide = Some(format!(
                        "a window of at least {needed:.0} s at this rate (this one is {window:.1} s)"
                    ));
                    out.push(f);
                }
            }
        }

        // --- task temporaries above the floor
        let (peak, exc_mean, count) =
            excursions(&s.t, &s.unmanaged, u_fit.as_ref().map(|f| &f.line));
        if peak >= sig {
            let head = format!(
                "task temporaries up to {} above the floor of unmanaged_live, {} time(s){}, returned each time",
                bytes(peak),
                count,
                self.phase_words()
            );
            match &mut transient {
                Some(f) => {
                    f.notes.push(head);
                    f.bytes = f.bytes.max(peak);
                    f.mean_bytes = f.mean_bytes.max(exc_mean);
                }
                None => transient = Some(Finding::new(Kind::Transient, peak, exc_mean, head)),
            }
        }
        if let Some(f) = transient {
            out.push(f);
        }

        // --- hoard and fragmentation
        out.extend(self.heap_findings(s, sig, &purges));

        // --- non-heap
        if let Some(fit) = fit_trend("non_heap", &s.t, &s.non_heap, th, sig) {
            let tr = &fit.trend;
            if tr.mann_kendall.p_increasing <= th.leak_p
                && tr.growth_bytes >= sig as i64
                && window >= th.leak_min_window_s
            {
                let end_floor = fit.line.at(tr.to_s);
                let released = self.released(
                    end_floor - th.released_fraction * tr.growth_bytes as f64,
                    |t| t.split.map(|x| x.non_heap),
                );
                if released.is_none() {
                    let file = robust_delta(&s.file, th.floor_bins);
                    let mut f = Finding::new(
                        Kind::NonHeapGrowth,
                        tr.growth_bytes as u64,
                        0,
                        format!(
                            "memory outside the allocator grew {} ({}, R² {:.2}){}: thread stacks, \
                             mmaps or file-backed pages, not the heap",
                            bytes(tr.growth_bytes as u64),
                            rate(tr.slope_bytes_per_s),
                            tr.r2,
                            self.phase_words()
                        ),
                    );
                    f.trend = Some(tr.clone());
                    f.notes.push(format!(
                        "file-backed and shared RSS changed by {} over the stretch",
                        signed(file)
                    ));
                    out.push(f);
                }
            }
        }

        // --- managed growth
        if m_up >= sig {
            let du = robust_delta(&s.unmanaged, th.floor_bins);
            let m0 = s.managed.first().copied().unwrap_or(0);
            let share = mean(
                &s.managed
                    .iter()
                    .map(|&m| m.saturating_sub(m0))
                    .collect::<Vec<_>>(),
            );
            let mut f = Finding::new(
                Kind::ManagedGrowth,
                m_up,
                share,
                format!(
                    "managed data grew {} ({}){}; unmanaged_live changed by {} ({:.1} % of it): \
                     per-value bookkeeping and task memory, not a leak",
                    bytes(m_up),
                    rate(m_up as f64 / window.max(1e-9)),
                    self.phase_words(),
                    signed(du),
                    100.0 * du as f64 / m_up as f64
                ),
            );
            let spilled = robust_delta(&s.spilled, th.floor_bins);
            if spilled > 0 {
                f.notes
                    .push(format!("{} of it went to disk", bytes(spilled as u64)));
            }
            out.push(f);
        }
        out
    }

    fn leak(
        &self,
        s: &Series,
        fit: &Fitted,
        purges: &[PurgeRef],
        dm: i64,
        ticks: &[At<Tick>],
        sig: u64,
    ) -> Finding {
        let tr = &fit.trend;
        let growth = tr.growth_bytes.max(0) as u64;
        let base = fit.line.at(tr.from_s);
        let mean_rise = mean(
            &s.unmanaged
                .iter()
                .map(|&v| (v as f64 - base).max(0.0) as u64)
                .collect::<Vec<_>>(),
        );
        // a purge "failed" when unmanaged_live right after it was still on
        // (or above) the rising floor
        let failed = purges
            .iter()
            .filter(|p| match ticks.iter().find(|t| t.t > p.t_s) {
                Some(a) => {
                    let au = a.split.map_or(0, |x| x.unmanaged_live) as f64;
                    au > fit.line.at(a.t) - 0.25 * growth as f64
                }
                None => (p.returned_bytes as f64) < 0.25 * growth as f64,
            })
            .count();
        let purge_words = if purges.is_empty() {
            "no purge ran in this stretch (a purge cannot return live memory; --probe-purge shows it)"
                .to_string()
        } else {
            format!(
                "{failed} of {} purge(s) in it left unmanaged_live where it was",
                purges.len()
            )
        };
        let mut f = Finding::new(
            Kind::Leak,
            growth,
            mean_rise,
            format!(
                "unmanaged_live grew {} at {} for {:.1} s{} (R² {:.2}, Mann–Kendall p {:.4}) with \
                 managed data steady ({}); {}",
                bytes(growth),
                rate(tr.slope_bytes_per_s),
                tr.to_s - tr.from_s,
                self.phase_words(),
                tr.r2,
                tr.mann_kendall.p_increasing,
                signed(dm),
                purge_words
            ),
        );
        f.trend = Some(tr.clone());
        f.purges = purges.to_vec();
        // size classes from the first tick where managed data is at the
        // level it ends with: the classes of values put before (a managed
        // base folded into this stretch) are not the leak's
        let b = ticks.last();
        let a = b.and_then(|b| {
            let m_end = b.split.map_or(0, |x| x.managed);
            ticks
                .iter()
                .find(|t| t.split.is_some_and(|x| x.managed.abs_diff(m_end) <= sig))
        });
        if let (Some(a), Some(b)) = (a, b) {
            f.size_classes = evidence::class_growth(a, b);
            f.arenas = evidence::glibc_growth(a, b);
            if !f.size_classes.is_empty() {
                let top: Vec<String> = f
                    .size_classes
                    .iter()
                    .take(3)
                    .map(|c| {
                        format!(
                            "{} B {} (+{})",
                            c.size,
                            c.class,
                            bytes(c.live_delta_bytes as u64)
                        )
                    })
                    .collect();
                f.notes.push(format!(
                    "size classes whose live bytes grew: {}",
                    top.join(", ")
                ));
            }
        }
        f.notes.push(format!(
            "confidence: R² {:.3} over {} floor bins, Mann–Kendall tau {:.2} p {:.4}, {} purge(s) failed to return it",
            tr.r2,
            tr.floor.len(),
            tr.mann_kendall.tau,
            tr.mann_kendall.p_increasing,
            failed
        ));
        f
    }

    /// Hoard, fragmentation, or (glibc without a trim) undecided.
    fn heap_findings(&self, s: &Series, sig: u64, purges: &[PurgeRef]) -> Vec<Finding> {
        let ticks = self.ticks();
        let mut out = Vec::new();
        let is_je = ticks
            .iter()
            .any(|t| matches!(t.heap, Some(Heap::Jemalloc(_))));
        let is_glibc = ticks
            .iter()
            .any(|t| matches!(t.heap, Some(Heap::System(_))));
        let returning: Vec<&PurgeRef> = purges.iter().filter(|p| p.returned_bytes >= sig).collect();
        let returned_max = purges.iter().map(|p| p.returned_bytes).max().unwrap_or(0);
        let returned_total: u64 = purges.iter().map(|p| p.returned_bytes).sum();
        let purge_words = |list: &[&PurgeRef]| -> String {
            let mut reasons: Vec<&str> = Vec::new();
            for p in list {
                if !reasons.contains(&p.reason.as_str()) {
                    reasons.push(&p.reason);
                }
            }
            let when: Vec<String> = list
                .iter()
                .take(4)
                .map(|p| format!("{:.1} s", p.t_s))
                .collect();
            format!(
                "{} purge(s) ({}; at {}{}) returned {} in all, up to {} at once",
                list.len(),
                reasons.join(", "),
                when.join(", "),
                if list.len() > 4 { ", ..." } else { "" },
                bytes(list.iter().map(|p| p.returned_bytes).sum()),
                bytes(list.iter().map(|p| p.returned_bytes).max().unwrap_or(0))
            )
        };
        if is_je {
            let parts: Vec<(u64, u64)> =
                ticks.iter().filter_map(|t| evidence::je_parts(t)).collect();
            let purgeable: Vec<u64> = parts.iter().map(|p| p.0).collect();
            let slack: Vec<u64> = parts.iter().map(|p| p.1).collect();
            let max_p = purgeable.iter().copied().max().unwrap_or(0);
            if max_p.max(returned_max) >= sig {
                let at = ticks
                    .iter()
                    .max_by_key(|t| evidence::je_parts(t).map_or(0, |p| p.0));
                let headline = if !returning.is_empty() {
                    format!(
                        "freed memory jemalloc kept{}: {}",
                        self.phase_words(),
                        purge_words(&returning)
                    )
                } else {
                    format!(
                        "{} of dirty pages jemalloc keeps{} (freed memory; a purge returns it — none ran here)",
                        bytes(max_p),
                        self.phase_words()
                    )
                };
                let mut f = Finding::new(
                    Kind::Hoard,
                    max_p.max(returned_max),
                    mean(&purgeable),
                    headline,
                );
                f.purges = purges.to_vec();
                if let Some(t) = at {
                    f.arenas = evidence::arenas(t, None);
                }
                out.push(f);
            }
            let max_s = slack.iter().copied().max().unwrap_or(0);
            if max_s >= sig {
                let at = ticks
                    .iter()
                    .max_by_key(|t| evidence::je_parts(t).map_or(0, |p| p.1));
                let mut f = Finding::new(
                    Kind::Fragmentation,
                    max_s,
                    mean(&slack),
                    format!(
                        "{} of slab slack{}: live regions spread thinly over small-class slabs, \
                         which no purge can return{}",
                        bytes(max_s),
                        self.phase_words(),
                        if purges.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " ({} purge(s) here returned {})",
                                purges.len(),
                                bytes(returned_total)
                            )
                        }
                    ),
                );
                f.purges = purges.to_vec();
                if let Some(t) = at {
                    f.size_classes = evidence::class_slack(t);
                    let top: Vec<String> = f
                        .size_classes
                        .iter()
                        .take(3)
                        .map(|c| {
                            format!(
                                "{} B ({} slack, {:.0} % used)",
                                c.size,
                                bytes(c.slack_bytes),
                                100.0 * c.utilisation
                            )
                        })
                        .collect();
                    if !top.is_empty() {
                        f.notes
                            .push(format!("held by size classes {}", top.join(", ")));
                    }
                }
                out.push(f);
            }
        } else if is_glibc {
            let max_h = s.hoarded.iter().copied().max().unwrap_or(0);
            let mean_h = mean(&s.hoarded);
            // the trim that says what this hoard is: one here, or the next
            // one while the heap has not changed since
            // (one that ran before the stretch only speaks for what it left)
            let mut only_residue = false;
            let deciding: Vec<PurgeRef> = if purges.iter().any(|p| p.hoarded_before >= sig) {
                purges.to_vec()
            } else if max_h < sig {
                Vec::new()
            } else if let Some(p) = self.later_purge(s, sig) {
                vec![p]
            } else {
                only_residue = true;
                self.earlier_purge(sig).into_iter().collect()
            };
            let big = deciding.iter().max_by_key(|p| p.hoarded_before);
            match big {
                Some(p) if p.hoarded_before >= sig => {
                    let f_ret = (p.returned_bytes as f64 / p.hoarded_before as f64).clamp(0.0, 1.0);
                    let refs: Vec<&PurgeRef> = deciding
                        .iter()
                        .filter(|q| q.returned_bytes >= sig)
                        .collect();
                    if p.returned_bytes >= sig && !only_residue {
                        let mut f = Finding::new(
                            Kind::Hoard,
                            p.returned_bytes.max(returned_max),
                            (mean_h as f64 * f_ret) as u64,
                            format!(
                                "freed memory glibc kept{}: {}",
                                self.phase_words(),
                                purge_words(&refs)
                            ),
                        );
                        f.purges = deciding.clone();
                        if let Some(t) = ticks
                            .iter()
                            .max_by_key(|t| t.split.map_or(0, |x| x.hoarded))
                        {
                            f.arenas = evidence::arenas(t, None);
                        }
                        out.push(f);
                    }
                    if p.hoarded_after >= sig {
                        let mut f = Finding::new(
                            Kind::Fragmentation,
                            p.hoarded_after,
                            (mean_h as f64 * (1.0 - f_ret)) as u64,
                            format!(
                                "a trim at {:.1} s returned {} of {} hoarded; {} stays in free chunks \
                                 between live ones{}",
                                p.t_s,
                                bytes(p.returned_bytes),
                                bytes(p.hoarded_before),
                                bytes(p.hoarded_after),
                                self.phase_words()
                            ),
                        );
                        f.purges = deciding.clone();
                        // the arenas right after the trim
                        let after = self.run.ticks.iter().find(|t| t.t > p.t_s);
                        if let Some(t) = after {
                            f.arenas = evidence::arenas(t, None);
                            let top: Vec<String> = f
                                .arenas
                                .iter()
                                .take(3)
                                .map(|a| {
                                    format!(
                                        "arena {} ({} free of {})",
                                        a.arena,
                                        bytes(a.free_bytes),
                                        bytes(a.system_bytes)
                                    )
                                })
                                .collect();
                            if !top.is_empty() {
                                f.notes.push(format!("held by {}", top.join(", ")));
                            }
                        }
                        out.push(f);
                    }
                }
                _ if max_h >= sig => {
                    let keep = ticks
                        .iter()
                        .filter_map(|t| match &t.heap {
                            Some(Heap::System(g)) => Some(g.keepcost),
                            _ => None,
                        })
                        .max()
                        .unwrap_or(0);
                    if keep >= sig {
                        let mut f = Finding::new(
                            Kind::Hoard,
                            keep,
                            mean_h,
                            format!(
                                "{} free at the top of glibc's main arena{} (a trim returns it)",
                                bytes(keep),
                                self.phase_words()
                            ),
                        );
                        f.purges = purges.to_vec();
                        out.push(f);
                    } else {
                        let h_fit = fit_trend("hoarded", &s.t, &s.hoarded, self.th, sig);
                        let mut f = Finding::new(
                            Kind::Undecided,
                            max_h,
                            mean_h,
                            format!(
                                "{} hoarded in glibc's free chunks{}: a hoard if a trim returns it, \
                                 fragmentation if not — no trim ran",
                                bytes(max_h),
                                self.phase_words()
                            ),
                        );
                        if let Some(h) = h_fit
                            && h.trend.mann_kendall.p_increasing <= self.th.leak_p
                            && h.trend.growth_bytes >= sig as i64
                        {
                            f.notes.push(format!(
                                "hoarded grew {} ({}) while live memory did not: this is not a leak",
                                bytes(h.trend.growth_bytes as u64),
                                rate(h.trend.slope_bytes_per_s)
                            ));
                            f.trend = Some(h.trend);
                        }
                        if let Some(t) = ticks
                            .iter()
                            .max_by_key(|t| t.split.map_or(0, |x| x.hoarded))
                        {
                            f.arenas = evidence::arenas(t, None);
                        }
                        f.would_decide = Some(
                            "a trim: run the worker with --probe-purge (it trims when memory is \
                             hoarded and records what came back), or add a purge to the workload"
                                .into(),
                        );
                        out.push(f);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The next purge after this stretch, if the heap did not change in
    /// between (live and managed within `sig` of the stretch's last tick) and
    /// it found about the hoard this stretch ended with.
    fn later_purge(&self, s: &Series, sig: u64) -> Option<PurgeRef> {
        let last = self.ticks().last()?;
        let (lu, lm, lh) = last
            .split
            .map(|x| (x.unmanaged_live, x.managed, x.hoarded))?;
        let end = self.workload_end();
        let (t_p, p) = self.run.purges().find(|(t, _)| *t > last.t && *t < end)?;
        let moved = self
            .run
            .ticks
            .iter()
            .filter(|t| t.t > last.t && t.t < t_p)
            .any(|t| {
                t.attempt != last.attempt
                    || t.split.is_none_or(|x| {
                        x.unmanaged_live.abs_diff(lu) > sig || x.managed.abs_diff(lm) > sig
                    })
            });
        if moved || (p.hoarded_before as f64) < 0.8 * lh as f64 || s.hoarded.is_empty() {
            return None;
        }
        Some(PurgeRef::new(t_p, p))
    }

    /// The last purge before this stretch, if the heap did not change since
    /// (live and managed within `sig` from the purge to this stretch's first
    /// tick) and this stretch starts with what it left hoarded: a trim just
    /// before a stretch says what the stretch's hoard is.
    fn earlier_purge(&self, sig: u64) -> Option<PurgeRef> {
        let first = self.ticks().first()?;
        let (t_p, p) = self.run.purges().filter(|(t, _)| *t < first.t).last()?;
        let before = self.run.ticks.iter().rev().find(|t| t.t <= t_p)?;
        if before.attempt != first.attempt {
            return None;
        }
        let (bu, bm) = before.split.map(|x| (x.unmanaged_live, x.managed))?;
        let moved = self
            .run
            .ticks
            .iter()
            .filter(|t| t.t > t_p && t.t <= first.t)
            .any(|t| {
                t.split.is_none_or(|x| {
                    x.unmanaged_live.abs_diff(bu) > sig || x.managed.abs_diff(bm) > sig
                })
            });
        let h = first.split.map_or(0, |x| x.hoarded);
        if moved || h.abs_diff(p.hoarded_after) > sig {
            return None;
        }
        Some(PurgeRef::new(t_p, p))
    }

    /// Kernel data only: RSS, its anonymous and file/shared parts.
    fn kernel_findings(&self, s: &Series, sig: u64) -> Vec<Finding> {
        let th = self.th;
        let mut out = Vec::new();
        let window = s.t.last().copied().unwrap_or(0.0) - s.t.first().copied().unwrap_or(0.0);
        let p_fit = fit_trend("process", &s.t, &s.process, th, sig);
        if let Some(fit) = &p_fit {
            let tr = &fit.trend;
            let growth = tr.growth_bytes;
            let p = tr.mann_kendall.p_increasing;
            let confident =
                p <= th.leak_p && growth >= sig as i64 && window >= th.leak_min_window_s;
            let hint =
                tr.slope_bytes_per_s > 0.0 && p <= th.hint_p && growth as f64 >= 0.25 * sig as f64;
            let released = if confident || hint {
                self.released(
                    fit.line.at(tr.to_s) - th.released_fraction * growth as f64,
                    |t| Some(t.process),
                )
            } else {
                None
            };
            let file = robust_delta(&s.file, th.floor_bins);
            if let Some((t_rel, _)) = released {
                let mut f = Finding::new(
                    Kind::Transient,
                    growth as u64,
                    0,
                    format!(
                        "RSS grew {} and went back to the kernel at {:.1} s: memory held for a while",
                        bytes(growth as u64),
                        t_rel
                    ),
                );
                f.trend = Some(tr.clone());
                out.push(f);
            } else if confident && !s.file.is_empty() && file as f64 >= 0.5 * growth as f64 {
                let mut f = Finding::new(
                    Kind::NonHeapGrowth,
                    growth as u64,
                    0,
                    format!(
                        "RSS grew {} ({}, R² {:.2}), {} of it file-backed or shared: mmapped files \
                         or shared memory, not the heap",
                        bytes(growth as u64),
                        rate(tr.slope_bytes_per_s),
                        tr.r2,
                        bytes(file.max(0) as u64)
                    ),
                );
                f.trend = Some(tr.clone());
                out.push(f);
            } else if confident || hint {
                let mut f = Finding::new(
                    Kind::Undecided,
                    growth.max(0) as u64,
                    0,
                    format!(
                        "RSS grew {} at {} for {:.1} s (R² {:.2}, Mann–Kendall p {:.4}): from the \
                         kernel alone a leak, a hoard and fragmentation look the same",
                        bytes(growth.max(0) as u64),
                        rate(tr.slope_bytes_per_s),
                        window,
                        tr.r2,
                        p
                    ),
                );
                f.trend = Some(tr.clone());
                f.would_decide = Some(if confident {
                    "the allocator's statistics: run the workload under amm-worker (its report \
                     splits live, hoarded and non-heap memory), or trim/purge the process and \
                     watch whether RSS falls"
                        .into()
                } else {
                    format!(
                        "a longer window (at least {:.0} s) and then the allocator's statistics",
                        (window * 2.0).max(th.leak_min_window_s)
                    )
                });
                out.push(f);
            }
        }
        let (peak, exc_mean, count) = excursions(&s.t, &s.process, p_fit.as_ref().map(|f| &f.line));
        if peak >= sig {
            out.push(Finding::new(
                Kind::Transient,
                peak,
                exc_mean,
                format!(
                    "RSS rose up to {} above its floor {} time(s) and went back to the kernel each time",
                    bytes(peak),
                    count
                ),
            ));
        }
        out
    }
}

/// Most serious first; hoard, fragmentation and transient by their
/// average share of memory.
fn rank(f: &mut [Finding]) {
    let tier = |k: Kind| match k {
        Kind::Leak => 0,
        Kind::NonHeapGrowth => 1,
        Kind::Undecided => 2,
        Kind::Fragmentation | Kind::Hoard | Kind::Transient | Kind::ManagedGrowth => 3,
        Kind::Steady => 5,
    };
    f.sort_by(|a, b| {
        tier(a.kind)
            .cmp(&tier(b.kind))
            .then(b.mean_bytes.cmp(&a.mean_bytes))
            .then(b.bytes.cmp(&a.bytes))
            .then(a.kind.cmp(&b.kind))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use amm_timeline::{Levels, Phase};

    fn phase(name: &str) -> Event {
        Event::Phase(Phase {
            name: name.into(),
            ..Phase::default()
        })
    }

    const MIB: u64 = 1 << 20;

    /// A worker run of `secs` at 5 ticks/s, one phase, parts from `f(t)`:
    /// (managed, unmanaged_live, hoarded, non_heap).
    fn worker_run(secs: f64, f: impl Fn(f64) -> (u64, u64, u64, u64)) -> Run {
        let mut r = Run::kernel(Some(4 << 30), Levels::dask(4 << 30));
        r.source = Source::WorkerTimeline;
        r.push_event(0.0, phase("work"));
        let n = (secs * 5.0) as usize;
        for i in 0..=n {
            let t = i as f64 * 0.2;
            let (m, u, h, nh) = f(t);
            r.push_tick(
                t,
                Tick {
                    process: m + u + h + nh,
                    split: Some(Split {
                        process: m + u + h + nh,
                        managed: m,
                        unmanaged_live: u,
                        hoarded: h,
                        non_heap: nh,
                        ..Split::default()
                    }),
                    ..Tick::default()
                },
            );
        }
        r
    }

    fn verdict(r: &Run) -> Kind {
        analyze(r, &Thresholds::default()).verdict.kind
    }

    #[test]
    fn a_steady_process_is_steady() {
        let r = worker_run(10.0, |_| (64 * MIB, 20 * MIB, 3 * MIB, 9 * MIB));
        assert_eq!(verdict(&r), Kind::Steady);
    }

    #[test]
    fn a_rising_floor_under_spikes_is_a_leak() {
        let r = worker_run(10.0, |t| {
            let spike = if (t * 5.0) as u64 % 5 < 2 {
                200 * MIB
            } else {
                0
            };
            (
                64 * MIB,
                10 * MIB + (t * 2.0 * MIB as f64) as u64 + spike,
                3 * MIB,
                9 * MIB,
            )
        });
        let rep = analyze(&r, &Thresholds::default());
        assert_eq!(rep.verdict.kind, Kind::Leak, "{}", rep.verdict.headline);
        let f = &rep.stretches[0].findings[0];
        let slope = f.trend.as_ref().map_or(0.0, |t| t.slope_bytes_per_s);
        assert!((slope / MIB as f64 - 2.0).abs() < 0.2, "slope {slope}");
    }

    #[test]
    fn unmanaged_growth_with_managed_growth_is_never_a_leak() {
        // bookkeeping: unmanaged follows managed at 2 %
        let r = worker_run(10.0, |t| {
            let m = (t * 20.0 * MIB as f64) as u64;
            (m, 10 * MIB + m / 50, 3 * MIB, 9 * MIB)
        });
        assert_eq!(verdict(&r), Kind::ManagedGrowth);
        // far more than bookkeeping: still not a leak, undecided
        let r = worker_run(10.0, |t| {
            let m = (t * 20.0 * MIB as f64) as u64;
            (m, 10 * MIB + m / 2, 3 * MIB, 9 * MIB)
        });
        let rep = analyze(&r, &Thresholds::default());
        assert_eq!(
            rep.verdict.kind,
            Kind::Undecided,
            "{}",
            rep.verdict.headline
        );
        assert!(
            rep.stretches[0].findings[0]
                .would_decide
                .as_deref()
                .is_some_and(|d| d.contains("managed data is steady"))
        );
    }

    #[test]
    fn growth_outside_the_heap_is_non_heap_growth() {
        let r = worker_run(10.0, |t| {
            (
                64 * MIB,
                10 * MIB,
                3 * MIB,
                9 * MIB + (t * 3.0 * MIB as f64) as u64,
            )
        });
        assert_eq!(verdict(&r), Kind::NonHeapGrowth);
    }

    #[test]
    fn growth_freed_later_is_transient() {
        let mut r = worker_run(12.0, |t| {
            let u = if t <= 8.0 {
                10 * MIB + (t * 5.0 * MIB as f64) as u64
            } else {
                10 * MIB
            };
            (64 * MIB, u, 3 * MIB, 9 * MIB)
        });
        r.push_event(8.1, phase("release"));
        r.events.sort_by(|a, b| a.t.total_cmp(&b.t));
        let rep = analyze(&r, &Thresholds::default());
        assert_eq!(
            rep.stretches[0].verdict,
            Kind::Transient,
            "{}",
            rep.verdict.headline
        );
        assert!(rep.stretches[0].headline.contains("freed at"));
    }

    #[test]
    fn kernel_only_growth_is_undecided_and_returning_rss_transient() {
        let mut r = Run::kernel(Some(1 << 30), Levels::dask(1 << 30));
        for i in 0..60 {
            let t = i as f64 * 0.2;
            let p = 100 * MIB + (t * 4.0 * MIB as f64) as u64;
            r.push_tick(
                t,
                Tick {
                    process: p,
                    rss_anon: Some(p),
                    rss_file_shmem: Some(0),
                    ..Tick::default()
                },
            );
        }
        let rep = analyze(&r, &Thresholds::default());
        assert_eq!(rep.verdict.kind, Kind::Undecided);
        assert!(!rep.allocator.available);
        let mut r = Run::kernel(Some(1 << 30), Levels::dask(1 << 30));
        for i in 0..60 {
            let t = i as f64 * 0.2;
            let p = if i % 10 < 3 { 400 * MIB } else { 100 * MIB };
            r.push_tick(
                t,
                Tick {
                    process: p,
                    rss_anon: Some(p),
                    rss_file_shmem: Some(0),
                    ..Tick::default()
                },
            );
        }
        assert_eq!(verdict(&r), Kind::Transient);
    }
}
