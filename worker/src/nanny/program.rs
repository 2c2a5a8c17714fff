//! `amm-worker [OPTIONS] -- CMD ARGS...`: the nanny supervising any program.
//!
//! Each attempt: the program starts with amm's allocator in its environment
//! ([`crate::inject`]), never outlives the nanny, is registered with
//! amm-agent when `--agent` is given (the kernel kills it at the page that
//! crosses terminate, or sends the configured signal and the nanny kills it
//! after `--terminate-grace`), and is polled every monitor interval: its RSS
//! goes into the timeline with its allocator record's statistics and split
//! ([`super::record`]: the preload library publishes them), a rise into
//! spill or pause fires `--on-spill` / `--on-pause` ([`crate::hook`]), at
//! spill and above the program is asked to purge its allocator's hoard,
//! and terminate reached by polling alone (no agent, or the agent away) is
//! enforced by the nanny itself.
//!
//! Each end is explained: the exit code, or the signal and who sent it (the
//! kernel at the terminate page, the nanny, the cgroup's OOM killer, or
//! someone else), and the nanny exits with the program's own status, as a
//! shell reports it (the code, or 128 + the signal).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use amm_protocol::link::{Link, LinkConfig, LinkEvent};
use amm_protocol::{Fractions, Registration, TerminateBy};
use amm_timeline::{Event, Hook, Killer, Restart, Start, Summary, Terminate, Tick};
use nix::sys::signal::Signal;

use super::record::ProgramRecord;
use super::{ATTEMPT_ENV, Attempt, NAME_ENV, OomKills, Program, Verdict};
use crate::child::{self, Child, Ending};
use crate::config::MemoryConfig;
use crate::hook::{Action, Facts, Hooks};
use crate::inject::Injection;
use crate::limit::Limit;
use crate::memory::{Level, Levels, levels};
use crate::timeline::Timeline;

/// How long a program waits before exec for amm-agent's answer.
const REGISTRATION_WAIT: Duration = Duration::from_secs(5);

/// Everything `amm-worker -- CMD` needs.
#[derive(Debug, Clone)]
pub struct ProgramOptions {
    /// The command and its arguments.
    pub argv: Vec<OsString>,
    /// `jemalloc` or `system`, for the record.
    pub allocator: crate::alloc::Allocator,
    /// The environment changes.
    pub injection: Injection,
    /// Thresholds, intervals, agent settings.
    pub memory: MemoryConfig,
    /// The effective limit.
    pub limit: Limit,
    /// The worker's name (`AMM_WORKER_NAME` in its environment).
    pub name: String,
    /// `--timeline PATH`.
    pub timeline: Option<PathBuf>,
    /// `--on-spill`.
    pub on_spill: Option<Action>,
    /// `--on-pause`.
    pub on_pause: Option<Action>,
    /// `--hook-timeout`.
    pub hook_timeout: Duration,
    /// Time between a terminate signal other than SIGKILL and SIGKILL.
    pub terminate_grace: Duration,
}

/// What one attempt knows while it runs.
#[derive(Debug, Default)]
struct AttemptState {
    pid: u32,
    /// The level as polls and the kernel's events saw it.
    level: Level,
    /// When the last poll's measurement began (`CLOCK_MONOTONIC` ns; 0:
    /// none yet).
    last_poll_ns: u64,
    /// The kernel signalled it at the terminate page.
    kernel_signalled: bool,
    /// The nanny sent the terminate signal, at this instant.
    nanny_terminated: Option<Instant>,
    killed_after_grace: bool,
    /// The agent's exit event came.
    kernel_exit: bool,
    /// OOM kills when the attempt started.
    oom_kills_at_start: OomKills,
    /// RSS at the last poll of a live process.
    rss: u64,
    /// RSS when terminate was acted on (by the kernel or the nanny).
    terminate_rss: Option<u64>,
    /// The program's allocator record (once it publishes one).
    record: Option<ProgramRecord>,
}

/// Any program as the nanny's program.
pub struct AnyProgram {
    opts: ProgramOptions,
    levels: Levels,
    hooks: Hooks,
    timeline: Option<Arc<Timeline>>,
    link: Option<Link>,
    events: Option<mpsc::Receiver<LinkEvent>>,
    state: AttemptState,
    cgroup: Option<amm_cgroup::MemoryCgroup>,
}

impl std::fmt::Debug for AnyProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnyProgram")
            .field("argv", &self.opts.argv)
            .finish_non_exhaustive()
    }
}

impl AnyProgram {
    /// A program to supervise.
    pub fn new(opts: ProgramOptions) -> AnyProgram {
        let levels = levels(&opts.memory, opts.limit.bytes);
        AnyProgram {
            hooks: Hooks::new(opts.hook_timeout),
            levels,
            opts,
            timeline: None,
            link: None,
            events: None,
            state: AttemptState::default(),
            cgroup: amm_cgroup::find(std::path::Path::new("/")).ok().flatten(),
        }
    }

    fn record(&self, event: Event) {
        if let Some(t) = &self.timeline {
            t.event(event);
        }
    }

    fn terminate_signal(&self) -> Signal {
        self.opts
            .memory
            .agent_terminate_signal
            .and_then(|s| Signal::try_from(s).ok())
            .unwrap_or(Signal::SIGKILL)
    }

    /// Registers the child with amm-agent; its events come back on a
    /// channel the nanny drains on its own thread.
    fn register(&mut self, pid: u32) {
        let (Some(socket), Some(limit)) = (&self.opts.memory.agent_socket, self.opts.limit.bytes)
        else {
            return;
        };
        let m = &self.opts.memory;
        let registration = Registration {
            start_time: crate::proc::start_time(pid),
            thresholds: Fractions {
                target: m.target,
                spill: m.spill,
                pause: m.pause,
                terminate: m.terminate,
            },
            terminate_signal: m.agent_terminate_signal.filter(|_| !m.agent_observe_only),
            terminate_by: TerminateBy::Kernel,
            ..Registration::new(pid, limit)
        };
        let (tx, rx) = mpsc::channel();
        let config = LinkConfig {
            socket: socket.clone(),
            registration,
            name: format!("amm-worker nanny {} for {pid}", std::process::id()),
            retry: Duration::from_millis(500),
            reader: amm_protocol::sched::ReaderPolicy::Inherit,
            spin: None,
        };
        match Link::spawn(config, move |e| {
            let _ = tx.send(e);
        }) {
            Ok(l) => {
                self.link = Some(l);
                self.events = Some(rx);
            }
            Err(e) => tracing::warn!("cannot start the link to amm-agent: {e}; polling only"),
        }
    }

    /// Waits (the child held before exec) until the agent watches it, so
    /// the kernel sees its first page; polling only if the agent does not
    /// answer in time.
    fn await_registration(&mut self) {
        let Some(rx) = &self.events else { return };
        let first = rx.recv_timeout(REGISTRATION_WAIT);
        match first {
            Ok(e) => self.on_link_event(e),
            Err(_) => tracing::warn!(
                "amm-agent did not answer within {} ms: starting the program, polling until it does",
                REGISTRATION_WAIT.as_millis()
            ),
        }
    }

    /// Acts on what the agent sent since the last look.
    fn drain_events(&mut self) {
        let Some(rx) = &self.events else { return };
        let events: Vec<LinkEvent> = rx.try_iter().collect();
        for e in events {
            self.on_link_event(e);
        }
    }

    fn on_link_event(&mut self, e: LinkEvent) {
        if let Some(t) = &self.timeline {
            crate::agent::record(t, &e);
        }
        match e {
            LinkEvent::Connected { rss_bytes, .. } => {
                tracing::info!(
                    pid = self.state.pid,
                    rss_bytes,
                    "amm-agent watches the program"
                );
            }
            LinkEvent::Lost(why) => {
                tracing::warn!("amm-agent unavailable ({why}); polling only until it is back");
            }
            LinkEvent::Refused(why) => {
                tracing::warn!("amm-agent refused to watch the program ({why}); polling only");
            }
            LinkEvent::Event(m) => match m.event {
                amm_ebpf::EventKind::Exit => self.state.kernel_exit = true,
                amm_ebpf::EventKind::Credentials => {
                    // the agent's watch is over (setuid exec...): polls only
                    tracing::warn!(
                        pid = self.state.pid,
                        "the program's credentials changed: amm-agent stopped watching it; \
                         the nanny's polls go on"
                    );
                    self.state.kernel_exit = true;
                }
                amm_ebpf::EventKind::Level => {
                    if m.level == Level::Terminate && m.signalled {
                        self.state.kernel_signalled = true;
                        self.state.terminate_rss = Some(m.rss_bytes);
                        // a signal other than SIGKILL: kill after the grace
                        self.state.nanny_terminated.get_or_insert_with(Instant::now);
                    }
                    self.set_level(m.level, m.rss_bytes);
                }
                amm_ebpf::EventKind::Spike => {}
            },
        }
    }

    /// A new level from a poll or the kernel: hooks on a rise into spill or
    /// pause.
    fn set_level(&mut self, level: Level, rss: u64) {
        let old = self.state.level;
        self.state.level = level;
        if level <= old {
            return;
        }
        let limit = self.opts.limit.bytes.unwrap_or(0);
        for (l, name, action) in [
            (Level::Spill, "spill", &self.opts.on_spill),
            (Level::Pause, "pause", &self.opts.on_pause),
        ] {
            if old < l
                && level >= l
                && let Some(a) = action
            {
                let facts = Facts {
                    level: name,
                    pid: self.state.pid,
                    rss,
                    limit,
                };
                let said = self.hooks.fire(a, facts);
                tracing::info!("{said}");
                self.record(Event::Hook(Hook {
                    level: l,
                    rss,
                    what: said,
                }));
            }
        }
    }

    /// One poll of the program's memory: a level, terminate, and a tick
    /// with the allocator record's statistics; a pressure purge.
    fn poll_memory(&mut self, pid: u32) {
        let every = self.opts.memory.monitor_interval.as_nanos() as u64;
        // the tick's time is when its measurement began, as amm-worker's
        // own (`Accounting::began_ns`): the level, hook and terminate
        // events this read causes are written before the tick yet lie
        // after it on `t_ns`
        let began_ns = crate::timeline::monotonic_ns();
        let previous_ns = self.state.last_poll_ns;
        if previous_ns != 0 && began_ns.saturating_sub(previous_ns) < every {
            return;
        }
        self.state.last_poll_ns = began_ns;
        let rss = match crate::proc::rss_of(pid) {
            // a zombie has no memory left to show: the wait will tell
            Ok(r) if r.total() > 0 => r,
            _ => return,
        };
        self.state.rss = rss.total();
        // levels and terminate from the kernel's RSS alone, before the
        // record (written by the program) is read
        let level = level_of(&self.levels, self.state.level, rss.total());
        if level != self.state.level {
            self.set_level(level, rss.total());
        }
        if level == Level::Terminate && self.state.nanny_terminated.is_none() {
            self.terminate(pid, rss.total());
        }
        let mut tick = Tick {
            rss_anon: Some(rss.anon),
            rss_file_shmem: Some(rss.file + rss.shmem),
            limit: self.opts.limit.bytes,
            ..Tick::rss(rss.total())
        };
        let purge = self
            .state
            .record
            .as_mut()
            .and_then(|r| r.read_into(&mut tick));
        // no tick of RSS alone while the record is expected any moment
        let warming_up = self.state.record.as_ref().is_some_and(|r| r.warming_up());
        if let Some(t) = self.timeline.as_ref().filter(|_| !warming_up) {
            t.tick_at(began_ns, tick);
        }
        if let Some((p, finished_ns)) = purge {
            tracing::info!(
                pid,
                reason = p.reason,
                returned = p.returned_bytes,
                "the program purged its allocator's hoard"
            );
            let now = crate::timeline::monotonic_ns();
            let at = amm_timeline::record::purge_time_ns(finished_ns, previous_ns, now);
            if let Some(t) = &self.timeline {
                t.event_at(at, Event::Purge(p));
            }
        }
        if level < Level::Terminate {
            self.pressure_purge(pid, level);
        }
    }

    /// At spill and above: asks the program to purge its hoard (see
    /// [`super::record`]).
    fn pressure_purge(&mut self, pid: u32, level: Level) {
        let m = &self.opts.memory;
        let (threshold, every) = (m.trim_threshold, m.purge_interval);
        let Some(r) = self.state.record.as_mut() else {
            return;
        };
        if let Some(asked) = r.pressure_purge(level, threshold, every) {
            tracing::info!(
                pid,
                purgeable = asked.purgeable,
                ticket = asked.ticket.0,
                "at {level:?}: asked the program to purge its allocator's hoard"
            );
        }
    }

    /// The nanny's own terminate: the configured signal, recorded.
    fn terminate(&mut self, pid: u32, rss: u64) {
        let sig = self.terminate_signal();
        tracing::warn!(
            pid,
            rss,
            "process memory passed terminate: the nanny sends {sig}"
        );
        self.record(Event::Terminate(Terminate {
            process: rss,
            threshold: self.levels.terminate.unwrap_or(0),
            fraction: self.fraction(rss).unwrap_or(0.0),
            exit_code: 128 + sig as i32,
            signal: Some(sig as i32),
        }));
        child::send(pid, sig as i32);
        self.state.nanny_terminated = Some(Instant::now());
        self.state.terminate_rss = Some(rss);
    }

    /// SIGKILL once the grace after a softer terminate signal is over.
    fn enforce_grace(&mut self, pid: u32) {
        if let Some(t) = self.state.nanny_terminated
            && !self.state.killed_after_grace
            && t.elapsed() >= self.opts.terminate_grace
            && self.terminate_signal() != Signal::SIGKILL
        {
            tracing::warn!(pid, "terminate grace over: SIGKILL");
            child::send(pid, libc::SIGKILL);
            self.state.killed_after_grace = true;
        }
    }

    /// Waits a little for the agent's exit event, so every event of the
    /// attempt (the kernel's terminate among them) is in.
    fn await_kernel_exit(&mut self) {
        if self.events.is_none() {
            return;
        }
        let until = Instant::now() + Duration::from_millis(500);
        while !self.state.kernel_exit && Instant::now() < until {
            self.drain_events();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// RSS as a fraction of the limit, when there is one.
    fn fraction(&self, rss: u64) -> Option<f64> {
        self.opts
            .limit
            .bytes
            .filter(|&l| l > 0)
            .map(|l| rss as f64 / l as f64)
    }

    /// Who ended the attempt, in words, and who did (`None`: it exited by
    /// itself): the kernel at the terminate page or the nanny's terminate
    /// (amm's memory model), the OOM killer, or a sender outside amm.
    fn cause(&self, ending: Ending) -> (String, Option<Killer>) {
        let pct = |rss: Option<u64>| match rss.and_then(|r| self.fraction(r)) {
            Some(f) => format!(" at {:.1} % of the limit", 100.0 * f),
            None => String::new(),
        };
        let at_terminate = pct(self.state.terminate_rss);
        let amm = if self.state.kernel_signalled {
            Some(Killer::KernelTerminate)
        } else if self.state.nanny_terminated.is_some() {
            Some(Killer::Supervisor)
        } else {
            None
        };
        match (ending, amm) {
            (Ending::Exited(c), Some(by)) => (
                format!("exited {c} after amm's terminate signal{at_terminate}"),
                Some(by),
            ),
            (Ending::Exited(c), None) => (format!("exited with code {c}"), None),
            (Ending::Signaled(s), Some(Killer::KernelTerminate)) => (
                format!(
                    "killed by signal {s}: amm-agent's kernel program at the page that crossed terminate{at_terminate}"
                ),
                Some(Killer::KernelTerminate),
            ),
            (Ending::Signaled(s), Some(by)) => (
                format!("killed by signal {s}: the nanny's terminate{at_terminate}"),
                Some(by),
            ),
            (Ending::Signaled(s), None) => {
                let oom = OomKills::now(self.cgroup.as_ref()).since(&self.state.oom_kills_at_start);
                match oom {
                    Some(oom) => (
                        format!(
                            "killed by signal {s}: {}; last seen{}",
                            oom.describe(),
                            pct(Some(self.state.rss).filter(|r| *r > 0))
                        ),
                        Some(oom),
                    ),
                    None => (
                        format!("killed by signal {s}, sent by a process outside amm"),
                        Some(Killer::Unknown),
                    ),
                }
            }
        }
    }
}

/// The level for `rss`, from `current`: up at a crossing, back to below
/// only under the target (re-arm) level, as the kernel program does.
pub fn level_of(levels: &Levels, current: Level, rss: u64) -> Level {
    let at = |b: Option<u64>| b.is_some_and(|b| rss >= b);
    let up = if at(levels.terminate) {
        Level::Terminate
    } else if at(levels.pause) {
        Level::Pause
    } else if at(levels.spill) {
        Level::Spill
    } else {
        Level::Below
    };
    if up >= current {
        return up;
    }
    match levels.target {
        Some(t) if rss < t => Level::Below,
        _ => current,
    }
}

impl Program for AnyProgram {
    fn command(&mut self, attempt: u32) -> anyhow::Result<Command> {
        let Some((prog, args)) = self.opts.argv.split_first() else {
            anyhow::bail!("no command given after --");
        };
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .envs(self.opts.injection.set.iter().map(|(k, v)| (k, v)))
            .env(NAME_ENV, &self.opts.name)
            .env(ATTEMPT_ENV, attempt.to_string())
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        if let Some(p) = &self.opts.timeline {
            let t = Timeline::create(p, attempt > 0)?;
            self.timeline = Some(Arc::new(t));
        }
        Ok(cmd)
    }

    fn on_nanny_death(&self) -> Signal {
        // a program may ignore SIGTERM; an orphan must not stay
        Signal::SIGKILL
    }

    fn gated(&self) -> bool {
        // registered before its first page; an exec failure is reported
        true
    }

    fn started(&mut self, attempt: u32, child: &mut Child) -> anyhow::Result<()> {
        let expected = self.opts.injection.library.is_some();
        let record =
            crate::proc::start_time(child.pid).map(|t| ProgramRecord::new(child.pid, t, expected));
        self.state = AttemptState {
            pid: child.pid,
            record,
            oom_kills_at_start: OomKills::now(self.cgroup.as_ref()),
            ..AttemptState::default()
        };
        let origin = self.timeline.as_ref().map(|t| t.origin_monotonic_ns());
        self.record(Event::Start(Box::new(Start {
            attempt,
            pid: child.pid,
            writer: Some("amm-worker -- CMD".into()),
            command: self
                .opts
                .argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            allocator: Some(self.opts.allocator),
            limit: self.opts.limit.bytes,
            levels: self.levels,
            t0_monotonic_ns: origin,
            preload: self
                .opts
                .injection
                .library
                .as_ref()
                .map(|l| l.display().to_string()),
            ..Start::default()
        })));
        self.register(child.pid);
        self.await_registration();
        Ok(())
    }

    fn poll(&mut self, pid: u32) {
        self.drain_events();
        self.poll_memory(pid);
        self.enforce_grace(pid);
        for line in self.hooks.reap() {
            tracing::info!("{line}");
        }
    }

    fn verdict(&mut self, _pid: u32, ending: Ending) -> Verdict {
        self.await_kernel_exit();
        match (ending, self.cause(ending).1) {
            (_, Some(Killer::KernelTerminate)) => Verdict::Terminated {
                by: "kernel".into(),
            },
            (_, Some(Killer::Supervisor)) => Verdict::Terminated { by: "nanny".into() },
            (Ending::Exited(0), _) => Verdict::Done,
            _ => Verdict::Crashed,
        }
    }

    fn finished(&mut self, attempt: &mut Attempt) {
        let (cause, by) = match attempt.verdict {
            Some(Verdict::Stopped { signal }) => (
                format!("stopped: the nanny forwarded signal {signal}"),
                Some(Killer::Supervisor),
            ),
            _ => self.cause(Ending::of(attempt.exit_code, attempt.signal)),
        };
        tracing::info!(attempt = attempt.attempt, "program ended: {cause}");
        let terminated = matches!(attempt.verdict, Some(Verdict::Terminated { .. }));
        let rss = match self.state.terminate_rss {
            Some(r) if terminated => Some(r),
            _ => Some(self.state.rss).filter(|r| *r > 0),
        };
        let exit = super::exit_event(attempt, by, terminated.then_some(Level::Terminate), rss);
        self.record(Event::Exit(exit.clone()));
        attempt.cause = Some(cause);
        attempt.exit = Some(exit);
        self.link = None;
        self.events = None;
        if let Some(t) = &self.timeline {
            t.flush();
        }
    }

    fn restarting(&mut self, restart: &Restart) {
        self.record(Event::Restart(restart.clone()));
    }

    fn summary(&mut self) -> Summary {
        Summary {
            name: self.opts.name.clone(),
            allocator: self.opts.allocator.name().to_string(),
            limit_bytes: self.opts.limit.bytes,
            limit_source: self.opts.limit.source.clone(),
            // a program's result is good when it exits 0 (the nanny
            // clears it otherwise)
            result_ok: true,
            ..Summary::default()
        }
    }

    fn exit_code(&self, last: &Attempt, _gave_up: bool) -> i32 {
        last.exit_code
    }
}
