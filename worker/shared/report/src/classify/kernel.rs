//! Kernel data only (RSS, its anonymous and file/shared parts): a rise of
//! anonymous memory stays undecided, a rise of file-backed memory is
//! non-heap growth, RSS that falls back before the process ends is
//! transient.

use super::trend::{Fitted, excursions, fit_trend, robust_delta};
use super::{Ctx, Series};
use crate::report::{Finding, Kind};
use crate::units::{bytes, rate};

impl Ctx<'_> {
    /// Every finding of a stretch without the accounting split.
    pub(super) fn kernel_findings(&self, s: &Series, sig: u64) -> Vec<Finding> {
        let p_fit = fit_trend("process", &s.t, &s.process, self.th, sig);
        let mut out: Vec<Finding> = p_fit
            .as_ref()
            .and_then(|fit| self.rss_trend(s, sig, fit))
            .into_iter()
            .collect();
        let e = excursions(&s.t, &s.process, p_fit.as_ref().map(|f| &f.line));
        if e.count > 0 && e.peak >= sig {
            out.push(Finding::new(
                Kind::Transient,
                e.peak,
                e.mean,
                format!(
                    "RSS rose up to {} above its floor {} time(s) and went back to the kernel each time",
                    bytes(e.peak),
                    e.count
                ),
            ));
        }
        out
    }

    /// RSS's fitted floor: freed later (transient), file-backed (non-heap
    /// growth), or undecided.
    fn rss_trend(&self, s: &Series, sig: u64, fit: &Fitted) -> Option<Finding> {
        let th = self.th;
        let window = s.t.last().copied().unwrap_or(0.0) - s.t.first().copied().unwrap_or(0.0);
        let tr = &fit.trend;
        let growth = tr.growth_bytes;
        let p = tr.mann_kendall.p_increasing;
        let confident = p <= th.leak_p && growth >= sig as i64 && window >= th.leak_min_window_s;
        let hint =
            tr.slope_bytes_per_s > 0.0 && p <= th.hint_p && growth as f64 >= 0.25 * sig as f64;
        if !(confident || hint) {
            return None;
        }
        let released = self.released(
            fit.line.at(tr.to_s) - th.released_fraction * growth as f64,
            |t| Some(t.process),
        );
        let file = robust_delta(&s.file, th.floor_bins);
        let mut f = if let Some((t_rel, _)) = released {
            Finding::new(
                Kind::Transient,
                growth as u64,
                0,
                format!(
                    "RSS grew {} and went back to the kernel at {:.1} s: memory held for a while",
                    bytes(growth as u64),
                    t_rel
                ),
            )
        } else if confident && !s.file.is_empty() && file as f64 >= 0.5 * growth as f64 {
            Finding::new(
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
            )
        } else {
            self.rss_undecided(window, fit, confident)
        };
        f.trend = Some(tr.clone());
        Some(f)
    }

    fn rss_undecided(&self, window: f64, fit: &Fitted, confident: bool) -> Finding {
        let tr = &fit.trend;
        let growth = tr.growth_bytes.max(0) as u64;
        let mut f = Finding::new(
            Kind::Undecided,
            growth,
            0,
            format!(
                "RSS grew {} at {} for {:.1} s (R² {:.2}, Mann–Kendall p {:.4}): from the \
                 kernel alone a leak, a hoard and fragmentation look the same",
                bytes(growth),
                rate(tr.slope_bytes_per_s),
                window,
                tr.r2,
                tr.mann_kendall.p_increasing
            ),
        );
        f.would_decide = Some(if confident {
            "the allocator's statistics: run the workload under amm-worker (its report \
             splits live, hoarded and non-heap memory), or trim/purge the process and \
             watch whether RSS falls"
                .into()
        } else {
            format!(
                "a longer window (at least {:.0} s) and then the allocator's statistics",
                (window * 2.0).max(self.th.leak_min_window_s)
            )
        });
        f
    }
}
