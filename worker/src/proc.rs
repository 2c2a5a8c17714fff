//! Reading memory as the kernel counts it: this process's (`/proc/self`)
//! and, through the `procfs` crate, a supervised program's (`/proc/PID`).
//! Every /proc read of the worker and its nanny is here.

use std::io;

use amm_protocol::sys::page_size;
use serde::Serialize;

/// Resident set size in bytes (`/proc/self/statm` field 2: FILE + ANON +
/// SHMEM pages). Cheap enough to call after every eviction.
pub fn rss_bytes() -> io::Result<u64> {
    Ok(statm()?.resident)
}

/// `/proc/self/statm` in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Statm {
    /// Resident bytes (FILE + ANON + SHMEM).
    pub resident: u64,
    /// Resident file-backed and shared-memory bytes (FILE + SHMEM).
    pub shared: u64,
}

impl Statm {
    /// Resident anonymous bytes (ANON).
    pub fn anon(&self) -> u64 {
        self.resident.saturating_sub(self.shared)
    }
}

/// Reads `/proc/self/statm`.
pub fn statm() -> io::Result<Statm> {
    let text = std::fs::read_to_string("/proc/self/statm")?;
    parse_statm(&text, page_size() as u64)
        .ok_or_else(|| io::Error::other(format!("cannot parse /proc/self/statm: {text:?}")))
}

fn parse_statm(text: &str, page: u64) -> Option<Statm> {
    let mut it = text.split_ascii_whitespace().skip(1);
    let resident: u64 = it.next()?.parse().ok()?;
    let shared: u64 = it.next()?.parse().ok()?;
    Some(Statm {
        resident: resident * page,
        shared: shared * page,
    })
}

/// A `kB` field of `/proc/self/status` (e.g. `VmHWM`), in bytes.
pub fn status_field(name: &str) -> io::Result<Option<u64>> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    Ok(kb_field(&text, name))
}

/// Finds `Name:   123 kB` in `/proc/.../status` or `/proc/meminfo` text and
/// returns it in bytes.
pub fn kb_field(text: &str, name: &str) -> Option<u64> {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(name)
            && let Some(rest) = rest.strip_prefix(':')
        {
            let mut it = rest.split_ascii_whitespace();
            let v: u64 = it.next()?.parse().ok()?;
            return Some(match it.next() {
                Some("kB") => v * 1024,
                _ => v,
            });
        }
    }
    None
}

/// The peak RSS of this process (`VmHWM`), which the kernel keeps exactly,
/// spikes between two polls included.
pub fn peak_rss_bytes() -> io::Result<u64> {
    status_field("VmHWM")?.ok_or_else(|| io::Error::other("no VmHWM in /proc/self/status"))
}

/// A process's resident memory by kind, bytes (`/proc/PID/status`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RssParts {
    /// `RssAnon`.
    pub anon: u64,
    /// `RssFile`.
    pub file: u64,
    /// `RssShmem`.
    pub shmem: u64,
}

impl RssParts {
    /// All resident bytes, as the kernel's RSS counts them.
    pub fn total(&self) -> u64 {
        self.anon + self.file + self.shmem
    }
}

/// The resident memory of process `pid`.
pub fn rss_of(pid: u32) -> io::Result<RssParts> {
    let status = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.status())
        .map_err(io::Error::other)?;
    let kb = |v: Option<u64>| v.unwrap_or(0) * 1024;
    Ok(RssParts {
        anon: kb(status.rssanon),
        file: kb(status.rssfile),
        shmem: kb(status.rssshmem),
    })
}

/// The start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/PID/stat`), which names it uniquely with its pid.
pub fn start_time(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.starttime)
}

/// OOM kills on the whole machine so far (`oom_kill` of `/proc/vmstat`),
/// when the kernel reports it.
pub fn vmstat_oom_kills() -> Option<u64> {
    let v = procfs::vmstat().ok()?;
    v.get("oom_kill").map(|&n| n.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_statm() {
        let s = parse_statm("1000 250 50 10 0 300 0\n", 4096).expect("parse");
        assert_eq!(s.resident, 250 * 4096);
        assert_eq!(s.shared, 50 * 4096);
        assert_eq!(s.anon(), 200 * 4096);
    }

    #[test]
    fn parses_kb_fields() {
        let t = "VmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(kb_field(t, "VmHWM"), Some(2048 * 1024));
        assert_eq!(kb_field(t, "Threads"), Some(3));
        assert_eq!(kb_field(t, "VmRSS"), None);
    }

    #[test]
    fn another_process_is_read_through_procfs() {
        let me = std::process::id();
        let parts = rss_of(me).expect("rss");
        assert!(parts.total() > 0 && parts.anon > 0, "{parts:?}");
        assert!(start_time(me).is_some());
        assert!(rss_of(u32::MAX / 2).is_err());
    }

    #[test]
    fn this_process_has_rss() {
        assert!(rss_bytes().expect("statm") > 0);
        assert!(peak_rss_bytes().expect("hwm") >= rss_bytes().expect("statm") / 2);
    }
}
