//! What a report is made from: a run's samples ([`Tick`]) and events
//! ([`Event`]), read from an `amm-worker --timeline` file
//! ([`Run::from_timeline`]) or recorded from kernel data alone by
//! `amm-agent watch --report` ([`Run::kernel`], [`Run::push_tick`],
//! [`Run::push_event`]).
//!
//! Times are seconds since the first sample of the run. A timeline that holds
//! several attempts (a worker restarted by its nanny appends after a `start`
//! event, with its own clock) is laid end to end: each attempt starts where
//! the previous one's last line was.

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the samples came from, and so what the report can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// An `amm-worker` timeline: the accounting split and the allocator's own
    /// statistics every tick, workload phases, purges.
    WorkerTimeline,
    /// The kernel only (`amm-agent watch`): RSS (anon, file, shmem), faults,
    /// levels. Nothing about the allocator.
    Kernel,
    /// A running worker's timeline as `amm-agent` holds it: the accounting
    /// split the worker pushed each tick and the kernel's levels, but no
    /// allocator statistics, phases or purges.
    AgentTimeline,
}

/// Thresholds in bytes (`None`: off or unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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
}

/// One run, ready to analyse.
#[derive(Debug, Clone)]
pub struct Run {
    /// Where the samples came from.
    pub source: Source,
    /// `jemalloc` or `system` (glibc malloc); `None` when unknown.
    pub allocator: Option<String>,
    /// The memory limit in bytes, if any.
    pub limit: Option<u64>,
    /// The thresholds in bytes.
    pub levels: Levels,
    /// `--probe-purge` interval in ms, when the worker ran with it.
    pub probe_purge_ms: Option<u64>,
    /// Samples, in time order.
    pub ticks: Vec<Tick>,
    /// Events, in time order.
    pub events: Vec<Event>,
    /// Lines that could not be used, and why (at most a few).
    pub notes: Vec<String>,
}

/// One sample of the process.
#[derive(Debug, Clone, Default)]
pub struct Tick {
    /// Seconds since the run's first sample.
    pub t: f64,
    /// Which attempt (0 for the first process; the nanny's restarts count up).
    pub attempt: u32,
    /// RSS as the kernel counts it (file + anon + shmem), bytes.
    pub process: u64,
    /// Anonymous RSS, bytes.
    pub rss_anon: Option<u64>,
    /// File-backed and shared RSS, bytes.
    pub rss_file_shmem: Option<u64>,
    /// The accounting split (worker timelines only).
    pub split: Option<Split>,
    /// The allocator's statistics (worker timelines only).
    pub heap: Option<Heap>,
    /// New tasks held back.
    pub paused: bool,
    /// minflt + majflt of the process so far (kernel-only runs).
    pub faults: Option<u64>,
}

/// The accounting split of one tick (DESIGN.md's vocabulary).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Split {
    /// Sum of `sizeof` of the values the SpillBuffer holds in memory.
    pub managed: u64,
    /// Live heap bytes that are not managed.
    pub unmanaged_live: u64,
    /// Allocator-resident bytes holding no live allocation.
    pub hoarded: u64,
    /// RSS outside the allocator.
    pub non_heap: u64,
    /// Managed bytes on disk (not part of RSS).
    pub spilled: u64,
}

/// The allocator's statistics at one tick.
#[derive(Debug, Clone)]
pub enum Heap {
    /// jemalloc.
    Jemalloc(JeHeap),
    /// glibc malloc.
    Glibc(GlibcHeap),
}

/// jemalloc's totals and detail (see `worker/src/alloc/jemalloc.rs`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct JeHeap {
    /// `stats.allocated`.
    pub allocated: u64,
    /// `stats.active`: allocated plus the free regions of slabs in use.
    pub active: u64,
    /// `stats.resident`.
    pub resident: u64,
    /// `stats.metadata`.
    pub metadata: u64,
    /// Dirty pages of all arenas, bytes (purgeable).
    pub dirty_bytes: u64,
    /// Muzzy pages of all arenas, bytes (purgeable).
    pub muzzy_bytes: u64,
    /// Per-arena dirty/muzzy pages.
    pub arenas: Vec<JeArena>,
    /// Small size classes holding live regions.
    pub bins: Vec<SizeClass>,
    /// Large size classes holding live extents.
    pub large: Vec<SizeClass>,
}

/// Unused pages of one jemalloc arena.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct JeArena {
    /// Arena index.
    pub arena: u32,
    /// Dirty bytes.
    pub dirty_bytes: u64,
    /// Muzzy bytes.
    pub muzzy_bytes: u64,
}

/// Live allocations of one jemalloc size class, merged over arenas.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SizeClass {
    /// Allocation size in bytes.
    pub size: u64,
    /// Live regions (bins) or extents (large).
    pub count: u64,
    /// Slabs holding regions (bins only).
    pub slabs: u64,
    /// Bytes of one slab of this class (bins only; 0 when the timeline
    /// predates it).
    pub slab_bytes: u64,
}

impl SizeClass {
    /// Bytes of one slab: the timeline's figure, else jemalloc 5's rule (the
    /// least common multiple of the size and a 4 KiB page).
    pub fn slab(&self) -> u64 {
        if self.slab_bytes > 0 {
            self.slab_bytes
        } else if self.size > 0 {
            lcm(self.size, 4096)
        } else {
            0
        }
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// glibc malloc's totals and arenas (see `worker/src/alloc/glibc.rs`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct GlibcHeap {
    /// `uordblks`: bytes in live chunks of the arenas.
    pub uordblks: u64,
    /// `fordblks`: bytes in free chunks (resident or not).
    pub fordblks: u64,
    /// `hblkhd`: bytes in mmapped chunks.
    pub hblkhd: u64,
    /// `keepcost`: releasable top of the main arena.
    pub keepcost: u64,
    /// Resident bytes of the arenas' heaps.
    pub arena_resident: u64,
    /// `malloc_info` per arena.
    pub arenas: Vec<GlibcArena>,
}

/// One glibc arena as `malloc_info` describes it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct GlibcArena {
    /// Arena number (0 is the main arena).
    pub nr: u32,
    /// Bytes in fastbin chunks.
    pub fast_bytes: u64,
    /// Bytes in the other free chunks.
    pub rest_bytes: u64,
    /// Bytes the arena has from the system.
    pub system_bytes: u64,
}

/// Something that happened at one instant.
#[derive(Debug, Clone)]
pub struct Event {
    /// Seconds since the run's first sample.
    pub t: f64,
    /// Which attempt.
    pub attempt: u32,
    /// What.
    pub kind: EventKind,
}

/// The events a report uses.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// A worker process started (each nanny attempt).
    Start,
    /// A workload phase started.
    Phase(String),
    /// A purge/trim ran.
    Purge(Purge),
    /// Values went to disk.
    Spill {
        /// Bytes spilled.
        bytes: u64,
    },
    /// New tasks held back.
    Pause,
    /// Tasks allowed again.
    Unpause,
    /// A level crossing seen by the kernel (kernel-only runs and `--agent`).
    Level {
        /// Before.
        from: String,
        /// After.
        to: String,
        /// RSS at the crossing.
        rss: u64,
    },
    /// The kernel predicted terminate within its horizon.
    Spike {
        /// RSS then.
        rss: u64,
    },
    /// The process passed terminate and was stopped.
    Terminate,
    /// The workload is over; what follows is the process tearing down.
    End,
    /// The process exited (kernel-only runs).
    Exit {
        /// Peak RSS.
        peak: u64,
    },
}

/// One purge (jemalloc) or trim (glibc) and what it returned.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Purge {
    /// Why it ran: `probe` (`--probe-purge`), `threshold`, `pressure`,
    /// `spill`, `workload`.
    pub reason: String,
    /// Bytes the kernel saw leave the process.
    pub returned_bytes: u64,
    /// RSS before.
    pub rss_before: u64,
    /// RSS after.
    pub rss_after: u64,
    /// Hoarded bytes before.
    pub hoarded_before: u64,
    /// Hoarded bytes after.
    pub hoarded_after: u64,
    /// How long it took, µs.
    pub duration_us: u64,
}

impl Purge {
    /// True when the worker ran it on purpose to decide (`--probe-purge`).
    pub fn is_probe(&self) -> bool {
        self.reason == "probe"
    }
}

/// Why a timeline cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Reading failed.
    #[error("cannot read the timeline: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing usable in it.
    #[error(
        "the timeline has no tick lines{0}: run the worker with `--timeline PATH` and give that file"
    )]
    NoTicks(String),
}

fn u(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

impl Run {
    /// An empty kernel-only run (for `amm-agent watch --report`).
    pub fn kernel(limit: Option<u64>, levels: Levels) -> Run {
        Run {
            source: Source::Kernel,
            allocator: None,
            limit,
            levels,
            probe_purge_ms: None,
            ticks: Vec::new(),
            events: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a sample (times must not go backwards).
    pub fn push_tick(&mut self, tick: Tick) {
        self.ticks.push(tick);
    }

    /// Adds an event.
    pub fn push_event(&mut self, t: f64, kind: EventKind) {
        self.events.push(Event {
            t,
            attempt: 0,
            kind,
        });
    }

    /// Reads an `amm-worker --timeline` file (JSON lines). Lines that are
    /// not JSON (a live worker's half-written last line) are skipped and
    /// noted; a file without a single tick is an error.
    pub fn from_timeline(reader: impl BufRead) -> Result<Run, InputError> {
        let mut run = Run {
            source: Source::WorkerTimeline,
            allocator: None,
            limit: None,
            levels: Levels::default(),
            probe_purge_ms: None,
            ticks: Vec::new(),
            events: Vec::new(),
            notes: Vec::new(),
        };
        let mut attempt: Option<u32> = None;
        let mut offset = 0.0f64;
        let mut last_t = 0.0f64;
        let mut bad = 0usize;
        for (i, line) in reader.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => {
                    bad += 1;
                    if run.notes.len() < 3 {
                        run.notes
                            .push(format!("line {} skipped: not JSON ({e})", i + 1));
                    }
                    continue;
                }
            };
            let t_ms = u(&v, "t_ms").unwrap_or(0) as f64 / 1000.0;
            let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
            let event = v.get("event").and_then(Value::as_str).unwrap_or("");
            if kind == "event" && event == "start" {
                // a new process: its clock starts again at 0
                if attempt.is_some() {
                    offset = last_t;
                }
                attempt = Some(u(&v, "attempt").unwrap_or(0) as u32);
                if let Some(a) = v.get("allocator").and_then(Value::as_str) {
                    run.allocator = Some(a.to_string());
                }
                if let Some(l) = u(&v, "limit") {
                    run.limit = Some(l);
                }
                if let Some(p) = u(&v, "probe_purge_ms") {
                    run.probe_purge_ms = Some(p);
                }
                run.levels = levels_of(&v).unwrap_or(run.levels);
            }
            let t = offset + t_ms;
            last_t = last_t.max(t);
            let attempt_now = attempt.unwrap_or(0);
            match kind {
                "tick" => {
                    let tick = tick_of(&v, t, attempt_now, &mut run);
                    run.ticks.push(tick);
                }
                "event" => {
                    if let Some(k) = event_of(event, &v) {
                        run.events.push(Event {
                            t,
                            attempt: attempt_now,
                            kind: k,
                        });
                    }
                }
                _ => {}
            }
        }
        if bad > 3 {
            run.notes.push(format!("{bad} lines skipped in all"));
        }
        if run.ticks.is_empty() {
            let why = if bad > 0 {
                format!(" ({bad} lines were not JSON)")
            } else {
                String::new()
            };
            return Err(InputError::NoTicks(why));
        }
        if run.levels == Levels::default()
            && let Some(l) = run.limit
        {
            run.levels = Levels::dask(l);
        }
        // Events and ticks are written by different threads: order by time.
        run.events
            .sort_by(|a, b| a.t.partial_cmp(&b.t).unwrap_or(std::cmp::Ordering::Equal));
        run.ticks
            .sort_by(|a, b| a.t.partial_cmp(&b.t).unwrap_or(std::cmp::Ordering::Equal));
        Ok(run)
    }

    /// The first sample's time and the last's, seconds.
    pub fn span(&self) -> (f64, f64) {
        match (self.ticks.first(), self.ticks.last()) {
            (Some(a), Some(b)) => (a.t, b.t),
            _ => (0.0, 0.0),
        }
    }

    /// The purges, in time order.
    pub fn purges(&self) -> impl Iterator<Item = (f64, &Purge)> {
        self.events.iter().filter_map(|e| match &e.kind {
            EventKind::Purge(p) => Some((e.t, p)),
            _ => None,
        })
    }
}

fn levels_of(v: &Value) -> Option<Levels> {
    let l = v.get("levels")?;
    Some(Levels {
        target: u(l, "target"),
        spill: u(l, "spill"),
        pause: u(l, "pause"),
        terminate: u(l, "terminate"),
    })
}

fn tick_of(v: &Value, t: f64, attempt: u32, run: &mut Run) -> Tick {
    let split = match (
        u(v, "managed"),
        u(v, "unmanaged_live"),
        u(v, "hoarded"),
        u(v, "non_heap"),
    ) {
        (Some(managed), Some(unmanaged_live), Some(hoarded), Some(non_heap)) => Some(Split {
            managed,
            unmanaged_live,
            hoarded,
            non_heap,
            spilled: u(v, "spilled").unwrap_or(0),
        }),
        _ => None,
    };
    if run.limit.is_none() {
        run.limit = u(v, "limit");
    }
    let heap = v
        .get("heap")
        .and_then(|h| match h.get("allocator").and_then(Value::as_str) {
            Some("jemalloc") => JeHeap::deserialize(h).ok().map(Heap::Jemalloc),
            Some("system") => GlibcHeap::deserialize(h).ok().map(Heap::Glibc),
            _ => None,
        });
    if run.allocator.is_none() {
        run.allocator = match &heap {
            Some(Heap::Jemalloc(_)) => Some("jemalloc".into()),
            Some(Heap::Glibc(_)) => Some("system".into()),
            None => None,
        };
    }
    Tick {
        t,
        attempt,
        process: u(v, "process").unwrap_or(0),
        rss_anon: u(v, "rss_anon"),
        rss_file_shmem: u(v, "rss_file_shmem"),
        split,
        heap,
        paused: v.get("paused").and_then(Value::as_bool).unwrap_or(false),
        faults: None,
    }
}

fn event_of(name: &str, v: &Value) -> Option<EventKind> {
    Some(match name {
        "start" => EventKind::Start,
        "phase" => EventKind::Phase(
            v.get("name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
        ),
        "purge" => EventKind::Purge(Purge::deserialize(v).ok()?),
        "spill" => EventKind::Spill {
            bytes: u(v, "bytes").unwrap_or(0),
        },
        "pause" => EventKind::Pause,
        "unpause" => EventKind::Unpause,
        "terminate" => EventKind::Terminate,
        "end" => EventKind::End,
        "agent" => match v.get("agent_event").and_then(Value::as_str) {
            Some("level") => EventKind::Level {
                from: str_of(v, "prev_level"),
                to: str_of(v, "level"),
                rss: u(v, "rss").unwrap_or(0),
            },
            Some("spike") => EventKind::Spike {
                rss: u(v, "rss").unwrap_or(0),
            },
            _ => return None,
        },
        _ => return None,
    })
}

fn str_of(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_attempts_end_to_end_and_skips_a_torn_line() {
        let text = r#"{"t_ms":0,"kind":"event","event":"start","attempt":0,"allocator":"jemalloc","limit":1000}
{"t_ms":0,"kind":"tick","process":100,"managed":10,"unmanaged_live":20,"hoarded":30,"non_heap":40,"spilled":0,"heap":{"allocator":"jemalloc","allocated":30,"active":31,"resident":60,"dirty_bytes":8,"bins":[{"size":16,"count":2,"slabs":1}]}}
{"t_ms":500,"kind":"event","event":"purge","reason":"probe","returned_bytes":5,"hoarded_before":30,"hoarded_after":25}
{"t_ms":1000,"kind":"tick","process":120,"managed":10,"unmanaged_live":40,"hoarded":30,"non_heap":40,"spilled":0}
{"t_ms":0,"kind":"event","event":"start","attempt":1}
{"t_ms":200,"kind":"tick","process":90,"managed":0,"unmanaged_live":10,"hoarded":40,"non_heap":40}
{"t_ms":400,"kind":"ti"#;
        let run = Run::from_timeline(text.as_bytes()).expect("run");
        assert_eq!(run.allocator.as_deref(), Some("jemalloc"));
        assert_eq!(run.limit, Some(1000));
        assert_eq!(run.levels.spill, Some(700));
        assert_eq!(run.ticks.len(), 3);
        assert!((run.ticks[2].t - 1.2).abs() < 1e-9, "{}", run.ticks[2].t);
        assert_eq!(run.ticks[2].attempt, 1);
        assert_eq!(run.notes.len(), 1, "{:?}", run.notes);
        let purges: Vec<_> = run.purges().collect();
        assert_eq!(purges.len(), 1);
        assert!(purges[0].1.is_probe());
        match &run.ticks[0].heap {
            Some(Heap::Jemalloc(h)) => {
                assert_eq!(h.dirty_bytes, 8);
                assert_eq!(h.bins[0].slab(), 4096);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_ticks_is_an_error_that_says_what_to_do() {
        let e = Run::from_timeline("garbage\n".as_bytes()).expect_err("no ticks");
        assert!(e.to_string().contains("--timeline"), "{e}");
    }

    #[test]
    fn slab_sizes_follow_jemalloc() {
        let c = |size| SizeClass {
            size,
            ..SizeClass::default()
        };
        assert_eq!(c(48).slab(), 12288);
        assert_eq!(c(80).slab(), 20480);
        assert_eq!(c(4096).slab(), 4096);
        assert_eq!(c(5120).slab(), 20480);
    }
}
