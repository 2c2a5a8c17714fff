//! The numbers the classifier decides with, and why each is what it is.
//! They are written into every JSON report (`thresholds`), so a verdict can
//! always be traced to the rule that made it.

use serde::Serialize;

/// The classifier's thresholds. [`Thresholds::default`] is what the
/// reports use; each field says why.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Smallest amount that earns a verdict, bytes (4 MiB). Below it is the
    /// allocators' own noise, measured on the suite's steady stretches: a
    /// jemalloc process carries 3–7 MiB of metadata and thread-cache slack
    /// that moves by about 1 MiB, glibc per-thread arenas a few hundred KiB.
    pub min_bytes: u64,
    /// ... or this fraction of the stretch's median RSS, whichever is larger
    /// (1 %): growth smaller than that does not change what the process
    /// costs.
    pub min_fraction: f64,
    /// Time bins whose minima make the floor of a series (6). Mann–Kendall
    /// on 6 points reaches p = 0.0014 when every bin is higher than the one
    /// before and p = 0.0083 with one bin out of order, so one bin that
    /// falls inside a spike still lets a real trend through, and fewer than
    /// 6 bins can never pass `leak_p`.
    pub floor_bins: usize,
    /// Fewest ticks per floor bin (2), so each minimum is a minimum of
    /// something: a stretch needs `floor_bins * min_ticks_per_bin` ticks
    /// (2.4 s at the default 200 ms tick) before any trend is called.
    pub min_ticks_per_bin: usize,
    /// Shortest window for a leak verdict, seconds (4 s: twenty ticks, and
    /// longer than the longest task of the suite, so one task's memory cannot
    /// pass for a trend).
    pub leak_min_window_s: f64,
    /// Mann–Kendall p-value at or under which the floor's rise is a trend
    /// (0.01: on 6 bins, at most one out of order).
    pub leak_p: f64,
    /// p-value under which a rise that is not yet a trend is worth an
    /// "undecided" (0.05); above it the floor is treated as flat.
    pub hint_p: f64,
    /// A leak needs managed data steady: managed may grow by at most this
    /// fraction of the unmanaged growth (0.1). Per-value bookkeeping of the
    /// SpillBuffer grows with managed data (measured 1–2 % of it with
    /// 16 KiB values), so unmanaged growth while managed data grows is
    /// never called a leak.
    pub managed_steady_ratio: f64,
    /// While managed data grows, unmanaged growth above this fraction of it
    /// (0.25) is more than bookkeeping can explain, but still not a leak:
    /// "undecided", a stretch with steady managed data decides.
    pub managed_overhead_ratio: f64,
    /// A growth counts as released (so it was temporary, not a leak) when
    /// the floor later falls back by this fraction of it before the
    /// workload ends (0.5).
    pub released_fraction: f64,
    /// In a trend test, two values closer than this fraction of what
    /// counts are a tie (1/16: 256 KiB at the 4 MiB minimum), so a creep of
    /// a few KiB (allocator metadata) does not make a flat series a trend.
    pub tie_fraction: f64,
    /// Least improvement of the squared error for splitting a stretch at a
    /// change of slope (0.7 = the two lines leave at most 30 % of the one
    /// line's error).
    pub split_gain: f64,
    /// Least length of either side of a split, seconds (3 s).
    pub split_min_s: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_bytes: 4 << 20,
            min_fraction: 0.01,
            floor_bins: 6,
            min_ticks_per_bin: 2,
            leak_min_window_s: 4.0,
            leak_p: 0.01,
            hint_p: 0.05,
            managed_steady_ratio: 0.1,
            managed_overhead_ratio: 0.25,
            released_fraction: 0.5,
            tie_fraction: 1.0 / 16.0,
            split_gain: 0.7,
            split_min_s: 3.0,
        }
    }
}

impl Thresholds {
    /// The least amount that counts for a stretch whose median RSS is
    /// `median_process`.
    pub fn significant(&self, median_process: u64) -> u64 {
        self.min_bytes
            .max((median_process as f64 * self.min_fraction) as u64)
    }
}
