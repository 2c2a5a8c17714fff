//! `cargo xtask build | test | demo | bench`: thin wrappers that build what
//! they need first, so a newcomer's one command works on a fresh checkout.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::build_ebpf::{build, workspace_root};

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Builds the BPF object, every binary and the preload libraries
/// (`libamm_preload.so`, `libamm_preload_glibc.so`), in release or not.
pub fn build_all(release: bool) -> Result<()> {
    build()?;
    let mut b = cargo();
    b.args(["build", "--workspace", "--lib", "--bins"]);
    if release {
        b.arg("--release");
    }
    run(b)
}

/// Builds the object, the binaries, the preload libraries and the Python
/// venv, then runs every test.
pub fn test(args: &[String]) -> Result<()> {
    build_all(false)?;
    crate::venv::ensure()?;
    let mut t = cargo();
    t.args(["test", "--workspace"]).args(args);
    run(t)
}

/// Builds in release and runs the end-to-end demo.
pub fn demo(dashboard: bool, args: &[String]) -> Result<()> {
    build_all(true)?;
    let mut d = cargo();
    d.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "amm-benches",
        "--bin",
        "amm-demo",
        "--",
    ]);
    if dashboard {
        d.arg("--dashboard");
    }
    d.args(args);
    run(d)
}

/// Builds in release (and the Python venv) and runs one benchmark.
pub fn bench(name: &str, args: &[String]) -> Result<()> {
    build_all(true)?;
    crate::venv::ensure()?;
    let mut r = cargo();
    r.args(["run", "--release", "--quiet", "-p", "amm-benches", "--bin"])
        .arg(format!("bench-{name}"))
        .arg("--")
        .args(args);
    run(r)
}
