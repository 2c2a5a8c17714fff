//! Helpers for the integration tests: run the real `amm-worker` binary,
//! optionally inside a real memory cgroup (v1 `memory.limit_in_bytes`, or v2
//! `memory.max`), and read its summary and timeline.
#![allow(dead_code, missing_docs)]

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

pub const MIB: u64 = 1 << 20;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_amm-worker")
}

/// True when running as root. Otherwise prints a SKIPPED line and returns
/// false — unless `AMM_REQUIRE_ROOT=1`, in which case the test fails.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("AMM_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test} needs root and AMM_REQUIRE_ROOT=1 forbids skipping it");
    }
    // Straight to the stderr handle: the test harness captures println!
    // and eprintln!, and this line must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test} needs root");
    false
}

/// A memory cgroup made for one test, under this process's own memory
/// cgroup, removed on drop.
pub struct TestCgroup {
    pub dir: PathBuf,
    pub v2: bool,
}

fn own_memory_cgroup() -> Option<(PathBuf, bool)> {
    let cg = amm_cgroup::find(Path::new("/")).ok()??;
    Some((cg.dir, cg.version == amm_cgroup::Version::V2))
}

impl TestCgroup {
    /// Creates `amm-test-<name>-<pid>` with a hard limit of `limit` bytes.
    pub fn new(name: &str, limit: u64) -> TestCgroup {
        let (parent, v2) = own_memory_cgroup().expect("no memory cgroup found for this process");
        let dir = parent.join(format!("amm-test-{name}-{}", std::process::id()));
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(dir.join(file), limit.to_string())
            .unwrap_or_else(|e| panic!("cannot set {file}: {e}"));
        if v2 {
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        } else {
            // No swap on the test machines; keep it that way if memsw exists.
            let _ = std::fs::write(dir.join("memory.swappiness"), "0");
        }
        TestCgroup { dir, v2 }
    }

    /// Makes `cmd`'s process join this cgroup before it execs.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let fd = procs.as_raw_fd();
        // SAFETY: the closure only calls write(2) on an fd that stays open
        // (moved into the closure) — async-signal-safe, allocation-free.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = &procs;
                let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                if r == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }

    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// OOM kills recorded by the kernel for this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let f = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        amm_cgroup::keyed(&self.read(f), "oom_kill").unwrap_or(0)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes that are still inside (there should be none) are killed.
        for _ in 0..100 {
            let procs = self.read("cgroup.procs");
            if procs.trim().is_empty() {
                break;
            }
            for p in procs.split_whitespace() {
                if let Ok(pid) = p.parse::<i32>() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not remove {}", self.dir.display());
    }
}

/// What a finished run left.
pub struct Run {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub summary: Option<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(out: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let summary = stdout.lines().rev().find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
        });
        Run {
            code: out.status.code(),
            signal: out.status.signal(),
            summary,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn summary(&self) -> &Value {
        self.summary.as_ref().unwrap_or_else(|| {
            panic!(
                "no JSON summary (code {:?}, signal {:?})\nstdout:\n{}\nstderr:\n{}",
                self.code, self.signal, self.stdout, self.stderr
            )
        })
    }

    pub fn u64(&self, key: &str) -> u64 {
        self.summary()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("summary has no integer {key}: {}", self.summary()))
    }

    pub fn describe(&self) -> String {
        format!(
            "code {:?} signal {:?}\nsummary: {}\nstderr (tail):\n{}",
            self.code,
            self.signal,
            self.summary
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            tail(&self.stderr, 3000)
        )
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A scratch directory with a workload file and paths for the run.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn workload(&self, name: &str, toml: &str) -> PathBuf {
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, toml).expect("write workload");
        p
    }
}

/// A `run` command with the usual test settings (fast polling, no colour,
/// spill directory inside the scratch dir).
pub fn worker_cmd(scratch: &Scratch, workload: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("run")
        .arg(workload)
        .arg("--local-directory")
        .arg(scratch.path("spill"))
        .args(extra)
        .env("AMM_LOG", "info")
        .env_remove("AMM_ALLOCATOR")
        .env_remove("MALLOC_TRIM_THRESHOLD_")
        .stdin(Stdio::null());
    c
}

pub fn run(mut cmd: Command) -> Run {
    Run::from_output(cmd.output().expect("spawn amm-worker"))
}

/// Reads a timeline file.
pub fn timeline(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn ticks(tl: &[Value]) -> Vec<&Value> {
    tl.iter().filter(|v| v["kind"] == "tick").collect()
}

pub fn events<'a>(tl: &'a [Value], name: &str) -> Vec<&'a Value> {
    tl.iter()
        .filter(|v| v["kind"] == "event" && v["event"] == name)
        .collect()
}

/// Index in the timeline of the first event `name` (matching `pred`).
pub fn first_event(tl: &[Value], name: &str, pred: impl Fn(&Value) -> bool) -> Option<usize> {
    tl.iter()
        .position(|v| v["kind"] == "event" && v["event"] == name && pred(v))
}

/// The last tick line at or before index `i`.
pub fn tick_before(tl: &[Value], i: usize) -> Option<&Value> {
    tl[..=i].iter().rev().find(|v| v["kind"] == "tick")
}

pub fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer {key} in {v}"))
}

/// A real small file system (a tmpfs with `size=`) mounted at a directory
/// for one test, unmounted when dropped. Needs root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`8m`, `160m`) at `dir`, making it first.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mkdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs failed");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
