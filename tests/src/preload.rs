//! Running real programs on the preload libraries: find the libraries,
//! compile the C programs of `tests/c/` with the system's C compiler, drive
//! them, and wait for what their allocator record says.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::profile_dir;

/// Which preload library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preload {
    /// `libamm_preload.so`: jemalloc is the process's malloc.
    Jemalloc,
    /// `libamm_preload_glibc.so`: glibc malloc, observed.
    Glibc,
}

impl Preload {
    /// Both, for tests that must hold on each.
    pub const BOTH: [Preload; 2] = [Preload::Jemalloc, Preload::Glibc];

    /// The built library (`cargo xtask build` builds both).
    pub fn path(self) -> PathBuf {
        let name = match self {
            Preload::Jemalloc => "libamm_preload.so",
            Preload::Glibc => "libamm_preload_glibc.so",
        };
        let p = profile_dir().join(name);
        assert!(
            p.exists(),
            "{} is not built; run `cargo xtask build` (or the tests with `cargo xtask test`)",
            p.display()
        );
        p
    }

    /// The allocator its record names.
    pub fn allocator(self) -> amm_record::Allocator {
        match self {
            Preload::Jemalloc => amm_record::Allocator::Jemalloc,
            Preload::Glibc => amm_record::Allocator::System,
        }
    }

    /// `cmd` with this library preloaded.
    pub fn command(self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("LD_PRELOAD", self.path());
        c
    }
}

/// Compiles `tests/c/<name>.c` (with `-D` for each of `defines`) into
/// `out_dir`, returning the executable.
pub fn compile_c(name: &str, out_dir: &Path, defines: &[&str]) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("c")
        .join(format!("{name}.c"));
    let suffix: String = defines
        .iter()
        .map(|d| format!("-{}", d.to_lowercase()))
        .collect();
    let out = out_dir.join(format!("{name}{suffix}"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    let mut c = Command::new(&cc);
    c.args(["-O1", "-g", "-Wall", "-Werror", "-pthread", "-o"])
        .arg(&out)
        .arg(&src);
    for d in defines {
        c.arg(format!("-D{d}"));
    }
    let o = c
        .output()
        .with_context(|| format!("cannot run {cc}: install a C compiler (apt-get install gcc)"))?;
    if !o.status.success() {
        bail!(
            "{cc} failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(out)
}

/// A program that prints `ready PID`, then answers one line per command
/// (`tests/c/driver.c`).
pub struct Driver {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Its pid.
    pub pid: i32,
}

impl Driver {
    /// Starts `cmd` and waits for its `ready` line.
    pub fn start(mut cmd: Command) -> Result<Driver> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the test program")?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Some(pid) = line.trim().strip_prefix("ready ") else {
            bail!("the program said {line:?} instead of `ready PID`");
        };
        let pid = pid.parse()?;
        Ok(Driver {
            child,
            stdin,
            stdout,
            pid,
        })
    }

    /// Sends `line` and returns the answer.
    pub fn cmd(&mut self, line: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let mut reply = String::new();
        if self.stdout.read_line(&mut reply)? == 0 {
            bail!("the program closed its output after `{line}`");
        }
        Ok(reply.trim().to_string())
    }

    /// The next line the program prints.
    pub fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        self.stdout.read_line(&mut l)?;
        Ok(l.trim().to_string())
    }

    /// Closes its stdin and reaps it, returning its exit status.
    pub fn finish(mut self) -> Result<std::process::ExitStatus> {
        drop(self.stdin.take());
        Ok(self.child.wait()?)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 20 ms until it gives a value; panics naming `what` after
/// `within` (a bound on waiting for an event, not a timing assertion).
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens the record of `pid` as soon as it exists (panics after 60 s with
/// the last reason it could not be opened).
pub fn record_of(pid: i32) -> amm_record::Reader {
    record_where(pid, |_| true)
}

/// Opens the record of `pid` once one exists that `pred` accepts.
pub fn record_where(pid: i32, pred: impl Fn(&amm_record::Reader) -> bool) -> amm_record::Reader {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let why = match amm_record::open(pid) {
            Ok(r) if pred(&r) => return r,
            Ok(_) => "not yet the record wanted".to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "no record of {pid} within 60 s: {why}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a snapshot of `reader` satisfies `pred` and returns it.
pub fn snapshot_where(
    reader: &amm_record::Reader,
    what: &str,
    pred: impl Fn(&amm_record::Snapshot) -> bool,
) -> amm_record::Snapshot {
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = reader.snapshot() {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 60 s; last snapshot {last:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many allocator records `pid` holds open.
pub fn record_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.to_string_lossy().contains("memfd:amm-record"))
                .count()
        })
        .unwrap_or(0)
}
