//! Support for amm's integration tests: find the real binaries, start a real
//! agent, drive `amm-fault` children, and decide whether a root-only test
//! may run here.
//!
//! Tests that need root and BPF skip *visibly* outside CI (a `SKIPPED` line
//! on the terminal, not swallowed by the harness) and fail in CI, where
//! `AMM_REQUIRE_BPF=1` is set by `.ci/run`.
//!
//! [`cgroup`] gives tests and benchmarks a real hard memory limit
//! ([`cgroup::HardLimit`]); [`python`] finds the project's Python venv;
//! [`preload`] runs programs on the preload libraries.

pub mod browser;
pub mod cgroup;
pub mod http;
pub mod preload;
pub mod python;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod region;

pub use http::{HttpListener, http_get};

/// Sends `sig` to a child this test spawned and has not reaped (so its pid
/// is still its own); a child that already exited is no error.
pub fn signal_child(child: &Child, sig: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// What a root-only test needs root for: which CI variable forbids skipping
/// it and what its `SKIPPED` line says.
#[derive(Clone, Copy, Debug)]
pub enum RootFor {
    /// Loading the BPF program (`AMM_REQUIRE_BPF=1` forbids the skip).
    Bpf,
    /// A cgroup with a hard memory limit (`AMM_REQUIRE_BPF=1`, which CI
    /// sets with the BPF tests).
    Cgroup,
    /// Running programs as other uids (`AMM_REQUIRE_ROOT=1`).
    OtherUids,
}

impl RootFor {
    /// The environment variable that, set to 1, turns a skip into a failure.
    fn variable(self) -> &'static str {
        match self {
            RootFor::Bpf | RootFor::Cgroup => "AMM_REQUIRE_BPF",
            RootFor::OtherUids => "AMM_REQUIRE_ROOT",
        }
    }

    /// Why the test needs root, for the `SKIPPED` line.
    fn reason(self) -> &'static str {
        match self {
            RootFor::Bpf => "needs root to load BPF",
            RootFor::Cgroup => "needs root for a cgroup with a hard limit",
            RootFor::OtherUids => "needs root to run programs as other uids",
        }
    }
}

/// Whether a test that needs root for `why` can run. Outside CI it prints a
/// visible `SKIPPED` line and returns false; with the variable `why` names
/// set to 1 (as `.ci/run` does) it panics instead, so CI never skips
/// silently.
pub fn require_root_for(test: &str, why: RootFor) -> bool {
    if is_root() {
        return true;
    }
    let variable = why.variable();
    if std::env::var_os(variable).is_some_and(|v| v == "1") {
        panic!(
            "{test} {} and {variable}=1 forbids skipping it",
            why.reason()
        );
    }
    // written to the raw stderr handle, which the test harness does not capture
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {} (run `cargo xtask test` as root)",
        why.reason()
    );
    false
}

/// Whether a test that needs root and BPF can run: [`require_root_for`]
/// with [`RootFor::Bpf`].
pub fn require_root(test: &str) -> bool {
    require_root_for(test, RootFor::Bpf)
}

/// The cargo target directory this executable was built into
/// (`target/<profile>`), for a test (`target/<profile>/deps/NAME`) or a
/// binary (`target/<profile>/NAME`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
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

/// The next event on `client` that `pred` accepts, skipping others;
/// panics (naming `what`) if none comes within 10 s.
pub fn event_where(
    client: &mut amm_protocol::Client,
    what: &str,
    pred: impl Fn(&amm_protocol::EventMessage) -> bool,
) -> amm_protocol::EventMessage {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(Some(left.max(Duration::from_millis(1)))) {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("no {what} within 10 s"),
            Err(e) => panic!("waiting for {what}: {e}"),
        }
        assert!(Instant::now() < deadline, "no {what} within 10 s");
    }
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

    /// Starts one through a command of the caller's making (e.g. `unshare
    /// ... amm-fault`), whose stdin and stdout become the line protocol.
    pub fn spawn_command(c: Command) -> Result<Self> {
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
        self.send(line)?;
        self.wait_ok(line)
    }

    /// Waits for the answer to `line` (sent with [`Self::send`]): the text
    /// after `ok `, or an error on `err`.
    pub fn wait_ok(&mut self, line: &str) -> Result<String> {
        let reply = self.reply(line)?;
        match reply.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => bail!("amm-fault `{line}` answered: {reply}"),
        }
    }

    /// Sends a command and returns the raw reply line.
    pub fn try_cmd(&mut self, line: &str) -> Result<String> {
        self.send(line)?;
        self.reply(line)
    }

    /// Sends a command without waiting for its answer (read it with
    /// [`Self::reply`]).
    pub fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}").context("amm-fault is gone")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// The raw reply line to the command `line` sent before.
    pub fn reply(&mut self, line: &str) -> Result<String> {
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

/// A copy of amm-fault owned by root with `mode` (e.g. 0o4755: setuid),
/// in a directory every user can reach; removed when dropped.
pub struct Privileged {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Privileged {
    /// The copy with `mode`, owned by root and `group` (if given).
    pub fn copy(mode: u32, group: Option<u32>) -> Self {
        // next to the binaries: /tmp may be mounted nosuid
        let dir = tempfile::tempdir_in(profile_dir()).expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let path = dir.path().join("amm-fault-privileged");
        std::fs::copy(bin("amm-fault"), &path).expect("copy amm-fault");
        std::os::unix::fs::chown(&path, Some(0), group).expect("chown");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        Self { dir, path }
    }

    /// A copy (0755) with the file capability `cap` (`setcap` syntax).
    pub fn with_capability(cap: &str) -> Self {
        let p = Self::copy(0o755, None);
        let out = Command::new("setcap")
            .arg(cap)
            .arg(&p.path)
            .output()
            .expect("setcap (libcap2-bin) is installed");
        assert!(
            out.status.success(),
            "setcap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }

    /// The copy's path.
    pub fn path(&self) -> &Path {
        let _ = &self.dir;
        &self.path
    }
}

/// The kinds of every finding of a JSON report (`amm-report`'s
/// `stretches[].findings[].kind`), in order.
pub fn report_kinds(r: &serde_json::Value) -> Vec<String> {
    r["stretches"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["findings"].as_array().into_iter().flatten())
        .filter_map(|f| f["kind"].as_str().map(str::to_string))
        .collect()
}

/// Makes `spawn` give its process `pid`, by writing `pid - 1` to
/// `/proc/sys/kernel/ns_last_pid` before each try (root only). Other
/// processes fork on this machine meanwhile and may take the pid first: up
/// to 500 tries, each a fresh process (the misses are killed).
pub fn spawn_at_pid(pid: u32, spawn: impl Fn() -> Result<Faulter>) -> Result<Faulter> {
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1))
            .context("cannot write /proc/sys/kernel/ns_last_pid (root only)")?;
        let f = spawn()?;
        if f.pid() == pid {
            return Ok(f);
        }
        f.kill();
        // someone else holds it for now: let them go on
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("pid {pid} could not be steered to in 500 tries (busy machine?)")
}

/// A user made for one test (`useradd`), removed when dropped (`userdel`).
/// Cross-user tests need users of their own: other engineers' tests run on
/// the same machine at the same time.
#[derive(Debug)]
pub struct TestUser {
    /// Its login name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

/// Runs a user-database command, retrying while another one holds the lock.
fn user_db(cmd: &str, args: &[&str]) -> Result<()> {
    let mut last = String::new();
    for _ in 0..100 {
        let out = Command::new(cmd).args(args).output()?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        // exit 10 (and some 1s): /etc/passwd is locked by a concurrent change
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{cmd} {args:?} kept failing: {last}")
}

impl TestUser {
    /// Creates a system user with a group of its own and no home.
    pub fn create(tag: &str) -> Result<Self> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("ammt{}{tag}{n}", std::process::id());
        user_db(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ],
        )?;
        let user = nix::unistd::User::from_name(&name)?
            .with_context(|| format!("useradd made no user {name}"))?;
        Ok(Self {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = user_db("userdel", &[&self.name]);
    }
}

/// A real `amm-agent run` on a socket in a temporary directory.
pub struct Agent {
    child: Child,
    socket: PathBuf,
    extra: Vec<String>,
    /// A command the agent runs under (e.g. `setpriv ... --`), which must
    /// exec it (the pid stays the agent's).
    wrapper: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent with a world-connectable socket (tests connect as
    /// other users too) and waits until it accepts connections.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`Self::start`], with more arguments for `amm-agent run`.
    pub fn start_with(extra: &[&str]) -> Result<Self> {
        Self::start_wrapped(&[], extra)
    }

    /// Like [`Self::start_with`], the agent run under `wrapper` (a command
    /// that execs what follows it, such as `setpriv ... --`).
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let socket = dir.path().join("agent.sock");
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (extra, wrapper) = (owned(extra), owned(wrapper));
        let child = Self::spawn(&socket, &extra, &wrapper)?;
        let mut agent = Self {
            child,
            socket,
            extra,
            wrapper,
            _dir: dir,
        };
        agent.wait_listening()?;
        Ok(agent)
    }

    /// Starts the agent with `--http 127.0.0.1:0` (and `extra`) and returns
    /// it with its HTTP listener (address and token).
    pub fn start_http(extra: &[&str]) -> Result<(Self, HttpListener)> {
        let mut args = vec!["--http", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let agent = Self::start_with(&args)?;
        let file = http::token_file(&agent.socket, extra);
        let listener = HttpListener::wait(|| agent.log(), file)?;
        Ok((agent, listener))
    }

    /// Kills the agent with SIGKILL (no clean-up: its socket file stays).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new agent on the same socket (after [`Self::kill`]).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = Self::spawn(&self.socket, &self.extra, &self.wrapper)?;
        self.wait_listening()
    }

    fn spawn(socket: &Path, extra: &[String], wrapper: &[String]) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(socket.with_file_name("agent.log"))?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("amm-agent"));
                c
            }
            None => Command::new(bin("amm-agent")),
        };
        cmd.arg("run")
            .arg("--socket")
            .arg(socket)
            .args(["--socket-mode", "0666", "--hello-timeout-ms", "1000"])
            .args(["--frame-timeout-ms", "500", "--bpf-object"])
            .arg(bpf_object())
            .args(extra)
            .env("AMM_LOG", "debug")
            .stderr(log)
            .spawn()
            .context("cannot start amm-agent")
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("amm-agent exited ({status}); its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "amm-agent did not listen within 20 s; its log:\n{}",
            self.log()
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
        signal_child(&self.child, Signal::SIGTERM);
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

/// A workload that spills: 240 MiB of managed data, then 160 MiB of task
/// memory in one task, then holds everything for `hold` (`"3s"`, `"60s"`).
pub fn spill_then_hold(hold: &str) -> String {
    format!(
        r#"
[[phase]]
name = "managed"
[[phase.op]]
op = "allocate"
bytes = "240MiB"
chunk = "4MiB"
keep = "managed"
key = "m"
[[phase]]
name = "unmanaged"
[[phase.op]]
op = "allocate"
bytes = "160MiB"
chunk = "4MiB"
keep = "unmanaged"
key = "u"
tasks = 1
[[phase]]
name = "hold"
[[phase.op]]
op = "sleep"
duration = "{hold}"
"#
    )
}
