//! The rules for a worker's own accounting: what `unmanaged_live` did (a
//! leak, a bounded cache, undecided, data held for a while, temporaries),
//! growth outside the heap, and managed growth. Hoard and fragmentation are
//! in [`super::heap`].

use amm_timeline::Tick;

use super::trend::{Fitted, excursions, fit_trend, mean, robust_delta};
use super::{Ctx, Series};
use crate::evidence;
use crate::fit;
use crate::input::At;
use crate::report::{Finding, Kind, PurgeRef};
use crate::units::{bytes, rate, signed};

/// What every rule of one stretch starts from.
pub(super) struct Stats<'s> {
    pub s: &'s Series,
    /// The least that counts, bytes.
    pub sig: u64,
    /// The stretch's length, seconds.
    pub window: f64,
    /// Robust change of managed data, bytes.
    pub dm: i64,
    /// Its rise (0 if it fell).
    pub m_up: u64,
    /// The purges this stretch owns.
    pub purges: Vec<PurgeRef>,
}

/// `unmanaged_live`'s fitted trend, judged.
struct Judged<'f> {
    fit: &'f Fitted,
    growth: i64,
    p: f64,
    /// The mean rise above the floor's start (the finding's share).
    mean_rise: u64,
    confident: bool,
    hint: bool,
}

/// The median time between two ticks, seconds (0 with fewer than two).
fn tick_interval(t: &[f64]) -> f64 {
    let mut d: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    d.sort_by(f64::total_cmp);
    d.get(d.len() / 2).copied().unwrap_or(0.0)
}

/// Where `unmanaged_live` had got to at the stretch's last tick as RSS
/// saw it: RSS then, less the least the rest of the process (RSS less
/// `unmanaged_live`) held in the stretch. RSS is read at the tick; the
/// allocator's live bytes may lag it (glibc's `mallinfo2`, where nothing
/// counts, is up to a second old: a cache's fill stood still in them for
/// 0.8 s while RSS rose 16 MiB), and the floor's line lags a rise by about
/// half a floor bin (8–13 MiB below what a jemalloc cache had reached).
fn reached_by_rss(s: &Series) -> Option<f64> {
    let rest = s
        .process
        .iter()
        .zip(&s.unmanaged)
        .map(|(p, u)| p.saturating_sub(*u))
        .min()?;
    Some(s.process.last()?.saturating_sub(rest) as f64)
}

fn unmanaged_of(t: &Tick) -> Option<u64> {
    t.split.map(|x| x.unmanaged_live)
}

impl Ctx<'_> {
    /// Every finding of a stretch with the worker's accounting split.
    pub(super) fn worker_findings(&self, s: &Series, sig: u64) -> Vec<Finding> {
        let dm = robust_delta(&s.managed, self.th.floor_bins);
        let st = Stats {
            s,
            sig,
            window: s.t.last().copied().unwrap_or(0.0) - s.t.first().copied().unwrap_or(0.0),
            dm,
            m_up: dm.max(0) as u64,
            purges: self.purge_refs(),
        };
        let u_fit = fit_trend("unmanaged_live", &s.t, &s.unmanaged, self.th, sig);
        let mut out: Vec<Finding> = Vec::new();
        let mut held: Option<Finding> = None;
        match &u_fit {
            None => out.extend(self.short_rise(&st)),
            Some(fit) => {
                let (finding, transient) = self.unmanaged_trend(&st, fit);
                out.extend(finding);
                held = transient;
            }
        }
        out.extend(self.temporaries(&st, u_fit.as_ref(), held));
        out.extend(self.heap_findings(s, sig, &st.purges));
        out.extend(self.non_heap_growth(&st));
        out.extend(self.managed_growth(&st));
        out
    }

    /// A stretch too short for a floor: a steady rise through it is
    /// undecided (too short to tell), unless it is freed later.
    fn short_rise(&self, st: &Stats) -> Option<Finding> {
        let (s, sig, th) = (st.s, st.sig, self.th);
        let rise = s.unmanaged.last().copied().unwrap_or(0) as i64
            - s.unmanaged.first().copied().unwrap_or(0) as i64;
        let need = th.floor_bins * th.min_ticks_per_bin;
        // a rise through the stretch, not one step at its start
        let pts: Vec<(f64, f64)> =
            s.t.iter()
                .zip(&s.unmanaged)
                .map(|(&a, &b)| (a, b as f64))
                .collect();
        let values: Vec<f64> = s.unmanaged.iter().map(|&v| v as f64).collect();
        let steady_rise = s.unmanaged.len() >= 4
            && fit::mann_kendall_tol(&values, sig as f64 * th.tie_fraction).p_increasing
                <= th.hint_p
            && fit::theil_sen(&pts).is_some_and(|l| l.slope * st.window >= sig as f64);
        if !steady_rise
            || rise < sig as i64
            || st.m_up > sig.max((th.managed_steady_ratio * rise as f64) as u64)
        {
            return None;
        }
        let last = s.unmanaged.last().copied().unwrap_or(0) as f64;
        if self
            .released(last - th.released_fraction * rise as f64, unmanaged_of)
            .is_some()
        {
            return None;
        }
        let mut f = Finding::new(
            Kind::Undecided,
            rise as u64,
            0,
            format!(
                "unmanaged_live rose {} in {:.1} s{}: too short to tell a leak from a temporary",
                bytes(rise as u64),
                st.window,
                self.phase_words()
            ),
        );
        f.would_decide = Some(format!(
            "a stretch of at least {:.0} s and {need} samples (this one has {:.1} s, {} samples)",
            th.leak_min_window_s,
            st.window,
            s.t.len()
        ));
        Some(f)
    }

    /// The fitted floor of `unmanaged_live`: (a finding, data held for a
    /// while that was freed later).
    fn unmanaged_trend(&self, st: &Stats, fit: &Fitted) -> (Option<Finding>, Option<Finding>) {
        let th = self.th;
        let tr = &fit.trend;
        let growth = tr.growth_bytes;
        let p = tr.mann_kendall.p_increasing;
        let rising = tr.slope_bytes_per_s > 0.0;
        let base = fit.line.at(tr.from_s);
        let j = Judged {
            fit,
            growth,
            p,
            mean_rise: mean(
                &st.s
                    .unmanaged
                    .iter()
                    .map(|&v| (v as f64 - base).max(0.0) as u64)
                    .collect::<Vec<_>>(),
            ),
            confident: p <= th.leak_p && growth >= st.sig as i64,
            hint: rising && p <= th.hint_p && growth as f64 >= 0.25 * st.sig as f64,
        };
        if !(j.confident || j.hint) {
            return (None, None);
        }
        let managed_moves = st.m_up
            > st.sig
                .max((th.managed_steady_ratio * growth.max(0) as f64) as u64);
        if managed_moves {
            return (self.with_managed_growth(st, &j), None);
        }
        let released = if rising && growth > 0 {
            let end_floor = fit.line.at(tr.to_s);
            self.released(
                end_floor - th.released_fraction * growth as f64,
                unmanaged_of,
            )
        } else {
            None
        };
        if let Some((t_rel, where_)) = released {
            return (None, Some(self.held_then_freed(&j, t_rel, &where_)));
        }
        if j.confident && st.window >= th.leak_min_window_s {
            if let Some(f) = self.bounded_cache(st, &j) {
                return (Some(f), None);
            }
            return (Some(self.leak(st, fit)), None);
        }
        (Some(self.not_yet(st, &j)), None)
    }

    /// Unmanaged growth while managed data grows: undecided when it is
    /// more than bookkeeping (else the managed-growth finding says it).
    fn with_managed_growth(&self, st: &Stats, j: &Judged) -> Option<Finding> {
        let tr = &j.fit.trend;
        if (j.growth as f64) < self.th.managed_overhead_ratio * st.m_up as f64 {
            return None;
        }
        let mut f = Finding::new(
            Kind::Undecided,
            j.growth as u64,
            j.mean_rise,
            format!(
                "unmanaged_live grew {} ({}) while managed data grew {}: more than \
                 bookkeeping, but managed data is not steady, so not called a leak",
                bytes(j.growth as u64),
                rate(tr.slope_bytes_per_s),
                bytes(st.m_up)
            ),
        );
        f.trend = Some(tr.clone());
        f.would_decide = Some(
            "a stretch where managed data is steady (a phase that only computes), \
             at least as long as this one"
                .into(),
        );
        Some(f)
    }

    fn held_then_freed(&self, j: &Judged, t_rel: f64, where_: &str) -> Finding {
        let mut f = Finding::new(
            Kind::Transient,
            j.growth as u64,
            j.mean_rise,
            format!(
                "unmanaged_live grew {}{} and was freed at {:.1} s{}: data held for a while, not a leak",
                bytes(j.growth as u64),
                self.phase_words(),
                t_rel,
                where_
            ),
        );
        f.trend = Some(j.fit.trend.clone());
        f
    }

    /// A rise not yet sure, long or large enough to call: undecided, with
    /// the window that would decide it.
    fn not_yet(&self, st: &Stats, j: &Judged) -> Finding {
        let (th, tr, window, sig) = (self.th, &j.fit.trend, st.window, st.sig);
        let needed = if tr.slope_bytes_per_s > 0.0 {
            (sig as f64 / tr.slope_bytes_per_s)
                .max(th.leak_min_window_s)
                .max(window * 1.5)
        } else {
            window * 2.0
        };
        let why = if window < th.leak_min_window_s {
            format!("{window:.1} s is too short to call it")
        } else if j.growth < sig as i64 {
            format!("that is less than the {} that counts", bytes(sig))
        } else {
            format!(
                "the rise is not steady enough yet (Mann–Kendall p {:.3})",
                j.p
            )
        };
        let mut f = Finding::new(
            Kind::Undecided,
            j.growth.max(0) as u64,
            j.mean_rise,
            format!(
                "unmanaged_live rose {} ({}){}; {}",
                bytes(j.growth.max(0) as u64),
                rate(tr.slope_bytes_per_s),
                self.phase_words(),
                why
            ),
        );
        f.trend = Some(tr.clone());
        f.would_decide = Some(format!(
            "a window of at least {needed:.0} s at this rate (this one is {window:.1} s)"
        ));
        f
    }

    /// Growth that stops while the same work goes on is a cache of the size
    /// it reached, not a leak: from some tick on, `unmanaged_live` never
    /// falls below its final floor (less half of what counts) again and
    /// its floor stays flat (within what counts), in this stretch and then
    /// in the stretches of the same phases that follow, for at least the
    /// leak window and at least as long as it rose.
    ///
    /// Where the rise stops is found at the resolution of ticks, not of
    /// the stretch's cut nor of its floor bins: on a busy machine the cut
    /// between the rise and the plateau falls a few ticks early or late
    /// (the two lines' best fit; an allocator record that lags RSS), so the
    /// rise may end in the next stretch, at no more than its own pace.
    fn bounded_cache(&self, st: &Stats, j: &Judged) -> Option<Finding> {
        let tr = &j.fit.trend;
        let sig = st.sig as f64;
        let pts = self.continued_points();
        let plateau = fit::floor_points(&pts, self.th.floor_bins).last()?.1;
        // the last tick below the plateau's band ends the rise (a point
        // above it is a temporary, not growth); never below: no rise
        let k = pts.iter().rposition(|p| p.1 < plateau - sig / 2.0)?;
        let flat_from = pts.get(k + 1)?.0;
        let flat_until = pts.last()?.0;
        let floor = fit::floor_points(&pts[k + 1..], self.th.floor_bins);
        let (lo, hi) = floor
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
                (a.0.min(p.1), a.1.max(p.1))
            });
        // where this stretch's rise ends: its line, never above what was seen
        let top = st.s.unmanaged.iter().copied().max().unwrap_or(0) as f64;
        let end = j.fit.line.at(tr.to_s).min(top);
        // past this stretch the rise may go on at its own pace until it
        // stops, and one tick's more: the cut falls between two ticks, and
        // the record a tick carries is up to an interval older than its RSS
        let pace = j.fit.line.slope.max(0.0);
        let more = pace * ((flat_from - tr.to_s).max(0.0) + tick_interval(&st.s.t));
        let reached = end.max(reached_by_rss(st.s).unwrap_or(end));
        let (rose_s, flat_s) = (flat_from - tr.from_s, flat_until - flat_from);
        if hi - lo > sig
            || plateau < end - sig
            || plateau > reached + sig + more
            || flat_s < self.th.leak_min_window_s.max(rose_s)
        {
            return None;
        }
        // the size it reached: from the floor where the rise began
        let size = (plateau - tr.floor.first()?.1 as f64).max(0.0) as u64;
        let mut f = Finding::new(
            Kind::BoundedCache,
            size,
            j.mean_rise,
            format!(
                "bounded cache of {}: unmanaged_live grew {} in {:.1} s{}, then stayed flat for \
                 {:.1} s while the same work went on — growth that stops is not a leak",
                bytes(size),
                bytes(size),
                rose_s,
                self.phase_words(),
                flat_s
            ),
        );
        f.trend = Some(tr.clone());
        Some(f)
    }

    /// `unmanaged_live` in this stretch, then in the stretches right after
    /// it that run the same phases of the same attempt (cut only at a
    /// change of slope), until the workload ended.
    fn continued_points(&self) -> Vec<(f64, f64)> {
        let me = self.span();
        let end = self.workload_end();
        let same = self.spans[self.index + 1..]
            .iter()
            .take_while(|s| s.attempt == me.attempt && s.phases == me.phases);
        std::iter::once(me)
            .chain(same)
            .flat_map(|s| &self.run.ticks[s.range.clone()])
            .filter(|t| t.t < end)
            .filter_map(|t| unmanaged_of(t).map(|u| (t.t, u as f64)))
            .collect()
    }

    /// What rose above the floor and fell back (merged into `held`, data
    /// held for a while, when there is one).
    fn temporaries(
        &self,
        st: &Stats,
        u_fit: Option<&Fitted>,
        held: Option<Finding>,
    ) -> Option<Finding> {
        let e = excursions(&st.s.t, &st.s.unmanaged, u_fit.map(|f| &f.line));
        if e.count == 0 || e.peak < st.sig {
            return held;
        }
        let head = if e.count == 1 {
            format!(
                "unmanaged_live rose up to {} above its floor once{} and fell back at {:.1} s: \
                 data held for a while",
                bytes(e.peak),
                self.phase_words(),
                e.first_fall_s.unwrap_or(0.0)
            )
        } else {
            format!(
                "task temporaries up to {} above the floor of unmanaged_live, {} time(s){}, returned each time",
                bytes(e.peak),
                e.count,
                self.phase_words()
            )
        };
        Some(match held {
            Some(mut f) => {
                f.notes.push(head);
                f.bytes = f.bytes.max(e.peak);
                f.mean_bytes = f.mean_bytes.max(e.mean);
                f
            }
            None => Finding::new(Kind::Transient, e.peak, e.mean, head),
        })
    }

    /// The floor of `non_heap` rises as a leak's would and is not freed.
    fn non_heap_growth(&self, st: &Stats) -> Option<Finding> {
        let (th, s, sig) = (self.th, st.s, st.sig);
        let fit = fit_trend("non_heap", &s.t, &s.non_heap, th, sig)?;
        let tr = &fit.trend;
        if tr.mann_kendall.p_increasing > th.leak_p
            || tr.growth_bytes < sig as i64
            || st.window < th.leak_min_window_s
        {
            return None;
        }
        let end_floor = fit.line.at(tr.to_s);
        let released = self.released(
            end_floor - th.released_fraction * tr.growth_bytes as f64,
            |t| t.split.map(|x| x.non_heap),
        );
        if released.is_some() {
            return None;
        }
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
        Some(f)
    }

    /// Managed data grew; unmanaged memory only followed.
    fn managed_growth(&self, st: &Stats) -> Option<Finding> {
        let (s, m_up) = (st.s, st.m_up);
        if m_up < st.sig {
            return None;
        }
        let du = robust_delta(&s.unmanaged, self.th.floor_bins);
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
                rate(m_up as f64 / st.window.max(1e-9)),
                self.phase_words(),
                signed(du),
                100.0 * du as f64 / m_up as f64
            ),
        );
        let spilled = robust_delta(&s.spilled, self.th.floor_bins);
        if spilled > 0 {
            f.notes
                .push(format!("{} of it went to disk", bytes(spilled as u64)));
        }
        Some(f)
    }

    /// A leak: the finding, the purges that failed to return it, and the
    /// size classes and arenas that grew.
    fn leak(&self, st: &Stats, fit: &Fitted) -> Finding {
        let ticks = self.ticks();
        let tr = &fit.trend;
        let growth = tr.growth_bytes.max(0) as u64;
        let base = fit.line.at(tr.from_s);
        let mean_rise = mean(
            &st.s
                .unmanaged
                .iter()
                .map(|&v| (v as f64 - base).max(0.0) as u64)
                .collect::<Vec<_>>(),
        );
        // a purge "failed" when unmanaged_live right after it was still on
        // (or above) the rising floor
        let failed = st
            .purges
            .iter()
            .filter(|p| match ticks.iter().find(|t| t.t > p.t_s) {
                Some(a) => {
                    let au = unmanaged_of(a).unwrap_or(0) as f64;
                    au > fit.line.at(a.t) - 0.25 * growth as f64
                }
                None => (p.returned_bytes as f64) < 0.25 * growth as f64,
            })
            .count();
        let purge_words = if st.purges.is_empty() {
            "no purge ran in this stretch (a purge cannot return live memory; --probe-purge shows it)"
                .to_string()
        } else {
            format!(
                "{failed} of {} purge(s) in it left unmanaged_live where it was",
                st.purges.len()
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
                signed(st.dm),
                purge_words
            ),
        );
        f.trend = Some(tr.clone());
        f.purges = st.purges.clone();
        leak_classes(&mut f, ticks, st.sig);
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
}

/// The size classes and arenas a leak grew, from the first tick where
/// managed data is at the level it ends with: the classes of values put
/// before (a managed base folded into this stretch) are not the leak's.
fn leak_classes(f: &mut Finding, ticks: &[At<Tick>], sig: u64) {
    let b = ticks.last();
    let a = b.and_then(|b| {
        let m_end = b.split.map_or(0, |x| x.managed);
        ticks
            .iter()
            .find(|t| t.split.is_some_and(|x| x.managed.abs_diff(m_end) <= sig))
    });
    let (Some(a), Some(b)) = (a, b) else {
        return;
    };
    f.size_classes = evidence::class_growth(a, b);
    f.arenas = evidence::glibc_growth(a, b);
    if f.size_classes.is_empty() {
        return;
    }
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
