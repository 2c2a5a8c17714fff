//! Who is asking, and may they have this process watched?
//!
//! A client proves who it is with the kernel's credentials on the socket
//! (`SO_PEERCRED`, and `SO_PEERPIDFD` where the kernel has it). It may have
//! itself watched, or a direct child it spawned, of its own user (root may
//! have any child of its watched), and names it as it sees it: in its own
//! PID namespace (a container's), or 0 for itself. The agent then pins the
//! process with a pidfd and binds the kernel's watch to it (a task started
//! after the check can never match, see [`Verified::born_before_ns`]), so a
//! recycled pid is never acted on.
//!
//! Every /proc read goes through [`ProcInfo`] (the `procfs` crate).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use procfs::process::{Process, Stat, Status};

use crate::clock;

/// Credentials of the process at the other end of a socket.
#[derive(Debug)]
pub struct Peer {
    /// Its pid (tgid) when it connected, in the agent's PID namespace.
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
    /// A pidfd on it, from `SO_PEERPIDFD` (Linux 6.5+); `None` on older
    /// kernels.
    pub pidfd: Option<OwnedFd>,
}

/// Reads the peer's credentials from a connected Unix socket.
pub fn peer_of(stream: &tokio::net::UnixStream) -> io::Result<Peer> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().filter(|&p| p > 0).ok_or_else(|| {
        io::Error::other("the peer's pid is not visible from the agent's pid namespace")
    })?;
    let pidfd = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd).ok();
    Ok(Peer {
        pid: pid as u32,
        uid: cred.uid(),
        gid: cred.gid(),
        pidfd,
    })
}

/// What /proc says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// State letter (`R`, `S`, `Z` for a zombie, `X` dead, ...).
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// Real, effective, saved and filesystem uids.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gids.
    pub gids: [u32; 4],
    /// Permitted capabilities (`CapPrm`).
    pub cap_permitted: u64,
    /// Its pid in each PID namespace from the agent's (first) to its own
    /// (last): `NSpid`.
    pub nspid: Vec<u32>,
    /// Start time in clock ticks after boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
    /// Anonymous resident bytes (`RssAnon`).
    pub rss_anon: u64,
    /// File-backed resident bytes (`RssFile`).
    pub rss_file: u64,
    /// Resident shared memory (`RssShmem`).
    pub rss_shmem: u64,
    /// Page faults of the whole process: minflt + majflt.
    pub faults: u64,
}

fn io_error(e: procfs::ProcError) -> io::Error {
    match e {
        procfs::ProcError::NotFound(_) => io::Error::new(io::ErrorKind::NotFound, e),
        procfs::ProcError::PermissionDenied(_) => {
            io::Error::new(io::ErrorKind::PermissionDenied, e)
        }
        other => io::Error::other(other),
    }
}

impl ProcInfo {
    /// Reads /proc/PID/stat and /proc/PID/status (both through one
    /// directory fd, so both describe the same process).
    pub fn read(pid: u32) -> io::Result<Self> {
        let p = Process::new(pid as i32).map_err(io_error)?;
        let stat = p.stat().map_err(io_error)?;
        let status = p.status().map_err(io_error)?;
        Ok(Self::from_procfs(&stat, &status))
    }

    /// The facts from parsed `stat` and `status` (fixtures use
    /// `procfs::FromRead` on saved files).
    pub fn from_procfs(stat: &Stat, status: &Status) -> Self {
        let kib = |v: Option<u64>| v.unwrap_or(0) * 1024;
        let own_pid = [stat.pid as u32];
        Self {
            state: stat.state,
            ppid: stat.ppid.max(0) as u32,
            uids: [status.ruid, status.euid, status.suid, status.fuid],
            gids: [status.rgid, status.egid, status.sgid, status.fgid],
            cap_permitted: status.capprm,
            nspid: status.nspid.as_ref().map_or_else(
                || own_pid.to_vec(),
                |v| v.iter().map(|&p| p.max(0) as u32).collect(),
            ),
            start_time: stat.starttime,
            rss_anon: kib(status.rssanon),
            rss_file: kib(status.rssfile),
            rss_shmem: kib(status.rssshmem),
            faults: stat.minflt + stat.majflt,
        }
    }

    /// RSS in bytes: RssAnon + RssFile + RssShmem (what the kernel
    /// program counts).
    pub fn rss_bytes(&self) -> u64 {
        self.rss_anon + self.rss_file + self.rss_shmem
    }

    /// True for a process that has exited (a zombie waiting to be reaped,
    /// or dead).
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Opens a pidfd on `pid` (rustix's `pidfd_open`; nix has no wrapper).
/// Pid 0 and pids past `i32::MAX` are EINVAL, as the kernel says of them.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(Errno::EINVAL as i32))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Sends `sig` through a pidfd: one narrow call through `libc::syscall`,
/// because a client may ask for any signal number 1..=64, real-time ones
/// included, which neither nix's `Signal` nor rustix's checked `Signal`
/// can hold (nix has no `pidfd_send_signal` at all).
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

/// True once the process behind the pidfd has exited: a zombie counts (a
/// pidfd polls readable then), unlike for `kill(pid, 0)`.
pub fn pidfd_exited(fd: &impl AsFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) => n > 0,
        // a pidfd that cannot be polled pins nothing we can trust
        Err(_) => true,
    }
}

/// Why a registration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// No such process.
    #[error("no process has pid {0}")]
    NoSuchProcess(u32),
    /// The process has exited (a zombie not reaped yet, or gone).
    #[error(
        "pid {0} has exited (a zombie waiting for its parent to reap it); register a running process"
    )]
    Exited(u32),
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
    /// A client in another PID namespace named a pid that is neither it nor
    /// its direct child there.
    #[error(
        "no process numbered {0} in your PID namespace is you or a direct child of yours; register yourself (pid 0), or a child you spawned, by the number you see"
    )]
    NotInYourNamespace(u32),
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
    /// The process, in the agent's PID namespace.
    pub pid: u32,
    /// Pidfd on the process.
    pub pidfd: OwnedFd,
    /// Its /proc facts, read after the pidfd was opened.
    pub info: ProcInfo,
    /// CLOCK_BOOTTIME just before the process was last seen running: it
    /// held its pid then, so whatever holds that pid later started after
    /// this instant. The kernel program matches a task to the watch only if
    /// its thread group leader started at or before it.
    pub born_before_ns: u64,
}

/// A process pinned by the agent for a watch of its own making (`amm-agent
/// watch`, tests, benchmarks): no client, no ownership check.
#[derive(Debug)]
pub struct Pinned {
    /// Pidfd on the process.
    pub pidfd: OwnedFd,
    /// See [`Verified::born_before_ns`].
    pub born_before_ns: u64,
}

/// Pins `pid` with a pidfd and notes when it was last seen running (see
/// [`Verified::born_before_ns`]); an error if it has exited.
pub fn pin(pid: u32) -> io::Result<Pinned> {
    let pidfd = pidfd_open(pid)?;
    let born_before_ns = clock::boottime_ns();
    if pidfd_exited(&pidfd) {
        return Err(io::Error::other(format!("pid {pid} has exited")));
    }
    Ok(Pinned {
        pidfd,
        born_before_ns,
    })
}

impl Pinned {
    /// The kernel binding of a pinned process: its time, no credentials.
    pub fn binding(&self) -> crate::probe::Binding {
        crate::probe::Binding {
            born_before_ns: self.born_before_ns,
            credentials: None,
        }
    }

    /// The kernel binding of a pinned process and the credentials `info`
    /// shows (read after [`pin`], and the pidfd checked running after the
    /// read, so they are the pinned task's): a change ends the watch.
    pub fn binding_with_credentials(&self, info: &ProcInfo) -> crate::probe::Binding {
        crate::probe::Binding {
            born_before_ns: self.born_before_ns,
            credentials: Some(crate::probe::Credentials::of(info)),
        }
    }
}

fn proc_refusal(pid: u32, e: io::Error) -> Refusal {
    match e.kind() {
        io::ErrorKind::NotFound => Refusal::NoSuchProcess(pid),
        _ => Refusal::Unreadable {
            pid,
            detail: e.to_string(),
        },
    }
}

/// The agent's pid for the process `requested` names as `peer` sees it:
/// 0 is the peer itself; a peer in the agent's PID namespace names pids as
/// the agent does; a peer in a container may name itself or its direct
/// children by their number there, nothing else.
fn resolve(peer: &Peer, requested: u32) -> Result<u32, Refusal> {
    if requested == 0 {
        return Ok(peer.pid);
    }
    // NSpid lists a process's pid from the reader's namespace down to its
    // own; a peer the agent sees is in the agent's namespace or below it.
    // (The depth comes from world-readable `status`: no ptrace right on the
    // peer's `ns/pid` link is needed.)
    let peer_info = ProcInfo::read(peer.pid).map_err(|_| Refusal::PeerGone)?;
    let level = peer_info.nspid.len().saturating_sub(1);
    if level == 0 {
        return Ok(requested);
    }
    if peer_info.nspid.last() == Some(&requested) {
        return Ok(peer.pid);
    }
    child_numbered(peer.pid, level, requested).ok_or(Refusal::NotInYourNamespace(requested))
}

/// The direct child of `parent` whose pid at namespace depth `level` is
/// `nr` (a scan of /proc: this kernel may lack `task/*/children`).
fn child_numbered(parent: u32, level: usize, nr: u32) -> Option<u32> {
    let all = procfs::process::all_processes().ok()?;
    all.flatten()
        .filter(|p| p.stat().is_ok_and(|s| s.ppid == parent as i32))
        .find_map(|p| {
            let info = ProcInfo::read(p.pid as u32).ok()?;
            (info.ppid == parent && info.nspid.get(level) == Some(&nr)).then_some(p.pid as u32)
        })
}

fn check_peer_alive(peer: &Peer) -> Result<(), Refusal> {
    match &peer.pidfd {
        Some(fd) if pidfd_exited(fd) => Err(Refusal::PeerGone),
        _ => Ok(()),
    }
}

/// The checks on /proc's facts, in the order that gives the clearest
/// refusal.
fn check_facts(
    peer: &Peer,
    pid: u32,
    info: &ProcInfo,
    start_time: Option<u64>,
) -> Result<(), Refusal> {
    if info.exited() {
        return Err(Refusal::Exited(pid));
    }
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
    Ok(())
}

/// Checks that `peer` may have the process it calls `requested` watched,
/// and pins it with a pidfd. The order matters: the pidfd is opened first,
/// /proc is read second, and the pidfd is checked still running last, so
/// the facts read belong to the process the pidfd holds, and that process
/// held the pid at [`Verified::born_before_ns`].
pub fn verify(peer: &Peer, requested: u32, start_time: Option<u64>) -> Result<Verified, Refusal> {
    check_peer_alive(peer)?;
    let pid = resolve(peer, requested)?;
    let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(e) if e == Errno::ESRCH as i32 || e == Errno::EINVAL as i32 => {
            Refusal::NoSuchProcess(pid)
        }
        _ => Refusal::Unreadable {
            pid,
            detail: e.to_string(),
        },
    })?;
    let info = ProcInfo::read(pid).map_err(|e| proc_refusal(pid, e))?;
    check_facts(peer, pid, &info, start_time)?;
    let born_before_ns = clock::boottime_ns();
    if pidfd_exited(&pidfd) {
        return Err(Refusal::Exited(pid));
    }
    check_peer_alive(peer)?;
    Ok(Verified {
        pid,
        pidfd,
        info,
        born_before_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use procfs::FromRead;

    const STAT: &str = "28031 (a (weird) name) {state} 28027 28027 18228 0 -1 4194304 100 0 3 0 0 0 0 0 20 0 1 0 129609 3133440 394 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    fn status(state: &str, uid: &str, nspid: &str) -> String {
        format!(
            "Name:\tx\nUmask:\t0022\nState:\t{state}\nTgid:\t28031\nNgid:\t0\nPid:\t28031\nPPid:\t28027\nTracerPid:\t0\nUid:\t{uid}\nGid:\t100\t100\t100\t100\nFDSize:\t64\nGroups:\t\nNStgid:\t{nspid}\nNSpid:\t{nspid}\nNSpgid:\t28027\nNSsid:\t18228\nVmPeak:\t 3060 kB\nVmSize:\t 3060 kB\nVmLck:\t 0 kB\nVmPin:\t 0 kB\nVmHWM:\t 1676 kB\nVmRSS:\t 1676 kB\nRssAnon:\t 116 kB\nRssFile:\t 1560 kB\nRssShmem:\t 4 kB\nVmData:\t 360 kB\nVmStk:\t 132 kB\nVmExe:\t 20 kB\nVmLib:\t 1528 kB\nVmPTE:\t 52 kB\nVmSwap:\t 0 kB\nThreads:\t1\nSigQ:\t1/96363\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\nCapInh:\t0000000000000000\nCapPrm:\t00000000000000c0\nCapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t0\nvoluntary_ctxt_switches:\t0\nnonvoluntary_ctxt_switches:\t0\n"
        )
    }

    fn fixture(state: &str, uid: &str, nspid: &str) -> ProcInfo {
        let stat_text = STAT.replace("{state}", &state[..1]);
        let stat = Stat::from_read(stat_text.as_bytes()).expect("stat fixture");
        let status = Status::from_read(status(state, uid, nspid).as_bytes()).expect("status");
        ProcInfo::from_procfs(&stat, &status)
    }

    #[test]
    fn proc_facts_come_from_saved_files() {
        let info = fixture("S (sleeping)", "1000\t1000\t1000\t1000", "28031\t7");
        assert_eq!(info.ppid, 28027);
        assert_eq!(info.uids, [1000; 4]);
        assert_eq!(info.gids, [100; 4]);
        assert_eq!(info.start_time, 129609);
        assert_eq!(info.faults, 103);
        assert_eq!(info.rss_bytes(), (116 + 1560 + 4) * 1024);
        assert_eq!(info.rss_anon, 116 * 1024);
        assert_eq!(info.cap_permitted, 0xc0);
        assert_eq!(info.nspid, vec![28031, 7]);
        assert!(!info.exited());
        assert!(fixture("Z (zombie)", "0\t0\t0\t0", "28031").exited());
    }

    #[test]
    fn own_process_facts_are_read() {
        let me = std::process::id();
        let info = ProcInfo::read(me).expect("own /proc entry");
        assert_eq!(info.uids[0], nix::unistd::getuid().as_raw());
        assert_eq!(info.ppid, nix::unistd::getppid().as_raw() as u32);
        assert!(info.start_time > 0);
        assert!(info.rss_bytes() > 0);
        assert_eq!(info.nspid.last(), Some(&me));
    }

    fn own_peer() -> Peer {
        Peer {
            pid: std::process::id(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            pidfd: pidfd_open(std::process::id()).ok(),
        }
    }

    #[test]
    fn self_registration_passes_and_a_stranger_is_refused() {
        let peer = own_peer();
        let me = std::process::id();
        let v = verify(&peer, me, None).expect("myself");
        assert_eq!(v.pid, me);
        assert!(v.born_before_ns > 0);
        assert_eq!(verify(&peer, 0, None).expect("pid 0 is myself").pid, me);
        // a process that is neither us nor our child: a child's child
        let mut outer = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(outer.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("grandchild pid");
        let grandchild: u32 = line.trim().parse().expect("pid");
        let r = verify(&peer, grandchild, None);
        let _ = std::process::Command::new("kill")
            .arg(grandchild.to_string())
            .status();
        let _ = outer.wait();
        assert!(matches!(r, Err(Refusal::NotSelfOrChild { .. })), "{r:?}");
        let wrong_start = ProcInfo::read(me).expect("own facts").start_time + 1;
        assert!(matches!(
            verify(&peer, me, Some(wrong_start)),
            Err(Refusal::Recycled { .. })
        ));
    }

    #[test]
    fn a_zombie_child_is_refused() {
        let peer = own_peer();
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = child.id();
        // exited but not reaped: wait until /proc says so
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ProcInfo::read(pid).expect("zombie still in /proc").exited() {
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let r = verify(&peer, pid, None);
        assert_eq!(r.map(|v| v.pid), Err(Refusal::Exited(pid)));
        child.wait().expect("reap");
    }
}
