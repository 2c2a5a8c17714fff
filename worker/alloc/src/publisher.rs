//! The publisher: one thread that refreshes this process's allocator record
//! every interval, serves purge requests the moment they arrive (a futex
//! wake), and purges on its own under the `MALLOC_TRIM_THRESHOLD_`
//! semantics ([`Governor`]).
//!
//! Costs are bounded: jemalloc's totals are a few MIB reads after one epoch
//! advance; glibc's are read through a [`glibc::Sampler`]: `mallinfo2`
//! (which walks every free chunk under each arena's lock) only as often as
//! keeps it under [`Config::mallinfo_budget`] of one CPU (the live bytes
//! come from the process's own counts when it keeps them, as amm-worker
//! does), the arena heaps found in `/proc/self/maps` only when they may
//! have changed, their residency measured with `mincore` every tick.
//!
//! The publisher also keeps the record reachable: a program that closes
//! every descriptor it does not know, or changes its uid (after which its
//! new uid could not open a record the old one created), gets a new record
//! and the old one is marked superseded.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amm_record::layout::{ArenaPages, HeapResidency, MAX_ARENAS, MAX_HEAPS};
use amm_record::{InheritedSlot, PurgeOutcome, PurgeReason, Request, Stats, Writer, sys};

use crate::{Allocator, Detail, Governor, glibc, jemalloc, release_hoard, rss_bytes};

/// The default publication interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

/// The default least time between two threshold purges (amm-worker's
/// `purge-interval` default).
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(1);

/// The share of one CPU `mallinfo2` may take by default.
pub const DEFAULT_MALLINFO_BUDGET: f64 = glibc::DEFAULT_BUDGET;

/// Requested purges closer together than this wait (a requester that spins
/// cannot make the process do nothing but purge).
pub const REQUEST_MIN_GAP: Duration = Duration::from_millis(10);

/// Whether publishers purge past the threshold on their own (see
/// [`set_threshold_purges`]).
static THRESHOLD_PURGES: AtomicBool = AtomicBool::new(true);

/// Turns the publisher's own threshold purges on or off for this process
/// and returns what they were. A program that drives purges itself under
/// the same `MALLOC_TRIM_THRESHOLD_` (amm_dask in a Dask worker on the
/// preload) turns them off, so one owner purges; requested purges are
/// served either way. While off, the record says so: its threshold reads
/// `u64::MAX` (none).
pub fn set_threshold_purges(on: bool) -> bool {
    THRESHOLD_PURGES.swap(on, Ordering::AcqRel)
}

/// Whether publishers purge past the threshold on their own now.
pub fn threshold_purges() -> bool {
    THRESHOLD_PURGES.load(Ordering::Acquire)
}

/// What the publisher does.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The allocator serving the process (`None`: another one; only RSS is
    /// published and nothing is purged).
    pub allocator: Option<Allocator>,
    /// How often the statistics are refreshed.
    pub interval: Duration,
    /// Purge when the purgeable hoard passes this many bytes
    /// (`MALLOC_TRIM_THRESHOLD_`); `None`: only on request.
    pub trim_threshold: Option<u64>,
    /// Least time between two threshold purges.
    pub purge_interval: Duration,
    /// jemalloc: run `arena.<all>.decay` every interval, which returns
    /// pages as their decay time passes even while the program sleeps (what
    /// jemalloc's background threads do).
    pub decay: bool,
    /// glibc: the share of one CPU `mallinfo2` may take.
    pub mallinfo_budget: f64,
}

impl Config {
    /// The defaults for `allocator`.
    pub fn new(allocator: Option<Allocator>) -> Config {
        Config {
            allocator,
            interval: DEFAULT_INTERVAL,
            trim_threshold: None,
            purge_interval: DEFAULT_PURGE_INTERVAL,
            decay: true,
            mallinfo_budget: DEFAULT_MALLINFO_BUDGET,
        }
    }
}

/// The publishing thread's state (see the module docs).
#[derive(Debug)]
pub struct Publisher {
    cfg: Config,
    writer: Writer,
    slot: Option<&'static InheritedSlot>,
    governor: Governor,
    stats: Stats,
    glibc: glibc::Sampler,
    last_requested: Option<Instant>,
}

impl Publisher {
    /// Creates the record. `slot`, when given, always holds the current
    /// record's descriptor and mapping (for a `fork` child to let go of).
    pub fn new(cfg: Config, slot: Option<&'static InheritedSlot>) -> io::Result<Publisher> {
        let writer = Writer::create(cfg.allocator, cfg.interval)?;
        if let Some(s) = slot {
            s.set(writer.inherited_parts());
        }
        let mut stats = Stats::default();
        if cfg.allocator == Some(Allocator::Jemalloc) {
            let j = &mut stats.jemalloc;
            j.dirty_decay_ms = jemalloc::opt_isize("opt.dirty_decay_ms").unwrap_or(-1) as u64;
            j.muzzy_decay_ms = jemalloc::opt_isize("opt.muzzy_decay_ms").unwrap_or(-1) as u64;
            j.background_thread = u64::from(jemalloc::background_thread().unwrap_or(false));
        }
        stats.purge.threshold_bytes = cfg.trim_threshold.unwrap_or(u64::MAX);
        stats.purge.min_interval_ns = duration_ns(cfg.purge_interval);
        let glibc = glibc::Sampler::new(cfg.mallinfo_budget, cfg.interval);
        Ok(Publisher {
            cfg,
            writer,
            slot,
            governor: Governor::default(),
            stats,
            glibc,
            last_requested: None,
        })
    }

    /// Publishes every interval and serves requests until `stop` is set.
    pub fn run(mut self, stop: &AtomicBool) {
        let mut next = Instant::now();
        while !stop.load(Ordering::Acquire) {
            if Instant::now() >= next {
                self.keep_reachable();
                self.tick();
                next = Instant::now() + self.cfg.interval;
            }
            let wait = next.saturating_duration_since(Instant::now());
            if let Some(request) = self.writer.wait_for_request(wait) {
                self.serve(request);
            }
        }
    }

    /// One publication: refresh, maybe a threshold purge, publish.
    pub fn tick(&mut self) {
        let cpu = sys::thread_cpu_ns();
        self.refresh();
        let purgeable = self.purgeable();
        let threshold = self.cfg.trim_threshold.filter(|_| threshold_purges());
        self.stats.purge.threshold_bytes = threshold.unwrap_or(u64::MAX);
        if self
            .governor
            .threshold_due(purgeable, threshold, self.cfg.purge_interval)
        {
            self.purge(PurgeReason::Threshold, None);
        }
        self.publish(cpu);
    }

    /// Serves one purge request: purge, publish, answer.
    pub fn serve(&mut self, request: Request) {
        if let Some(t) = self.last_requested {
            std::thread::sleep(REQUEST_MIN_GAP.saturating_sub(t.elapsed()));
        }
        self.last_requested = Some(Instant::now());
        let cpu = sys::thread_cpu_ns();
        self.purge(PurgeReason::Request, Some(request));
        self.publish(cpu);
        self.writer.answer(&request);
    }

    fn publish(&mut self, cpu_at_start: u64) {
        let p = &mut self.stats.publication;
        let now_cpu = sys::thread_cpu_ns();
        p.mono_ns = sys::monotonic_ns();
        p.unix_ns = sys::unix_ns();
        p.count += 1;
        p.publisher_cpu_ns = now_cpu;
        p.last_cpu_ns = now_cpu.saturating_sub(cpu_at_start);
        self.writer.publish(&self.stats);
    }

    fn refresh(&mut self) {
        self.stats.publication.rss_bytes = rss_bytes().unwrap_or(0);
        match self.cfg.allocator {
            Some(Allocator::Jemalloc) => {
                if let Err(e) = self.refresh_jemalloc() {
                    warn_once(&format!("reading jemalloc's statistics failed: {e}"));
                }
            }
            Some(Allocator::System) => self.refresh_glibc(),
            None => {}
        }
    }

    fn refresh_jemalloc(&mut self) -> io::Result<()> {
        if self.cfg.decay {
            jemalloc::decay_all()?;
        }
        let s = jemalloc::stats(Detail::Totals)?;
        let arenas = jemalloc::arenas()?;
        let j = &mut self.stats.jemalloc;
        j.allocated = s.allocated;
        j.active = s.active;
        j.resident = s.resident;
        j.mapped = s.mapped;
        j.retained = s.retained;
        j.metadata = s.metadata;
        j.dirty_bytes = s.dirty_bytes;
        j.muzzy_bytes = s.muzzy_bytes;
        j.narenas = u64::from(jemalloc::narenas()?);
        let top = most_purgeable(arenas);
        j.arenas.count = top.len() as u64;
        for (slot, a) in j.arenas.entries.iter_mut().zip(&top) {
            *slot = *a;
        }
        Ok(())
    }

    fn refresh_glibc(&mut self) {
        if let Err(e) = self.glibc.stats(Detail::Totals) {
            warn_once(&format!("reading glibc's statistics failed: {e}"));
        }
        let (mi, mono_ns) = self.glibc.last_mallinfo();
        let (in_use, mmapped) = self.glibc.live();
        let gl = &mut self.stats.glibc;
        gl.arena_bytes = mi.arena;
        gl.in_use_bytes = in_use;
        gl.free_bytes = mi.fordblks;
        gl.free_chunks = mi.ordblks;
        gl.fastbin_bytes = mi.fsmblks;
        gl.top_pad_bytes = mi.keepcost;
        gl.mmapped_bytes = mmapped;
        gl.mmapped_chunks = mi.hblks;
        gl.mallinfo_mono_ns = mono_ns;
        gl.mallinfo_cpu_ns = mi.cpu_ns;
        self.publish_residency();
    }

    /// Copies the arena heaps' last residency into the record.
    fn publish_residency(&mut self) {
        let regions = self.glibc.residency();
        let gl = &mut self.stats.glibc;
        gl.arena_resident = regions.iter().map(|r| r.resident).sum();
        gl.heaps_total = u64::from(self.glibc.heap_count());
        gl.heaps.count = regions.len().min(MAX_HEAPS) as u64;
        for (slot, r) in gl.heaps.entries.iter_mut().zip(regions) {
            *slot = HeapResidency {
                start: r.start,
                size: r.size,
                resident: r.resident,
            };
        }
        gl.residency_mono_ns = sys::monotonic_ns();
    }

    /// What a purge could return now (from the last refresh).
    fn purgeable(&self) -> u64 {
        match self.cfg.allocator {
            Some(Allocator::Jemalloc) => {
                self.stats.jemalloc.dirty_bytes + self.stats.jemalloc.muzzy_bytes
            }
            Some(Allocator::System) => self.glibc_hoarded(),
            None => 0,
        }
    }

    fn glibc_hoarded(&self) -> u64 {
        let g = &self.stats.glibc;
        let live = g.in_use_bytes + g.mmapped_bytes;
        (g.arena_resident + g.mmapped_bytes).saturating_sub(live)
    }

    fn purge(&mut self, reason: PurgeReason, request: Option<Request>) {
        let Some(allocator) = self.cfg.allocator else {
            self.record_purge(reason, request, PurgeOutcome::default());
            return;
        };
        if allocator == Allocator::System {
            // what is live now, not at the last mallinfo2: a free of many
            // chunks since then would read as still live, and the hoard
            // the trim is about as smaller than what it returns
            self.glibc.expire();
            self.refresh_glibc();
        }
        let hoarded_before = self.purgeable();
        let rss_before = rss_bytes().unwrap_or(0);
        let (cost, result) = release_hoard(allocator);
        if let Err(e) = result {
            warn_once(&format!("purging failed: {e}"));
        }
        let rss_after = rss_bytes().unwrap_or(0);
        match allocator {
            Allocator::Jemalloc => {
                let _ = self.refresh_jemalloc();
            }
            // live bytes and residency read again together: the program
            // allocates on while the trim runs (preempted for 90 ms under
            // load, a cache filled 4 MiB), and residency after the trim
            // paired with live bytes from before it read that growth as a
            // hoard the trim left (hoarded 0.14 -> 4.08 MiB, returned 0)
            Allocator::System => {
                self.glibc.expire();
                self.refresh_glibc();
            }
        }
        self.stats.publication.rss_bytes = rss_after;
        self.governor.record(cost.cpu_us);
        let outcome = PurgeOutcome {
            at_mono_ns: sys::monotonic_ns(),
            rss_before,
            rss_after,
            returned_bytes: rss_before.saturating_sub(rss_after),
            hoarded_before,
            hoarded_after: self.purgeable(),
            cpu_ns: cost.cpu_us * 1_000,
            wall_ns: cost.wall_us * 1_000,
            ..PurgeOutcome::default()
        };
        self.record_purge(reason, request, outcome);
    }

    fn record_purge(&mut self, reason: PurgeReason, request: Option<Request>, mut o: PurgeOutcome) {
        o.reason = reason.code();
        o.ticket = request.map_or(0, |r| u64::from(r.ticket));
        o.requested_by_pid = request.map_or(0, |r| u64::from(r.requester_pid));
        let p = &mut self.stats.purge;
        p.count += 1;
        match reason {
            PurgeReason::Request => p.requested_count += 1,
            PurgeReason::Threshold => p.threshold_count += 1,
        }
        p.returned_bytes_total += o.returned_bytes;
        p.cpu_ns_total += o.cpu_ns;
        p.last = o;
    }

    /// Makes a new record when readers could no longer reach this one: its
    /// descriptor was closed (or replaced), or the process's uid changed.
    fn keep_reachable(&mut self) {
        let euid = nix::unistd::geteuid().as_raw();
        if self.writer.is_reachable() && self.writer.owner_uid() == euid {
            return;
        }
        match Writer::create(self.cfg.allocator, self.cfg.interval) {
            Ok(new) => {
                if let Some(s) = self.slot {
                    s.set(new.inherited_parts());
                }
                std::mem::replace(&mut self.writer, new).supersede();
            }
            Err(e) => warn_once(&format!("cannot create a new allocator record: {e}")),
        }
    }
}

/// Starts a thread named `amm-publisher` with every signal blocked (signals
/// stay the program's business) that waits `delay`, creates the record and
/// publishes until `stop` is set (a constant `false`: until the process
/// ends). `stack` bytes of stack.
pub fn spawn(
    cfg: Config,
    slot: Option<&'static InheritedSlot>,
    delay: Duration,
    stop: &'static AtomicBool,
    stack: usize,
) -> io::Result<std::thread::JoinHandle<()>> {
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old))?;
    let spawned = std::thread::Builder::new()
        .name("amm-publisher".into())
        .stack_size(stack)
        .spawn(move || {
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            match Publisher::new(cfg, slot) {
                Ok(p) => p.run(stop),
                Err(e) => eprintln!("amm: cannot create the allocator record: {e}"),
            }
        });
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
    spawned
}

/// The arenas holding the most dirty + muzzy pages (at most
/// [`MAX_ARENAS`]), in index order.
fn most_purgeable(mut arenas: Vec<jemalloc::ArenaPages>) -> Vec<ArenaPages> {
    arenas.sort_by_key(|a| std::cmp::Reverse(a.dirty_bytes + a.muzzy_bytes));
    arenas.truncate(MAX_ARENAS);
    arenas.sort_by_key(|a| a.arena);
    arenas
        .into_iter()
        .map(|a| ArenaPages {
            index: u64::from(a.arena),
            dirty_bytes: a.dirty_bytes,
            muzzy_bytes: a.muzzy_bytes,
        })
        .collect()
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Says one thing on stderr, once per process: the publisher runs inside
/// someone else's program and must not flood its output.
fn warn_once(msg: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        eprintln!("amm: {msg} (further publisher warnings are not shown)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host;

    #[test]
    fn the_record_lists_the_arenas_with_the_most_to_purge() {
        let arenas = (0..100)
            .map(|i| jemalloc::ArenaPages {
                arena: i,
                dirty_bytes: u64::from(i) * 4096,
                muzzy_bytes: 0,
            })
            .collect();
        let top = most_purgeable(arenas);
        assert_eq!(top.len(), MAX_ARENAS);
        assert_eq!(top[0].index, 36, "the 64 largest are 36..100");
        assert!(top.windows(2).all(|w| w[0].index < w[1].index));
    }

    #[test]
    fn threshold_purges_stand_down_while_the_program_purges_by_itself() {
        // a glibc hoard well past the threshold: 32 MiB of 64 KiB blocks
        // (below the mmap threshold), freed but the last, which keeps them
        // from the top of the heap, so glibc does not trim them at free
        let mut blocks: Vec<Vec<u8>> = (0..512).map(|i| vec![i as u8 | 1; 64 << 10]).collect();
        let last = blocks.pop();
        drop(blocks);
        let mut cfg = Config::new(Some(Allocator::System));
        cfg.trim_threshold = Some(1 << 20);
        cfg.purge_interval = Duration::ZERO;
        let mut p = Publisher::new(cfg, None).expect("an allocator record");
        assert!(set_threshold_purges(false), "on by default");
        p.tick();
        let (count, threshold) = (p.stats.purge.threshold_count, p.stats.purge.threshold_bytes);
        assert!(!set_threshold_purges(true));
        assert_eq!(
            (count, threshold),
            (0, u64::MAX),
            "off: no purge of its own, and the record says there is no threshold"
        );
        let hoard = p.purgeable();
        assert!(hoard > 1 << 20, "the hoard is {hoard} bytes");
        p.tick();
        assert_eq!(p.stats.purge.threshold_bytes, 1 << 20);
        assert_eq!(p.stats.purge.threshold_count, 1, "on again: it purges");
        assert_eq!(
            host::threshold_purges_ctl(-1),
            1,
            "a question changes nothing"
        );
        drop(last);
    }
}
