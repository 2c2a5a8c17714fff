//! The nanny: a small parent process that runs a [`Program`] (amm-worker's
//! own worker, or any command given after `--`), restarts it after a
//! terminate or a crash with exponential back-off, at most
//! `--max-restarts` times, forwards SIGINT/SIGTERM to it, and reports every
//! attempt.
//!
//! What counts as what:
//! - **done**: exit 0 (and the built-in worker's exit 3, a failed result
//!   check: running it again gives the same answer). Not restarted.
//! - **refused**: the built-in worker's exit 78, it refused to start (an
//!   unsafe or unusable spill directory): restarting cannot help.
//! - **terminated**: the memory model ended it (the built-in worker's exit
//!   75; the kernel's kill at the terminate page; the nanny's own terminate
//!   of a program that passed the level). Restarted.
//! - **crashed**: any other exit code or signal. Restarted.
//! - **stopped**: it ended after the nanny forwarded SIGINT/SIGTERM. Never a
//!   crash, never restarted.
//!
//! The child never outlives the nanny ([`crate::child`]).

pub mod builtin;
pub mod program;

pub use builtin::NannyOptions;

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

use crate::child::{self, Child, Ending};
use crate::signals;
use crate::summary::NANNY_GAVE_UP;

/// Environment variable carrying the worker's name to the child.
pub const NAME_ENV: &str = "AMM_WORKER_NAME";
/// Environment variable carrying the attempt number (0, 1, ...).
pub const ATTEMPT_ENV: &str = "AMM_WORKER_ATTEMPT";

/// How often the nanny looks at its child (signals, exit, the program's
/// own monitor).
const POLL: Duration = Duration::from_millis(20);

/// The longest back-off between two restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How the nanny restarts.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Most restarts before giving up.
    pub max_restarts: u32,
    /// First back-off (doubles per restart, at most 10 s).
    pub backoff: Duration,
}

/// How an attempt counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Verdict {
    /// Finished; not restarted.
    Done,
    /// Finished, but its result is wrong (built-in worker); not restarted.
    ResultFailed,
    /// Refused to start (built-in worker, exit 78); not restarted.
    Refused,
    /// Ended by the memory model; `by` says who ended it.
    Terminated {
        /// Who: `worker` (it exited 75), `kernel` (amm-agent's kill at the
        /// terminate page), `nanny` (the nanny's terminate).
        by: String,
    },
    /// Ended otherwise (a signal nobody in amm sent, an error exit).
    Crashed,
    /// Ended after the nanny forwarded this signal to it.
    Stopped {
        /// The signal forwarded.
        signal: i32,
    },
}

/// One attempt, for the summary.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    /// 0 for the first.
    pub attempt: u32,
    /// Its pid.
    pub pid: u32,
    /// How it counts.
    pub verdict: Verdict,
    /// `done`, `terminated`, `crashed`, `stopped`, ... in words.
    pub ending: String,
    /// Its status as a shell reports it (128 + N for signal N).
    pub exit_code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Its peak RSS as the kernel counts it (`ru_maxrss`).
    pub max_rss_bytes: u64,
    /// Wall time.
    pub ms: u64,
    /// Who or what ended it, in words, when the nanny can tell.
    pub cause: Option<String>,
}

/// What the nanny adds to the run's summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NannyReport {
    /// Restarts made.
    pub restarts: u32,
    /// Attempts ended by the memory model.
    pub terminations: u32,
    /// Attempts that crashed.
    pub crashes: u32,
    /// Peak RSS over the attempts.
    pub peak_rss_bytes: u64,
    /// Every attempt.
    pub attempts: Vec<Attempt>,
    /// The nanny's wall time.
    pub nanny_wall_ms: u64,
    /// Gave up after `max_restarts`.
    pub gave_up: bool,
    /// The nanny's exit code.
    pub exit_code: i32,
    /// SIGINT/SIGTERM that stopped the run.
    pub stopped_by_signal: Option<i32>,
}

/// What the nanny supervises.
pub trait Program {
    /// The command of attempt `attempt`, environment and stdio set.
    fn command(&mut self, attempt: u32) -> anyhow::Result<Command>;
    /// What the child gets when the nanny dies.
    fn on_nanny_death(&self) -> Signal;
    /// Hold the child before exec until [`Program::started`] returned (its
    /// stdio is then the nanny's).
    fn gated(&self) -> bool {
        false
    }
    /// Attempt `attempt` started as `child` (take its stdout here).
    fn started(&mut self, attempt: u32, child: &mut Child) -> anyhow::Result<()>;
    /// Called every few ms while the child runs.
    fn poll(&mut self, _pid: u32) {}
    /// How an attempt that was not stopped by a signal counts.
    fn verdict(&mut self, pid: u32, ending: Ending) -> Verdict;
    /// The attempt is over and reaped; `peak` may be raised from what the
    /// program itself reported.
    fn finished(&mut self, _attempt: &mut Attempt) {}
    /// The nanny's exit code once it stops: `last` is the last attempt,
    /// `gave_up` whether restarts ran out.
    fn exit_code(&self, last: &Attempt, gave_up: bool) -> i32;
}

/// Waits for the child, forwarding SIGINT/SIGTERM and polling the program;
/// returns how it ended, its peak RSS and the signal forwarded, if any.
fn supervise(program: &mut dyn Program, pid: u32) -> anyhow::Result<(Ending, u64, Option<i32>)> {
    let mut forwarded = None;
    loop {
        if let Some(sig) = signals::take() {
            tracing::warn!(signal = sig, pid, "nanny: forwarding signal to the worker");
            child::send(pid, sig);
            forwarded = Some(sig);
        }
        if let Some((ending, maxrss)) = child::try_wait(pid)? {
            return Ok((ending, maxrss, forwarded));
        }
        program.poll(pid);
        std::thread::sleep(POLL);
    }
}

fn words(v: &Verdict, ending: Ending) -> String {
    match v {
        Verdict::Done => "done".into(),
        Verdict::ResultFailed => "result check failed".into(),
        Verdict::Refused => "refused to start".into(),
        Verdict::Terminated { by } if by == "worker" => "terminated".into(),
        Verdict::Terminated { by } if by == "kernel" => {
            "terminated at the page by amm-agent".into()
        }
        Verdict::Terminated { by } => format!("terminated by the {by}"),
        Verdict::Crashed => match ending {
            Ending::Signaled(_) => "killed by signal".into(),
            Ending::Exited(_) => "crashed".into(),
        },
        Verdict::Stopped { .. } => "stopped".into(),
    }
}

/// Runs one attempt to its end.
fn attempt(program: &mut dyn Program, n: u32) -> anyhow::Result<Attempt> {
    let cmd = program.command(n)?;
    let t0 = Instant::now();
    let mut c = if program.gated() {
        child::spawn_gated(&cmd, program.on_nanny_death())?
    } else {
        child::spawn(cmd, program.on_nanny_death())?
    };
    tracing::info!(pid = c.pid, attempt = n, "nanny: worker started");
    program.started(n, &mut c)?;
    if let Err(e) = c.release() {
        // exec failed (no such program...): the child exits 127 at once;
        // reap it and stop, as running it again cannot help
        while child::try_wait(c.pid)?.is_none() {
            std::thread::sleep(POLL);
        }
        return Err(e);
    }
    let (ending, maxrss, forwarded) = supervise(program, c.pid)?;
    let verdict = match forwarded {
        Some(signal) => Verdict::Stopped { signal },
        None => program.verdict(c.pid, ending),
    };
    let mut a = Attempt {
        attempt: n,
        pid: c.pid,
        ending: words(&verdict, ending),
        verdict,
        exit_code: ending.shell_code(),
        signal: ending.signal(),
        max_rss_bytes: maxrss,
        ms: t0.elapsed().as_millis() as u64,
        cause: None,
    };
    program.finished(&mut a);
    tracing::info!(attempt = n, ending = ?ending, kind = %a.ending, "nanny: worker ended");
    Ok(a)
}

/// Sleeps `backoff` unless SIGINT/SIGTERM comes first; returns the signal.
fn back_off(backoff: Duration) -> Option<i32> {
    let until = Instant::now() + backoff;
    while Instant::now() < until && signals::peek().is_none() {
        std::thread::sleep(POLL);
    }
    signals::take()
}

/// Runs `program` under supervision until it is done, stopped, or restarts
/// run out; returns the report (its `exit_code` is the nanny's).
pub fn run(program: &mut dyn Program, policy: &RestartPolicy) -> anyhow::Result<NannyReport> {
    use anyhow::Context;
    signals::install().context("cannot install signal handlers")?;
    let start = Instant::now();
    let mut r = NannyReport::default();
    let mut backoff = policy.backoff;
    loop {
        let a = attempt(program, r.attempts.len() as u32)?;
        r.peak_rss_bytes = r.peak_rss_bytes.max(a.max_rss_bytes);
        match &a.verdict {
            Verdict::Terminated { .. } => r.terminations += 1,
            Verdict::Crashed => r.crashes += 1,
            Verdict::Stopped { signal } => r.stopped_by_signal = Some(*signal),
            Verdict::Done | Verdict::ResultFailed | Verdict::Refused => {}
        }
        let finished = !matches!(a.verdict, Verdict::Terminated { .. } | Verdict::Crashed);
        r.gave_up = !finished && r.restarts >= policy.max_restarts;
        r.exit_code = program.exit_code(&a, r.gave_up);
        let kind = a.ending.clone();
        r.attempts.push(a);
        if finished {
            break;
        }
        if r.gave_up {
            tracing::error!(
                restarts = r.restarts,
                "nanny: giving up after {} restarts (the worker {kind} every time)",
                r.restarts
            );
            break;
        }
        r.restarts += 1;
        tracing::warn!(
            restart = r.restarts,
            max = policy.max_restarts,
            backoff_ms = backoff.as_millis() as u64,
            "nanny: restarting the worker ({kind})"
        );
        if let Some(sig) = back_off(backoff) {
            r.stopped_by_signal = Some(sig);
            r.exit_code = 128 + sig;
            break;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    r.nanny_wall_ms = start.elapsed().as_millis() as u64;
    Ok(r)
}

/// The built-in worker's exit code from the nanny: 0 done, 3 a failed
/// check, 76 when it gave up, else the worker's own status.
pub fn worker_exit_code(last: &Attempt, gave_up: bool) -> i32 {
    if gave_up {
        NANNY_GAVE_UP
    } else {
        last.exit_code
    }
}
