//! `cargo xtask bench preload`: the preload libraries against plain glibc
//! and Debian's libjemalloc, side by side in one run.
//!
//! - `malloc`: a malloc-heavy C program (`benches/c/mallocbench.c`): wall
//!   time, peak RSS, RSS with the blocks live, right after freeing them and
//!   after idling.
//! - `python`: the Dask trial's churn jobs (`benches/python/churn.py`:
//!   numpy small arrays, dicts/strings, pandas string groupby): work time,
//!   peak, RSS held, after release, after idling, after a trim or purge;
//!   with and without `PYTHONMALLOC=malloc`.
//! - `publisher`: what publishing costs (the publishing thread's CPU) and
//!   how old a reader finds the record, idle and busy, on both libraries,
//!   and `mallinfo2` on a fragmented glibc heap.
//!
//! Modes are interleaved trial by trial after one warm-up round; every
//! table gives medians and the ratio to the first mode (plain glibc).

use std::path::PathBuf;

use amm_benches::preload_bench::{self, Libs};
use anyhow::Result;
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "preload libraries vs glibc and Debian's libjemalloc")]
struct Args {
    /// Which parts: malloc, python, publisher (comma-separated) or all.
    #[arg(long, default_value = "all")]
    parts: String,
    /// Trials per mode of the malloc benchmark (after a warm-up).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Trials per mode and job of the Python churn.
    #[arg(long, default_value_t = 2)]
    py_trials: usize,
    /// Seconds the churn jobs idle after releasing their results.
    #[arg(long, default_value_t = 15)]
    idle_secs: u64,
    /// Only these modes (comma-separated names as printed), default all.
    #[arg(long)]
    modes: Option<String>,
    /// Python with numpy and pandas (default: $AMM_PYTHON, then
    /// target/venv/bin/python from `cargo xtask venv`).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Where the preload libraries are (default: beside this binary).
    #[arg(long)]
    lib_dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let libs = Libs::find(a.lib_dir.as_deref())?;
    let only: Option<Vec<String>> = a.modes.map(|m| m.split(',').map(str::to_string).collect());
    let wants = |p: &str| a.parts == "all" || a.parts.split(',').any(|x| x == p);
    println!("{}", preload_bench::machine_line());
    if wants("malloc") {
        preload_bench::malloc_part(&libs, a.trials, only.as_deref())?;
    }
    if wants("python") {
        let py = preload_bench::python(a.python)?;
        preload_bench::python_part(&libs, &py, a.py_trials, a.idle_secs, only.as_deref())?;
    }
    if wants("publisher") {
        let py = preload_bench::python(None).ok();
        preload_bench::publisher_part(&libs, py.as_deref())?;
    }
    Ok(())
}
