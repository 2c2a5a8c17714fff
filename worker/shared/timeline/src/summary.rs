//! The summary a run prints on stdout when it ends (one JSON line): the
//! worker's own, which its supervisor (amm's nanny) completes with how each
//! attempt ended.

use serde::{Deserialize, Serialize};

use crate::event::{Check, Exit};

/// The run's summary. A worker prints it when it ends; its nanny reads the
/// last worker's, fills in the supervisor's part (`restarts`,
/// `terminations`, `crashes`, `attempts`, ...) and prints it again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    /// Workload name (`null` when no worker printed a summary).
    pub workload: Option<String>,
    /// Worker name (spill directory `amm-spill-<name>`).
    pub name: String,
    /// `jemalloc` or `system`.
    pub allocator: String,
    /// The allocator check at start-up passed.
    pub allocator_verified: bool,
    /// Task threads.
    pub nthreads: usize,
    /// Peak RSS (`VmHWM` or `wait4`'s: exact, spikes between polls included).
    pub peak_rss_bytes: u64,
    /// The effective limit (`null`: none).
    pub limit_bytes: Option<u64>,
    /// Where the limit came from.
    pub limit_source: String,
    /// Bytes (`sizeof`) moved to disk.
    pub spilled_bytes_total: u64,
    /// Values written to disk.
    pub spill_count: u64,
    /// Bytes written to spill files.
    pub written_bytes_total: u64,
    /// Bytes read back.
    pub unspilled_bytes_total: u64,
    /// Values read back.
    pub unspill_count: u64,
    /// Evictions that failed.
    pub spill_failures: u64,
    /// Time spent paused.
    pub paused_ms: u64,
    /// Times paused.
    pub pauses: u64,
    /// Purges/trims (threshold, pressure and workload ones).
    pub purge_count: u64,
    /// Bytes they gave back (RSS drop).
    pub purged_bytes_total: u64,
    /// Terminations (a worker: 0 or 1; the nanny's summary: all attempts).
    pub terminations: u32,
    /// Restarts by the nanny.
    pub restarts: u32,
    /// Attempts that crashed (signal or unexpected exit), counted by the nanny.
    pub crashes: u32,
    /// Every check passed and no task failed.
    pub result_ok: bool,
    /// The result checks.
    pub checks: Vec<Check>,
    /// Errors of failed operations (or why the run stopped).
    pub errors: Vec<String>,
    /// Wall time of the run.
    pub wall_ms: u64,
    /// Tasks run.
    pub tasks: u64,
    /// Monitor ticks.
    pub ticks: u64,
    /// Largest |process - (managed + unmanaged_live + hoarded + non_heap)|
    /// over the ticks.
    pub max_identity_error_bytes: u64,
    /// The exit code this process ends with.
    pub exit_code: i32,
    /// Kernel events received from amm-agent (0 without `--agent`).
    pub agent_events: u64,
    /// Registrations with amm-agent (more than 1: it came back after an
    /// outage).
    pub agent_connects: u64,
    /// amm-agent outages seen.
    pub agent_lost: u64,
    /// The effective memory configuration (after file, env and flags), as
    /// the writer's configuration serialises it: for people, not for
    /// programs (its shape is the writer's, not this contract's).
    pub memory_config: Option<serde_json::Value>,
    /// `MALLOC_TRIM_THRESHOLD_` as the worker's environment had it.
    pub malloc_trim_threshold_env: Option<String>,
    /// How each attempt ended (the supervisor's part).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// The supervisor's wall time, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nanny_wall_ms: Option<u64>,
    /// The supervisor gave up restarting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gave_up: Option<bool>,
    /// The signal that stopped the supervisor (forwarded to the worker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_by_signal: Option<i32>,
}

/// How an attempt counts for its supervisor (amm's nanny): whether it is
/// restarted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Verdict {
    /// Finished; not restarted.
    Done,
    /// Finished, but its result is wrong (amm-worker's own worker, exit 3);
    /// not restarted.
    ResultFailed,
    /// Refused to start (amm-worker's own worker, exit 78); not restarted.
    Refused,
    /// Ended by the memory model; restarted.
    Terminated {
        /// Who: `worker` (it stopped itself, exit 75), `kernel` (amm-agent's
        /// kill at the terminate page), `nanny` (the supervisor's terminate).
        by: String,
    },
    /// Ended otherwise (a signal nobody in amm sent, an error exit);
    /// restarted.
    Crashed,
    /// Ended after the supervisor forwarded this signal to it; never
    /// restarted, never a crash.
    Stopped {
        /// The signal forwarded.
        signal: i32,
    },
}

impl Verdict {
    /// True when the supervisor starts the process again (unless restarts
    /// ran out).
    pub fn restarts(&self) -> bool {
        matches!(self, Verdict::Terminated { .. } | Verdict::Crashed)
    }
}

/// How one attempt ended, as its supervisor saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Attempt {
    /// Which attempt (0 for the first).
    pub attempt: u32,
    /// Its pid.
    pub pid: u32,
    /// How it counts (absent in summaries written before verdicts existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// In words: `done`, `terminated`, `terminated at the page by amm-agent`,
    /// `killed by signal`, `crashed`, `stopped`, ...
    pub ending: String,
    /// Its status as a shell reports it (128 + N for signal N).
    pub exit_code: i32,
    /// The signal, when one ended it.
    pub signal: Option<i32>,
    /// `wait4`'s peak RSS (`ru_maxrss`), raised to the process's own
    /// report of it when that is higher, bytes.
    pub max_rss_bytes: u64,
    /// How long it ran, ms.
    pub ms: u64,
    /// Who or what ended it, in words, when the supervisor can tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// The exit event written to the timeline (who ended it, the level,
    /// the exact peak).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
}

impl Summary {
    /// The summary as one JSON line (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v_of(s: &Summary) -> serde_json::Value {
        serde_json::to_value(s).expect("json")
    }

    #[test]
    fn a_summary_reads_back_and_ignores_what_it_does_not_know() {
        let s = Summary {
            workload: Some("hoard".into()),
            peak_rss_bytes: 42,
            restarts: 1,
            attempts: vec![Attempt {
                attempt: 0,
                verdict: Some(Verdict::Terminated {
                    by: "worker".into(),
                }),
                ending: "terminated".into(),
                exit_code: 75,
                ..Attempt::default()
            }],
            ..Summary::default()
        };
        let mut v = serde_json::to_value(&s).expect("json");
        v["from_the_future"] = serde_json::json!(true);
        let back: Summary = serde_json::from_value(v).expect("back");
        assert_eq!(back, s);
        assert_eq!(v_of(&s)["attempts"][0]["verdict"]["kind"], "terminated");
        assert!(
            !s.to_json().contains("gave_up"),
            "unset supervisor fields are left out"
        );
    }
}
