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
//!
//! Each operation is its own module (`workload/<op>.rs`: its fields, its
//! checks, how it runs); this one holds the file format, the phases and the
//! [`Runner`] that dispatches to them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amm_timeline::{End, Event};
use anyhow::{Context, bail};
use serde::Deserialize;

use crate::memory::Gate;
use crate::pool::{Pool, Task};
use crate::spill::SpillBuffer;
use crate::timeline::Timeline;
use crate::units::{parse_bytes, parse_duration};

mod allocate;
mod crash;
mod drop;
mod free;
mod matmul;
mod purge;
mod read_back;
mod sleep;
mod sparse;

pub use allocate::{Allocate, Keep};
pub use crash::{Crash, CrashHow};
pub use drop::DropKey;
pub use free::{Free, FreePattern};
pub use matmul::Matmul;
pub use read_back::ReadBack;
pub use sleep::Sleep;
pub use sparse::Sparse;

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

/// One operation: its `op` names the variant; each has its own module
/// (`workload/<op>.rs`) with its fields, its checks and how it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    tag = "op",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case",
    deny_unknown_fields
)]
pub enum Op {
    /// Allocate `bytes` in chunks.
    Allocate(Allocate),
    /// Free a fraction of what `key` holds.
    Free(Free),
    /// Drop all of `key`.
    Drop(DropKey),
    /// Read back and verify every managed value under `key`.
    ReadBack(ReadBack),
    /// Blocked `(A @ A.T).sum()`.
    Matmul(Matmul),
    /// Single-cell-like sparse pipeline.
    Sparse(Sparse),
    /// Sleep in `tasks` tasks.
    Sleep(Sleep),
    /// Purge/trim the allocator.
    Purge {},
    /// Not an operation: the operations after it in the phase start when
    /// those before it have finished, so a pause written after a burst lasts
    /// as long as written on a slow machine too.
    Barrier {},
    /// End the process abnormally (for nanny tests).
    Crash(Crash),
}

impl Op {
    /// Checks what parsing cannot: sizes that fit together.
    fn validate(&self) -> anyhow::Result<()> {
        match self {
            Op::Allocate(op) => op.validate(),
            Op::Free(op) => op.validate(),
            Op::Matmul(op) => op.validate(),
            Op::Sparse(op) => op.validate(),
            _ => Ok(()),
        }
    }
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
                op.validate()?;
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
        match op {
            Op::Allocate(op) => op.run(self),
            Op::Free(op) => op.run(self),
            Op::Drop(op) => op.run(self),
            Op::ReadBack(op) => op.run(self),
            Op::Matmul(op) => op.run(self),
            Op::Sparse(op) => op.run(self),
            Op::Sleep(op) => op.run(self),
            Op::Barrier {} => Ok(()),
            Op::Purge {} => purge::run(self),
            Op::Crash(op) => op.run(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spill::Value;

    /// A SpillBuffer in `dir` that spills only when told to.
    fn scratch_buffer(dir: &Path, name: &str) -> Arc<SpillBuffer> {
        Arc::new(crate::spill::test_buffer(dir, name, None, false))
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
