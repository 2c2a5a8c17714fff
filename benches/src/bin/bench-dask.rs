//! `cargo xtask bench dask`: plain Dask against Dask + amm_dask (on glibc,
//! and on amm's jemalloc preload), same cluster shape, same cgroups, in one
//! run: a single-task spike past 95 %, managed data plus spikes (mix), the
//! single-cell-like sparse pipeline, and churn-then-release; and `spill`
//! (managed data past the spill threshold while tasks keep running), where
//! `--spill incremental,thread` sets amm_dask's two spill modes side by side
//! (the second table: event-loop stalls, spill → under target, throughput).
//!
//! Each trial is `benches/dask/spike_trial.py` (one nanny-managed worker in
//! its own hard-limited cgroup, watched by `amm-agent watch`); the amm modes
//! add amm_dask's plugins registered with one `amm-agent run` started here.
//! Trials are interleaved round by round (workload, then mode and spill mode) after a
//! warm-up; the Markdown table goes to stdout, one JSON line per trial to
//! `--out`, each trial's Dask log to `<out>.logs/`. Needs root.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amm_benches::dask::{
    AmmVariant, DaskRunner, DaskVenv, Mode, SpillMode, TrialConfig, TrialResult, Workload,
    handle_stop_signals,
};
use amm_benches::dask_rounds::{Rounds, error_line, percent, read_results, wall};
use amm_benches::{dask_table, start_agent, target_dir};
use amm_integration_tests::cgroup::HardLimit;
use anyhow::{Result, bail};
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
    /// amm_dask's spill modes, comma-separated: each amm mode runs once per
    /// spill mode, alternated within every round (plain runs once).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "incremental")]
    spill: Vec<SpillMode>,
    /// A variant of amm_dask's settings, `NAME:KEY=VALUE[;KEY=VALUE...]`
    /// (keys of its `amm:` config, values in YAML, e.g.
    /// `no-gate:gate=false`); repeatable. Each amm mode and spill mode runs
    /// once with the defaults and once per variant, in every round.
    #[arg(long = "variant", value_name = "NAME:KEY=VALUE")]
    variants: Vec<AmmVariant>,
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
    /// The trial script (default: benches/dask/spike_trial.py of this
    /// checkout; give a copy to keep a long run safe from edits and rebases).
    #[arg(long)]
    trial_script: Option<PathBuf>,
    /// Print the table of the trials in this JSON-lines file and exit.
    #[arg(long, value_name = "FILE")]
    table_from: Option<PathBuf>,
}

fn describe(r: &TrialResult) -> String {
    format!(
        "{:<6} {:<12} {:<11} {} seed {:<3} {:<20} completed {:<5} restarts {} peak {} wall {} unmanaged after {} loop max {}{}",
        r.workload.name(),
        r.mode.name(),
        r.spill.map_or("", SpillMode::name),
        r.variant.as_deref().unwrap_or(""),
        r.seed,
        r.outcome.name(),
        r.completed,
        r.worker_restarts,
        percent(r.peak_fraction),
        wall(r),
        r.unmanaged_after_release_bytes
            .map_or_else(|| "-".into(), |b| format!("{} MiB", b >> 20)),
        r.loop_lag_max_ms
            .map_or_else(|| "-".into(), |ms| format!("{ms:.0} ms")),
        error_line(r),
    )
}

/// The table of the trials an earlier run wrote.
fn table_from(path: &std::path::Path) -> Result<String> {
    Ok(dask_table::markdown(&read_results(path)?))
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
    if let Some(script) = &args.trial_script {
        runner.script = script.clone();
    }
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

/// One cell of a round: mode, spill mode, settings variant.
type Variant = (Mode, Option<SpillMode>, Option<AmmVariant>);

fn config(
    args: &Args,
    workload: Workload,
    (mode, spill, variant): Variant,
    seed: u64,
) -> TrialConfig {
    TrialConfig {
        mode,
        spill,
        workload,
        limit_bytes: args.limit,
        poll_ms: None,
        seed,
        timeout: Duration::from_secs(args.timeout_s),
        variant,
    }
}

/// What a round runs per workload: plain once, each amm mode once per
/// spill mode and settings variant (alternated).
fn variants(args: &Args) -> Vec<Variant> {
    let settings: Vec<Option<AmmVariant>> = std::iter::once(None)
        .chain(args.variants.iter().cloned().map(Some))
        .collect();
    args.modes
        .iter()
        .flat_map(|&m| match m {
            Mode::Plain => vec![(m, None, None)],
            _ => args
                .spill
                .iter()
                .flat_map(|&s| settings.iter().map(move |v| (m, Some(s), v.clone())))
                .collect(),
        })
        .collect()
}

/// The warm-up trials and the measured rounds.
fn plan(args: &Args) -> (Vec<TrialConfig>, Vec<Vec<TrialConfig>>) {
    let variants = variants(args);
    let warmup = (0..args.warmup)
        .map(|i| {
            let w = args.workloads[i % args.workloads.len()];
            config(args, w, variants[i % variants.len()].clone(), args.seed)
        })
        .collect();
    let rounds = (0..args.trials)
        .map(|round| {
            let seed = args.seed + round as u64;
            args.workloads
                .iter()
                .flat_map(|&w| variants.iter().map(move |v| (w, v.clone())))
                .map(|(w, v)| config(args, w, v, seed))
                .collect()
        })
        .collect();
    (warmup, rounds)
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
    let agent = start_agent(&socket, Stdio::inherit())?;
    let mut runner = runner(&args, socket)?;
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-dask.jsonl"));
    runner.log_dir = Some(out_path.with_extension("logs"));
    let (warmup, rounds) = plan(&args);
    let results = Rounds {
        runner: &runner,
        warmup,
        rounds,
        stop: &stop,
        describe,
    }
    .run(&out_path)?;
    print!("{}", dask_table::markdown(&results));
    // stopped before exit: exit() skips destructors
    drop(agent);
    if stop.load(Ordering::SeqCst) {
        std::process::exit(130);
    }
    Ok(())
}
