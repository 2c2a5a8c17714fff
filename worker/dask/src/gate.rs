//! The pause gate in front of Dask's executor.
//!
//! Every task a worker thread is about to run passes [`gate_wait`] first
//! (the Python side wraps the executor). The gate is closed by the agent
//! link's thread the moment the kernel reports the pause level or a spike
//! (no event loop, no `gc.collect()`, no GIL in between), and by the task
//! thread itself when it finds RSS at or above the pause level on its way
//! in. It opens on the fall below target (the kernel's re-arm event, or a
//! waiting thread that reads RSS below target, or the Python monitor), and a
//! spike's closing lapses at the predicted crossing. Dask's own status
//! machine is told separately (the Python side sets `paused`/`running`).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// How often a waiting thread reads RSS again.
const RECHECK: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct State {
    /// Why it is closed (`None`: open).
    closed: Option<String>,
    /// A spike's closing lapses here.
    until: Option<Instant>,
    /// Pause level in bytes (0: no check on the way in).
    pause_bytes: u64,
    /// Target (resume) level in bytes.
    target_bytes: u64,
    /// Times it closed.
    closes: u64,
    /// Tasks that waited, and how long in all.
    waits: u64,
    waited_ns: u64,
}

struct Gate {
    state: Mutex<State>,
    cv: Condvar,
}

static GATE: Gate = Gate {
    state: Mutex::new(State {
        closed: None,
        until: None,
        pause_bytes: 0,
        target_bytes: 0,
        closes: 0,
        waits: 0,
        waited_ns: 0,
    }),
    cv: Condvar::new(),
};

fn lock() -> MutexGuard<'static, State> {
    GATE.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// RSS of this process from `/proc/self/statm` (0 if unreadable).
pub fn rss_now() -> u64 {
    let page = amm_protocol::sys::page_size() as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// Closes the gate (from any thread); `for_ms` > 0 makes it lapse then.
pub fn close(reason: &str, for_ms: Option<u64>) {
    let mut s = lock();
    if s.closed.is_none() {
        s.closes += 1;
    }
    s.closed = Some(reason.to_string());
    s.until = for_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
}

/// Opens the gate and wakes every waiting task.
pub fn open() {
    let mut s = lock();
    s.closed = None;
    s.until = None;
    drop(s);
    GATE.cv.notify_all();
}

/// True when a task may start now; closes the gate when RSS is at or above
/// the pause level, opens it when a lapsed spike or RSS below target says
/// so.
fn may_start(s: &mut State) -> bool {
    let now = Instant::now();
    if s.closed.is_some() {
        let lapsed = s.until.is_some_and(|u| now >= u);
        let rss = rss_now();
        let below_pause = s.pause_bytes == 0 || rss < s.pause_bytes;
        let below_target = s.target_bytes > 0 && rss < s.target_bytes;
        if (lapsed && below_pause) || below_target {
            s.closed = None;
            s.until = None;
        }
        return s.closed.is_none();
    }
    if s.pause_bytes > 0 && rss_now() >= s.pause_bytes {
        s.closes += 1;
        s.closed = Some("rss at or above the pause level as a task was about to start".into());
        s.until = None;
        return false;
    }
    true
}

/// Blocks the calling task thread (without the GIL) until the gate lets it
/// start or `timeout_s` passes; returns the seconds it waited.
#[pyfunction]
#[pyo3(signature = (timeout_s=None))]
pub fn gate_wait(py: Python<'_>, timeout_s: Option<f64>) -> f64 {
    py.detach(|| {
        let start = Instant::now();
        let deadline = timeout_s.map(|t| start + Duration::from_secs_f64(t.max(0.0)));
        let mut s = lock();
        let mut waited = false;
        while !may_start(&mut s) {
            waited = true;
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break;
            }
            let mut step = RECHECK;
            if let Some(u) = s.until {
                step = step.min(
                    u.saturating_duration_since(now)
                        .max(Duration::from_millis(1)),
                );
            }
            if let Some(d) = deadline {
                step = step.min(d.saturating_duration_since(now));
            }
            s = GATE
                .cv
                .wait_timeout(s, step)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let took = start.elapsed();
        if waited {
            s.waits += 1;
            s.waited_ns += took.as_nanos() as u64;
        }
        took.as_secs_f64()
    })
}

/// Closes the gate; `for_ms` makes the closing lapse (a spike alarm).
#[pyfunction]
#[pyo3(signature = (reason, for_ms=None))]
pub fn gate_close(reason: &str, for_ms: Option<u64>) {
    close(reason, for_ms)
}

/// Opens the gate.
#[pyfunction]
pub fn gate_open() {
    open()
}

/// Sets the levels the gate checks (0 switches a check off).
#[pyfunction]
pub fn gate_levels(pause_bytes: u64, target_bytes: u64) {
    let mut s = lock();
    s.pause_bytes = pause_bytes;
    s.target_bytes = target_bytes;
}

/// `(closed_reason or None, closes, waits, waited_s)`.
#[pyfunction]
pub fn gate_state() -> (Option<String>, u64, u64, f64) {
    let s = lock();
    (
        s.closed.clone(),
        s.closes,
        s.waits,
        s.waited_ns as f64 / 1e9,
    )
}

/// This process's RSS now, in bytes.
#[pyfunction]
pub fn rss_bytes() -> u64 {
    rss_now()
}
