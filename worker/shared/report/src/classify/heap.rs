//! Hoard and fragmentation: freed memory the allocator keeps, told apart by
//! whether a purge returns it (jemalloc's dirty/muzzy pages and slab slack;
//! glibc's free chunks and what a trim gave back), or undecided on glibc
//! when no trim has run.

use amm_timeline::Heap;

/// What decides a hoard from fragmentation where no trim ran (a finding's
/// `would_decide`; the run's verdict looks for it, see `answered_later`).
pub(super) const TRIM_DECIDES: &str = "a trim: run the worker with --probe-purge (it trims when \
     memory is hoarded and records what came back), or add a purge to the workload";

use super::trend::{fit_trend, mean};
use super::{Ctx, Series};
use crate::evidence;
use crate::report::{Finding, Kind, PurgeRef};
use crate::units::{bytes, rate};

/// "2 purge(s) (threshold; at 1.0 s, 2.0 s) returned 200 MiB in all, up
/// to 150 MiB at once".
fn purge_words(list: &[&PurgeRef]) -> String {
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
}

impl Ctx<'_> {
    /// Hoard, fragmentation, or (glibc without a trim) undecided.
    pub(super) fn heap_findings(&self, s: &Series, sig: u64, purges: &[PurgeRef]) -> Vec<Finding> {
        let ticks = self.ticks();
        if ticks
            .iter()
            .any(|t| matches!(t.heap, Some(Heap::Jemalloc(_))))
        {
            self.je_hoard(sig, purges)
                .into_iter()
                .chain(self.je_slack(sig, purges))
                .collect()
        } else if ticks
            .iter()
            .any(|t| matches!(t.heap, Some(Heap::System(_))))
        {
            self.glibc_findings(s, sig, purges)
        } else {
            Vec::new()
        }
    }

    /// jemalloc's dirty and muzzy pages, or what a purge returned.
    fn je_hoard(&self, sig: u64, purges: &[PurgeRef]) -> Option<Finding> {
        let ticks = self.ticks();
        let purgeable: Vec<u64> = ticks
            .iter()
            .filter_map(|t| evidence::je_parts(t))
            .map(|p| p.0)
            .collect();
        let returning: Vec<&PurgeRef> = purges.iter().filter(|p| p.returned_bytes >= sig).collect();
        let returned_max = purges.iter().map(|p| p.returned_bytes).max().unwrap_or(0);
        let max_p = purgeable.iter().copied().max().unwrap_or(0);
        if max_p.max(returned_max) < sig {
            return None;
        }
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
        if let Some(t) = ticks
            .iter()
            .max_by_key(|t| evidence::je_parts(t).map_or(0, |p| p.0))
        {
            f.arenas = evidence::arenas(t, None);
        }
        Some(f)
    }

    /// jemalloc's slab slack (`active − allocated`), which no purge returns.
    fn je_slack(&self, sig: u64, purges: &[PurgeRef]) -> Option<Finding> {
        let ticks = self.ticks();
        let slack: Vec<u64> = ticks
            .iter()
            .filter_map(|t| evidence::je_parts(t))
            .map(|p| p.1)
            .collect();
        let max_s = slack.iter().copied().max().unwrap_or(0);
        if max_s < sig {
            return None;
        }
        let returned_total: u64 = purges.iter().map(|p| p.returned_bytes).sum();
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
        if let Some(t) = ticks
            .iter()
            .max_by_key(|t| evidence::je_parts(t).map_or(0, |p| p.1))
        {
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
        Some(f)
    }

    /// glibc: the trim that says what the hoard is (one here, the next one
    /// while the heap has not changed since, or the last one before, which
    /// speaks only for what it left); without one, undecided.
    fn glibc_findings(&self, s: &Series, sig: u64, purges: &[PurgeRef]) -> Vec<Finding> {
        let max_h = s.hoarded.iter().copied().max().unwrap_or(0);
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
        match deciding.iter().max_by_key(|p| p.hoarded_before) {
            Some(p) if p.hoarded_before >= sig => {
                let returned_max = purges.iter().map(|p| p.returned_bytes).max().unwrap_or(0);
                let mut out = Vec::new();
                if p.returned_bytes >= sig && !only_residue {
                    out.push(self.glibc_hoard(s, sig, p, &deciding, returned_max));
                }
                if p.hoarded_after >= sig {
                    out.push(self.glibc_residue(s, p, &deciding));
                }
                out
            }
            _ if max_h >= sig => vec![self.glibc_untrimmed(s, sig, purges)],
            _ => Vec::new(),
        }
    }

    /// What a trim returned: a hoard.
    fn glibc_hoard(
        &self,
        s: &Series,
        sig: u64,
        p: &PurgeRef,
        deciding: &[PurgeRef],
        returned_max: u64,
    ) -> Finding {
        let f_ret = (p.returned_bytes as f64 / p.hoarded_before as f64).clamp(0.0, 1.0);
        let refs: Vec<&PurgeRef> = deciding
            .iter()
            .filter(|q| q.returned_bytes >= sig)
            .collect();
        let mut f = Finding::new(
            Kind::Hoard,
            p.returned_bytes.max(returned_max),
            (mean(&s.hoarded) as f64 * f_ret) as u64,
            format!(
                "freed memory glibc kept{}: {}",
                self.phase_words(),
                purge_words(&refs)
            ),
        );
        f.purges = deciding.to_vec();
        if let Some(t) = self
            .ticks()
            .iter()
            .max_by_key(|t| t.split.map_or(0, |x| x.hoarded))
        {
            f.arenas = evidence::arenas(t, None);
        }
        f
    }

    /// What a trim left hoarded: fragmentation, by arena right after it.
    fn glibc_residue(&self, s: &Series, p: &PurgeRef, deciding: &[PurgeRef]) -> Finding {
        let f_ret = (p.returned_bytes as f64 / p.hoarded_before as f64).clamp(0.0, 1.0);
        let mut f = Finding::new(
            Kind::Fragmentation,
            p.hoarded_after,
            (mean(&s.hoarded) as f64 * (1.0 - f_ret)) as u64,
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
        f.purges = deciding.to_vec();
        if let Some(t) = self.run.ticks.iter().find(|t| t.t > p.t_s) {
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
        f
    }

    /// Hoarded with no trim to say what it is: the top of the main arena
    /// (which a trim returns), else undecided.
    fn glibc_untrimmed(&self, s: &Series, sig: u64, purges: &[PurgeRef]) -> Finding {
        let ticks = self.ticks();
        let (max_h, mean_h) = (
            s.hoarded.iter().copied().max().unwrap_or(0),
            mean(&s.hoarded),
        );
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
            return f;
        }
        // trims that ran here found less than counts: it came and went
        // between them (say so, not that none ran)
        let trims = match purges.iter().map(|p| p.hoarded_before).max() {
            None => "no trim ran".to_string(),
            Some(seen) => format!(
                "the {} trim(s) here found at most {} hoarded",
                purges.len(),
                bytes(seen)
            ),
        };
        let mut f = Finding::new(
            Kind::Undecided,
            max_h,
            mean_h,
            format!(
                "{} hoarded in glibc's free chunks{}: a hoard if a trim returns it, \
                 fragmentation if not — {trims}",
                bytes(max_h),
                self.phase_words()
            ),
        );
        if let Some(h) = fit_trend("hoarded", &s.t, &s.hoarded, self.th, sig)
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
        f.would_decide = Some(TRIM_DECIDES.into());
        f
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
}
