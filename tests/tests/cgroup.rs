//! `HardLimit` against the real kernel: a child that allocates past its
//! cgroup's hard limit is OOM-killed and the cgroup's count says so; a
//! running process joins by pid, is charged for what it touches after, and
//! is killed when the cgroup is dropped. Needs root.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use amm_integration_tests::cgroup::HardLimit;

const MIB: u64 = 1 << 20;

fn require_root(test: &str) -> bool {
    amm_integration_tests::require_root_for(test, amm_integration_tests::RootFor::Cgroup)
}

struct Fault {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Fault {
    fn spawn(limit: Option<&HardLimit>) -> Fault {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amm-fault"));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some(l) = limit {
            l.enter_before_exec(&mut cmd).expect("prepare the join");
        }
        let mut child = cmd.spawn().expect("start amm-fault");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Fault {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends a command; the reply line, or `None` when the child died.
    fn cmd(&mut self, line: &str) -> Option<String> {
        writeln!(self.stdin, "{line}").ok()?;
        self.stdin.flush().ok()?;
        let mut reply = String::new();
        match self.stdout.read_line(&mut reply) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(reply.trim().to_string()),
        }
    }
}

#[test]
fn a_child_past_the_hard_limit_is_oom_killed_and_counted() {
    if !require_root("a_child_past_the_hard_limit_is_oom_killed_and_counted") {
        return;
    }
    let limit = HardLimit::create("test-oom", 64 * MIB).expect("create the cgroup");
    assert_eq!(limit.limit_bytes(), 64 * MIB);
    assert_eq!(limit.oom_kills().expect("oom count"), 0);
    let mut f = Fault::spawn(Some(&limit));
    assert_eq!(
        limit.pids().expect("pids"),
        vec![f.child.id()],
        "the child joined before exec"
    );
    let reply = f.cmd("touch 16").expect("16 MiB fit under 64 MiB");
    assert!(reply.starts_with("ok"), "{reply}");
    let usage = limit.usage_bytes().expect("usage");
    assert!(usage >= 16 * MIB, "usage {usage} after touching 16 MiB");

    // past the limit: no swap, so the kernel has to kill it
    assert_eq!(f.cmd("touch 128"), None, "the child should have died");
    let status = f.child.wait().expect("reap");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    assert_eq!(limit.oom_kills().expect("oom count"), 1);
    let peak = limit
        .peak_bytes()
        .expect("peak")
        .expect("this kernel reports the peak");
    assert!(
        peak > 48 * MIB && peak <= 64 * MIB,
        "peak {peak} should be near the 64 MiB limit"
    );
    let dir = limit.dir().to_path_buf();
    limit.remove().expect("remove the cgroup");
    assert!(!dir.exists());
}

#[test]
fn a_running_process_joins_by_pid_and_dies_with_the_cgroup() {
    if !require_root("a_running_process_joins_by_pid_and_dies_with_the_cgroup") {
        return;
    }
    let mut f = Fault::spawn(None);
    let limit = HardLimit::create("test-join", 256 * MIB).expect("create the cgroup");
    limit.add_pid(f.child.id()).expect("join by pid");
    assert_eq!(limit.pids().expect("pids"), vec![f.child.id()]);
    // charged from the move on
    let reply = f.cmd("touch 32").expect("32 MiB fit under 256 MiB");
    assert!(reply.starts_with("ok"), "{reply}");
    let usage = limit.usage_bytes().expect("usage");
    let peak = limit.peak_bytes().expect("peak").expect("a peak");
    assert!(usage >= 32 * MIB, "usage {usage} after touching 32 MiB");
    assert!(peak >= usage, "peak {peak} below usage {usage}");
    assert_eq!(limit.oom_kills().expect("oom count"), 0);

    let dir = limit.dir().to_path_buf();
    drop(limit);
    assert!(!dir.exists(), "{} was not removed", dir.display());
    let status = f.child.wait().expect("reap");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

#[test]
fn adding_a_missing_process_says_so() {
    if !require_root("adding_a_missing_process_says_so") {
        return;
    }
    let limit = HardLimit::create("test-missing", 64 * MIB).expect("create the cgroup");
    // pid_max is at most 2^22: this pid cannot exist
    let err = limit
        .add_pid(u32::MAX / 2)
        .expect_err("no such process")
        .to_string();
    assert!(err.contains("cannot move pid"), "{err}");
}
