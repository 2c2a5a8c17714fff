//! Support for amm's integration tests: find the real binaries, start a real
//! agent, drive `amm-fault` children, and decide whether a root-only test
//! may run here.
//!
//! Tests that need root and BPF skip *visibly* outside CI (a `SKIPPED` line
//! on the terminal, not swallowed by the harness) and fail in CI, where
//! `AMM_REQUIRE_BPF=1` is set by `.ci/run`.
//!
//! [`cgroup`] gives tests and benchmarks a real hard memory limit
//! ([`cgroup::HardLimit`]).

pub mod cgroup;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// True when this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a test that needs root and BPF can run. Outside CI it prints a
/// visible `SKIPPED` line and returns false; with `AMM_REQUIRE_BPF=1` it
/// panics instead, so CI never skips silently.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("AMM_REQUIRE_BPF").is_some_and(|v| v == "1") {
        panic!("{test} needs root (BPF) and AMM_REQUIRE_BPF=1 forbids skipping it");
    }
    // written to the raw stderr handle, which the test harness does not capture
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root to load BPF (run `sudo cargo xtask test`)"
    );
    false
}

/// The cargo target directory these tests were built into
/// (`target/<profile>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path of a workspace binary; panics with the command to build it.
pub fn bin(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run the tests with `cargo xtask test`, which builds every binary first",
        p.display()
    );
    p
}

/// The BPF object the tests load (built by `cargo xtask build-ebpf`).
pub fn bpf_object() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(amm_ebpf::OBJECT_RELATIVE_PATH);
    assert!(
        p.exists(),
        "{} is missing; build it with `cargo xtask build-ebpf`",
        p.display()
    );
    p
}

/// A running `amm-fault` child driven line by line.
pub struct Faulter {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Faulter {
    /// Starts one as this user.
    pub fn spawn() -> Result<Self> {
        Self::spawn_with(Command::new(bin("amm-fault")))
    }

    /// Starts one as another user (the caller must be root).
    pub fn spawn_as(uid: u32, gid: u32) -> Result<Self> {
        let mut c = Command::new(bin("amm-fault"));
        // std drops root's supplementary groups itself when uid is set
        c.uid(uid).gid(gid);
        Self::spawn_with(c)
    }

    fn spawn_with(mut c: Command) -> Result<Self> {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start amm-fault")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
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

    /// Sends a command and returns the text after `ok ` (errors on `err`).
    pub fn cmd(&mut self, line: &str) -> Result<String> {
        let reply = self.try_cmd(line)?;
        match reply.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => bail!("amm-fault `{line}` answered: {reply}"),
        }
    }

    /// Sends a command and returns the raw reply line.
    pub fn try_cmd(&mut self, line: &str) -> Result<String> {
        writeln!(self.stdin, "{line}").context("amm-fault is gone")?;
        self.stdin.flush()?;
        let mut reply = String::new();
        if self.stdout.read_line(&mut reply)? == 0 {
            bail!("amm-fault closed its output after `{line}`");
        }
        Ok(reply.trim().to_string())
    }

    /// VmHWM and VmRSS of the child, in bytes.
    pub fn hwm_rss(&mut self) -> Result<(u64, u64)> {
        let s = self.cmd("status")?;
        let mut it = s.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(h)), Some(Ok(r))) => Ok((h, r)),
            _ => bail!("bad status line {s:?}"),
        }
    }

    /// Asks it to exit and reaps it.
    pub fn exit(mut self) -> Result<()> {
        let _ = self.try_cmd("exit");
        self.child.wait()?;
        Ok(())
    }

    /// Kills and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Faulter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `amm-agent run` on a socket in a temporary directory.
pub struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent with a world-connectable socket (tests connect as
    /// other users too) and waits until it accepts connections.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let socket = dir.path().join("agent.sock");
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = Command::new(bin("amm-agent"))
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .args(["--socket-mode", "0666", "--hello-timeout-ms", "1000"])
            .args(["--frame-timeout-ms", "500", "--bpf-object"])
            .arg(bpf_object())
            .env("AMM_LOG", "debug")
            .stderr(log)
            .spawn()
            .context("cannot start amm-agent")?;
        let mut agent = Self {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&agent.socket).is_ok() {
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("amm-agent exited ({status}); its log:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "amm-agent did not listen within 20 s; its log:\n{}",
            agent.log()
        )
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the agent process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        self.socket
            .parent()
            .map(|d| std::fs::read_to_string(d.join("agent.log")).unwrap_or_default())
            .unwrap_or_default()
    }

    /// A connected, welcomed client.
    pub fn client(&self) -> Result<amm_protocol::Client> {
        Ok(amm_protocol::Client::connect(
            &self.socket,
            "test",
            Duration::from_secs(10),
        )?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first so it removes its socket, then make sure
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
