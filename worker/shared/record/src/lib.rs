//! The allocator record: the one interface through which anyone outside a
//! process reads that process's allocator.
//!
//! A process running on amm's preload library (or `amm-worker` itself)
//! publishes its allocator's statistics in one page of shared memory, a
//! [`layout::RawRecord`]: a versioned header naming the task (pid and start
//! time), a seqlock over the statistics ([`Stats`]), and the words through
//! which a purge is requested. The publisher is a [`Writer`]; everyone else
//! (the supervisor of `amm-worker -- CMD`, `amm-agent watch`, the
//! `amm-record` tool) uses [`open`] / [`open_task`] and a [`Reader`].
//!
//! **Where the record lives.** A memfd named `amm-record`, created with
//! `MFD_CLOEXEC` (an `exec` drops it; the new program publishes its own),
//! mode 0600, sealed so it can neither shrink nor grow. Readers find it
//! among the task's descriptors, `/proc/<pid>/fd/*`: the kernel lets only
//! the task's own uid (while the task is dumpable) and root open those, so
//! there is no path in a shared directory that another user could
//! pre-create or replace, and a stranger can neither read the record nor
//! request a purge (requests need the record opened for writing). A reader
//! still checks everything it found ([`Refusal`]).
//!
//! **Never does**: trust a record's contents beyond its own bounds (counts
//! are clamped, sizes checked, reads retried and bounded in time), or block
//! on a hostile publisher.

mod follow;
pub mod layout;
mod mapping;
mod reader;
mod seqlock;
pub mod sys;
mod task;
mod writer;

use std::ffi::CStr;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use follow::{Follower, Notice, RETRY, STAND_IN, STUCK_BACKOFF, STUCK_LIMIT};
pub use layout::{PurgeOutcome, PurgeReason, Stats};
pub use reader::{Access, Reader, RecordInfo, Snapshot, Ticket, open, open_task, request_purge};
pub use seqlock::READ_PATIENCE;
pub use task::Task;
pub use writer::{InheritedParts, InheritedSlot, Request, Writer};

/// The memfd's name (`/proc/<pid>/fd/N -> /memfd:amm-record (deleted)`).
pub const MEMFD_NAME: &CStr = c"amm-record";

/// The two allocators amm knows how to read and purge (also the timeline
/// contract's: `amm-timeline` re-exports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocator {
    /// glibc's `malloc` (ptmalloc2), as a Python/Dask worker has by default.
    System,
    /// jemalloc 5.3 through `tikv-jemalloc-sys`.
    Jemalloc,
}

impl Allocator {
    /// The name used on the command line and in the environment.
    pub fn name(self) -> &'static str {
        match self {
            Allocator::System => "system",
            Allocator::Jemalloc => "jemalloc",
        }
    }
}

impl fmt::Display for Allocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Allocator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "system" | "glibc" | "malloc" => Ok(Allocator::System),
            "jemalloc" | "je" => Ok(Allocator::Jemalloc),
            other => Err(format!(
                "unknown allocator {other:?}: expected `jemalloc` or `system`"
            )),
        }
    }
}

/// The header's allocator code.
pub(crate) fn allocator_code(a: Option<Allocator>) -> u32 {
    match a {
        None => 0,
        Some(Allocator::System) => 1,
        Some(Allocator::Jemalloc) => 2,
    }
}

pub(crate) fn allocator_from_code(code: u32) -> Option<Allocator> {
    match code {
        1 => Some(Allocator::System),
        2 => Some(Allocator::Jemalloc),
        _ => None,
    }
}

/// Why a found record was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The descriptor is not a sealable regular memfd.
    #[error("not a memfd")]
    NotAMemfd,
    /// The memfd can still shrink, which would crash a reader's mapping.
    #[error("not sealed against shrinking")]
    NotSealed,
    /// Smaller than this version's record.
    #[error("too small ({0} bytes)")]
    TooSmall(u64),
    /// Owned by a uid that is neither the task's nor root.
    #[error("owned by uid {0}, which is not the process's")]
    Owner(u32),
    /// The task holds the descriptor but never mapped it (it was passed in).
    #[error("not mapped by the process")]
    NotMapped,
    /// Wrong magic: not an amm record.
    #[error("bad magic")]
    Magic,
    /// A layout version this reader does not know.
    #[error("version {0}, this reader knows version {v}", v = layout::VERSION)]
    Version(u32),
    /// Written for another pid.
    #[error("written for pid {found}, the process is pid {expected} in its namespace")]
    Pid {
        /// The record's pid.
        found: u32,
        /// The task's pid in its own namespace.
        expected: i32,
    },
    /// Written by another task that had the same pid.
    #[error("written by a task started at {found}, the process started at {expected}")]
    StartTime {
        /// The record's start time.
        found: u64,
        /// The task's start time.
        expected: u64,
    },
    /// The publisher moved to a newer record.
    #[error("superseded by a newer record")]
    Superseded,
}

/// Why a process's record could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No such process (or it exited).
    #[error("no process {0} (it may have exited)")]
    NoProcess(i32),
    /// The pid now belongs to another task than the one meant.
    #[error("pid {pid} is now another process (started at {found}, expected {expected})")]
    Replaced {
        /// The pid.
        pid: i32,
        /// The start time the caller meant.
        expected: u64,
        /// The start time of the task that has the pid now.
        found: u64,
    },
    /// The caller may not look into the process.
    #[error(
        "permission denied reading process {pid}'s descriptors: only its owner (while it is \
         dumpable) and root may read its allocator record"
    )]
    PermissionDenied {
        /// The pid.
        pid: i32,
    },
    /// The process publishes no record.
    #[error(
        "process {0} publishes no allocator record: run it with \
         LD_PRELOAD=libamm_preload.so (or under `amm-worker -- CMD`), and give it one \
         publication interval to start"
    )]
    NoRecord(i32),
    /// A record was found and refused.
    #[error("refused the allocator record of process {pid} (fd {fd}): {reason}")]
    Refused {
        /// The pid.
        pid: i32,
        /// The descriptor it was found at.
        fd: i32,
        /// What was wrong.
        reason: Refusal,
    },
    /// Another error reading `/proc/<pid>`.
    #[error("reading /proc/{pid}: {source}")]
    Proc {
        /// The pid.
        pid: i32,
        /// The error.
        source: std::io::Error,
    },
}

/// Why a snapshot could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The publisher stayed inside a write for [`READ_PATIENCE`] (it died or
    /// stopped mid-update), or has published nothing in that time.
    #[error("the record stayed mid-update or unpublished: its publisher seems stopped")]
    Stuck,
    /// The publisher moved to a new record: open the process again.
    #[error("the record was superseded: open the process again")]
    Superseded,
}

/// Why a purge could not be requested or waited for.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// The record could not be opened for writing.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The reader was opened read-only.
    #[error("the record was opened read-only: open it with Access::Purge to request a purge")]
    ReadOnly,
    /// Reading the answer failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The process exited before answering.
    #[error("process {0} exited before answering the purge request")]
    Gone(i32),
}
