//! `amm-agent watch --report PATH`: the leak-vs-hoard report for a process
//! amm does not run (a Python Dask worker), from what the kernel alone
//! shows: RSS (anonymous, file-backed, shared) every 200 ms from the probe's
//! map (or `/proc/PID/status` until the probe has seen the process change),
//! page faults from `/proc/PID/stat`, and the probe's level, spike and exit
//! events. The allocator's part of the report is marked unavailable; nothing
//! is guessed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use amm_ebpf::{EventKind, WatchState};
use amm_protocol::{EventMessage, ThresholdBytes};
use amm_report::Run;
use amm_timeline::{Event, Exit, LevelCrossing, Levels, PeakSource, Spike, Tick};
use anyhow::{Context, Result};

use crate::clock::monotonic_ns;

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
    /// When the last sample was taken (CLOCK_MONOTONIC ns; 0: none yet).
    last_ns: u64,
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
            last_ns: 0,
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
        self.last_ns = 0;
        let start = amm_timeline::Start {
            attempt: self.attempt,
            pid,
            writer: Some("amm-agent watch".into()),
            ..amm_timeline::Start::default()
        };
        self.push_event(t, Event::Start(Box::new(start)));
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
        let now_ns = monotonic_ns();
        let every = SAMPLE_EVERY.as_nanos() as u64;
        if self.last_ns != 0 && now_ns.saturating_sub(self.last_ns) < every {
            return;
        }
        let after_ns = std::mem::replace(&mut self.last_ns, now_ns);
        let t = self.t(now_ns);
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
            self.with_record(&mut tick, (after_ns, now_ns), snap);
        }
        self.run.push_tick_of(t, self.attempt, tick);
    }

    /// Adds the allocator record's statistics to a tick (the report derives
    /// the split they give), and a new purge as an event when it finished
    /// (within the time since the last sample, `after_ns..=now_ns`).
    fn with_record(
        &mut self,
        tick: &mut Tick,
        (after_ns, now_ns): (u64, u64),
        snap: &amm_record::Snapshot,
    ) {
        tick.add_record(snap);
        if let Some(p) = amm_timeline::PurgeReport::from_record(snap, self.purges_seen, None) {
            let finished = snap.stats.purge.last.at_mono_ns;
            let at = amm_timeline::record::purge_time_ns(finished, after_ns, now_ns);
            self.push_event(self.t(at), Event::Purge(p));
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
            // the report leaves the final fall before an exit out as the
            // process tearing down (`amm_report::segment::teardown_start`)
            EventKind::Exit | EventKind::Credentials => Event::Exit(Exit {
                attempt: self.attempt,
                pid: self.pid,
                peak_rss_bytes: Some(m.peak_rss_bytes),
                peak_source: Some(PeakSource::Bpf),
                ..Exit::default()
            }),
        };
        self.push_event(t, event);
    }

    /// Analyses what was recorded and writes the report; returns where.
    /// Lines are put in time order first: a purge is placed when it
    /// finished, before the sample that read it, and the kernel's events
    /// reach the recorder after the samples taken meanwhile.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.run.sort();
        let report = amm_report::analyze(&self.run, &amm_report::Thresholds::default());
        let format = amm_report::Format::for_path(&self.path);
        let text = amm_report::render(&self.run, &report, format);
        std::fs::write(&self.path, text)
            .with_context(|| format!("cannot write the report to {}", self.path.display()))?;
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
