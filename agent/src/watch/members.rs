//! Which processes a watch covers: one pid, the children of a parent
//! (`--follow`, a nanny's worker across restarts) or every process in a
//! cgroup (`--cgroup`). Each process is admitted once, pinned as the
//! agent pins a registration ([`identity::pin`]: a pidfd opened before its
//! facts are read, checked alive after), so the facts (parent, cgroup,
//! uids, start time, credentials) are the pinned task's. The kernel watch
//! is bound to that task ([`Binding`]): a recycled pid number is a new
//! task the probe never matches, and a setuid/setgid or file-capability
//! exec ends the watch (the kernel's credentials event).
//!
//! A caller that is not root (its real uid) is only shown its own
//! processes: another user's process in the cgroup, or re-parented to the
//! followed parent, is refused and never watched.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use amm_cgroup::MemoryCgroup;
use anyhow::{Context, Result, bail};
use procfs::process::Process;

use crate::identity::{self, ProcInfo};
use crate::probe::Binding;

/// What to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// This one process.
    Pid(u32),
    /// Every child of this process, present and future (a nanny's worker
    /// across restarts).
    Follow(u32),
    /// Every process that is or comes to be in this cgroup (its directory).
    Cgroup(PathBuf),
}

/// One admitted process.
#[derive(Debug)]
pub struct Member {
    /// Its pid.
    pub pid: u32,
    /// The pidfd that pins it.
    pub pidfd: OwnedFd,
    /// Its start time (clock ticks after boot): with the pid, its identity.
    pub start_time: u64,
    /// What the kernel watch is bound to: the task (started before it was
    /// pinned) and the credentials it had when admitted.
    pub binding: Binding,
    /// Its memory cgroup, read while pinned.
    pub cgroup: Option<MemoryCgroup>,
}

/// Why a process was not admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// It exited (or its pid was gone) before it could be pinned.
    #[error("pid {0} exited before it could be watched")]
    Gone(u32),
    /// It is no longer where it was found (another parent or cgroup).
    #[error("pid {pid} is no longer {place}")]
    Moved {
        /// The pid.
        pid: u32,
        /// Where it was expected.
        place: String,
    },
    /// It belongs to another user and the caller is not root.
    #[error(
        "pid {pid} runs as uid {owner}, not as your uid {caller}: not watched (only root may watch other users' processes)"
    )]
    OtherUser {
        /// The pid.
        pid: u32,
        /// One of its uids that is not the caller's.
        owner: u32,
        /// The caller's real uid.
        caller: u32,
    },
}

/// The caller's real uid: who asked, even through a setuid binary.
pub fn caller_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The rule for another user's process: root may watch any; anyone else
/// only a process whose every uid is theirs.
pub fn check_owner(pid: u32, info: &ProcInfo, caller: u32) -> Result<(), Refusal> {
    match info.uids.iter().find(|&&u| u != caller) {
        Some(&owner) if caller != 0 => Err(Refusal::OtherUser { pid, owner, caller }),
        _ => Ok(()),
    }
}

/// Finds and admits the processes of a [`Scope`].
#[derive(Debug)]
pub struct Finder {
    scope: Scope,
    caller: u32,
    /// The followed parent, pinned.
    parent: Option<(OwnedFd, u64)>,
    /// The cgroup watched.
    cgroup: Option<MemoryCgroup>,
    /// (pid, start time) already admitted or refused: never again.
    seen: HashSet<(u32, u64)>,
}

impl Finder {
    /// A finder for `scope`, as `caller` (a real uid). Refuses a followed
    /// parent or a single pid of another user when the caller is not root.
    pub fn new(scope: Scope, caller: u32) -> Result<Self> {
        let (parent, cgroup) = match &scope {
            Scope::Pid(_) => (None, None),
            Scope::Follow(p) => {
                let fd = identity::pidfd_open(*p)
                    .with_context(|| format!("cannot open pid {p}: is it running?"))?;
                let info = ProcInfo::read(*p).with_context(|| format!("cannot read pid {p}"))?;
                check_owner(*p, &info, caller)?;
                if identity::pidfd_exited(&fd) || info.exited() {
                    bail!("pid {p} has exited: there are no children to follow");
                }
                (Some((fd, info.start_time)), None)
            }
            Scope::Cgroup(dir) => (None, Some(cgroup_at(dir)?)),
        };
        Ok(Self {
            scope,
            caller,
            parent,
            cgroup,
            seen: HashSet::new(),
        })
    }

    /// The scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// True when nothing new can come: the followed parent has exited, or
    /// the cgroup was removed. (A single pid: after its first admission.)
    pub fn exhausted(&self) -> bool {
        match &self.scope {
            Scope::Pid(_) => !self.seen.is_empty(),
            Scope::Follow(_) => self
                .parent
                .as_ref()
                .is_none_or(|(fd, _)| identity::pidfd_exited(fd)),
            Scope::Cgroup(_) => self
                .cgroup
                .as_ref()
                .is_none_or(|c| !c.dir.join("cgroup.procs").exists()),
        }
    }

    /// The pids to consider now (not yet pinned: a list to check).
    fn candidates(&self) -> Vec<u32> {
        match &self.scope {
            Scope::Pid(_) if !self.seen.is_empty() => Vec::new(),
            Scope::Pid(p) => vec![*p],
            Scope::Follow(p) => children_of(*p),
            Scope::Cgroup(_) => self
                .cgroup
                .as_ref()
                .map_or_else(Vec::new, |c| c.pids().unwrap_or_default()),
        }
    }

    /// New processes in the scope, admitted or refused (each refusal
    /// reported once per task).
    pub fn discover(&mut self) -> Vec<Result<Member, Refusal>> {
        let mut out = Vec::new();
        for pid in self.candidates() {
            match self.admit(pid) {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => {}
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    /// Pins `pid`, reads its facts, checks them; `Ok(None)` when already
    /// seen.
    fn admit(&mut self, pid: u32) -> Result<Option<Member>, Refusal> {
        let Ok(pinned) = identity::pin(pid) else {
            return self.unpinned(pid);
        };
        let info = ProcInfo::read(pid).map_err(|_| Refusal::Gone(pid))?;
        if !self.seen.insert((pid, info.start_time)) {
            return Ok(None);
        }
        if info.exited() {
            return Err(Refusal::Gone(pid));
        }
        check_owner(pid, &info, self.caller)?;
        let cgroup = amm_cgroup::find_for_pid(Path::new("/"), pid).ok().flatten();
        self.check_place(pid, &info, cgroup.as_ref())?;
        // alive after the reads: they were the pinned task's
        if identity::pidfd_exited(&pinned.pidfd) {
            return Err(Refusal::Gone(pid));
        }
        Ok(Some(Member {
            pid,
            binding: pinned.binding_with_credentials(&info),
            pidfd: pinned.pidfd,
            start_time: info.start_time,
            cgroup,
        }))
    }

    /// A process that could not be pinned (it exited): refused once per
    /// task, however long its zombie waits for its parent, never watched.
    fn unpinned(&mut self, pid: u32) -> Result<Option<Member>, Refusal> {
        match ProcInfo::read(pid) {
            // the exited task itself; a running task that took the pid
            // since is tried again (pinned) next time
            Ok(info) if info.exited() && !self.seen.insert((pid, info.start_time)) => Ok(None),
            _ => Err(Refusal::Gone(pid)),
        }
    }

    /// Is the pinned process where the scope says?
    fn check_place(
        &self,
        pid: u32,
        info: &ProcInfo,
        cgroup: Option<&MemoryCgroup>,
    ) -> Result<(), Refusal> {
        let ok = match &self.scope {
            Scope::Pid(_) => true,
            Scope::Follow(p) => {
                info.ppid == *p
                    && self.parent.as_ref().is_some_and(|(fd, start)| {
                        // the parent is still the one pinned, and older
                        !identity::pidfd_exited(fd) && *start <= info.start_time
                    })
            }
            Scope::Cgroup(_) => cgroup
                .zip(self.cgroup.as_ref())
                .is_some_and(|(a, b)| a.dir == b.dir),
        };
        if ok {
            return Ok(());
        }
        let place = match &self.scope {
            Scope::Follow(p) => format!("a child of pid {p}"),
            Scope::Cgroup(d) => format!("in cgroup {}", d.display()),
            Scope::Pid(p) => format!("pid {p}"),
        };
        Err(Refusal::Moved { pid, place })
    }
}

/// The children of `pid` (every thread's), through one /proc/PID handle.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(p) = Process::new(pid as i32) else {
        return Vec::new();
    };
    let Ok(tasks) = p.tasks() else {
        return Vec::new();
    };
    let mut out: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| t.children().ok())
        .flatten()
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The memory cgroup at directory `dir` (as given to `--cgroup`).
fn cgroup_at(dir: &Path) -> Result<MemoryCgroup> {
    amm_cgroup::MemoryCgroup::at_dir(dir)
        .with_context(|| format!("cannot read the cgroup {}", dir.display()))?
        .with_context(|| {
            format!(
                "{} is not a memory cgroup: give a directory under a v1 memory hierarchy \
                 (/sys/fs/cgroup/memory/...) or a v2 cgroup with the memory controller",
                dir.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(uids: [u32; 4]) -> ProcInfo {
        ProcInfo {
            state: 'S',
            ppid: 1,
            uids,
            gids: [0; 4],
            cap_permitted: 0,
            nspid: vec![42],
            start_time: 7,
            rss_anon: 0,
            rss_file: 0,
            rss_shmem: 0,
            faults: 0,
        }
    }

    #[test]
    fn another_users_process_is_refused_unless_the_caller_is_root() {
        let theirs = info([0, 0, 0, 0]);
        assert_eq!(
            check_owner(42, &theirs, 1000),
            Err(Refusal::OtherUser {
                pid: 42,
                owner: 0,
                caller: 1000
            })
        );
        // a setuid program: one uid is not the caller's
        assert!(check_owner(42, &info([1000, 0, 1000, 0]), 1000).is_err());
        assert_eq!(check_owner(42, &info([1000; 4]), 1000), Ok(()));
        assert_eq!(check_owner(42, &theirs, 0), Ok(()));
    }

    #[test]
    fn children_of_this_process_include_a_new_child() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        // proc(5): a `children` file "is reliable only if all of the child
        // processes are stopped or frozen"; `--follow` reads it every poll,
        // so a child missed once is found by a later poll. Ask as it does.
        let mut kids = Vec::new();
        for _ in 0..100 {
            kids = children_of(std::process::id());
            if kids.contains(&c.id()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let parent = Process::new(c.id() as i32)
            .and_then(|p| p.stat())
            .map(|s| s.ppid);
        let _ = c.kill();
        let _ = c.wait();
        assert!(
            kids.contains(&c.id()),
            "100 polls never listed {} (its parent: {parent:?}; last read {kids:?})",
            c.id()
        );
    }
}
