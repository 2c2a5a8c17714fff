//! `op = "sparse"`: a single-cell-like CSR pipeline (generate, QC,
//! normalise, highly variable genes, gram matrix) with every block a
//! managed value, checked against the direct computation
//! (`compute::sparse::direct`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::bail;
use serde::Deserialize;

use super::{Runner, State, close};
use crate::compute::sparse::{self, Csr, SparseParams, SparseResult};
use crate::pool::Task;

/// Single-cell-like sparse pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Sparse {
    /// Key prefix.
    pub key: Option<String>,
    /// Cells.
    pub cells: usize,
    /// Genes.
    pub genes: usize,
    /// Mean fraction of genes per cell.
    pub density: f64,
    /// Row blocks.
    pub blocks: usize,
    /// Highly variable genes.
    pub hvg: usize,
    /// Minimum genes per kept cell.
    pub min_genes: usize,
    /// Minimum cells per kept gene.
    pub min_cells: usize,
    /// Seed.
    pub seed: Option<u64>,
}

impl Sparse {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.cells == 0
            || self.genes == 0
            || self.blocks == 0
            || self.hvg == 0
            || !(self.density > 0.0 && self.density <= 1.0)
        {
            bail!("sparse: cells, genes, blocks, hvg must be > 0 and density in (0, 1]")
        }
        Ok(())
    }

    fn params(&self) -> SparseParams {
        SparseParams {
            cells: self.cells,
            genes: self.genes,
            density: self.density,
            blocks: self.blocks,
            hvg: self.hvg,
            min_genes: self.min_genes,
            min_cells: self.min_cells,
            seed: self.seed.unwrap_or(1),
        }
    }

    pub(super) fn run(&self, r: &Runner) -> anyhow::Result<()> {
        let key = self.key.as_deref().unwrap_or("sc");
        let p = self.params();
        let start = Instant::now();
        let got = pipeline(r, key, p)?;
        let ms = start.elapsed().as_millis();
        // the direct pipeline with as many HVG as the blocked one could keep
        let d = sparse::direct(&SparseParams {
            hvg: got.hvg.len(),
            ..p
        })?;
        let ok = d.kept_cells == got.kept_cells
            && d.kept_genes == got.kept_genes
            && d.hvg == got.hvg
            && close(got.gram_sum, d.gram_sum)
            && close(got.gram_trace, d.gram_trace);
        r.state.check(
            format!("sparse {key} gram"),
            ok,
            format!(
                "cells kept {}/{} (direct {}), genes kept {}/{} (direct {}), \
                 hvg equal {}, sum(G) {:.9e} vs {:.9e}, trace(G) {:.9e} vs {:.9e}, {ms} ms",
                got.kept_cells,
                p.cells,
                d.kept_cells,
                got.kept_genes,
                p.genes,
                d.kept_genes,
                d.hvg == got.hvg,
                got.gram_sum,
                d.gram_sum,
                got.gram_trace,
                d.gram_trace
            ),
        );
        Ok(())
    }
}

/// Runs `f(state, b)` for every block `b`, one task each.
fn per_block<F>(r: &Runner, blocks: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(&State, usize) -> anyhow::Result<()> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let list: Vec<Task> = (0..blocks)
        .map(|b| {
            let (st, f) = (r.state.clone(), f.clone());
            Box::new(move || f(&st, b)) as Task
        })
        .collect();
    r.stage(list)
}

/// Reads block `k` as a CSR matrix.
fn csr(st: &State, k: &str) -> anyhow::Result<Csr> {
    Csr::from_value(&*st.buffer.get(k)?)
}

/// The blocked pipeline, stage by stage (at most `p.hvg` HVG: no more than
/// the genes kept).
fn pipeline(r: &Runner, key: &str, p: SparseParams) -> anyhow::Result<SparseResult> {
    let raw_key = {
        let key = key.to_string();
        move |b: usize| format!("{key}/raw/{b:05}")
    };
    let norm_key = {
        let key = key.to_string();
        move |b: usize| format!("{key}/norm/{b:05}")
    };
    // generate
    let sampler = Arc::new(sparse::GeneSampler::new(p.genes));
    let k = raw_key.clone();
    per_block(r, p.blocks, move |st, b| {
        st.buffer
            .put(&k(b), sparse::gen_block(&p, &sampler, b).into_value());
        Ok(())
    })?;
    // QC: gene counts over kept cells
    let counts = Arc::new(Mutex::new((vec![0u32; p.genes], 0u64)));
    let (c, k) = (counts.clone(), raw_key.clone());
    per_block(r, p.blocks, move |st, b| {
        let (part, kept) = sparse::qc_partial(&p, &csr(st, &k(b))?);
        let mut g = c.lock().unwrap_or_else(|e| e.into_inner());
        for (a, x) in g.0.iter_mut().zip(part) {
            *a += x;
        }
        g.1 += kept;
        Ok(())
    })?;
    let (counts, kept_cells) = counts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (map, kept_genes) = sparse::gene_map(&p, &counts);
    // normalise
    let (map, nk) = (Arc::new(map), norm_key.clone());
    per_block(r, p.blocks, move |st, b| {
        let m = csr(st, &raw_key(b))?;
        let n = sparse::normalize(&p, &m, &map, kept_genes);
        drop(m);
        st.buffer.put(&nk(b), n.into_value());
        Ok(())
    })?;
    let k = p.hvg.min(kept_genes);
    let (hvg, hvg_map) = choose_hvg(r, &p, k, kept_genes, kept_cells, norm_key.clone())?;
    let (gram_sum, gram_trace) = gram(r, &p, k, hvg_map, norm_key)?;
    Ok(SparseResult {
        kept_cells,
        kept_genes,
        hvg,
        gram_sum,
        gram_trace,
    })
}

/// Moments of the normalised blocks, then the `k` most variable genes: the
/// HVG and the map from kept gene to HVG column.
fn choose_hvg(
    r: &Runner,
    p: &SparseParams,
    k: usize,
    kept_genes: usize,
    kept_cells: u64,
    norm_key: impl Fn(usize) -> String + Send + Sync + 'static,
) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let moments = Arc::new(Mutex::new((vec![0.0; kept_genes], vec![0.0; kept_genes])));
    let mo = moments.clone();
    per_block(r, p.blocks, move |st, b| {
        let (s, q, _) = sparse::moments_partial(&csr(st, &norm_key(b))?);
        let mut g = mo.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..s.len() {
            g.0[i] += s[i];
            g.1[i] += q[i];
        }
        Ok(())
    })?;
    let (sum, sumsq) = moments.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(sparse::choose_hvg(&sum, &sumsq, kept_cells, k))
}

/// The gram matrix of the `k` HVG columns: its sum and its trace.
fn gram(
    r: &Runner,
    p: &SparseParams,
    k: usize,
    hvg_map: Vec<u32>,
    norm_key: impl Fn(usize) -> String + Send + Sync + 'static,
) -> anyhow::Result<(f64, f64)> {
    let gram = Arc::new(Mutex::new(vec![0.0f64; k * k]));
    let (gm, hm) = (gram.clone(), Arc::new(hvg_map));
    per_block(r, p.blocks, move |st, b| {
        let m = csr(st, &norm_key(b))?;
        let part = sparse::gram_partial(&m, &hm, k);
        drop(m);
        let mut g = gm.lock().unwrap_or_else(|e| e.into_inner());
        for (a, x) in g.iter_mut().zip(part) {
            *a += x;
        }
        Ok(())
    })?;
    let g = gram.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let sum: f64 = g.iter().sum();
    let trace: f64 = (0..k).map(|i| g[i * k + i]).sum();
    Ok((sum, trace))
}
