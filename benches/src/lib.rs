//! Shared pieces of amm's scenario benchmarks: statistics, memory touching,
//! a controllable child process, and finding the built binaries.
//!
//! [`dask`] runs one trial of the real-Dask baseline of the spike benchmark;
//! [`spike_table`] turns trials into its Markdown table.

pub mod dask;
pub mod spike_table;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The directory holding this binary (`target/<profile>`).
pub fn profile_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// CLOCK_MONOTONIC now, in ns (the clock of the kernel's event stamps).
pub fn monotonic_ns() -> u64 {
    amm_agent::server::monotonic_ns()
}

/// Page size in bytes.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Pins the calling thread to one CPU (less noise on a small VM).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// An anonymous mapping that can be faulted in and released repeatedly.
pub struct Region {
    base: *mut u8,
    len: usize,
}

impl Region {
    /// Maps `len` bytes without touching them.
    pub fn new(len: usize) -> Result<Self> {
        // SAFETY: anonymous private mapping, no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap of {len} bytes: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            base: p.cast(),
            len,
        })
    }

    /// Writes one byte per page (one fault per page when released before).
    pub fn touch(&self) {
        for off in (0..self.len).step_by(page_size()) {
            // SAFETY: off < len, inside our writable mapping.
            unsafe { std::ptr::write_volatile(self.base.add(off), 1) };
        }
    }

    /// Gives the pages back (MADV_DONTNEED): the next touch faults again.
    pub fn release(&self) {
        // SAFETY: the range is our own mapping.
        unsafe { libc::madvise(self.base.cast(), self.len, libc::MADV_DONTNEED) };
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.len / page_size()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Median, p99 and max of a sample (sorted in place). Empty → zeros.
pub fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// A child process (this binary re-executed with `--child`) that touches
/// and frees memory on command, one line each way.
pub struct Toucher {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Toucher {
    /// Starts `exe --child`.
    pub fn spawn(exe: &Path) -> Result<Self> {
        let mut child = Command::new(exe)
            .arg("--child")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command and waits for its `ok`.
    pub fn cmd(&mut self, line: &str) -> Result<()> {
        self.send(line)?;
        self.wait_ok(line)
    }

    /// Sends one command without waiting.
    pub fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Waits for the `ok` of the command sent last.
    pub fn wait_ok(&mut self, line: &str) -> Result<()> {
        let mut reply = String::new();
        self.stdout.read_line(&mut reply)?;
        if reply.trim() != "ok" {
            bail!("child answered {reply:?} to {line:?}");
        }
        Ok(())
    }
}

impl Drop for Toucher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side of [`Toucher`]: `touch MIB` maps and touches MIB MiB,
/// `free` unmaps all of it, `quit` exits. Never returns.
pub fn toucher_main() -> ! {
    let mut regions = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut w = line.split_whitespace();
        match (w.next(), w.next().and_then(|n| n.parse::<usize>().ok())) {
            (Some("touch"), Some(mib)) => match Region::new(mib << 20) {
                Ok(r) => {
                    r.touch();
                    regions.push(r);
                }
                Err(_) => break,
            },
            (Some("free"), _) => regions.clear(),
            _ => break,
        }
        if writeln!(out, "ok").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    std::process::exit(0)
}

/// Sleeps a little between trials so each starts from quiet.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(20));
}
