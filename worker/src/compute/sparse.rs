//! A single-cell-like sparse pipeline on CSR blocks: generate a cells x
//! genes count matrix, filter cells (`min_genes`) and genes (`min_cells`),
//! normalise each cell to 10 000 counts and `log1p`, pick the `hvg` most
//! variable genes, and build their gram matrix `X_hvg^T X_hvg`.
//!
//! Cells are generated one by one from `(seed, cell)`, so the direct check
//! ([`direct`]) can redo the whole pipeline row by row without blocks or the
//! SpillBuffer: `sum(G) = sum_rows (sum_h x_h)^2`, `trace(G) = sum_rows
//! sum_h x_h^2`.

use anyhow::{Context, bail};

use crate::rng::{Rng, mix};
use crate::spill::{Part, Value};

/// Sizes of the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct SparseParams {
    /// Rows (cells).
    pub cells: usize,
    /// Columns (genes).
    pub genes: usize,
    /// Mean fraction of genes a cell expresses.
    pub density: f64,
    /// Row blocks (tasks per stage).
    pub blocks: usize,
    /// Highly variable genes kept for the gram matrix.
    pub hvg: usize,
    /// Cells expressing fewer genes are dropped.
    pub min_genes: usize,
    /// Genes expressed in fewer kept cells are dropped.
    pub min_cells: usize,
    /// Seed.
    pub seed: u64,
}

/// Picks genes with a skewed (Zipf-like) popularity, as real genes are.
#[derive(Debug, Clone)]
pub struct GeneSampler {
    cdf: Vec<f64>,
}

impl GeneSampler {
    /// Weights `1 / (g + 10)^0.8`, normalised.
    pub fn new(genes: usize) -> GeneSampler {
        let mut cdf = Vec::with_capacity(genes);
        let mut acc = 0.0;
        for g in 0..genes {
            acc += 1.0 / ((g + 10) as f64).powf(0.8);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        GeneSampler { cdf }
    }

    fn sample(&self, u: f64) -> u32 {
        let i = self.cdf.partition_point(|&c| c < u);
        i.min(self.cdf.len().saturating_sub(1)) as u32
    }
}

/// One cell's raw counts, sorted by gene.
pub fn gen_cell(p: &SparseParams, s: &GeneSampler, cell: usize) -> Vec<(u32, f64)> {
    let mut rng = Rng::new(p.seed ^ mix(cell as u64 + 1));
    let mean = p.density * p.genes as f64;
    let draws = (mean * (0.5 + rng.next_f64())) as usize;
    let mut v: Vec<(u32, f64)> = Vec::with_capacity(draws);
    for _ in 0..draws {
        let g = s.sample(rng.next_f64());
        let mut count = 1.0;
        while rng.next_f64() < 0.3 {
            count += 1.0;
        }
        v.push((g, count));
    }
    v.sort_unstable_by_key(|e| e.0);
    let mut out: Vec<(u32, f64)> = Vec::with_capacity(v.len());
    for (g, c) in v {
        match out.last_mut() {
            Some(last) if last.0 == g => last.1 += c,
            _ => out.push((g, c)),
        }
    }
    out
}

/// The cells of block `b`.
pub fn block_rows(p: &SparseParams, b: usize) -> std::ops::Range<usize> {
    let lo = b * p.cells / p.blocks;
    let hi = (b + 1) * p.cells / p.blocks;
    lo..hi
}

/// A CSR matrix (rows, f64 values, u32 column indices).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Csr {
    /// Columns.
    pub ncols: usize,
    /// Row starts, `rows + 1` entries.
    pub indptr: Vec<u64>,
    /// Column of each value.
    pub indices: Vec<u32>,
    /// Values.
    pub data: Vec<f64>,
}

impl Csr {
    /// Rows.
    pub fn nrows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    /// Builds from rows of (column, value).
    pub fn from_rows(ncols: usize, rows: impl IntoIterator<Item = Vec<(u32, f64)>>) -> Csr {
        let mut m = Csr {
            ncols,
            indptr: vec![0],
            ..Csr::default()
        };
        for row in rows {
            for (c, v) in row {
                m.indices.push(c);
                m.data.push(v);
            }
            m.indptr.push(m.indices.len() as u64);
        }
        m
    }

    /// Row `r` as (columns, values).
    pub fn row(&self, r: usize) -> (&[u32], &[f64]) {
        let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
        (&self.indices[a..b], &self.data[a..b])
    }

    /// As a managed value (meta: kind tag, columns).
    pub fn into_value(self) -> Value {
        Value {
            meta: [CSR_TAG, self.ncols as u64, 0, 0],
            parts: vec![
                Part::U64(self.indptr),
                Part::U32(self.indices),
                Part::F64(self.data),
            ],
        }
    }

    /// Copies a managed value back into a matrix.
    pub fn from_value(v: &Value) -> anyhow::Result<Csr> {
        if v.meta[0] != CSR_TAG {
            bail!("value is not a CSR matrix");
        }
        match v.parts.as_slice() {
            [Part::U64(p), Part::U32(i), Part::F64(d)] if i.len() == d.len() => Ok(Csr {
                ncols: v.meta[1] as usize,
                indptr: p.clone(),
                indices: i.clone(),
                data: d.clone(),
            }),
            _ => bail!("CSR value has the wrong parts"),
        }
    }
}

const CSR_TAG: u64 = 0x4353_5200;

/// Raw counts of block `b`.
pub fn gen_block(p: &SparseParams, s: &GeneSampler, b: usize) -> Csr {
    Csr::from_rows(p.genes, block_rows(p, b).map(|c| gen_cell(p, s, c)))
}

/// Per-gene counts of kept cells in a raw block, and how many cells it keeps.
pub fn qc_partial(p: &SparseParams, m: &Csr) -> (Vec<u32>, u64) {
    let mut counts = vec![0u32; m.ncols];
    let mut kept = 0;
    for r in 0..m.nrows() {
        let (cols, _) = m.row(r);
        if cols.len() >= p.min_genes {
            kept += 1;
            for &c in cols {
                counts[c as usize] += 1;
            }
        }
    }
    (counts, kept)
}

/// Old gene index to new (`u32::MAX`: dropped) and the number kept.
pub fn gene_map(p: &SparseParams, counts: &[u32]) -> (Vec<u32>, usize) {
    let mut map = vec![u32::MAX; counts.len()];
    let mut n = 0;
    for (g, &c) in counts.iter().enumerate() {
        if c as usize >= p.min_cells {
            map[g] = n as u32;
            n += 1;
        }
    }
    (map, n)
}

/// One cell filtered, normalised to 10 000 and log1p'd (`None`: cell dropped).
pub fn normalize_row(
    p: &SparseParams,
    cols: &[u32],
    vals: &[f64],
    map: &[u32],
) -> Option<Vec<(u32, f64)>> {
    if cols.len() < p.min_genes {
        return None;
    }
    let mut row: Vec<(u32, f64)> = cols
        .iter()
        .zip(vals)
        .filter(|(c, _)| map[**c as usize] != u32::MAX)
        .map(|(c, v)| (map[*c as usize], *v))
        .collect();
    let total: f64 = row.iter().map(|e| e.1).sum();
    if total > 0.0 {
        for e in &mut row {
            e.1 = (e.1 / total * 1e4).ln_1p();
        }
    }
    Some(row)
}

/// A raw block filtered and normalised.
pub fn normalize(p: &SparseParams, m: &Csr, map: &[u32], kept_genes: usize) -> Csr {
    Csr::from_rows(
        kept_genes,
        (0..m.nrows()).filter_map(|r| {
            let (c, v) = m.row(r);
            normalize_row(p, c, v, map)
        }),
    )
}

/// Per-gene sums and sums of squares of a normalised block.
pub fn moments_partial(m: &Csr) -> (Vec<f64>, Vec<f64>, u64) {
    let mut s = vec![0.0; m.ncols];
    let mut q = vec![0.0; m.ncols];
    for (c, v) in m.indices.iter().zip(&m.data) {
        s[*c as usize] += v;
        q[*c as usize] += v * v;
    }
    (s, q, m.nrows() as u64)
}

/// The `k` genes of largest variance (ties: lower index), and the map gene
/// to position (`u32::MAX`: not a HVG).
pub fn choose_hvg(sum: &[f64], sumsq: &[f64], rows: u64, k: usize) -> (Vec<u32>, Vec<u32>) {
    let n = rows.max(1) as f64;
    let var: Vec<f64> = sum
        .iter()
        .zip(sumsq)
        .map(|(s, q)| q / n - (s / n) * (s / n))
        .collect();
    let mut order: Vec<u32> = (0..sum.len() as u32).collect();
    order.sort_by(|a, b| var[*b as usize].total_cmp(&var[*a as usize]).then(a.cmp(b)));
    order.truncate(k);
    order.sort_unstable();
    let mut map = vec![u32::MAX; sum.len()];
    for (i, g) in order.iter().enumerate() {
        map[*g as usize] = i as u32;
    }
    (order, map)
}

/// `X_hvg^T X_hvg` of a normalised block (`k x k`, row-major).
pub fn gram_partial(m: &Csr, hvg_map: &[u32], k: usize) -> Vec<f64> {
    let mut g = vec![0.0; k * k];
    let mut row: Vec<(usize, f64)> = Vec::new();
    for r in 0..m.nrows() {
        let (cols, vals) = m.row(r);
        row.clear();
        row.extend(
            cols.iter()
                .zip(vals)
                .filter(|(c, _)| hvg_map[**c as usize] != u32::MAX)
                .map(|(c, v)| (hvg_map[*c as usize] as usize, *v)),
        );
        for &(a, xa) in &row {
            let line = &mut g[a * k..(a + 1) * k];
            for &(b, xb) in &row {
                line[b] += xa * xb;
            }
        }
    }
    g
}

/// What the pipeline ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseResult {
    /// Cells kept by the filter.
    pub kept_cells: u64,
    /// Genes kept by the filter.
    pub kept_genes: usize,
    /// The HVG (indices among kept genes).
    pub hvg: Vec<u32>,
    /// `sum(G)`.
    pub gram_sum: f64,
    /// `trace(G)`.
    pub gram_trace: f64,
}

/// The whole pipeline, row by row, straight from the generator.
pub fn direct(p: &SparseParams) -> anyhow::Result<SparseResult> {
    let s = GeneSampler::new(p.genes);
    let mut counts = vec![0u32; p.genes];
    let mut kept_cells = 0u64;
    for cell in 0..p.cells {
        let row = gen_cell(p, &s, cell);
        if row.len() >= p.min_genes {
            kept_cells += 1;
            for (g, _) in &row {
                counts[*g as usize] += 1;
            }
        }
    }
    let (map, kept_genes) = gene_map(p, &counts);
    let mut sum = vec![0.0; kept_genes];
    let mut sumsq = vec![0.0; kept_genes];
    let norm_row = |cell: usize| {
        let row = gen_cell(p, &s, cell);
        let (c, v): (Vec<u32>, Vec<f64>) = row.into_iter().unzip();
        normalize_row(p, &c, &v, &map)
    };
    for cell in 0..p.cells {
        if let Some(row) = norm_row(cell) {
            for (g, x) in row {
                sum[g as usize] += x;
                sumsq[g as usize] += x * x;
            }
        }
    }
    let (hvg, hvg_map) = choose_hvg(&sum, &sumsq, kept_cells, p.hvg);
    let (mut gram_sum, mut gram_trace) = (0.0, 0.0);
    for cell in 0..p.cells {
        if let Some(row) = norm_row(cell) {
            let (mut a, mut q) = (0.0, 0.0);
            for (g, x) in row {
                if hvg_map[g as usize] != u32::MAX {
                    a += x;
                    q += x * x;
                }
            }
            gram_sum += a * a;
            gram_trace += q;
        }
    }
    if kept_cells == 0 {
        return Err(anyhow::anyhow!("the filter kept no cell")).context("sparse direct check");
    }
    Ok(SparseResult {
        kept_cells,
        kept_genes,
        hvg,
        gram_sum,
        gram_trace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SparseParams {
        SparseParams {
            cells: 400,
            genes: 300,
            density: 0.05,
            blocks: 3,
            hvg: 20,
            min_genes: 9,
            min_cells: 3,
            seed: 5,
        }
    }

    #[test]
    fn blocked_pipeline_equals_direct() {
        let p = params();
        let s = GeneSampler::new(p.genes);
        let raw: Vec<Csr> = (0..p.blocks).map(|b| gen_block(&p, &s, b)).collect();
        let mut counts = vec![0u32; p.genes];
        let mut kept = 0;
        for m in &raw {
            let (c, k) = qc_partial(&p, m);
            kept += k;
            for (a, b) in counts.iter_mut().zip(c) {
                *a += b;
            }
        }
        let (map, ng) = gene_map(&p, &counts);
        let norm: Vec<Csr> = raw.iter().map(|m| normalize(&p, m, &map, ng)).collect();
        // Round trip through a Value, as spilling does.
        let norm: Vec<Csr> = norm
            .into_iter()
            .map(|m| Csr::from_value(&m.into_value()).expect("csr"))
            .collect();
        let (mut sum, mut sq) = (vec![0.0; ng], vec![0.0; ng]);
        for m in &norm {
            let (s1, q1, _) = moments_partial(m);
            for i in 0..ng {
                sum[i] += s1[i];
                sq[i] += q1[i];
            }
        }
        let (hvg, hmap) = choose_hvg(&sum, &sq, kept, p.hvg);
        let mut g = vec![0.0; p.hvg * p.hvg];
        for m in &norm {
            for (a, b) in g.iter_mut().zip(gram_partial(m, &hmap, p.hvg)) {
                *a += b;
            }
        }
        let d = direct(&p).expect("direct");
        assert_eq!(d.kept_cells, kept);
        assert_eq!(d.kept_genes, ng);
        assert!(ng < p.genes, "gene filter removed nothing");
        assert!((kept as usize) < p.cells, "cell filter removed nothing");
        assert_eq!(d.hvg, hvg);
        let gsum: f64 = g.iter().sum();
        let gtr: f64 = (0..p.hvg).map(|i| g[i * p.hvg + i]).sum();
        assert!((gsum - d.gram_sum).abs() < 1e-9 * d.gram_sum);
        assert!((gtr - d.gram_trace).abs() < 1e-9 * d.gram_trace);
    }
}
