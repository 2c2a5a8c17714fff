//! The reader's side: find a process's record, prove it is that task's,
//! read it, ask it to purge.
//!
//! Finding: the record is a memfd named [`MEMFD_NAME`] among the task's
//! descriptors (`/proc/<pid>/fd/*`). The kernel lets only the task's own
//! uid (while it is dumpable) and root open those links, so a stranger can
//! neither read a record nor request a purge, and there is no file in a
//! shared directory anyone could pre-create. Everything found is still
//! checked, because a descriptor can be passed to a process by anyone it
//! talks to: see [`Refusal`] for what a record must satisfy.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};
use procfs::process::{FDTarget, MMapPath, Process};
use rustix::fs::OFlags;
use serde::Serialize;

use crate::layout::{
    MAGIC, RECORD_LEN, RawRecord, STATE_CLOSED, STATE_LIVE, STATE_SUPERSEDED, Stats, VERSION,
};
use crate::mapping::Mapping;
use crate::task::{Task, io_error, proc_error, proc_handle};
use crate::{
    Allocator, MEMFD_NAME, OpenError, PurgeError, ReadError, Refusal, allocator_from_code, seqlock,
    sys,
};

/// What a reader may do with the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read the statistics (the mapping is read-only).
    Read,
    /// Also request purges (the mapping is writable: the record's owner
    /// and root only, which the kernel enforces when opening it).
    Purge,
}

/// A purge request's number, to wait for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ticket(pub u32);

/// The record's fixed facts, read once when it was opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordInfo {
    /// The publisher's pid in its own PID namespace.
    pub ns_pid: u32,
    /// The uid that created the record.
    pub owner_uid: u32,
    /// The publisher's start time (clock ticks after boot).
    pub start_time: u64,
    /// The allocator serving the process (`None`: neither jemalloc nor
    /// glibc malloc as the preload knows them).
    pub allocator: Option<Allocator>,
    /// The publication interval, nanoseconds.
    pub interval_ns: u64,
    /// When the record was created (`CLOCK_MONOTONIC` ns).
    pub created_mono_ns: u64,
}

/// One consistent read of a record.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Snapshot {
    /// The allocator serving the process.
    pub allocator: Option<Allocator>,
    /// The publication interval, nanoseconds.
    pub interval_ns: u64,
    /// `live`, `superseded` or `closed`.
    pub state: &'static str,
    /// The statistics.
    #[serde(flatten)]
    pub stats: Stats,
}

impl Snapshot {
    /// Bytes in live allocations (`heap_live`): jemalloc `allocated`;
    /// glibc `uordblks + hblkhd`.
    pub fn live(&self) -> u64 {
        match self.allocator {
            Some(Allocator::Jemalloc) => self.stats.jemalloc.allocated,
            Some(Allocator::System) => self
                .stats
                .glibc
                .in_use_bytes
                .saturating_add(self.stats.glibc.mmapped_bytes),
            None => 0,
        }
    }

    /// Bytes the allocator holds in resident pages (never less than live).
    pub fn resident(&self) -> u64 {
        match self.allocator {
            Some(Allocator::Jemalloc) => self.stats.jemalloc.resident,
            Some(Allocator::System) => (self.stats.glibc.arena_resident)
                .saturating_add(self.stats.glibc.mmapped_bytes)
                .max(self.live()),
            None => 0,
        }
    }

    /// Resident bytes holding no live allocation (`hoarded`).
    pub fn hoarded(&self) -> u64 {
        self.resident().saturating_sub(self.live())
    }

    /// What a purge can give back: jemalloc's dirty + muzzy pages (its
    /// metadata and slab slack stay); glibc's hoard.
    pub fn purgeable(&self) -> u64 {
        match self.allocator {
            Some(Allocator::Jemalloc) => self
                .stats
                .jemalloc
                .dirty_bytes
                .saturating_add(self.stats.jemalloc.muzzy_bytes),
            _ => self.hoarded(),
        }
    }

    /// How old the statistics are (against this machine's monotonic clock).
    pub fn age(&self) -> Duration {
        Duration::from_nanos(sys::monotonic_ns().saturating_sub(self.stats.publication.mono_ns))
    }

    /// Whether the publisher seems to have stopped: nothing published for
    /// three intervals (and at least 100 ms).
    pub fn is_stale(&self) -> bool {
        let limit = Duration::from_nanos(self.interval_ns.saturating_mul(3))
            .max(Duration::from_millis(100));
        self.age() > limit
    }
}

/// A verified, open record of one task.
#[derive(Debug)]
pub struct Reader {
    task: Task,
    process: Process,
    map: Mapping,
    access: Access,
    info: RecordInfo,
}

/// Opens the record of the task that has `pid` now, read-only.
pub fn open(pid: i32) -> Result<Reader, OpenError> {
    open_with(pid, None, Access::Read)
}

/// Opens the record of `task` (a pid bound to its start time: refused if
/// the pid now belongs to another task).
pub fn open_task(task: &Task, access: Access) -> Result<Reader, OpenError> {
    open_with(task.pid, Some(task), access)
}

/// Asks the process with `pid` to purge now; returns the open reader and
/// the ticket to wait on ([`Reader::wait_purge`]).
pub fn request_purge(pid: i32) -> Result<(Reader, Ticket), PurgeError> {
    let reader = open_with(pid, None, Access::Purge)?;
    let ticket = reader.request_purge()?;
    Ok((reader, ticket))
}

fn open_with(pid: i32, expected: Option<&Task>, access: Access) -> Result<Reader, OpenError> {
    let process = proc_handle(pid)?;
    let task = Task::read(pid, &process)?;
    if let Some(e) = expected
        && e.start_time != task.start_time
    {
        return Err(OpenError::Replaced {
            pid,
            expected: e.start_time,
            found: task.start_time,
        });
    }
    let fds = record_fds(&process, pid)?;
    let mut refused = None;
    for fd in fds {
        match open_fd(&process, &task, fd, access) {
            Ok(reader) => return Ok(reader),
            Err(e @ OpenError::Refused { .. }) => {
                // a superseded record is expected beside its successor
                if refused.is_none()
                    || !matches!(
                        e,
                        OpenError::Refused {
                            reason: Refusal::Superseded,
                            ..
                        }
                    )
                {
                    refused = Some(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(refused.unwrap_or(OpenError::NoRecord(pid)))
}

/// The descriptors of the task that are memfds named [`MEMFD_NAME`].
fn record_fds(process: &Process, pid: i32) -> Result<Vec<i32>, OpenError> {
    let want = MEMFD_NAME.to_str().unwrap_or("amm-record");
    let mut out = Vec::new();
    for info in process.fd().map_err(|e| proc_error(pid, e))? {
        // a descriptor closed while listing is no record
        let Ok(info) = info else { continue };
        if let FDTarget::MemFD(name) = &info.target
            && name.strip_suffix(" (deleted)").unwrap_or(name) == want
        {
            out.push(info.fd);
        }
    }
    Ok(out)
}

fn refused(pid: i32, fd: i32, reason: Refusal) -> OpenError {
    OpenError::Refused { pid, fd, reason }
}

/// Opens one candidate and checks it: a sealed regular memfd, owned by
/// one of the task's uids or root, mapped by the task, with our magic and
/// version, naming this task (pid in its namespace and start time).
fn open_fd(process: &Process, task: &Task, fd: i32, access: Access) -> Result<Reader, OpenError> {
    let pid = task.pid;
    // O_NONBLOCK: the number may have been reused for a FIFO meanwhile,
    // and opening a FIFO would block this reader forever.
    let mode = match access {
        Access::Read => OFlags::RDONLY,
        Access::Purge => OFlags::RDWR,
    };
    let file = process
        .open_relative_flags(
            format!("fd/{fd}"),
            mode | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        )
        .map_err(|e| proc_error(pid, e))?;
    let st = fstat(&file).map_err(|e| io_error(pid, e.into()))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(refused(pid, fd, Refusal::NotAMemfd));
    }
    let seals =
        fcntl(&file, FcntlArg::F_GET_SEALS).map_err(|_| refused(pid, fd, Refusal::NotAMemfd))?;
    if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
        return Err(refused(pid, fd, Refusal::NotSealed));
    }
    if (st.st_size as u64) < RECORD_LEN as u64 {
        return Err(refused(pid, fd, Refusal::TooSmall(st.st_size as u64)));
    }
    if st.st_uid != 0 && !task.has_uid(st.st_uid) {
        return Err(refused(pid, fd, Refusal::Owner(st.st_uid)));
    }
    if !is_mapped_by(process, st.st_ino) {
        return Err(refused(pid, fd, Refusal::NotMapped));
    }
    let map = Mapping::new(file.as_fd(), access == Access::Purge)
        .map_err(|e| OpenError::Proc { pid, source: e })?;
    let info = check_header(map.record(), task).map_err(|r| refused(pid, fd, r))?;
    // still the same task after all this (the handle pins it: a dead task
    // answers with errors, never with another task's files)
    let now = Task::read(pid, process)?;
    if now.start_time != task.start_time {
        return Err(OpenError::NoProcess(pid));
    }
    Ok(Reader {
        task: task.clone(),
        process: proc_handle(pid)?,
        map,
        access,
        info,
    })
}

/// Whether the task maps the memfd with inode `ino` (a descriptor someone
/// passed to the task, which it never mapped, is not its record).
fn is_mapped_by(process: &Process, ino: u64) -> bool {
    let Ok(maps) = process.maps() else {
        return false;
    };
    maps.iter().any(|m| {
        m.inode == ino
            && matches!(&m.pathname, MMapPath::Path(p)
                if p.to_string_lossy().starts_with("/memfd:amm-record"))
    })
}

fn check_header(r: &RawRecord, task: &Task) -> Result<RecordInfo, Refusal> {
    let h = &r.header;
    if h.magic.load(Ordering::Acquire) != MAGIC {
        return Err(Refusal::Magic);
    }
    let version = h.version.load(Ordering::Relaxed);
    if version != VERSION {
        return Err(Refusal::Version(version));
    }
    let size = h.size.load(Ordering::Relaxed);
    if (size as usize) < size_of::<RawRecord>() || size as usize > RECORD_LEN {
        return Err(Refusal::TooSmall(u64::from(size)));
    }
    let ns_pid = h.pid.load(Ordering::Relaxed);
    if i64::from(ns_pid) != i64::from(task.ns_pid) {
        return Err(Refusal::Pid {
            found: ns_pid,
            expected: task.ns_pid,
        });
    }
    let start_time = h.start_time.load(Ordering::Relaxed);
    if start_time != task.start_time {
        return Err(Refusal::StartTime {
            found: start_time,
            expected: task.start_time,
        });
    }
    if h.state.load(Ordering::Acquire) == STATE_SUPERSEDED {
        return Err(Refusal::Superseded);
    }
    Ok(RecordInfo {
        ns_pid,
        owner_uid: h.owner_uid.load(Ordering::Relaxed),
        start_time,
        allocator: allocator_from_code(h.allocator.load(Ordering::Relaxed)),
        interval_ns: h.interval_ns.load(Ordering::Relaxed),
        created_mono_ns: h.created_mono_ns.load(Ordering::Relaxed),
    })
}

impl Reader {
    /// The task this record belongs to.
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// The record's fixed facts.
    pub fn info(&self) -> &RecordInfo {
        &self.info
    }

    /// Reads one whole publication. A record whose publisher moved to a
    /// new one ([`ReadError::Superseded`]): call [`Reader::reopen`].
    pub fn snapshot(&self) -> Result<Snapshot, ReadError> {
        let r = self.map.record();
        let state = match r.header.state.load(Ordering::Acquire) {
            STATE_LIVE => "live",
            STATE_CLOSED => "closed",
            STATE_SUPERSEDED => return Err(ReadError::Superseded),
            _ => "unknown",
        };
        let mut stats = Stats::default();
        match seqlock::read(&r.seq, &r.data, &mut stats) {
            seqlock::ReadOutcome::Read(_) => Ok(Snapshot {
                allocator: self.info.allocator,
                interval_ns: self.info.interval_ns,
                state,
                stats,
            }),
            seqlock::ReadOutcome::Stuck => Err(ReadError::Stuck),
        }
    }

    /// Opens the task's current record again (after
    /// [`ReadError::Superseded`]), with the same access.
    pub fn reopen(&self) -> Result<Reader, OpenError> {
        open_task(&self.task, self.access)
    }

    /// Whether the task is still running (the same task, not a successor
    /// with its pid).
    pub fn is_alive(&self) -> bool {
        Task::read(self.task.pid, &self.process).is_ok_and(|t| t.start_time == self.task.start_time)
    }

    /// Asks the publisher to purge (jemalloc) or trim (glibc) now and
    /// wakes it. Needs [`Access::Purge`].
    pub fn request_purge(&self) -> Result<Ticket, PurgeError> {
        if self.access != Access::Purge {
            return Err(PurgeError::ReadOnly);
        }
        let c = &self.map.record().control;
        c.requester_pid
            .store(nix::unistd::getpid().as_raw() as u32, Ordering::Relaxed);
        c.requester_uid
            .store(nix::unistd::geteuid().as_raw(), Ordering::Relaxed);
        let ticket = c.request.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        sys::futex_wake(&c.request);
        Ok(Ticket(ticket))
    }

    /// Waits up to `timeout` for the answer to `ticket` and returns the
    /// snapshot that holds it (`stats.purge.last` is that purge, or a later
    /// one that covered it); `Ok(None)` when no answer came in time.
    pub fn wait_purge(
        &self,
        ticket: Ticket,
        timeout: Duration,
    ) -> Result<Option<Snapshot>, PurgeError> {
        let c = &self.map.record().control;
        let start = Instant::now();
        loop {
            let answered = c.answered.load(Ordering::Acquire);
            if answered.wrapping_sub(ticket.0) as i32 >= 0 {
                return Ok(Some(self.snapshot()?));
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            if !self.is_alive() {
                return Err(PurgeError::Gone(self.task.pid));
            }
            sys::futex_wait(&c.answered, answered, left.min(Duration::from_millis(50)));
        }
    }
}
