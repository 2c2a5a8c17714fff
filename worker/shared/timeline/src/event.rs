//! Everything that happens at one instant: a process starting, a workload
//! phase, a purge, a spill, a pause, a level the kernel saw crossed, a
//! spike alarm, an exit and its cause, a restart.
//!
//! In JSON an event is an object whose `event` field names it (`"purge"`)
//! next to its own fields.

use serde::{Deserialize, Serialize};

use crate::Level;
use crate::heap::Allocator;

/// One event. Its name on the line is the variant's in snake case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A process started: the first line of every attempt. Times of the
    /// lines that follow (`t_ms`) start again at 0.
    Start(Box<Start>),
    /// A workload phase started.
    Phase(Phase),
    /// A result was checked against a direct computation.
    Check(Check),
    /// The workload is over: what follows is the process tearing down.
    End(End),
    /// A purge (jemalloc) or trim (glibc) ran.
    Purge(PurgeReport),
    /// Values went to disk.
    Spill(Spill),
    /// Spilling failed: values stay in memory, retried with back-off.
    SpillFailed(SpillFailed),
    /// Spilling works again after failing.
    SpillResumed(SpillResumed),
    /// Spilling failed for so long that the tasks held back were failed.
    SpillGaveUp(SpillGaveUp),
    /// Process memory above spill with no value left in memory to spill.
    NothingToSpill(NothingToSpill),
    /// New tasks held back.
    Pause(PauseChange),
    /// Tasks allowed again.
    Unpause(PauseChange),
    /// The process passed the terminate level and stops itself.
    Terminate(Terminate),
    /// The kernel (amm-agent's BPF program) saw a level crossed, at the page.
    Level(LevelCrossing),
    /// The kernel predicted terminate within its horizon.
    Spike(Spike),
    /// A process ended: how, who ended it, its exact peak.
    Exit(Exit),
    /// The supervisor starts the process again.
    Restart(Restart),
    /// The supervisor ran a `--on-spill` / `--on-pause` hook.
    Hook(Hook),
    /// Registered with amm-agent: kernel events on.
    AgentConnected(AgentConnected),
    /// amm-agent went away; polling only until it is back.
    AgentLost(AgentReason),
    /// amm-agent refused to watch the process.
    AgentRefused(AgentReason),
    /// A kernel event as amm-worker wrote it before timeline version 1
    /// (`"event":"agent"`); read only, never written.
    #[serde(rename = "agent")]
    AgentV0(AgentV0),
    /// An event this reader does not know (written by a newer amm): ignored.
    #[serde(other)]
    Other,
}

/// The thresholds in bytes (`None`: turned off, or no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Levels {
    /// Managed bytes to stay under.
    pub target: Option<u64>,
    /// Process bytes above which the worker spills.
    pub spill: Option<u64>,
    /// Process bytes above which it pauses.
    pub pause: Option<u64>,
    /// Process bytes above which it is terminated.
    pub terminate: Option<u64>,
}

impl Levels {
    /// Dask's fractions (0.6 / 0.7 / 0.8 / 0.95) of `limit`.
    pub fn dask(limit: u64) -> Levels {
        Levels::of_fractions(Some(limit), [Some(0.6), Some(0.7), Some(0.8), Some(0.95)])
    }

    /// `[target, spill, pause, terminate]` as fractions of `limit`; `None`
    /// (no limit, or a level turned off) stays `None`.
    pub fn of_fractions(limit: Option<u64>, fractions: [Option<f64>; 4]) -> Levels {
        let at = |f: Option<f64>| Some((limit? as f64 * f?) as u64);
        let [target, spill, pause, terminate] = fractions.map(at);
        Levels {
            target,
            spill,
            pause,
            terminate,
        }
    }

    /// The bytes of a kernel level (`Below` has none).
    pub fn bytes_of(&self, level: Level) -> Option<u64> {
        match level {
            Level::Below => None,
            Level::Spill => self.spill,
            Level::Pause => self.pause,
            Level::Terminate => self.terminate,
        }
    }
}

/// A process started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Start {
    /// Which attempt (0 for the first process; a supervisor's restarts
    /// count up).
    pub attempt: u32,
    /// Its pid.
    pub pid: u32,
    /// What wrote the timeline: `amm-worker`, `amm-worker supervisor`,
    /// `amm-agent watch`, `amm-dask`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// The command, for a program amm did not write.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The allocator it runs on, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocator: Option<Allocator>,
    /// The memory limit, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The thresholds, bytes.
    pub levels: Levels,
    /// `--probe-purge` interval, ms, when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_purge_ms: Option<u64>,
    /// CLOCK_MONOTONIC ns at `t_ms` 0 of this attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t0_monotonic_ns: Option<u64>,
    /// The allocator library put in its environment (`LD_PRELOAD`), for a
    /// program amm did not write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preload: Option<String>,
    /// The memory-backed file system (`tmpfs`, `ramfs`) its spill directory
    /// was on: what it spilled stayed in RAM, charged to its own cgroup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spill_in_memory: Option<String>,
}

/// A workload phase started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phase {
    /// Its name.
    pub name: String,
    /// The workload's round (its `repeat`).
    pub round: u32,
    /// The phase's own repeat.
    pub repeat: u32,
}

/// A result compared with its direct computation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it matched.
    pub ok: bool,
    /// The numbers.
    pub detail: String,
}

/// The workload is over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct End {
    /// Operations that failed.
    pub errors: u64,
}

/// What one purge (jemalloc) or trim (glibc) gave back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PurgeReport {
    /// Which allocator was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocator: Option<Allocator>,
    /// Why it ran: `probe` (`--probe-purge`), `threshold`, `pressure`,
    /// `spill`, `workload`.
    pub reason: String,
    /// Process RSS before, bytes.
    pub rss_before: u64,
    /// Process RSS after, bytes.
    pub rss_after: u64,
    /// Bytes the kernel saw leave the process (`rss_before - rss_after`, 0 if
    /// other threads grew meanwhile).
    pub returned_bytes: u64,
    /// The allocator's own resident bytes before.
    pub resident_before: u64,
    /// The allocator's own resident bytes after.
    pub resident_after: u64,
    /// Hoarded bytes before (resident - live).
    pub hoarded_before: u64,
    /// Hoarded bytes after.
    pub hoarded_after: u64,
    /// How long it took, microseconds.
    pub duration_us: u64,
    /// CPU time the purging thread spent on it (user + kernel),
    /// microseconds: the purge's cost, which wall time overstates on a busy
    /// machine.
    pub cpu_us: u64,
}

impl PurgeReport {
    /// True when it ran on purpose to decide (`--probe-purge`).
    pub fn is_probe(&self) -> bool {
        self.reason == "probe"
    }
}

/// Values went to disk: to bring process memory down (`reason` `process`)
/// or managed memory under target (`target`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Spill {
    /// `process` or `target`.
    pub reason: String,
    /// Values written.
    pub values: u64,
    /// Their bytes (`sizeof`).
    pub bytes: u64,
    /// RSS before (`process`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_before: Option<u64>,
    /// RSS after (`process`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_after: Option<u64>,
    /// RSS it aimed at (`process`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<u64>,
    /// Purges it ran on the way (`process`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purges: Option<u64>,
    /// Managed bytes before (`target`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_before: Option<u64>,
    /// Managed bytes after (`target`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_after: Option<u64>,
    /// The target, bytes (`target`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<u64>,
    /// How long it took, ms.
    pub ms: u64,
    /// CLOCK_MONOTONIC ns when it began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub began_ns: Option<u64>,
}

/// Spilling failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpillFailed {
    /// `process` or `target` (empty: either).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The error.
    pub error: String,
    /// RSS then, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<u64>,
    /// Free bytes on the spill directory's file system.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// The spill directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// Spilling works again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpillResumed {
    /// How long it had failed, ms.
    pub after_ms: u64,
}

/// Spilling failed too long: the tasks held back were failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpillGaveUp {
    /// Free bytes on the spill directory's file system.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// How long spilling had failed, ms.
    pub failing_ms: u64,
    /// The spill directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// Above spill with nothing to spill (Dask's "Unmanaged memory use is
/// high"), once per rise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NothingToSpill {
    /// `process`.
    pub reason: String,
    /// RSS, bytes.
    pub process: u64,
    /// RSS it aimed at, bytes.
    pub goal: u64,
    /// Managed bytes (0 or nearly).
    pub managed: u64,
    /// How long the decision took, ms.
    pub ms: u64,
    /// CLOCK_MONOTONIC ns when the decision began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub began_ns: Option<u64>,
}

/// Pause or unpause.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PauseChange {
    /// Why.
    pub reason: String,
    /// RSS then, bytes.
    pub process: u64,
    /// RSS as a fraction of the limit.
    pub fraction: f64,
    /// Tasks started so far.
    pub tasks_started: u64,
    /// Tasks finished so far.
    pub tasks_finished: u64,
}

/// The process passed terminate: it stops itself (amm-worker's own
/// worker), or its supervisor sends it `signal` (`amm-worker -- CMD`
/// polling a program).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Terminate {
    /// RSS then, bytes.
    pub process: u64,
    /// The terminate level, bytes (0 when the kernel's event said so).
    pub threshold: u64,
    /// RSS as a fraction of the limit.
    pub fraction: f64,
    /// The exit code it leaves with (as a shell reports it: 128 + N for a
    /// signal N).
    pub exit_code: i32,
    /// The signal the supervisor sent, when it was the supervisor's
    /// terminate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// A level crossed, as the kernel saw it at the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelCrossing {
    /// Before.
    pub from: Level,
    /// After.
    pub to: Level,
    /// RSS at the crossing, bytes.
    pub rss: u64,
    /// The kernel signalled the process (the terminate signal).
    #[serde(default)]
    pub signalled: bool,
    /// From the kernel's event to this line, µs (when relayed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_us: Option<u64>,
}

/// The kernel predicted terminate within its horizon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Spike {
    /// RSS then, bytes.
    pub rss: u64,
    /// Predicted time to terminate, ns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_ns: Option<u64>,
    /// From the kernel's event to this line, µs (when relayed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_us: Option<u64>,
}

/// Who ended a process that did not exit by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "who", rename_all = "snake_case")]
pub enum Killer {
    /// The kernel, at the page that crossed terminate (amm-agent's BPF
    /// program sent the signal).
    KernelTerminate,
    /// The kernel's OOM killer (a cgroup limit, or the whole machine).
    OomKill {
        /// `cgroup` or `global`, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// Its supervisor (amm's nanny: a forwarded SIGINT/SIGTERM, or its
    /// terminate by signal).
    Supervisor,
    /// Another process sent the signal.
    Process {
        /// The sender's pid, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// The sender's command name, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comm: Option<String>,
    },
    /// Nobody could say.
    Unknown,
}

impl Killer {
    /// A few words for a report: "the kernel at the terminate page".
    pub fn describe(&self) -> String {
        match self {
            Killer::KernelTerminate => "the kernel at the page that crossed terminate".into(),
            Killer::OomKill { scope } => match scope.as_deref() {
                Some(s) => format!("the kernel's OOM killer ({s})"),
                None => "the kernel's OOM killer".into(),
            },
            Killer::Supervisor => "its supervisor".into(),
            Killer::Process { pid, comm } => match (pid, comm) {
                (Some(p), Some(c)) => format!("another process ({c}, pid {p})"),
                (Some(p), None) => format!("another process (pid {p})"),
                (None, Some(c)) => format!("another process ({c})"),
                (None, None) => "another process".into(),
            },
            Killer::Unknown => "a signal of unknown origin".into(),
        }
    }
}

/// Where an exit's peak RSS comes from (all exact: the kernel's own
/// high-water mark, not a sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakSource {
    /// amm-agent's BPF program, which sees every RSS change.
    Bpf,
    /// `wait4`'s `ru_maxrss` (the kernel's `hiwater_rss`), read by the
    /// parent.
    Wait4,
    /// `VmHWM` of `/proc/PID/status`, read by the process itself.
    Vmhwm,
}

/// A process ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Exit {
    /// Which attempt.
    pub attempt: u32,
    /// Its pid.
    pub pid: u32,
    /// Its exit code, when it exited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Who ended it, when it did not exit by itself (or exited with the
    /// terminate code: then `None` and `level` says terminate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<Killer>,
    /// The level it was at when it ended, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// RSS when it ended (at the killing page, for the kernel's kill), bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// The kernel's exact peak RSS of the process, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// Where the peak comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_source: Option<PeakSource>,
}

impl Exit {
    /// True when something other than the process itself ended it.
    pub fn killed(&self) -> bool {
        self.signal.is_some() && self.by != Some(Killer::Supervisor)
    }
}

/// The supervisor starts the process again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Restart {
    /// The attempt about to start.
    pub attempt: u32,
    /// Why: how the last one ended (`terminated`, `killed by signal 9`, ...).
    pub reason: String,
    /// Back-off before it starts, ms.
    pub backoff_ms: u64,
}

/// A hook run at a rise into spill or pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// The level risen into (`spill` or `pause`).
    pub level: Level,
    /// RSS then, bytes.
    pub rss: u64,
    /// What was done, in words (the command or the signal, and how it
    /// went).
    #[serde(default)]
    pub what: String,
}

/// Registered with amm-agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentConnected {
    /// RSS the agent saw at registration, bytes.
    pub rss: u64,
    /// The terminate level the kernel enforces, bytes.
    pub terminate: u64,
}

/// Why the agent went away or refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentReason {
    /// The reason, in the agent's or the link's words.
    pub reason: String,
}

/// A kernel event as amm-worker wrote it before version 1; read only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentV0 {
    /// `level`, `spike` or `exit`.
    pub agent_event: String,
    /// The level after.
    #[serde(default)]
    pub level: Option<Level>,
    /// The level before.
    #[serde(default)]
    pub prev_level: Option<Level>,
    /// RSS, bytes.
    #[serde(default)]
    pub rss: u64,
    /// Kernel to worker, µs.
    #[serde(default)]
    pub delay_us: Option<u64>,
    /// Spike: predicted time to terminate, ns.
    #[serde(default)]
    pub eta_ns: Option<u64>,
    /// The kernel signalled the process.
    #[serde(default)]
    pub signalled: bool,
}

impl AgentV0 {
    /// The event it is in version 1 terms.
    pub fn upgrade(&self) -> Option<Event> {
        match self.agent_event.as_str() {
            "level" => Some(Event::Level(LevelCrossing {
                from: self.prev_level?,
                to: self.level?,
                rss: self.rss,
                signalled: self.signalled,
                delay_us: self.delay_us,
            })),
            "spike" => Some(Event::Spike(Spike {
                rss: self.rss,
                eta_ns: self.eta_ns,
                delay_us: self.delay_us,
            })),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_named_by_their_event_field() {
        let e = Event::Purge(PurgeReport {
            reason: "probe".into(),
            returned_bytes: 5,
            ..PurgeReport::default()
        });
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(v["event"], "purge");
        assert_eq!(v["returned_bytes"], 5);
        let back: Event = serde_json::from_value(v).expect("back");
        assert_eq!(back, e);
    }

    #[test]
    fn an_unknown_event_is_other_and_an_old_agent_event_upgrades() {
        let e: Event = serde_json::from_str(r#"{"event":"teleport","x":1}"#).expect("other");
        assert_eq!(e, Event::Other);
        let e: Event = serde_json::from_str(
            r#"{"event":"agent","agent_event":"level","level":"spill","prev_level":"below","rss":9,"delay_us":40,"eta_ns":null,"signalled":false}"#,
        )
        .expect("v0");
        let Event::AgentV0(old) = e else {
            panic!("{e:?}")
        };
        assert_eq!(
            old.upgrade(),
            Some(Event::Level(LevelCrossing {
                from: Level::Below,
                to: Level::Spill,
                rss: 9,
                signalled: false,
                delay_us: Some(40),
            }))
        );
    }

    #[test]
    fn an_exit_says_who_killed_it() {
        let e = Event::Exit(Exit {
            attempt: 1,
            pid: 42,
            signal: Some(9),
            by: Some(Killer::KernelTerminate),
            level: Some(Level::Terminate),
            rss_bytes: Some(2040 << 20),
            peak_rss_bytes: Some(2041 << 20),
            peak_source: Some(PeakSource::Bpf),
            ..Exit::default()
        });
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(v["by"]["who"], "kernel_terminate");
        assert_eq!(v["level"], "terminate");
        let back: Event = serde_json::from_value(v).expect("back");
        assert_eq!(back, e);
        let Event::Exit(x) = back else { panic!() };
        assert!(x.killed());
        assert!(
            Killer::OomKill {
                scope: Some("cgroup".into())
            }
            .describe()
            .contains("OOM")
        );
    }
}
