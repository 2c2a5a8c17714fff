//! The numbers the rules decide with: a series' floor and its trend, what
//! rises above the floor and falls back, and robust changes.

use crate::fit::{self, Line};
use crate::report::Trend;
use crate::thresholds::Thresholds;

/// A trend and the line through its floor.
pub(super) struct Fitted {
    pub trend: Trend,
    pub line: Line,
}

/// The trend of the floor of `v` (the minimum of each time bin), or `None`
/// when the series is too short to have one. Its growth is what was
/// observed, never more: the fitted slope times the window, but at most
/// from the first floor bin to the highest value seen (a staircase's
/// corners or a cache that stopped must not be extrapolated past).
pub(super) fn fit_trend(
    name: &str,
    t: &[f64],
    v: &[u64],
    th: &Thresholds,
    sig: u64,
) -> Option<Fitted> {
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
    let fitted = line.slope * window;
    let top = v.iter().copied().max().unwrap_or(0) as f64;
    let bottom = v.iter().copied().min().unwrap_or(0) as f64;
    let growth = if fitted >= 0.0 {
        fitted.min((top - floor[0].1).max(0.0))
    } else {
        fitted.max(-(floor[0].1 - bottom).max(0.0))
    };
    Some(Fitted {
        trend: Trend {
            series: name.to_string(),
            from_s: t[0],
            to_s: t[t.len() - 1],
            slope_bytes_per_s: line.slope,
            growth_bytes: growth as i64,
            r2: line.r2,
            mann_kendall: mk,
            floor: floor.iter().map(|p| (p.0, p.1.max(0.0) as u64)).collect(),
        },
        line,
    })
}

/// What rose above a series' floor and fell back.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Excursions {
    /// The highest rise above the floor that fell back, bytes.
    pub peak: u64,
    /// The mean of what stood above the floor (0 when nothing fell back).
    pub mean: u64,
    /// How many rises fell back.
    pub count: usize,
    /// When the first one fell back, seconds.
    pub first_fall_s: Option<f64>,
}

/// Rises of `v` above its floor (`line`, else the 20th percentile) that
/// fell back: a rise counts only when the series itself then falls by at
/// least half of it. Steps of a staircase stand above a line fitted
/// through them, but nothing falls: they are not temporaries.
pub(super) fn excursions(t: &[f64], v: &[u64], line: Option<&Line>) -> Excursions {
    // without a fitted floor (a short stretch), the floor is the 20th
    // percentile: robust to a first sample taken before the stretch's work
    let low = {
        let mut s = v.to_vec();
        s.sort_unstable();
        s.get(s.len() / 5).copied().unwrap_or(0) as f64
    };
    let base = |i: usize| line.map_or(low, |l| l.at(t[i]));
    let exc: Vec<f64> = (0..v.len())
        .map(|i| (v[i] as f64 - base(i)).max(0.0))
        .collect();
    let top = exc.iter().copied().fold(0.0, f64::max);
    let mut out = Excursions::default();
    let mut i = 0;
    while i < exc.len() {
        if top <= 0.0 || exc[i] <= top / 2.0 {
            i += 1;
            continue;
        }
        // one rise: from i while above half the highest
        let start = i;
        while i < exc.len() && exc[i] > top / 2.0 {
            i += 1;
        }
        let (k, height) = (start..i)
            .map(|k| (k, exc[k]))
            .fold((start, 0.0), |a, b| if b.1 > a.1 { b } else { a });
        let next = (i..exc.len())
            .find(|&j| exc[j] > top / 2.0)
            .unwrap_or(exc.len());
        let fell = (k..next).find(|&j| (v[k] as f64 - v[j] as f64) >= height / 2.0);
        if let Some(j) = fell {
            out.count += 1;
            out.peak = out.peak.max(height as u64);
            out.first_fall_s.get_or_insert(t[j]);
        }
    }
    if out.count > 0 {
        out.mean = (exc.iter().sum::<f64>() / exc.len() as f64) as u64;
    }
    out
}

/// The mean of `v` (0 when empty).
pub(super) fn mean(v: &[u64]) -> u64 {
    if v.is_empty() {
        0
    } else {
        (v.iter().map(|&x| x as u128).sum::<u128>() / v.len() as u128) as u64
    }
}

/// Change from the first floor bin to the last, by their medians (robust to
/// a single odd tick), bytes.
pub(super) fn robust_delta(v: &[u64], bins: usize) -> i64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn spikes_fall_back_and_the_steps_of_a_staircase_do_not() {
        let t: Vec<f64> = (0..60).map(|i| i as f64 * 0.2).collect();
        let spikes: Vec<u64> = (0..60)
            .map(|i| if i % 10 < 3 { 200 * MIB } else { 10 * MIB })
            .collect();
        let e = excursions(&t, &spikes, None);
        assert_eq!(e.count, 6, "{e:?}");
        assert!(e.peak >= 150 * MIB, "{e:?}");
        // 64 MiB kept every 2 s and never freed
        let stairs: Vec<u64> = (0..60).map(|i| (i / 10) as u64 * 64 * MIB).collect();
        let pts: Vec<(f64, f64)> = t
            .iter()
            .zip(&stairs)
            .map(|(&a, &b)| (a, b as f64))
            .collect();
        let line = fit::theil_sen(&fit::floor_points(&pts, 6)).expect("line");
        assert_eq!(excursions(&t, &stairs, Some(&line)), Excursions::default());
    }

    #[test]
    fn growth_is_what_was_seen_not_the_line_times_the_window() {
        // 160 MiB filled in 10 s, then 3 s flat: the line through the floor
        // times 13 s says more than ever was there
        let t: Vec<f64> = (0..=65).map(|i| i as f64 * 0.2).collect();
        let v: Vec<u64> = t
            .iter()
            .map(|&s| (s.min(10.0) * 16.0 * MIB as f64) as u64)
            .collect();
        let f = fit_trend("u", &t, &v, &Thresholds::default(), 4 * MIB).expect("fit");
        assert!(
            f.trend.growth_bytes as u64 <= 160 * MIB,
            "grew {} MiB, never more than 160 was there",
            f.trend.growth_bytes as u64 / MIB
        );
    }
}
