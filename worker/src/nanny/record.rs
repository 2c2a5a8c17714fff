//! The supervised program's allocator record, as the supervisor of
//! `amm-worker -- CMD` uses it: read every tick into the timeline (through
//! `amm-timeline`'s conversion, the one `amm-agent watch` uses), and a
//! purge asked for under pressure.
//!
//! **Who purges.** The preload library purges inside the program when its
//! purgeable hoard passes `MALLOC_TRIM_THRESHOLD_` (amm-alloc's `Governor`:
//! at most once per interval, within a CPU budget), as amm-worker's own
//! worker does. A program cannot spill; so at the spill level and above the
//! supervisor does what amm-worker's memory manager does before it spills:
//! it asks for a purge as soon as the purgeable hoard passes the trim
//! threshold (at least 1 MiB), under a `Governor` of its own (at most once
//! per `--purge-interval`, the purges' CPU time within the budget), instead
//! of waiting for the program's next threshold check. Each purge the
//! program ran, its returned bytes with it, becomes a `purge` event
//! (`pressure` when the supervisor asked for it).
//!
//! **Trust.** The record is written by the program, which may be broken or
//! hostile. It is opened bound to the child the supervisor spawned (pid
//! and start time; `amm-record` checks the record names that task and is
//! mapped by it), so a purge request can only ever reach that child; its
//! numbers are clamped (`amm_timeline::record::MAX_BYTES`); a record stuck
//! mid-update costs a bounded time and is then left alone
//! ([`amm_record::Follower`]). Nothing the supervisor decides about levels
//! or terminate comes from the record: those come from the kernel's RSS.

use std::time::{Duration, Instant};

use amm_alloc::Governor;
use amm_record::{Access, Follower, Snapshot, Ticket};
use amm_timeline::{Level, PurgeReport, Tick};

/// How long the supervisor waits for the answer to its purge request
/// before it may ask again.
const ANSWER_PATIENCE: Duration = Duration::from_secs(10);

/// How long the supervisor waits for the record of a program it put on the
/// preload library before it writes ticks of RSS alone: a timeline whose
/// first ticks lack the allocator's numbers would make the report judge
/// the whole stretch from kernel data.
const RECORD_GRACE: Duration = Duration::from_secs(2);

/// The least purgeable hoard a pressure purge is asked for (as amm-worker's
/// memory manager does before spilling).
const MIN_PRESSURE_PURGE: u64 = 1 << 20;

/// A pressure purge the supervisor asked for.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    /// What the record said could be returned.
    pub purgeable: u64,
    /// The request's number.
    pub ticket: Ticket,
}

/// The record of one attempt's program.
#[derive(Debug)]
pub struct ProgramRecord {
    follower: Follower,
    /// `stats.purge.count` already turned into events, and the record it
    /// counts in (its creation time: an exec starts a new record at 0).
    purges_seen: u64,
    record_created: u64,
    governor: Governor,
    pending: Option<(Ticket, Instant)>,
    last: Option<Snapshot>,
    /// A record is expected (the program was put on a preload library).
    expected: bool,
    started: Instant,
    ever_read: bool,
}

impl ProgramRecord {
    /// The record of the child `pid` that started at `start_time` (clock
    /// ticks after boot); `expected` when the program was put on a preload
    /// library (it publishes one within its first interval).
    pub fn new(pid: u32, start_time: u64, expected: bool) -> ProgramRecord {
        ProgramRecord {
            follower: Follower::new(pid as i32, start_time, Access::Purge),
            purges_seen: 0,
            record_created: 0,
            governor: Governor::default(),
            pending: None,
            last: None,
            expected,
            started: Instant::now(),
            ever_read: false,
        }
    }

    /// Whether ticks should wait: the record is expected, has not been read
    /// yet, and the program started less than [`RECORD_GRACE`] ago.
    pub fn warming_up(&self) -> bool {
        self.expected && !self.ever_read && self.started.elapsed() < RECORD_GRACE
    }

    /// Reads the record into `tick` (statistics and split); returns the
    /// purge the program ran since the last read, if any, with the
    /// `CLOCK_MONOTONIC` time it finished as the program wrote it
    /// (unchecked: [`amm_timeline::record::purge_time_ns`] bounds it).
    pub fn read_into(&mut self, tick: &mut Tick) -> Option<(PurgeReport, u64)> {
        self.clear_answered();
        if self.warming_up() {
            self.follower.look_now();
        }
        let snap = self.follower.read_or_recent(amm_record::STAND_IN);
        match self.follower.notice() {
            Some(n) if n.is_warning() => tracing::warn!("{n}"),
            Some(n) => tracing::info!("{n}"),
            None => {}
        }
        self.last = snap;
        let s = snap?;
        self.ever_read = true;
        tick.add_record(&s);
        let created = self
            .follower
            .reader()
            .map_or(0, |r| r.info().created_mono_ns);
        if created != self.record_created {
            // a new record (the program exec'd): its count starts again
            self.record_created = created;
            self.purges_seen = 0;
        }
        let me = std::process::id();
        let purge = PurgeReport::from_record(&s, self.purges_seen, Some(me));
        self.purges_seen = s.stats.purge.count;
        if let Some(p) = &purge
            && p.reason == "pressure"
        {
            // its CPU time counts against the supervisor's purge budget
            self.governor.charge(p.cpu_us);
            self.pending = None;
        }
        purge.map(|p| (p, s.stats.purge.last.at_mono_ns))
    }

    /// Forgets the pending request once the program answered it (even an
    /// answer whose purge the record does not show).
    fn clear_answered(&mut self) {
        let Some((ticket, _)) = self.pending else {
            return;
        };
        if let Some(r) = self.follower.reader()
            && let Ok(Some(_)) = r.wait_purge(ticket, Duration::ZERO)
        {
            self.pending = None;
        }
    }

    /// At `level` spill or above, asks the program to purge when the last
    /// read's purgeable hoard passes `threshold` (at least 1 MiB), at most
    /// once per `interval`, within the budget, and never while a request
    /// is unanswered.
    pub fn pressure_purge(
        &mut self,
        level: Level,
        threshold: Option<u64>,
        interval: Duration,
    ) -> Option<Asked> {
        if level < Level::Spill {
            return None;
        }
        if self
            .pending
            .is_some_and(|(_, at)| at.elapsed() < ANSWER_PATIENCE)
        {
            return None;
        }
        let purgeable = self.last.as_ref()?.purgeable();
        let at_least = threshold.unwrap_or(0).max(MIN_PRESSURE_PURGE);
        if !self
            .governor
            .threshold_due(purgeable, Some(at_least), interval)
        {
            return None;
        }
        let ticket = match self.follower.reader()?.request_purge() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("cannot ask the program to purge: {e}");
                return None;
            }
        };
        // counts for the interval now; its CPU time once it is answered
        self.governor.record(0);
        self.pending = Some((ticket, Instant::now()));
        Some(Asked { purgeable, ticket })
    }

    /// The last fresh read of the record.
    pub fn last(&self) -> Option<&Snapshot> {
        self.last.as_ref()
    }
}
