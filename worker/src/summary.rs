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

/// The run's summary (the timeline contract's type, so the nanny reads the
/// worker's and completes it without string keys).
pub use amm_timeline::Summary;

/// Prints `summary` as one JSON line on stdout and flushes.
pub fn print(summary: &Summary) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", summary.to_json());
    let _ = out.flush();
}
