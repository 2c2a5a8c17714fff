//! The real-Dask baseline of the spike benchmark: real Dask (one
//! nanny-managed worker, Dask's own thresholds and restarts) under a real
//! hard memory limit (a cgroup per worker process), watched by the real
//! eBPF probe (`amm-agent watch`).
//!
//! Runs `--trials` trials of each workload, interleaved round by round after
//! a warm-up, prints the Markdown table on stdout and writes one JSON line
//! per trial (a `TrialResult`) to `--out`. Each trial's full Dask log goes
//! next to it, in `<out>.logs/`. Needs root; build first with
//! `cargo build --release -p amm-agent -p amm-benches && cargo xtask build-ebpf`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amm_benches::dask::{
    DaskRunner, DaskVenv, TrialConfig, TrialResult, Workload, handle_stop_signals,
};
use amm_benches::dask_rounds::{Rounds, error_line, percent, read_results, wall};
use amm_benches::spike_table::{self, Sample};
use amm_benches::target_dir;
use amm_integration_tests::cgroup::HardLimit;
use anyhow::Result;
use clap::Parser;

/// Real-Dask baseline of the spike benchmark.
#[derive(Parser)]
struct Args {
    /// Trials per workload.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// The worker's memory limit (Dask's memory_limit and the cgroup's hard
    /// limit): bytes or a size such as 2GiB.
    #[arg(long, default_value = "2GiB", value_parser = amm_agent::cli::parse_size)]
    limit: u64,
    /// Workloads, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "spike,matmul,sparse,mix"
    )]
    workloads: Vec<Workload>,
    /// Dask's memory monitor interval in ms (default: Dask's own, 100 ms).
    #[arg(long)]
    poll_ms: Option<f64>,
    /// Warm-up trials before the measured ones (not recorded).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// A trial's workload gives up after this many seconds (a normal trial
    /// takes under a minute here).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Seed of the first round (round r uses seed + r).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Raw per-trial JSON lines (default: target/bench-spike-dask.jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The Python with Dask (default: $AMM_PYTHON, else target/venv, made
    /// by `cargo xtask venv`).
    #[arg(long)]
    python: Option<PathBuf>,
    /// BPF object for the watch (default: the agent's own search).
    #[arg(long)]
    bpf_object: Option<PathBuf>,
    /// Run nothing: print the table of the trials in this JSON-lines file
    /// (an earlier `--out`).
    #[arg(long, value_name = "FILE")]
    table_from: Option<PathBuf>,
}

/// The table of the trials an earlier run wrote.
fn table_from(path: &std::path::Path) -> Result<String> {
    let samples: Vec<Sample> = read_results(path)?.iter().map(Sample::from).collect();
    Ok(spike_table::markdown(&samples))
}

fn describe(r: &TrialResult) -> String {
    format!(
        "{:<6} seed {:<3} {:<20} completed {:<5} restarts {} peak {} (cgroup {}) reaction {} wall {}{}",
        r.workload.name(),
        r.seed,
        r.outcome.name(),
        r.completed,
        r.worker_restarts,
        percent(r.peak_fraction),
        percent(r.cgroup_peak_fraction),
        r.reaction_ms
            .map_or_else(|| "-".into(), |ms| format!("{ms:.0} ms")),
        wall(r),
        error_line(r),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.table_from {
        print!("{}", table_from(path)?);
        return Ok(());
    }
    let stop = handle_stop_signals()?;
    let mut err = std::io::stderr();
    let stale = HardLimit::remove_stale("dask")?;
    if stale > 0 {
        writeln!(err, "removed {stale} cgroup(s) an earlier run left behind")?;
    }
    let venv = match &args.python {
        Some(python) => DaskVenv {
            python: python.clone(),
        },
        None => DaskVenv::find()?,
    };
    let mut runner = DaskRunner::new(venv, args.bpf_object.clone())?;
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-spike-dask.jsonl"));
    runner.log_dir = Some(out_path.with_extension("logs"));
    let config = |workload, seed| TrialConfig {
        mode: amm_benches::dask::Mode::Plain,
        spill: None,
        workload,
        limit_bytes: args.limit,
        poll_ms: args.poll_ms,
        seed,
        timeout: Duration::from_secs(args.timeout_s),
        variant: None,
    };
    let warmup = (0..args.warmup)
        .map(|i| config(args.workloads[i % args.workloads.len()], args.seed))
        .collect();
    let rounds = (0..args.trials)
        .map(|round| {
            let seed = args.seed + round as u64;
            args.workloads.iter().map(|&w| config(w, seed)).collect()
        })
        .collect();
    let results = Rounds {
        runner: &runner,
        warmup,
        rounds,
        stop: &stop,
        describe,
    }
    .run(&out_path)?;
    let samples: Vec<Sample> = results.iter().map(Sample::from).collect();
    print!("{}", spike_table::markdown(&samples));
    if stop.load(Ordering::SeqCst) {
        std::process::exit(130);
    }
    Ok(())
}
