//! Shared pieces of amm's scenario benchmarks: statistics, pinning, and
//! finding the built binaries. Children that touch memory on command are
//! the tests' `amm-fault` (see `amm_integration_tests::Faulter`).
//!
//! [`amm_trial`] and [`dask`] run one trial of the spike benchmark for
//! amm-worker and for real Dask; [`spike_table`] turns trials into its
//! Markdown table.

pub mod dask;
pub mod spike_table;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod amm_trial;

pub use amm_integration_tests::Faulter;
pub use amm_integration_tests::region::Region;

/// The directory holding this binary (`target/<profile>`).
pub fn profile_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// CLOCK_MONOTONIC now, in ns (the clock of the kernel's event stamps).
pub fn monotonic_ns() -> u64 {
    amm_agent::server::monotonic_ns()
}

/// Pins the calling thread to one CPU (less noise on a small VM).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Median, p99 and max of a sample (sorted in place). Empty → zeros.
pub fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// Sleeps a little between trials so each starts from quiet.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(20));
}
