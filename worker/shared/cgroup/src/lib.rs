//! The memory cgroup of a process (v1 or v2): where it is, the limits that
//! apply to it ([`MemoryCgroup::limits`], [`MemoryCgroup::hard_limit`]), its
//! usage, its OOM kills and its members ([`MemoryCgroup::pids`]).
//! amm-worker reads its own ([`find`]); `amm-agent watch --limit auto`
//! reads another process's ([`find_for_pid`]).
//!
//! Everything is read below a root directory (`/` in production, a fixture
//! directory in tests): `<root>/proc/<self|PID>/cgroup` names the cgroup,
//! `<root>/proc/<self|PID>/mountinfo` says where its hierarchy is mounted
//! (both parsed by the `procfs` crate), and the files of the cgroup and of
//! its ancestors up to the mount's root give the limits. On a hybrid host
//! (v1 memory controller plus a v2 hierarchy without it, as on the
//! development VM) the v1 memory controller wins.
//!
//! [`memory_backed_fs`] (nix's `fstatfs`) says whether a directory is on
//! tmpfs or ramfs, whose files are memory charged to the cgroup of their
//! writer (a spill directory there frees nothing: amm-worker and amm_dask
//! warn at start).
//!
//! This is the workspace's one cgroup reader: amm-worker (its limit, the
//! memory manager, the nanny and the `-- CMD` supervisor), `amm-agent
//! watch` (`--limit auto`, `--cgroup`, the OOM kills at a watch's end),
//! amm_dask and the tests' support use it. It never writes a cgroup.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{FsType, TMPFS_MAGIC, fstatfs};
use procfs::FromRead;
use procfs::ProcessCGroups;
use procfs::process::MountInfos;
use serde::Serialize;

/// cgroup v1 reports "no limit" as a huge page-rounded number; anything at or
/// above this is unlimited.
const V1_UNLIMITED: u64 = 1 << 62;

/// Which cgroup interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Version {
    /// cgroup v1 `memory` controller.
    V1,
    /// cgroup v2 unified hierarchy.
    V2,
}

/// The memory cgroup of the process.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryCgroup {
    /// v1 or v2.
    pub version: Version,
    /// The cgroup's directory (under the root given to [`find`]).
    pub dir: PathBuf,
    /// The mount point of the hierarchy (the walk for limits stops there).
    pub mount: PathBuf,
    /// The cgroup path as `/proc/self/cgroup` names it.
    pub path: String,
}

/// One limit file that applies to the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupLimit {
    /// The limit in bytes.
    pub bytes: u64,
    /// The file it was read from.
    pub file: PathBuf,
}

impl CgroupLimit {
    /// A hard limit (v1 `memory.limit_in_bytes`, v2 `memory.max`): the
    /// kernel OOM-kills at it. The others (soft limit, `memory.high`)
    /// reclaim or throttle.
    pub fn is_hard(&self) -> bool {
        self.file
            .file_name()
            .is_some_and(|n| n == "memory.limit_in_bytes" || n == "memory.max")
    }
}

/// What the cgroup is charged for right now (the timeline contract's type:
/// each tick carries it).
pub use amm_timeline::CgroupUsage;

fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Mount {
    root: String,
    point: String,
    fstype: String,
    memory_controller: bool,
}

/// The mounts of a `mountinfo` file, parsed by `procfs` (which leaves the
/// octal escapes of paths as they are).
fn mounts_of(infos: MountInfos) -> Vec<Mount> {
    infos
        .into_iter()
        .map(|m| Mount {
            root: unescape(&m.root),
            point: unescape(&m.mount_point.to_string_lossy()),
            memory_controller: m.super_options.contains_key("memory"),
            fstype: m.fs_type,
        })
        .collect()
}

/// Joins the mount point with the part of `path` below the mount's root.
fn cgroup_dir(root: &Path, mount: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path.trim_start_matches('/')
    } else {
        path.strip_prefix(mount.root.as_str())?
            .trim_start_matches('/')
    };
    let base = under(root, &mount.point);
    Some(if rel.is_empty() { base } else { base.join(rel) })
}

/// Finds this process's memory cgroup below `root`. `Ok(None)` when the
/// process is in no memory cgroup that is mounted (no controller, or no
/// `/proc/self/cgroup`).
pub fn find(root: &Path) -> io::Result<Option<MemoryCgroup>> {
    find_in(root, "self")
}

/// Finds the memory cgroup of process `pid` below `root`, from
/// `/proc/PID/cgroup` and `/proc/PID/mountinfo` (the process's own view of
/// the mounts). The caller makes sure the pid still names the process it
/// means after the call (a pidfd that has not exited).
pub fn find_for_pid(root: &Path, pid: u32) -> io::Result<Option<MemoryCgroup>> {
    find_in(root, &pid.to_string())
}

/// Reads a `/proc` file of `who` with `procfs`; `Ok(None)` when absent.
fn read_proc<T: FromRead>(root: &Path, who: &str, file: &str) -> io::Result<Option<T>> {
    let path = under(root, &format!("/proc/{who}/{file}"));
    match T::from_file(&path) {
        Ok(v) => Ok(Some(v)),
        Err(procfs::ProcError::NotFound(_)) => Ok(None),
        Err(e) => Err(io::Error::other(format!("{}: {e}", path.display()))),
    }
}

fn find_in(root: &Path, who: &str) -> io::Result<Option<MemoryCgroup>> {
    let Some(cg) = read_proc::<ProcessCGroups>(root, who, "cgroup")? else {
        return Ok(None);
    };
    let mounts = read_proc::<MountInfos>(root, who, "mountinfo")?
        .map(mounts_of)
        .unwrap_or_default();
    let mut v1_path = None;
    let mut v2_path = None;
    for line in cg {
        if line.hierarchy == 0 && line.controllers.is_empty() {
            v2_path = Some(line.pathname);
        } else if line.controllers.iter().any(|c| c == "memory") {
            v1_path = Some(line.pathname);
        }
    }
    if let Some(path) = v1_path
        && let Some(cg) = v1_cgroup(root, &mounts, path)
    {
        return Ok(Some(cg));
    }
    Ok(v2_path.and_then(|path| v2_cgroup(root, &mounts, path)))
}

/// The v1 memory cgroup at `path`, where its hierarchy is mounted.
fn v1_cgroup(root: &Path, mounts: &[Mount], path: String) -> Option<MemoryCgroup> {
    for m in mounts {
        if m.fstype == "cgroup"
            && m.memory_controller
            && let Some(dir) = cgroup_dir(root, m, &path)
        {
            return Some(MemoryCgroup {
                version: Version::V1,
                dir,
                mount: under(root, &m.point),
                path,
            });
        }
    }
    // No mountinfo (a bare fixture): the conventional place.
    let mount = under(root, "/sys/fs/cgroup/memory");
    mount.is_dir().then(|| MemoryCgroup {
        version: Version::V1,
        dir: mount.join(path.trim_start_matches('/')),
        mount,
        path,
    })
}

/// The v2 cgroup at `path`, if the memory controller is enabled there.
fn v2_cgroup(root: &Path, mounts: &[Mount], path: String) -> Option<MemoryCgroup> {
    let mount = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| (cgroup_dir(root, m, &path), under(root, &m.point)));
    let (dir, mount) = match mount {
        Some((Some(dir), mount)) => (dir, mount),
        Some((None, _)) => return None,
        None => {
            let mount = under(root, "/sys/fs/cgroup");
            (mount.join(path.trim_start_matches('/')), mount)
        }
    };
    // A v2 hierarchy without the memory controller (hybrid host) has no
    // memory.* files; the root cgroup has only memory.stat.
    let has_memory = ancestors(&dir, &mount)
        .iter()
        .any(|d| d.join("memory.max").exists() || d.join("memory.stat").exists());
    has_memory.then_some(MemoryCgroup {
        version: Version::V2,
        dir,
        mount,
        path,
    })
}

/// The cgroup's directory and its ancestors up to and including the mount.
fn ancestors(dir: &Path, mount: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut d = dir;
    while d != mount {
        match d.parent() {
            Some(p) if p.starts_with(mount) => {
                out.push(p.to_path_buf());
                d = p;
            }
            _ => break,
        }
    }
    out
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Reads one limit file: `None` when absent or unlimited (`max`, or v1's
/// huge sentinel).
fn read_limit(path: &Path) -> Result<Option<u64>, String> {
    let Some(text) = read_trimmed(path) else {
        return Ok(None);
    };
    if text == "max" || text.is_empty() {
        return Ok(None);
    }
    let v: u64 = text
        .parse()
        .map_err(|_| format!("{}: cannot parse {text:?} as bytes", path.display()))?;
    Ok(if v >= V1_UNLIMITED { None } else { Some(v) })
}

impl MemoryCgroup {
    /// The limit files that are set, on the cgroup and its ancestors: v1
    /// `memory.limit_in_bytes` and `memory.soft_limit_in_bytes`, v2
    /// `memory.max` and `memory.high`.
    pub fn limits(&self) -> Result<Vec<CgroupLimit>, String> {
        let files: &[&str] = match self.version {
            Version::V1 => &["memory.limit_in_bytes", "memory.soft_limit_in_bytes"],
            Version::V2 => &["memory.max", "memory.high"],
        };
        let mut out = Vec::new();
        for d in ancestors(&self.dir, &self.mount) {
            for f in files {
                let file = d.join(f);
                if let Some(bytes) = read_limit(&file)? {
                    out.push(CgroupLimit { bytes, file });
                }
            }
        }
        Ok(out)
    }

    /// The memory cgroup at directory `dir` (a path a user gave): v1 when
    /// it has `memory.limit_in_bytes`, v2 when it has `memory.max` or is a
    /// v2 root (`memory.stat`); its mount is the topmost ancestor that is
    /// still a cgroup (has `cgroup.procs`). `Ok(None)`: not a memory cgroup.
    pub fn at_dir(dir: &Path) -> io::Result<Option<MemoryCgroup>> {
        let dir = fs::canonicalize(dir)?;
        let version = if dir.join("memory.limit_in_bytes").exists() {
            Version::V1
        } else if dir.join("memory.max").exists() || dir.join("memory.stat").exists() {
            Version::V2
        } else {
            return Ok(None);
        };
        let mut mount = dir.as_path();
        while let Some(p) = mount.parent() {
            if !p.join("cgroup.procs").exists() {
                break;
            }
            mount = p;
        }
        let path = format!("/{}", dir.strip_prefix(mount).unwrap_or(&dir).display());
        Ok(Some(MemoryCgroup {
            version,
            mount: mount.to_path_buf(),
            dir,
            path,
        }))
    }

    /// The processes in the cgroup now (`cgroup.procs`): pids to check,
    /// not identities (a pid read here may exit and be reused at once).
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let text = fs::read_to_string(self.dir.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// The lowest hard limit on the cgroup and its ancestors (v1
    /// `memory.limit_in_bytes`, v2 `memory.max`): where the kernel
    /// OOM-kills its processes. `Ok(None)` when unlimited all the way up.
    pub fn hard_limit(&self) -> Result<Option<CgroupLimit>, String> {
        Ok(self
            .limits()?
            .into_iter()
            .filter(CgroupLimit::is_hard)
            .min_by_key(|c| c.bytes))
    }

    /// OOM kills in this cgroup so far (`oom_kill` of v1
    /// `memory.oom_control` / v2 `memory.events`); `None` when the kernel
    /// does not count them or the file is unreadable.
    pub fn oom_kills(&self) -> Option<u64> {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        keyed(&read_trimmed(&self.dir.join(file))?, "oom_kill")
    }

    /// Usage, page cache and OOM kills of the cgroup (`None` if unreadable).
    pub fn usage(&self) -> Option<CgroupUsage> {
        let (usage_file, stat_keys) = match self.version {
            Version::V1 => ("memory.usage_in_bytes", &["total_cache", "cache"][..]),
            Version::V2 => ("memory.current", &["file"][..]),
        };
        let usage: u64 = read_trimmed(&self.dir.join(usage_file))?.parse().ok()?;
        let stat = read_trimmed(&self.dir.join("memory.stat")).unwrap_or_default();
        let file = stat_keys.iter().find_map(|k| keyed(&stat, k)).unwrap_or(0);
        Some(CgroupUsage {
            usage,
            file,
            oom_kills: self.oom_kills().unwrap_or(0),
        })
    }
}

/// `key value` lines (memory.stat, memory.events, memory.oom_control).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// `statfs` type of ramfs (linux/magic.h; not in nix or libc).
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// The memory-backed file system (`"tmpfs"`, `"ramfs"`) that the directory
/// or file `fd` is on, if it is one. A file written there stays in RAM (or
/// swap) and is charged to the memory cgroup of the process that wrote it,
/// so a worker that spills there moves memory from its heap to its page
/// cache and frees none of what its cgroup's limit counts.
pub fn memory_backed_fs(fd: impl AsFd) -> Option<&'static str> {
    match fstatfs(fd).ok()?.filesystem_type() {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procfs_is_not_a_memory_backed_file_system() {
        let proc = fs::File::open("/proc").expect("open /proc");
        assert_eq!(memory_backed_fs(&proc), None);
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn walks_ancestors_to_mount() {
        let a = ancestors(Path::new("/m/a/b"), Path::new("/m"));
        assert_eq!(
            a,
            vec![
                PathBuf::from("/m/a/b"),
                PathBuf::from("/m/a"),
                PathBuf::from("/m")
            ]
        );
    }

    #[test]
    fn keyed_lines() {
        let t = "cache 100\nrss 5\ntotal_cache 300\n";
        assert_eq!(keyed(t, "total_cache"), Some(300));
        assert_eq!(keyed(t, "cache"), Some(100));
        assert_eq!(keyed(t, "nope"), None);
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, text).expect("write");
    }

    /// Another process's cgroup on a v2 host: `memory.max` is read up the
    /// tree (the scope says `max`, its slice 1 GiB), `memory.high` is not a
    /// hard limit, and the OOM kills come from `memory.events`.
    #[test]
    fn v2_fixture_of_another_process_gives_its_hard_limit() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        write(root, "proc/4242/cgroup", "0::/system.slice/dask.service\n");
        write(
            root,
            "proc/4242/mountinfo",
            "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        // our own cgroup is elsewhere and must not be read
        write(root, "proc/self/cgroup", "0::/user.slice\n");
        let d = "sys/fs/cgroup";
        write(root, &format!("{d}/memory.stat"), "anon 0\n");
        write(
            root,
            &format!("{d}/system.slice/memory.max"),
            "1073741824\n",
        );
        write(
            root,
            &format!("{d}/system.slice/dask.service/memory.max"),
            "max\n",
        );
        write(
            root,
            &format!("{d}/system.slice/dask.service/memory.high"),
            "536870912\n",
        );
        write(
            root,
            &format!("{d}/system.slice/dask.service/memory.events"),
            "low 0\nhigh 3\nmax 7\noom 2\noom_kill 2\n",
        );
        write(root, &format!("{d}/user.slice/memory.max"), "4096\n");
        let cg = find_for_pid(root, 4242)
            .expect("find")
            .expect("a memory cgroup");
        assert_eq!(cg.version, Version::V2);
        assert_eq!(cg.path, "/system.slice/dask.service");
        let hard = cg.hard_limit().expect("limits").expect("a hard limit");
        assert_eq!(hard.bytes, 1 << 30);
        assert!(hard.file.ends_with("system.slice/memory.max"), "{hard:?}");
        assert_eq!(cg.oom_kills(), Some(2));
        // unlimited all the way up: no hard limit (memory.high is not one)
        write(root, &format!("{d}/system.slice/memory.max"), "max\n");
        assert_eq!(cg.hard_limit().expect("limits"), None);
        // a pid with no /proc entry has no cgroup
        assert!(find_for_pid(root, 4243).expect("find").is_none());
    }

    #[test]
    fn a_v1_hard_limit_ignores_the_soft_one_and_the_sentinel() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        write(root, "proc/77/cgroup", "4:memory:/jobs/a\n0::/\n");
        write(
            root,
            "proc/77/mountinfo",
            "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n",
        );
        let d = "sys/fs/cgroup/memory";
        write(
            root,
            &format!("{d}/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        write(
            root,
            &format!("{d}/jobs/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        write(
            root,
            &format!("{d}/jobs/a/memory.limit_in_bytes"),
            "268435456\n",
        );
        write(
            root,
            &format!("{d}/jobs/a/memory.soft_limit_in_bytes"),
            "134217728\n",
        );
        write(
            root,
            &format!("{d}/jobs/a/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        );
        let cg = find_for_pid(root, 77)
            .expect("find")
            .expect("a memory cgroup");
        assert_eq!(cg.version, Version::V1);
        let hard = cg.hard_limit().expect("limits").expect("hard");
        assert_eq!(hard.bytes, 256 << 20);
        assert_eq!(cg.oom_kills(), Some(0));
    }
}
