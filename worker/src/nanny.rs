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
pub mod record;

pub use builtin::NannyOptions;

use std::process::Command;
use std::time::{Duration, Instant};

use amm_timeline::{Exit, Killer, Level, PeakSource, Restart, Summary};
use nix::sys::signal::Signal;

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

/// How an attempt counts (the timeline contract's type: the summary
/// carries it).
pub use amm_timeline::Verdict;

/// One attempt, for the summary (the timeline contract's type).
pub use amm_timeline::Attempt;

/// OOM kills so far: the memory cgroup's (`memory.oom_control` /
/// `memory.events`) and the machine's (`/proc/vmstat`), to tell an OOM
/// kill from another SIGKILL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomKills {
    /// The cgroup's count, when it has one.
    pub cgroup: Option<u64>,
    /// The machine's count.
    pub global: Option<u64>,
}

impl OomKills {
    /// The counts now; `cgroup` is the process's memory cgroup.
    pub fn now(cgroup: Option<&amm_cgroup::MemoryCgroup>) -> OomKills {
        OomKills {
            cgroup: cgroup.and_then(|c| c.usage()).map(|u| u.oom_kills),
            global: crate::proc::vmstat_oom_kills(),
        }
    }

    /// The OOM kill that happened since `before`, if a count moved (the
    /// cgroup's first: it is the narrower).
    pub fn since(&self, before: &OomKills) -> Option<Killer> {
        let moved = |a: Option<u64>, b: Option<u64>| matches!((a, b), (Some(a), Some(b)) if b > a);
        let scope = if moved(before.cgroup, self.cgroup) {
            "cgroup"
        } else if moved(before.global, self.global) {
            "global"
        } else {
            return None;
        };
        Some(Killer::OomKill {
            scope: Some(scope.into()),
        })
    }
}

/// The timeline's `exit` event of attempt `a`: `by` who ended it, at what
/// `level` and RSS (at the killing page, for the kernel's kill), and its
/// exact peak (`wait4`'s).
pub fn exit_event(
    a: &Attempt,
    by: Option<Killer>,
    level: Option<Level>,
    rss_bytes: Option<u64>,
) -> Exit {
    Exit {
        attempt: a.attempt,
        pid: a.pid,
        code: a.signal.is_none().then_some(a.exit_code),
        signal: a.signal,
        by,
        level,
        rss_bytes,
        peak_rss_bytes: Some(a.max_rss_bytes),
        peak_source: Some(PeakSource::Wait4),
    }
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
    /// The attempt is over and reaped: the program may raise its peak from
    /// what the program itself reported, say its cause, and record its exit.
    fn finished(&mut self, _attempt: &mut Attempt) {}
    /// The program is about to be started again.
    fn restarting(&mut self, _restart: &Restart) {}
    /// The summary the nanny completes with its own part once it stops
    /// (the last attempt's own summary, or what the nanny knows of the
    /// program).
    fn summary(&mut self) -> Summary;
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
        verdict: Some(verdict),
        exit_code: ending.shell_code(),
        signal: ending.signal(),
        max_rss_bytes: maxrss,
        ms: t0.elapsed().as_millis() as u64,
        ..Attempt::default()
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
/// run out; returns the program's summary completed with the nanny's part
/// (restarts, every attempt, ...; its `exit_code` is the nanny's).
pub fn run(program: &mut dyn Program, policy: &RestartPolicy) -> anyhow::Result<Summary> {
    use anyhow::Context;
    signals::install().context("cannot install signal handlers")?;
    let start = Instant::now();
    let mut r = Supervision::default();
    let mut backoff = policy.backoff;
    loop {
        let a = attempt(program, r.attempts.len() as u32)?;
        let verdict = a.verdict.clone().unwrap_or(Verdict::Crashed);
        r.count(&a, &verdict);
        r.gave_up = verdict.restarts() && r.restarts >= policy.max_restarts;
        r.exit_code = program.exit_code(&a, r.gave_up);
        let kind = a.ending.clone();
        r.attempts.push(a);
        if !verdict.restarts() {
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
        program.restarting(&Restart {
            attempt: r.restarts,
            reason: kind,
            backoff_ms: backoff.as_millis() as u64,
        });
        if let Some(sig) = back_off(backoff) {
            r.stopped_by_signal = Some(sig);
            r.exit_code = 128 + sig;
            break;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Ok(r.complete(program.summary(), start.elapsed()))
}

/// What the nanny counts while it runs: its part of the summary.
#[derive(Debug, Default)]
struct Supervision {
    restarts: u32,
    terminations: u32,
    crashes: u32,
    peak_rss_bytes: u64,
    attempts: Vec<Attempt>,
    gave_up: bool,
    exit_code: i32,
    stopped_by_signal: Option<i32>,
}

impl Supervision {
    fn count(&mut self, a: &Attempt, verdict: &Verdict) {
        self.peak_rss_bytes = self.peak_rss_bytes.max(a.max_rss_bytes);
        match verdict {
            Verdict::Terminated { .. } => self.terminations += 1,
            Verdict::Crashed => self.crashes += 1,
            Verdict::Stopped { signal } => self.stopped_by_signal = Some(*signal),
            Verdict::Done | Verdict::ResultFailed | Verdict::Refused => {}
        }
    }

    /// `s` with the nanny's part filled in: counts over every attempt
    /// replace the last attempt's own, and a run that did not end with 0
    /// is no good result.
    fn complete(self, mut s: Summary, wall: Duration) -> Summary {
        s.restarts = self.restarts;
        s.terminations = self.terminations;
        s.crashes = self.crashes;
        s.peak_rss_bytes = s.peak_rss_bytes.max(self.peak_rss_bytes);
        s.attempts = self.attempts;
        s.nanny_wall_ms = Some(wall.as_millis() as u64);
        s.gave_up = Some(self.gave_up);
        s.exit_code = self.exit_code;
        s.stopped_by_signal = self.stopped_by_signal;
        if self.exit_code != 0 {
            s.result_ok = false;
        }
        s
    }
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
