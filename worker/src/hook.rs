//! `--on-spill` / `--on-pause`: what the nanny does for a program that
//! cannot act on amm's levels itself, when its memory rises into one.
//!
//! An action is either a signal for the program (`SIGUSR1`, `SIGUSR2`, any
//! `SIG...` name) or a program the nanny runs:
//! - **without a shell**: the text is one path, executed as it is (spaces
//!   and shell metacharacters are part of the file name), unless
//!   `--hook-shell` asks for `/bin/sh -c TEXT`;
//! - with the facts in its environment: `AMM_LEVEL` (`spill`/`pause`),
//!   `AMM_PID`, `AMM_RSS_BYTES`, `AMM_LIMIT_BYTES`;
//! - **never with more privilege than the worker**: as the nanny's user
//!   (the worker's), with `PR_SET_NO_NEW_PRIVS` so a setuid file gains
//!   nothing, and as root only a file root owns in directories only root
//!   can change ([`crate::trusted_path`]);
//! - with a **timeout**: past it the hook's process group is killed;
//! - one at a time per level: a crossing while the last hook still runs is
//!   skipped (and logged).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// What to do at a level.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this signal to the program.
    Signal(Signal),
    /// Run this file (no shell).
    Run(PathBuf),
    /// Run this text with `/bin/sh -c` (`--hook-shell`).
    Shell(String),
}

impl Action {
    /// Parses `--on-spill`/`--on-pause`: a `SIG...` name is a signal,
    /// anything else a program (a shell command when `shell`).
    pub fn parse(text: &str, shell: bool) -> Result<Action, String> {
        if text.is_empty() {
            return Err("an empty hook: give a signal name (SIGUSR1) or a program".into());
        }
        if let Some(name) = text.strip_prefix("SIG")
            && !text.contains('/')
        {
            let sig: Signal = format!("SIG{name}")
                .parse()
                .map_err(|_| format!("{text:?} is not a signal name (such as SIGUSR1)"))?;
            return Ok(Action::Signal(sig));
        }
        Ok(if shell {
            Action::Shell(text.to_string())
        } else {
            Action::Run(PathBuf::from(text))
        })
    }

    /// Checks a program action before the run starts (it exists, and is
    /// trusted when running as root).
    pub fn check(&self, euid: u32) -> Result<(), String> {
        match self {
            Action::Run(p) => crate::trusted_path::check(p, euid).map(|_| ()),
            Action::Shell(_) | Action::Signal(_) => Ok(()),
        }
    }
}

/// The facts a hook gets.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    /// `spill` or `pause`.
    pub level: &'static str,
    /// The program's pid.
    pub pid: u32,
    /// Its RSS at the crossing.
    pub rss: u64,
    /// The limit.
    pub limit: u64,
}

/// A running hook.
#[derive(Debug)]
struct Running {
    child: std::process::Child,
    started: Instant,
    level: &'static str,
}

/// Runs the actions, at most one program per level at a time.
#[derive(Debug)]
pub struct Hooks {
    timeout: Duration,
    running: Vec<Running>,
}

impl Hooks {
    /// Hooks with this timeout.
    pub fn new(timeout: Duration) -> Hooks {
        Hooks {
            timeout,
            running: Vec::new(),
        }
    }

    /// Does `action` for `facts`; returns what was done, for the log.
    pub fn fire(&mut self, action: &Action, facts: Facts) -> String {
        self.reap();
        let busy = self.running.iter().any(|r| r.level == facts.level);
        let mut cmd = match action {
            Action::Signal(sig) => {
                let _ = signal::kill(Pid::from_raw(facts.pid as i32), *sig);
                return format!("sent {sig} to pid {}", facts.pid);
            }
            _ if busy => {
                return format!("{} hook still running: this crossing skipped", facts.level);
            }
            Action::Run(p) => Command::new(p),
            Action::Shell(text) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c").arg(text);
                c
            }
        };
        cmd.env("AMM_LEVEL", facts.level)
            .env("AMM_PID", facts.pid.to_string())
            .env("AMM_RSS_BYTES", facts.rss.to_string())
            .env("AMM_LIMIT_BYTES", facts.limit.to_string())
            .stdin(Stdio::null())
            .process_group(0);
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_no_new_privs().map_err(Into::into));
        }
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id();
                self.running.push(Running {
                    child,
                    started: Instant::now(),
                    level: facts.level,
                });
                format!("{} hook started (pid {pid})", facts.level)
            }
            Err(e) => format!("{} hook could not start: {e}", facts.level),
        }
    }

    /// Reaps finished hooks and kills those past the timeout; returns a
    /// line per hook that ended.
    pub fn reap(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let timeout = self.timeout;
        self.running.retain_mut(|r| match r.child.try_wait() {
            Ok(Some(st)) => {
                out.push(format!("{} hook ended: {st}", r.level));
                false
            }
            Ok(None) if r.started.elapsed() > timeout => {
                let _ = signal::killpg(Pid::from_raw(r.child.id() as i32), Signal::SIGKILL);
                let _ = r.child.wait();
                out.push(format!(
                    "{} hook killed after its {} ms timeout",
                    r.level,
                    timeout.as_millis()
                ));
                false
            }
            Ok(None) => true,
            Err(_) => false,
        });
        out
    }

    /// Hooks still running.
    pub fn running(&self) -> usize {
        self.running.len()
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        for r in &mut self.running {
            let _ = signal::killpg(Pid::from_raw(r.child.id() as i32), Signal::SIGKILL);
            let _ = r.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse() {
        assert_eq!(
            Action::parse("SIGUSR1", false),
            Ok(Action::Signal(Signal::SIGUSR1))
        );
        assert!(Action::parse("SIGNOPE", false).is_err());
        assert!(Action::parse("", false).is_err());
        assert_eq!(
            Action::parse("/x/SIGUSR1", false),
            Ok(Action::Run("/x/SIGUSR1".into()))
        );
        assert_eq!(
            Action::parse("echo hi; ls", true),
            Ok(Action::Shell("echo hi; ls".into()))
        );
    }

    fn wait_all(h: &mut Hooks) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            out.extend(h.reap());
            if h.running() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        out
    }

    fn facts() -> Facts {
        Facts {
            level: "spill",
            pid: std::process::id(),
            rss: 123,
            limit: 456,
        }
    }

    /// The abuse case: a hook path with spaces and shell metacharacters is
    /// run as one file, never given to a shell.
    #[test]
    fn a_hook_path_with_metacharacters_is_never_given_to_a_shell() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        // through a shell, this name would create `pwned` in the cwd
        let pwned = std::env::current_dir().expect("cwd").join("pwned");
        let out = d.path().join("ran");
        let path = d.path().join("hook; touch pwned #");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$AMM_LEVEL $AMM_RSS_BYTES $AMM_LIMIT_BYTES\" > '{}'\ngrep NoNewPrivs /proc/self/status >> '{}'\n",
                out.display(),
                out.display()
            ),
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let action = Action::parse(path.to_str().expect("utf8"), false).expect("parse");
        assert!(matches!(action, Action::Run(_)));
        let mut h = Hooks::new(Duration::from_secs(30));
        let said = h.fire(&action, facts());
        assert!(said.contains("started"), "{said}");
        let ended = wait_all(&mut h);
        assert!(
            ended.iter().any(|l| l.contains("exit status: 0")),
            "{ended:?}"
        );
        let text = std::fs::read_to_string(&out).expect("the hook ran");
        assert!(text.starts_with("spill 123 456"), "{text}");
        assert!(
            text.contains("NoNewPrivs:\t1"),
            "no_new_privs not set: {text}"
        );
        assert!(!pwned.exists(), "the path went through a shell");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_and_one_runs_at_a_time() {
        let mut h = Hooks::new(Duration::from_millis(100));
        let action = Action::parse("exec sleep 60", true).expect("parse");
        assert!(h.fire(&action, facts()).contains("started"));
        let again = h.fire(&action, facts());
        assert!(again.contains("skipped"), "{again}");
        let ended = wait_all(&mut h);
        assert!(ended.iter().any(|l| l.contains("timeout")), "{ended:?}");
        assert_eq!(h.running(), 0);
    }
}
