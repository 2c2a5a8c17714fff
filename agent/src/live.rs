//! The dashboard's picture of the node, kept by the HTTP thread from the
//! relay's [`Observation`]s and the probe's map (read through its own
//! handles, [`ProbeView`]): one row per watched process (the kernel's exact
//! RSS, peak and level, the worker's accounting split, counts of events, a
//! sparkline), the recently ended ones, a feed of kernel events with their
//! delays, and the agent's own counters. [`crate::metrics`] exports it,
//! [`crate::http`] streams it to the page as [`Frame`]s.
//!
//! It holds what `amm-agent status` shows root: every process of every
//! user. Only holders of the agent's HTTP token see it, or whoever can
//! reach the listener with `--http-public` (see SECURITY.md).

use std::collections::{BTreeMap, VecDeque};

use amm_ebpf::{EventKind, Level};
use amm_protocol::{EventMessage, Split, ThresholdBytes};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;

use crate::observe::{Ending, Observation, Observations};
use crate::probe::ProbeView;

/// Width of one sparkline bucket (it keeps the highest RSS seen in it).
pub const SPARK_BUCKET_NS: u64 = 500_000_000;
/// Buckets kept per process: three minutes.
pub const SPARK_BUCKETS: usize = 360;
/// Feed entries kept.
pub const FEED_CAP: usize = 256;
/// Feed entries each frame repeats (the page drops the ones it has).
pub const FEED_PER_FRAME: usize = 32;
/// Ended watches still shown (greyed) after they ended.
pub const ENDED_ROWS: usize = 32;
/// Most watched processes the dashboard follows (and exports series for):
/// the agent's own watch quotas keep real nodes far below it.
pub const MAX_ROWS: usize = 4096;

/// Labels of the event-latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// `read`: kernel → the agent read it; `sent`: kernel → the agent
    /// wrote it to the client's socket.
    pub stage: &'static str,
    /// `socket`, or `direct` when the client reads its own ring buffer
    /// (the agent then drains its copy lazily, up to 50 ms later).
    pub delivery: &'static str,
}

/// Counts of one process's kernel events.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    /// Crossings up to spill.
    pub spill: u64,
    /// Crossings up to pause.
    pub pause: u64,
    /// Crossings up to terminate.
    pub terminate: u64,
    /// Falls back below the re-arm level.
    pub below: u64,
    /// Spike alarms.
    pub spikes: u64,
    /// Kills at the terminate page (by the kernel, or by the agent).
    pub kills: u64,
}

impl Counts {
    fn level(&mut self, to: Level, up: bool) {
        match (to, up) {
            (Level::Spill, true) => self.spill += 1,
            (Level::Pause, true) => self.pause += 1,
            (Level::Terminate, true) => self.terminate += 1,
            (_, false) => self.below += 1,
            (Level::Below, true) => {}
        }
    }
}

/// The levels of one process in bytes (`None`: switched off).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Levels {
    /// Re-arm (target).
    pub target: Option<u64>,
    /// Spill.
    pub spill: Option<u64>,
    /// Pause.
    pub pause: Option<u64>,
    /// Terminate.
    pub terminate: Option<u64>,
}

impl Levels {
    fn of(t: &ThresholdBytes) -> Levels {
        let on = |b: u64| (b != amm_ebpf::DISABLED).then_some(b);
        Levels {
            target: on(t.rearm),
            spill: on(t.spill),
            pause: on(t.pause),
            terminate: on(t.terminate),
        }
    }
}

/// The worker's last accounting split.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SplitView {
    /// The worker's clock when it measured (CLOCK_MONOTONIC ns).
    pub t_ns: u64,
    /// RSS then.
    pub process: u64,
    /// sizeof of the values in memory.
    pub managed: u64,
    /// Live heap that is not managed.
    pub unmanaged_live: u64,
    /// Allocator-resident bytes holding nothing live.
    pub hoarded: u64,
    /// RSS outside the allocator.
    pub non_heap: u64,
    /// Managed bytes on disk.
    pub spilled: u64,
    /// managed + unmanaged_live.
    pub heap_live: u64,
}

/// How an ended row ended.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EndView {
    /// `killed` (at the terminate page), `exited` or `unwatched`.
    pub how: &'static str,
    /// When.
    pub t_ns: u64,
}

/// One watched (or recently ended) process.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The process.
    pub pid: u32,
    /// Its command name (`comm`), `?` if it was gone before it was read.
    pub name: String,
    /// The user that registered it.
    pub uid: u32,
    /// Its memory cgroup (the container, pod or unit it runs in).
    pub cgroup: String,
    /// Its memory limit.
    pub limit: u64,
    /// Its levels.
    pub levels: Levels,
    /// RSS now (the kernel's count at its last update).
    pub rss: u64,
    /// Peak RSS since the watch began (exact: every page).
    pub peak: u64,
    /// Its level now.
    pub level: Level,
    /// Smoothed growth rate.
    pub rate_bytes_per_ms: i64,
    /// The worker's last split, if it pushes one.
    pub split: Option<SplitView>,
    /// Its event counts.
    pub counts: Counts,
    /// Its client reads its own ring buffer.
    pub direct: bool,
    /// When the watch began.
    pub since_ns: u64,
    /// Set once the watch ended.
    pub ended: Option<EndView>,
    #[serde(skip)]
    spark: VecDeque<(u64, u64)>,
}

impl Row {
    /// Keeps the highest RSS per sparkline bucket.
    fn spark_point(&mut self, t_ns: u64, rss: u64) {
        let bucket = t_ns / SPARK_BUCKET_NS;
        match self.spark.back_mut() {
            Some((b, v)) if *b == bucket => *v = (*v).max(rss),
            Some((b, _)) if *b > bucket => {
                if let Some(p) = self.spark.iter_mut().rev().find(|(b2, _)| *b2 == bucket) {
                    p.1 = p.1.max(rss);
                }
            }
            _ => {
                if self.spark.len() == SPARK_BUCKETS {
                    self.spark.pop_front();
                }
                self.spark.push_back((bucket, rss));
            }
        }
    }

    /// The sparkline's points as `[bucket, bytes]`: all of them, or the
    /// last two (the page merges them into what it has).
    pub fn spark(&self, full: bool) -> Vec<[u64; 2]> {
        let skip = if full {
            0
        } else {
            self.spark.len().saturating_sub(2)
        };
        self.spark.iter().skip(skip).map(|&(b, v)| [b, v]).collect()
    }
}

/// One line of the event feed.
#[derive(Debug, Clone, Serialize)]
pub struct FeedItem {
    /// Increases by one per item (the page skips the ones it has).
    pub seq: u64,
    /// The process.
    pub pid: u32,
    /// Its name.
    pub name: String,
    /// `level`, `spike`, `kill` (the agent's signal), `exit`, `unwatched`.
    pub kind: &'static str,
    /// Level before.
    pub from: Level,
    /// Level after.
    pub to: Level,
    /// RSS at the event.
    pub rss: u64,
    /// Kernel time of the event (CLOCK_MONOTONIC ns).
    pub t_ns: u64,
    /// Kernel → the agent read it, µs (`None` when not a kernel event).
    pub read_us: Option<f64>,
    /// Kernel → written to the client's socket, µs.
    pub sent_us: Option<f64>,
    /// The client reads its own ring (it had the event before the agent).
    pub direct: bool,
    /// The kernel signalled the process at this page (a kill at terminate).
    pub signalled: bool,
    /// Spike: predicted ms to terminate.
    pub eta_ms: Option<f64>,
    /// Exit: peak RSS.
    pub peak: Option<u64>,
}

/// The agent's own numbers.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AgentView {
    /// Connected clients.
    pub clients: usize,
    /// Watched processes.
    pub watches: usize,
    /// The probe's programs are attached.
    pub attached: bool,
    /// Events the probe submitted since it was loaded.
    pub kernel_events: u64,
    /// Events lost to a full ring buffer.
    pub ring_dropped: u64,
    /// Observations the dashboard lost to a full channel.
    pub observations_dropped: u64,
    /// HTTP connections open now.
    pub http_connections: usize,
    /// HTTP connections refused (over the cap).
    pub http_refused: u64,
}

/// What the page receives: the whole picture, as one JSON object.
#[derive(Debug, Serialize)]
pub struct Frame<'a> {
    /// The agent's CLOCK_MONOTONIC ns when the frame was made.
    pub now_ns: u64,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC then, in ms: the page turns kernel
    /// stamps into wall time with it (to measure event → pixel).
    pub wall_offset_ms: f64,
    /// Sparkline bucket width, ms.
    pub bucket_ms: u64,
    /// Sparkline points cover all history (the first frame) or only the
    /// newest buckets.
    pub full: bool,
    /// The agent.
    pub agent: AgentView,
    /// Watched processes (by pid), then ended ones (newest first).
    pub rows: Vec<RowFrame<'a>>,
    /// The newest feed items.
    pub feed: Vec<&'a FeedItem>,
}

/// A row and its sparkline points.
#[derive(Debug, Serialize)]
pub struct RowFrame<'a> {
    /// The row.
    #[serde(flatten)]
    pub row: &'a Row,
    /// `[bucket, bytes]` points.
    pub spark: Vec<[u64; 2]>,
}

/// The dashboard's state.
#[derive(Debug)]
pub struct Live {
    rows: BTreeMap<u32, Row>,
    ended: VecDeque<Row>,
    feed: VecDeque<FeedItem>,
    next_seq: u64,
    agent: AgentView,
    /// Kernel → agent → client delays.
    pub latency: Family<LatencyLabels, Histogram>,
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

/// A process's command name and memory cgroup, if `pid` is still the
/// process that started at `start_time`.
fn identity_of(pid: u32, start_time: u64) -> Option<(String, String)> {
    let p = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?;
    let cgroups = p.cgroups().ok();
    let stat = p.stat().ok()?;
    if stat.starttime != start_time {
        return None;
    }
    // the v1 memory hierarchy where there is one, else the v2 one
    let cgroup = cgroups
        .and_then(|c| {
            let all = c.0;
            let v1 = all
                .iter()
                .find(|g| g.controllers.iter().any(|c| c == "memory"));
            v1.or_else(|| all.iter().find(|g| g.hierarchy == 0))
                .map(|g| g.pathname.clone())
        })
        .unwrap_or_default();
    Some((stat.comm, cgroup))
}

impl Live {
    /// Empty.
    pub fn new() -> Self {
        // 10 µs .. ~0.3 s
        let latency: Family<LatencyLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(10e-6, 2.0, 16)));
        // every series exists from the start (at zero), as Prometheus wants
        for stage in ["read", "sent"] {
            for delivery in ["socket", "direct"] {
                let _ = latency.get_or_create(&LatencyLabels { stage, delivery });
            }
        }
        Live {
            rows: BTreeMap::new(),
            ended: VecDeque::new(),
            feed: VecDeque::new(),
            next_seq: 1,
            agent: AgentView::default(),
            latency,
        }
    }

    /// Watched processes, by pid.
    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.values()
    }

    /// The agent's numbers.
    pub fn agent(&self) -> &AgentView {
        &self.agent
    }

    /// Sets the HTTP side's own counters.
    pub fn set_http(&mut self, connections: usize, refused: u64) {
        self.agent.http_connections = connections;
        self.agent.http_refused = refused;
    }

    /// Takes every observation waiting.
    pub fn drain(&mut self, from: &Observations) {
        while let Some(o) = from.try_next() {
            self.apply(o);
        }
        self.agent.observations_dropped = from.dropped();
    }

    /// Applies one observation.
    pub fn apply(&mut self, o: Observation) {
        match o {
            Observation::Watched {
                pid,
                uid,
                start_time,
                thresholds,
                direct,
                rss_bytes,
                t_ns,
            } => {
                if self.rows.len() >= MAX_ROWS {
                    return;
                }
                let (name, cgroup) =
                    identity_of(pid, start_time).unwrap_or_else(|| ("?".into(), String::new()));
                let mut row = Row {
                    pid,
                    name,
                    uid,
                    cgroup,
                    limit: thresholds.limit,
                    levels: Levels::of(&thresholds),
                    rss: rss_bytes,
                    peak: rss_bytes,
                    level: thresholds.level_of(rss_bytes),
                    rate_bytes_per_ms: 0,
                    split: None,
                    counts: Counts::default(),
                    direct,
                    since_ns: t_ns,
                    ended: None,
                    spark: VecDeque::new(),
                };
                row.spark_point(t_ns, rss_bytes);
                self.rows.insert(pid, row);
            }
            Observation::Event {
                msg,
                read_ns,
                sent_ns,
            } => self.event(&msg, read_ns, sent_ns),
            Observation::AgentSignal {
                pid,
                signal: _,
                t_ns,
                rss_bytes,
            } => {
                if let Some(row) = self.rows.get_mut(&pid) {
                    row.counts.kills += 1;
                    let (name, level) = (row.name.clone(), row.level);
                    self.push_feed(FeedItem {
                        kind: "kill",
                        from: level,
                        to: Level::Terminate,
                        rss: rss_bytes,
                        t_ns,
                        ..FeedItem::blank(pid, name)
                    });
                }
            }
            Observation::Accounting { pid, t_ns, split } => self.accounting(pid, t_ns, &split),
            Observation::Ended { pid, how, t_ns } => self.end(pid, how, t_ns),
            Observation::Clients(n) => self.agent.clients = n,
            Observation::Attached(a) => self.agent.attached = a,
        }
        self.agent.watches = self.rows.len();
    }

    fn accounting(&mut self, pid: u32, t_ns: u64, s: &Split) {
        if let Some(row) = self.rows.get_mut(&pid) {
            row.split = Some(SplitView {
                t_ns,
                process: s.process,
                managed: s.managed,
                unmanaged_live: s.unmanaged_live,
                hoarded: s.hoarded,
                non_heap: s.non_heap,
                spilled: s.spilled,
                heap_live: s.managed + s.unmanaged_live,
            });
            row.spark_point(t_ns, s.process);
        }
    }

    fn event(&mut self, m: &EventMessage, read_ns: u64, sent_ns: u64) {
        let Some(row) = self.rows.get_mut(&m.pid) else {
            return;
        };
        let delivery = if row.direct { "direct" } else { "socket" };
        let us = |t: u64| t.saturating_sub(m.t_ns) as f64 / 1e3;
        for (stage, t) in [("read", read_ns), ("sent", sent_ns)] {
            self.latency
                .get_or_create(&LatencyLabels { stage, delivery })
                .observe(us(t) / 1e6);
        }
        row.spark_point(m.t_ns, m.rss_bytes);
        row.peak = row.peak.max(m.peak_rss_bytes);
        let kind = match m.event {
            EventKind::Level => {
                row.counts.level(m.level, m.level > m.prev_level);
                if m.signalled {
                    row.counts.kills += 1;
                }
                row.level = m.level;
                "level"
            }
            EventKind::Spike => {
                row.counts.spikes += 1;
                "spike"
            }
            // the end of the watch says it (with how it ended)
            EventKind::Exit | EventKind::Credentials => return,
        };
        let item = FeedItem {
            kind,
            from: m.prev_level,
            to: m.level,
            rss: m.rss_bytes,
            t_ns: m.t_ns,
            read_us: Some(us(read_ns)),
            sent_us: Some(us(sent_ns)),
            direct: row.direct,
            signalled: m.signalled,
            eta_ms: m.eta_ns.map(|e| e as f64 / 1e6),
            ..FeedItem::blank(m.pid, row.name.clone())
        };
        self.push_feed(item);
    }

    fn end(&mut self, pid: u32, how: Ending, t_ns: u64) {
        let Some(mut row) = self.rows.remove(&pid) else {
            return;
        };
        let killed = row.counts.kills > 0 && how == Ending::Exited;
        let name = match how {
            Ending::Exited if killed => "killed",
            Ending::Exited => "exited",
            Ending::Unwatched => "unwatched",
        };
        row.ended = Some(EndView { how: name, t_ns });
        self.push_feed(FeedItem {
            kind: if how == Ending::Exited {
                "exit"
            } else {
                "unwatched"
            },
            from: row.level,
            to: row.level,
            rss: row.rss,
            t_ns,
            peak: Some(row.peak),
            ..FeedItem::blank(pid, row.name.clone())
        });
        if self.ended.len() == ENDED_ROWS {
            self.ended.pop_back();
        }
        self.ended.push_front(row);
    }

    fn push_feed(&mut self, mut item: FeedItem) {
        item.seq = self.next_seq;
        self.next_seq += 1;
        if self.feed.len() == FEED_CAP {
            self.feed.pop_front();
        }
        self.feed.push_back(item);
    }

    /// Reads the kernel's current numbers of every watched process and the
    /// probe's counters.
    pub fn refresh(&mut self, view: &ProbeView, now_ns: u64) {
        for row in self.rows.values_mut() {
            let Some(w) = view.watch_of(row.pid) else {
                continue;
            };
            // zero until the process's first RSS change after the watch
            if w.state.updates > 0 {
                row.rss = w.state.rss_bytes;
                row.peak = row.peak.max(w.state.peak_rss_bytes);
                row.level = Level::from_raw(w.state.level).unwrap_or(row.level);
                row.rate_bytes_per_ms = w.state.rate_bytes_per_ms;
            }
            let rss = row.rss;
            row.spark_point(now_ns, rss);
        }
        if let Ok(s) = view.stats() {
            self.agent.kernel_events = s.events;
            self.agent.ring_dropped = s.dropped;
        }
    }

    /// The picture for the page: with `full`, whole sparklines.
    pub fn frame(&self, now_ns: u64, wall_offset_ms: f64, full: bool) -> Frame<'_> {
        let rows = self
            .rows
            .values()
            .chain(self.ended.iter())
            .map(|row| RowFrame {
                row,
                spark: row.spark(full),
            })
            .collect();
        let skip = self.feed.len().saturating_sub(FEED_PER_FRAME);
        Frame {
            now_ns,
            wall_offset_ms,
            bucket_ms: SPARK_BUCKET_NS / 1_000_000,
            full,
            agent: self.agent,
            rows,
            feed: self.feed.iter().skip(skip).collect(),
        }
    }
}

impl FeedItem {
    fn blank(pid: u32, name: String) -> FeedItem {
        FeedItem {
            seq: 0,
            pid,
            name,
            kind: "",
            from: Level::Below,
            to: Level::Below,
            rss: 0,
            t_ns: 0,
            read_us: None,
            sent_us: None,
            direct: false,
            signalled: false,
            eta_ms: None,
            peak: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> ThresholdBytes {
        amm_protocol::Fractions::default()
            .to_bytes(1000 << 20)
            .expect("valid")
    }

    fn watched(pid: u32) -> Observation {
        Observation::Watched {
            pid,
            uid: 1000,
            start_time: 0,
            thresholds: thresholds(),
            direct: false,
            rss_bytes: 10 << 20,
            t_ns: 1_000_000_000,
        }
    }

    fn level(pid: u32, from: Level, to: Level, signalled: bool) -> Observation {
        Observation::Event {
            msg: EventMessage {
                event: EventKind::Level,
                t_ns: 2_000_000_000,
                pid,
                rss_bytes: 700 << 20,
                level: to,
                prev_level: from,
                peak_rss_bytes: 950 << 20,
                faults: None,
                rate_bytes_per_ms: 0,
                eta_ns: None,
                foreign: false,
                signalled,
            },
            read_ns: 2_000_100_000,
            sent_ns: 2_000_200_000,
        }
    }

    #[test]
    fn events_count_and_a_kill_at_the_page_ends_as_killed() {
        let mut live = Live::new();
        live.apply(watched(7));
        live.apply(level(7, Level::Below, Level::Spill, false));
        live.apply(level(7, Level::Spill, Level::Terminate, true));
        let row = live.rows().next().expect("row");
        assert_eq!((row.counts.spill, row.counts.terminate), (1, 1));
        assert_eq!(row.counts.kills, 1);
        assert_eq!(row.peak, 950 << 20);
        live.apply(Observation::Ended {
            pid: 7,
            how: Ending::Exited,
            t_ns: 3_000_000_000,
        });
        assert_eq!(live.rows().count(), 0);
        let frame = live.frame(0, 0.0, true);
        assert_eq!(frame.rows.len(), 1);
        assert_eq!(frame.rows[0].row.ended.map(|e| e.how), Some("killed"));
        let kinds: Vec<&str> = frame.feed.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, ["level", "level", "exit"]);
        assert_eq!(frame.feed[0].read_us, Some(100.0));
    }

    #[test]
    fn an_unknown_pid_changes_nothing_and_ended_rows_are_capped() {
        let mut live = Live::new();
        live.apply(level(9, Level::Below, Level::Spill, false));
        assert!(live.frame(0, 0.0, true).feed.is_empty());
        for pid in 1..=(ENDED_ROWS as u32 + 5) {
            live.apply(watched(pid));
            live.apply(Observation::Ended {
                pid,
                how: Ending::Unwatched,
                t_ns: 5,
            });
        }
        assert_eq!(live.frame(0, 0.0, true).rows.len(), ENDED_ROWS);
    }

    #[test]
    fn sparkline_buckets_keep_their_highest_point() {
        let mut live = Live::new();
        live.apply(watched(3));
        let row = live.rows.get_mut(&3).expect("row");
        row.spark_point(SPARK_BUCKET_NS * 4 + 1, 5);
        row.spark_point(SPARK_BUCKET_NS * 4 + 2, 9);
        row.spark_point(SPARK_BUCKET_NS * 4 + 3, 7);
        row.spark_point(SPARK_BUCKET_NS * 5, 1);
        assert_eq!(row.spark(false), [[4, 9], [5, 1]]);
    }
}
