//! The Rust core of `amm_dask` (the Python package at `worker/dask/`):
//! what a Dask worker needs from amm at native speed, without the GIL and
//! without the event loop in the way.
//!
//! - [`link`]: the worker's registration with amm-agent
//!   ([`amm_protocol::link::Link`]: direct ring buffer, re-registration
//!   after agent restarts), kernel events queued for the event loop behind a
//!   wake-up fd, the accounting pushed to the agent's timeline;
//! - [`gate`]: the pause gate in front of Dask's executor, closed by the
//!   link thread the moment the kernel's event arrives;
//! - [`heap`]: the process's own allocator statistics (jemalloc through its
//!   `mallctl`, glibc through `mallinfo2`) and purge/trim;
//! - [`verdict`]: the leak/hoard verdict (`amm-report`) of the worker's own
//!   accounting, for its log and metrics;
//! - [`running`]: the running-tasks file's write, whole and off the GIL;
//! - [`story`]: what the agent saw of a dead worker (for the nanny's
//!   KilledWorker story).
//!
//! It never signals a process and needs no privileges: the agent decides,
//! and the kernel kills at the terminate page.

use pyo3::prelude::*;

pub mod gate;
pub mod heap;
pub mod link;
pub mod running;
pub mod story;
pub mod verdict;

/// The extension module `amm_dask._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<link::AgentLink>()?;
    m.add_class::<verdict::Verdicts>()?;
    m.add_function(wrap_pyfunction!(gate::gate_wait, m)?)?;
    m.add_function(wrap_pyfunction!(gate::gate_close, m)?)?;
    m.add_function(wrap_pyfunction!(gate::gate_open, m)?)?;
    m.add_function(wrap_pyfunction!(gate::gate_state, m)?)?;
    m.add_function(wrap_pyfunction!(gate::gate_levels, m)?)?;
    m.add_function(wrap_pyfunction!(gate::rss_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(heap::heap_stats, m)?)?;
    m.add_function(wrap_pyfunction!(heap::release_hoard, m)?)?;
    m.add_function(wrap_pyfunction!(heap::preload_threshold_purges, m)?)?;
    m.add_function(wrap_pyfunction!(story::kill_story, m)?)?;
    m.add_function(wrap_pyfunction!(running::replace_file, m)?)?;
    m.add_function(wrap_pyfunction!(monotonic_ns, m)?)?;
    m.add_function(wrap_pyfunction!(memory_backed_fs, m)?)?;
    Ok(())
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's event stamps.
#[pyfunction]
pub fn monotonic_ns() -> u64 {
    amm_timeline::monotonic_ns()
}

/// `"tmpfs"` or `"ramfs"` when the directory `path` is on a file system
/// held in memory (where spilled data is charged to the writer's cgroup and
/// frees nothing), else `None`; `None` too when it is not a directory it
/// can open. Opened `O_DIRECTORY | O_NONBLOCK`: a FIFO planted at the path
/// is refused, never waited on.
#[pyfunction]
pub fn memory_backed_fs(path: &str) -> Option<&'static str> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    amm_cgroup::memory_backed_fs(&dir)
}
