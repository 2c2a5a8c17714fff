//! Bundles the jemalloc preload library into the wheel.
//!
//! With the `bundle-preload` feature (pyproject.toml sets it, so only a
//! maturin build of the wheel has it; workspace builds do not), this builds
//! `amm-preload` in release with a nested cargo, in a target directory of
//! its own under `OUT_DIR` (the outer cargo holds the workspace's), and
//! copies `libamm_preload.so` into `python/amm_dask/`, the package directory
//! maturin packs after the extension is built. The nanny plugin finds it
//! there (`amm_dask.nanny.find_preload_library`), so one `pip install
//! ./worker/dask` puts Dask workers on jemalloc, as amm's workers are unless
//! told otherwise. The copy is git-ignored: it is a build product.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The library's file name, as the nanny plugin looks for it.
const LIBRARY: &str = "libamm_preload.so";

/// The workspace directories whose sources go into the library.
const SOURCES: &[&str] = &[
    "worker/preload",
    "worker/alloc",
    "worker/shared/record",
    "worker/shared/timeline",
];

fn main() -> Result<(), String> {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_BUNDLE_PRELOAD").is_none() {
        return Ok(());
    }
    let manifest = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .ancestors()
        .nth(2)
        .ok_or("amm-dask is not at worker/dask inside the amm workspace")?;
    for dir in SOURCES.iter().chain(&["Cargo.toml", "Cargo.lock"]) {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let target = PathBuf::from(var("OUT_DIR")?).join("preload-target");
    build(root, &target)?;
    let built = target.join("release").join(LIBRARY);
    let dest = manifest.join("python").join("amm_dask").join(LIBRARY);
    install(&built, &dest)
}

/// An environment variable cargo sets for every build script.
fn var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|e| format!("{name}: {e} (run this through cargo)"))
}

/// `cargo build --release -p amm-preload` into `target`.
fn build(root: &Path, target: &Path) -> Result<(), String> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--locked", "-p", "amm-preload"])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target)
        // the outer build's target directory and profile are not ours
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("PROFILE")
        // a preloaded library is shipped: symbols for backtraces, no debug info
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .status()
        .map_err(|e| format!("cannot run cargo to build {LIBRARY}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building {LIBRARY} for the wheel failed ({status}): see cargo's output above; \
             build without the bundle-preload feature to skip it"
        ));
    }
    Ok(())
}

/// Copies `built` to `dest` through a temporary file and a rename, so a
/// packer never sees half a library.
fn install(built: &Path, dest: &Path) -> Result<(), String> {
    let tmp = dest.with_extension("so.tmp");
    fs::copy(built, &tmp)
        .and_then(|_| fs::rename(&tmp, dest))
        .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), dest.display()))
}
