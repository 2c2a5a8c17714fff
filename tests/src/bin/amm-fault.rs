//! `amm-fault`: a process the integration tests drive line by line on stdin
//! to fault, free and map memory, and to act as an agent client. Every
//! command answers one line on stdout: `ok ...` or `err ...`.
//!
//! Commands:
//! - `touch MIB`: map MIB MiB of anonymous memory and write every page; `ok ADDR`
//! - `reserve MIB`: map MIB MiB of anonymous memory without touching it; `ok ADDR`
//! - `free`: unmap everything `touch` mapped; `ok`
//! - `file PATH MIB`: map MIB MiB of a file read-only and read every page; `ok ADDR LEN`
//! - `status`: `ok VMHWM_BYTES VMRSS_BYTES`
//! - `pid`: `ok PID START_TIME`
//! - `connect SOCKET`: connect to an agent; `ok`
//! - `register PID [START_TIME]`: register with limit 1 GiB; `ok RSS` or `err REASON`
//! - `register-direct PID LIMIT_MIB`: register with a ring buffer of our own
//!   and a limit in MiB; `ok RSS` or `err REASON`
//! - `event`: wait up to 10 s for one event; `ok JSON` or `err ...`
//! - `ring-event`: wait up to 10 s for one event on our own ring; `ok JSON`
//! - `exit`: exit 0

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use amm_integration_tests::region::{Region, page_size as page};
use amm_protocol::{Client, Registration};

fn map_file(path: &str, mib: usize) -> Result<(usize, usize), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let len = mib << 20;
    // SAFETY: read-only private mapping of an open file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let base = p as usize;
    let mut sum = 0u64;
    for off in (0..len).step_by(page()) {
        // SAFETY: off < len, inside the readable mapping.
        sum += u64::from(unsafe { std::ptr::read_volatile((base + off) as *const u8) });
    }
    std::hint::black_box(sum);
    Ok((base, len))
}

fn status_bytes(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn start_time() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    s.rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().nth(19))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut regions: Vec<Region> = Vec::new();
    let mut client: Option<Client> = None;
    let mut ring: Option<amm_protocol::ring::RingReader> = None;
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            [cmd @ ("touch" | "reserve"), mib] => {
                let made = mib
                    .parse::<usize>()
                    .map_err(|e| e.to_string())
                    .and_then(|m| Region::new(m << 20).map_err(|e| e.to_string()));
                match made {
                    Ok(r) => {
                        if *cmd == "touch" {
                            r.touch();
                        }
                        let addr = r.addr();
                        regions.push(r);
                        format!("ok {addr}")
                    }
                    Err(e) => format!("err {e}"),
                }
            }
            ["free"] => {
                regions.clear();
                "ok".into()
            }
            ["file", path, mib] => {
                match mib
                    .parse()
                    .map_err(|e| format!("{e}"))
                    .and_then(|m| map_file(path, m))
                {
                    Ok((base, len)) => format!("ok {base} {len}"),
                    Err(e) => format!("err {e}"),
                }
            }
            ["status"] => format!("ok {} {}", status_bytes("VmHWM:"), status_bytes("VmRSS:")),
            ["pid"] => format!("ok {} {}", std::process::id(), start_time()),
            ["connect", sock] => {
                match Client::connect(Path::new(sock), "amm-fault", Duration::from_secs(10)) {
                    Ok(c) => {
                        client = Some(c);
                        "ok".into()
                    }
                    Err(e) => format!("err {e}"),
                }
            }
            ["register", pid, rest @ ..] => match (client.as_mut(), pid.parse::<u32>()) {
                (Some(c), Ok(pid)) => {
                    let reg = Registration {
                        start_time: rest.first().and_then(|s| s.parse().ok()),
                        ..Registration::new(pid, 1 << 30)
                    };
                    match c.register(&reg) {
                        Ok(r) => format!("ok {}", r.rss_bytes),
                        Err(e) => format!("err {e}"),
                    }
                }
                _ => "err connect first, and give a pid".into(),
            },
            ["register-direct", pid, limit_mib] => {
                match (
                    client.as_mut(),
                    pid.parse::<u32>(),
                    limit_mib.parse::<u64>(),
                ) {
                    (Some(c), Ok(pid), Ok(mib)) => {
                        let reg = Registration {
                            direct: true,
                            ..Registration::new(pid, mib << 20)
                        };
                        match c.register(&reg) {
                            Ok(r) => {
                                ring = r.ring;
                                format!("ok {}", r.rss_bytes)
                            }
                            Err(e) => format!("err {e}"),
                        }
                    }
                    _ => "err connect first, and give a pid and a limit".into(),
                }
            }
            ["ring-event"] => match ring.as_mut() {
                Some(r) => match r.recv(Some(Duration::from_secs(10))) {
                    Ok(Some(raw)) => match amm_protocol::EventMessage::from_kernel(&raw) {
                        Some(e) => format!("ok {}", serde_json::to_string(&e).unwrap_or_default()),
                        None => "err unknown record".into(),
                    },
                    Ok(None) => "err no event within 10 s".into(),
                    Err(e) => format!("err {e}"),
                },
                None => "err no ring".into(),
            },
            ["event"] => match client.as_mut() {
                Some(c) => match c.next_event(Some(Duration::from_secs(10))) {
                    Ok(Some(e)) => format!("ok {}", serde_json::to_string(&e).unwrap_or_default()),
                    Ok(None) => "err no event within 10 s".into(),
                    Err(e) => format!("err {e}"),
                },
                None => "err connect first".into(),
            },
            ["exit"] => {
                let _ = writeln!(out, "ok");
                let _ = out.flush();
                std::process::exit(0);
            }
            _ => format!("err unknown command {line:?}"),
        };
        if writeln!(out, "{reply}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}
