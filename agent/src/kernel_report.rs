//! `amm-agent watch --report PATH`: the leak-vs-hoard report for a process
//! amm does not run (a Python Dask worker), from what the kernel alone
//! shows: RSS (anonymous, file-backed, shared) every 200 ms from the probe's
//! map (or `/proc/PID/status` until the probe has seen the process change),
//! page faults from `/proc/PID/stat`, and the probe's level, spike and exit
//! events. The allocator's part of the report is marked unavailable; nothing
//! is guessed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use amm_ebpf::{EventKind, WatchState};
use amm_protocol::{EventMessage, ThresholdBytes};
use amm_report::{At, Run};
use amm_timeline::{Event, Exit, LevelCrossing, Levels, PeakSource, Spike, Tick};
use anyhow::{Context, Result};

use crate::clock::monotonic_ns;

/// How long before its exit a fall of RSS counts as the process freeing
/// everything on its way out (an `amm-worker` timeline marks this with its
/// `end` event; the kernel has only the exit to go by).
pub const TEARDOWN_WINDOW_S: f64 = 1.0;

/// The least fall before the exit that is left out as teardown.
const TEARDOWN_MIN_BYTES: u64 = 4 << 20;

/// How often RSS is sampled: the worker's default monitor interval.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Records one watched process for the report.
#[derive(Debug)]
pub struct KernelRecorder {
    path: PathBuf,
    pid: u32,
    /// Purges the allocator record had counted at the last sample.
    purges_seen: u64,
    start_ns: u64,
    page: u64,
    last: Option<Instant>,
    /// Which process of a followed parent's (0 for the first).
    attempt: u32,
    run: Run,
}

fn level_bytes(b: u64) -> Option<u64> {
    (b != amm_ebpf::DISABLED).then_some(b)
}

impl KernelRecorder {
    /// A recorder for `pid` that will write its report to `path` (`.html`,
    /// `.json`, anything else: text); times count from `start_ns`
    /// (CLOCK_MONOTONIC).
    pub fn new(path: &Path, pid: u32, thresholds: &ThresholdBytes, start_ns: u64) -> Self {
        let levels = Levels {
            target: level_bytes(thresholds.rearm),
            spill: level_bytes(thresholds.spill),
            pause: level_bytes(thresholds.pause),
            terminate: level_bytes(thresholds.terminate),
        };
        KernelRecorder {
            path: path.to_path_buf(),
            pid,
            purges_seen: 0,
            start_ns,
            page: amm_protocol::sys::page_size() as u64,
            last: None,
            attempt: 0,
            run: Run::kernel(Some(thresholds.limit), levels),
        }
    }

    /// Records the next process of a followed parent (a nanny's new
    /// worker) from now on, as the next attempt, started at `t` seconds.
    pub fn follow(&mut self, pid: u32, t: f64) {
        self.pid = pid;
        self.attempt += 1;
        self.purges_seen = 0;
        self.last = None;
        let start = amm_timeline::Start {
            attempt: self.attempt,
            pid,
            writer: Some("amm-agent watch".into()),
            ..amm_timeline::Start::default()
        };
        self.push_event(t, Event::Start(start));
    }

    fn push_event(&mut self, t: f64, event: Event) {
        self.run.push_event_of(t, self.attempt, event);
    }

    fn t(&self, ns: u64) -> f64 {
        ns.saturating_sub(self.start_ns) as f64 / 1e9
    }

    /// Takes a sample if [`SAMPLE_EVERY`] has passed since the last one.
    /// `state` is the probe's entry for the process, if it has one;
    /// `record` the fresh read of its allocator record, if it runs on the
    /// preload library (its statistics, the split they give and any new
    /// purge go into the report).
    pub fn sample(&mut self, state: Option<&WatchState>, record: Option<&amm_record::Snapshot>) {
        if self.last.is_some_and(|l| l.elapsed() < SAMPLE_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let t = self.t(monotonic_ns());
        let info = crate::identity::ProcInfo::read(self.pid).ok();
        let faults = info.as_ref().map(|i| i.faults);
        let (process, anon, file_shmem) = match state {
            // the probe's exact counters, once it has seen the process
            Some(s) if s.updates > 0 => {
                let pages = |i: usize| s.rss_pages[i].max(0) as u64 * self.page;
                (s.rss_bytes, pages(1), pages(0) + pages(3))
            }
            _ => match info {
                Some(i) => (i.rss_bytes(), i.rss_anon, i.rss_file + i.rss_shmem),
                // gone: nothing to sample
                None => return,
            },
        };
        let mut tick = Tick {
            process,
            rss_anon: Some(anon),
            rss_file_shmem: Some(file_shmem),
            faults,
            ..Tick::default()
        };
        if let Some(snap) = record {
            self.with_record(&mut tick, t, snap);
        }
        self.run.push_tick_of(t, self.attempt, tick);
    }

    /// Adds the allocator record's statistics to a tick (the report derives
    /// the split they give), and a new purge as an event.
    fn with_record(&mut self, tick: &mut Tick, t: f64, snap: &amm_record::Snapshot) {
        tick.add_record(snap);
        if let Some(p) = amm_timeline::PurgeReport::from_record(snap, self.purges_seen, None) {
            self.push_event(t, Event::Purge(p));
        }
        self.purges_seen = snap.stats.purge.count;
    }

    /// Records a kernel event.
    pub fn event(&mut self, m: &EventMessage) {
        let t = self.t(m.t_ns);
        let event = match m.event {
            EventKind::Level => Event::Level(LevelCrossing {
                from: m.prev_level,
                to: m.level,
                rss: m.rss_bytes,
                signalled: m.signalled,
                delay_us: None,
            }),
            EventKind::Spike => Event::Spike(Spike {
                rss: m.rss_bytes,
                eta_ns: m.eta_ns,
                delay_us: None,
            }),
            EventKind::Exit | EventKind::Credentials => {
                self.mark_teardown(t);
                Event::Exit(Exit {
                    attempt: self.attempt,
                    pid: self.pid,
                    peak_rss_bytes: Some(m.peak_rss_bytes),
                    peak_source: Some(PeakSource::Bpf),
                    ..Exit::default()
                })
            }
        };
        self.push_event(t, event);
    }

    /// A process frees its memory on its way out; on a busy machine that
    /// takes several samples, and a leak would look freed. The final fall
    /// within [`TEARDOWN_WINDOW_S`] of the exit is marked as the workload's
    /// end, so the report leaves it out as teardown (and notes it).
    fn mark_teardown(&mut self, exit_t: f64) {
        let Some(k) = teardown_start(&self.run.ticks, exit_t) else {
            return;
        };
        // the report notes how many samples it left out as teardown
        let end_t = self.run.ticks[k].t + 1e-6;
        self.push_event(end_t, Event::End(amm_timeline::End::default()));
    }

    /// Analyses what was recorded and writes the report; returns where.
    pub fn finish(self) -> Result<PathBuf> {
        let report = amm_report::analyze(&self.run, &amm_report::Thresholds::default());
        let format = amm_report::Format::for_path(&self.path);
        let text = amm_report::render(&self.run, &report, format);
        std::fs::write(&self.path, text)
            .with_context(|| format!("cannot write the report to {}", self.path.display()))?;
        Ok(self.path)
    }
}

/// The index of the last sample before the teardown: the start of the
/// final non-rising run of samples, or the first sample within
/// [`TEARDOWN_WINDOW_S`] of the exit if the run began earlier; `None` when
/// RSS fell less than [`TEARDOWN_MIN_BYTES`] from there.
fn teardown_start(ticks: &[At<Tick>], exit_t: f64) -> Option<usize> {
    let last = ticks.len().checked_sub(1)?;
    let mut k = last;
    while k > 0
        && ticks[k - 1].process >= ticks[k].process
        && ticks[k - 1].t >= exit_t - TEARDOWN_WINDOW_S
    {
        k -= 1;
    }
    (k < last && ticks[k].process.saturating_sub(ticks[last].process) >= TEARDOWN_MIN_BYTES)
        .then_some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(t: f64, mib: u64) -> At<Tick> {
        At {
            t,
            attempt: 0,
            item: Tick::rss(mib << 20),
        }
    }

    #[test]
    fn the_final_fall_before_the_exit_is_teardown() {
        // a leak, then 0.6 s of freeing before the exit at 5.0 s
        let mut ticks: Vec<At<Tick>> = (0..22).map(|i| tick(i as f64 * 0.2, 60 + i)).collect();
        ticks.extend([tick(4.4, 100), tick(4.6, 70), tick(4.8, 52)]);
        let k = teardown_start(&ticks, 5.0).expect("teardown");
        assert_eq!(ticks[k].t, 4.4);
        // a fall that began long before the exit: only its last second
        let ticks: Vec<At<Tick>> = (0..25).map(|i| tick(i as f64 * 0.2, 200 - 4 * i)).collect();
        let k = teardown_start(&ticks, 5.0).expect("teardown");
        assert!((ticks[k].t - 4.0).abs() < 1e-9, "{}", ticks[k].t);
        // still growing at the exit, or a fall under 4 MiB: no teardown
        let ticks: Vec<At<Tick>> = (0..25).map(|i| tick(i as f64 * 0.2, 60 + i)).collect();
        assert_eq!(teardown_start(&ticks, 5.0), None);
        let mut ticks: Vec<At<Tick>> = (0..24).map(|i| tick(i as f64 * 0.2, 60 + i)).collect();
        ticks.push(tick(4.8, 81));
        assert_eq!(teardown_start(&ticks, 5.0), None);
        assert_eq!(teardown_start(&[], 5.0), None);
    }

    #[test]
    fn a_recording_becomes_a_kernel_only_report() {
        let th = ThresholdBytes {
            limit: 1 << 30,
            rearm: 600 << 20,
            spill: 700 << 20,
            pause: 800 << 20,
            terminate: amm_ebpf::DISABLED,
        };
        let dir = std::env::temp_dir().join(format!("amm-kr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("r.json");
        let mut r = KernelRecorder::new(&path, std::process::id(), &th, monotonic_ns());
        r.sample(None, None);
        assert_eq!(
            r.run.ticks.len(),
            1,
            "this process's own status is readable"
        );
        assert_eq!(r.run.levels.terminate, None);
        let out = r.finish().expect("write");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out).expect("read")).expect("json");
        assert_eq!(v["source"], "kernel");
        assert_eq!(v["allocator"]["available"], false);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
