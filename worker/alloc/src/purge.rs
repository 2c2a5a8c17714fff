//! Giving the hoard back: purge (jemalloc) or trim (glibc), what it
//! returned, what it cost, and when it may run ([`Governor`]).

use std::io;
use std::time::{Duration, Instant};

use crate::{Allocator, Detail, glibc, heap_stats, jemalloc, rss_bytes};

/// Most of the run's wall time that threshold purges may cost, counted in
/// the CPU time they took (a busy machine stretches their wall time).
pub const PURGE_BUDGET: f64 = 0.02;

/// What one purge (jemalloc) or trim (glibc) gave back: the timeline
/// contract's type.
pub use amm_timeline::PurgeReport;

/// What one purge/trim cost the thread that ran it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PurgeCost {
    /// Wall time, microseconds.
    pub wall_us: u64,
    /// CPU time (user + kernel), microseconds.
    pub cpu_us: u64,
}

/// Gives `allocator`'s hoard back to the kernel: jemalloc
/// `arena.<MALLCTL_ARENAS_ALL>.purge`, glibc `malloc_trim(0)`; measures what
/// came back (kernel RSS and the allocator's own resident figure).
pub fn reclaim(allocator: Allocator, reason: &str) -> io::Result<PurgeReport> {
    let before = heap_stats(allocator, Detail::Totals)?;
    let rss_before = rss_bytes()?;
    let (cost, purged) = release_hoard(allocator);
    purged?;
    let rss_after = rss_bytes()?;
    let after = heap_stats(allocator, Detail::Totals)?;
    Ok(PurgeReport {
        allocator: Some(allocator),
        reason: reason.to_string(),
        rss_before,
        rss_after,
        returned_bytes: rss_before.saturating_sub(rss_after),
        resident_before: before.resident(),
        resident_after: after.resident(),
        hoarded_before: before.hoarded(),
        hoarded_after: after.hoarded(),
        duration_us: cost.wall_us,
        cpu_us: cost.cpu_us,
    })
}

/// Purges (jemalloc) or trims (glibc) the hoard, nothing more: no
/// statistics are read (see [`reclaim`] for a purge that says what it
/// returned). The cost is measured even when jemalloc refuses the purge.
pub fn release_hoard(allocator: Allocator) -> (PurgeCost, io::Result<()>) {
    let start = Instant::now();
    let cpu_start = thread_cpu_us();
    let result = match allocator {
        Allocator::Jemalloc => jemalloc::purge_all(),
        Allocator::System => {
            glibc::trim();
            Ok(())
        }
    };
    let cost = PurgeCost {
        wall_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        cpu_us: thread_cpu_us().saturating_sub(cpu_start),
    };
    (cost, result)
}

/// CPU time of the calling thread so far (`CLOCK_THREAD_CPUTIME_ID`), in
/// microseconds; 0 if the clock cannot be read.
pub fn thread_cpu_us() -> u64 {
    amm_record::sys::thread_cpu_ns() / 1_000
}

/// Decides when purges may run, the `MALLOC_TRIM_THRESHOLD_` semantics
/// amm-worker and the preload library share: a threshold purge runs when
/// the purgeable hoard passes the threshold, at most once per interval, and
/// only while all purges so far have cost under [`PURGE_BUDGET`] of the
/// run's wall time in CPU time.
#[derive(Debug, Clone)]
pub struct Governor {
    start: Instant,
    last: Option<Instant>,
    cpu_us: u64,
    budget: f64,
}

impl Default for Governor {
    fn default() -> Self {
        Governor::new(PURGE_BUDGET)
    }
}

impl Governor {
    /// A governor allowing purges `budget` (a fraction) of the wall time.
    pub fn new(budget: f64) -> Governor {
        Governor {
            start: Instant::now(),
            last: None,
            cpu_us: 0,
            budget,
        }
    }

    /// A purge ran and cost `cpu_us`: it counts for the interval and the budget.
    pub fn record(&mut self, cpu_us: u64) {
        self.last = Some(Instant::now());
        self.cpu_us += cpu_us;
    }

    /// A purge that does not restart the interval (one batch of a spill)
    /// cost `cpu_us`: it counts for the budget only.
    pub fn charge(&mut self, cpu_us: u64) {
        self.cpu_us += cpu_us;
    }

    /// Time since the last recorded purge (or since the start).
    pub fn since_last(&self) -> Duration {
        self.last.unwrap_or(self.start).elapsed()
    }

    /// Whether the purges so far cost less than the budget.
    pub fn within_budget(&self) -> bool {
        (self.cpu_us as f64) <= self.budget * self.start.elapsed().as_micros() as f64
    }

    /// Whether a threshold purge should run now: `purgeable` passed
    /// `threshold` (`None`: never), the last purge is at least
    /// `min_interval` ago, and the budget allows it.
    pub fn threshold_due(
        &self,
        purgeable: u64,
        threshold: Option<u64>,
        min_interval: Duration,
    ) -> bool {
        threshold.is_some_and(|t| purgeable > t)
            && self.last.is_none_or(|t| t.elapsed() >= min_interval)
            && self.within_budget()
    }

    /// CPU time of all purges so far, microseconds.
    pub fn cpu_us(&self) -> u64 {
        self.cpu_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_purges_wait_for_the_threshold_the_interval_and_the_budget() {
        let mut g = Governor::new(0.5);
        let every = Duration::from_millis(20);
        assert!(!g.threshold_due(100, None, every), "no threshold: never");
        assert!(
            !g.threshold_due(100, Some(100), every),
            "at the threshold: not past it"
        );
        assert!(g.threshold_due(101, Some(100), every));
        g.record(0);
        assert!(
            !g.threshold_due(1 << 30, Some(100), every),
            "inside the interval"
        );
        std::thread::sleep(every);
        assert!(g.threshold_due(1 << 30, Some(100), every));
        g.charge(u64::MAX / 4); // far past any budget
        assert!(!g.within_budget());
        assert!(!g.threshold_due(1 << 30, Some(100), every));
    }
}
