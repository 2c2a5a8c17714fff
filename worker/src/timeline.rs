//! `--timeline PATH`: one JSON object per line.
//!
//! * `{"t_ms": .., "kind": "tick", ...}` once per monitor tick: the
//!   accounting split (`process`, `managed`, `unmanaged_live`, `hoarded`,
//!   `non_heap`, `spilled`, `unmanaged_recent`, `heap_live`,
//!   `allocator_resident`, `identity_error`, and `rss_moved`: how far RSS
//!   moved while the allocator was read), the limit and fraction, pause
//!   state and task counts, the SpillBuffer's counters, the cgroup's usage
//!   and page cache, and the allocator's statistics (`heap`: jemalloc totals,
//!   per-arena dirty/muzzy and per-size-class counts, or glibc `mallinfo2`,
//!   arena residency and `malloc_info` per arena).
//! * `{"t_ms": .., "kind": "event", "event": NAME, ...}` for `spill`,
//!   `spill_failed`, `nothing_to_spill` (process memory above spill with no
//!   value left in memory, once per rise), `purge` (with what it returned), `pause`, `unpause`,
//!   `terminate`, and workload events (`phase` at each phase's start, `check`,
//!   `end` when the workload is over).
//!
//! Every line also has `t_ns`, CLOCK_MONOTONIC when it was written (the
//! clock of the kernel's events); a `spill` for process memory has
//! `began_ns`, when it started.
//!
//! Lines are flushed as written so a reader can follow a live worker. A
//! worker restarted by its nanny appends to the same file after a `start`
//! event (`attempt`, `pid`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{Map, Value};

/// CLOCK_MONOTONIC now, in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid for writes; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A JSON-lines writer shared by the manager and the workload.
#[derive(Debug)]
pub struct Timeline {
    out: Mutex<BufWriter<File>>,
    start: Instant,
    /// CLOCK_MONOTONIC (the kernel's event clock) at `start`.
    start_monotonic_ns: u64,
}

impl Timeline {
    /// Creates (truncates) the file, or appends to it for a restarted
    /// worker (`append`), so one file holds every attempt; each attempt
    /// starts with a `start` event and its own `t_ms` clock.
    pub fn create(path: &Path, append: bool) -> std::io::Result<Timeline> {
        let f = if append {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        } else {
            File::create(path)
        }
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot create timeline {}: {e}", path.display()),
            )
        })?;
        Ok(Timeline {
            out: Mutex::new(BufWriter::new(f)),
            start: Instant::now(),
            start_monotonic_ns: monotonic_ns(),
        })
    }

    /// CLOCK_MONOTONIC in ns at `t_ms` 0: `t_ms * 1e6` plus this is on the
    /// clock of the kernel's events (and `amm-agent watch`).
    pub fn origin_monotonic_ns(&self) -> u64 {
        self.start_monotonic_ns
    }

    fn write(&self, kind: &str, name: Option<&str>, fields: &Value) {
        let mut obj = Map::new();
        obj.insert(
            "t_ms".into(),
            Value::from(self.start.elapsed().as_millis() as u64),
        );
        obj.insert("t_ns".into(), Value::from(monotonic_ns()));
        obj.insert("kind".into(), Value::from(kind));
        if let Some(n) = name {
            obj.insert("event".into(), Value::from(n));
        }
        if let Value::Object(m) = fields {
            for (k, v) in m {
                obj.insert(k.clone(), v.clone());
            }
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let line = Value::Object(obj).to_string();
        // A full disk must not stop the worker: the timeline is best effort.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Writes a tick line.
    pub fn tick(&self, fields: &Value) {
        self.write("tick", None, fields);
    }

    /// Writes an event line.
    pub fn event(&self, name: &str, fields: Value) {
        self.write("event", Some(name), &fields);
    }

    /// Flushes buffered lines.
    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = out.flush();
    }
}
