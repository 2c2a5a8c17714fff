//! Workloads: what `amm-worker run WORKLOAD` runs, from a built-in name or a
//! TOML file.
//!
//! A workload is a list of phases run in order (`repeat` times); a phase is
//! a list of operations that run *concurrently*, their tasks sharing the
//! `--nthreads` task threads in one FIFO queue. Sizes are integers or text
//! (`"512MiB"`), durations text (`"200ms"`) or seconds.
//!
//! ```toml
//! name = "example"
//! repeat = 1                       # the whole list of phases
//!
//! [[phase]]
//! name = "load"
//! repeat = 1                       # this phase
//! [[phase.op]]
//! op = "allocate"                  # allocate `bytes` in chunks
//! bytes = "256MiB"
//! chunk = "4MiB"                   # or chunk-min / chunk-max: random sizes
//! keep = "managed"                 # managed (SpillBuffer values under key/N) |
//!                                  # unmanaged (held under key) | task (freed when the task ends)
//! key = "data"
//! tasks = 64                       # default: one per 8 MiB or per chunk if larger
//!                                  # (keep = "task": 1)
//! delay = "5ms"                    # chunk i of a task is due i delays after it
//!                                  # started (a late wake-up catches up)
//! hold = "1s"                      # before a task ends
//!
//! [[phase]]
//! [[phase.op]]
//! op = "free"                      # free a fraction of what `key` holds
//! key = "data"
//! fraction = 0.9
//! pattern = "spread"               # spread (evenly) | random | first
//! [[phase.op]]
//! op = "drop"                      # drop all of `key` (managed and unmanaged)
//! key = "data"
//! [[phase.op]]
//! op = "read-back"                 # get every managed value under key, verify its bytes
//! key = "data"
//! [[phase.op]]
//! op = "matmul"                    # blocked (A @ A.T).sum(), blocks managed
//! key = "mm"
//! n = 8192
//! block = 512
//! [[phase.op]]
//! op = "sparse"                    # single-cell-like CSR pipeline, blocks managed
//! key = "sc"
//! cells = 200000
//! genes = 20000
//! density = 0.012
//! blocks = 50
//! hvg = 1000
//! min-genes = 120
//! min-cells = 650
//! [[phase.op]]
//! op = "sleep"
//! duration = "1s"
//! tasks = 1
//! [[phase.op]]
//! op = "purge"                     # purge/trim the allocator now, report what came back
//! [[phase.op]]
//! op = "barrier"                   # the ops after it start when the ops before it
//!                                  # (in this phase) have finished, however long they took
//! [[phase.op]]
//! op = "crash"                     # abort | segfault, while AMM_WORKER_ATTEMPT < until-attempt
//! how = "abort"
//! until-attempt = 1
//! ```
//!
//! Compute operations check their result against a direct computation and
//! add a [`Check`]; `result_ok` is true when every check passed and no task
//! failed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amm_timeline::{End, Event};
use anyhow::{Context, bail};
use serde::Deserialize;

use crate::compute::{matmul, sparse};
use crate::memory::Gate;
use crate::pool::{Pool, Task};
use crate::rng::{Rng, check_pattern, fill_pattern, seed_of};
use crate::spill::{Part, SpillBuffer, Value};
use crate::timeline::Timeline;
use crate::units::{format_bytes, parse_bytes, parse_duration};

/// Built-in workloads: name, TOML text.
pub const BUILTINS: &[(&str, &str)] = &[
    ("matmul", include_str!("../workloads/matmul.toml")),
    ("sparse", include_str!("../workloads/sparse.toml")),
    ("spike", include_str!("../workloads/spike.toml")),
    ("hoard", include_str!("../workloads/hoard.toml")),
    ("fragment", include_str!("../workloads/fragment.toml")),
    ("leak", include_str!("../workloads/leak.toml")),
];

/// A byte size in a workload file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Size(pub u64);

/// A duration in a workload file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dur(pub Duration);

/// Reads a size or a duration straight from the value (not through an
/// untagged enum, which would point a type error at the table's first line
/// instead of the value's, and called NaN negative).
struct Visit<T> {
    expecting: &'static str,
    from_text: fn(&str) -> Result<T, String>,
}

impl<'de, T> serde::de::Visitor<'de> for Visit<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.from_text)(v).map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
        if !v.is_finite() {
            return Err(E::custom(format!("{v} is not {}", self.expecting)));
        }
        self.visit_str(&v.to_string())
    }
}

fn whole_bytes(text: &str) -> Result<Size, String> {
    if let Ok(f) = text.trim().parse::<f64>()
        && f.fract() != 0.0
    {
        return Err(format!(
            "{text} is not a whole number of bytes (give a unit, e.g. \"1.5MiB\")"
        ));
    }
    parse_bytes(text).map(Size)
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Visit {
            expecting: "a size (a whole number of bytes, or text such as \"512MiB\")",
            from_text: whole_bytes,
        })
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Visit {
            expecting: "a duration (seconds, or text such as \"200ms\")",
            from_text: |t| parse_duration(t).map(Dur),
        })
    }
}

/// A whole workload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Its name (the built-in's, or the file's).
    #[serde(default)]
    pub name: Option<String>,
    /// One line on what it shows.
    #[serde(default)]
    pub description: Option<String>,
    /// How many times the phase list runs.
    #[serde(default = "one")]
    pub repeat: u32,
    /// The phases.
    #[serde(rename = "phase")]
    pub phases: Vec<Phase>,
}

fn one() -> u32 {
    1
}

/// Operations that run together.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// For logs and the timeline.
    #[serde(default)]
    pub name: Option<String>,
    /// How many times this phase runs in a row.
    #[serde(default = "one")]
    pub repeat: u32,
    /// The operations.
    #[serde(rename = "op")]
    pub ops: Vec<Op>,
}

/// Where allocated memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// SpillBuffer values (counted as managed).
    Managed,
    /// Held outside the SpillBuffer until freed or dropped.
    Unmanaged,
    /// Freed when the task ends.
    Task,
}

/// Which items `free` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreePattern {
    /// Evenly spread over allocation order (holes everywhere).
    #[default]
    Spread,
    /// Random items.
    Random,
    /// The oldest items.
    First,
}

/// How `crash` ends the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrashHow {
    /// `abort()` (SIGABRT).
    Abort,
    /// A real SIGSEGV.
    Segfault,
}

/// One operation.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    tag = "op",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case",
    deny_unknown_fields
)]
pub enum Op {
    /// Allocate `bytes` in chunks.
    Allocate {
        /// Total bytes.
        bytes: Size,
        /// Fixed chunk size.
        chunk: Option<Size>,
        /// Smallest random chunk.
        chunk_min: Option<Size>,
        /// Largest random chunk.
        chunk_max: Option<Size>,
        /// Where the memory lives.
        keep: Keep,
        /// Name of what is kept (default `data`).
        key: Option<String>,
        /// Number of tasks.
        tasks: Option<u32>,
        /// Pause between chunks: chunk i is due i delays after the task
        /// started, so a late wake-up on a busy machine catches up and the
        /// rate holds.
        delay: Option<Dur>,
        /// Pause before a task ends.
        hold: Option<Dur>,
    },
    /// Free a fraction of what `key` holds.
    Free {
        /// The name.
        key: String,
        /// Fraction of the live items.
        fraction: f64,
        /// Which items.
        #[serde(default)]
        pattern: FreePattern,
    },
    /// Drop all of `key`.
    Drop {
        /// The name.
        key: String,
    },
    /// Read back and verify every managed value under `key`.
    ReadBack {
        /// The name.
        key: String,
    },
    /// Blocked `(A @ A.T).sum()`.
    Matmul {
        /// Key prefix.
        key: Option<String>,
        /// Matrix size.
        n: usize,
        /// Block size (divides `n`).
        block: usize,
        /// Seed.
        seed: Option<u64>,
        /// Entries of C compared one by one.
        check_entries: Option<usize>,
    },
    /// Single-cell-like sparse pipeline.
    Sparse {
        /// Key prefix.
        key: Option<String>,
        /// Cells.
        cells: usize,
        /// Genes.
        genes: usize,
        /// Mean fraction of genes per cell.
        density: f64,
        /// Row blocks.
        blocks: usize,
        /// Highly variable genes.
        hvg: usize,
        /// Minimum genes per kept cell.
        min_genes: usize,
        /// Minimum cells per kept gene.
        min_cells: usize,
        /// Seed.
        seed: Option<u64>,
    },
    /// Sleep in `tasks` tasks.
    Sleep {
        /// How long each.
        duration: Dur,
        /// How many tasks.
        tasks: Option<u32>,
    },
    /// Purge/trim the allocator.
    Purge {},
    /// Not an operation: the operations after it in the phase start when
    /// those before it have finished, so a pause written after a burst lasts
    /// as long as written on a slow machine too.
    Barrier {},
    /// End the process abnormally (for nanny tests).
    Crash {
        /// How.
        how: CrashHow,
        /// Only while the attempt number is below this.
        until_attempt: Option<u32>,
    },
}

impl Workload {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Workload> {
        let w: Workload =
            toml::from_str(text).with_context(|| format!("malformed workload {origin}"))?;
        w.validate()
            .with_context(|| format!("invalid workload {origin}"))?;
        Ok(w)
    }

    /// A built-in name or a path to a TOML file.
    pub fn load(name_or_path: &str) -> anyhow::Result<Workload> {
        if let Some((name, text)) = BUILTINS.iter().find(|(n, _)| *n == name_or_path) {
            let mut w = Workload::parse(text, &format!("built-in {name}"))?;
            w.name.get_or_insert_with(|| name.to_string());
            return Ok(w);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            let names: Vec<&str> = BUILTINS.iter().map(|(n, _)| *n).collect();
            bail!(
                "{name_or_path:?} is neither a built-in workload ({}) nor a file",
                names.join(", ")
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read workload file {}", path.display()))?;
        let mut w = Workload::parse(&text, &path.display().to_string())?;
        if w.name.is_none() {
            w.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        Ok(w)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.phases.is_empty() {
            bail!("a workload needs at least one [[phase]]");
        }
        for (i, p) in self.phases.iter().enumerate() {
            if p.ops.is_empty() {
                bail!("phase {i} has no [[phase.op]]");
            }
            for op in &p.ops {
                match op {
                    Op::Allocate {
                        chunk,
                        chunk_min,
                        chunk_max,
                        ..
                    } => match (chunk, chunk_min, chunk_max) {
                        (Some(c), None, None) if c.0 > 0 => {}
                        (None, Some(a), Some(b)) if a.0 > 0 && a.0 <= b.0 => {}
                        _ => bail!(
                            "allocate needs `chunk` > 0, or `chunk-min` <= `chunk-max` (both > 0)"
                        ),
                    },
                    Op::Free { fraction, .. } if !(0.0..=1.0).contains(fraction) => {
                        bail!("free: fraction must be in [0, 1], not {fraction}")
                    }
                    Op::Matmul { n, block, .. } if *block == 0 || *n == 0 || n % block != 0 => {
                        bail!("matmul: block ({block}) must divide n ({n}) and both be > 0")
                    }
                    Op::Sparse {
                        cells,
                        genes,
                        blocks,
                        hvg,
                        density,
                        ..
                    } if *cells == 0
                        || *genes == 0
                        || *blocks == 0
                        || *hvg == 0
                        || !(*density > 0.0 && *density <= 1.0) =>
                    {
                        bail!("sparse: cells, genes, blocks, hvg must be > 0 and density in (0, 1]")
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// A result compared with its direct computation (the timeline contract's
/// type: it is an event and part of the summary).
pub use amm_timeline::Check;

const PATTERN_TAG: u64 = 0x5041_5454;

/// How many failures an error or a check names before it says how many more.
pub const NAMED: usize = 10;

/// `"5 wrong: a; b; c"`, or with more than [`NAMED`]: `"12 wrong: a; ...;
/// j (and 2 more)"`.
fn named_list(items: &[String], what: &str) -> String {
    let shown: Vec<&str> = items.iter().take(NAMED).map(String::as_str).collect();
    let more = items.len().saturating_sub(NAMED);
    let tail = if more > 0 {
        format!(" (and {more} more)")
    } else {
        String::new()
    };
    format!("{} {what}: {}{tail}", items.len(), shown.join("; "))
}
const MIB8: u64 = 8 << 20;

type Held = Vec<Option<Box<[u8]>>>;

struct State {
    buffer: Arc<SpillBuffer>,
    timeline: Option<Arc<Timeline>>,
    unmanaged: Mutex<HashMap<String, Held>>,
    counters: Mutex<HashMap<String, u64>>,
    checks: Mutex<Vec<Check>>,
    purged: AtomicU64,
    purges: AtomicU64,
    attempt: u32,
}

impl State {
    fn check(&self, name: String, ok: bool, detail: String) {
        if ok {
            tracing::info!("check {name}: ok ({detail})");
        } else {
            tracing::error!("check {name}: FAILED ({detail})");
        }
        if let Some(t) = &self.timeline {
            t.event(Event::Check(Check {
                name: name.clone(),
                ok,
                detail: detail.clone(),
            }));
        }
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Check { name, ok, detail });
    }

    fn next_index(&self, key: &str, n: u64) -> u64 {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let v = c.entry(key.to_string()).or_insert(0);
        let start = *v;
        *v += n;
        start
    }
}

/// What a run produced.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Every check.
    pub checks: Vec<Check>,
    /// Errors of failed operations.
    pub errors: Vec<String>,
    /// Bytes the workload's own `purge` operations gave back.
    pub purged_bytes: u64,
    /// How many `purge` operations ran.
    pub purges: u64,
}

impl Outcome {
    /// True when every check passed and nothing failed.
    pub fn result_ok(&self) -> bool {
        self.errors.is_empty() && self.checks.iter().all(|c| c.ok)
    }
}

/// Runs workloads on a pool of task threads.
pub struct Runner {
    pool: Pool,
    state: Arc<State>,
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

impl Runner {
    /// A runner with `nthreads` task threads.
    pub fn new(
        nthreads: usize,
        buffer: Arc<SpillBuffer>,
        gate: Arc<Gate>,
        timeline: Option<Arc<Timeline>>,
        attempt: u32,
    ) -> std::io::Result<Runner> {
        Ok(Runner {
            pool: Pool::new(nthreads, gate)?,
            state: Arc::new(State {
                buffer,
                timeline,
                unmanaged: Mutex::new(HashMap::new()),
                counters: Mutex::new(HashMap::new()),
                checks: Mutex::new(Vec::new()),
                purged: AtomicU64::new(0),
                purges: AtomicU64::new(0),
                attempt,
            }),
        })
    }

    /// Runs every phase; an operation's failure is recorded and the run
    /// stops after its phase.
    pub fn run(&self, w: &Workload) -> Outcome {
        let mut errors = Vec::new();
        'all: for rep in 0..w.repeat {
            for (pi, phase) in w.phases.iter().enumerate() {
                for prep in 0..phase.repeat {
                    let name = phase.name.clone().unwrap_or_else(|| format!("phase{pi}"));
                    tracing::info!(phase = %name, round = rep, repeat = prep, "phase starts");
                    if let Some(t) = &self.state.timeline {
                        t.event(Event::Phase(amm_timeline::Phase {
                            name: name.clone(),
                            round: rep,
                            repeat: prep,
                        }));
                    }
                    let mut errs: Vec<String> = Vec::new();
                    for group in phase.ops.split(|op| matches!(op, Op::Barrier {})) {
                        errs = self.run_together(&name, group);
                        if !errs.is_empty() {
                            break;
                        }
                    }
                    if !errs.is_empty() {
                        for e in &errs {
                            tracing::error!("{e}");
                        }
                        errors.extend(errs);
                        break 'all;
                    }
                }
            }
        }
        if let Some(t) = &self.state.timeline {
            t.event(Event::End(End {
                errors: errors.len() as u64,
            }));
        }
        Outcome {
            checks: self
                .state
                .checks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            errors,
            purged_bytes: self.state.purged.load(Ordering::Relaxed),
            purges: self.state.purges.load(Ordering::Relaxed),
        }
    }

    /// Runs `ops` concurrently and returns what failed.
    fn run_together(&self, phase: &str, ops: &[Op]) -> Vec<String> {
        std::thread::scope(|s| {
            let handles: Vec<_> = ops
                .iter()
                .map(|op| s.spawn(move || self.run_op(op)))
                .collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{phase}: {e:#}")),
                    Err(_) => Some(format!("{phase}: operation panicked")),
                })
                .collect()
        })
    }

    fn stage(&self, tasks: Vec<Task>) -> anyhow::Result<()> {
        let errors = self.pool.run_all(tasks);
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", named_list(&errors, "task(s) failed"))
        }
    }

    fn run_op(&self, op: &Op) -> anyhow::Result<()> {
        let st = &self.state;
        match op {
            Op::Allocate {
                bytes,
                chunk,
                chunk_min,
                chunk_max,
                keep,
                key,
                tasks,
                delay,
                hold,
            } => {
                let key = key.clone().unwrap_or_else(|| "data".into());
                let (cmin, cmax) = match (chunk, chunk_min, chunk_max) {
                    (Some(c), _, _) => (c.0, c.0),
                    (None, Some(a), Some(b)) => (a.0, b.0),
                    _ => bail!("allocate needs chunk or chunk-min/chunk-max"),
                };
                let ntasks = match (tasks, keep) {
                    (Some(t), _) => (*t).max(1) as u64,
                    (None, Keep::Task) => 1,
                    (None, _) => (bytes.0 / MIB8.max(cmax)).max(1),
                };
                let per_task = bytes.0 / ntasks;
                let delay = delay.map(|d| d.0);
                let hold = hold.map(|d| d.0);
                // Managed keys are numbered per task: task t uses
                // key/<base+t>/<chunk>.
                let base = st.next_index(&key, ntasks);
                let mut list: Vec<Task> = Vec::new();
                for t in 0..ntasks {
                    let st = st.clone();
                    let key = key.clone();
                    let keep = *keep;
                    let mine = if t == ntasks - 1 {
                        bytes.0 - per_task * (ntasks - 1)
                    } else {
                        per_task
                    };
                    list.push(Box::new(move || {
                        let start = Instant::now();
                        let mut rng = Rng::new(seed_of(&key) ^ (base + t));
                        let mut held: Held = Vec::new();
                        let (mut done, mut i) = (0u64, 0u64);
                        while done < mine {
                            let size = rng.range(cmin, cmax).min(mine - done) as usize;
                            if keep == Keep::Managed {
                                let k = format!("{key}/{:06}/{i:06}", base + t);
                                let seed = seed_of(&k);
                                let mut v = vec![0u8; size];
                                fill_pattern(&mut v, seed);
                                st.buffer.put(
                                    &k,
                                    Value {
                                        meta: [PATTERN_TAG, seed, 0, 0],
                                        parts: vec![Part::U8(v)],
                                    },
                                );
                            } else {
                                held.push(Some(vec![0xA5u8; size].into_boxed_slice()));
                            }
                            done += size as u64;
                            i += 1;
                            if let Some(d) = delay {
                                // chunk i is due at i delays after the start:
                                // a wake-up late on a busy machine catches up,
                                // so the rate written is the rate run
                                let due = start + d.mul_f64(i as f64);
                                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                            }
                        }
                        if let Some(h) = hold {
                            std::thread::sleep(h);
                        }
                        if keep == Keep::Unmanaged {
                            st.unmanaged
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(key)
                                .or_default()
                                .extend(held);
                        }
                        Ok(())
                    }));
                }
                self.stage(list)
            }
            Op::Free {
                key,
                fraction,
                pattern,
            } => {
                let st = st.clone();
                let (key, fraction, pattern) = (key.clone(), *fraction, *pattern);
                self.stage(vec![Box::new(move || {
                    free_fraction(&st, &key, fraction, pattern);
                    Ok(())
                })])
            }
            Op::Drop { key } => {
                let st = st.clone();
                let key = key.clone();
                self.stage(vec![Box::new(move || {
                    let prefix = format!("{key}/");
                    let mut n = 0;
                    for k in st.buffer.keys_with_prefix(&prefix) {
                        n += st.buffer.delete(&k) as u64;
                    }
                    let held = st
                        .unmanaged
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    let m = held.map_or(0, |h| h.len());
                    tracing::info!(key, managed_values = n, unmanaged_items = m, "dropped");
                    Ok(())
                })])
            }
            Op::ReadBack { key } => self.read_back(key),
            Op::Matmul {
                key,
                n,
                block,
                seed,
                check_entries,
            } => self.matmul(
                key.as_deref().unwrap_or("mm"),
                *n,
                *block,
                seed.unwrap_or(1),
                check_entries.unwrap_or(16),
            ),
            Op::Sparse {
                key,
                cells,
                genes,
                density,
                blocks,
                hvg,
                min_genes,
                min_cells,
                seed,
            } => self.sparse(
                key.as_deref().unwrap_or("sc"),
                sparse::SparseParams {
                    cells: *cells,
                    genes: *genes,
                    density: *density,
                    blocks: *blocks,
                    hvg: *hvg,
                    min_genes: *min_genes,
                    min_cells: *min_cells,
                    seed: seed.unwrap_or(1),
                },
            ),
            Op::Sleep { duration, tasks } => {
                let d = duration.0;
                let list: Vec<Task> = (0..tasks.unwrap_or(1).max(1))
                    .map(|_| {
                        Box::new(move || {
                            std::thread::sleep(d);
                            Ok(())
                        }) as Task
                    })
                    .collect();
                self.stage(list)
            }
            Op::Barrier {} => Ok(()),
            Op::Purge {} => {
                let st = st.clone();
                self.stage(vec![Box::new(move || {
                    let r = crate::alloc::reclaim("workload")?;
                    tracing::info!(
                        allocator = ?r.allocator,
                        returned = %format_bytes(r.returned_bytes),
                        hoarded_before = %format_bytes(r.hoarded_before),
                        hoarded_after = %format_bytes(r.hoarded_after),
                        us = r.duration_us,
                        "purge"
                    );
                    st.purged.fetch_add(r.returned_bytes, Ordering::Relaxed);
                    st.purges.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = &st.timeline {
                        t.event(Event::Purge(r));
                    }
                    Ok(())
                })])
            }
            Op::Crash { how, until_attempt } => {
                if until_attempt.is_some_and(|u| st.attempt >= u) {
                    tracing::info!(attempt = st.attempt, "crash skipped on this attempt");
                    return Ok(());
                }
                tracing::warn!(?how, attempt = st.attempt, "crashing on purpose");
                if let Some(t) = &st.timeline {
                    t.flush();
                }
                match how {
                    CrashHow::Abort => std::process::abort(),
                    CrashHow::Segfault => {
                        // SAFETY: raising a signal is always allowed; the
                        // default action of SIGSEGV ends the process.
                        unsafe {
                            libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                            libc::raise(libc::SIGSEGV);
                        }
                        bail!("SIGSEGV did not end the process")
                    }
                }
            }
        }
    }

    /// Gets every managed value under `key` and checks its bytes; the check
    /// counts and names (up to [`NAMED`]) every value that could not be
    /// read or held the wrong bytes.
    fn read_back(&self, key: &str) -> anyhow::Result<()> {
        let st = &self.state;
        let keys = st.buffer.keys_with_prefix(&format!("{key}/"));
        let bad = Arc::new(Mutex::new(Vec::<String>::new()));
        let bytes = Arc::new(AtomicU64::new(0));
        let n = keys.len();
        let start = Instant::now();
        let list: Vec<Task> = keys
            .into_iter()
            .map(|k| {
                let st = st.clone();
                let bad = bad.clone();
                let bytes = bytes.clone();
                Box::new(move || {
                    let found = match st.buffer.get(&k) {
                        Err(e) => Err(e.to_string()),
                        Ok(v) => {
                            bytes.fetch_add(v.payload_len(), Ordering::Relaxed);
                            match (v.meta[0], v.parts.first()) {
                                (PATTERN_TAG, Some(Part::U8(b)))
                                    if !check_pattern(b, v.meta[1]) =>
                                {
                                    Err(format!("{k}: wrong bytes"))
                                }
                                _ => Ok(()),
                            }
                        }
                    };
                    if let Err(e) = found {
                        bad.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(e.clone());
                        anyhow::bail!(e);
                    }
                    Ok(())
                }) as Task
            })
            .collect();
        let r = self.stage(list);
        let mut bad = bad.lock().unwrap_or_else(|e| e.into_inner()).clone();
        bad.sort();
        let total = bytes.load(Ordering::Relaxed);
        st.check(
            format!("read-back {key}"),
            r.is_ok() && bad.is_empty(),
            format!(
                "{n} values, {} read and verified in {} ms, {}",
                format_bytes(total),
                start.elapsed().as_millis(),
                if bad.is_empty() {
                    "0 wrong".to_string()
                } else {
                    named_list(&bad, "wrong")
                }
            ),
        );
        r
    }

    fn matmul(
        &self,
        key: &str,
        n: usize,
        b: usize,
        seed: u64,
        entries: usize,
    ) -> anyhow::Result<()> {
        let st = &self.state;
        let nb = n / b;
        let start = Instant::now();
        let a_key = |i: usize, j: usize| format!("{key}/A/{i:04}/{j:04}");
        let c_key = |i: usize, k: usize| format!("{key}/C/{i:04}/{k:04}");
        // A
        let mut list: Vec<Task> = Vec::new();
        for i in 0..nb {
            for j in 0..nb {
                let st = st.clone();
                let k = a_key(i, j);
                list.push(Box::new(move || {
                    let blk = matmul::a_block(seed, n, b, i, j);
                    st.buffer.put(
                        &k,
                        Value {
                            meta: [0, b as u64, i as u64, j as u64],
                            parts: vec![Part::F64(blk)],
                        },
                    );
                    Ok(())
                }));
            }
        }
        self.stage(list)?;
        // C = A @ A.T, one output block per task
        let mut list: Vec<Task> = Vec::new();
        for i in 0..nb {
            for k in 0..nb {
                let st = st.clone();
                let keys: Vec<(String, String)> =
                    (0..nb).map(|j| (a_key(i, j), a_key(k, j))).collect();
                let out = c_key(i, k);
                list.push(Box::new(move || {
                    let mut acc = vec![0.0f64; b * b];
                    for (xa, ya) in &keys {
                        let x = st.buffer.get(xa)?;
                        let y = st.buffer.get(ya)?;
                        let (Some(Part::F64(x)), Some(Part::F64(y))) =
                            (x.parts.first(), y.parts.first())
                        else {
                            bail!("block {xa} or {ya} is not a float block");
                        };
                        matmul::add_abt(x, y, &mut acc, b);
                    }
                    st.buffer.put(
                        &out,
                        Value {
                            meta: [0, b as u64, i as u64, k as u64],
                            parts: vec![Part::F64(acc)],
                        },
                    );
                    Ok(())
                }));
            }
        }
        self.stage(list)?;
        // sum
        let total = Arc::new(Mutex::new(vec![0.0f64; nb]));
        let mut list: Vec<Task> = Vec::new();
        for i in 0..nb {
            let st = st.clone();
            let total = total.clone();
            let keys: Vec<String> = (0..nb).map(|k| c_key(i, k)).collect();
            list.push(Box::new(move || {
                let mut s = 0.0;
                for k in &keys {
                    let v = st.buffer.get(k)?;
                    if let Some(Part::F64(c)) = v.parts.first() {
                        s += c.iter().sum::<f64>();
                    }
                }
                total.lock().unwrap_or_else(|e| e.into_inner())[i] = s;
                Ok(())
            }));
        }
        self.stage(list)?;
        let blocked: f64 = total.lock().unwrap_or_else(|e| e.into_inner()).iter().sum();
        let compute_ms = start.elapsed().as_millis();
        let direct = matmul::direct_sum(seed, n);
        st.check(
            format!("matmul {key} sum(A @ A.T)"),
            close(blocked, direct),
            format!(
                "blocked {blocked:.9e}, direct {direct:.9e}, n {n}, block {b}, {compute_ms} ms"
            ),
        );
        // A few entries one by one.
        let mut rng = Rng::new(seed ^ 0xC0FFEE);
        let mut worst = 0.0f64;
        for _ in 0..entries {
            let r = rng.range(0, n as u64 - 1) as usize;
            let c = rng.range(0, n as u64 - 1) as usize;
            let v = st.buffer.get(&c_key(r / b, c / b))?;
            let Some(Part::F64(blk)) = v.parts.first() else {
                bail!("C block is not a float block");
            };
            let got = blk[(r % b) * b + (c % b)];
            let want = matmul::direct_entry(seed, n, r, c);
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
        }
        st.check(
            format!("matmul {key} entries"),
            worst <= 1e-9,
            format!("{entries} entries of C, worst relative error {worst:.2e}"),
        );
        Ok(())
    }

    fn sparse(&self, key: &str, p: sparse::SparseParams) -> anyhow::Result<()> {
        let st = &self.state;
        let start = Instant::now();
        let sampler = Arc::new(sparse::GeneSampler::new(p.genes));
        let raw_key = |b: usize| format!("{key}/raw/{b:05}");
        let norm_key = |b: usize| format!("{key}/norm/{b:05}");
        // generate
        let list: Vec<Task> = (0..p.blocks)
            .map(|b| {
                let (st, s, k) = (st.clone(), sampler.clone(), raw_key(b));
                Box::new(move || {
                    st.buffer.put(&k, sparse::gen_block(&p, &s, b).into_value());
                    Ok(())
                }) as Task
            })
            .collect();
        self.stage(list)?;
        // QC: gene counts over kept cells
        let counts = Arc::new(Mutex::new((vec![0u32; p.genes], 0u64)));
        let list: Vec<Task> = (0..p.blocks)
            .map(|b| {
                let (st, counts, k) = (st.clone(), counts.clone(), raw_key(b));
                Box::new(move || {
                    let m = sparse::Csr::from_value(&*st.buffer.get(&k)?)?;
                    let (c, kept) = sparse::qc_partial(&p, &m);
                    let mut g = counts.lock().unwrap_or_else(|e| e.into_inner());
                    for (a, x) in g.0.iter_mut().zip(c) {
                        *a += x;
                    }
                    g.1 += kept;
                    Ok(())
                }) as Task
            })
            .collect();
        self.stage(list)?;
        let (counts, kept_cells) = counts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (map, kept_genes) = sparse::gene_map(&p, &counts);
        let map = Arc::new(map);
        // normalise
        let list: Vec<Task> = (0..p.blocks)
            .map(|b| {
                let (st, map) = (st.clone(), map.clone());
                let (rk, nk) = (raw_key(b), norm_key(b));
                Box::new(move || {
                    let m = sparse::Csr::from_value(&*st.buffer.get(&rk)?)?;
                    let n = sparse::normalize(&p, &m, &map, kept_genes);
                    drop(m);
                    st.buffer.put(&nk, n.into_value());
                    Ok(())
                }) as Task
            })
            .collect();
        self.stage(list)?;
        // moments -> HVG
        let moments = Arc::new(Mutex::new((vec![0.0; kept_genes], vec![0.0; kept_genes])));
        let list: Vec<Task> = (0..p.blocks)
            .map(|b| {
                let (st, mo, k) = (st.clone(), moments.clone(), norm_key(b));
                Box::new(move || {
                    let m = sparse::Csr::from_value(&*st.buffer.get(&k)?)?;
                    let (s, q, _) = sparse::moments_partial(&m);
                    let mut g = mo.lock().unwrap_or_else(|e| e.into_inner());
                    for i in 0..s.len() {
                        g.0[i] += s[i];
                        g.1[i] += q[i];
                    }
                    Ok(())
                }) as Task
            })
            .collect();
        self.stage(list)?;
        let (sum, sumsq) = moments.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let k = p.hvg.min(kept_genes);
        let (hvg, hvg_map) = sparse::choose_hvg(&sum, &sumsq, kept_cells, k);
        let hvg_map = Arc::new(hvg_map);
        // gram
        let gram = Arc::new(Mutex::new(vec![0.0f64; k * k]));
        let list: Vec<Task> = (0..p.blocks)
            .map(|b| {
                let (st, gm, hm, key) = (st.clone(), gram.clone(), hvg_map.clone(), norm_key(b));
                Box::new(move || {
                    let m = sparse::Csr::from_value(&*st.buffer.get(&key)?)?;
                    let part = sparse::gram_partial(&m, &hm, k);
                    drop(m);
                    let mut g = gm.lock().unwrap_or_else(|e| e.into_inner());
                    for (a, x) in g.iter_mut().zip(part) {
                        *a += x;
                    }
                    Ok(())
                }) as Task
            })
            .collect();
        self.stage(list)?;
        let g = gram.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let gram_sum: f64 = g.iter().sum();
        let gram_trace: f64 = (0..k).map(|i| g[i * k + i]).sum();
        let ms = start.elapsed().as_millis();
        let d = sparse::direct(&sparse::SparseParams { hvg: k, ..p })?;
        let ok = d.kept_cells == kept_cells
            && d.kept_genes == kept_genes
            && d.hvg == hvg
            && close(gram_sum, d.gram_sum)
            && close(gram_trace, d.gram_trace);
        st.check(
            format!("sparse {key} gram"),
            ok,
            format!(
                "cells kept {kept_cells}/{} (direct {}), genes kept {kept_genes}/{} (direct {}), \
                 hvg equal {}, sum(G) {gram_sum:.9e} vs {:.9e}, trace(G) {gram_trace:.9e} vs {:.9e}, {ms} ms",
                p.cells,
                d.kept_cells,
                p.genes,
                d.kept_genes,
                d.hvg == hvg,
                d.gram_sum,
                d.gram_trace
            ),
        );
        Ok(())
    }
}

fn free_fraction(st: &State, key: &str, fraction: f64, pattern: FreePattern) {
    let pick = |j: usize, live: usize, rng: &mut Rng| match pattern {
        FreePattern::Spread => ((j + 1) as f64 * fraction).floor() > (j as f64 * fraction).floor(),
        FreePattern::Random => rng.next_f64() < fraction,
        FreePattern::First => (j as f64) < (live as f64 * fraction).round(),
    };
    let mut rng = Rng::new(seed_of(key) ^ 0xF4EE);
    let mut freed_bytes = 0u64;
    let mut freed = 0usize;
    {
        let mut map = st.unmanaged.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(items) = map.get_mut(key) {
            let live = items.iter().filter(|i| i.is_some()).count();
            let mut j = 0;
            for slot in items.iter_mut() {
                if slot.is_none() {
                    continue;
                }
                if pick(j, live, &mut rng) {
                    freed_bytes += slot.as_ref().map_or(0, |b| b.len() as u64);
                    *slot = None;
                    freed += 1;
                }
                j += 1;
            }
            items.retain(Option::is_some);
        }
    }
    // Managed values under the key too.
    let keys = st.buffer.keys_with_prefix(&format!("{key}/"));
    let live = keys.len();
    let mut managed = 0usize;
    for (j, k) in keys.iter().enumerate() {
        if pick(j, live, &mut rng) && st.buffer.delete(k) {
            managed += 1;
        }
    }
    tracing::info!(
        key,
        fraction,
        unmanaged_items = freed,
        unmanaged_bytes = %format_bytes(freed_bytes),
        managed_values = managed,
        "freed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SpillBuffer in `dir` that spills only when told to.
    fn scratch_buffer(dir: &Path, name: &str) -> Arc<SpillBuffer> {
        use crate::spill::{SpillDir, SpillOptions, WriteOptions};
        Arc::new(SpillBuffer::new(
            SpillDir::open(dir, name).expect("dir"),
            SpillOptions {
                target: None,
                max_spill: None,
                write: WriteOptions {
                    fsync: false,
                    drop_cache: false,
                },
            },
        ))
    }

    /// Issue 9 item 10: with 5 corrupt spilled keys only the first 3 were
    /// named and the check said "0 wrong".
    #[test]
    fn read_back_counts_and_names_every_bad_value() {
        let tmp = tempfile::tempdir().expect("tmp");
        let buffer = scratch_buffer(tmp.path(), "rb");
        for i in 0..7u8 {
            buffer.put(&format!("d/{i}"), Value::bytes(vec![i; 1000]));
        }
        buffer.evict_until(0).expect("spill all");
        for i in 0..5u8 {
            let f = buffer.file_of(&format!("d/{i}")).expect("file");
            let mut bytes = std::fs::read(&f).expect("read");
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            std::fs::write(&f, bytes).expect("corrupt");
        }
        let runner = Runner::new(2, buffer, Arc::new(Gate::default()), None, 0).expect("runner");
        let w = Workload::parse(
            "[[phase]]\n[[phase.op]]\nop = \"read-back\"\nkey = \"d\"\n",
            "t.toml",
        )
        .expect("workload");
        let out = runner.run(&w);
        let check = out.checks.first().expect("a check");
        assert!(!check.ok);
        assert!(check.detail.contains("5 wrong"), "{}", check.detail);
        for i in 0..5 {
            assert!(
                check.detail.contains(&format!("\"d/{i}\"")),
                "{}",
                check.detail
            );
        }
        let err = out.errors.join("\n");
        assert!(err.contains("5 task(s) failed"), "{err}");
        assert!(err.contains("\"d/4\""), "{err}");
        let many: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
        assert!(named_list(&many, "wrong").ends_with("k9 (and 2 more)"));
    }

    /// A pause written after a burst must not start with the burst: on a
    /// loaded machine the burst takes most of the pause, and the floor
    /// between two bursts is never seen (the suite's spike cases).
    #[test]
    fn ops_after_a_barrier_start_when_those_before_it_finished() {
        let tmp = tempfile::tempdir().expect("tmp");
        let buffer = scratch_buffer(tmp.path(), "b");
        let runner =
            Runner::new(2, buffer.clone(), Arc::new(Gate::default()), None, 0).expect("runner");
        // 8 values put 20 ms apart, then all of them dropped
        let w = Workload::parse(
            "[[phase]]\n[[phase.op]]\nop = \"allocate\"\nbytes = \"8MiB\"\nchunk = \"1MiB\"\n\
             keep = \"managed\"\nkey = \"b\"\ntasks = 1\ndelay = \"20ms\"\n\
             [[phase.op]]\nop = \"barrier\"\n[[phase.op]]\nop = \"drop\"\nkey = \"b\"\n",
            "t.toml",
        )
        .expect("workload");
        let out = runner.run(&w);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(buffer.managed(), 0, "drop ran before the values were put");
        assert!(buffer.keys_with_prefix("b").is_empty());
    }

    /// Issue 9 item 10: `bytes = nan` said "NaN is negative".
    #[test]
    fn sizes_that_are_not_sizes_are_named_as_such() {
        for (value, says) in [
            ("nan", "nan is not a size"),
            ("-1", "negative"),
            ("1.5", "not a whole number of bytes"),
            ("true", "expected a size"),
        ] {
            let text = format!(
                "[[phase]]\n[[phase.op]]\nop = \"allocate\"\nkeep = \"task\"\nchunk = 1\nbytes = {value}\n"
            );
            let e = format!("{:#}", Workload::parse(&text, "t.toml").expect_err(value));
            assert!(e.to_lowercase().contains(says), "{value}: {e}");
            assert!(!e.contains("NaN is negative"), "{e}");
        }
    }

    #[test]
    fn builtins_parse() {
        for (name, _) in BUILTINS {
            let w = Workload::load(name).expect(name);
            assert_eq!(w.name.as_deref(), Some(*name));
        }
    }

    #[test]
    fn bad_workloads_are_clear_errors() {
        let e = Workload::parse("[[phase]]\n[[phase.op]]\nop = \"juggle\"\n", "t.toml")
            .expect_err("unknown op");
        assert!(format!("{e:#}").contains("juggle"), "{e:#}");
        let e = Workload::parse(
            "[[phase]]\n[[phase.op]]\nop = \"allocate\"\nbytes = \"banana\"\nchunk = 1\nkeep = \"task\"\n",
            "t.toml",
        )
        .expect_err("bad size");
        assert!(format!("{e:#}").contains("banana"), "{e:#}");
        let e = Workload::parse(
            "[[phase]]\n[[phase.op]]\nop = \"matmul\"\nn = 100\nblock = 33\n",
            "t.toml",
        )
        .expect_err("bad block");
        assert!(format!("{e:#}").contains("must divide"), "{e:#}");
        let e = Workload::load("no-such-workload").expect_err("missing");
        assert!(format!("{e:#}").contains("neither a built-in"), "{e:#}");
    }
}
