//! The spike benchmark: the same workloads under a hard cgroup limit (the
//! worker's memory limit) for amm-worker polling every 200 ms and every
//! 100 ms, amm-worker on amm-agent's events, and real Dask, interleaved
//! trial by trial. Writes the per-trial JSON lines and prints the table.
//! Run as root: `cargo xtask bench spike`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use amm_benches::amm_trial::{AmmMode, run_trial};
use amm_benches::dask::{DaskRunner, DaskVenv, TrialConfig, Workload};
use amm_benches::spike_table::{self, Sample};
use amm_benches::{percentiles, start_agent, target_dir};
use amm_integration_tests::cgroup::HardLimit;
use anyhow::{Context, Result, bail};
use clap::Parser;

/// The spike benchmark.
#[derive(Parser)]
struct Args {
    /// Trials per mode and workload.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// The memory limit (and cgroup hard limit), MiB.
    #[arg(long, default_value_t = 2048)]
    limit_mib: u64,
    /// Workloads, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "spike,matmul,sparse,mix"
    )]
    workloads: Vec<Workload>,
    /// Skip real Dask (amm modes only).
    #[arg(long)]
    no_dask: bool,
    /// Where the per-trial JSON lines go.
    #[arg(long, default_value = "target/bench-spike.jsonl")]
    out: PathBuf,
    /// Give a trial up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Keep each amm-worker's timeline in this directory.
    #[arg(long, value_name = "DIR")]
    keep_timelines: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !amm_agent::probe::is_root() {
        bail!("the spike benchmark creates cgroups and loads BPF: run it as root");
    }
    remove_stale_cgroups()?;
    let scratch = tempfile::tempdir()?;
    let socket = scratch.path().join("agent.sock");
    let _agent = start_agent(&socket, Stdio::inherit())?;
    let limit = args.limit_mib << 20;
    let dask = if args.no_dask {
        None
    } else {
        let venv = DaskVenv::find()?;
        Some(DaskRunner::new(
            venv,
            Some(target_dir().join("bpf/amm.bpf.o")),
        )?)
    };
    let out = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let timeout = Duration::from_secs(args.timeout_s);
    if let Some(k) = &args.keep_timelines {
        std::fs::create_dir_all(k).with_context(|| format!("cannot create {}", k.display()))?;
    }
    let mut bench = Bench {
        args: &args,
        limit,
        socket,
        scratch: scratch.path(),
        timeout,
        out,
        samples: Vec::new(),
        spill_reactions: Vec::new(),
    };
    let modes = AmmMode::ALL.len() + usize::from(dask.is_some());
    for t in 0..args.trials {
        for w in &args.workloads {
            // rotate the order so no mode always runs first
            for k in 0..modes {
                let m = (k + t) % modes;
                if let Some(mode) = AmmMode::ALL.get(m).copied() {
                    bench.amm_trial(t, *w, mode)?;
                } else if let Some(runner) = &dask {
                    bench.dask_trial(runner, t, *w)?;
                }
            }
        }
    }
    print_tables(&args, bench.samples, bench.spill_reactions);
    Ok(())
}

/// Removes the cgroups an earlier run left behind.
fn remove_stale_cgroups() -> Result<()> {
    for purpose in ["spike-amm", "dask"] {
        let stale = HardLimit::remove_stale(purpose)?;
        if stale > 0 {
            writeln!(
                std::io::stderr(),
                "removed {stale} {purpose} cgroup(s) an earlier run left behind"
            )?;
        }
    }
    Ok(())
}

/// One row's spill reactions: the row, the reactions (ms), rises with no
/// reaction, rises with nothing to spill.
type SpillReactions = (String, Vec<f64>, u32, u32);

/// A run in progress: where trials go and what they gave so far.
struct Bench<'a> {
    args: &'a Args,
    limit: u64,
    socket: PathBuf,
    scratch: &'a Path,
    timeout: Duration,
    out: std::fs::File,
    samples: Vec<Sample>,
    spill_reactions: Vec<SpillReactions>,
}

impl Bench<'_> {
    /// Trial `t` of amm-worker in `mode`: written out, its sample and its
    /// spill reactions kept.
    fn amm_trial(&mut self, t: usize, w: Workload, mode: AmmMode) -> Result<()> {
        writeln!(
            std::io::stderr(),
            "trial {}/{} {} / {}",
            t + 1,
            self.args.trials,
            w.name(),
            mode.name()
        )?;
        let trial = run_trial(
            mode,
            w.name(),
            self.limit,
            &self.socket,
            self.scratch,
            self.timeout,
            self.args.keep_timelines.as_deref(),
        )?;
        writeln!(self.out, "{}", serde_json::to_string(&trial)?)?;
        let row = format!("{} / {}", w.name(), mode.name());
        let r: Vec<f64> = trial
            .lives
            .iter()
            .flat_map(|l| l.reactions_ms.iter().copied())
            .collect();
        let missed: u32 = trial.lives.iter().map(|l| l.missed).sum();
        let nothing: u32 = trial.lives.iter().map(|l| l.nothing_to_spill).sum();
        match self.spill_reactions.iter_mut().find(|(k, ..)| *k == row) {
            Some((_, v, m, n)) => {
                v.extend(r);
                *m += missed;
                *n += nothing;
            }
            None => self.spill_reactions.push((row, r, missed, nothing)),
        }
        self.samples.push(trial.sample());
        Ok(())
    }

    /// Trial `t` of real Dask: written out, its sample kept.
    fn dask_trial(&mut self, runner: &DaskRunner, t: usize, w: Workload) -> Result<()> {
        writeln!(
            std::io::stderr(),
            "trial {}/{} {} / real Dask",
            t + 1,
            self.args.trials,
            w.name()
        )?;
        let r = runner.run_trial(&TrialConfig {
            mode: amm_benches::dask::Mode::Plain,
            spill: None,
            workload: w,
            limit_bytes: self.limit,
            poll_ms: None,
            seed: t as u64 + 1,
            timeout: self.timeout,
            variant: None,
        })?;
        writeln!(self.out, "{}", serde_json::to_string(&r)?)?;
        let mut sample = Sample::from(&r);
        sample.row = format!("{} / real Dask 2026.8.0 (poll 100 ms)", w.name());
        self.samples.push(sample);
        Ok(())
    }
}

/// The spike table and the spill-reaction table.
fn print_tables(args: &Args, mut samples: Vec<Sample>, spill_reactions: Vec<SpillReactions>) {
    println!(
        "spike benchmark: limit {} MiB (= the worker's cgroup hard limit), {} trials per mode and workload, interleaved; kernel {}",
        args.limit_mib,
        args.trials,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!();
    // rows grouped by workload
    samples.sort_by_key(|s| {
        args.workloads
            .iter()
            .position(|w| s.row.starts_with(w.name()))
            .unwrap_or(usize::MAX)
    });
    print!("{}", spike_table::markdown(&samples));
    println!();
    println!(
        "amm-worker only: for each rise past spill (70 %) from below target, the time from the kernel's crossing to the worker's first reaction to process memory (a spill, a pause, a terminate, or its decision that no value was left to spill; 0 when the kernel killed it at the terminate page)"
    );
    println!();
    println!(
        "| workload / mode | reaction ms, median / p99 (n) | of which nothing to spill | rises with no reaction |"
    );
    println!("| --- | --- | --- | --- |");
    for (row, mut v, missed, nothing) in spill_reactions {
        let n = v.len();
        let cell = if v.is_empty() {
            "- (0)".to_string()
        } else {
            let (m, p99, _) = percentiles(&mut v);
            format!("{m:.1} / {p99:.1} ({n})")
        };
        println!("| {row} | {cell} | {nothing} | {missed} |");
    }
}
