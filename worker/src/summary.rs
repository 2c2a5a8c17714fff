//! The JSON summary a run prints on stdout (one line), and the exit codes.
//!
//! | exit code | meaning |
//! | --- | --- |
//! | 0 | the workload finished and every result check passed |
//! | 1 | an error before or outside the workload (bad flag, config, limit) |
//! | 2 | command-line usage error |
//! | 3 | the workload finished but a check failed or a task failed |
//! | 75 | the worker hit the terminate threshold ([`crate::memory::TERMINATE_EXIT_CODE`]) |
//! | 76 | the nanny gave up after `--max-restarts` restarts ([`NANNY_GAVE_UP`]) |
//! | 78 | the worker refused to start: its spill directory is unsafe or unusable ([`REFUSED`]); the nanny does not restart it |
//! | 128 + N | stopped by signal N (SIGINT, SIGTERM), after cleaning up |

use serde::Serialize;

use crate::workload::Check;

/// Exit code: a check failed.
pub const RESULT_FAILED: i32 = 3;
/// Exit code of a nanny that gave up restarting its worker.
pub const NANNY_GAVE_UP: i32 = 76;
/// Exit code of a worker that refused to start because restarting it
/// cannot help (sysexits' `EX_CONFIG`): the nanny stops there.
pub const REFUSED: i32 = 78;

/// An error that makes the worker exit with [`REFUSED`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The run's summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Workload name.
    pub workload: String,
    /// Worker name (spill directory `amm-spill-<name>`).
    pub name: String,
    /// `jemalloc` or `system`.
    pub allocator: String,
    /// The allocator check at start-up passed (see `alloc::verify_serving`).
    pub allocator_verified: bool,
    /// Task threads.
    pub nthreads: usize,
    /// Peak RSS (`VmHWM`: exact, spikes between polls included).
    pub peak_rss_bytes: u64,
    /// The effective limit (`null`: none).
    pub limit_bytes: Option<u64>,
    /// Where the limit came from.
    pub limit_source: String,
    /// Bytes (`sizeof`) moved to disk.
    pub spilled_bytes_total: u64,
    /// Values written to disk.
    pub spill_count: u64,
    /// Bytes written to spill files.
    pub written_bytes_total: u64,
    /// Bytes read back.
    pub unspilled_bytes_total: u64,
    /// Values read back.
    pub unspill_count: u64,
    /// Evictions that failed.
    pub spill_failures: u64,
    /// Time spent paused.
    pub paused_ms: u64,
    /// Times paused.
    pub pauses: u64,
    /// Purges/trims (threshold, pressure and workload ones).
    pub purge_count: u64,
    /// Bytes they gave back (RSS drop).
    pub purged_bytes_total: u64,
    /// Terminations (this worker: 0 or 1; the nanny's summary: all attempts).
    pub terminations: u32,
    /// Restarts by the nanny.
    pub restarts: u32,
    /// Attempts that crashed (signal or unexpected exit), counted by the nanny.
    pub crashes: u32,
    /// Every check passed and no task failed.
    pub result_ok: bool,
    /// The result checks.
    pub checks: Vec<Check>,
    /// Errors of failed operations (or why the run stopped).
    pub errors: Vec<String>,
    /// Wall time of the run.
    pub wall_ms: u64,
    /// Tasks run.
    pub tasks: u64,
    /// Monitor ticks.
    pub ticks: u64,
    /// Largest |process - (managed + unmanaged_live + hoarded + non_heap)|
    /// over the ticks.
    pub max_identity_error_bytes: u64,
    /// The exit code this worker ends with.
    pub exit_code: i32,
    /// Kernel events received from amm-agent (0 without `--agent`).
    pub agent_events: u64,
    /// Registrations with amm-agent (more than 1: it came back after an
    /// outage).
    pub agent_connects: u64,
    /// amm-agent outages seen.
    pub agent_lost: u64,
    /// The effective memory configuration (after file, env and flags).
    pub memory_config: Option<crate::config::MemoryConfig>,
    /// `MALLOC_TRIM_THRESHOLD_` as this worker's environment had it.
    pub malloc_trim_threshold_env: Option<String>,
}

impl Summary {
    /// Prints the summary as one JSON line on stdout and flushes.
    pub fn print(&self) {
        use std::io::Write;
        let line = serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}
