//! Following one process's record for as long as it runs: what a
//! supervisor (`amm-worker -- CMD`) and `amm-agent watch` both do every
//! tick. The record is opened once it exists (the preload publishes within
//! its first interval), bound to the task the caller means (pid and start
//! time: a recycled pid is never read), opened again when the publisher
//! moves to a new record or its image `exec`s (the old record is
//! close-on-exec and goes stale), and a hostile record costs its reader a
//! bounded time: a refusal is said once, a seqlock held odd
//! ([`crate::ReadError::Stuck`], after [`crate::READ_PATIENCE`]) makes the
//! follower leave the record alone for [`STUCK_BACKOFF`] before it tries
//! again, and after [`STUCK_LIMIT`] such reads in a row for good.

use std::time::{Duration, Instant};

use crate::{Access, Allocator, OpenError, ReadError, Reader, Snapshot, Task};

/// How often to look again for a record that is not there (yet), or for
/// the successor of a stale one.
pub const RETRY: Duration = Duration::from_millis(250);

/// How long a record found stuck mid-update is left alone.
pub const STUCK_BACKOFF: Duration = Duration::from_secs(5);

/// Stuck reads in a row after which the follower stops reading the record.
pub const STUCK_LIMIT: u32 = 3;

/// How old the last fresh read may be to stand in for a read that gave
/// nothing while the record stays open ([`Follower::read_or_recent`]).
pub const STAND_IN: Duration = Duration::from_secs(1);

/// What a follower has to say, once ([`Follower::notice`]): news, or a
/// warning. A caller shows news as part of its story of the process
/// (`amm-agent watch` on stdout, the supervisor's log at info) and a
/// warning as one (stderr, the log at warn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The record was found and is read from now on.
    Reading {
        /// The process.
        pid: i32,
        /// Its allocator, as the record says.
        allocator: Option<Allocator>,
        /// How often it publishes, ms.
        interval_ms: u64,
    },
    /// The record was refused, or stayed mid-update and is left alone (for
    /// a while, or for good): RSS only meanwhile. The text says which.
    Warning(String),
}

impl Notice {
    /// Whether it is a warning (else news).
    pub fn is_warning(&self) -> bool {
        matches!(self, Notice::Warning(_))
    }
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Reading {
                pid,
                allocator,
                interval_ms,
            } => write!(
                f,
                "pid {pid}: reading its allocator record ({}, published every {interval_ms} ms)",
                allocator.map_or("unknown allocator", |a| a.name())
            ),
            Notice::Warning(w) => f.write_str(w),
        }
    }
}

/// Follows the record of one task.
#[derive(Debug)]
pub struct Follower {
    pid: i32,
    start_time: u64,
    access: Access,
    reader: Option<Reader>,
    next_try: Instant,
    stuck: u32,
    gave_up: bool,
    /// What to say next (taken by [`Follower::notice`]).
    notice: Option<Notice>,
    /// The refusal already said (said once).
    said: Option<String>,
    /// The last consistent, fresh read.
    last: Option<Snapshot>,
}

impl Follower {
    /// For the process `pid` that started at `start_time` (clock ticks after
    /// boot, field 22 of `/proc/PID/stat`), opened with `access`.
    pub fn new(pid: i32, start_time: u64, access: Access) -> Follower {
        Follower {
            pid,
            start_time,
            access,
            reader: None,
            next_try: Instant::now(),
            stuck: 0,
            gave_up: false,
            notice: None,
            said: None,
            last: None,
        }
    }

    /// Reads the record (opening it first if needed) and returns the read
    /// when it is consistent and fresh; `None` when the process publishes
    /// nothing (yet), its record was refused, or it is stale or stuck.
    pub fn read(&mut self) -> Option<Snapshot> {
        if self.gave_up {
            return None;
        }
        if self.reader.is_none() && Instant::now() >= self.next_try {
            self.next_try = Instant::now() + RETRY;
            self.open();
        }
        let read = self.reader.as_ref()?.snapshot();
        match read {
            Ok(s) if s.allocator.is_none() => None,
            Ok(s) if s.is_stale() => {
                self.stuck = 0;
                self.look_for_successor();
                None
            }
            Ok(s) => {
                self.stuck = 0;
                self.last = Some(s);
                Some(s)
            }
            Err(ReadError::Superseded) => {
                self.reader = None;
                self.next_try = Instant::now();
                None
            }
            Err(ReadError::Stuck) => {
                self.on_stuck();
                None
            }
        }
    }

    /// [`Follower::read`], or, when that gives nothing while the record
    /// stays open (a publisher late on a busy machine: no publication for
    /// three intervals), the last fresh read if it is at most `max_age`
    /// old ([`STAND_IN`] for the callers' ticks). Its age says how old it
    /// is. Without it, one late publication left a tick without the
    /// allocator's numbers, and the report judged that whole stretch from
    /// kernel data. A record left alone (stuck, refused, given up) has no
    /// stand-in.
    pub fn read_or_recent(&mut self, max_age: Duration) -> Option<Snapshot> {
        if let Some(s) = self.read() {
            return Some(s);
        }
        let open = self.reader.is_some() && !self.gave_up;
        self.last.filter(|s| open && s.age() <= max_age)
    }

    /// Looks for the record at the next read even if the last look was
    /// less than [`RETRY`] ago (a caller that expects one to appear any
    /// moment: a program just started on the preload library).
    pub fn look_now(&mut self) {
        if self.reader.is_none() && !self.gave_up {
            self.next_try = Instant::now();
        }
    }

    /// The last consistent, fresh read.
    pub fn last(&self) -> Option<&Snapshot> {
        self.last.as_ref()
    }

    /// The open record, to request a purge through it (with
    /// [`Access::Purge`]).
    pub fn reader(&self) -> Option<&Reader> {
        self.reader.as_ref()
    }

    /// What the follower has to say since the last call, once: the record
    /// was found (news), refused, or found stuck (warnings).
    pub fn notice(&mut self) -> Option<Notice> {
        self.notice.take()
    }

    /// A warning, said once until something else is said.
    fn warn(&mut self, what: String) {
        if self.said.as_deref() != Some(what.as_str()) {
            self.said = Some(what.clone());
            self.notice = Some(Notice::Warning(what));
        }
    }

    fn open(&mut self) {
        match self.open_bound() {
            Ok(r) => {
                self.notice = Some(Notice::Reading {
                    pid: self.pid,
                    allocator: r.info().allocator,
                    interval_ms: r.info().interval_ns / 1_000_000,
                });
                self.said = None;
                self.reader = Some(r);
            }
            // not on the preload (yet): kernel data only
            Err(OpenError::NoRecord(_)) | Err(OpenError::NoProcess(_)) => {}
            Err(e) => self.warn(format!("pid {}: {e}", self.pid)),
        }
    }

    /// The reader bound to the task meant: refused if the pid now names
    /// another task.
    fn open_bound(&self) -> Result<Reader, OpenError> {
        let task = Task::of(self.pid)?;
        if task.start_time != self.start_time {
            return Err(OpenError::Replaced {
                pid: self.pid,
                expected: self.start_time,
                found: task.start_time,
            });
        }
        crate::open_task(&task, self.access)
    }

    /// A stale record: the process exec'd (its new image publishes a new
    /// record) or stopped publishing. Looks, at most every [`RETRY`], for a
    /// record created after the one held.
    fn look_for_successor(&mut self) {
        if Instant::now() < self.next_try {
            return;
        }
        self.next_try = Instant::now() + RETRY;
        let created = self.reader.as_ref().map(|r| r.info().created_mono_ns);
        if let Ok(r) = self.open_bound()
            && Some(r.info().created_mono_ns) != created
        {
            self.reader = Some(r);
        }
    }

    fn on_stuck(&mut self) {
        self.stuck += 1;
        self.reader = None;
        if self.stuck >= STUCK_LIMIT {
            self.gave_up = true;
            self.warn(format!(
                "pid {}: its allocator record stayed mid-update {STUCK_LIMIT} times in a row; \
                 no longer read (RSS only from now on)",
                self.pid
            ));
        } else {
            self.next_try = Instant::now() + STUCK_BACKOFF;
            self.warn(format!(
                "pid {}: its allocator record stayed mid-update for {} ms; left alone for {} s",
                self.pid,
                crate::READ_PATIENCE.as_millis(),
                STUCK_BACKOFF.as_secs()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Mutex, MutexGuard};

    use crate::{Allocator, Stats, Writer};

    /// The tests' records all live in this one process and a follower opens
    /// the first it finds: one test's record at a time.
    static ONE_RECORD: Mutex<()> = Mutex::new(());

    /// A record this process published once at `interval`, and a follower
    /// that read it fresh (with the guard that keeps other tests' records
    /// out while it lives).
    fn published(interval: Duration) -> (MutexGuard<'static, ()>, Writer, Follower, Snapshot) {
        let one = ONE_RECORD.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = Writer::create(Some(Allocator::System), interval).expect("writer");
        let mut stats = Stats::default();
        stats.publication.count = 1;
        stats.publication.mono_ns = crate::sys::monotonic_ns();
        w.publish(&stats);
        let me = Task::of(std::process::id() as i32).expect("this process");
        let mut f = Follower::new(me.pid, me.start_time, Access::Read);
        let first = f.read().expect("a fresh read of the record just published");
        (one, w, f, first)
    }

    /// Finding the record is news, not a warning: `amm-agent watch` prints
    /// it with the process's story (stdout), never where its warnings go.
    #[test]
    fn finding_the_record_is_news_not_a_warning() {
        let (_one, w, mut f, _) = published(Duration::from_secs(60));
        let n = f.notice().expect("the record was found");
        assert!(!n.is_warning(), "{n}");
        assert_eq!(
            n,
            Notice::Reading {
                pid: std::process::id() as i32,
                allocator: Some(Allocator::System),
                interval_ms: 60_000
            }
        );
        assert!(
            n.to_string()
                .ends_with(": reading its allocator record (system, published every 60000 ms)"),
            "{n}"
        );
        assert!(f.notice().is_none(), "said once");
        drop(w);
    }

    /// A publisher that stops publishing for a while (preempted on a busy
    /// machine) makes the next read stale; the last fresh read stands in
    /// while it is young enough, its own publication time kept.
    #[test]
    fn a_late_publisher_leaves_a_recent_read_standing_in() {
        let (_one, w, mut f, first) = published(Duration::from_millis(1));
        // past three intervals and 100 ms: the record is stale now
        std::thread::sleep(Duration::from_millis(150));
        assert!(f.read().is_none(), "a stale read is not a fresh one");
        let s = f
            .read_or_recent(Duration::from_secs(3600))
            .expect("the last fresh read stands in");
        assert_eq!(s.stats.publication.mono_ns, first.stats.publication.mono_ns);
        assert!(s.age() >= Duration::from_millis(150), "its age is its own");
        assert!(
            f.read_or_recent(Duration::from_millis(10)).is_none(),
            "too old to stand in"
        );
        drop(w);
    }

    /// A record found stuck mid-update is left alone, and after
    /// [`STUCK_LIMIT`] such reads given up on: neither has a stand-in,
    /// however young the last fresh read (a stuck writer must not keep
    /// feeding its last numbers into the ticks).
    #[test]
    fn a_record_left_alone_or_given_up_has_no_stand_in() {
        let (_one, w, mut f, _) = published(Duration::from_secs(60));
        // what a read that finds the seqlock held odd past its patience does
        f.on_stuck();
        assert!(
            f.read_or_recent(Duration::from_secs(3600)).is_none(),
            "a record left alone has no stand-in"
        );
        assert!(
            f.notice()
                .is_some_and(|n| n.is_warning() && n.to_string().contains("left alone"))
        );
        for _ in 1..STUCK_LIMIT {
            f.on_stuck();
        }
        assert!(
            f.notice()
                .is_some_and(|n| n.is_warning() && n.to_string().contains("no longer read"))
        );
        assert!(f.read().is_none(), "given up: never read again");
        assert!(
            f.read_or_recent(Duration::from_secs(3600)).is_none(),
            "a record given up on has no stand-in"
        );
        assert!(f.last().is_some(), "the last read is kept, only not used");
        drop(w);
    }
}
