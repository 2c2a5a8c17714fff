//! What the relay tells the dashboard: a one-way stream of observations
//! (watches starting and ending, kernel events, accounting splits) that
//! the relay sends without ever waiting.
//!
//! The relay runs under `SCHED_FIFO` on one thread; the HTTP side
//! ([`crate::http`]) runs on a thread of its own under the normal
//! scheduler. They share no lock: the relay puts each observation into a
//! bounded channel with `try_send` (a full channel drops it and counts the
//! drop, it never blocks), and for an event it also wakes the HTTP side so
//! the page shows it at once instead of at its next tick.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use amm_protocol::{EventMessage, Split, ThresholdBytes};
use tokio::sync::Notify;

/// Observations the channel holds before the relay starts dropping them
/// (at a few hundred a second for 64 workers, minutes of slack).
pub const CHANNEL_CAP: usize = 1 << 16;

/// How a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The process exited (the kernel's exit event or the pidfd).
    Exited,
    /// Its client unregistered it or went away; the process may live on.
    Unwatched,
}

/// One thing the relay saw.
#[derive(Debug, Clone)]
pub enum Observation {
    /// A watch started.
    Watched {
        /// The process.
        pid: u32,
        /// The uid of the client that registered it (the process runs as
        /// that user: the agent checked).
        uid: u32,
        /// Its start time (clock ticks after boot), to name the right
        /// process later.
        start_time: u64,
        /// The levels in bytes.
        thresholds: ThresholdBytes,
        /// Its client reads events on a ring buffer of its own: the agent
        /// drains its copy lazily, so its read delay says nothing about
        /// the client's.
        direct: bool,
        /// Its RSS when the watch began (from /proc).
        rss_bytes: u64,
        /// When (CLOCK_MONOTONIC ns).
        t_ns: u64,
    },
    /// A kernel event, as the relay routed it.
    Event {
        /// The event.
        msg: EventMessage,
        /// When the relay read it from the ring buffer (CLOCK_MONOTONIC ns).
        read_ns: u64,
        /// When the relay had written (or queued) it for its client.
        sent_ns: u64,
    },
    /// The agent signalled the process through its pidfd at terminate.
    AgentSignal {
        /// The process.
        pid: u32,
        /// The signal.
        signal: i32,
        /// When.
        t_ns: u64,
        /// RSS at the event.
        rss_bytes: u64,
    },
    /// A worker's accounting split.
    Accounting {
        /// The process.
        pid: u32,
        /// The worker's clock.
        t_ns: u64,
        /// The split.
        split: Split,
    },
    /// A watch ended.
    Ended {
        /// The process.
        pid: u32,
        /// How.
        how: Ending,
        /// When.
        t_ns: u64,
    },
    /// Clients connected now.
    Clients(usize),
    /// The probe's programs were attached (true) or detached.
    Attached(bool),
}

/// The relay's end: sends without blocking.
#[derive(Debug, Clone)]
pub struct Observer {
    tx: SyncSender<Observation>,
    wake: Arc<Notify>,
    dropped: Arc<AtomicU64>,
}

/// The dashboard's end.
#[derive(Debug)]
pub struct Observations {
    rx: Receiver<Observation>,
    wake: Arc<Notify>,
    dropped: Arc<AtomicU64>,
}

/// A connected pair.
pub fn channel(cap: usize) -> (Observer, Observations) {
    let (tx, rx) = sync_channel(cap);
    let wake = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicU64::new(0));
    (
        Observer {
            tx,
            wake: wake.clone(),
            dropped: dropped.clone(),
        },
        Observations { rx, wake, dropped },
    )
}

impl Observer {
    /// Hands `o` over, or drops it if the channel is full (or the other
    /// end is gone). Wakes the other end for an event.
    pub fn send(&self, o: Observation) {
        let urgent = matches!(
            o,
            Observation::Event { .. } | Observation::AgentSignal { .. }
        );
        if self.tx.try_send(o).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if urgent {
            self.wake.notify_one();
        }
    }
}

impl Observations {
    /// The next observation waiting, if any.
    pub fn try_next(&self) -> Option<Observation> {
        // empty, or the relay is gone
        self.rx.try_recv().ok()
    }

    /// What the relay wakes after an event (`notified().await` resolves
    /// when it sent one since the last wait).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Observations dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = channel(2);
        for n in 0..5 {
            tx.send(Observation::Clients(n));
        }
        assert_eq!(rx.dropped(), 3);
        assert!(matches!(rx.try_next(), Some(Observation::Clients(0))));
        assert!(matches!(rx.try_next(), Some(Observation::Clients(1))));
        assert!(rx.try_next().is_none());
    }
}
