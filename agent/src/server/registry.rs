//! The registry of watched processes: who registered each, its pidfd, its
//! timeline; the watches that ended; the routing of kernel events to the
//! client that registered the process.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use amm_ebpf::{EventKind, Level};
use amm_protocol::{EventMessage, Sample, SampleKind, ServerMessage, WatchStatus};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::quota::Quotas;
use super::session::ClientHandle;
use super::{ServerConfig, lock};
use crate::clock::monotonic_ns;
use crate::identity;
use crate::observe::{Ending, Observation, Observer};
use crate::probe::Probe;

/// Samples kept per watched process.
pub const TIMELINE_CAP: usize = 4096;
/// Ended watches kept per uid (the nanny's terminate attribution and
/// `report --agent` read them).
pub const ENDED_PER_UID: usize = 32;
/// Ended watches kept in all.
pub const ENDED_TOTAL: usize = 256;

/// One watched process.
pub(super) struct WatchEntry {
    pub client: Arc<ClientHandle>,
    /// The uid of the client that registered it: who may see it.
    pub owner_uid: u32,
    pub exit_task: Option<AbortHandle>,
    /// Pins the process; the agent's terminate signal goes through it.
    pub pidfd: Arc<OwnedFd>,
    /// Signal the agent sends itself at terminate (`terminate_by: agent`).
    pub agent_signal: Option<i32>,
    pub limit: u64,
    pub timeline: VecDeque<Sample>,
}

impl WatchEntry {
    pub fn record(&mut self, sample: Sample) {
        if self.timeline.len() == TIMELINE_CAP {
            self.timeline.pop_front();
        }
        self.timeline.push_back(sample);
    }

    /// What `status` shows of a watch that has ended (with its whole
    /// timeline; `status` trims it).
    fn ended(self, pid: u32, faults: u64) -> WatchStatus {
        let last = self.timeline.back();
        let peak = self
            .timeline
            .iter()
            .filter_map(|s| match s.what {
                SampleKind::Exit { peak_rss_bytes }
                | SampleKind::Unwatched { peak_rss_bytes }
                | SampleKind::Credentials { peak_rss_bytes } => Some(peak_rss_bytes),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        WatchStatus {
            pid,
            owner_uid: Some(self.owner_uid),
            limit_bytes: self.limit,
            rss_bytes: last.map_or(0, |s| s.rss_bytes),
            peak_rss_bytes: peak,
            level: Level::Below,
            faults,
            rate_bytes_per_ms: 0,
            timeline_len: self.timeline.len(),
            timeline: self.timeline.into(),
            thresholds: None,
        }
    }
}

/// A watch that ended, as `status` and `timeline` still show it.
pub(super) struct EndedWatch {
    /// Order of ending (the status cursor of ended watches).
    pub seq: u64,
    pub owner_uid: u32,
    pub status: WatchStatus,
}

/// The ended watches, oldest first, at most [`ENDED_PER_UID`] per uid and
/// [`ENDED_TOTAL`] in all.
#[derive(Default)]
pub(super) struct Ended {
    pub list: VecDeque<EndedWatch>,
    next_seq: u64,
}

impl Ended {
    fn push(&mut self, owner_uid: u32, status: WatchStatus) {
        let mine = self
            .list
            .iter()
            .filter(|e| e.owner_uid == owner_uid)
            .count();
        if mine >= ENDED_PER_UID
            && let Some(i) = self.list.iter().position(|e| e.owner_uid == owner_uid)
        {
            self.list.remove(i);
        }
        if self.list.len() >= ENDED_TOTAL {
            self.list.pop_front();
        }
        self.list.push_back(EndedWatch {
            seq: self.next_seq,
            owner_uid,
            status,
        });
        self.next_seq += 1;
    }
}

/// The sample a kernel event leaves in a timeline.
fn sample_of(m: &EventMessage) -> Sample {
    let what = match m.event {
        EventKind::Level => SampleKind::Level {
            from: m.prev_level,
            to: m.level,
            foreign: m.foreign,
            signalled: m.signalled,
        },
        EventKind::Spike => SampleKind::Spike {
            eta_ns: m.eta_ns.unwrap_or(0),
            rate_bytes_per_ms: m.rate_bytes_per_ms,
        },
        EventKind::Exit => SampleKind::Exit {
            peak_rss_bytes: m.peak_rss_bytes,
        },
        EventKind::Credentials => SampleKind::Credentials {
            peak_rss_bytes: m.peak_rss_bytes,
        },
    };
    Sample {
        t_ns: m.t_ns,
        rss_bytes: m.rss_bytes,
        what,
    }
}

/// Everything the server's tasks share.
pub(super) struct Shared {
    pub probe: Mutex<Probe>,
    pub watches: Mutex<HashMap<u32, WatchEntry>>,
    pub ended: Mutex<Ended>,
    pub config: ServerConfig,
    pub next_client: AtomicU64,
    pub quotas: Arc<Quotas>,
    /// The dashboard's feed, when `--http` is on.
    observer: Option<Observer>,
}

impl Shared {
    pub fn new(config: ServerConfig, probe: Probe, observer: Option<Observer>) -> Self {
        Self {
            probe: Mutex::new(probe),
            watches: Mutex::new(HashMap::new()),
            ended: Mutex::new(Ended::default()),
            config,
            next_client: AtomicU64::new(1),
            quotas: Arc::default(),
            observer,
        }
    }

    /// Tells the dashboard (if any) what happened; never waits.
    pub fn observe(&self, what: impl FnOnce() -> Observation) {
        if let Some(o) = &self.observer {
            o.send(what());
        }
    }

    /// Tells the dashboard how many clients are connected.
    pub fn observe_clients(&self) {
        self.observe(|| Observation::Clients(self.quotas.clients_seen_by(0)));
    }

    /// Attaches the programs while something is watched and detaches them
    /// when nothing is: a node with no registered worker pays nothing.
    pub fn follow_watches(&self, watched: usize) {
        let mut probe = lock(&self.probe);
        let r = if watched == 0 && probe.is_attached() {
            info!("nothing watched: detaching the probe");
            probe.detach()
        } else if watched > 0 && !probe.is_attached() {
            info!("first watch: attaching the probe");
            probe.attach()
        } else {
            Ok(())
        };
        if let Err(e) = r {
            warn!("cannot attach or detach the probe: {e}");
        }
        let attached = probe.is_attached();
        self.observe(|| Observation::Attached(attached));
    }

    /// Routes one kernel event to the client that registered its pid.
    pub fn dispatch(&self, raw: amm_ebpf::Event) {
        let read_ns = monotonic_ns();
        let Some(msg) = EventMessage::from_kernel(&raw) else {
            warn!(?raw, "unknown event record from the probe");
            return;
        };
        let pid = msg.pid;
        let client = match msg.event {
            EventKind::Exit | EventKind::Credentials => self.end_watch(&msg, read_ns),
            EventKind::Level | EventKind::Spike => self.note_event(&msg),
        };
        let Some(client) = client else { return };
        debug!(
            pid,
            event = ?msg.event,
            level = %msg.level,
            rss = msg.rss_bytes,
            delay_us = monotonic_ns().saturating_sub(msg.t_ns) / 1000,
            "event"
        );
        let observed = self.observer.is_some().then(|| msg.clone());
        client.send(ServerMessage::Event(msg));
        if let Some(msg) = observed {
            let sent_ns = monotonic_ns();
            self.observe(|| Observation::Event {
                msg,
                read_ns,
                sent_ns,
            });
        }
    }

    /// Records a level or spike event; signals through the pidfd for
    /// `terminate_by: agent`. Returns whom to tell.
    fn note_event(&self, msg: &EventMessage) -> Option<Arc<ClientHandle>> {
        let mut watches = lock(&self.watches);
        let entry = watches.get_mut(&msg.pid)?;
        entry.record(sample_of(msg));
        if msg.event == EventKind::Level
            && msg.level == Level::Terminate
            && msg.level > msg.prev_level
            && let Some(sig) = entry.agent_signal
        {
            let t_ns = monotonic_ns();
            match identity::pidfd_send_signal(&entry.pidfd, sig) {
                Ok(()) => {
                    info!(
                        pid = msg.pid,
                        signal = sig,
                        "terminate: signalled through the pidfd"
                    );
                    self.observe(|| Observation::AgentSignal {
                        pid: msg.pid,
                        signal: sig,
                        t_ns,
                        rss_bytes: msg.rss_bytes,
                    });
                    entry.record(Sample {
                        t_ns,
                        rss_bytes: msg.rss_bytes,
                        what: SampleKind::AgentSignal { signal: sig },
                    });
                }
                Err(e) => warn!(pid = msg.pid, "cannot signal through the pidfd: {e}"),
            }
        }
        Some(entry.client.clone())
    }

    /// The kernel ended a watch (exit, or a credentials change): drop it and
    /// keep it among the ended. Returns whom to tell.
    fn end_watch(&self, msg: &EventMessage, read_ns: u64) -> Option<Arc<ClientHandle>> {
        let pid = msg.pid;
        let mut watches = lock(&self.watches);
        let mut entry = watches.remove(&pid)?;
        if let Some(t) = entry.exit_task.take() {
            t.abort();
        }
        entry.record(sample_of(msg));
        if let Err(e) = lock(&self.probe).unwatch(pid) {
            warn!(pid, "cannot clear the watch after it ended: {e}");
        }
        self.follow_watches(watches.len());
        drop(watches);
        if msg.event == EventKind::Credentials {
            warn!(
                pid,
                "watched process changed credentials (setuid/setgid or file-capability exec): watch ended, no signal will be sent"
            );
        } else {
            info!(
                pid,
                peak = msg.peak_rss_bytes,
                faults = msg.faults,
                "watched process exited"
            );
        }
        let client = entry.client.clone();
        let owner = entry.owner_uid;
        self.keep_ended(owner, entry.ended(pid, msg.faults.unwrap_or(0)));
        // a credentials change ends the watch while the process lives on
        let how = match msg.event {
            EventKind::Credentials => Ending::Unwatched,
            _ => Ending::Exited,
        };
        self.observe(|| Observation::Ended {
            pid,
            how,
            t_ns: read_ns,
        });
        Some(client)
    }

    fn keep_ended(&self, owner_uid: u32, w: WatchStatus) {
        lock(&self.ended).push(owner_uid, w);
    }

    /// Records a worker's accounting (with its allocator's statistics, or a
    /// purge it ran: `(rss, sample)` pairs of one instant) in its timeline,
    /// if `client` owns it.
    pub fn accounting(&self, client: u64, pid: u32, t_ns: u64, samples: Vec<(u64, SampleKind)>) {
        let mut watches = lock(&self.watches);
        if let Some(entry) = watches.get_mut(&pid)
            && entry.client.id == client
        {
            for (rss_bytes, what) in samples {
                if let SampleKind::Accounting(split) = what {
                    self.observe(|| Observation::Accounting { pid, t_ns, split });
                }
                entry.record(Sample {
                    t_ns,
                    rss_bytes,
                    what,
                });
            }
        }
    }

    /// Watches registered by `uid`.
    pub fn watches_of_uid(&self, uid: u32) -> usize {
        lock(&self.watches)
            .values()
            .filter(|e| e.owner_uid == uid)
            .count()
    }

    /// True when `client` has at least one watch.
    pub fn has_watches(&self, client: u64) -> bool {
        lock(&self.watches).values().any(|e| e.client.id == client)
    }

    /// Removes a watch of `client` (all of them with `pid == None`).
    pub fn forget(&self, client: u64, pid: Option<u32>) -> Vec<u32> {
        let mut watches = lock(&self.watches);
        let pids: Vec<u32> = watches
            .iter()
            .filter(|(p, e)| e.client.id == client && pid.is_none_or(|x| x == **p))
            .map(|(p, _)| *p)
            .collect();
        let mut ended = Vec::with_capacity(pids.len());
        for p in &pids {
            let state = lock(&self.probe).watch_of(*p).map(|w| w.state);
            if let Some(mut entry) = watches.remove(p) {
                if let Some(t) = entry.exit_task.take() {
                    t.abort();
                }
                if let Some(st) = state {
                    entry.record(Sample {
                        t_ns: monotonic_ns(),
                        rss_bytes: st.rss_bytes,
                        what: SampleKind::Unwatched {
                            peak_rss_bytes: st.peak_rss_bytes,
                        },
                    });
                }
                let owner = entry.owner_uid;
                self.keep_ended(owner, entry.ended(*p, 0));
                ended.push(*p);
            }
            if let Err(e) = lock(&self.probe).unwatch(*p) {
                warn!(pid = p, "cannot remove the watch: {e}");
            }
        }
        // the probe's state first, so an observer that sees the watch count
        // drop also sees the probe detached (as end_watch does)
        self.follow_watches(watches.len());
        for p in ended {
            self.observe(|| Observation::Ended {
                pid: p,
                how: Ending::Unwatched,
                t_ns: monotonic_ns(),
            });
        }
        pids
    }

    /// The process behind a watch exited but the ring buffer said nothing
    /// (it was full, or the exit raced the registration): close the watch
    /// from the map's last state. The kernel never matched anything to it
    /// meanwhile (the watch is bound to the process, not the pid number).
    pub fn exited_without_event(&self, pid: u32, client: u64, faults: Option<u64>) {
        let mut watches = lock(&self.watches);
        if watches.get(&pid).is_none_or(|e| e.client.id != client) {
            return;
        }
        let Some(mut entry) = watches.remove(&pid) else {
            return;
        };
        let left = watches.len();
        drop(watches);
        let mut probe = lock(&self.probe);
        let state = probe.watch_of(pid).map(|w| w.state).unwrap_or_default();
        if let Err(e) = probe.unwatch(pid) {
            warn!(pid, "cannot remove the watch: {e}");
        }
        drop(probe);
        self.follow_watches(left);
        warn!(pid, "watched process exited without a kernel exit event");
        let msg = crate::probe::exit_from_state(pid, &state, faults, monotonic_ns());
        entry.record(sample_of(&msg));
        let client = entry.client.clone();
        let owner = entry.owner_uid;
        self.keep_ended(owner, entry.ended(pid, faults.unwrap_or(0)));
        self.observe(|| Observation::Ended {
            pid,
            how: Ending::Exited,
            t_ns: msg.t_ns,
        });
        client.send(ServerMessage::Event(msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(pid: u32) -> WatchStatus {
        WatchStatus {
            pid,
            owner_uid: None,
            limit_bytes: 1,
            rss_bytes: 0,
            peak_rss_bytes: 0,
            level: Level::Below,
            faults: 0,
            rate_bytes_per_ms: 0,
            timeline: Vec::new(),
            timeline_len: 0,
            thresholds: None,
        }
    }

    #[test]
    fn one_user_s_churn_does_not_push_out_another_s_ended_watches() {
        let mut e = Ended::default();
        e.push(1000, ended(1));
        for pid in 2..(2 + 10 * ENDED_PER_UID as u32) {
            e.push(2000, ended(pid));
        }
        assert!(
            e.list
                .iter()
                .any(|w| w.owner_uid == 1000 && w.status.pid == 1)
        );
        assert_eq!(
            e.list.iter().filter(|w| w.owner_uid == 2000).count(),
            ENDED_PER_UID
        );
        let seqs: Vec<u64> = e.list.iter().map(|w| w.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first");
    }
}
