//! The task a reader means: a pid bound to a start time, read through one
//! `/proc/<pid>` directory handle so that a recycled pid cannot slip in
//! between two reads (every later read goes through the same handle, and a
//! handle to a dead task only returns errors).

use std::io;

use procfs::ProcError;
use procfs::process::Process;
use serde::Serialize;

use crate::OpenError;

/// One task: its pid as this reader sees it, its pid inside its own PID
/// namespace (what it wrote into its record), its start time and its uids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    /// The pid in the reader's PID namespace.
    pub pid: i32,
    /// The pid in the task's own (innermost) PID namespace: the last entry
    /// of `NSpid`, which is what `getpid()` returned to the publisher.
    pub ns_pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_time: u64,
    /// Real, effective, saved and filesystem uids.
    pub uids: [u32; 4],
}

impl Task {
    /// The task that has `pid` now.
    pub fn of(pid: i32) -> Result<Task, OpenError> {
        let process = proc_handle(pid)?;
        Task::read(pid, &process)
    }

    /// The calling process.
    pub fn myself() -> Result<Task, OpenError> {
        Task::of(std::process::id() as i32)
    }

    /// Reads the identity through an open `/proc/<pid>` handle.
    pub(crate) fn read(pid: i32, process: &Process) -> Result<Task, OpenError> {
        let stat = process.stat().map_err(|e| proc_error(pid, e))?;
        let status = process.status().map_err(|e| proc_error(pid, e))?;
        let ns_pid = status
            .nspid
            .as_ref()
            .and_then(|v| v.last().copied())
            .unwrap_or(pid);
        Ok(Task {
            pid,
            ns_pid,
            start_time: stat.starttime,
            uids: [status.ruid, status.euid, status.suid, status.fuid],
        })
    }

    /// Whether `uid` is one of the task's uids.
    pub fn has_uid(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }
}

/// Opens the `/proc/<pid>` directory handle every later read goes through.
pub(crate) fn proc_handle(pid: i32) -> Result<Process, OpenError> {
    if pid <= 0 {
        return Err(OpenError::NoProcess(pid));
    }
    Process::new(pid).map_err(|e| proc_error(pid, e))
}

/// Turns a procfs error into the reader's error for `pid`.
pub(crate) fn proc_error(pid: i32, e: ProcError) -> OpenError {
    match e {
        ProcError::NotFound(_) => OpenError::NoProcess(pid),
        ProcError::PermissionDenied(_) => OpenError::PermissionDenied { pid },
        ProcError::Io(e, _) => io_error(pid, e),
        other => OpenError::Proc {
            pid,
            source: io::Error::other(other.to_string()),
        },
    }
}

/// Turns an I/O error about `/proc/<pid>` into the reader's error.
pub(crate) fn io_error(pid: i32, e: io::Error) -> OpenError {
    match e.raw_os_error() {
        Some(libc::ESRCH) | Some(libc::ENOENT) => OpenError::NoProcess(pid),
        Some(libc::EACCES) | Some(libc::EPERM) => OpenError::PermissionDenied { pid },
        _ => OpenError::Proc { pid, source: e },
    }
}
