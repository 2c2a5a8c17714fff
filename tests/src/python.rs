//! The project's Python (the venv `cargo xtask venv` builds from the pinned
//! `worker/dask/requirements-test.txt`): `$AMM_PYTHON`, else
//! `<workspace>/target/venv/bin/python`. Tests and benchmarks that run real
//! Dask use it; none of them creates a venv of its own.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The environment variable that names another Python.
pub const ENV: &str = "AMM_PYTHON";

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the venv's Python is expected, whether or not it exists.
pub fn expected() -> PathBuf {
    match std::env::var_os(ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/venv/bin/python"),
    }
}

/// The project's Python, or an error that says how to make it.
pub fn find() -> Result<PathBuf> {
    let p = expected();
    if !p.exists() {
        bail!(
            "{} does not exist: build the project's Python venv with `cargo xtask venv` \
             (or point {ENV} at a Python that has worker/dask/requirements-test.txt and amm-dask)",
            p.display()
        );
    }
    Ok(p)
}
