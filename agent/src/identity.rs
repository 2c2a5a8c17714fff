//! Who is asking, and may they have this process watched?
//!
//! A client proves who it is with the kernel's credentials on the socket
//! (`SO_PEERCRED`, and `SO_PEERPIDFD` where the kernel has it). It may have
//! itself watched, or a direct child it spawned, of its own user (root may
//! have any child of its watched). The agent then holds a pidfd on the
//! process: every later action goes through it, so a recycled pid can never
//! be acted on.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;

/// Credentials of the process at the other end of a socket.
#[derive(Debug)]
pub struct Peer {
    /// Its pid (tgid) when it connected.
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
    /// A pidfd on it, from `SO_PEERPIDFD` (Linux 6.5+); `None` on older
    /// kernels.
    pub pidfd: Option<OwnedFd>,
}

/// `SO_PEERPIDFD` (not in every libc release yet).
const SO_PEERPIDFD: libc::c_int = 77;

/// Reads the peer's credentials from a connected Unix socket.
pub fn peer_of(fd: &impl AsRawFd) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if cred.pid <= 0 {
        return Err(io::Error::other(
            "the peer's pid is not visible from the agent's pid namespace",
        ));
    }
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: pidfd and len are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut pidfd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let pidfd = (rc == 0 && pidfd >= 0).then(|| {
        // SAFETY: the kernel just gave us this fd; we own it.
        unsafe { OwnedFd::from_raw_fd(pidfd) }
    });
    Ok(Peer {
        pid: cred.pid as u32,
        uid: cred.uid,
        gid: cred.gid,
        pidfd,
    })
}

/// Peer credentials of a std socket (for tests and the blocking client).
pub fn peer_of_std(s: &StdUnixStream) -> io::Result<Peer> {
    peer_of(s)
}

/// What /proc says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Parent pid.
    pub ppid: u32,
    /// Real, effective, saved and filesystem uids.
    pub uids: [u32; 4],
    /// Start time in clock ticks after boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
    /// RSS in bytes: RssAnon + RssFile + RssShmem.
    pub rss_bytes: u64,
    /// Page faults of the whole process: minflt + majflt.
    pub faults: u64,
}

/// Reads /proc/PID/status and /proc/PID/stat.
pub fn proc_info(pid: u32) -> io::Result<ProcInfo> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut ppid = None;
    let mut uids = None;
    let mut rss = 0u64;
    for line in status.lines() {
        let (key, value) = match line.split_once(':') {
            Some(kv) => kv,
            None => continue,
        };
        let value = value.trim();
        match key {
            "PPid" => ppid = value.parse().ok(),
            "Uid" => {
                let v: Vec<u32> = value
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if v.len() == 4 {
                    uids = Some([v[0], v[1], v[2], v[3]]);
                }
            }
            "RssAnon" | "RssFile" | "RssShmem" => {
                rss += value
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    * 1024;
            }
            _ => {}
        }
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // comm may hold spaces and parentheses: fields resume after the last
    // ')', at field 3 (state)
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|s| s.parse::<u64>().ok());
    match (ppid, uids, field(22), field(10), field(12)) {
        (Some(ppid), Some(uids), Some(start_time), Some(min_flt), Some(maj_flt)) => Ok(ProcInfo {
            ppid,
            uids,
            start_time,
            rss_bytes: rss,
            faults: min_flt + maj_flt,
        }),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/status or stat"),
        )),
    }
}

/// Opens a pidfd on `pid`.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Sends `sig` through a pidfd (0 only checks the process is there).
pub fn pidfd_send_signal(fd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall; a null siginfo is allowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True while the process behind the pidfd has not been reaped.
pub fn pidfd_alive(fd: &OwnedFd) -> bool {
    pidfd_send_signal(fd, 0).is_ok()
}

/// Why a registration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// No such process.
    #[error("no process has pid {0}")]
    NoSuchProcess(u32),
    /// The client itself is gone (its socket was handed to someone else).
    #[error("the client process that opened this connection is gone")]
    PeerGone,
    /// The target belongs to another user.
    #[error(
        "pid {pid} runs as uid {owner}, not as your uid {peer}; only your own processes can be watched"
    )]
    OtherUser {
        /// The pid asked for.
        pid: u32,
        /// Its uids' owner.
        owner: u32,
        /// The client's uid.
        peer: u32,
    },
    /// The target is neither the client nor its direct child.
    #[error(
        "pid {pid} is neither you (pid {peer}) nor a direct child of yours (its parent is {ppid}); register yourself, or a child you spawned"
    )]
    NotSelfOrChild {
        /// The pid asked for.
        pid: u32,
        /// Its parent.
        ppid: u32,
        /// The client.
        peer: u32,
    },
    /// The pid names another process than the one the client meant.
    #[error(
        "pid {pid} was recycled: it started at tick {now}, not at tick {claimed} as the registration says"
    )]
    Recycled {
        /// The pid asked for.
        pid: u32,
        /// Start time the client gave.
        claimed: u64,
        /// Start time of the process now holding the pid.
        now: u64,
    },
    /// /proc could not be read.
    #[error("cannot inspect pid {pid}: {detail}")]
    Unreadable {
        /// The pid asked for.
        pid: u32,
        /// The error.
        detail: String,
    },
}

/// A verified target: a pidfd on it and what /proc said.
#[derive(Debug)]
pub struct Verified {
    /// Pidfd on the process.
    pub pidfd: OwnedFd,
    /// Its /proc facts, read after the pidfd was opened.
    pub info: ProcInfo,
}

/// Checks that `peer` may have `pid` watched, and pins the process with a
/// pidfd. The order matters: the pidfd is opened first, /proc is read
/// second, and the pidfd is checked alive last, so the facts read belong to
/// the process the pidfd holds.
pub fn verify(peer: &Peer, pid: u32, start_time: Option<u64>) -> Result<Verified, Refusal> {
    if let Some(fd) = &peer.pidfd
        && !pidfd_alive(fd)
    {
        return Err(Refusal::PeerGone);
    }
    if pid == 0 {
        return Err(Refusal::NoSuchProcess(pid));
    }
    let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) | Some(libc::EINVAL) => Refusal::NoSuchProcess(pid),
        _ => Refusal::Unreadable {
            pid,
            detail: e.to_string(),
        },
    })?;
    let info = proc_info(pid).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Refusal::NoSuchProcess(pid),
        _ => Refusal::Unreadable {
            pid,
            detail: e.to_string(),
        },
    })?;
    if peer.uid != 0 {
        // real, effective and saved uid must all be the client's: a setuid
        // program the client started is not the client's to act on
        if let Some(&owner) = info.uids[..3].iter().find(|&&u| u != peer.uid) {
            return Err(Refusal::OtherUser {
                pid,
                owner,
                peer: peer.uid,
            });
        }
    }
    if pid != peer.pid && info.ppid != peer.pid {
        return Err(Refusal::NotSelfOrChild {
            pid,
            ppid: info.ppid,
            peer: peer.pid,
        });
    }
    if let Some(claimed) = start_time
        && claimed != info.start_time
    {
        return Err(Refusal::Recycled {
            pid,
            claimed,
            now: info.start_time,
        });
    }
    if !pidfd_alive(&pidfd) {
        return Err(Refusal::NoSuchProcess(pid));
    }
    if let Some(fd) = &peer.pidfd
        && !pidfd_alive(fd)
    {
        return Err(Refusal::PeerGone);
    }
    Ok(Verified { pidfd, info })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_facts_are_read() {
        let me = std::process::id();
        let info = proc_info(me).expect("own /proc entry");
        // SAFETY: getuid/getppid have no preconditions.
        let (uid, ppid) = unsafe { (libc::getuid(), libc::getppid()) };
        assert_eq!(info.uids[0], uid);
        assert_eq!(info.ppid, ppid as u32);
        assert!(info.start_time > 0);
        assert!(info.rss_bytes > 0);
    }

    #[test]
    fn socket_peer_is_this_process() {
        let (a, _b) = StdUnixStream::pair().expect("socketpair");
        let peer = peer_of_std(&a).expect("peer creds");
        assert_eq!(peer.pid, std::process::id());
        // SAFETY: getuid has no preconditions.
        assert_eq!(peer.uid, unsafe { libc::getuid() });
    }

    #[test]
    fn self_registration_passes_and_a_stranger_is_refused() {
        let (a, _b) = StdUnixStream::pair().expect("socketpair");
        let peer = peer_of_std(&a).expect("peer creds");
        let me = std::process::id();
        assert!(verify(&peer, me, None).is_ok());
        // our parent is neither us nor our child
        let parent = proc_info(me).expect("own facts").ppid;
        if parent > 1 {
            let r = verify(&peer, parent, None);
            assert!(
                matches!(
                    r,
                    Err(Refusal::NotSelfOrChild { .. }) | Err(Refusal::OtherUser { .. })
                ),
                "{r:?}"
            );
        }
        let wrong_start = proc_info(me).expect("own facts").start_time + 1;
        assert!(matches!(
            verify(&peer, me, Some(wrong_start)),
            Err(Refusal::Recycled { .. })
        ));
        assert!(matches!(
            verify(&peer, 0, None),
            Err(Refusal::NoSuchProcess(0))
        ));
    }
}
