//! One worker process, end to end: resolve the limit, open the spill
//! directory, start the MemoryManager, run the workload on the task threads,
//! print the summary, clean up. On the terminate threshold or SIGINT/SIGTERM
//! it prints what it has, removes its spill files and exits at once.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amm_timeline::{Event, Exit, Level, PeakSource, Start};
use anyhow::Context;

use crate::agent::AgentLink;
use crate::alloc::{self, Allocator};
use crate::config::MemoryConfig;
use crate::limit::{self, HostMemory, LimitSpec};
use crate::memory::{
    Gate, Levels, ManagerStats, MemoryManager, TERMINATE_EXIT_CODE, TerminateAction, TerminateInfo,
    levels,
};
use crate::spill::{SpillBuffer, SpillDir, SpillOptions, WriteOptions};
use crate::summary::{self, RESULT_FAILED, Refused, Summary};
use crate::timeline::Timeline;
use crate::units::format_bytes;
use crate::workload::{Outcome, Runner, Workload};
use crate::{proc, signals};

/// Everything a worker needs to run.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The workload.
    pub workload: Workload,
    /// `--memory-limit`.
    pub limit: LimitSpec,
    /// Task threads.
    pub nthreads: usize,
    /// Where the spill directory goes.
    pub local_directory: PathBuf,
    /// Worker name (spill directory `amm-spill-<name>`).
    pub name: String,
    /// Memory settings.
    pub memory: MemoryConfig,
    /// `--timeline` file.
    pub timeline: Option<PathBuf>,
    /// Attempt number given by the nanny (0 for the first).
    pub attempt: u32,
}

fn fill_from_buffer(s: &mut Summary, buffer: &SpillBuffer) {
    let st = buffer.stats();
    s.spilled_bytes_total = st.spilled_bytes_total;
    s.spill_count = st.spill_count;
    s.written_bytes_total = st.written_bytes_total;
    s.unspilled_bytes_total = st.unspilled_bytes_total;
    s.unspill_count = st.unspill_count;
    s.spill_failures = st.spill_failures;
}

fn fill_from_manager(s: &mut Summary, m: &crate::memory::ManagerStats) {
    s.paused_ms = m.paused_ms;
    s.pauses = m.pauses;
    s.purge_count += m.purge_count;
    s.purged_bytes_total += m.purged_bytes_total;
    s.ticks = m.ticks;
    s.max_identity_error_bytes = m.max_identity_error;
}

/// Writes this worker's own `exit` event: how it is about to leave, with
/// its exact peak (`VmHWM`). A worker killed by a signal cannot; its nanny
/// writes that one.
fn record_exit(timeline: Option<&Timeline>, attempt: u32, code: i32, peak: u64) {
    if let Some(t) = timeline {
        t.event(Event::Exit(Exit {
            attempt,
            pid: std::process::id(),
            code: Some(code),
            level: (code == TERMINATE_EXIT_CODE).then_some(Level::Terminate),
            peak_rss_bytes: Some(peak),
            peak_source: Some(PeakSource::Vmhwm),
            ..Exit::default()
        }));
        t.flush();
    }
}

/// Publishes this worker's allocator statistics in its allocator record
/// every 100 ms, as the preload library does inside any program, so
/// `amm-record show PID` and `amm-agent watch` read amm-worker the same
/// way. Purging stays the memory manager's (the publisher makes no
/// threshold purge and no decay of its own); a purge someone requests
/// through the record is served. A worker that cannot publish still works.
fn publish_record(allocator: Allocator) {
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let mut cfg = amm_alloc::publisher::Config::new(Some(allocator));
    cfg.decay = false;
    cfg.trim_threshold = None;
    match amm_alloc::publisher::spawn(cfg, None, Duration::ZERO, &STOP, 256 << 10) {
        Ok(_) => tracing::debug!("publishing the allocator record"),
        Err(e) => tracing::warn!("cannot publish the allocator record (amm-record show): {e}"),
    }
}

/// What the worker's three ways out (the workload's end, the terminate
/// threshold, SIGINT/SIGTERM) share: the summary so far and what each one
/// reports and removes on its way out.
#[derive(Clone)]
struct Leaving {
    shared: Arc<Mutex<Summary>>,
    buffer: Arc<SpillBuffer>,
    gate: Arc<Gate>,
    timeline: Option<Arc<Timeline>>,
    attempt: u32,
    start: Instant,
}

impl Leaving {
    /// The summary so far, with the spill counters, the tasks started and
    /// the wall time.
    fn summary(&self) -> Summary {
        let mut s = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        fill_from_buffer(&mut s, &self.buffer);
        s.tasks = self.gate.started();
        s.wall_ms = self.start.elapsed().as_millis() as u64;
        s
    }

    /// The one finish of every way out: prints the summary, writes this
    /// worker's `exit` event and removes every spill file and the directory.
    fn finish(&self, s: &Summary) {
        summary::print(s);
        record_exit(
            self.timeline.as_deref(),
            self.attempt,
            s.exit_code,
            s.peak_rss_bytes,
        );
        self.buffer.cleanup();
    }

    /// Terminate: report, remove spill files, exit. Nothing slow.
    fn on_terminate(self) -> TerminateAction {
        Box::new(move |info: &TerminateInfo| {
            let mut s = self.summary();
            fill_from_manager(&mut s, &info.stats);
            s.peak_rss_bytes = proc::peak_rss_bytes().unwrap_or(info.stats.peak_tick_rss);
            s.terminations = 1;
            s.result_ok = false;
            s.errors.push(format!(
                "terminated: process memory {} passed the terminate threshold {}",
                format_bytes(info.accounting.split.process),
                format_bytes(info.threshold)
            ));
            s.exit_code = TERMINATE_EXIT_CODE;
            self.finish(&s);
            std::process::exit(TERMINATE_EXIT_CODE);
        })
    }

    /// SIGINT/SIGTERM: a thread that cleans up and leaves.
    fn watch_signals(self) -> anyhow::Result<()> {
        std::thread::Builder::new()
            .name("amm-signals".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    if let Some(sig) = signals::peek() {
                        tracing::warn!(signal = sig, "stopping on signal");
                        let mut s = self.summary();
                        s.peak_rss_bytes = proc::peak_rss_bytes().unwrap_or(0);
                        s.errors.push(format!("stopped by signal {sig}"));
                        s.exit_code = 128 + sig;
                        self.finish(&s);
                        std::process::exit(128 + sig);
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok(())
    }
}

/// Checks that the chosen allocator serves this process and logs its
/// options; the check goes in the summary.
fn check_allocator(allocator: Allocator) -> anyhow::Result<alloc::ServingCheck> {
    // 96 KiB: above jemalloc's thread-cache sizes (so its counter moves at
    // once) and below glibc's mmap threshold (freeing an mmapped chunk would
    // raise glibc's dynamic threshold and change how this worker allocates).
    let check = alloc::verify_serving(96 << 10).context("cannot read allocator statistics")?;
    tracing::info!(
        allocator = %allocator,
        jemalloc_delta = check.jemalloc_allocated_delta,
        glibc_delta = check.glibc_live_delta,
        verified = check.verified,
        attempts = check.attempts,
        "allocator serving this worker"
    );
    if allocator == Allocator::Jemalloc {
        let dirty = alloc::jemalloc::opt_isize("opt.dirty_decay_ms").unwrap_or(-1);
        let muzzy = alloc::jemalloc::opt_isize("opt.muzzy_decay_ms").unwrap_or(-1);
        tracing::info!(
            dirty_decay_ms = dirty,
            muzzy_decay_ms = muzzy,
            "jemalloc options"
        );
    } else if let Ok(t) = std::env::var("MALLOC_TRIM_THRESHOLD_") {
        tracing::info!("MALLOC_TRIM_THRESHOLD_={t}");
    }
    Ok(check)
}

/// Opens the spill directory (refused if another live worker has it) and
/// the SpillBuffer on it; with the memory-backed file system it is on, if
/// it is on one.
fn open_buffer(
    opts: &WorkerOptions,
    target: Option<u64>,
) -> anyhow::Result<(Arc<SpillBuffer>, Option<&'static str>)> {
    let dir = SpillDir::open(&opts.local_directory, &opts.name).map_err(|e| {
        Refused(format!(
            "cannot use a spill directory in {}: {e}",
            opts.local_directory.display()
        ))
    })?;
    tracing::info!(dir = %dir.path().display(), "spill directory");
    let in_memory = dir.in_memory();
    if let Some(fs) = in_memory {
        tracing::warn!(
            dir = %dir.path().display(),
            "the spill directory is on {fs}, which is memory: spilled values stay in RAM and \
             count against this worker's cgroup limit, so spilling frees nothing and the kernel \
             can OOM-kill the worker below pause; give --local-directory on a disk"
        );
    }
    let buffer = SpillBuffer::new(
        dir,
        SpillOptions {
            target,
            max_spill: opts.memory.max_spill,
            write: WriteOptions {
                fsync: opts.memory.spill_fsync,
                drop_cache: opts.memory.spill_drop_cache,
            },
        },
    );
    Ok((Arc::new(buffer), in_memory))
}

/// Opens `--timeline` (appending after a restart) with this attempt's
/// `start` event.
fn open_timeline(
    opts: &WorkerOptions,
    allocator: Allocator,
    limit: Option<u64>,
    levels: Levels,
    spill_in_memory: Option<&str>,
) -> anyhow::Result<Option<Arc<Timeline>>> {
    let Some(p) = &opts.timeline else {
        return Ok(None);
    };
    let t = Timeline::create(p, opts.attempt > 0)?;
    t.event(Event::Start(Box::new(Start {
        attempt: opts.attempt,
        pid: std::process::id(),
        writer: Some("amm-worker".into()),
        allocator: Some(allocator),
        limit,
        levels,
        probe_purge_ms: opts.memory.probe_purge.map(|d| d.as_millis() as u64),
        t0_monotonic_ns: Some(t.origin_monotonic_ns()),
        spill_in_memory: spill_in_memory.map(str::to_string),
        ..Start::default()
    })));
    Ok(Some(Arc::new(t)))
}

/// amm-agent: the kernel's events between polls (optional; never needed).
fn start_agent(
    opts: &WorkerOptions,
    limit: Option<u64>,
    timeline: Option<Arc<Timeline>>,
) -> anyhow::Result<Option<AgentLink>> {
    match (&opts.memory.agent_socket, limit) {
        (Some(socket), Some(limit_bytes)) => Ok(Some(
            AgentLink::start(socket.clone(), limit_bytes, &opts.memory, timeline)
                .context("cannot start the link to amm-agent")?,
        )),
        (Some(_), None) => {
            tracing::warn!("no memory limit: nothing for amm-agent to watch; polling only");
            Ok(None)
        }
        (None, _) => Ok(None),
    }
}

/// Runs the worker; returns its exit code (terminate and signals exit from
/// inside and never return).
pub fn run(opts: WorkerOptions) -> anyhow::Result<i32> {
    let start = Instant::now();
    signals::install().context("cannot install signal handlers")?;
    let allocator = alloc::active();
    let host = HostMemory::current()?;
    let limit = limit::resolve(opts.limit, &host)?;
    tracing::info!("memory limit: {limit}");
    let check = check_allocator(allocator)?;
    publish_record(allocator);
    let levels = levels(&opts.memory, limit.bytes);
    let fmt = |b: Option<u64>| b.map_or("off".to_string(), format_bytes);
    tracing::info!(
        target = %fmt(levels.target),
        spill = %fmt(levels.spill),
        pause = %fmt(levels.pause),
        terminate = %fmt(levels.terminate),
        interval_ms = opts.memory.monitor_interval.as_millis() as u64,
        "thresholds"
    );
    let (buffer, spill_in_memory) = open_buffer(&opts, levels.target)?;
    let timeline = open_timeline(&opts, allocator, limit.bytes, levels, spill_in_memory)?;
    let gate = Arc::new(Gate::default());
    let base = Summary {
        workload: Some(opts.workload.name.clone().unwrap_or_default()),
        name: opts.name.clone(),
        allocator: allocator.to_string(),
        allocator_verified: check.verified,
        nthreads: opts.nthreads,
        limit_bytes: limit.bytes,
        limit_source: limit.source.clone(),
        memory_config: serde_json::to_value(&opts.memory).ok(),
        malloc_trim_threshold_env: std::env::var("MALLOC_TRIM_THRESHOLD_").ok(),
        ..Summary::default()
    };
    let leaving = Leaving {
        shared: Arc::new(Mutex::new(base)),
        buffer: buffer.clone(),
        gate: gate.clone(),
        timeline: timeline.clone(),
        attempt: opts.attempt,
        start,
    };
    let agent = start_agent(&opts, limit.bytes, timeline.clone())?;
    let mut manager = MemoryManager::new(
        opts.memory.clone(),
        limit.bytes,
        buffer.clone(),
        gate.clone(),
        timeline.clone(),
        leaving.clone().on_terminate(),
    );
    if let Some(a) = &agent {
        manager = manager.with_tick_hook(a.tick_hook());
    }
    let manager = manager.spawn().context("cannot start the memory manager")?;
    if let Some(a) = &agent {
        a.attach(manager.sink(), opts.memory.agent_observe_only);
    }
    leaving.clone().watch_signals()?;

    let runner = Runner::new(opts.nthreads, buffer, gate, timeline, opts.attempt)?;
    let outcome = runner.run(&opts.workload);
    if let Some(a) = &agent {
        a.workload_ended();
    }
    drop(runner);
    let mstats = manager.stop();
    finish_run(&leaving, &outcome, &mstats, agent.as_ref())
}

/// The workload's end: the whole summary, and the exit code (0, or
/// [`RESULT_FAILED`] when a check or a task failed).
fn finish_run(
    leaving: &Leaving,
    outcome: &Outcome,
    mstats: &ManagerStats,
    agent: Option<&AgentLink>,
) -> anyhow::Result<i32> {
    let mut s = leaving.summary();
    fill_from_manager(&mut s, mstats);
    if let Some(a) = agent {
        use std::sync::atomic::Ordering::SeqCst;
        s.agent_events = a.counters.events.load(SeqCst);
        s.agent_connects = a.counters.connects.load(SeqCst);
        s.agent_lost = a.counters.lost.load(SeqCst);
    }
    s.purge_count += outcome.purges;
    s.purged_bytes_total += outcome.purged_bytes;
    s.peak_rss_bytes = proc::peak_rss_bytes()?;
    s.result_ok = outcome.result_ok();
    s.checks = outcome.checks.clone();
    s.errors = outcome.errors.clone();
    s.exit_code = if s.result_ok { 0 } else { RESULT_FAILED };
    leaving.finish(&s);
    tracing::info!(
        result_ok = s.result_ok,
        wall_ms = s.wall_ms,
        peak_rss = %format_bytes(s.peak_rss_bytes),
        spilled = %format_bytes(s.spilled_bytes_total),
        "done"
    );
    Ok(s.exit_code)
}
