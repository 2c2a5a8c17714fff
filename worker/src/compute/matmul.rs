//! Blocked dense `(A @ A.T).sum()`, the example of Dask's Active Memory
//! Manager post, with every block a managed value.
//!
//! `A` is `n x n`, `A[r][c] = unit_signed(mix(seed ^ (r * n + c)))`, stored
//! as `(n/b)^2` blocks. `C = A @ A.T` is computed one output block per task
//! (`C_ik = sum_j A_ij A_kj^T`), stored, then summed. The direct check
//! regenerates `A` from the seed, without the SpillBuffer:
//! `sum(A A^T) = sum_c (sum_r A[r][c])^2`, and a few entries
//! `C[r][c] = A[r] . A[c]` are compared one by one.

use crate::rng::{mix, unit_signed};

/// `A[r][c]` of the matrix with this seed and size.
#[inline]
pub fn a_entry(seed: u64, n: usize, r: usize, c: usize) -> f64 {
    unit_signed(mix(seed ^ (r as u64 * n as u64 + c as u64)))
}

/// Block `(i, j)` of `A` (row-major, `b x b`).
pub fn a_block(seed: u64, n: usize, b: usize, i: usize, j: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(b * b);
    for r in 0..b {
        for c in 0..b {
            out.push(a_entry(seed, n, i * b + r, j * b + c));
        }
    }
    out
}

/// `acc += x @ y^T` for `b x b` row-major blocks.
pub fn add_abt(x: &[f64], y: &[f64], acc: &mut [f64], b: usize) {
    assert!(x.len() == b * b && y.len() == b * b && acc.len() == b * b);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { add_abt_fma(x, y, acc, b) };
            return;
        }
    }
    add_abt_impl::<false>(x, y, acc, b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_abt_fma(x: &[f64], y: &[f64], acc: &mut [f64], b: usize) {
    add_abt_impl::<true>(x, y, acc, b);
}

const MR: usize = 4;
const NR: usize = 8;

/// Packed GEMM: panels of 4 rows of `x` and 8 rows of `y`, each laid out
/// `t`-major, so the 4 x 8 register block streams both contiguously.
#[inline(always)]
fn add_abt_impl<const FMA: bool>(x: &[f64], y: &[f64], acc: &mut [f64], b: usize) {
    let rows_main = b - b % MR;
    let cols_main = b - b % NR;
    // y panels: yp[p][t * NR + l] = y[(p * NR + l) * b + t]
    let mut yp = vec![0.0f64; cols_main * b];
    for (p, panel) in yp.chunks_exact_mut(NR * b).enumerate() {
        for (l, row) in y[p * NR * b..(p + 1) * NR * b].chunks_exact(b).enumerate() {
            for (t, v) in row.iter().enumerate() {
                panel[t * NR + l] = *v;
            }
        }
    }
    let mut xp = vec![0.0f64; MR * b];
    for r in (0..rows_main).step_by(MR) {
        for (q, row) in x[r * b..(r + MR) * b].chunks_exact(b).enumerate() {
            for (t, v) in row.iter().enumerate() {
                xp[t * MR + q] = *v;
            }
        }
        for (p, panel) in yp.chunks_exact(NR * b).enumerate() {
            let mut s = [[0.0f64; NR]; MR];
            for (xt, yt) in xp.chunks_exact(MR).zip(panel.chunks_exact(NR)) {
                for q in 0..MR {
                    let xv = xt[q];
                    for l in 0..NR {
                        s[q][l] = if FMA {
                            xv.mul_add(yt[l], s[q][l])
                        } else {
                            s[q][l] + xv * yt[l]
                        };
                    }
                }
            }
            let c = p * NR;
            for (q, sq) in s.iter().enumerate() {
                for (a, v) in acc[(r + q) * b + c..(r + q) * b + c + NR]
                    .iter_mut()
                    .zip(sq)
                {
                    *a += v;
                }
            }
        }
        // Columns left over.
        for q in 0..MR {
            for c in cols_main..b {
                acc[(r + q) * b + c] +=
                    dot(&x[(r + q) * b..(r + q + 1) * b], &y[c * b..(c + 1) * b]);
            }
        }
    }
    // Rows left over.
    for r in rows_main..b {
        for c in 0..b {
            acc[r * b + c] += dot(&x[r * b..(r + 1) * b], &y[c * b..(c + 1) * b]);
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The direct `sum(A @ A.T)` from the column sums of `A`.
pub fn direct_sum(seed: u64, n: usize) -> f64 {
    let mut colsum = vec![0.0f64; n];
    for r in 0..n {
        for (c, s) in colsum.iter_mut().enumerate() {
            *s += a_entry(seed, n, r, c);
        }
    }
    colsum.iter().map(|s| s * s).sum()
}

/// The direct `C[r][c] = A[r] . A[c]`.
pub fn direct_entry(seed: u64, n: usize, r: usize, c: usize) -> f64 {
    (0..n)
        .map(|t| a_entry(seed, n, r, t) * a_entry(seed, n, c, t))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f64], y: &[f64], b: usize) -> Vec<f64> {
        let mut out = vec![0.0; b * b];
        for r in 0..b {
            for c in 0..b {
                out[r * b + c] = (0..b).map(|t| x[r * b + t] * y[c * b + t]).sum();
            }
        }
        out
    }

    #[test]
    fn kernel_matches_naive_on_odd_sizes() {
        for b in [1usize, 5, 8, 13, 33] {
            let x = a_block(1, 64, b, 0, 0);
            let y = a_block(2, 64, b, 1, 0);
            let mut acc = vec![0.0; b * b];
            add_abt(&x, &y, &mut acc, b);
            let want = naive(&x, &y, b);
            for (a, w) in acc.iter().zip(&want) {
                assert!((a - w).abs() < 1e-12 * (1.0 + w.abs()), "b={b}: {a} vs {w}");
            }
            let mut acc2 = vec![0.0; b * b];
            add_abt_impl::<false>(&x, &y, &mut acc2, b);
            for (a, w) in acc2.iter().zip(&want) {
                assert!((a - w).abs() < 1e-12 * (1.0 + w.abs()));
            }
        }
    }

    #[test]
    fn direct_sum_matches_a_full_product() {
        let (n, seed) = (24, 7);
        let a = a_block(seed, n, n, 0, 0);
        let c = naive(&a, &a, n);
        let total: f64 = c.iter().sum();
        assert!((total - direct_sum(seed, n)).abs() < 1e-9 * total.abs().max(1.0));
        assert!((c[3 * n + 17] - direct_entry(seed, n, 3, 17)).abs() < 1e-12);
    }
}
