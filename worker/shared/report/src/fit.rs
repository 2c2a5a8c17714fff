//! The statistics behind a trend: least squares (slope, R²), the Theil–Sen
//! slope, the Mann–Kendall trend test with its exact p-value, and the
//! *floor* of a series (the minimum of each time bin), which is what a leak
//! raises and a task temporary does not.

use serde::Serialize;

/// A straight line fitted by least squares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    /// Units of y per unit of x.
    pub slope: f64,
    /// y at x = 0.
    pub intercept: f64,
    /// Coefficient of determination (1 for a perfect fit; 0 when y is flat).
    pub r2: f64,
}

impl Line {
    /// y at `x`.
    pub fn at(&self, x: f64) -> f64 {
        self.intercept + self.slope * x
    }
}

/// Ordinary least squares; `None` for fewer than two points or a single x.
pub fn ols(pts: &[(f64, f64)]) -> Option<Line> {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return None;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = pts.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let r2 = if syy <= 0.0 {
        0.0
    } else {
        (sxy * sxy / (sxx * syy)).clamp(0.0, 1.0)
    };
    Some(Line {
        slope,
        intercept: my - slope * mx,
        r2,
    })
}

/// The median of `v` (sorted in place; the mean of the two middle values
/// for an even count), `None` when it is empty.
pub(crate) fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// The Theil–Sen line: the median of the slopes between every pair of
/// points, through the median of `y - slope * x`. Unmoved by up to ~29 % of
/// outliers (a bin that fell inside a spike).
pub fn theil_sen(pts: &[(f64, f64)]) -> Option<Line> {
    let mut slopes = Vec::new();
    for (i, a) in pts.iter().enumerate() {
        for b in &pts[i + 1..] {
            if b.0 != a.0 {
                slopes.push((b.1 - a.1) / (b.0 - a.0));
            }
        }
    }
    let slope = median(&mut slopes)?;
    let mut icpt: Vec<f64> = pts.iter().map(|p| p.1 - slope * p.0).collect();
    let intercept = median(&mut icpt)?;
    let r2 = ols(pts).map_or(0.0, |l| l.r2);
    Some(Line {
        slope,
        intercept,
        r2,
    })
}

/// The Mann–Kendall test for an increasing trend.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MannKendall {
    /// Points tested.
    pub n: usize,
    /// Concordant minus discordant pairs (ties count 0).
    pub s: i64,
    /// Kendall's tau: `s` over the number of pairs, -1 to 1.
    pub tau: f64,
    /// One-sided p-value of an increasing trend: the chance that a series
    /// without trend (and without ties) scores `s` or more. Ties only lower
    /// `s`, so with ties this errs on the side of "no trend".
    pub p_increasing: f64,
}

/// Mann–Kendall on `ys` in order. Exact p-value (from the distribution of
/// inversions of a random permutation) up to 40 points, the normal
/// approximation beyond.
pub fn mann_kendall(ys: &[f64]) -> MannKendall {
    mann_kendall_tol(ys, 0.0)
}

/// Mann–Kendall where two values closer than `tol` count as a tie, so a
/// creep of a few KiB does not make a flat series a trend.
pub fn mann_kendall_tol(ys: &[f64], tol: f64) -> MannKendall {
    let n = ys.len();
    let mut s: i64 = 0;
    for i in 0..n {
        for j in i + 1..n {
            let d = ys[j] - ys[i];
            s += if d > tol {
                1
            } else if d < -tol {
                -1
            } else {
                0
            };
        }
    }
    let pairs = (n * n.saturating_sub(1) / 2) as i64;
    let tau = if pairs > 0 {
        s as f64 / pairs as f64
    } else {
        0.0
    };
    MannKendall {
        n,
        s,
        tau,
        p_increasing: p_at_least(n, s),
    }
}

/// P(S >= s) for n points in random order.
fn p_at_least(n: usize, s: i64) -> f64 {
    if n < 2 {
        return 1.0;
    }
    let pairs = (n * (n - 1) / 2) as i64;
    if n <= 40 {
        // S = pairs - 2 * inversions; P(S >= s) = P(inversions <= (pairs - s) / 2)
        let max_inv = ((pairs - s) as f64 / 2.0).floor();
        if max_inv < 0.0 {
            return 0.0;
        }
        let dist = inversion_distribution(n);
        let k = (max_inv as usize).min(dist.len() - 1);
        return dist[..=k].iter().sum::<f64>().min(1.0);
    }
    let nf = n as f64;
    let var = nf * (nf - 1.0) * (2.0 * nf + 5.0) / 18.0;
    let z = (s as f64 - 1.0) / var.sqrt();
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Probability of each number of inversions of a random permutation of n
/// (Mahonian numbers over n!), computed in f64.
fn inversion_distribution(n: usize) -> Vec<f64> {
    let mut d = vec![1.0f64];
    for m in 2..=n {
        // adding the m-th element adds 0..m-1 inversions, each equally likely
        let mut next = vec![0.0; d.len() + m - 1];
        for (k, p) in d.iter().enumerate() {
            for j in 0..m {
                next[k + j] += p / m as f64;
            }
        }
        d = next;
    }
    d
}

/// Complementary error function (Numerical Recipes' erfcc, |error| < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The minimum of each of `bins` equal time bins of `pts` (x ascending), at
/// the time it was seen; bins without a point are left out.
pub fn floor_points(pts: &[(f64, f64)], bins: usize) -> Vec<(f64, f64)> {
    let (Some(first), Some(last)) = (pts.first(), pts.last()) else {
        return Vec::new();
    };
    let span = last.0 - first.0;
    if bins == 0 || span <= 0.0 {
        return pts.to_vec();
    }
    let mut out: Vec<Option<(f64, f64)>> = vec![None; bins];
    for p in pts {
        let b = (((p.0 - first.0) / span * bins as f64) as usize).min(bins - 1);
        match out[b] {
            Some(q) if q.1 <= p.1 => {}
            _ => out[b] = Some(*p),
        }
    }
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ols_recovers_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        let l = ols(&pts).expect("line");
        assert!((l.slope - 2.0).abs() < 1e-12 && (l.intercept - 3.0).abs() < 1e-12);
        assert!((l.r2 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn theil_sen_ignores_an_outlier() {
        let mut pts: Vec<(f64, f64)> = (0..9).map(|i| (i as f64, i as f64)).collect();
        pts[4].1 = 1000.0;
        let l = theil_sen(&pts).expect("line");
        assert!((l.slope - 1.0).abs() < 1e-12, "{l:?}");
    }

    #[test]
    fn mann_kendall_exact_p_values() {
        // a perfectly increasing series of 6: 1/720
        let mk = mann_kendall(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(mk.s, 15);
        assert!((mk.p_increasing - 1.0 / 720.0).abs() < 1e-12);
        // one swap: permutations with at most one inversion: 1 + 5
        let mk = mann_kendall(&[1.0, 3.0, 2.0, 4.0, 5.0, 6.0]);
        assert_eq!(mk.s, 13);
        assert!((mk.p_increasing - 6.0 / 720.0).abs() < 1e-12);
        // flat: no evidence
        let mk = mann_kendall(&[5.0; 8]);
        assert_eq!(mk.s, 0);
        assert!(mk.p_increasing > 0.4);
        // decreasing: none either
        assert!(mann_kendall(&[6.0, 5.0, 4.0, 3.0]).p_increasing > 0.9);
        // the normal approximation agrees near the exact boundary
        let ys: Vec<f64> = (0..50).map(|i| (i % 7) as f64 + i as f64 * 0.2).collect();
        let mk = mann_kendall(&ys);
        assert!(mk.p_increasing < 1e-6, "{mk:?}");
    }

    #[test]
    fn floors_are_bin_minima() {
        // a rising floor with a spike in every third sample
        let pts: Vec<(f64, f64)> = (0..30)
            .map(|i| {
                let base = i as f64;
                (i as f64, if i % 3 == 1 { base + 100.0 } else { base })
            })
            .collect();
        let f = floor_points(&pts, 6);
        assert_eq!(f.len(), 6);
        assert!(f.iter().all(|p| p.1 < 30.0), "{f:?}");
        let mk = mann_kendall(&f.iter().map(|p| p.1).collect::<Vec<_>>());
        assert!(mk.p_increasing < 0.01);
    }
}
