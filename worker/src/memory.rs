//! MemoryManager: measures the process every `monitor-interval`, splits its
//! memory into the accounting of DESIGN.md, and acts on the thresholds:
//!
//! | level | measured on | action |
//! | --- | --- | --- |
//! | target | managed | spill LRU values until managed <= target |
//! | spill | process | purge/trim the allocator's hoard, then spill until process <= target |
//! | pause | process | no new task starts (running ones go on); unpause below pause |
//! | terminate | process | exit with [`TERMINATE_EXIT_CODE`]; the nanny restarts the worker |
//!
//! If spilling fails (disk full, `max-spill`), values stay in memory, the
//! worker pauses only at the pause level, spilling is retried with back-off
//! and tasks held back for `spill-full-timeout` fail with an error that
//! names the directory and its free space (see `health`).
//!
//! For a jemalloc worker, the purgeable hoard (dirty + muzzy pages) is
//! purged once it passes `trim-threshold` (the number Dask's nanny puts in
//! `MALLOC_TRIM_THRESHOLD_`), at most once per `purge-interval` and only
//! while purging has taken under [`PURGE_BUDGET`] of the run (in the CPU
//! time the purges cost, not their wall time, which a busy machine
//! stretches).
//!
//! With `probe-purge` (`--probe-purge`), the manager also purges on purpose,
//! at most once per that interval, when [`PROBE_MIN_BYTES`] are hoarded or
//! unmanaged memory (`process - managed`) grew that much since the last
//! purge; the purge goes into the timeline with reason `probe`, so the
//! report can say whether a purge returns the memory (a hoard) or not (a
//! leak, fragmentation).
//!
//! **Event seam.** The manager polls, as Dask does. A faster source (the
//! amm agent's eBPF level events) calls [`ManagerHandle::on_level_event`]:
//! the manager wakes and acts on that level in the same instant instead of
//! at its next poll.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amm_timeline::{Event, Heap, NothingToSpill, PauseChange, Spill, Split, Terminate, Tick};
use serde::Serialize;

use crate::alloc::{self, Allocator, Detail};
use crate::config::MemoryConfig;
use crate::proc;
use crate::spill::SpillBuffer;
use crate::timeline::Timeline;
use amm_alloc::Governor;
use amm_cgroup::{CgroupUsage, MemoryCgroup};

mod health;

/// Exit code of a worker that hit the terminate threshold.
pub const TERMINATE_EXIT_CODE: i32 = 75;

pub use amm_alloc::PURGE_BUDGET;

/// `--probe-purge` purges when at least this much is hoarded (jemalloc:
/// dirty + muzzy pages) or unmanaged memory grew by this much since the
/// last purge: the least amount the report gives a verdict on.
pub const PROBE_MIN_BYTES: u64 = 4 << 20;

/// A memory level: the one vocabulary of the kernel's program, the agent
/// and the worker (`enum amm_level` in ebpf/include/amm.h).
pub use amm_ebpf::Level;

pub use amm_timeline::Levels;

/// The configured fractions of `limit` as bytes (`None`: disabled, or no
/// limit).
pub fn levels(cfg: &MemoryConfig, limit: Option<u64>) -> Levels {
    Levels::of_fractions(limit, [cfg.target, cfg.spill, cfg.pause, cfg.terminate])
}

/// The pause gate task threads pass before starting a task.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    started: AtomicU64,
    finished: AtomicU64,
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    /// Tasks fail with this instead of waiting (set while paused, cleared
    /// when the pause ends).
    failed: Option<String>,
}

impl Gate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks while paused, then counts a task start; `Err` when the gate
    /// gave up (see [`Gate::fail`]): the task must fail, not start.
    pub fn wait_to_start(&self) -> Result<(), String> {
        let mut s = self.state();
        loop {
            if let Some(why) = &s.failed {
                return Err(why.clone());
            }
            if !s.paused {
                break;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Makes tasks that wait (and later ones, until the pause ends) fail
    /// with `why` instead of waiting for ever.
    pub fn fail(&self, why: String) {
        self.state().failed = Some(why);
        self.cv.notify_all();
    }

    /// Counts a task end.
    pub fn finished(&self) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }

    /// Pauses or unpauses; returns whether that changed anything, with the
    /// counts of started and finished tasks at that instant. Unpausing ends
    /// a failure too.
    pub fn set_paused(&self, paused: bool) -> Option<(u64, u64)> {
        let mut s = self.state();
        if !paused {
            s.failed = None;
        }
        if s.paused == paused {
            return None;
        }
        s.paused = paused;
        let counts = (
            self.started.load(Ordering::SeqCst),
            self.finished.load(Ordering::SeqCst),
        );
        drop(s);
        if !paused {
            self.cv.notify_all();
        }
        Some(counts)
    }

    /// Whether new tasks are held back.
    pub fn is_paused(&self) -> bool {
        self.state().paused
    }

    /// Tasks started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Tasks finished so far.
    pub fn finished_count(&self) -> u64 {
        self.finished.load(Ordering::SeqCst)
    }
}

/// One tick's measurement: the accounting [`Split`] (the timeline
/// contract's, DESIGN.md's vocabulary) and how it was taken.
/// `process = managed + unmanaged_live + hoarded + non_heap` whenever no
/// part had to be clamped at zero; [`Split::identity_error`] says by how
/// much it misses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accounting {
    /// The split.
    pub split: Split,
    /// Anonymous RSS.
    pub rss_anon: u64,
    /// File-backed and shared RSS.
    pub rss_file_shmem: u64,
    /// Allocator's live bytes.
    pub heap_live: u64,
    /// Allocator's resident bytes.
    pub allocator_resident: u64,
    /// How far RSS moved while the allocator was read (other threads were
    /// allocating or freeing): the split is exact only to within this.
    pub rss_moved: u64,
    /// CLOCK_MONOTONIC ns when the measurement began: the tick's time in
    /// the timeline. Stamped when written instead, a tick measured before
    /// a phase ended but written after it (the monitor preempted in
    /// between) read as the next phase's, with 55.5 of the 64 MiB its
    /// tasks were still allocating.
    pub began_ns: u64,
}

impl Accounting {
    /// Splits a measurement.
    pub fn measured(statm: proc::Statm, managed: u64, spilled: u64, heap: &Heap) -> Accounting {
        let live = heap.live();
        let resident = heap.resident();
        Accounting {
            split: Split {
                spilled,
                ..Split::of(statm.resident, managed, live, resident)
            },
            rss_anon: statm.anon(),
            rss_file_shmem: statm.shared,
            heap_live: live,
            allocator_resident: resident,
            rss_moved: 0,
            began_ns: 0,
        }
    }

    /// The timeline's tick of this measurement (the caller adds what the
    /// manager knows besides).
    pub fn tick(&self) -> Tick {
        Tick {
            process: self.split.process,
            rss_anon: Some(self.rss_anon),
            rss_file_shmem: Some(self.rss_file_shmem),
            split: Some(self.split),
            heap_live: Some(self.heap_live),
            allocator_resident: Some(self.allocator_resident),
            rss_moved: Some(self.rss_moved),
            ..Tick::default()
        }
    }
}

/// CLOCK_MONOTONIC ns when something that began at `start` began.
fn began_ns(start: Instant) -> u64 {
    crate::timeline::monotonic_ns().saturating_sub(start.elapsed().as_nanos() as u64)
}

/// How often the "nothing to spill" warning may be logged.
const NOTHING_TO_SPILL_WARN_EVERY: Duration = Duration::from_secs(60);

/// RSS movement during a measurement below which it counts as settled.
const SETTLED_BYTES: u64 = 1 << 20;

/// How many times a measurement is taken while RSS keeps moving under it.
const MEASURE_ATTEMPTS: u32 = 3;

/// Sliding-window minimum of `process - managed`, for `unmanaged_recent`.
#[derive(Debug, Default)]
struct RecentWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl RecentWindow {
    fn push(&mut self, now: Instant, value: u64, window: Duration) -> u64 {
        while self.samples.back().is_some_and(|&(_, v)| v >= value) {
            self.samples.pop_back();
        }
        self.samples.push_back((now, value));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| now.duration_since(t) > window)
        {
            self.samples.pop_front();
        }
        let old = self.samples.front().map_or(value, |&(_, v)| v);
        value.saturating_sub(old)
    }
}

/// What the manager did over the run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ManagerStats {
    /// Ticks run.
    pub ticks: u64,
    /// Time spent paused, ms.
    pub paused_ms: u64,
    /// Times paused.
    pub pauses: u64,
    /// Purges/trims run.
    pub purge_count: u64,
    /// Bytes the purges/trims gave back (kernel RSS drop).
    pub purged_bytes_total: u64,
    /// Time the purges/trims took, microseconds.
    pub purge_us_total: u64,
    /// CPU time the purges/trims took, microseconds (what the purge budget
    /// counts).
    pub purge_cpu_us_total: u64,
    /// Ticks where process memory passed spill.
    pub spill_ticks: u64,
    /// Whether the terminate threshold was hit.
    pub terminated: bool,
    /// Largest RSS a tick saw.
    pub peak_tick_rss: u64,
    /// Largest |identity error| a tick saw.
    pub max_identity_error: u64,
}

/// What [`MemoryManager`] hands its terminate action.
#[derive(Debug, Clone, Copy)]
pub struct TerminateInfo {
    /// The measurement that crossed the threshold.
    pub accounting: Accounting,
    /// The threshold in bytes (0 when an event asked for it).
    pub threshold: u64,
    /// The manager's counters at that point.
    pub stats: ManagerStats,
}

/// What runs when the terminate threshold is crossed. The worker's action
/// cleans the spill directory, prints its summary and exits with
/// [`TERMINATE_EXIT_CODE`]; a library user may do something else.
pub type TerminateAction = Box<dyn FnMut(&TerminateInfo) + Send>;

#[derive(Debug, Default)]
struct Shared {
    wake: Mutex<bool>,
    cv: Condvar,
    stop: AtomicBool,
    hint: AtomicU8,
    stats: Mutex<ManagerStats>,
    /// An extra tick asked for before the next poll (after a pre-emptive
    /// pause, to release it without waiting a whole interval).
    recheck_at: Mutex<Option<Instant>>,
}

impl Shared {
    fn wake(&self) {
        let mut w = self.wake.lock().unwrap_or_else(|e| e.into_inner());
        *w = true;
        self.cv.notify_all();
    }

    /// Sleeps for `d`, or until woken, or until an asked-for recheck.
    fn sleep(&self, d: Duration) {
        let now = Instant::now();
        let d = match *self.recheck_at.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(at) => d.min(at.saturating_duration_since(now)),
            None => d,
        };
        let w = self.wake.lock().unwrap_or_else(|e| e.into_inner());
        let (mut w, _) = self
            .cv
            .wait_timeout_while(w, d, |woken| !*woken)
            .unwrap_or_else(|e| e.into_inner());
        *w = false;
        drop(w);
        let mut r = self.recheck_at.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_some_and(|at| at <= Instant::now()) {
            *r = None;
        }
    }
}

/// The monitor. Build it, then [`MemoryManager::spawn`] it on its own thread.
pub struct MemoryManager {
    cfg: MemoryConfig,
    limit: Option<u64>,
    levels: Levels,
    allocator: Allocator,
    /// Reads the allocator's statistics each tick; on glibc it keeps the
    /// expensive parts between ticks (amm-alloc's `glibc::Sampler`).
    heap: amm_alloc::HeapReader,
    buffer: Arc<SpillBuffer>,
    gate: Arc<Gate>,
    timeline: Option<Arc<Timeline>>,
    cgroup: Option<MemoryCgroup>,
    shared: Arc<Shared>,
    on_terminate: TerminateAction,
    recent: RecentWindow,
    /// When purges may run (interval, CPU budget): the rules amm-worker and
    /// the preload library share.
    governor: Governor,
    /// `process - managed` right after the last purge (or at the first tick).
    unmanaged_at_purge: Option<u64>,
    paused_since: Option<Instant>,
    health: health::SpillHealth,
    /// `nothing_to_spill` was written for the current rise past spill.
    nothing_to_spill_reported: bool,
    /// When the last "nothing to spill" warning was logged.
    nothing_to_spill_warned: Option<Instant>,
    stats: ManagerStats,
    tick_hook: Option<TickHook>,
}

/// Called with each tick's accounting (e.g. to push it to the agent).
pub type TickHook = Box<dyn Fn(&Accounting) + Send>;

/// The running manager.
pub struct ManagerHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl MemoryManager {
    /// A manager for `buffer` under `limit` (bytes; `None`: no limit, so only
    /// the threshold purge acts).
    pub fn new(
        cfg: MemoryConfig,
        limit: Option<u64>,
        buffer: Arc<SpillBuffer>,
        gate: Arc<Gate>,
        timeline: Option<Arc<Timeline>>,
        on_terminate: TerminateAction,
    ) -> MemoryManager {
        let levels = levels(&cfg, limit);
        let heap = amm_alloc::HeapReader::new(alloc::active(), cfg.monitor_interval);
        let shared = Arc::new(Shared::default());
        let waker = shared.clone();
        buffer.set_pressure_hook(Box::new(move || waker.wake()));
        let cgroup = amm_cgroup::find(std::path::Path::new("/")).ok().flatten();
        MemoryManager {
            cfg,
            limit,
            levels,
            allocator: alloc::active(),
            heap,
            buffer,
            gate,
            timeline,
            cgroup,
            shared,
            on_terminate,
            recent: RecentWindow::default(),
            governor: Governor::default(),
            unmanaged_at_purge: None,
            paused_since: None,
            health: health::SpillHealth::default(),
            nothing_to_spill_reported: false,
            nothing_to_spill_warned: None,
            stats: ManagerStats::default(),
            tick_hook: None,
        }
    }

    /// Calls `hook` with the accounting of every tick.
    pub fn with_tick_hook(mut self, hook: TickHook) -> MemoryManager {
        self.tick_hook = Some(hook);
        self
    }

    /// The thresholds in bytes.
    pub fn levels(&self) -> Levels {
        self.levels
    }

    /// Starts polling on a thread of its own.
    pub fn spawn(mut self) -> std::io::Result<ManagerHandle> {
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("amm-memory".into())
            .spawn(move || {
                while !self.shared.stop.load(Ordering::SeqCst) {
                    if let Err(e) = self.tick() {
                        tracing::warn!("memory monitor tick failed: {e}");
                    }
                    self.shared.sleep(self.cfg.monitor_interval);
                }
                // One last tick so the timeline ends with the final state.
                if let Err(e) = self.tick() {
                    tracing::warn!("memory monitor tick failed: {e}");
                }
                self.unpause_for_exit();
            })?;
        Ok(ManagerHandle {
            shared,
            thread: Some(thread),
        })
    }

    fn event(&self, event: Event) {
        if let Some(t) = &self.timeline {
            t.event(event);
        }
    }

    fn fraction(&self, bytes: u64) -> f64 {
        match self.limit {
            Some(l) if l > 0 => bytes as f64 / l as f64,
            _ => 0.0,
        }
    }

    /// Measures the process and splits its memory.
    pub fn measure(&mut self, detail: Detail) -> std::io::Result<(Accounting, Heap)> {
        // Task threads put and spill values while the allocator is read. A
        // value's memory is allocated before it counts as managed and freed
        // after it stops counting, so the managed bytes present both before
        // and after the heap read are inside the heap read: take the smaller
        // of the two sums (a value put during the read would otherwise count
        // as managed without being in `heap_live`).
        //
        // The kernel's RSS and the allocator are read at different instants:
        // a task that frees, trims or faults in between (a `malloc_trim` of
        // 200 MiB in another thread, say) makes the parts miss the whole.
        // So RSS is read on both sides of the allocator and the measurement
        // is repeated while it moved; `rss_moved` says by how much it moved
        // during the one that was kept, which bounds the identity error.
        let mut attempt = 1;
        let (statm, heap, before, s, moved, began_ns) = loop {
            let began_ns = crate::timeline::monotonic_ns();
            let rss_before = proc::statm()?.resident;
            let before = self.buffer.stats();
            let heap = self.heap.read(detail)?;
            let statm = proc::statm()?;
            let s = self.buffer.stats();
            let moved = statm.resident.abs_diff(rss_before);
            if moved <= SETTLED_BYTES || attempt == MEASURE_ATTEMPTS {
                break (statm, heap, before, s, moved, began_ns);
            }
            attempt += 1;
        };
        let managed = s.managed.min(before.managed);
        let mut acc = Accounting::measured(statm, managed, s.spilled, &heap);
        acc.rss_moved = moved;
        acc.began_ns = began_ns;
        acc.split.unmanaged_recent = self.recent.push(
            Instant::now(),
            acc.split.process.saturating_sub(acc.split.managed),
            self.cfg.recent_to_old_time,
        );
        Ok((acc, heap))
    }

    fn purge(&mut self, reason: &str) -> Option<alloc::PurgeReport> {
        self.heap.expire();
        match alloc::reclaim(reason) {
            Ok(r) => {
                self.governor.record(r.cpu_us);
                self.unmanaged_at_purge = Some(r.rss_after.saturating_sub(self.buffer.managed()));
                self.stats.purge_count += 1;
                self.stats.purged_bytes_total += r.returned_bytes;
                self.stats.purge_us_total += r.duration_us;
                self.stats.purge_cpu_us_total += r.cpu_us;
                tracing::debug!(
                    reason,
                    returned = r.returned_bytes,
                    us = r.duration_us,
                    "purged the allocator's hoard"
                );
                self.event(Event::Purge(r.clone()));
                Some(r)
            }
            Err(e) => {
                tracing::warn!("purge failed: {e}");
                None
            }
        }
    }

    /// `--probe-purge`: purges on purpose when the report needs to know
    /// whether memory comes back (see the module docs).
    fn probe_purge(&mut self, acc: &Accounting, heap: &Heap) {
        let Some(every) = self.cfg.probe_purge else {
            return;
        };
        let unmanaged = acc.split.process.saturating_sub(acc.split.managed);
        let baseline = *self.unmanaged_at_purge.get_or_insert(unmanaged);
        let due = self.governor.since_last() >= every;
        // jemalloc's hoarded bytes include its metadata, which no purge
        // returns: only its dirty and muzzy pages count
        let hoarded = heap.purgeable();
        let grew = unmanaged.saturating_sub(baseline);
        if due
            && self.governor.within_budget()
            && (hoarded >= PROBE_MIN_BYTES || grew >= PROBE_MIN_BYTES)
        {
            self.purge("probe");
        }
    }

    fn terminate(&mut self, acc: &Accounting, threshold: u64) {
        self.stats.terminated = true;
        tracing::error!(
            process = acc.split.process,
            threshold,
            fraction = self.fraction(acc.split.process),
            "process memory passed the terminate threshold: exiting with code {TERMINATE_EXIT_CODE}"
        );
        self.event(Event::Terminate(Terminate {
            process: acc.split.process,
            threshold,
            fraction: self.fraction(acc.split.process),
            exit_code: TERMINATE_EXIT_CODE,
            signal: None,
        }));
        if let Some(t) = &self.timeline {
            t.flush();
        }
        self.publish();
        let info = TerminateInfo {
            accounting: *acc,
            threshold,
            stats: self.stats,
        };
        (self.on_terminate)(&info);
    }

    fn publish(&self) {
        let mut s = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        *s = self.stats;
        if let Some(since) = self.paused_since {
            s.paused_ms += since.elapsed().as_millis() as u64;
        }
    }

    fn set_paused(&mut self, paused: bool, reason: &str, process: u64) {
        if let Some((started, finished)) = self.gate.set_paused(paused) {
            if paused {
                self.paused_since = Some(Instant::now());
                self.stats.pauses += 1;
                tracing::warn!(reason, process, "paused: no new task starts");
            } else {
                if let Some(s) = self.paused_since.take() {
                    self.stats.paused_ms += s.elapsed().as_millis() as u64;
                }
                tracing::info!(process, "unpaused");
            }
            let change = PauseChange {
                reason: reason.to_string(),
                process,
                fraction: self.fraction(process),
                tasks_started: started,
                tasks_finished: finished,
            };
            self.event(if paused {
                Event::Pause(change)
            } else {
                Event::Unpause(change)
            });
        }
    }

    fn unpause_for_exit(&mut self) {
        self.set_paused(false, "exit", 0);
        self.publish();
    }

    /// Spills until the process is at most `goal` bytes; returns the RSS
    /// after. Allocator-aware: when RSS has not fallen by at least half of
    /// what the last batch of evictions freed, the allocator kept it
    /// (jemalloc's dirty pages, glibc chunks below its mmap threshold), so
    /// it is purged/trimmed before deciding to spill more. Batches are 1 MiB
    /// for jemalloc (a purge of little is cheap) and 16 MiB for glibc
    /// (`malloc_trim` walks the whole heap).
    fn spill_process(&mut self, mut rss: u64, goal: u64) -> std::io::Result<u64> {
        let start = Instant::now();
        let before = rss;
        let batch: u64 = match self.allocator {
            Allocator::Jemalloc => 1 << 20,
            Allocator::System => 16 << 20,
        };
        let (mut values, mut bytes, mut unpurged, mut purges) = (0u64, 0u64, 0u64, 0u64);
        let mut batch_rss = rss;
        let mut error = None;
        while rss > goal && self.health.may_try() {
            match self.buffer.evict() {
                Ok(Some(n)) => {
                    values += 1;
                    bytes += n;
                    unpurged += n;
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
            rss = proc::rss_bytes()?;
            // a spill to a slow disk takes long: a pause the kernel saw
            // meanwhile must not wait for it to end
            if self.shared.hint.load(Ordering::SeqCst) >= Level::Pause.raw() as u8 {
                self.set_paused(true, "level event", rss);
            }
            if unpurged >= batch {
                if batch_rss.saturating_sub(rss) < unpurged / 2 {
                    rss = self.release_after_spill(rss)?;
                    purges += 1;
                }
                unpurged = 0;
                batch_rss = rss;
            }
            if self.levels.terminate.is_some_and(|t| rss > t) {
                break;
            }
        }
        if rss > goal
            && unpurged > 0
            && let Some(r) = self.purge("spill")
        {
            rss = r.rss_after;
        }
        match error {
            Some(e) => self.spill_outcome(Err(e)),
            None => self.spill_outcome(Ok(values > 0)),
        }
        if values == 0 && self.health.may_try() && rss > goal {
            self.report_nothing_to_spill(rss, goal, start);
        }
        if values > 0 {
            self.event(Event::Spill(Spill {
                reason: "process".into(),
                values,
                bytes,
                process_before: Some(before),
                process_after: Some(rss),
                goal: Some(goal),
                purges: Some(purges),
                ms: start.elapsed().as_millis() as u64,
                began_ns: Some(began_ns(start)),
                ..Spill::default()
            }));
        }
        Ok(rss)
    }

    /// RSS did not fall by half of what a batch of evictions freed: the
    /// allocator kept it (a failed jemalloc purge shows the same way), so
    /// give it back; returns the RSS after.
    fn release_after_spill(&mut self, rss: u64) -> std::io::Result<u64> {
        let (cost, _) = alloc::release_hoard();
        let after = proc::rss_bytes()?;
        self.stats.purge_count += 1;
        self.stats.purged_bytes_total += rss.saturating_sub(after);
        self.stats.purge_us_total += cost.wall_us;
        self.stats.purge_cpu_us_total += cost.cpu_us;
        self.governor.charge(cost.cpu_us);
        Ok(after)
    }

    /// Process memory is above spill but no value is left in memory: all of
    /// it is unmanaged, and only pausing (or the terminate level) can help.
    /// Dask logs "Unmanaged memory use is high" here; amm says it once per
    /// rise past spill (in the timeline as `nothing_to_spill`, with when the
    /// manager decided it) and warns at most once a minute.
    fn report_nothing_to_spill(&mut self, rss: u64, goal: u64, start: Instant) {
        if self.nothing_to_spill_reported {
            return;
        }
        self.nothing_to_spill_reported = true;
        let warn = self
            .nothing_to_spill_warned
            .is_none_or(|t| t.elapsed() >= NOTHING_TO_SPILL_WARN_EVERY);
        if warn {
            self.nothing_to_spill_warned = Some(Instant::now());
            tracing::warn!(
                process = rss,
                goal,
                "process memory is above spill with nothing left to spill: all of it is \
                 unmanaged (task temporaries, a leak or the allocator's hoard; \
                 `amm-worker report` says which)"
            );
        }
        self.event(Event::NothingToSpill(NothingToSpill {
            reason: "process".into(),
            process: rss,
            goal,
            managed: self.buffer.managed(),
            ms: start.elapsed().as_millis() as u64,
            began_ns: Some(began_ns(start)),
        }));
    }

    /// One monitor tick: measure, act, record. Public so tests and a future
    /// event source can drive it synchronously.
    pub fn tick(&mut self) -> std::io::Result<Accounting> {
        let hint = self.act_on_hint()?;
        let (acc, heap) = self.measure_and_record()?;
        let terminate_at = self.levels.terminate.filter(|t| acc.split.process > *t);
        if terminate_at.is_some() || hint == Level::Terminate {
            self.terminate(&acc, terminate_at.unwrap_or(0));
            return Ok(acc);
        }
        self.spill_to_target();
        let rss = self.spill_for_process(&acc, hint)?;
        self.decide_pause(rss, hint);
        self.check_spill_timeout();
        self.threshold_purge(&heap);
        self.probe_purge(&acc, &heap);
        self.publish();
        Ok(acc)
    }

    /// The kernel saw a level crossed (amm-agent): act on its word first.
    /// Reading the allocator's statistics takes up to a millisecond and the
    /// decision needs only RSS, so spill (and pause) before measuring.
    fn act_on_hint(&mut self) -> std::io::Result<Level> {
        let raw = self
            .shared
            .hint
            .swap(Level::Below.raw() as u8, Ordering::SeqCst);
        let hint = Level::from_raw(u32::from(raw)).unwrap_or(Level::Below);
        if matches!(hint, Level::Spill | Level::Pause)
            && let Some(spill) = self.levels.spill
        {
            let rss = proc::rss_bytes()?;
            if hint == Level::Pause {
                self.set_paused(true, "level event", rss);
            }
            let goal = self.levels.target.unwrap_or(spill).min(spill);
            self.spill_process(rss, goal)?;
        }
        Ok(hint)
    }

    /// Measures, counts, hands the accounting to the tick hook and writes
    /// the tick line (the measurement the decisions start from).
    fn measure_and_record(&mut self) -> std::io::Result<(Accounting, Heap)> {
        let detail = if self.timeline.is_some() {
            Detail::Full
        } else {
            Detail::Totals
        };
        let (acc, heap) = self.measure(detail)?;
        self.stats.ticks += 1;
        self.stats.peak_tick_rss = self.stats.peak_tick_rss.max(acc.split.process);
        self.stats.max_identity_error = self
            .stats
            .max_identity_error
            .max(acc.split.identity_error().unsigned_abs());
        if let Some(h) = &self.tick_hook {
            h(&acc);
        }
        if let Some(t) = &self.timeline {
            let cgroup_usage: Option<CgroupUsage> = self.cgroup.as_ref().and_then(|c| c.usage());
            t.tick_at(
                acc.began_ns,
                Tick {
                    limit: self.limit,
                    paused: Some(self.gate.is_paused()),
                    tasks_started: Some(self.gate.started()),
                    tasks_finished: Some(self.gate.finished_count()),
                    spill: Some(self.buffer.stats()),
                    cgroup: cgroup_usage,
                    heap: Some(heap.clone()),
                    ..acc.tick()
                },
            );
        }
        Ok((acc, heap))
    }

    /// Managed memory above target: spill LRU values down to it (unless
    /// spilling fails and its back-off has not passed).
    fn spill_to_target(&mut self) {
        let Some(target) = self.levels.target else {
            return;
        };
        if self.buffer.managed() <= target || !self.health.may_try() {
            return;
        }
        let start = Instant::now();
        let before = self.buffer.stats();
        let result = self.buffer.evict_until(target);
        let after = self.buffer.stats();
        let moved = after.managed < before.managed;
        if moved {
            self.event(Event::Spill(Spill {
                reason: "target".into(),
                values: after.spill_count - before.spill_count,
                bytes: before.managed.saturating_sub(after.managed),
                managed_before: Some(before.managed),
                managed_after: Some(after.managed),
                target: Some(target),
                ms: start.elapsed().as_millis() as u64,
                ..Spill::default()
            }));
        }
        self.spill_outcome(result.map(|_| moved).map_err(|e| e.to_string()));
    }

    /// Process memory above spill: purge the allocator's hoard first, then
    /// spill down to target. Returns the process memory after.
    fn spill_for_process(&mut self, acc: &Accounting, hint: Level) -> std::io::Result<u64> {
        let mut rss = acc.split.process;
        let Some(spill) = self.levels.spill else {
            return Ok(rss);
        };
        if rss <= spill && hint != Level::Spill {
            if self.levels.target.is_none_or(|t| rss <= t) {
                self.nothing_to_spill_reported = false;
            }
            return Ok(rss);
        }
        self.stats.spill_ticks += 1;
        // Allocator-aware: what the allocator hoards goes back first.
        let threshold = self.cfg.trim_threshold.unwrap_or(0);
        if acc.split.hoarded > threshold.max(1 << 20)
            && let Some(r) = self.purge("pressure")
        {
            rss = r.rss_after;
        }
        let goal = self.levels.target.unwrap_or(spill).min(spill);
        if rss > spill || hint == Level::Spill {
            rss = self.spill_process(rss, goal)?;
        }
        Ok(rss)
    }

    /// Pauses above the pause level (or on the kernel's word), unpauses
    /// below it. Values that cannot be spilled stay in memory below pause.
    fn decide_pause(&mut self, rss: u64, hint: Level) {
        let over_pause = self.levels.pause.is_some_and(|p| rss > p);
        if over_pause || hint == Level::Pause {
            let reason = if over_pause {
                "pause threshold"
            } else {
                "level event"
            };
            self.set_paused(true, reason, rss);
        } else {
            self.set_paused(false, "below pause", rss);
        }
    }

    /// Threshold purge of jemalloc's hoard, rate-limited and within the CPU
    /// budget (the `Governor` the preload library shares); what a purge can
    /// return is the dirty and muzzy pages (slab slack and metadata, also in
    /// `hoarded`, stay). glibc trims its own top past the threshold.
    fn threshold_purge(&mut self, heap: &Heap) {
        if matches!(heap, Heap::Jemalloc(_))
            && self.governor.threshold_due(
                heap.purgeable(),
                self.cfg.trim_threshold,
                self.cfg.purge_interval,
            )
        {
            self.purge("threshold");
        }
    }
}

/// Where a faster event source (the agent) tells the manager what it saw;
/// cheap to clone and to call from any thread.
#[derive(Clone)]
pub struct EventSink {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

impl EventSink {
    /// A level crossing observed elsewhere. It wakes the manager, which runs
    /// a tick at once and acts on the level even if its own measurement is
    /// still below it: `Pause` pauses (until a tick finds the process below
    /// pause) and `Terminate` terminates on the event's word; `Spill` makes
    /// the tick spill down to target as far as its own measurement shows the
    /// process above target.
    pub fn on_level_event(&self, level: Level) {
        self.shared
            .hint
            .fetch_max(level.raw() as u8, Ordering::SeqCst);
        self.shared.wake();
    }

    /// Wakes the manager for an immediate tick.
    pub fn wake(&self) {
        self.shared.wake();
    }

    /// A pre-emptive pause (a spike alarm): pause now, and measure again
    /// after `for_` instead of a whole monitor interval later, so the pause
    /// ends as soon as the spike has passed.
    pub fn pause_briefly(&self, for_: Duration) {
        {
            let mut r = self
                .shared
                .recheck_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let at = Instant::now() + for_;
            *r = Some(r.map_or(at, |old| old.min(at)));
        }
        self.on_level_event(Level::Pause);
    }
}

impl ManagerHandle {
    /// The handle other threads use to hand the manager events.
    pub fn sink(&self) -> EventSink {
        EventSink {
            shared: self.shared.clone(),
        }
    }

    /// See [`EventSink::on_level_event`].
    pub fn on_level_event(&self, level: Level) {
        self.sink().on_level_event(level);
    }

    /// Wakes the manager for an immediate tick.
    pub fn wake(&self) {
        self.shared.wake();
    }

    /// The manager's counters so far.
    pub fn stats(&self) -> ManagerStats {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the manager after one last tick and returns its counters.
    pub fn stop(mut self) -> ManagerStats {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spill buffer in `dir` with no target, writing without fsync.
    fn test_buffer(dir: &std::path::Path, name: &str) -> Arc<SpillBuffer> {
        Arc::new(crate::spill::test_buffer(dir, name, None, true))
    }

    #[test]
    fn recent_is_growth_over_the_window_minimum() {
        let mut w = RecentWindow::default();
        let t0 = Instant::now();
        let win = Duration::from_secs(30);
        assert_eq!(w.push(t0, 100, win), 0);
        assert_eq!(w.push(t0 + Duration::from_secs(1), 150, win), 50);
        assert_eq!(w.push(t0 + Duration::from_secs(2), 120, win), 20);
        // 100 is older than the window at t0+31s: the minimum is now 120.
        assert_eq!(w.push(t0 + Duration::from_secs(31), 130, win), 10);
    }

    /// The monitor measured, was preempted, and a phase ended before its
    /// tick was written (the hook runs in that window, as the workload
    /// thread would): the tick still lies before the phase on the `t_ns`
    /// clock, so the next phase never gets a measurement of this one.
    #[test]
    fn a_tick_is_placed_when_it_was_measured_not_when_written() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("tl.jsonl");
        let tl = Arc::new(Timeline::create(&path, false).expect("timeline"));
        let buffer = test_buffer(tmp.path(), "at");
        let phase_writer = tl.clone();
        let mut m = MemoryManager::new(
            MemoryConfig::default(),
            None,
            buffer,
            Arc::new(Gate::default()),
            Some(tl.clone()),
            Box::new(|_| {}),
        )
        .with_tick_hook(Box::new(move |_| {
            phase_writer.event(Event::Phase(amm_timeline::Phase {
                name: "next".into(),
                ..amm_timeline::Phase::default()
            }));
        }));
        m.tick().expect("tick");
        tl.flush();
        let text = std::fs::read_to_string(&path).expect("read");
        let t_ns_of = |kind: &str| -> u64 {
            let line = text
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
                .find(|v| v["kind"] == kind)
                .unwrap_or_else(|| panic!("no {kind} line in {text}"));
            line["t_ns"].as_u64().expect("t_ns")
        };
        let (tick, phase) = (t_ns_of("tick"), t_ns_of("event"));
        assert!(
            tick < phase,
            "the tick ({tick}) is placed after the phase ({phase}) that began after it was measured"
        );
    }

    #[test]
    fn levels_are_fractions_of_the_limit() {
        let cfg = MemoryConfig::default();
        let l = levels(&cfg, Some(1000));
        assert_eq!(l.target, Some(600));
        assert_eq!(l.spill, Some(700));
        assert_eq!(l.pause, Some(800));
        assert_eq!(l.terminate, Some(950));
        let none = levels(&cfg, None);
        assert!(none.target.is_none() && none.terminate.is_none());
        let cfg = MemoryConfig {
            pause: None,
            ..MemoryConfig::default()
        };
        assert!(levels(&cfg, Some(1000)).pause.is_none());
    }

    #[test]
    fn level_events_act_without_waiting_for_the_poll() {
        use std::sync::atomic::AtomicBool;
        let tmp = tempfile::tempdir().expect("tmp");
        let buffer = test_buffer(tmp.path(), "ev");
        let gate = Arc::new(Gate::default());
        let terminated = Arc::new(AtomicBool::new(false));
        let t = terminated.clone();
        let cfg = MemoryConfig {
            // A poll so slow that only the events can explain the actions.
            monitor_interval: Duration::from_secs(3600),
            ..MemoryConfig::default()
        };
        let m = MemoryManager::new(
            cfg,
            Some(1 << 50),
            buffer,
            gate.clone(),
            None,
            Box::new(move |_| t.store(true, Ordering::SeqCst)),
        )
        .spawn()
        .expect("spawn");
        let wait = |f: &dyn Fn() -> bool| {
            let start = Instant::now();
            while !f() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            f()
        };
        // Let the first tick pass, then send the events.
        assert!(wait(&|| m.stats().ticks >= 1));
        m.on_level_event(Level::Pause);
        assert!(wait(&|| gate.is_paused()), "a pause event did not pause");
        m.on_level_event(Level::Terminate);
        assert!(
            wait(&|| terminated.load(Ordering::SeqCst)),
            "a terminate event did not terminate"
        );
        let stats = m.stop();
        assert!(stats.terminated && stats.pauses >= 1);
        assert!(!gate.is_paused(), "a stopped manager leaves the gate open");
    }

    #[test]
    fn gate_counts_and_reports_transitions() {
        let g = Gate::default();
        g.wait_to_start().expect("open");
        assert_eq!(g.set_paused(true), Some((1, 0)));
        assert_eq!(g.set_paused(true), None);
        g.finished();
        assert_eq!(g.set_paused(false), Some((1, 1)));
        assert!(!g.is_paused());
    }
}
