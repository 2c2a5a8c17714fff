//! `op = "matmul"`: blocked `(A @ A.T).sum()` with every block a managed
//! value, checked against the direct computation (`compute::matmul`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::bail;
use serde::Deserialize;

use super::{Runner, close};
use crate::compute::matmul as direct;
use crate::pool::Task;
use crate::rng::Rng;
use crate::spill::{Part, Value};

/// Blocked `(A @ A.T).sum()`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Matmul {
    /// Key prefix.
    pub key: Option<String>,
    /// Matrix size.
    pub n: usize,
    /// Block size (divides `n`).
    pub block: usize,
    /// Seed.
    pub seed: Option<u64>,
    /// Entries of C compared one by one.
    pub check_entries: Option<usize>,
}

/// One run of the op: its key prefix, sizes and seed.
#[derive(Clone)]
struct Blocks {
    key: String,
    n: usize,
    b: usize,
    seed: u64,
}

impl Blocks {
    fn nb(&self) -> usize {
        self.n / self.b
    }

    fn a_key(&self, i: usize, j: usize) -> String {
        format!("{}/A/{i:04}/{j:04}", self.key)
    }

    fn c_key(&self, i: usize, k: usize) -> String {
        format!("{}/C/{i:04}/{k:04}", self.key)
    }

    /// A block's value: its float part, with (block size, row, column) in
    /// the meta.
    fn value(&self, i: usize, j: usize, blk: Vec<f64>) -> Value {
        Value {
            meta: [0, self.b as u64, i as u64, j as u64],
            parts: vec![Part::F64(blk)],
        }
    }

    /// Every (row, column) of blocks.
    fn grid(&self) -> impl Iterator<Item = (usize, usize)> {
        let nb = self.nb();
        (0..nb).flat_map(move |i| (0..nb).map(move |j| (i, j)))
    }
}

impl Matmul {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        let (n, block) = (self.n, self.block);
        if block == 0 || n == 0 || n % block != 0 {
            bail!("matmul: block ({block}) must divide n ({n}) and both be > 0")
        }
        Ok(())
    }

    pub(super) fn run(&self, r: &Runner) -> anyhow::Result<()> {
        let m = Blocks {
            key: self.key.as_deref().unwrap_or("mm").to_string(),
            n: self.n,
            b: self.block,
            seed: self.seed.unwrap_or(1),
        };
        let start = Instant::now();
        put_a(r, &m)?;
        multiply(r, &m)?;
        let blocked = sum(r, &m)?;
        let compute_ms = start.elapsed().as_millis();
        let direct = direct::direct_sum(m.seed, m.n);
        let (key, n, b) = (&m.key, m.n, m.b);
        r.state.check(
            format!("matmul {key} sum(A @ A.T)"),
            close(blocked, direct),
            format!(
                "blocked {blocked:.9e}, direct {direct:.9e}, n {n}, block {b}, {compute_ms} ms"
            ),
        );
        check_entries(r, &m, self.check_entries.unwrap_or(16))
    }
}

/// Puts every block of A.
fn put_a(r: &Runner, m: &Blocks) -> anyhow::Result<()> {
    let list: Vec<Task> = m
        .grid()
        .map(|(i, j)| {
            let (st, m) = (r.state.clone(), m.clone());
            Box::new(move || {
                let blk = direct::a_block(m.seed, m.n, m.b, i, j);
                st.buffer.put(&m.a_key(i, j), m.value(i, j, blk));
                Ok(())
            }) as Task
        })
        .collect();
    r.stage(list)
}

/// C = A @ A.T, one output block per task.
fn multiply(r: &Runner, m: &Blocks) -> anyhow::Result<()> {
    let list: Vec<Task> = m
        .grid()
        .map(|(i, k)| {
            let (st, m) = (r.state.clone(), m.clone());
            let keys: Vec<(String, String)> = (0..m.nb())
                .map(|j| (m.a_key(i, j), m.a_key(k, j)))
                .collect();
            Box::new(move || {
                let mut acc = vec![0.0f64; m.b * m.b];
                for (xa, ya) in &keys {
                    let x = st.buffer.get(xa)?;
                    let y = st.buffer.get(ya)?;
                    let (Some(Part::F64(x)), Some(Part::F64(y))) =
                        (x.parts.first(), y.parts.first())
                    else {
                        bail!("block {xa} or {ya} is not a float block");
                    };
                    direct::add_abt(x, y, &mut acc, m.b);
                }
                st.buffer.put(&m.c_key(i, k), m.value(i, k, acc));
                Ok(())
            }) as Task
        })
        .collect();
    r.stage(list)
}

/// The sum of every entry of C, one block row per task.
fn sum(r: &Runner, m: &Blocks) -> anyhow::Result<f64> {
    let nb = m.nb();
    let total = Arc::new(Mutex::new(vec![0.0f64; nb]));
    let list: Vec<Task> = (0..nb)
        .map(|i| {
            let (st, total) = (r.state.clone(), total.clone());
            let keys: Vec<String> = (0..nb).map(|k| m.c_key(i, k)).collect();
            Box::new(move || {
                let mut s = 0.0;
                for k in &keys {
                    let v = st.buffer.get(k)?;
                    if let Some(Part::F64(c)) = v.parts.first() {
                        s += c.iter().sum::<f64>();
                    }
                }
                total.lock().unwrap_or_else(|e| e.into_inner())[i] = s;
                Ok(())
            }) as Task
        })
        .collect();
    r.stage(list)?;
    let blocked: f64 = total.lock().unwrap_or_else(|e| e.into_inner()).iter().sum();
    Ok(blocked)
}

/// A few entries of C, chosen at random, against their direct values.
fn check_entries(r: &Runner, m: &Blocks, entries: usize) -> anyhow::Result<()> {
    let (n, b) = (m.n, m.b);
    let mut rng = Rng::new(m.seed ^ 0xC0FFEE);
    let mut worst = 0.0f64;
    for _ in 0..entries {
        let row = rng.range(0, n as u64 - 1) as usize;
        let col = rng.range(0, n as u64 - 1) as usize;
        let v = r.state.buffer.get(&m.c_key(row / b, col / b))?;
        let Some(Part::F64(blk)) = v.parts.first() else {
            bail!("C block is not a float block");
        };
        let got = blk[(row % b) * b + (col % b)];
        let want = direct::direct_entry(m.seed, n, row, col);
        worst = worst.max((got - want).abs() / want.abs().max(1.0));
    }
    r.state.check(
        format!("matmul {} entries", m.key),
        worst <= 1e-9,
        format!("{entries} entries of C, worst relative error {worst:.2e}"),
    );
    Ok(())
}
