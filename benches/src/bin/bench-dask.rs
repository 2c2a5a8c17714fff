//! `cargo xtask bench dask`: plain Dask against Dask + amm_dask (on glibc,
//! and on amm's jemalloc preload), same cluster shape, same cgroups, in one
//! run: a single-task spike past 95 %, managed data plus spikes (mix), the
//! single-cell-like sparse pipeline, and churn-then-release.
//!
//! Each trial is `benches/dask/spike_trial.py` (one nanny-managed worker in
//! its own hard-limited cgroup, watched by `amm-agent watch`); the amm modes
//! add amm_dask's plugins registered with one `amm-agent run` started here.
//! Trials are interleaved round by round (workload, then mode) after a
//! warm-up; the Markdown table goes to stdout, one JSON line per trial to
//! `--out`, each trial's Dask log to `<out>.logs/`. Needs root.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amm_benches::dask::{
    DaskRunner, DaskVenv, Mode, TrialConfig, TrialResult, Workload, handle_stop_signals,
};
use amm_benches::{dask_table, start_agent, target_dir};
use amm_integration_tests::cgroup::HardLimit;
use anyhow::{Context, Result, bail};
use clap::Parser;

/// Plain Dask against Dask + amm_dask.
#[derive(Parser)]
struct Args {
    /// Trials per workload and mode.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// The worker's memory limit (Dask's memory_limit and the cgroup's hard
    /// limit).
    #[arg(long, default_value = "2GiB", value_parser = amm_agent::cli::parse_size)]
    limit: u64,
    /// Workloads, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "spike,mix,sparse,churn"
    )]
    workloads: Vec<Workload>,
    /// Modes, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain,amm,amm-jemalloc"
    )]
    modes: Vec<Mode>,
    /// Warm-up trials before the measured ones (not recorded).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// A trial's workload gives up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Seed of the first round (round r uses seed + r).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Raw per-trial JSON lines (default: target/bench-dask.jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The Python with Dask and amm_dask (default: $AMM_PYTHON, else
    /// target/venv, made by `cargo xtask venv`).
    #[arg(long)]
    python: Option<PathBuf>,
    /// amm's jemalloc preload for the amm-jemalloc mode (default:
    /// target/release/libamm_preload.so).
    #[arg(long)]
    preload_library: Option<PathBuf>,
    /// Print the table of the trials in this JSON-lines file and exit.
    #[arg(long, value_name = "FILE")]
    table_from: Option<PathBuf>,
}

fn describe(r: &TrialResult) -> String {
    let pct = |f: Option<f64>| f.map_or_else(|| "?".into(), |f| format!("{:.1}%", f * 100.0));
    format!(
        "{:<6} {:<12} seed {:<3} {:<20} completed {:<5} restarts {} peak {} wall {} unmanaged after {}{}",
        r.workload.name(),
        r.mode.name(),
        r.seed,
        r.outcome.name(),
        r.completed,
        r.worker_restarts,
        pct(r.peak_fraction),
        r.wall_ms
            .map_or_else(|| "-".into(), |ms| format!("{:.1} s", ms / 1000.0)),
        r.unmanaged_after_release_bytes
            .map_or_else(|| "-".into(), |b| format!("{} MiB", b >> 20)),
        r.error
            .as_deref()
            .map(|e| format!("\n       error: {}", e.lines().next().unwrap_or("")))
            .unwrap_or_default(),
    )
}

fn table_from(path: &std::path::Path) -> Result<String> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut results = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        results.push(
            serde_json::from_str::<TrialResult>(line).with_context(|| {
                format!("{} line {}: not a trial result", path.display(), i + 1)
            })?,
        );
    }
    Ok(dask_table::markdown(&results))
}

fn runner(args: &Args, socket: PathBuf) -> Result<DaskRunner> {
    let venv = match &args.python {
        Some(python) => DaskVenv {
            python: python.clone(),
        },
        None => DaskVenv::find()?,
    };
    let mut runner = DaskRunner::new(venv, Some(target_dir().join("bpf/amm.bpf.o")))?;
    runner.agent_socket = Some(socket);
    let lib = args
        .preload_library
        .clone()
        .unwrap_or_else(|| target_dir().join("release/libamm_preload.so"));
    if args.modes.contains(&Mode::AmmJemalloc) && !lib.exists() {
        bail!(
            "{} is missing: build amm's preload (`cargo build --release -p amm-preload`), give \
             --preload-library, or leave the mode out (--modes plain,amm)",
            lib.display()
        );
    }
    runner.preload_library = Some(lib);
    Ok(runner)
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
    let scratch = tempfile::tempdir()?;
    let socket = scratch.path().join("agent.sock");
    let _agent = start_agent(&socket, Stdio::inherit())?;
    let mut runner = runner(&args, socket)?;
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-dask.jsonl"));
    runner.log_dir = Some(out_path.with_extension("logs"));
    let mut out = fs::File::create(&out_path)
        .with_context(|| format!("cannot create {}", out_path.display()))?;
    let config = |workload, mode, seed| TrialConfig {
        mode,
        workload,
        limit_bytes: args.limit,
        poll_ms: None,
        seed,
        timeout: Duration::from_secs(args.timeout_s),
    };
    let started = Instant::now();
    for i in 0..args.warmup {
        let w = args.workloads[i % args.workloads.len()];
        let m = args.modes[i % args.modes.len()];
        let r = runner.run_trial(&config(w, m, args.seed))?;
        writeln!(err, "warm-up  {}", describe(&r))?;
    }
    let mut results = Vec::new();
    'rounds: for round in 0..args.trials {
        for &w in &args.workloads {
            for &m in &args.modes {
                let seed = args.seed + round as u64;
                let r = runner
                    .run_trial(&config(w, m, seed))
                    .with_context(|| format!("trial {round} of {} {}", w.name(), m.name()))?;
                if stop.load(Ordering::SeqCst) {
                    writeln!(err, "interrupted: the table has the trials that completed")?;
                    break 'rounds;
                }
                writeln!(err, "trial {round:<2} {}", describe(&r))?;
                serde_json::to_writer(&mut out, &r)?;
                writeln!(out)?;
                out.flush()?;
                results.push(r);
            }
        }
    }
    writeln!(
        err,
        "{} trials in {:.0} s; raw results in {}",
        results.len(),
        started.elapsed().as_secs_f64(),
        out_path.display()
    )?;
    print!("{}", dask_table::markdown(&results));
    if stop.load(Ordering::SeqCst) {
        std::process::exit(130);
    }
    Ok(())
}
