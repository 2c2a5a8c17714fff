//! The trial loop both Dask benchmarks run (`bench-dask`, `bench-spike-dask`):
//! warm-up trials, then rounds of trials interleaved in the order given,
//! each written as one JSON line as it ends, so an interrupted run keeps
//! every trial that completed; and the reader of such a file.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::dask::{DaskRunner, TrialConfig, TrialResult};

/// What one run of a Dask benchmark does.
pub struct Rounds<'a> {
    /// Runs each trial.
    pub runner: &'a DaskRunner,
    /// Trials run first and not recorded (the VM's first faults are slow).
    pub warmup: Vec<TrialConfig>,
    /// The measured trials, round by round, each round in its order.
    pub rounds: Vec<Vec<TrialConfig>>,
    /// Set by SIGINT/SIGTERM ([`crate::dask::handle_stop_signals`]).
    pub stop: &'a AtomicBool,
    /// One line about a finished trial, for stderr.
    pub describe: fn(&TrialResult) -> String,
}

impl Rounds<'_> {
    /// Runs the warm-up, then every round, appending each measured trial to
    /// `out` as one JSON line; stops early (keeping what completed) when
    /// asked to stop. Returns the measured trials.
    pub fn run(&self, out: &Path) -> Result<Vec<TrialResult>> {
        let mut err = std::io::stderr();
        let mut file =
            fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
        let started = Instant::now();
        for cfg in &self.warmup {
            let r = self.runner.run_trial(cfg)?;
            if self.stop.load(Ordering::SeqCst) {
                bail!("interrupted during the warm-up");
            }
            writeln!(err, "warm-up  {}", (self.describe)(&r))?;
        }
        let mut results = Vec::new();
        'rounds: for (round, configs) in self.rounds.iter().enumerate() {
            for cfg in configs {
                let r = self.runner.run_trial(cfg).with_context(|| {
                    format!(
                        "trial {round} of {} {}",
                        cfg.workload.name(),
                        cfg.mode.name()
                    )
                })?;
                if self.stop.load(Ordering::SeqCst) {
                    writeln!(err, "interrupted: the table has the trials that completed")?;
                    break 'rounds;
                }
                writeln!(err, "trial {round:<2} {}", (self.describe)(&r))?;
                serde_json::to_writer(&mut file, &r)?;
                writeln!(file)?;
                file.flush()?;
                results.push(r);
            }
        }
        writeln!(
            err,
            "{} trials in {:.0} s; raw results in {}",
            results.len(),
            started.elapsed().as_secs_f64(),
            out.display()
        )?;
        Ok(results)
    }
}

/// The trials an earlier run wrote (its `--out`, one JSON line each).
pub fn read_results(path: &Path) -> Result<Vec<TrialResult>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str::<TrialResult>(line)
                .with_context(|| format!("{} line {}: not a trial result", path.display(), i + 1))
        })
        .collect()
}

/// A fraction of the limit as a percentage, `?` when unknown.
pub fn percent(f: Option<f64>) -> String {
    f.map_or_else(|| "?".into(), |f| format!("{:.1}%", f * 100.0))
}

/// The first line of a trial's error, on its own indented line (empty when
/// the trial had none).
pub fn error_line(r: &TrialResult) -> String {
    r.error
        .as_deref()
        .map(|e| format!("\n       error: {}", e.lines().next().unwrap_or("")))
        .unwrap_or_default()
}

/// A trial's wall time, `-` when unknown.
pub fn wall(r: &TrialResult) -> String {
    r.wall_ms
        .map_or_else(|| "-".into(), |ms| format!("{:.1} s", ms / 1000.0))
}
