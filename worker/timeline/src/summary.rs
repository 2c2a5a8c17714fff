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
    pub attempts: Vec<AttemptEnd>,
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

/// How one attempt ended, as its supervisor saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttemptEnd {
    /// Which attempt.
    pub attempt: u32,
    /// In words: `done`, `terminated`, `terminated at the page by amm-agent`,
    /// `killed by the OOM killer`, `crashed`, ...
    pub ending: String,
    /// The supervisor's exit code for it (128 + N for signal N).
    pub exit_code: i32,
    /// The signal, when one ended it.
    pub signal: Option<i32>,
    /// `wait4`'s peak RSS, bytes.
    pub max_rss_bytes: u64,
    /// How long it ran, ms.
    pub ms: u64,
    /// The exit event written to the timeline (cause and peak).
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

    #[test]
    fn a_summary_reads_back_and_ignores_what_it_does_not_know() {
        let s = Summary {
            workload: Some("hoard".into()),
            peak_rss_bytes: 42,
            restarts: 1,
            attempts: vec![AttemptEnd {
                attempt: 0,
                ending: "terminated".into(),
                exit_code: 75,
                ..AttemptEnd::default()
            }],
            ..Summary::default()
        };
        let mut v = serde_json::to_value(&s).expect("json");
        v["from_the_future"] = serde_json::json!(true);
        let back: Summary = serde_json::from_value(v).expect("back");
        assert_eq!(back, s);
        assert!(
            !s.to_json().contains("gave_up"),
            "unset supervisor fields are left out"
        );
    }
}
