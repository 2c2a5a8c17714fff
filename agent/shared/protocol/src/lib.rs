//! The protocol between amm-agent and its clients on the agent's Unix socket.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one
//! JSON message. Frames larger than [`MAX_FRAME`] are refused. The first
//! message of a client is [`ClientMessage::Hello`] with [`VERSION`]; the agent
//! answers [`ServerMessage::Welcome`] or [`ServerMessage::Error`] and closes.
//! A client then registers processes and receives their events as they
//! happen. Any malformed message closes that one connection.
//!
//! This crate never touches BPF: the unprivileged worker links it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use amm_ebpf::{EventKind, Level};
use serde::{Deserialize, Serialize};

mod client;
pub mod fdpass;
pub mod link;
pub mod ring;
pub mod sched;
pub mod sys;
pub use client::{Client, ClientError, Registered};

/// Protocol version spoken by this crate.
pub const VERSION: u32 = 1;

/// Samples of each timeline a status answer carries (the newest).
pub const STATUS_SAMPLES: usize = 16;

/// Most samples one timeline page carries (each is at most a few hundred
/// bytes of JSON, so a page fits a frame).
pub const TIMELINE_PAGE: usize = 128;

/// Largest frame either side accepts, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// Default path of the agent's socket.
pub const DEFAULT_SOCKET: &str = "/run/amm/agent.sock";

/// Level fractions of the limit; `None` switches a level off. The defaults
/// are Dask's (target 0.6, spill 0.7, pause 0.8, terminate 0.95).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fractions {
    /// Where a raised level re-arms (falls back to below).
    pub target: Option<f64>,
    /// Spill level.
    pub spill: Option<f64>,
    /// Pause level.
    pub pause: Option<f64>,
    /// Terminate level.
    pub terminate: Option<f64>,
}

impl Default for Fractions {
    fn default() -> Self {
        Self {
            target: Some(0.6),
            spill: Some(0.7),
            pause: Some(0.8),
            terminate: Some(0.95),
        }
    }
}

/// Thresholds in bytes, as the kernel program uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThresholdBytes {
    /// The limit the fractions refer to.
    pub limit: u64,
    /// Re-arm level ([`amm_ebpf::DISABLED`] if off).
    pub rearm: u64,
    /// Spill level.
    pub spill: u64,
    /// Pause level.
    pub pause: u64,
    /// Terminate level.
    pub terminate: u64,
}

/// Why a set of fractions (and a limit) cannot be used. The one check of
/// thresholds in amm: the agent, `amm-agent watch` and the worker's
/// configuration all call [`Fractions::validate`] or [`Fractions::to_bytes`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ThresholdError {
    /// A fraction is not a number in (0, 1] (NaN included).
    #[error(
        "threshold {name}={value} is not a fraction in (0, 1]; use e.g. 0.7, or switch it off (null, false)"
    )]
    OutOfRange {
        /// Which threshold.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// Levels are out of order.
    #[error(
        "thresholds must not decrease: target <= spill <= pause <= terminate (got {0}); fix the order or switch one off"
    )]
    NotIncreasing(Fractions),
    /// The limit is zero.
    #[error("the memory limit is 0 bytes; give a limit such as 2GiB")]
    ZeroLimit,
    /// A level of this limit is not a byte count the kernel program can use:
    /// below one byte, or 2^64-1 (which means "off") or more.
    #[error(
        "{name}={fraction} of a {limit}-byte limit is {bytes} bytes, outside 1..2^64-1 (2^64-1 means off, so the level would silently never fire); give a limit such as 2GiB, or switch {name} off"
    )]
    Unrepresentable {
        /// Which threshold.
        name: &'static str,
        /// Its fraction.
        fraction: f64,
        /// The limit.
        limit: u64,
        /// The product, as far as a float holds it.
        bytes: f64,
    },
}

impl std::fmt::Display for Fractions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: Option<f64>| v.map_or_else(|| "off".to_string(), |x| x.to_string());
        write!(
            f,
            "target={} spill={} pause={} terminate={}",
            show(self.target),
            show(self.spill),
            show(self.pause),
            show(self.terminate)
        )
    }
}

impl Fractions {
    /// The fractions by name, lowest first.
    fn named(&self) -> [(&'static str, Option<f64>); 4] {
        [
            ("target", self.target),
            ("spill", self.spill),
            ("pause", self.pause),
            ("terminate", self.terminate),
        ]
    }

    /// Checks the fractions alone: each in (0, 1] (no NaN), and
    /// `target <= spill <= pause <= terminate` among those switched on.
    pub fn validate(&self) -> Result<(), ThresholdError> {
        for (name, v) in self.named() {
            if let Some(value) = v
                && !(value > 0.0 && value <= 1.0)
            {
                return Err(ThresholdError::OutOfRange { name, value });
            }
        }
        let on: Vec<f64> = self.named().iter().filter_map(|(_, v)| *v).collect();
        if on.windows(2).any(|w| w[0] > w[1]) {
            return Err(ThresholdError::NotIncreasing(*self));
        }
        Ok(())
    }

    /// Checks the fractions with [`Self::validate`] and turns them into
    /// bytes of `limit`; every level must land on a byte count the kernel
    /// can use (see [`ThresholdError::Unrepresentable`]).
    ///
    /// The re-arm level is `target` if set, else the lowest enabled level.
    pub fn to_bytes(&self, limit: u64) -> Result<ThresholdBytes, ThresholdError> {
        self.validate()?;
        if limit == 0 {
            return Err(ThresholdError::ZeroLimit);
        }
        let bytes = |name: &'static str, f: Option<f64>| -> Result<u64, ThresholdError> {
            let Some(fraction) = f else {
                return Ok(amm_ebpf::DISABLED);
            };
            let product = limit as f64 * fraction;
            // u64::MAX as f64 rounds up to 2^64: anything at or above it,
            // or below one byte, cannot be told from "off" or "always"
            if product < 1.0 || product >= u64::MAX as f64 {
                return Err(ThresholdError::Unrepresentable {
                    name,
                    fraction,
                    limit,
                    bytes: product,
                });
            }
            Ok(product as u64)
        };
        let rearm = match self.target {
            Some(t) => Some(t),
            None => [self.spill, self.pause, self.terminate]
                .into_iter()
                .flatten()
                .next(),
        };
        Ok(ThresholdBytes {
            limit,
            rearm: bytes("target", rearm)?,
            spill: bytes("spill", self.spill)?,
            pause: bytes("pause", self.pause)?,
            terminate: bytes("terminate", self.terminate)?,
        })
    }
}

impl ThresholdBytes {
    /// The level of `rss` under these thresholds: the highest level whose
    /// threshold `rss` reaches. The kernel program's `amm_level_of` (C,
    /// `ebpf/c/amm.h`) computes the same: `tests/tests/layout.rs` runs it
    /// against this on every edge, and the probe tests at real crossings.
    pub fn level_of(&self, rss: u64) -> Level {
        if rss >= self.terminate {
            Level::Terminate
        } else if rss >= self.pause {
            Level::Pause
        } else if rss >= self.spill {
            Level::Spill
        } else {
            Level::Below
        }
    }
}

/// A request to watch one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// The process: the client itself or a direct child of it, numbered as
    /// the client sees it (in the client's own PID namespace, so a client in
    /// a container names its processes as it knows them); 0 means the
    /// client itself. The answer ([`ServerMessage::Registered`]) gives the
    /// number the agent and the kernel use.
    pub pid: u32,
    /// Its start time in clock ticks after boot (field 22 of
    /// `/proc/PID/stat`). When given, the agent refuses a pid that now
    /// names another process (a recycled pid).
    #[serde(default)]
    pub start_time: Option<u64>,
    /// The memory limit the fractions refer to, in bytes.
    pub limit_bytes: u64,
    /// Level fractions.
    #[serde(default)]
    pub thresholds: Fractions,
    /// Spike alarm horizon in ms (0 or absent: the agent's default).
    #[serde(default)]
    pub spike_horizon_ms: Option<u64>,
    /// Signal the kernel sends at the page that crosses terminate (e.g. 9
    /// or 15); absent: no signal, events only.
    #[serde(default)]
    pub terminate_signal: Option<i32>,
    /// Who sends `terminate_signal`: the kernel program, at the faulting
    /// page itself (default), or the agent through its pidfd when it reads
    /// the event (kept to measure the difference; slower).
    #[serde(default)]
    pub terminate_by: TerminateBy,
    /// Also deliver the events on a ring buffer of the client's own, whose
    /// fd comes with the answer: read without the agent in the way.
    #[serde(default)]
    pub direct: bool,
}

/// Who enforces the terminate level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TerminateBy {
    /// The BPF program, `bpf_send_signal` in the faulting task.
    #[default]
    Kernel,
    /// The agent, `pidfd_send_signal` when the event reaches it.
    Agent,
}

/// A worker's accounting split (DESIGN.md's vocabulary), in bytes, pushed
/// to the agent so one place holds the node's millisecond picture: the
/// timeline contract's type, so the agent's timeline and a worker's file
/// carry the same thing.
pub use amm_timeline::Split;

/// Which allocator a [`HeapSample`] describes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocatorKind {
    /// jemalloc (`mallctl` statistics).
    #[default]
    Jemalloc,
    /// glibc malloc (`mallinfo2`).
    Glibc,
}

/// The allocator's own statistics at one accounting tick, in bytes, for the
/// leak/hoard/fragmentation verdict of `amm-worker report --agent`. Fields
/// an allocator does not have stay 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeapSample {
    /// Which allocator.
    pub allocator: AllocatorKind,
    /// jemalloc `stats.allocated`.
    pub allocated: u64,
    /// jemalloc `stats.active`.
    pub active: u64,
    /// jemalloc `stats.resident`.
    pub resident: u64,
    /// jemalloc dirty pages of all arenas.
    pub dirty: u64,
    /// jemalloc muzzy pages of all arenas.
    pub muzzy: u64,
    /// glibc `uordblks`.
    pub uordblks: u64,
    /// glibc `fordblks`.
    pub fordblks: u64,
    /// glibc `hblkhd`.
    pub hblkhd: u64,
    /// glibc `keepcost`.
    pub keepcost: u64,
}

/// One purge (jemalloc) or trim (glibc) a worker ran, and what it gave back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PurgeSample {
    /// Why it ran (`threshold`, `scheduler`, ...).
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

/// One entry of a worker's timeline at the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// CLOCK_MONOTONIC ns (kernel time for kernel events, the agent's or the
    /// worker's clock otherwise).
    pub t_ns: u64,
    /// RSS at that moment.
    pub rss_bytes: u64,
    /// What happened.
    #[serde(flatten)]
    pub what: SampleKind,
}

/// What a [`Sample`] records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "sample", rename_all = "snake_case")]
pub enum SampleKind {
    /// A level change seen by the kernel.
    Level {
        /// Before.
        from: Level,
        /// After.
        to: Level,
        /// Made by another task (reclaim, exit).
        foreign: bool,
        /// The kernel signalled the process at this page.
        signalled: bool,
    },
    /// A spike alarm.
    Spike {
        /// Predicted ns until terminate.
        eta_ns: u64,
        /// Growth rate then.
        rate_bytes_per_ms: i64,
    },
    /// The agent signalled the process through its pidfd.
    AgentSignal {
        /// The signal.
        signal: i32,
    },
    /// The worker's own accounting.
    Accounting(Split),
    /// The allocator's statistics that came with the accounting of the same
    /// `t_ns`.
    Heap(HeapSample),
    /// A purge/trim the worker ran.
    Purge(PurgeSample),
    /// The process exited.
    Exit {
        /// Peak RSS.
        peak_rss_bytes: u64,
    },
    /// The client unregistered it or went away; the watch ended while the
    /// process may live on.
    Unwatched {
        /// Peak RSS until then.
        peak_rss_bytes: u64,
    },
    /// The process's credentials changed (exec of a setuid, setgid or
    /// file-capability program, or setresuid): the kernel stopped watching
    /// it there and the watch ended.
    Credentials {
        /// Peak RSS until then.
        peak_rss_bytes: u64,
    },
}

impl Registration {
    /// The pid that means "the client itself" (no number needed, whatever
    /// PID namespace the client runs in).
    pub const MYSELF: u32 = 0;

    /// A registration of `pid` with `limit_bytes` and the defaults: Dask's
    /// thresholds, the agent's spike horizon, no signal, events on the
    /// socket only.
    pub fn new(pid: u32, limit_bytes: u64) -> Self {
        Self {
            pid,
            start_time: None,
            limit_bytes,
            thresholds: Fractions::default(),
            spike_horizon_ms: None,
            terminate_signal: None,
            terminate_by: TerminateBy::Kernel,
            direct: false,
        }
    }
}

/// Messages a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message: the protocol version the client speaks.
    Hello {
        /// [`VERSION`].
        version: u32,
        /// Free text naming the client, for the agent's log.
        #[serde(default)]
        client: String,
    },
    /// Watch a process.
    Register(Registration),
    /// Stop watching a process this client registered.
    Unregister {
        /// The process.
        pid: u32,
    },
    /// Ask for the agent's state, a page at a time; it answers
    /// [`ServerMessage::Status`] (with the newest [`STATUS_SAMPLES`] samples
    /// of each timeline). A client that is not root sees only the watches of
    /// its own uid.
    Status {
        /// Continue after this cursor: the `next` of the previous page
        /// (absent: the first page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        /// Only the watches (live and ended) of this pid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },
    /// Ask for one process's timeline, a page at a time; it answers
    /// [`ServerMessage::Timeline`].
    Timeline {
        /// The process (watched now, or among the recently ended).
        pid: u32,
        /// Index of the first sample wanted (0: the oldest kept).
        from: usize,
        /// Most samples wanted (the agent may send fewer, to fit a frame).
        max: usize,
    },
    /// The worker's accounting split for a pid this client registered (no
    /// answer; refused silently if the pid is not the client's).
    Accounting {
        /// The watched process.
        pid: u32,
        /// The client's CLOCK_MONOTONIC ns when the split was computed.
        t_ns: u64,
        /// The split.
        split: Split,
        /// The allocator's statistics then (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heap: Option<HeapSample>,
    },
    /// A purge/trim the worker ran, for a pid this client registered (no
    /// answer; refused silently if the pid is not the client's).
    Purge {
        /// The watched process.
        pid: u32,
        /// The client's CLOCK_MONOTONIC ns when it ended.
        t_ns: u64,
        /// What it gave back.
        purge: PurgeSample,
    },
    /// Liveness check; the agent answers [`ServerMessage::Pong`].
    Ping {
        /// Echoed back.
        nonce: u64,
    },
}

/// One kernel event, as the agent forwards it and `amm-agent watch --json`
/// prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    /// `level`, `spike`, `exit` or `credentials` (the watch ended because
    /// the process changed credentials; nothing follows it).
    pub event: EventKind,
    /// Kernel time of the update that caused it (CLOCK_MONOTONIC, ns).
    pub t_ns: u64,
    /// The watched process.
    pub pid: u32,
    /// RSS at that update (FILE + ANON + SHMEM).
    pub rss_bytes: u64,
    /// Level after the event.
    pub level: Level,
    /// Level before it.
    pub prev_level: Level,
    /// Peak RSS so far.
    pub peak_rss_bytes: u64,
    /// Exit: page faults of the whole process (minflt + majflt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<u64>,
    /// Smoothed growth rate.
    pub rate_bytes_per_ms: i64,
    /// Spike: predicted ns until terminate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ns: Option<u64>,
    /// The update was made by another task (reclaim, exit, process_vm_*).
    #[serde(default)]
    pub foreign: bool,
    /// The kernel signalled the process at this update.
    #[serde(default)]
    pub signalled: bool,
}

impl EventMessage {
    /// Decodes a kernel record; `None` for an unknown kind or level.
    pub fn from_kernel(e: &amm_ebpf::Event) -> Option<Self> {
        Some(Self {
            event: EventKind::from_raw(e.kind)?,
            t_ns: e.t_ns,
            pid: e.tgid,
            rss_bytes: e.rss_bytes,
            level: Level::from_raw(e.level)?,
            prev_level: Level::from_raw(e.prev_level)?,
            peak_rss_bytes: e.peak_rss_bytes,
            faults: (e.kind == EventKind::Exit.raw()).then_some(e.faults),
            rate_bytes_per_ms: e.rate_bytes_per_ms,
            eta_ns: (e.kind == EventKind::Spike.raw()).then_some(e.eta_ns),
            foreign: e.flags & amm_ebpf::EVENT_FLAG_FOREIGN != 0,
            signalled: e.flags & amm_ebpf::EVENT_FLAG_SIGNALLED != 0,
        })
    }
}

/// Messages the agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to a good [`ClientMessage::Hello`].
    Welcome {
        /// [`VERSION`].
        version: u32,
        /// The agent's own version string.
        agent: String,
    },
    /// The process is watched from now on.
    Registered {
        /// The process, numbered as the agent and the kernel see it (the
        /// agent's PID namespace): events, `status`, `unregister` and the
        /// records of a direct ring use this number. For a client in the
        /// agent's namespace it is the pid it asked for.
        pid: u32,
        /// Its RSS when the watch started (from /proc).
        rss_bytes: u64,
        /// Its level at that RSS.
        level: Level,
        /// The thresholds in bytes the kernel now uses.
        thresholds: ThresholdBytes,
        /// With `direct`: the data size of the ring buffer whose fd is
        /// attached to this frame (SCM_RIGHTS).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ring_bytes: Option<u64>,
    },
    /// The request about `pid` was refused; the connection stays open.
    Refused {
        /// The process asked for.
        pid: u32,
        /// Why, in words a person can act on.
        reason: String,
        /// Why, for a program (absent from agents before it existed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<Denial>,
    },
    /// The watch is removed.
    Unregistered {
        /// The process.
        pid: u32,
    },
    /// A kernel event for a process this client registered.
    Event(EventMessage),
    /// Answer to [`ClientMessage::Status`].
    Status(AgentStatus),
    /// Answer to [`ClientMessage::Timeline`].
    Timeline {
        /// The process.
        pid: u32,
        /// Index of the first sample sent.
        from: usize,
        /// Samples the agent holds for it.
        total: usize,
        /// The page.
        samples: Vec<Sample>,
    },
    /// Answer to [`ClientMessage::Ping`].
    Pong {
        /// The client's nonce.
        nonce: u64,
    },
    /// The agent closes the connection after this: a protocol error, too
    /// many clients, or an idle client.
    Error {
        /// What was wrong.
        reason: String,
        /// Why, for a program.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<Denial>,
    },
}

/// Why the agent said no, for programs (`reason` says it for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Denial {
    /// The agent serves its most clients at once, or this uid its most
    /// connections: try again later (or close idle connections).
    TooManyClients,
    /// This uid has its most watches, or the probe's maps are full.
    TooManyWatches,
    /// The connection watched nothing and said nothing for the idle timeout.
    Idle,
    /// The process is not the client's to watch: another user's, neither
    /// the client nor its direct child, exited, or a recycled pid.
    NotYours,
    /// The request itself is wrong (thresholds, signal number, limit).
    Invalid,
    /// The pid is already watched (by this connection or another).
    AlreadyWatched,
    /// Nothing the agent holds under that pid (for this client).
    Unknown,
    /// The kernel probe could not take the watch.
    Probe,
    /// The connection broke the protocol (bad frame, no hello, ...).
    Protocol,
    /// A code this version does not know.
    #[serde(other)]
    Other,
}

impl Denial {
    /// True when the same request may succeed later without change
    /// (capacity, not a refusal on the merits).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::TooManyClients | Self::TooManyWatches | Self::Probe
        )
    }
}

/// The agent's state: its clients, watches and the probe's map entries.
///
/// One answer is one page (it must fit a frame): the live watches by pid,
/// then the ended ones oldest first, as many as fit. `next` is the cursor to
/// ask for the following page with ([`ClientMessage::Status`]'s `after`);
/// `None` on the last page. [`Client::status`] gathers every page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Connected clients (a client that is not root: those of its uid).
    pub clients: usize,
    /// Watched processes, by pid (this page's).
    pub watches: Vec<WatchStatus>,
    /// The last watches that ended (process exit, disconnect, credentials
    /// change), oldest first, with their timelines (this page's).
    #[serde(default)]
    pub ended: Vec<WatchStatus>,
    /// Watches the client may see in all pages.
    #[serde(default)]
    pub total_watches: usize,
    /// Ended watches the client may see in all pages.
    #[serde(default)]
    pub total_ended: usize,
    /// Cursor of the next page; `None` when this is the last.
    #[serde(default)]
    pub next: Option<u64>,
    /// Entries in the probe's maps (all zero when nothing is watched).
    pub map_entries: MapEntries,
    /// Events the probe submitted since it was loaded.
    pub events: u64,
    /// Events lost to a full ring buffer.
    pub dropped: u64,
}

/// One watched process in [`AgentStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchStatus {
    /// The process.
    pub pid: u32,
    /// The uid of the client that registered it.
    #[serde(default)]
    pub owner_uid: Option<u32>,
    /// Its limit.
    pub limit_bytes: u64,
    /// RSS at its last update.
    pub rss_bytes: u64,
    /// Peak RSS.
    pub peak_rss_bytes: u64,
    /// Current level.
    pub level: Level,
    /// Page faults so far (minflt + majflt from /proc).
    pub faults: u64,
    /// Smoothed growth rate.
    pub rate_bytes_per_ms: i64,
    /// The newest samples of its timeline (at most [`STATUS_SAMPLES`]),
    /// oldest first; `Timeline` requests page through all of them.
    #[serde(default)]
    pub timeline: Vec<Sample>,
    /// Samples the agent holds for it.
    #[serde(default)]
    pub timeline_len: usize,
    /// Its levels in bytes, while it is watched (`None` once it ended).
    #[serde(default)]
    pub thresholds: Option<ThresholdBytes>,
}

/// Entry counts of the probe's maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapEntries {
    /// `watches` entries.
    pub watches: usize,
    /// `mm_owner` entries.
    pub mm_owner: usize,
    /// `client_rings` entries.
    pub client_rings: usize,
    /// Bits set in `watch_bits`.
    pub bits: usize,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection inside a frame.
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// The announced length is over [`MAX_FRAME`].
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The socket failed (including a read timeout).
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// Encodes a message as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a frame body.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Fills `buf` from `read`; `frame_start` says a clean end here is a close
/// between frames rather than a truncated one.
fn read_full(
    read: &mut impl FnMut(&mut [u8]) -> io::Result<usize>,
    buf: &mut [u8],
    frame_start: bool,
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match read(&mut buf[got..]) {
            Ok(0) if got == 0 && frame_start => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got,
                    want: buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads one frame body through `read` (a `read(2)`-like function: the
/// blocking client passes one that also collects passed fds).
pub fn read_frame_with(
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    read_full(&mut read, &mut len, true)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    read_full(&mut read, &mut body, false)?;
    Ok(body)
}

/// Reads one frame body from a blocking stream.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    read_frame_with(|buf| r.read(buf))
}

/// Writes one message as a frame to a blocking stream.
pub fn write_message<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Async framing over tokio streams.
#[cfg(feature = "tokio")]
pub mod nonblocking {
    use super::{FrameError, MAX_FRAME, encode};
    use serde::Serialize;
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads one frame body. Waiting for a frame to begin has no limit (an
    /// idle client is fine); once its first byte is in, the rest must come
    /// within `frame_timeout`, or the frame fails with `TimedOut` (a client
    /// that sends half a frame cannot hold the reader).
    pub async fn read_frame<R: AsyncRead + Unpin>(
        r: &mut R,
        frame_timeout: Duration,
    ) -> Result<Vec<u8>, FrameError> {
        let mut len = [0u8; 4];
        if r.read(&mut len[..1]).await? == 0 {
            return Err(FrameError::Closed);
        }
        let rest = async {
            let mut got = 1;
            while got < 4 {
                let n = r.read(&mut len[got..]).await?;
                if n == 0 {
                    return Err(FrameError::Truncated { got, want: 4 });
                }
                got += n;
            }
            let want = u32::from_be_bytes(len) as usize;
            if want > MAX_FRAME {
                return Err(FrameError::TooLarge(want));
            }
            let mut body = vec![0u8; want];
            let mut got = 0;
            while got < want {
                let n = r.read(&mut body[got..]).await?;
                if n == 0 {
                    return Err(FrameError::Truncated { got, want });
                }
                got += n;
            }
            Ok(body)
        };
        match tokio::time::timeout(frame_timeout, rest).await {
            Ok(r) => r,
            Err(_) => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("frame not completed within {frame_timeout:?}"),
            ))),
        }
    }

    /// Writes one message as a frame.
    pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
        w: &mut W,
        msg: &T,
    ) -> Result<(), FrameError> {
        w.write_all(&encode(msg)?).await?;
        w.flush().await?;
        Ok(())
    }
}

/// Connects to a socket with a timeout on every read and write.
pub fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msg = ClientMessage::Ping { nonce: 9 };
        let bytes = encode(&msg).expect("encodes");
        let body = read_frame(&mut &bytes[..]).expect("reads");
        assert_eq!(decode::<ClientMessage>(&body).expect("decodes"), msg);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let big = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &big[..]),
            Err(FrameError::TooLarge(_))
        ));
        let half = [0, 0, 0, 10, b'{'];
        assert!(matches!(
            read_frame(&mut &half[..]),
            Err(FrameError::Truncated { got: 1, want: 10 })
        ));
        assert!(matches!(read_frame(&mut &[][..]), Err(FrameError::Closed)));
        assert!(matches!(
            decode::<ClientMessage>(b"{\"type\":\"nope\"}"),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn default_fractions_become_bytes() {
        let t = Fractions::default().to_bytes(1000).expect("valid");
        assert_eq!(
            (t.rearm, t.spill, t.pause, t.terminate),
            (600, 700, 800, 950)
        );
    }

    #[test]
    fn bad_fractions_are_refused_with_a_reason() {
        let mut f = Fractions {
            pause: Some(1.5),
            ..Fractions::default()
        };
        assert!(matches!(
            f.to_bytes(1000),
            Err(ThresholdError::OutOfRange { name: "pause", .. })
        ));
        f.pause = Some(0.65);
        assert!(matches!(
            f.to_bytes(1000),
            Err(ThresholdError::NotIncreasing(_))
        ));
        f.pause = Some(f64::NAN);
        assert!(f.to_bytes(1000).is_err());
        assert_eq!(
            Fractions::default().to_bytes(0),
            Err(ThresholdError::ZeroLimit)
        );
    }

    #[test]
    fn validation_is_one_function_with_clear_errors() {
        assert_eq!(Fractions::default().validate(), Ok(()));
        // equal levels are allowed: the kernel goes straight to the higher
        let flat = Fractions {
            target: Some(0.7),
            spill: Some(0.7),
            pause: Some(0.7),
            terminate: Some(0.7),
        };
        assert_eq!(flat.validate(), Ok(()));
        let backwards = Fractions {
            spill: Some(0.99),
            terminate: Some(0.5),
            ..Fractions::default()
        };
        let e = backwards.validate().expect_err("spill above terminate");
        assert!(matches!(e, ThresholdError::NotIncreasing(_)));
        let words = e.to_string();
        assert!(
            words.contains("spill=0.99") && words.contains("terminate=0.5"),
            "{words}"
        );
        let target_high = Fractions {
            target: Some(0.75),
            ..Fractions::default()
        };
        assert!(target_high.validate().is_err(), "target above spill");
        for bad in [f64::NAN, 0.0, -0.1, 1.5, f64::INFINITY] {
            let f = Fractions {
                pause: Some(bad),
                ..Fractions::default()
            };
            assert!(
                matches!(
                    f.validate(),
                    Err(ThresholdError::OutOfRange { name: "pause", .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_level_that_would_mean_off_is_refused() {
        let f = Fractions {
            terminate: Some(1.0),
            ..Fractions::default()
        };
        // 2^64-1 x 1.0 is the value that switches terminate off
        let e = f.to_bytes(u64::MAX).expect_err("terminate would be off");
        assert!(
            matches!(
                e,
                ThresholdError::Unrepresentable {
                    name: "terminate",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("never fire"), "{e}");
        // a limit of one byte has levels below a byte
        assert!(matches!(
            Fractions::default().to_bytes(1),
            Err(ThresholdError::Unrepresentable { name: "target", .. })
        ));
        // the largest limits that still work
        let t = f.to_bytes(u64::MAX / 2).expect("half the range");
        assert!(t.terminate < amm_ebpf::DISABLED);
        let off = Fractions {
            terminate: None,
            ..f
        };
        assert_eq!(
            off.to_bytes(u64::MAX / 2).expect("off").terminate,
            amm_ebpf::DISABLED
        );
    }

    #[test]
    fn levels_of_rss_follow_the_thresholds() {
        let t = Fractions::default().to_bytes(1000).expect("valid");
        assert_eq!(t.level_of(0), Level::Below);
        assert_eq!(t.level_of(699), Level::Below);
        assert_eq!(t.level_of(700), Level::Spill);
        assert_eq!(t.level_of(800), Level::Pause);
        assert_eq!(t.level_of(950), Level::Terminate);
        assert_eq!(t.level_of(u64::MAX), Level::Terminate);
    }

    #[test]
    fn old_and_new_messages_both_parse() {
        // a client of the first version sends a bare status
        assert_eq!(
            decode::<ClientMessage>(br#"{"type":"status"}"#).expect("bare status"),
            ClientMessage::Status {
                after: None,
                pid: None
            }
        );
        // an agent's refusal without a code, and a code from the future
        let r: ServerMessage =
            decode(br#"{"type":"refused","pid":3,"reason":"no"}"#).expect("no code");
        assert!(matches!(r, ServerMessage::Refused { code: None, .. }));
        let r: ServerMessage =
            decode(br#"{"type":"error","reason":"x","code":"quantum"}"#).expect("new code");
        assert!(matches!(
            r,
            ServerMessage::Error {
                code: Some(Denial::Other),
                ..
            }
        ));
        assert!(Denial::TooManyClients.is_transient() && !Denial::NotYours.is_transient());
    }

    #[test]
    fn disabled_levels_are_skipped_and_rearm_falls_back() {
        let f = Fractions {
            target: None,
            spill: None,
            pause: Some(0.8),
            terminate: Some(0.95),
        };
        let t = f.to_bytes(1000).expect("valid");
        assert_eq!(t.spill, amm_ebpf::DISABLED);
        assert_eq!(t.rearm, 800);
    }
}
