//! A real hard memory limit for tests and benchmarks: a child memory cgroup
//! of this process's own (v1 `memory.limit_in_bytes` or v2 `memory.max`,
//! swap off), a way to put processes in it (before they exec, or by pid),
//! its usage, peak and OOM-kill count, and clean-up on drop (whatever is
//! still inside is killed, then the directory removed).
//!
//! The hierarchy is found as the worker finds its own limits
//! ([`amm_cgroup::find`], from `/proc/self/cgroup` and
//! `/proc/self/mountinfo`). On a hybrid host (a v1 `memory` controller next
//! to a v2 hierarchy without it) the v1 controller wins, because that is the
//! one that enforces limits there. Everything here returns errors; nothing
//! panics on what the kernel or the user can make fail.

use std::fs;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long [`HardLimit::kill_all`] and the clean-up wait for the cgroup to
/// empty, and the removal retries.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

pub use amm_cgroup::{MemoryCgroup, Version, find, find_for_pid, keyed};

/// The memory cgroup of this process (see [`find`]), or an error that says
/// what is missing.
pub fn own_memory_cgroup() -> Result<MemoryCgroup> {
    find(Path::new("/"))
        .context("cannot read this process's cgroups")?
        .context(
            "this process is in no mounted memory cgroup: mount the cgroup v1 memory controller \
         (/sys/fs/cgroup/memory) or a cgroup v2 hierarchy with the memory controller enabled",
        )
}

/// Where to create a child of `own` that may get a memory limit.
///
/// v1: `own` itself. v2: `own` if it already delegates the memory controller
/// to its children (`cgroup.subtree_control`) or can be made to (only
/// possible when it holds no process itself, the "no internal processes"
/// rule), otherwise the nearest ancestor that delegates it.
pub fn parent_for_children(own: &MemoryCgroup) -> Result<PathBuf> {
    if own.version == Version::V1 {
        return Ok(own.dir.clone());
    }
    let delegates = |d: &Path| {
        fs::read_to_string(d.join("cgroup.subtree_control"))
            .map(|s| s.split_whitespace().any(|c| c == "memory"))
            .unwrap_or(false)
    };
    if delegates(&own.dir) {
        return Ok(own.dir.clone());
    }
    if fs::write(own.dir.join("cgroup.subtree_control"), "+memory").is_ok() {
        return Ok(own.dir.clone());
    }
    let mut d = own.dir.as_path();
    while let Some(p) = d.parent() {
        if !p.starts_with(&own.mount) {
            break;
        }
        if delegates(p) {
            return Ok(p.to_path_buf());
        }
        d = p;
    }
    bail!(
        "no cgroup from {} up to {} delegates the memory controller to its children; \
         enable it with `echo +memory > {}/cgroup.subtree_control` (as root)",
        own.dir.display(),
        own.mount.display(),
        own.mount.display()
    )
}

/// Numbers the cgroups this process creates.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A child memory cgroup with a hard limit, removed (after killing whatever
/// is left in it) when dropped.
#[derive(Debug)]
pub struct HardLimit {
    dir: PathBuf,
    version: Version,
    limit: u64,
    removed: bool,
}

fn check_purpose(purpose: &str) -> Result<()> {
    if purpose.is_empty()
        || !purpose
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("cgroup purpose {purpose:?} must be non-empty ASCII letters, digits, '-' or '_'");
    }
    Ok(())
}

/// Explains an I/O error on a cgroup file in terms of what to do.
fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(n) => match Errno::from_raw(n) {
            Errno::EACCES | Errno::EPERM => " (cgroups need root: run as root)",
            Errno::EBUSY => " (the kernel refused it: the limit may be below current usage)",
            Errno::ESRCH => " (no such process: it has exited)",
            Errno::EROFS => " (the cgroup file system is mounted read-only here)",
            _ => "",
        },
        None => "",
    }
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| {
        let h = hint(&e);
        anyhow::anyhow!("cannot write {value:?} to {}: {e}{h}", path.display())
    })
}

/// True when process `pid` exists (it may be a zombie).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // signal 0 only checks for existence and permission
    matches!(kill(Pid::from_raw(pid), None), Ok(()) | Err(Errno::EPERM))
}

impl HardLimit {
    /// Creates `amm-<purpose>-<pid>-<n>` below this process's memory cgroup
    /// (see [`parent_for_children`]) with a hard limit of `limit_bytes` and no
    /// swap. Needs root.
    pub fn create(purpose: &str, limit_bytes: u64) -> Result<HardLimit> {
        let own = own_memory_cgroup()?;
        let parent = parent_for_children(&own)?;
        Self::create_in(&parent, own.version, purpose, limit_bytes)
    }

    /// Like [`HardLimit::create`], below `parent` (a directory of a memory
    /// cgroup hierarchy of `version`).
    pub fn create_in(
        parent: &Path,
        version: Version,
        purpose: &str,
        limit_bytes: u64,
    ) -> Result<HardLimit> {
        check_purpose(purpose)?;
        if limit_bytes == 0 {
            bail!(
                "a hard limit of 0 bytes would kill any process put in it; give a positive limit"
            );
        }
        let name = format!(
            "amm-{purpose}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = parent.join(name);
        fs::create_dir(&dir).map_err(|e| {
            let h = hint(&e);
            anyhow::anyhow!("cannot create cgroup {}: {e}{h}", dir.display())
        })?;
        // From here on, Drop removes the directory if setting it up fails.
        let mut me = HardLimit {
            dir,
            version,
            limit: limit_bytes,
            removed: false,
        };
        me.limit = me.set_limit(limit_bytes)?;
        Ok(me)
    }

    /// Writes the limit (and turns swap off); returns the limit the kernel
    /// keeps (v1 rounds down to a page).
    fn set_limit(&self, limit: u64) -> Result<u64> {
        match self.version {
            Version::V1 => {
                write_file(&self.dir.join("memory.limit_in_bytes"), &limit.to_string())?;
                // memory+swap no higher than memory: no swap at all. Absent
                // when the kernel does not account swap (nothing to turn off).
                let memsw = self.dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_file(&memsw, &limit.to_string())?;
                }
                let swappiness = self.dir.join("memory.swappiness");
                if swappiness.exists() {
                    write_file(&swappiness, "0")?;
                }
                self.read_u64("memory.limit_in_bytes")
            }
            Version::V2 => {
                write_file(&self.dir.join("memory.max"), &limit.to_string())?;
                let swap = self.dir.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
                let text = self.read("memory.max")?;
                match text.trim() {
                    "max" => bail!(
                        "{} still says max after writing {limit}",
                        self.dir.join("memory.max").display()
                    ),
                    t => t.parse().with_context(|| {
                        format!(
                            "{}: unexpected {t:?}",
                            self.dir.join("memory.max").display()
                        )
                    }),
                }
            }
        }
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// v1 or v2.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The hard limit in bytes, as the kernel keeps it.
    pub fn limit_bytes(&self) -> u64 {
        self.limit
    }

    /// Makes the process `cmd` spawns join this cgroup between fork and exec
    /// (it writes `0`, "myself", to `cgroup.procs`), so every page it ever
    /// touches is charged here. If joining fails, the spawn fails with the
    /// kernel's error.
    pub fn enter_before_exec(&self, cmd: &mut Command) -> Result<()> {
        let path = self.dir.join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| {
                let h = hint(&e);
                anyhow::anyhow!("cannot open {} for writing: {e}{h}", path.display())
            })?;
        // SAFETY: between fork and exec the closure only calls write(2) on a
        // descriptor it owns (nix's write is the bare call) and builds its
        // error from a code: async-signal-safe and allocation-free.
        unsafe {
            cmd.pre_exec(move || match nix::unistd::write(&procs, b"0") {
                Ok(1) => Ok(()),
                Ok(_) => Err(io::ErrorKind::WriteZero.into()),
                Err(e) => Err(e.into()),
            });
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into this cgroup. Memory it
    /// touched before stays charged where it was.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let path = self.dir.join("cgroup.procs");
        // one write(2) of the number, as the kernel wants it
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| {
                let h = hint(&e);
                anyhow::anyhow!("cannot open {}: {e}{h}", path.display())
            })?;
        f.write_all(pid.to_string().as_bytes()).map_err(|e| {
            let h = hint(&e);
            anyhow::anyhow!("cannot move pid {pid} into {}: {e}{h}", self.dir.display())
        })
    }

    /// Pids of the processes in the cgroup now.
    pub fn pids(&self) -> Result<Vec<u32>> {
        Ok(self
            .read("cgroup.procs")?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Reads one of the cgroup's files.
    pub fn read(&self, file: &str) -> Result<String> {
        let path = self.dir.join(file);
        fs::read_to_string(&path).map_err(|e| {
            let h = hint(&e);
            anyhow::anyhow!("cannot read {}: {e}{h}", path.display())
        })
    }

    fn read_u64(&self, file: &str) -> Result<u64> {
        let text = self.read(file)?;
        text.trim().parse().with_context(|| {
            format!(
                "{}: expected a number of bytes, found {:?}",
                self.dir.join(file).display(),
                text.trim()
            )
        })
    }

    /// Bytes charged to the cgroup now (`memory.usage_in_bytes` /
    /// `memory.current`): the members' anonymous memory, page cache and
    /// kernel memory.
    pub fn usage_bytes(&self) -> Result<u64> {
        match self.version {
            Version::V1 => self.read_u64("memory.usage_in_bytes"),
            Version::V2 => self.read_u64("memory.current"),
        }
    }

    /// The most ever charged to the cgroup (`memory.max_usage_in_bytes` /
    /// `memory.peak`). `None` on a v2 kernel without `memory.peak` (< 5.19).
    pub fn peak_bytes(&self) -> Result<Option<u64>> {
        match self.version {
            Version::V1 => self.read_u64("memory.max_usage_in_bytes").map(Some),
            Version::V2 if self.dir.join("memory.peak").exists() => {
                self.read_u64("memory.peak").map(Some)
            }
            Version::V2 => Ok(None),
        }
    }

    /// How many processes the kernel's OOM killer has killed in this cgroup
    /// (`oom_kill` of `memory.oom_control` / `memory.events`).
    pub fn oom_kills(&self) -> Result<u64> {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        keyed(&self.read(file)?, "oom_kill").with_context(|| {
            format!(
                "{} has no oom_kill line: the kernel is too old to count OOM kills \
                 per cgroup (v1 needs Linux 4.13+)",
                self.dir.join(file).display()
            )
        })
    }

    /// Kills every process in the cgroup and waits until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        let kill_file = self.dir.join("cgroup.kill");
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "processes {pids:?} are still in {} after SIGKILL; they may be stuck in \
                     the kernel (D state): look at /proc/PID/stack",
                    self.dir.display()
                );
            }
            if self.version == Version::V2 && kill_file.exists() {
                write_file(&kill_file, "1")?;
            } else {
                // the pids were read from this cgroup, which only we populate
                for pid in pids.into_iter().filter_map(|p| i32::try_from(p).ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills what is left inside and removes the cgroup, reporting failure
    /// (dropping does the same but can only print a warning).
    pub fn remove(mut self) -> Result<()> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        if !self.dir.exists() {
            self.removed = true;
            return Ok(());
        }
        self.kill_all()?;
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        loop {
            match fs::remove_dir(&self.dir) {
                Ok(()) => {
                    self.removed = true;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.removed = true;
                    return Ok(());
                }
                // an exiting member can keep it busy for a moment
                Err(e)
                    if Instant::now() < deadline
                        && e.raw_os_error() == Some(Errno::EBUSY as i32) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    let h = hint(&e);
                    bail!(
                        "cannot remove cgroup {}: {e}{h}; remove it by hand with rmdir once \
                         it is empty",
                        self.dir.display()
                    )
                }
            }
        }
    }

    /// Removes the cgroups `amm-<purpose>-<pid>-<n>` below this process's
    /// memory cgroup that a process which no longer exists left behind (a
    /// run killed before it could clean up), killing anything inside.
    /// Returns how many it removed.
    pub fn remove_stale(purpose: &str) -> Result<usize> {
        check_purpose(purpose)?;
        let own = own_memory_cgroup()?;
        let parent = parent_for_children(&own)?;
        let prefix = format!("amm-{purpose}-");
        let mut removed = 0;
        let entries =
            fs::read_dir(&parent).with_context(|| format!("cannot list {}", parent.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
                continue;
            };
            if alive(pid) {
                continue;
            }
            let stale = HardLimit {
                dir: entry.path(),
                version: own.version,
                limit: 0,
                removed: false,
            };
            stale.remove()?;
            removed += 1;
        }
        Ok(removed)
    }
}

impl Drop for HardLimit {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            let _ = writeln!(io::stderr(), "warning: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(cgroup: &str, mountinfo: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let proc_self = root.path().join("proc/self");
        fs::create_dir_all(&proc_self).expect("mkdir");
        fs::write(proc_self.join("cgroup"), cgroup).expect("write");
        fs::write(proc_self.join("mountinfo"), mountinfo).expect("write");
        root
    }

    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_host_uses_the_v1_memory_controller() {
        let root = fixture(
            "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n",
            HYBRID_MOUNTS,
        );
        let cg = find(root.path()).expect("find").expect("a memory cgroup");
        assert_eq!(cg.version, Version::V1);
        assert_eq!(
            cg.dir,
            root.path().join("sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(cg.mount, root.path().join("sys/fs/cgroup/memory"));
        assert_eq!(parent_for_children(&cg).expect("parent"), cg.dir);
    }

    #[test]
    fn pure_v2_walks_up_to_a_delegating_ancestor() {
        let root = fixture(
            "0::/user.slice/session-1.scope\n",
            "24 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        let mount = root.path().join("sys/fs/cgroup");
        let own = mount.join("user.slice/session-1.scope");
        fs::create_dir_all(&own).expect("mkdir");
        fs::write(mount.join("cgroup.controllers"), "cpu io memory pids\n").expect("write");
        fs::write(mount.join("cgroup.subtree_control"), "cpu memory pids\n").expect("write");
        fs::write(mount.join("user.slice/cgroup.subtree_control"), "memory\n").expect("write");
        // the memory controller shows as memory.* files in every cgroup
        fs::write(mount.join("memory.stat"), "anon 0\n").expect("write");
        fs::write(own.join("memory.max"), "max\n").expect("write");
        let cg = find(root.path()).expect("find").expect("a memory cgroup");
        assert_eq!(cg.version, Version::V2);
        assert_eq!(cg.dir, own);
        // the scope cannot delegate (in a fixture: its file does not exist
        // and cannot be created as the kernel would refuse), so the slice
        fs::create_dir_all(own.join("cgroup.subtree_control")).expect("block the write");
        assert_eq!(
            parent_for_children(&cg).expect("parent"),
            mount.join("user.slice")
        );
    }

    #[test]
    fn v2_without_the_memory_controller_is_not_a_memory_cgroup() {
        let root = fixture(
            "0::/\n",
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
        );
        fs::create_dir_all(root.path().join("sys/fs/cgroup/unified")).expect("mkdir");
        fs::write(
            root.path().join("sys/fs/cgroup/unified/cgroup.controllers"),
            "",
        )
        .expect("write");
        assert!(find(root.path()).expect("find").is_none());
    }

    #[test]
    fn namespaced_mount_root_and_escapes() {
        let root = fixture(
            "5:memory:/docker/abc/inner\n",
            "35 31 0:32 /docker/abc /sys/fs/cgroup/my\\040memory rw - cgroup cgroup rw,memory\n",
        );
        let cg = find(root.path()).expect("find").expect("a memory cgroup");
        assert_eq!(cg.dir, root.path().join("sys/fs/cgroup/my memory/inner"));
    }

    #[test]
    fn keyed_files() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(text, "oom_kill"), Some(3));
        assert_eq!(keyed(text, "oom"), None);
        assert_eq!(
            keyed("low 0\nhigh 2\nmax 5\noom 1\noom_kill 1\n", "max"),
            Some(5)
        );
    }

    #[test]
    fn bad_purposes_are_refused() {
        assert!(check_purpose("dask").is_ok());
        assert!(check_purpose("a/b").is_err());
        assert!(check_purpose("").is_err());
    }
}
