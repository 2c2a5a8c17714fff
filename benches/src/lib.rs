//! Shared pieces of amm's scenario benchmarks: statistics, pinning, and
//! finding the built binaries. Children that touch memory on command are
//! the tests' `amm-fault` (see `amm_integration_tests::Faulter`).
//!
//! [`amm_trial`] and [`dask`] run one trial of the spike benchmark for
//! amm-worker and for real Dask; [`spike_table`] turns trials into its
//! Markdown table; [`dask_table`] the table of `bench-dask` (plain Dask
//! against Dask + amm_dask).

pub mod dask;
pub mod dask_rounds;
pub mod dask_table;
pub mod preload_bench;
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

/// A running `amm-agent run` (release build), stopped with SIGTERM and
/// waited for when dropped.
#[derive(Debug)]
pub struct AgentProc(std::process::Child);

impl AgentProc {
    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Starts `amm-agent run` on `socket` with the workspace's BPF object and
/// waits (at most 20 s) until it accepts connections; its log (warnings
/// only) goes to `stderr`.
pub fn start_agent(socket: &Path, stderr: std::process::Stdio) -> anyhow::Result<AgentProc> {
    start_agent_with(socket, &[], stderr)
}

/// [`start_agent`] with more `amm-agent run` flags.
pub fn start_agent_with(
    socket: &Path,
    extra: &[&str],
    stderr: std::process::Stdio,
) -> anyhow::Result<AgentProc> {
    spawn_agent(socket, extra, "warn", stderr)
}

/// Like [`start_agent`], with `--http 127.0.0.1:0` (the live page and
/// `/metrics`); its log goes to `log`. Returns its listener (address and
/// the token from the file beside the socket).
pub fn start_agent_http(
    socket: &Path,
    log: &Path,
) -> anyhow::Result<(AgentProc, amm_integration_tests::HttpListener)> {
    use anyhow::Context;
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let args = ["--http", "127.0.0.1:0"];
    let agent = spawn_agent(socket, &args, "warn,amm_agent::http=info", file.into())?;
    let listener = amm_integration_tests::HttpListener::wait(
        || std::fs::read_to_string(log).unwrap_or_default(),
        amm_integration_tests::http::token_file(socket, &args),
    )?;
    Ok((agent, listener))
}

fn spawn_agent(
    socket: &Path,
    extra: &[&str],
    log_filter: &str,
    stderr: std::process::Stdio,
) -> anyhow::Result<AgentProc> {
    use anyhow::Context;
    let mut cmd = std::process::Command::new(profile_dir().join("amm-agent"));
    dask::unblock_signals(&mut cmd);
    let child = cmd
        .arg("run")
        .arg("--socket")
        .arg(socket)
        .arg("--bpf-object")
        .arg(target_dir().join("bpf/amm.bpf.o"))
        .args(extra)
        .env("AMM_LOG", log_filter)
        .stderr(stderr)
        .spawn()
        .context("start amm-agent")?;
    let agent = AgentProc(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(agent);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("amm-agent did not start listening")
}

/// CLOCK_MONOTONIC now, in ns (the clock of the kernel's event stamps).
pub use amm_record::sys::monotonic_ns;

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
