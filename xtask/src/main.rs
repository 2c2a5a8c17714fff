//! `cargo xtask`: the project's automation, in Rust so it needs nothing but
//! cargo (the rust-analyzer pattern). Run `cargo xtask --help`.

mod build_ebpf;
mod run;
mod venv;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "amm's build and test automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile ebpf/c/amm.bpf.c with clang into target/bpf/amm.bpf.o.
    BuildEbpf,
    /// Build the BPF object, every binary and the preload libraries
    /// (target/debug/libamm_preload.so, libamm_preload_glibc.so).
    Build {
        /// Build in release (target/release).
        #[arg(long)]
        release: bool,
    },
    /// Create or reuse the Python venv (target/venv) from the pinned
    /// worker/dask/requirements-test.txt and install amm-dask into it.
    Venv,
    /// Build the BPF object, every binary and the Python venv, then run the
    /// whole test suite (as root, the BPF tests run against the real kernel).
    Test {
        /// Extra arguments passed to `cargo test` (after `--` goes to the harness).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The end-to-end demo (as root): the same worker polling and on
    /// amm-agent's events, under a hard cgroup limit; `--dashboard` also
    /// shows it on the agent's live page and saves a screenshot.
    Demo {
        /// Serve the live page, open it in headless Chromium, save
        /// target/demo-dashboard.png.
        #[arg(long)]
        dashboard: bool,
        /// Extra arguments for the demo (`--runs 20`, `--limit-mib 512`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark from benches/ (release build): `overhead`, `latency`,
    /// `spike`, `spike-dask`, `dask`, `preload` or `dashboard`.
    Bench {
        /// Which benchmark.
        name: String,
        /// Extra arguments for the benchmark.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::BuildEbpf => build_ebpf::build().map(|path| {
            println!("{}", path.display());
        }),
        Command::Build { release } => run::build_all(release),
        Command::Venv => venv::ensure().map(|python| {
            println!("{}", python.display());
        }),
        Command::Test { args } => run::test(&args),
        Command::Demo { dashboard, args } => run::demo(dashboard, &args),
        Command::Bench { name, args } => run::bench(&name, &args),
    }
}
