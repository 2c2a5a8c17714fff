//! `cargo xtask venv`: the project's Python environment, `target/venv`.
//!
//! Created with `python3 -m venv` and filled from the pinned
//! `worker/dask/requirements-test.txt` (every package pinned, transitive
//! ones included), then `amm-dask` itself is built (maturin, through pip)
//! and installed into it. Reused when the requirements did not change; the
//! package is rebuilt every time (cargo's incremental build makes that a
//! few seconds when nothing changed). Tests and benchmarks find its Python
//! at `$AMM_PYTHON` or `<workspace>/target/venv/bin/python`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::build_ebpf::workspace_root;

/// The pinned requirements, relative to the workspace root.
pub const REQUIREMENTS: &str = "worker/dask/requirements-test.txt";

/// The package `amm-dask`, relative to the workspace root.
pub const PACKAGE: &str = "worker/dask";

/// The venv's directory.
pub fn dir() -> PathBuf {
    workspace_root().join("target").join("venv")
}

const PYTHON_HINT: &str = "install Python 3.11+ with venv support \
     (Debian: apt-get install -y python3 python3-venv python3-pip)";

fn run(cmd: &mut Command, what: &str, hint: &str) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown}: {hint}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {hint}");
    }
    Ok(())
}

/// Creates (or reuses) `target/venv`, installs the pinned requirements and
/// then amm-dask. Returns the venv's Python.
pub fn ensure() -> Result<PathBuf> {
    let root = workspace_root();
    let dir = dir();
    let python = dir.join("bin").join("python");
    if !python.exists() {
        println!("creating the Python venv {}", dir.display());
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&dir),
            "python3 -m venv",
            &format!("{PYTHON_HINT}, then remove {} and retry", dir.display()),
        )?;
    }
    install_requirements(&root, &dir, &python)?;
    install_package(&root, &python)?;
    Ok(python)
}

/// `pip install -r requirements-test.txt`, skipped when the venv already
/// holds exactly these pins (a marker file keeps what was installed).
fn install_requirements(root: &Path, dir: &Path, python: &Path) -> Result<()> {
    let req = root.join(REQUIREMENTS);
    let wanted =
        fs::read_to_string(&req).with_context(|| format!("cannot read {}", req.display()))?;
    let marker = dir.join("amm-requirements.txt");
    if fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        println!("the venv {} has {REQUIREMENTS} already", dir.display());
        return Ok(());
    }
    println!("installing {REQUIREMENTS} into {}", dir.display());
    run(
        Command::new(python)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(["--no-input", "-r"])
            .arg(&req),
        "pip install -r requirements-test.txt",
        "check that PyPI is reachable (proxy settings, pip.conf)",
    )?;
    fs::write(&marker, wanted).with_context(|| format!("cannot write {}", marker.display()))
}

/// Builds amm-dask's Rust core with maturin (pip's in-tree build, using
/// the venv's pinned maturin) and installs the package.
fn install_package(root: &Path, python: &Path) -> Result<()> {
    let pkg = root.join(PACKAGE);
    if !pkg.join("pyproject.toml").exists() {
        return Ok(());
    }
    println!("building and installing amm-dask ({PACKAGE}) into the venv");
    // maturin's PEP 517 hooks run the `maturin` binary: the venv's, first
    let bin = python.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .context("cannot build PATH for maturin")?;
    run(
        Command::new(python)
            .env("PATH", path)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args([
                "--no-input",
                "--no-deps",
                "--no-build-isolation",
                "--force-reinstall",
            ])
            .arg(&pkg)
            .current_dir(root),
        "pip install ./worker/dask",
        "the Rust build of amm-dask failed: see cargo's output above",
    )
}
