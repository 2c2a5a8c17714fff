//! How a watched process ended, and who ended it, as far as can be known
//! from outside: the exit status through the pidfd (`PIDFD_INFO_EXIT`, once
//! its parent has reaped it), the OOM-kill counters of its memory cgroup
//! and of the host (read at the start of the watch and at the end), and
//! amm-agent's own record of a kill at the terminate page.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use amm_cgroup::MemoryCgroup;
use serde::Serialize;

/// How long to wait for the target's parent to reap it: the exit status is
/// only published once it has.
const REAP_WAIT: Duration = Duration::from_secs(2);

/// What the process's exit status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It exited with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled {
        /// The signal number.
        signal: i32,
        /// A core was dumped.
        core_dumped: bool,
    },
    /// The status could not be read: the kernel has no `PIDFD_INFO_EXIT`
    /// (before 6.15), or its parent has not reaped it yet.
    Unknown,
    /// It had not exited: its watch ended first (see
    /// [`Cause::CredentialsChanged`]).
    Running,
}

/// Who (or what) ended the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Cause {
    /// It exited by itself (an exit code).
    Itself,
    /// The kernel killed it at the page that crossed terminate because
    /// amm-agent asked (it was registered with the agent).
    AmmTerminate {
        /// RSS at that page.
        rss_bytes: u64,
    },
    /// Its memory cgroup's OOM killer.
    CgroupOom {
        /// The cgroup's directory.
        cgroup: String,
        /// The cgroup's `oom_kill` count when the watch began.
        before: u64,
        /// ... and after the exit.
        after: u64,
    },
    /// The host's OOM killer (`/proc/vmstat` `oom_kill` rose; not in its
    /// cgroup).
    HostOom {
        /// The host's count when the watch began.
        before: u64,
        /// ... and after the exit.
        after: u64,
    },
    /// A signal from another process (or itself): the sender is not
    /// recorded.
    Signal,
    /// The exit status is unknown.
    Unknown,
    /// Not an exit: the process changed its credentials (a setuid/setgid
    /// or file-capability exec, setresuid), so the kernel ended its watch
    /// and nothing more is read from it. It may still run.
    CredentialsChanged,
}

/// The end of one watched process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ending {
    /// The process.
    pub pid: u32,
    /// Its exit status.
    pub status: Status,
    /// Who ended it.
    pub cause: Cause,
    /// The kernel's exact peak RSS (the probe's map).
    pub peak_rss_bytes: u64,
    /// The limit the levels were computed from.
    pub limit_bytes: u64,
    /// Its allocator at the last read of its record (a process on the
    /// preload library).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap: Option<HeapAtEnd>,
}

/// The allocator's last published state before the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeapAtEnd {
    /// `jemalloc` or `system`.
    pub allocator: String,
    /// Bytes in live allocations.
    pub live_bytes: u64,
    /// Resident bytes holding no live allocation.
    pub hoarded_bytes: u64,
}

impl HeapAtEnd {
    /// From a read of the record.
    pub fn of(s: &amm_record::Snapshot) -> Option<Self> {
        Some(Self {
            allocator: s.allocator?.name().to_string(),
            live_bytes: s.live(),
            hoarded_bytes: s.hoarded(),
        })
    }
}

impl Ending {
    /// One line for people.
    pub fn describe(&self) -> String {
        let status = match self.status {
            Status::Exited(c) => format!("exited with code {c}"),
            Status::Signaled {
                signal,
                core_dumped,
            } => format!(
                "killed by signal {signal} ({}){}",
                signal_name(signal),
                if core_dumped { ", core dumped" } else { "" }
            ),
            Status::Unknown => {
                "ended; exit status unknown (not reaped by its parent within 2 s, or a kernel \
                 without PIDFD_INFO_EXIT)"
                    .to_string()
            }
            Status::Running => "is no longer watched".to_string(),
        };
        let cause = match &self.cause {
            Cause::Itself | Cause::Unknown => String::new(),
            Cause::AmmTerminate { rss_bytes } => format!(
                ": by the kernel at the terminate page, as amm-agent asked (rss {})",
                iec(*rss_bytes)
            ),
            Cause::CgroupOom {
                cgroup,
                before,
                after,
            } => format!(": OOM kill by its cgroup {cgroup} (oom_kill {before} -> {after})"),
            Cause::HostOom { before, after } => format!(
                ": OOM kill by the host's OOM killer (/proc/vmstat oom_kill {before} -> {after})"
            ),
            Cause::Signal => ": by another process or itself (sender not recorded)".to_string(),
            Cause::CredentialsChanged => {
                ": its credentials changed (setuid/setgid or file-capability exec), so the \
                 kernel ended its watch; it may still run"
                    .to_string()
            }
        };
        let peak = if self.peak_rss_bytes == 0 {
            "kernel peak not seen (its RSS never changed while watched)".to_string()
        } else {
            format!(
                "kernel peak {} ({:.1}% of the limit {})",
                iec(self.peak_rss_bytes),
                100.0 * self.peak_rss_bytes as f64 / self.limit_bytes.max(1) as f64,
                iec(self.limit_bytes)
            )
        };
        let heap = self.heap.as_ref().map_or_else(String::new, |h| {
            format!(
                "; {} last read: live {}, hoarded {}",
                h.allocator,
                iec(h.live_bytes),
                iec(h.hoarded_bytes)
            )
        });
        format!("pid {} {status}{cause}; {peak}{heap}", self.pid)
    }
}

fn iec(b: u64) -> String {
    bytesize::ByteSize(b).display().iec().to_string()
}

/// The usual name of a signal number.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

/// The OOM-kill counters at the start of a watch, to compare at its end.
#[derive(Debug)]
pub struct OomCounters {
    cgroup: Option<(MemoryCgroup, u64)>,
    host: Option<u64>,
}

/// `oom_kill` of `/proc/vmstat` (the `procfs` crate).
fn host_oom_kills() -> Option<u64> {
    procfs::vmstat()
        .ok()?
        .get("oom_kill")
        .map(|&v| v.max(0) as u64)
}

impl OomCounters {
    /// Reads the counters now; `cgroup` is the target's memory cgroup.
    pub fn read(cgroup: Option<MemoryCgroup>) -> Self {
        Self {
            cgroup: cgroup.and_then(|c| {
                let n = c.oom_kills()?;
                Some((c, n))
            }),
            host: host_oom_kills(),
        }
    }

    /// Who killed a process that died of SIGKILL, by which counter rose.
    fn kill_cause(&self) -> Option<Cause> {
        if let Some((cg, before)) = &self.cgroup
            && let Some(after) = cg.oom_kills()
            && after > *before
        {
            return Some(Cause::CgroupOom {
                cgroup: cg.dir.display().to_string(),
                before: *before,
                after,
            });
        }
        let before = self.host?;
        let after = host_oom_kills()?;
        (after > before).then_some(Cause::HostOom { before, after })
    }
}

/// The exit status through the pidfd (`PIDFD_GET_INFO` with
/// `PIDFD_INFO_EXIT`, Linux 6.15+; nix has no wrapper): `Ok(None)` until
/// the parent has reaped the process. Works for a process that is not our
/// child.
pub fn pidfd_exit_status(fd: &OwnedFd) -> io::Result<Option<i32>> {
    // SAFETY: pidfd_info is plain old data; all zeros is a valid value.
    let mut info: libc::pidfd_info = unsafe { std::mem::zeroed() };
    info.mask = libc::PIDFD_INFO_EXIT as u64;
    // SAFETY: the ioctl writes at most size_of::<pidfd_info>() bytes (the
    // size is encoded in the request) into `info`, which lives across it.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::PIDFD_GET_INFO,
            &mut info as *mut libc::pidfd_info,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.mask & libc::PIDFD_INFO_EXIT as u64 != 0).then_some(info.exit_code))
}

/// Decodes a wait status.
pub fn status_of(wait_status: i32) -> Status {
    if libc::WIFEXITED(wait_status) {
        Status::Exited(libc::WEXITSTATUS(wait_status))
    } else if libc::WIFSIGNALED(wait_status) {
        Status::Signaled {
            signal: libc::WTERMSIG(wait_status),
            core_dumped: libc::WCOREDUMP(wait_status),
        }
    } else {
        Status::Unknown
    }
}

/// Waits (up to [`REAP_WAIT`]) for the exit status of the exited process
/// behind `pidfd`.
pub fn wait_status(pidfd: &OwnedFd) -> Status {
    let start = Instant::now();
    loop {
        match pidfd_exit_status(pidfd) {
            Ok(Some(s)) => return status_of(s),
            // ENOTTY/EINVAL: a kernel without PIDFD_GET_INFO/INFO_EXIT
            Err(_) => return Status::Unknown,
            Ok(None) if start.elapsed() > REAP_WAIT => return Status::Unknown,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// What amm-agent (at `socket`) saw at the end of `pid`: the RSS at the
/// page where the kernel signalled it at terminate, if that is how it
/// ended. `None` when no agent answers or it did not kill it.
pub fn killed_at_terminate(socket: &Path, pid: u32) -> Option<u64> {
    amm_protocol::Client::connect(socket, "amm-agent watch", Duration::from_secs(2))
        .ok()?
        .killed_at_terminate(pid)
        .ok()
        .flatten()
}

impl Ending {
    /// The end of a watch the kernel ended because the process changed its
    /// credentials: no exit status is waited for, nothing more is read.
    pub fn credentials_changed(pid: u32, peak_rss_bytes: u64, limit_bytes: u64) -> Self {
        Self {
            pid,
            status: Status::Running,
            cause: Cause::CredentialsChanged,
            peak_rss_bytes,
            limit_bytes,
            heap: None,
        }
    }
}

/// Puts the ending together once the process has exited.
pub fn ending(
    pid: u32,
    pidfd: &OwnedFd,
    counters: &OomCounters,
    agent: Option<&Path>,
    peak_rss_bytes: u64,
    limit_bytes: u64,
    heap: Option<HeapAtEnd>,
) -> Ending {
    let status = wait_status(pidfd);
    let cause = match status {
        Status::Exited(_) => Cause::Itself,
        Status::Unknown | Status::Running => Cause::Unknown,
        Status::Signaled { signal, .. } => {
            let by_amm = agent
                .and_then(|s| killed_at_terminate(s, pid))
                .map(|rss_bytes| Cause::AmmTerminate { rss_bytes });
            by_amm
                .or_else(|| {
                    (signal == libc::SIGKILL)
                        .then(|| counters.kill_cause())
                        .flatten()
                })
                .unwrap_or(Cause::Signal)
        }
    };
    Ending {
        pid,
        status,
        cause,
        peak_rss_bytes,
        limit_bytes,
        heap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(status_of(3 << 8), Status::Exited(3));
        assert_eq!(
            status_of(libc::SIGKILL),
            Status::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
        assert_eq!(
            status_of(libc::SIGSEGV | 0x80),
            Status::Signaled {
                signal: 11,
                core_dumped: true
            }
        );
        assert_eq!(signal_name(9), "SIGKILL");
    }

    /// A child of ours that exited with 7: the pidfd gives its status once
    /// it is reaped (a non-child works the same; the integration tests
    /// watch processes that are not the watcher's).
    #[test]
    fn the_pidfd_gives_the_exit_status_after_the_reap() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("spawn sh");
        let fd = crate::identity::pidfd_open(child.id()).expect("pidfd");
        child.wait().expect("reap");
        match pidfd_exit_status(&fd) {
            Ok(Some(s)) => assert_eq!(status_of(s), Status::Exited(7)),
            Ok(None) => panic!("reaped, yet no exit information"),
            // kernels before 6.15
            Err(e) => eprintln!("SKIPPED exit status through the pidfd: {e}"),
        }
    }
}
