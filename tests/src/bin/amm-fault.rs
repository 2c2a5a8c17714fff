//! `amm-fault`: a process the integration tests drive line by line on stdin
//! to fault, free and map memory, and to act as an agent client. Every
//! command answers one line on stdout: `ok ...` or `err ...`.
//!
//! Commands:
//! - `touch MIB`: map MIB MiB of anonymous memory and write every page; `ok ADDR`
//! - `thread-touch MIB`: the same, faulted by a second thread; `ok ADDR`
//! - `reserve MIB`: map MIB MiB of anonymous memory without touching it; `ok ADDR`
//! - `free`: unmap everything `touch` mapped; `ok`
//! - `churn N MIB`: map MIB MiB, then N times write every page and give
//!   them back (each round crosses the levels up and back down); `ok`
//! - `file PATH MIB`: map MIB MiB of a file read-only and read every page; `ok ADDR LEN`
//! - `status`: `ok VMHWM_BYTES VMRSS_BYTES`
//! - `pid`: `ok PID START_TIME` (the pid as this process sees it)
//! - `ids`: `ok RUID EUID RGID EGID`
//! - `exec PATH` / `thread-exec PATH`: exec PATH (another amm-fault, say a
//!   setuid copy) from the main thread or from a second thread; the new
//!   program answers `ok PID` when it is ready
//! - `child`: start `sleep 3600` as a child; `ok PID` (as this process sees it)
//! - `zombie`: start a child that exits at once and leave it unreaped; `ok PID`
//!   once /proc shows it a zombie
//! - `reap PID`: reap that zombie; `ok`
//! - `spawn`: start another amm-fault as a child; `ok PID`
//! - `to-child LINE`: send LINE to that child; its answer, as it gave it
//! - `connect SOCKET`: connect to an agent; `ok`
//! - `register PID [START_TIME]`: register with limit 1 GiB (PID 0: myself);
//!   `ok PID RSS` (the pid the agent knows it by) or `err REASON`
//! - `register-direct PID LIMIT_MIB`: register with a ring buffer of our own
//!   and a limit in MiB; `ok RSS` or `err REASON`
//! - `register-kill PID LIMIT_MIB`: the same, with the kernel's SIGKILL at
//!   terminate; `ok PID RSS` or `err REASON`
//! - `register-agent-kill PID LIMIT_MIB`: the same, the agent sending
//!   SIGKILL through its pidfd; `ok PID RSS` or `err REASON`
//! - `unregister-host`: unregister the pid the last registration answered
//!   with; `ok`
//! - `status-pids`: ask the agent's status; `ok PID...` of the watches shown
//! - `timeline PID`: ask the agent for PID's timeline; `ok SAMPLES` or `err REASON`
//! - `flood SOCKET N`: open N more connections to the agent and hold them;
//!   `ok OPENED REFUSED FIRST_REFUSAL`; `unflood` closes them
//! - `event`, `event-within MS`: wait up to 10 s (MS ms) for one event;
//!   `ok JSON` or `err ...`
//! - `ring-event`, `ring-event-within MS`: the same on our own ring
//! - `drain`: read every event waiting on the socket and our own ring;
//!   `ok SOCKET_EVENTS RING_EVENTS`
//! - `account N`: push N accounting splits for the pid last registered; `ok`
//! - `exit`: exit 0

use std::io::{BufRead, Write};
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use amm_integration_tests::Faulter;
use amm_integration_tests::region::{Region, page_size as page};
use amm_protocol::{Client, Registration};
use nix::sys::mman::{MapFlags, ProtFlags, mmap};

fn map_file(path: &str, mib: usize) -> Result<(usize, usize), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let len = mib << 20;
    let length = NonZeroUsize::new(len).ok_or("mmap: 0 MiB maps nothing")?;
    // SAFETY: a new read-only private mapping of an open file, no address
    // asked for; it stays mapped for the rest of the process (the test
    // reads its pages' accounting).
    let p = unsafe {
        mmap(
            None,
            length,
            ProtFlags::PROT_READ,
            MapFlags::MAP_PRIVATE,
            &f,
            0,
        )
    }
    .map_err(|e| format!("mmap: {}", std::io::Error::from(e)))?;
    let base = p.as_ptr() as usize;
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

/// Set by `exec`: the new program says it is ready.
const ANNOUNCE: &str = "AMM_FAULT_ANNOUNCE";

#[derive(Default)]
struct State {
    regions: Vec<Region>,
    client: Option<Client>,
    ring: Option<amm_protocol::ring::RingReader>,
    /// The pid the last registration answered with.
    registered: Option<u32>,
    flood: Vec<Client>,
    children: Vec<std::process::Child>,
    /// A child amm-fault driven through `to-child`.
    worker: Option<Faulter>,
}

/// Waits up to 10 s until /proc shows `pid` a zombie.
fn wait_zombie(pid: u32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn touch(mib: &str, cmd: &str, regions: &mut Vec<Region>) -> String {
    let made = mib
        .parse::<usize>()
        .map_err(|e| e.to_string())
        .and_then(|m| Region::new(m << 20).map_err(|e| e.to_string()));
    let r = match made {
        Ok(r) => r,
        Err(e) => return format!("err {e}"),
    };
    match cmd {
        "touch" => r.touch(),
        "thread-touch" => {
            let (base, len) = (r.addr(), r.len());
            let done = std::thread::spawn(move || {
                for off in (0..len).step_by(page()) {
                    // SAFETY: inside the mapping `r` keeps alive until joined.
                    unsafe { std::ptr::write_volatile((base + off) as *mut u8, 1) };
                }
            })
            .join();
            if done.is_err() {
                return "err the touching thread panicked".into();
            }
        }
        _ => {}
    }
    let addr = r.addr();
    regions.push(r);
    format!("ok {addr}")
}

fn churn(n: &str, mib: &str) -> String {
    let (Ok(n), Ok(mib)) = (n.parse::<usize>(), mib.parse::<usize>()) else {
        return "err give a count and MiB".into();
    };
    let r = match Region::new(mib << 20) {
        Ok(r) => r,
        Err(e) => return format!("err {e}"),
    };
    for _ in 0..n {
        r.touch();
        r.release();
    }
    "ok".into()
}

fn exec(path: &str, from_thread: bool) -> String {
    use std::os::unix::process::CommandExt;
    let path = path.to_string();
    let run = move || {
        let e = std::process::Command::new(&path).env(ANNOUNCE, "1").exec();
        format!("err exec {path}: {e}")
    };
    if from_thread {
        std::thread::spawn(run)
            .join()
            .unwrap_or_else(|_| "err the exec thread panicked".into())
    } else {
        run()
    }
}

fn register(c: &mut Client, reg: &Registration) -> Result<amm_protocol::Registered, String> {
    c.register(reg).map_err(|e| e.to_string())
}

fn flood(socket: &str, n: &str, held: &mut Vec<Client>) -> String {
    let Ok(n) = n.parse::<usize>() else {
        return "err give a count".into();
    };
    let (mut opened, mut refused, mut first) = (0, 0, String::from("-"));
    for _ in 0..n {
        match Client::connect(Path::new(socket), "flood", Duration::from_secs(10)) {
            Ok(c) => {
                held.push(c);
                opened += 1;
            }
            Err(e) => {
                if refused == 0 {
                    first = e.to_string().replace(' ', "_");
                }
                refused += 1;
            }
        }
    }
    format!("ok {opened} {refused} {first}")
}

/// The registration a `register*` command asks for, or why it is wrong.
fn registration(words: &[&str]) -> Option<Result<Registration, String>> {
    let pid = |p: &str| p.parse::<u32>().map_err(|e| format!("pid {p:?}: {e}"));
    let mib = |m: &str| m.parse::<u64>().map_err(|e| format!("limit {m:?}: {e}"));
    let kill = |by| -> Result<Registration, String> {
        let (p, m) = (pid(words[1])?, mib(words[2])?);
        Ok(Registration {
            direct: true,
            terminate_signal: Some(9),
            terminate_by: by,
            ..Registration::new(p, m << 20)
        })
    };
    Some(match words {
        ["register", p, rest @ ..] => pid(p).map(|p| Registration {
            start_time: rest.first().and_then(|s| s.parse().ok()),
            ..Registration::new(p, 1 << 30)
        }),
        ["register-direct", p, m] => pid(p).and_then(|p| {
            Ok(Registration {
                direct: true,
                ..Registration::new(p, mib(m)? << 20)
            })
        }),
        ["register-kill", _, _] => kill(amm_protocol::TerminateBy::Kernel),
        ["register-agent-kill", _, _] => kill(amm_protocol::TerminateBy::Agent),
        _ => return None,
    })
}

impl State {
    /// `register*`: `ok PID RSS` (`register-direct`: `ok RSS`).
    fn register_command(&mut self, words: &[&str]) -> Option<String> {
        let reg = match registration(words)? {
            Ok(r) => r,
            Err(e) => return Some(format!("err {e}")),
        };
        let Some(c) = self.client.as_mut() else {
            return Some("err connect first".into());
        };
        Some(match register(c, &reg) {
            Ok(r) => {
                self.registered = Some(r.pid);
                if r.ring.is_some() {
                    self.ring = r.ring;
                }
                if words[0] == "register-direct" {
                    format!("ok {}", r.rss_bytes)
                } else {
                    format!("ok {} {}", r.pid, r.rss_bytes)
                }
            }
            Err(e) => format!("err {e}"),
        })
    }

    fn agent_command(&mut self, words: &[&str]) -> Option<String> {
        Some(match words {
            ["connect", sock] => {
                match Client::connect(Path::new(sock), "amm-fault", Duration::from_secs(10)) {
                    Ok(c) => {
                        self.client = Some(c);
                        "ok".into()
                    }
                    Err(e) => format!("err {e}"),
                }
            }
            ["unregister-host"] => match (self.client.as_mut(), self.registered.take()) {
                (Some(c), Some(pid)) => match c.unregister(pid) {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("err {e}"),
                },
                _ => "err nothing registered".into(),
            },
            ["register-direct", pid, limit_mib] => {
                let parsed = (pid.parse::<u32>(), limit_mib.parse::<u64>());
                match (self.client.as_mut(), parsed) {
                    (Some(c), (Ok(pid), Ok(mib))) => {
                        let reg = Registration {
                            direct: true,
                            ..Registration::new(pid, mib << 20)
                        };
                        match register(c, &reg) {
                            Ok(r) => {
                                self.ring = r.ring;
                                format!("ok {}", r.rss_bytes)
                            }
                            Err(e) => format!("err {e}"),
                        }
                    }
                    _ => "err connect first, and give a pid and a limit".into(),
                }
            }
            ["status-pids"] => match self.client.as_mut().map(|c| c.status()) {
                Some(Ok(s)) => {
                    let pids: Vec<String> = s.watches.iter().map(|w| w.pid.to_string()).collect();
                    format!("ok {}", pids.join(" "))
                }
                Some(Err(e)) => format!("err {e}"),
                None => "err connect first".into(),
            },
            ["flood", sock, n] => flood(sock, n, &mut self.flood),
            ["unflood"] => {
                self.flood.clear();
                "ok".into()
            }
            ["drain"] => self.drain(),
            ["account", n] => self.account(n),
            ["timeline", pid] => match (self.client.as_mut(), pid.parse::<u32>()) {
                (Some(c), Ok(pid)) => match c.timeline(pid) {
                    Ok(t) => format!("ok {}", t.len()),
                    Err(e) => format!("err {e}"),
                },
                _ => "err connect first, and give a pid".into(),
            },
            _ => return None,
        })
    }

    fn event_command(&mut self, words: &[&str]) -> Option<String> {
        let json = |e: &amm_protocol::EventMessage| serde_json::to_string(e).unwrap_or_default();
        let within = |ms: Option<&&str>| {
            Duration::from_millis(ms.and_then(|m| m.parse().ok()).unwrap_or(10_000))
        };
        Some(match words {
            ["ring-event" | "ring-event-within", ms @ ..] => match self.ring.as_mut() {
                Some(r) => match r.recv(Some(within(ms.first()))) {
                    Ok(Some(raw)) => match amm_protocol::EventMessage::from_kernel(&raw) {
                        Some(e) => format!("ok {}", json(&e)),
                        None => "err unknown record".into(),
                    },
                    Ok(None) => "err no event in time".into(),
                    Err(e) => format!("err {e}"),
                },
                None => "err no ring".into(),
            },
            ["event" | "event-within", ms @ ..] => match self.client.as_mut() {
                Some(c) => match c.next_event(Some(within(ms.first()))) {
                    Ok(Some(e)) => format!("ok {}", json(&e)),
                    Ok(None) => "err no event in time".into(),
                    Err(e) => format!("err {e}"),
                },
                None => "err connect first".into(),
            },
            _ => return None,
        })
    }

    fn process_command(&mut self, words: &[&str], line: &str) -> String {
        match words {
            [cmd @ ("touch" | "reserve" | "thread-touch"), mib] => {
                touch(mib, cmd, &mut self.regions)
            }
            ["free"] => {
                self.regions.clear();
                "ok".into()
            }
            ["churn", n, mib] => churn(n, mib),
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
            ["ids"] => {
                use nix::unistd::{getegid, geteuid, getgid, getuid};
                format!("ok {} {} {} {}", getuid(), geteuid(), getgid(), getegid())
            }
            ["exec", path] => exec(path, false),
            ["thread-exec", path] => exec(path, true),
            _ => format!("err unknown command {line:?}"),
        }
    }

    fn children_command(&mut self, words: &[&str]) -> Option<String> {
        Some(match words {
            ["zombie"] => match std::process::Command::new("true").spawn() {
                Ok(c) => {
                    let pid = c.id();
                    self.children.push(c);
                    if wait_zombie(pid) {
                        format!("ok {pid}")
                    } else {
                        "err the child did not exit".into()
                    }
                }
                Err(e) => format!("err {e}"),
            },
            ["reap", pid] => match self
                .children
                .iter()
                .position(|c| c.id().to_string() == *pid)
            {
                Some(i) => match self.children.remove(i).wait() {
                    Ok(_) => "ok".into(),
                    Err(e) => format!("err {e}"),
                },
                None => "err no such child".into(),
            },
            ["spawn"] => match Faulter::spawn_command(std::process::Command::new(
                std::env::current_exe().unwrap_or_default(),
            )) {
                Ok(f) => {
                    let pid = f.pid();
                    self.worker = Some(f);
                    format!("ok {pid}")
                }
                Err(e) => format!("err {e}"),
            },
            ["to-child", rest @ ..] => match self.worker.as_mut() {
                Some(w) => {
                    let line = rest.join(" ");
                    match w.try_cmd(&line) {
                        Ok(reply) => reply,
                        Err(e) => format!("err the child: {e}"),
                    }
                }
                None => "err spawn first".into(),
            },
            ["child"] => match std::process::Command::new("sleep").arg("3600").spawn() {
                Ok(c) => {
                    let pid = c.id();
                    self.children.push(c);
                    format!("ok {pid}")
                }
                Err(e) => format!("err {e}"),
            },
            _ => return None,
        })
    }

    fn command(&mut self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(r) = self.register_command(&words) {
            return r;
        }
        if let Some(r) = self.agent_command(&words) {
            return r;
        }
        if let Some(r) = self.children_command(&words) {
            return r;
        }
        if let Some(r) = self.event_command(&words) {
            return r;
        }
        self.process_command(&words, line)
    }
}

impl State {
    fn drain(&mut self) -> String {
        let mut on_socket = 0;
        if let Some(c) = self.client.as_mut() {
            loop {
                match c.next_event(Some(Duration::from_millis(1))) {
                    Ok(Some(_)) => on_socket += 1,
                    Ok(None) => break,
                    Err(e) => return format!("err {e}"),
                }
            }
        }
        let mut on_ring = 0;
        if let Some(r) = self.ring.as_mut() {
            while r.next_event().is_some() {
                on_ring += 1;
            }
        }
        format!("ok {on_socket} {on_ring}")
    }

    fn account(&mut self, n: &str) -> String {
        let (Some(c), Some(pid), Ok(n)) = (self.client.as_mut(), self.registered, n.parse::<u64>())
        else {
            return "err register first, and give a count".into();
        };
        for i in 0..n {
            let process = status_bytes("VmRSS:");
            let t_ns = amm_record::sys::monotonic_ns();
            let msg = amm_protocol::ClientMessage::Accounting {
                pid,
                t_ns,
                split: amm_protocol::Split {
                    process,
                    managed: process / 2,
                    unmanaged_live: process / 4,
                    hoarded: process / 8,
                    non_heap: process / 8,
                    spilled: i,
                    unmanaged_recent: 0,
                },
                heap: None,
            };
            if let Err(e) = c.send_message(&msg) {
                return format!("err {e}");
            }
        }
        "ok".into()
    }
}

impl Drop for State {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    if std::env::var_os(ANNOUNCE).is_some() {
        // SAFETY: single-threaded here; nothing else reads the environment.
        unsafe { std::env::remove_var(ANNOUNCE) };
        let _ = writeln!(out, "ok {}", std::process::id());
        let _ = out.flush();
    }
    let mut state = State::default();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "exit" {
            let _ = writeln!(out, "ok");
            let _ = out.flush();
            drop(state);
            std::process::exit(0);
        }
        let reply = state.command(&line);
        if writeln!(out, "{reply}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}
