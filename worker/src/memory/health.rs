//! Whether spilling works, and what the manager does while it does not
//! (a full disk, `max-spill`, an I/O error). Dask pauses and waits; so does
//! amm, with a way out:
//!
//! * values that cannot be spilled stay in memory; the worker pauses only
//!   at the pause level, as it would with a working disk;
//! * spilling is retried with back-off (the monitor interval, doubling up
//!   to [`MAX_BACKOFF`]), and a success ends the failure: the worker goes
//!   on as soon as the disk has room again;
//! * the failure and the recovery are logged once each (and written to the
//!   timeline as `spill_failed` / `spill_resumed`);
//! * when tasks have been held back by a pause for `spill-full-timeout`
//!   while spilling failed, the gate fails them with an error naming the
//!   directory and its free space (`spill_gave_up`), instead of pausing for
//!   ever.

use std::time::{Duration, Instant};

use amm_timeline::{Event, SpillFailed, SpillGaveUp, SpillResumed};

use super::MemoryManager;
use crate::units::format_bytes;

/// Longest wait between two attempts to spill while spilling fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Spilling failing since `since`, next tried at `retry_at`.
#[derive(Debug)]
struct Failing {
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    /// Since when tasks have been held back (paused) while it fails.
    holding_since: Option<Instant>,
    gave_up: bool,
}

/// The state of spilling, kept by the manager.
#[derive(Debug, Default)]
pub(super) struct SpillHealth {
    failing: Option<Failing>,
}

impl SpillHealth {
    /// Whether the manager may try to spill now.
    pub(super) fn may_try(&self) -> bool {
        self.failing
            .as_ref()
            .is_none_or(|f| Instant::now() >= f.retry_at)
    }
}

impl MemoryManager {
    /// Spill attempts report here: `Ok(true)` spilled something,
    /// `Ok(false)` had nothing to spill, `Err` failed.
    pub(super) fn spill_outcome(&mut self, outcome: Result<bool, String>) {
        let now = Instant::now();
        match (outcome, self.health.failing.as_mut()) {
            (Ok(false), _) | (Ok(true), None) => {}
            (Ok(true), Some(f)) => {
                let after = now.duration_since(f.since);
                self.health.failing = None;
                self.buffer.set_spill_blocked(false);
                tracing::info!(
                    dir = %self.buffer.dir().display(),
                    after_ms = after.as_millis() as u64,
                    "spilling works again"
                );
                self.event(Event::SpillResumed(SpillResumed {
                    after_ms: after.as_millis() as u64,
                }));
            }
            (Err(_), Some(f)) => {
                f.backoff = (f.backoff * 2).min(MAX_BACKOFF);
                f.retry_at = now + f.backoff;
            }
            (Err(e), None) => {
                let backoff = self.cfg.monitor_interval.min(MAX_BACKOFF);
                self.health.failing = Some(Failing {
                    since: now,
                    retry_at: now + backoff,
                    backoff,
                    holding_since: None,
                    gave_up: false,
                });
                self.buffer.set_spill_blocked(true);
                let free = self.buffer.free_bytes();
                let wait = match self.cfg.spill_full_timeout {
                    Some(t) => format!("tasks held back by a pause fail after {t:?}"),
                    None => "tasks held back by a pause wait for ever".to_string(),
                };
                tracing::error!(
                    dir = %self.buffer.dir().display(),
                    free = %free.map_or("unknown".into(), format_bytes),
                    "cannot spill ({e}): values stay in memory, retrying with back-off; {wait}"
                );
                self.event(Event::SpillFailed(SpillFailed {
                    reason: String::new(),
                    error: e,
                    process: None,
                    free_bytes: free,
                    dir: Some(self.buffer.dir().display().to_string()),
                }));
            }
        }
    }

    /// While spilling fails and the gate holds tasks back, fails them once
    /// they have waited `spill-full-timeout`.
    pub(super) fn check_spill_timeout(&mut self) {
        let paused = self.gate.is_paused();
        let Some(f) = self.health.failing.as_mut() else {
            return;
        };
        if !paused {
            f.holding_since = None;
            f.gave_up = false;
            return;
        }
        let held = *f.holding_since.get_or_insert_with(Instant::now);
        let Some(timeout) = self.cfg.spill_full_timeout else {
            return;
        };
        if f.gave_up || held.elapsed() < timeout {
            return;
        }
        f.gave_up = true;
        let failing_for = f.since.elapsed();
        let free = self.buffer.free_bytes();
        let why = format!(
            "spilling to {} has failed for {} s with {} free on its file system, and tasks \
             waited {} s (worker.memory.spill-full-timeout): free space there, raise \
             max-spill or the memory limit, or use another --local-directory",
            self.buffer.dir().display(),
            failing_for.as_secs(),
            free.map_or("unknown space".into(), format_bytes),
            timeout.as_secs_f64(),
        );
        tracing::error!("{why}; failing the tasks that wait");
        self.event(Event::SpillGaveUp(SpillGaveUp {
            free_bytes: free,
            failing_ms: failing_for.as_millis() as u64,
            dir: Some(self.buffer.dir().display().to_string()),
        }));
        self.gate.fail(why);
    }
}
