//! The nanny's child process: spawned so that it never outlives the nanny,
//! waited for with its resource usage, and ended the way a shell reports it.
//!
//! **Never an orphan.** Between `fork` and `exec` the child asks the kernel
//! for a signal when its parent dies (`PR_SET_PDEATHSIG`), then checks that
//! its parent is still the nanny: if the nanny died before the request was
//! in place, the child was already re-parented and would never get the
//! signal, so it exits instead of running unsupervised. The kernel
//! sends the signal when the *thread* that forked the child exits, so the
//! nanny spawns from its main thread, which lives as long as it does.

use std::ffi::{CString, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::Context;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// How one attempt ended, as `wait` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exited with a code.
    Exited(i32),
    /// Killed by a signal (9 is what the OOM killer and amm-agent send).
    Signaled(i32),
}

impl Ending {
    /// The status a shell would report: the exit code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            Ending::Exited(c) => c,
            Ending::Signaled(s) => 128 + s,
        }
    }

    /// The ending an attempt recorded: its signal, else its exit code.
    pub fn of(exit_code: i32, signal: Option<i32>) -> Ending {
        match signal {
            Some(s) => Ending::Signaled(s),
            None => Ending::Exited(exit_code),
        }
    }

    /// The signal that killed the process, if one did.
    pub fn signal(self) -> Option<i32> {
        match self {
            Ending::Signaled(s) => Some(s),
            Ending::Exited(_) => None,
        }
    }
}

/// A spawned child, not yet reaped.
#[derive(Debug)]
pub struct Child {
    /// Its pid.
    pub pid: u32,
    /// Its stdout, when it was piped.
    pub stdout: Option<std::process::ChildStdout>,
    /// The gate it waits on before exec, until [`Child::release`].
    gate: Option<Gate>,
}

/// A gated child's two pipes.
#[derive(Debug)]
struct Gate {
    /// One byte lets it exec.
    go: OwnedFd,
    /// EOF when exec succeeded (close-on-exec), else the errno.
    exec_status: OwnedFd,
    program: String,
}

impl Child {
    /// Lets a gated child exec its program; an error when exec failed
    /// (the child then exits 127). Nothing for a child without a gate.
    pub fn release(&mut self) -> anyhow::Result<()> {
        let Some(g) = self.gate.take() else {
            return Ok(());
        };
        nix::unistd::write(&g.go, b"g").context("cannot release the program")?;
        let mut b = [0u8; 4];
        loop {
            match nix::unistd::read(&g.exec_status, &mut b) {
                Ok(4) => {
                    let e = std::io::Error::from_raw_os_error(i32::from_ne_bytes(b));
                    anyhow::bail!("cannot run {}: {e}", g.program);
                }
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("cannot read the program's exec status"),
            }
        }
    }
}

/// In the child, before exec: wait for the parent's go (one byte), or for
/// the parent's end (EOF: the death signal follows).
fn wait_at_gate(fd: &OwnedFd) -> std::io::Result<()> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut b) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(nix::errno::Errno::ESRCH.into()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// In the child, between fork and exec: ask for `sig` when the parent dies,
/// and fail (the child exits before exec) if the parent is no longer `parent` (it died before the
/// request was in place). Only async-signal-safe calls.
pub fn die_with_parent(sig: Signal, parent: Pid) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(sig).map_err(std::io::Error::from)?;
    if nix::unistd::getppid() != parent {
        // re-parented already: the nanny is gone. The error makes the
        // child _exit before exec (std reports it to a parent that is gone).
        // ESRCH travels to the parent as the spawn's error (only an errno
        // crosses exec's error pipe): the parent is gone.
        return Err(nix::errno::Errno::ESRCH.into());
    }
    Ok(())
}

/// Spawns `cmd` so that it receives `on_parent_death` when the nanny dies.
pub fn spawn(mut cmd: Command, on_parent_death: Signal) -> anyhow::Result<Child> {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure makes only async-signal-safe system calls
    // (prctl, getppid) and allocates nothing on its success path.
    unsafe {
        cmd.pre_exec(move || die_with_parent(on_parent_death, parent));
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    Ok(Child {
        pid: child.id(),
        stdout: child.stdout.take(),
        gate: None,
    })
}

/// The program, arguments and full environment of `cmd`, as C strings
/// for `execvpe` (prepared before `fork`: the child allocates nothing).
fn exec_parts(cmd: &Command) -> anyhow::Result<(CString, Vec<CString>, Vec<CString>)> {
    let c = |s: &std::ffi::OsStr| {
        CString::new(s.as_bytes()).with_context(|| format!("{s:?} contains a NUL byte"))
    };
    let program = c(cmd.get_program())?;
    let mut args = vec![program.clone()];
    for a in cmd.get_args() {
        args.push(c(a)?);
    }
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => env.insert(k.to_os_string(), v.to_os_string()),
            None => env.remove(k),
        };
    }
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in env {
        let mut kv = k;
        kv.push("=");
        kv.push(v);
        envp.push(c(&kv)?);
    }
    Ok((program, args, envp))
}

/// Spawns `cmd` held before exec: it runs its program only after
/// [`Child::release`] (so that it can be registered with amm-agent before
/// its first page). Its stdio is the nanny's (the `Command`'s stdio
/// settings are not used); its death signal is as for [`spawn`].
pub fn spawn_gated(cmd: &Command, on_parent_death: Signal) -> anyhow::Result<Child> {
    use nix::unistd::{ForkResult, fork, pipe2};
    let (program, args, envp) = exec_parts(cmd)?;
    let parent = nix::unistd::getpid();
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (gate_rx, gate_tx) = pipe2(cloexec).context("cannot make the start gate")?;
    let (err_rx, err_tx) = pipe2(cloexec).context("cannot make the exec status pipe")?;
    // SAFETY: the nanny forks from its main thread with no other thread of
    // its own running; the child calls only async-signal-safe functions
    // (prctl, getppid, read, execve, write, _exit) and allocates nothing.
    match unsafe { fork() }.context("cannot fork the program")? {
        ForkResult::Child => {
            let errno = match die_with_parent(on_parent_death, parent)
                .and_then(|()| wait_at_gate(&gate_rx))
            {
                Err(e) => e.raw_os_error().unwrap_or(libc::ESRCH),
                Ok(()) => match nix::unistd::execvpe(&program, &args, &envp) {
                    Err(e) => e as i32,
                    Ok(never) => match never {},
                },
            };
            let _ = nix::unistd::write(&err_tx, &errno.to_ne_bytes());
            // SAFETY: _exit is async-signal-safe and ends the child at once.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => Ok(Child {
            pid: child.as_raw() as u32,
            stdout: None,
            gate: Some(Gate {
                go: gate_tx,
                exec_status: err_rx,
                program: program.to_string_lossy().into_owned(),
            }),
        }),
    }
}

/// Sends `sig` to the child (ignores a child that is already gone).
pub fn send(pid: u32, sig: i32) {
    if let (Ok(s), Ok(p)) = (Signal::try_from(sig), i32::try_from(pid)) {
        let _ = signal::kill(Pid::from_raw(p), s);
    }
}

/// Reaps the child if it has ended: how, and its peak RSS (`ru_maxrss`).
/// `Ok(None)` while it runs. nix has no `wait4`, the one call that returns
/// a child's resource usage with its status, so this wraps libc's.
pub fn try_wait(pid: u32) -> anyhow::Result<Option<(Ending, u64)>> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: status and ru are valid out-pointers for the call.
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, libc::WNOHANG, &mut ru) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(e).context("wait4 on the worker");
    }
    if r == 0 {
        return Ok(None);
    }
    let maxrss = ru.ru_maxrss.max(0) as u64 * 1024;
    let ending = if libc::WIFEXITED(status) {
        Ending::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Ending::Signaled(libc::WTERMSIG(status))
    } else {
        return Ok(None);
    };
    Ok(Some((ending, maxrss)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes() {
        assert_eq!(Ending::Exited(3).shell_code(), 3);
        assert_eq!(Ending::Signaled(9).shell_code(), 137);
        assert_eq!(Ending::Signaled(15).signal(), Some(15));
    }

    /// The race: the nanny died between fork and the PR_SET_PDEATHSIG
    /// request. Simulated by naming a parent that is not ours: the child
    /// must exit instead of running the program.
    #[test]
    fn a_child_whose_parent_is_gone_exits_before_exec() {
        let not_our_parent = Pid::from_raw(1);
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo ran"]);
        cmd.stdout(std::process::Stdio::piped());
        // SAFETY: as in spawn.
        unsafe {
            cmd.pre_exec(move || die_with_parent(Signal::SIGTERM, not_our_parent));
        }
        let out = cmd.output().expect_err("the child must not exec");
        assert_eq!(
            out.raw_os_error(),
            Some(libc::ESRCH),
            "unexpected error: {out}"
        );
    }

    #[test]
    fn a_gated_program_that_cannot_exec_says_why() {
        let mut c = spawn_gated(&Command::new("/nonexistent/prog"), Signal::SIGKILL).expect("fork");
        let e = c.release().expect_err("no such program").to_string();
        assert!(e.contains("No such file"), "{e}");
        let ending = loop {
            if let Some((e, _)) = try_wait(c.pid).expect("wait") {
                break e;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(ending, Ending::Exited(127));
    }

    #[test]
    fn a_child_with_its_parent_runs_and_is_reaped() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "exit 7"]);
        let mut c = spawn_gated(&cmd, Signal::SIGKILL).expect("spawn");
        assert_eq!(try_wait(c.pid).expect("wait"), None, "waits at the gate");
        c.release().expect("exec");
        let ending = loop {
            if let Some((e, _)) = try_wait(c.pid).expect("wait") {
                break e;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(ending, Ending::Exited(7));
    }
}
