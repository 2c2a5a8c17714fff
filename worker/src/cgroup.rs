//! The memory cgroup this process lives in (v1 or v2): its limits and usage.
//!
//! Everything is read below a root directory (`/` in production, a fixture
//! directory in tests): `<root>/proc/self/cgroup` names the cgroup,
//! `<root>/proc/self/mountinfo` says where its hierarchy is mounted, and the
//! files of the cgroup and of its ancestors up to the mount's root give the
//! limits. On a hybrid host (v1 memory controller plus a v2 hierarchy without
//! it, as on the development VM) the v1 memory controller wins.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

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
    super_opts: String,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        out.push(Mount {
            root: unescape(l[3]),
            point: unescape(l[4]),
            fstype: r[0].to_string(),
            super_opts: r[2].to_string(),
        });
    }
    out
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

/// Finds the process's memory cgroup below `root`. `Ok(None)` when the
/// process is in no memory cgroup that is mounted (no controller, or no
/// `/proc/self/cgroup`).
pub fn find(root: &Path) -> io::Result<Option<MemoryCgroup>> {
    let cg_file = under(root, "/proc/self/cgroup");
    let cg = match fs::read_to_string(&cg_file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mi_file = under(root, "/proc/self/mountinfo");
    let mounts = match fs::read_to_string(&mi_file) {
        Ok(t) => parse_mountinfo(&t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut v1_path = None;
    let mut v2_path = None;
    for line in cg.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            v2_path = Some(path.to_string());
        } else if ctrls.split(',').any(|c| c == "memory") {
            v1_path = Some(path.to_string());
        }
    }
    if let Some(path) = v1_path {
        for m in &mounts {
            if m.fstype == "cgroup"
                && m.super_opts.split(',').any(|o| o == "memory")
                && let Some(dir) = cgroup_dir(root, m, &path)
            {
                return Ok(Some(MemoryCgroup {
                    version: Version::V1,
                    dir,
                    mount: under(root, &m.point),
                    path,
                }));
            }
        }
        // No mountinfo (a bare fixture): the conventional place.
        let mount = under(root, "/sys/fs/cgroup/memory");
        if mount.is_dir() {
            let dir = mount.join(path.trim_start_matches('/'));
            return Ok(Some(MemoryCgroup {
                version: Version::V1,
                dir,
                mount,
                path,
            }));
        }
    }
    if let Some(path) = v2_path {
        let mount = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .map(|m| (cgroup_dir(root, m, &path), under(root, &m.point)));
        let (dir, mount) = match mount {
            Some((Some(dir), mount)) => (dir, mount),
            Some((None, _)) => return Ok(None),
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
        if has_memory {
            return Ok(Some(MemoryCgroup {
                version: Version::V2,
                dir,
                mount,
                path,
            }));
        }
    }
    Ok(None)
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

    /// Usage, page cache and OOM kills of the cgroup (`None` if unreadable).
    pub fn usage(&self) -> Option<CgroupUsage> {
        let (usage_file, stat_keys, events_file) = match self.version {
            Version::V1 => (
                "memory.usage_in_bytes",
                &["total_cache", "cache"][..],
                "memory.oom_control",
            ),
            Version::V2 => ("memory.current", &["file"][..], "memory.events"),
        };
        let usage: u64 = read_trimmed(&self.dir.join(usage_file))?.parse().ok()?;
        let stat = read_trimmed(&self.dir.join("memory.stat")).unwrap_or_default();
        let file = stat_keys.iter().find_map(|k| keyed(&stat, k)).unwrap_or(0);
        let events = read_trimmed(&self.dir.join(events_file)).unwrap_or_default();
        Some(CgroupUsage {
            usage,
            file,
            oom_kills: keyed(&events, "oom_kill").unwrap_or(0),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
