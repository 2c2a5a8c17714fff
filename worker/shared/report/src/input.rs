//! What a report is made from: a run's samples and events, in the timeline
//! contract's types ([`amm_timeline`]), each stamped with its time and
//! attempt ([`At`]). They come from an `amm-worker --timeline` file
//! ([`Run::from_timeline`]) or from a writer in the same process
//! (`amm-agent watch --report`, `amm-worker report --agent`), which pushes
//! them ([`Run::push_tick`], [`Run::push_event`]).
//!
//! Times are seconds since the first sample of the run. A line of a file is
//! placed when it happened, its `t_ns` counted from its attempt's start
//! (`t0_monotonic_ns`), so a tick is where its measurement began even when
//! it was written after an event that followed (see `Clock::seconds`); a
//! file without them is placed by `t_ms`, when each line was written. A
//! timeline that holds several attempts (a worker restarted by its nanny
//! appends after a `start` event, with its own clock) is laid end to end:
//! each attempt starts where the previous one's last line was.

use std::io::BufRead;
use std::ops::Deref;

use amm_timeline::{Allocator, Entry, Event, Item, Levels, Line, PurgeReport, ReadError, Tick};
use serde::Serialize;

/// Where the samples came from, and so what the report can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A timeline file: amm-worker's (the accounting split and the
    /// allocator's own statistics every tick, workload phases, purges), or
    /// a supervisor's of a program on the preload library.
    WorkerTimeline,
    /// The kernel (`amm-agent watch`): RSS (anon, file, shmem), faults,
    /// levels, exits; allocator statistics only when the process runs on
    /// the preload library.
    Kernel,
    /// A running worker's timeline as `amm-agent` holds it: the accounting
    /// split the worker pushed each tick and the kernel's levels, but no
    /// allocator statistics, phases or purges.
    AgentTimeline,
}

/// Something at a time of the run: a [`Tick`] or an [`Event`] with the
/// seconds since the run's first sample and the attempt it belongs to. It
/// derefs to what it holds, so `tick.process` reads the tick's RSS.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct At<T> {
    /// Seconds since the run's first sample.
    pub t: f64,
    /// Which attempt (0 for the first process; the nanny's restarts count up).
    pub attempt: u32,
    /// What.
    pub item: T,
}

impl<T> Deref for At<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.item
    }
}

/// One run, ready to analyse.
#[derive(Debug, Clone)]
pub struct Run {
    /// Where the samples came from.
    pub source: Source,
    /// The allocator, when known.
    pub allocator: Option<Allocator>,
    /// The memory limit in bytes, if any.
    pub limit: Option<u64>,
    /// The thresholds in bytes.
    pub levels: Levels,
    /// `--probe-purge` interval in ms, when the worker ran with it.
    pub probe_purge_ms: Option<u64>,
    /// Samples, in time order.
    pub ticks: Vec<At<Tick>>,
    /// Events, in time order.
    pub events: Vec<At<Event>>,
    /// What the reader should know about the input (lines skipped, a split
    /// derived from the allocator's statistics).
    pub notes: Vec<String>,
}

/// Why a timeline cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Reading stopped (I/O, a newer version, not a timeline at all).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Nothing usable in it.
    #[error(
        "the timeline has no tick lines{0}: run the worker with `--timeline PATH` and give that file"
    )]
    NoTicks(String),
}

/// Skipped lines named one by one in the notes; the rest are counted.
const NOTED_SKIPS: usize = 5;

/// How a timeline file's lines are laid on the run's clock.
#[derive(Debug, Default)]
struct Clock {
    attempt: Option<u32>,
    /// CLOCK_MONOTONIC ns at the attempt's `t_ms` 0 (its `start` event's
    /// `t0_monotonic_ns`), when known: lines with `t_ns` are placed by it.
    origin_ns: Option<u64>,
    offset: f64,
    last_t: f64,
    skipped: Vec<String>,
    skipped_count: usize,
    derived: bool,
}

impl Clock {
    /// Seconds since the attempt's `t_ms` 0 at which `line` happened: by its
    /// `t_ns` when the attempt's origin is known, else by `t_ms`. `t_ms` is
    /// when a line was written, on the writer's clock, to the millisecond;
    /// `t_ns` is when it happened: a tick's measurement began before the
    /// events it caused or that were written while it was measured (a
    /// worker's monitor preempted between measuring and writing, the
    /// supervisor's `terminate`), a relayed kernel event keeps its own time,
    /// and the nanny's `exit` and `restart` lines in a worker's timeline
    /// count `t_ms` from the attempt's spawn, not the worker's start.
    /// A `t_ns` further than [`MAX_SKEW_S`] from its own `t_ms` (a broken or
    /// hand-made file: before the attempt's start, or years after it) is not
    /// believed: the line stays where it was written.
    fn seconds(&self, line: &Line) -> f64 {
        let written = line.t_ms as f64 / 1000.0;
        match (line.t_ns, self.origin_ns) {
            (Some(ns), Some(origin)) => {
                let happened = (i128::from(ns) - i128::from(origin)) as f64 / 1e9;
                if happened >= 0.0 && (happened - written).abs() <= MAX_SKEW_S {
                    happened
                } else {
                    written
                }
            }
            _ => written,
        }
    }
}

/// How far (seconds) a line's `t_ns` may place it from its `t_ms`: a tick is
/// written milliseconds after its measurement began (seconds on a starved
/// machine), the nanny's lines count from the spawn, not the start.
const MAX_SKEW_S: f64 = 10.0;

impl Run {
    /// An empty run from `source`.
    pub fn new(source: Source, limit: Option<u64>, levels: Levels) -> Run {
        Run {
            source,
            allocator: None,
            limit,
            levels,
            probe_purge_ms: None,
            ticks: Vec::new(),
            events: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// An empty kernel-only run (for `amm-agent watch --report`).
    pub fn kernel(limit: Option<u64>, levels: Levels) -> Run {
        Run::new(Source::Kernel, limit, levels)
    }

    /// Adds a sample of attempt 0 at `t` seconds (times must not go
    /// backwards). A tick with the allocator's statistics but no split (a
    /// program on the preload library) gets the split they give, with
    /// nothing managed.
    pub fn push_tick(&mut self, t: f64, tick: Tick) {
        self.push_tick_of(t, 0, tick);
    }

    /// Adds a sample of attempt `attempt` at `t` seconds (see
    /// [`Run::push_tick`]); true when its split was derived from the
    /// allocator's statistics.
    pub fn push_tick_of(&mut self, t: f64, attempt: u32, mut tick: Tick) -> bool {
        let derived = tick.split.is_none() && tick.heap.is_some();
        tick.split = tick.split_or_derived();
        if self.allocator.is_none() {
            self.allocator = tick.heap.as_ref().map(|h| h.allocator());
        }
        if self.limit.is_none() {
            self.limit = tick.limit;
        }
        self.ticks.push(At {
            t,
            attempt,
            item: tick,
        });
        derived
    }

    /// Adds an event of attempt 0 at `t` seconds.
    pub fn push_event(&mut self, t: f64, event: Event) {
        self.push_event_of(t, 0, event);
    }

    /// Adds an event of attempt `attempt` at `t` seconds.
    pub fn push_event_of(&mut self, t: f64, attempt: u32, event: Event) {
        let event = match event {
            Event::AgentV0(old) => match old.upgrade() {
                Some(e) => e,
                None => return,
            },
            Event::Other => return,
            e => e,
        };
        if let Event::Start(s) = &event {
            self.allocator = s.allocator.or(self.allocator);
            self.limit = s.limit.or(self.limit);
            self.probe_purge_ms = s.probe_purge_ms.or(self.probe_purge_ms);
            if s.levels != Levels::default() {
                self.levels = s.levels;
            }
        }
        self.events.push(At {
            t,
            attempt,
            item: event,
        });
    }

    /// Reads a timeline file (JSON lines of [`amm_timeline::Line`]),
    /// streaming and bounded ([`amm_timeline::Reader`]). Lines that cannot
    /// be used (a live worker's half-written last line, garbage, a line
    /// that is not UTF-8 or too long) are skipped and named in
    /// [`Run::notes`] by their number; a file without a single tick, one
    /// newer than this reader, or one that is not a timeline at all is an
    /// error.
    pub fn from_timeline(reader: impl BufRead) -> Result<Run, InputError> {
        let mut run = Run::new(Source::WorkerTimeline, None, Levels::default());
        let mut clock = Clock::default();
        for item in amm_timeline::Reader::new(reader) {
            match item? {
                Item::Line(_, line) => run.take_line(*line, &mut clock),
                Item::Skipped(s) => {
                    clock.skipped_count += 1;
                    if clock.skipped.len() < NOTED_SKIPS {
                        clock.skipped.push(format!("line {}: {}", s.line, s.why));
                    }
                }
            }
        }
        run.finish_file(clock)
    }

    /// Places one line on the run's clock and keeps what it holds.
    fn take_line(&mut self, line: Line, clock: &mut Clock) {
        if let Entry::Event(Event::Start(s)) = &line.entry {
            // a new process: its clock starts again at 0
            if clock.attempt.is_some() {
                clock.offset = clock.last_t;
            }
            clock.attempt = Some(s.attempt);
            clock.origin_ns = s.t0_monotonic_ns;
        }
        let t = clock.offset + clock.seconds(&line);
        clock.last_t = clock.last_t.max(t);
        let attempt = clock.attempt.unwrap_or(0);
        match line.entry {
            Entry::Tick(tick) => clock.derived |= self.push_tick_of(t, attempt, *tick),
            Entry::Event(e) => self.push_event_of(t, attempt, e),
            Entry::Summary(_) | Entry::Other => {}
        }
    }

    /// Checks what a file gave, notes what was left out, orders by time.
    fn finish_file(mut self, clock: Clock) -> Result<Run, InputError> {
        if self.ticks.is_empty() {
            let why = match clock.skipped.first() {
                Some(first) => format!(
                    " ({} line(s) could not be used; {first})",
                    clock.skipped_count
                ),
                None => String::new(),
            };
            return Err(InputError::NoTicks(why));
        }
        for s in &clock.skipped {
            self.notes.push(format!("{s}: skipped, the rest is used"));
        }
        if clock.skipped_count > clock.skipped.len() {
            self.notes
                .push(format!("{} lines skipped in all", clock.skipped_count));
        }
        if clock.derived {
            self.notes.push(
                "the split was derived from the allocator's statistics with nothing managed \
                 (a program amm does not see inside): all live heap memory counts as unmanaged"
                    .into(),
            );
        }
        if self.levels == Levels::default()
            && let Some(l) = self.limit
        {
            self.levels = Levels::dask(l);
        }
        self.sort();
        Ok(self)
    }

    /// Orders ticks and events by time (writers in different threads, or
    /// processes, interleave).
    pub fn sort(&mut self) {
        self.events.sort_by(|a, b| a.t.total_cmp(&b.t));
        self.ticks.sort_by(|a, b| a.t.total_cmp(&b.t));
    }

    /// The first sample's time and the last's, seconds.
    pub fn span(&self) -> (f64, f64) {
        match (self.ticks.first(), self.ticks.last()) {
            (Some(a), Some(b)) => (a.t, b.t),
            _ => (0.0, 0.0),
        }
    }

    /// The purges, in time order.
    pub fn purges(&self) -> impl Iterator<Item = (f64, &PurgeReport)> {
        self.events.iter().filter_map(|e| match &e.item {
            Event::Purge(p) => Some((e.t, p)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amm_timeline::Heap;

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
        assert_eq!(run.allocator, Some(Allocator::Jemalloc));
        assert_eq!(run.limit, Some(1000));
        assert_eq!(run.levels.spill, Some(700));
        assert_eq!(run.ticks.len(), 3);
        assert!((run.ticks[2].t - 1.2).abs() < 1e-9, "{}", run.ticks[2].t);
        assert_eq!(run.ticks[2].attempt, 1);
        assert_eq!(run.notes.len(), 1, "{:?}", run.notes);
        assert!(
            run.notes[0].starts_with("line 7: incomplete last line"),
            "{:?}",
            run.notes
        );
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

    /// An amm-worker timeline: 3 s of phase `warm` at no unmanaged memory,
    /// then phase `load` whose tasks take 20, 40, 60 then 80 MiB, then
    /// phase `work` holding 80 MiB. The monitor measured `load`'s fourth
    /// tick at 3.79 s, was preempted, and wrote it at 3.804 s: after the
    /// workload thread wrote `work` (3.8 s). `with_t_ns: false` is the same
    /// file from a writer that stamped no `t_ns`.
    fn load_measured_before_work_written_after(with_t_ns: bool) -> String {
        const T0: u64 = 7_000_000_000;
        const MIB: u64 = 1 << 20;
        let line = |t_ms: u64, measured_ms: u64, rest: String| {
            let t_ns = if with_t_ns {
                format!(r#","t_ns":{}"#, T0 + measured_ms * 1_000_000)
            } else {
                String::new()
            };
            format!(r#"{{"v":1,"t_ms":{t_ms}{t_ns},{rest}}}"#)
        };
        let tick = |t_ms: u64, measured_ms: u64, live: u64| {
            let p = 100 * MIB + live * MIB;
            let rest = format!(
                r#""kind":"tick","process":{p},"managed":0,"unmanaged_live":{},"hoarded":0,"non_heap":{}"#,
                live * MIB,
                100 * MIB
            );
            line(t_ms, measured_ms, rest)
        };
        let phase = |t_ms: u64, name: &str| {
            line(
                t_ms,
                t_ms,
                format!(r#""kind":"event","event":"phase","name":"{name}""#),
            )
        };
        let start = format!(
            r#""kind":"event","event":"start","attempt":0,"allocator":"jemalloc","limit":{},"t0_monotonic_ns":{T0}"#,
            4u64 << 30
        );
        let mut lines = vec![line(0, 0, start), phase(0, "warm")];
        lines.extend((1..15).map(|i| tick(i * 200, i * 200, 0)));
        lines.push(phase(3000, "load"));
        lines.extend([
            tick(3200, 3200, 20),
            tick(3400, 3400, 40),
            tick(3600, 3600, 60),
        ]);
        lines.push(phase(3800, "work"));
        lines.push(tick(3804, 3790, 80));
        lines.extend((20..50).map(|i| tick(i * 200, i * 200, 80)));
        lines.join("\n")
    }

    /// A `t_ns` that contradicts its `t_ms` (before the attempt's start, or
    /// absurdly late) is not believed: the run keeps its length and every
    /// time stays on the run's clock.
    #[test]
    fn a_t_ns_far_from_its_t_ms_is_not_believed() {
        let text = load_measured_before_work_written_after(true);
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let n = lines.len();
        for (i, bad) in [(5, "0"), (6, "18446744073709551615"), (n - 2, "1")] {
            let v: serde_json::Value = serde_json::from_str(&lines[i]).expect("json");
            let t_ns = v["t_ns"].as_u64().expect("a line with t_ns").to_string();
            lines[i] = lines[i].replace(&format!(r#""t_ns":{t_ns}"#), &format!(r#""t_ns":{bad}"#));
        }
        let run = Run::from_timeline(lines.join("\n").as_bytes()).expect("run");
        let r = crate::analyze(&run, &crate::Thresholds::default());
        let end = r.stretches.iter().map(|s| s.to_s).fold(0.0, f64::max);
        let start = r
            .stretches
            .iter()
            .map(|s| s.from_s)
            .fold(f64::MAX, f64::min);
        assert!(
            start >= 0.0 && end < 11.0,
            "{start}..{end}: {:?}",
            r.stretches
        );
    }

    /// A tick is placed when it was measured (`t_ns`), not when it was
    /// written (`t_ms`): the fourth tick of `load` is `load`'s, so the
    /// phase rose 60 MiB and the report says so. Placed by `t_ms` (what a
    /// timeline without `t_ns` still gets) it counts for `work` and `load`
    /// keeps three ticks.
    #[test]
    fn a_tick_is_placed_when_it_was_measured_not_when_written() {
        let th = crate::Thresholds::default();
        let load_of = |with_t_ns: bool| {
            let text = load_measured_before_work_written_after(with_t_ns);
            let run = Run::from_timeline(text.as_bytes()).expect("run");
            let r = crate::analyze(&run, &th);
            let load = r.stretches.iter().find(|s| s.phases == ["load"]).cloned();
            (r, load.expect("a stretch of phase load"))
        };
        let (r, load) = load_of(true);
        assert_eq!(load.ticks, 4, "{load:?}");
        assert!((load.to_s - 3.79).abs() < 1e-9, "{load:?}");
        assert!(load.headline.contains("rose 60.0 MiB"), "{}", load.headline);
        assert_ne!(
            r.verdict.kind,
            crate::Kind::Steady,
            "{}",
            r.verdict.headline
        );
        // by write time the boundary moves: the tick measured in `load`
        // counts for `work` (and the report, amm 62f6873, said "nothing
        // grows" for the whole run)
        let (_, load) = load_of(false);
        assert_eq!(load.ticks, 3, "{load:?}");
    }

    #[test]
    fn no_ticks_is_an_error_that_says_what_to_do() {
        let e = Run::from_timeline("garbage\n".as_bytes()).expect_err("no ticks");
        assert!(e.to_string().contains("--timeline"), "{e}");
        assert!(e.to_string().contains("line 1: not JSON"), "{e}");
    }

    #[test]
    fn a_newer_timeline_is_refused() {
        let text = "{\"v\":99,\"t_ms\":0,\"kind\":\"tick\",\"process\":1}\n";
        let e = Run::from_timeline(text.as_bytes()).expect_err("newer");
        assert!(e.to_string().contains("upgrade amm"), "{e}");
    }

    #[test]
    fn a_foreign_tick_gets_the_split_of_its_allocator_statistics() {
        let text = r#"{"v":1,"t_ms":0,"kind":"tick","process":1000,"heap":{"allocator":"system","uordblks":400,"arena_resident":700}}"#;
        let run = Run::from_timeline(text.as_bytes()).expect("run");
        let s = run.ticks[0].split.expect("derived");
        assert_eq!((s.unmanaged_live, s.hoarded, s.non_heap), (400, 300, 300));
        assert!(
            run.notes.iter().any(|n| n.contains("derived")),
            "{:?}",
            run.notes
        );
        assert_eq!(run.allocator, Some(Allocator::System));
    }
}
