//! Cutting a run into stretches that each get one verdict.
//!
//! 1. **Attempts**: a restarted worker is a new process; nothing carries
//!    over.
//! 2. **Phases**: each workload phase is a stretch; consecutive phases of
//!    the same name (a phase's `repeat`) are one; a phase that got fewer
//!    than [`MIN_TICKS`] ticks is folded into the next one (its effect shows
//!    in the next one's ticks). Ticks after the workload's `end`, or after
//!    the process exited or was killed, are the process tearing down and
//!    are left out; so is the final fall of memory just before an exit
//!    that no `end` or `terminate` announced ([`teardown_start`]: a
//!    program amm does not run frees what it held on its way out, and on a
//!    busy machine the samples catch it).
//! 3. **Changes of slope**: a stretch long enough is cut where two straight
//!    lines fit its unmanaged memory (process − managed; RSS for kernel-only
//!    runs) much better than one ([`Thresholds::split_gain`]), and the two
//!    lines differ by a significant amount at the cut or over the shorter
//!    side, where growth starts, stops or turns back or memory drops (a
//!    rise that only goes slower or faster is not cut: on a busy machine a
//!    steady leak's rate varies; nor is a rise that missed a step, since a
//!    drop needs the samples to fall, `fall_across`). At most three
//!    levels of cuts.

use std::ops::Range;

use amm_timeline::{Event, Tick};

use crate::input::{At, Run};
use crate::thresholds::Thresholds;

/// Fewest ticks a phase needs to be a stretch of its own.
pub const MIN_TICKS: usize = 3;

/// How long before an unannounced exit a fall of memory counts as the
/// process freeing everything on its way out (a worker's timeline marks
/// this with its `end` event; a program's supervisor and `amm-agent watch`
/// have only the exit to go by).
pub const TEARDOWN_WINDOW_S: f64 = 1.0;

/// The least fall before the exit that is left out as teardown.
const TEARDOWN_MIN_BYTES: u64 = 4 << 20;

/// A rise smaller than this between two samples of a teardown is noise
/// (a page faulted in while the rest is freed), not growth.
const TEARDOWN_NOISE_BYTES: u64 = 256 << 10;

/// One stretch of a run: a range of its ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// Tick indices into [`Run::ticks`].
    pub range: Range<usize>,
    /// Workload phases it covers (empty for kernel-only runs).
    pub phases: Vec<String>,
    /// The attempt.
    pub attempt: u32,
    /// Why it starts where it does: `run`, `attempt`, `phase`, `slope
    /// change`, `record` (the allocator's record appeared).
    pub cut: &'static str,
}

#[derive(Debug)]
struct Piece {
    t0: f64,
    attempt: u32,
    label: Label,
    cut: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
enum Label {
    Startup,
    Phase(String),
    Teardown,
}

/// Cuts `run` into stretches (see the module docs).
pub fn segment(run: &Run, th: &Thresholds) -> Vec<Span> {
    let pieces = pieces(run);
    let spans = before_record(run, fold_short(tick_ranges(run, &pieces)));
    // cut at changes of slope
    let mut out = Vec::new();
    for s in spans {
        split(run, th, s, 0, &mut out);
    }
    out
}

/// Steps 1 and 2: where each attempt, phase and teardown starts (a
/// phase's repeats are one piece).
fn pieces(run: &Run) -> Vec<Piece> {
    let mut pieces: Vec<Piece> = vec![Piece {
        t0: f64::NEG_INFINITY,
        attempt: run.ticks.first().map_or(0, |t| t.attempt),
        label: Label::Startup,
        cut: "run",
    }];
    for e in &run.events {
        let mut t0 = e.t;
        let (label, cut) = match &e.item {
            Event::Start(_) => (Label::Startup, "attempt"),
            Event::Phase(p) => (Label::Phase(p.name.clone()), "phase"),
            // a process that ended (or was killed) tears down: its last
            // samples are not the workload freeing memory
            Event::End(_) | Event::Terminate(_) => (Label::Teardown, "phase"),
            Event::Exit(_) => {
                // an exit nothing announced: its final fall is teardown
                let announced = pieces
                    .last()
                    .is_some_and(|p| p.label == Label::Teardown && p.attempt == e.attempt);
                if !announced {
                    let after = pieces.last().map_or(f64::NEG_INFINITY, |p| p.t0);
                    t0 = teardown_t(run, e.attempt, e.t).map_or(e.t, |t| t.max(after));
                }
                (Label::Teardown, "phase")
            }
            _ => continue,
        };
        if matches!(e.item, Event::Start(_))
            && pieces.len() == 1
            && run.ticks.first().is_none_or(|t| t.t >= e.t)
        {
            // the first start: the run's own beginning
            pieces[0].attempt = e.attempt;
            continue;
        }
        let last = pieces.last_mut();
        if let Some(p) = last
            && p.label == label
            && p.attempt == e.attempt
        {
            continue; // a repeat of the same phase
        }
        pieces.push(Piece {
            t0,
            attempt: e.attempt,
            label,
            cut,
        });
    }
    pieces
}

/// Leaves out a stretch's first samples when they lack the allocator's
/// numbers and later samples of it have them: `amm-agent watch`
/// samples RSS from the start, and the program's record appears within its
/// first publication interval. Judged with them, the whole stretch was
/// judged from kernel data alone (a leak read "undecided"). A prefix of
/// [`MIN_TICKS`] samples or more is a stretch of its own.
fn before_record(run: &Run, spans: Vec<Span>) -> Vec<Span> {
    let mut out = Vec::with_capacity(spans.len());
    for s in spans {
        let ticks = &run.ticks[s.range.clone()];
        let k = ticks.iter().position(|t| t.split.is_some()).unwrap_or(0);
        if k == 0 {
            out.push(s);
            continue;
        }
        let mid = s.range.start + k;
        if k >= MIN_TICKS {
            out.push(Span {
                range: s.range.start..mid,
                ..s.clone()
            });
        }
        out.push(Span {
            range: mid..s.range.end,
            cut: if k >= MIN_TICKS { "record" } else { s.cut },
            ..s
        });
    }
    out
}

/// Whether tick `i` is a kernel-only sample taken before its attempt's
/// allocator record appeared (left out of a stretch by [`segment`]).
pub fn before_the_record(run: &Run, i: usize) -> bool {
    let Some(t) = run.ticks.get(i) else {
        return false;
    };
    t.split.is_none()
        && run.ticks[i + 1..]
            .iter()
            .take_while(|n| n.attempt == t.attempt)
            .any(|n| n.split.is_some())
}

/// When the workload of attempt `attempt` ended (or it was stopped, or
/// killed): its `end` or `terminate` event, else the start of the final
/// fall before its exit ([`teardown_start`]), else its exit; what comes
/// after is teardown, never a release. Infinity while it runs.
pub fn workload_end(run: &Run, attempt: u32) -> f64 {
    let ended = run.events.iter().find(|e| {
        e.attempt == attempt
            && matches!(e.item, Event::End(_) | Event::Terminate(_) | Event::Exit(_))
    });
    match ended {
        Some(e) if matches!(e.item, Event::Exit(_)) => teardown_t(run, attempt, e.t).unwrap_or(e.t),
        Some(e) => e.t,
        None => f64::INFINITY,
    }
}

/// When the teardown before attempt `attempt`'s exit at `exit_t` begins
/// (just after the last sample before it), if its samples show one.
fn teardown_t(run: &Run, attempt: u32, exit_t: f64) -> Option<f64> {
    let end = run.ticks.partition_point(|t| t.t <= exit_t);
    let start = run.ticks[..end]
        .iter()
        .rposition(|t| t.attempt != attempt)
        .map_or(0, |i| i + 1);
    let ticks = &run.ticks[start..end];
    teardown_start(ticks, exit_t).map(|k| ticks[k].t + 1e-6)
}

/// The index of the last sample before a process's teardown: the start of
/// the final run of samples where neither RSS nor the unmanaged live heap
/// rises, or the first sample within [`TEARDOWN_WINDOW_S`] of the exit at
/// `exit_t` if that run began earlier; `None` when neither fell at least
/// [`TEARDOWN_MIN_BYTES`] from there. The heap counts as well as RSS
/// because an allocator may keep what the program freed resident (then
/// only the heap falls). Used for every exit no `end` announced
/// (`amm-worker -- CMD`'s supervisor, `amm-agent watch`, the agent).
pub fn teardown_start(ticks: &[At<Tick>], exit_t: f64) -> Option<usize> {
    let last = ticks.len().checked_sub(1)?;
    let live = |t: &At<Tick>| t.split.as_ref().map_or(0, |s| s.unmanaged_live);
    let rises = |a: u64, b: u64| b > a.saturating_add(TEARDOWN_NOISE_BYTES);
    let mut k = last;
    while k > 0
        && ticks[k - 1].t >= exit_t - TEARDOWN_WINDOW_S
        && !rises(ticks[k - 1].process, ticks[k].process)
        && !rises(live(&ticks[k - 1]), live(&ticks[k]))
    {
        k -= 1;
    }
    let fell = |f: &dyn Fn(&At<Tick>) -> u64| f(&ticks[k]).saturating_sub(f(&ticks[last]));
    let fall = fell(&|t| t.process).max(fell(&live));
    (k < last && fall >= TEARDOWN_MIN_BYTES).then_some(k)
}

/// The ticks of each piece.
fn tick_ranges<'p>(run: &Run, pieces: &'p [Piece]) -> Vec<(Range<usize>, &'p Piece)> {
    let mut ranges: Vec<(Range<usize>, &Piece)> = Vec::new();
    let mut i = 0;
    for (k, p) in pieces.iter().enumerate() {
        let end_t = pieces.get(k + 1).map_or(f64::INFINITY, |n| n.t0);
        let start = i;
        while i < run.ticks.len() && tick_before(&run.ticks[i], end_t, pieces.get(k + 1)) {
            i += 1;
        }
        ranges.push((start..i, p));
    }
    ranges
}

/// Folds pieces shorter than [`MIN_TICKS`] into the next of the same
/// attempt (or the previous, at an attempt's end); drops teardown.
fn fold_short(ranges: Vec<(Range<usize>, &Piece)>) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let mut pending: Option<Span> = None;
    for (r, p) in ranges {
        if p.label == Label::Teardown {
            if let Some(pend) = pending.take() {
                attach_to_previous(&mut spans, pend);
            }
            continue;
        }
        let mut span = Span {
            range: r,
            phases: match &p.label {
                Label::Phase(n) => vec![n.clone()],
                _ => Vec::new(),
            },
            attempt: p.attempt,
            cut: p.cut,
        };
        if let Some(pend) = pending.take() {
            if pend.attempt == span.attempt {
                span.range.start = pend.range.start;
                let mut phases = pend.phases;
                phases.extend(span.phases);
                span.phases = phases;
                span.cut = pend.cut;
            } else {
                attach_to_previous(&mut spans, pend);
            }
        }
        if span.range.len() < MIN_TICKS {
            pending = Some(span);
        } else {
            spans.push(span);
        }
    }
    if let Some(pend) = pending.take() {
        attach_to_previous(&mut spans, pend);
    }
    spans
}

/// True when `tick` belongs before the next piece starting at `end_t`.
/// A piece that starts a new attempt takes every tick of that attempt.
fn tick_before(tick: &At<Tick>, end_t: f64, next: Option<&Piece>) -> bool {
    match next {
        Some(n) if n.label == Label::Startup => tick.attempt < n.attempt,
        _ => tick.t < end_t,
    }
}

fn attach_to_previous(spans: &mut Vec<Span>, pend: Span) {
    match spans.last_mut() {
        Some(prev) if prev.attempt == pend.attempt && prev.range.end == pend.range.start => {
            prev.range.end = pend.range.end;
            prev.phases.extend(pend.phases);
        }
        _ => {
            if !pend.range.is_empty() {
                spans.push(pend);
            }
        }
    }
}

/// The series a cut is looked for in: unmanaged memory, or RSS.
fn cut_series(t: &Tick) -> f64 {
    match &t.split {
        Some(s) => t.process.saturating_sub(s.managed) as f64,
        None => t.process as f64,
    }
}

fn split(run: &Run, th: &Thresholds, s: Span, depth: usize, out: &mut Vec<Span>) {
    let ticks = &run.ticks[s.range.clone()];
    if depth >= 3 || ticks.len() < 2 * (th.floor_bins * th.min_ticks_per_bin) {
        out.push(s);
        return;
    }
    let pts: Vec<(f64, f64)> = ticks.iter().map(|t| (t.t, cut_series(t))).collect();
    let Some(k) = best_cut(&pts, th) else {
        out.push(s);
        return;
    };
    let mut median: Vec<u64> = ticks.iter().map(|t| t.process).collect();
    median.sort_unstable();
    let sig = th.significant(median[median.len() / 2]) as f64;
    let (l, r) = (&pts[..k], &pts[k..]);
    let (Some(fl), Some(fr)) = (crate::fit::ols(l), crate::fit::ols(r)) else {
        out.push(s);
        return;
    };
    // the step between the two lines where they meet, not past either's
    // data
    let tk = (pts[k - 1].0 + pts[k].0) / 2.0;
    let step = (fl.at(tk) - fr.at(tk)).abs();
    let (dl, dr) = (l[l.len() - 1].0 - l[0].0, r[r.len() - 1].0 - r[0].0);
    let bend = (fl.slope - fr.slope).abs() * dl.min(dr);
    // a cut marks a change of what happens (growth that starts, stops or
    // turns back, or memory that drops), not of how fast: a leak that slows
    // down while the machine is busy is one leak, and two lines through a
    // curving rise leave a gap between them that is no step
    // a side is flat when its line moves less than what counts (a plateau
    // on jemalloc drifts up a page at a time: 2.3 MiB over 10 s after a
    // 100 MiB fill was read as a slower rise, and the fill left uncut)
    let flat = |slope: f64, d: f64| (slope * d).abs() < sig;
    let turns = fl.slope.signum() != fr.slope.signum() || flat(fl.slope, dl) || flat(fr.slope, dr);
    // memory drops when the samples fall and stay down across the cut, not
    // only when the two lines leave a gap there: a steady leak whose
    // program missed a step (descheduled for a tick on a busy machine) has
    // a right line one step below the left one though nothing fell (a
    // numpy leak was cut 1 run in 12 under load, its first 3 s left "too
    // short to call")
    let drops = fl.at(tk) - fr.at(tk) >= sig && fall_across(&pts, k) >= sig;
    if (step < sig && bend < sig) || !(turns || drops) {
        out.push(s);
        return;
    }
    let mid = s.range.start + k;
    let left = Span {
        range: s.range.start..mid,
        ..s.clone()
    };
    let right = Span {
        range: mid..s.range.end,
        cut: "slope change",
        ..s
    };
    split(run, th, left, depth + 1, out);
    split(run, th, right, depth + 1, out);
}

/// Samples on each side of a cut whose median is that side's level there.
const LEVEL_TICKS: usize = 3;

/// How far the series fell across the cut at `k`: the median of the
/// [`LEVEL_TICKS`] samples before it minus the median of those after it
/// (one sample out of line on either side, a temporary or a late
/// sample, moves neither level). Negative when it rose.
fn fall_across(pts: &[(f64, f64)], k: usize) -> f64 {
    let level = |side: &[(f64, f64)]| {
        let mut ys: Vec<f64> = side.iter().map(|p| p.1).collect();
        crate::fit::median(&mut ys)
    };
    let before = &pts[k.saturating_sub(LEVEL_TICKS)..k];
    let after = &pts[k..(k + LEVEL_TICKS).min(pts.len())];
    match (level(before), level(after)) {
        (Some(b), Some(a)) => b - a,
        _ => 0.0,
    }
}

/// The index where two least-squares lines leave the least squared error,
/// if they leave at most `1 - split_gain` of one line's.
fn best_cut(pts: &[(f64, f64)], th: &Thresholds) -> Option<usize> {
    let n = pts.len();
    // prefix sums for O(1) least squares of any prefix/suffix
    let mut pre = vec![[0.0f64; 5]; n + 1];
    for (i, &(x, y)) in pts.iter().enumerate() {
        let p = pre[i];
        pre[i + 1] = [p[0] + x, p[1] + y, p[2] + x * x, p[3] + x * y, p[4] + y * y];
    }
    let sse_of = |a: usize, b: usize| -> f64 {
        let m = (b - a) as f64;
        if m < 3.0 {
            return 0.0;
        }
        let d: Vec<f64> = (0..5).map(|j| pre[b][j] - pre[a][j]).collect();
        let sxx = d[2] - d[0] * d[0] / m;
        let sxy = d[3] - d[0] * d[1] / m;
        let syy = d[4] - d[1] * d[1] / m;
        if sxx <= 0.0 {
            return syy.max(0.0);
        }
        (syy - sxy * sxy / sxx).max(0.0)
    };
    let whole = sse_of(0, n);
    if whole <= 0.0 {
        return None;
    }
    let t0 = pts[0].0;
    let t1 = pts[n - 1].0;
    let mut best: Option<(usize, f64)> = None;
    for (k, &(t, _)) in pts.iter().enumerate().take(n.saturating_sub(3)).skip(3) {
        if t - t0 < th.split_min_s || t1 - t < th.split_min_s {
            continue;
        }
        let e = sse_of(0, k) + sse_of(k, n);
        if best.is_none_or(|(_, b)| e < b) {
            best = Some((k, e));
        }
    }
    let (k, e) = best?;
    (e <= (1.0 - th.split_gain) * whole).then_some(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Source;
    use amm_timeline::{End, Levels, Phase, Split};

    fn tick(t: f64, unmanaged: u64) -> At<Tick> {
        At {
            t,
            attempt: 0,
            item: Tick {
                process: unmanaged + (100 << 20),
                split: Some(Split {
                    managed: 100 << 20,
                    unmanaged_live: unmanaged,
                    ..Split::default()
                }),
                ..Tick::default()
            },
        }
    }

    fn phase(name: &str) -> Event {
        Event::Phase(Phase {
            name: name.into(),
            ..Phase::default()
        })
    }

    fn run(ticks: Vec<At<Tick>>, events: Vec<(f64, Event)>) -> Run {
        let mut r = Run::kernel(None, Levels::default());
        r.source = Source::WorkerTimeline;
        r.ticks = ticks;
        for (t, k) in events {
            r.push_event(t, k);
        }
        r
    }

    #[test]
    fn phases_repeats_merge_short_ones_fold_teardown_drops() {
        let ticks: Vec<At<Tick>> = (0..40).map(|i| tick(i as f64 * 0.2, 10 << 20)).collect();
        let r = run(
            ticks,
            vec![
                (0.0, phase("fill")),
                (0.1, phase("free")),
                (0.15, phase("hold")),
                (2.0, phase("hold")),
                (4.1, phase("after")),
                (7.0, Event::End(End::default())),
            ],
        );
        let s = segment(&r, &Thresholds::default());
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].phases, vec!["fill", "free", "hold"]);
        assert_eq!(s[0].range, 0..21);
        assert_eq!(s[1].phases, vec!["after"]);
        assert_eq!(s[1].range, 21..35, "teardown ticks are left out");
    }

    fn rss(t: f64, mib: u64) -> At<Tick> {
        At {
            t,
            attempt: 0,
            item: Tick::rss(mib << 20),
        }
    }

    #[test]
    fn the_final_fall_before_an_exit_is_teardown() {
        // a leak, then 0.6 s of freeing before the exit at 5.0 s
        let mut ticks: Vec<At<Tick>> = (0..22).map(|i| rss(i as f64 * 0.2, 60 + i)).collect();
        ticks.extend([rss(4.4, 100), rss(4.6, 70), rss(4.8, 52)]);
        let k = teardown_start(&ticks, 5.0).expect("teardown");
        assert_eq!(ticks[k].t, 4.4);
        // a fall that began long before the exit: only its last second
        let ticks: Vec<At<Tick>> = (0..25).map(|i| rss(i as f64 * 0.2, 200 - 4 * i)).collect();
        let k = teardown_start(&ticks, 5.0).expect("teardown");
        assert!((ticks[k].t - 4.0).abs() < 1e-9, "{}", ticks[k].t);
        // still growing at the exit, or a fall under 4 MiB: no teardown
        let ticks: Vec<At<Tick>> = (0..25).map(|i| rss(i as f64 * 0.2, 60 + i)).collect();
        assert_eq!(teardown_start(&ticks, 5.0), None);
        let mut ticks: Vec<At<Tick>> = (0..24).map(|i| rss(i as f64 * 0.2, 60 + i)).collect();
        ticks.push(rss(4.8, 81));
        assert_eq!(teardown_start(&ticks, 5.0), None);
        assert_eq!(teardown_start(&[], 5.0), None);
    }

    /// An allocator that keeps what the program freed on its way out
    /// (jemalloc's dirty pages) shows the teardown in the heap, not in RSS;
    /// a page faulted in meanwhile does not hide it.
    #[test]
    fn a_teardown_the_allocator_keeps_resident_is_teardown() {
        let mib = 1u64 << 20;
        let mut ticks: Vec<At<Tick>> = (0..20).map(|i| tick(i as f64 * 0.2, i * 4 * mib)).collect();
        for (t, live, extra) in [(4.0, 76, 0), (4.2, 20, 4096), (4.4, 4, 8192)] {
            let mut a = tick(t, live * mib);
            // RSS stays: the freed pages are the allocator's now
            a.item.process = (100 + 76) * mib + extra;
            ticks.push(a);
        }
        // from the top (76 MiB at 3.8 s and 4.0 s) on
        let k = teardown_start(&ticks, 4.5).expect("teardown");
        assert_eq!(k, 19);
    }

    /// `amm-worker -- CMD`: the exit event is all the supervisor writes;
    /// the leak's stretch ends where the final fall begins, and an exit
    /// after an `end` keeps the workload's own end.
    #[test]
    fn an_unannounced_exit_leaves_the_final_fall_out() {
        let mib = 1u64 << 20;
        let mut ticks: Vec<At<Tick>> = (0..40).map(|i| tick(i as f64 * 0.2, i * 4 * mib)).collect();
        ticks.extend([
            tick(8.0, 156 * mib),
            tick(8.2, 90 * mib),
            tick(8.4, 2 * mib),
        ]);
        let exit = Event::Exit(amm_timeline::Exit::default());
        let r = run(ticks.clone(), vec![(8.5, exit.clone())]);
        let s = segment(&r, &Thresholds::default());
        assert_eq!(s.len(), 1, "{s:?}");
        // from the top (156 MiB at 7.8 s and 8.0 s) on
        assert_eq!(s[0].range, 0..40, "the final fall is teardown");
        let r = run(ticks, vec![(7.0, Event::End(End::default())), (8.5, exit)]);
        let s = segment(&r, &Thresholds::default());
        assert_eq!(s[0].range, 0..35, "the workload's end stays where it was");
    }

    #[test]
    fn a_bend_cuts_a_stretch_and_a_straight_line_does_not() {
        let mib = 1u64 << 20;
        let bent: Vec<At<Tick>> = (0..60)
            .map(|i| {
                let t = i as f64 * 0.2;
                tick(
                    t,
                    if t < 6.0 {
                        (t * 10.0) as u64 * mib
                    } else {
                        60 * mib
                    },
                )
            })
            .collect();
        let s = segment(&run(bent, vec![]), &Thresholds::default());
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1].cut, "slope change");
        let t_cut = 0.2 * s[1].range.start as f64;
        assert!((5.0..=7.0).contains(&t_cut), "cut at {t_cut}");
        let straight: Vec<At<Tick>> = (0..60)
            .map(|i| tick(i as f64 * 0.2, (i as u64) * mib))
            .collect();
        assert_eq!(
            segment(&run(straight, vec![]), &Thresholds::default()).len(),
            1
        );
    }

    /// A steady leak whose program missed one step (descheduled for a
    /// tick): the line after it lies a step below the line before it, but
    /// nothing fell, so it is one stretch; the same rise with memory that
    /// really drops (40 MiB returned) is cut there.
    #[test]
    fn a_missed_step_is_no_drop_and_a_fall_is() {
        let mib = 1u64 << 20;
        let leak = |fall: u64| -> Vec<At<Tick>> {
            (0..50)
                .map(|i| {
                    let steps = if i < 25 { i } else { i - 1 };
                    let fell = if i < 25 { 0 } else { fall };
                    tick(i as f64 * 0.2, (40 + 4 * steps) * mib - fell * mib)
                })
                .collect()
        };
        let s = segment(&run(leak(0), vec![]), &Thresholds::default());
        assert_eq!(s.len(), 1, "{s:?}");
        let s = segment(&run(leak(40), vec![]), &Thresholds::default());
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1].range.start, 25, "{s:?}");
    }

    /// The suite's fast leak on a loaded machine: 30 MiB/s for 5 s, then
    /// 10 MiB/s while its thread got less CPU. Cut there, the leak phase's
    /// first stretch held less than half of the leak.
    #[test]
    fn a_leak_that_slows_down_is_one_stretch() {
        let mib = 1u64 << 20;
        let ticks: Vec<At<Tick>> = (0..55)
            .map(|i| {
                let t = i as f64 * 0.2;
                let u = if t < 5.0 {
                    t * 30.0
                } else {
                    150.0 + (t - 5.0) * 10.0
                };
                tick(t, (u * mib as f64) as u64)
            })
            .collect();
        let s = segment(&run(ticks, vec![]), &Thresholds::default());
        assert_eq!(s.len(), 1, "{s:?}");
    }
}
