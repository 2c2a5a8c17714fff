//! The `status` and `timeline` answers: paged so no answer outgrows a frame
//! however many watches the agent holds, and filtered so a client that is
//! not root sees only the watches of its own uid.

use amm_ebpf::Level;
use amm_protocol::{
    AgentStatus, Denial, MAX_FRAME, MapEntries, STATUS_SAMPLES, Sample, ServerMessage,
    TIMELINE_PAGE, ThresholdBytes, WatchStatus,
};
use serde::Serialize;

use super::lock;
use super::registry::Shared;
use crate::identity;

/// Bytes of a frame kept for everything but the page's entries (counters,
/// cursor, JSON punctuation).
const PAGE_OVERHEAD: usize = 1024;

/// Cursors of ended watches start here; those of live watches are their
/// pids (below 2^32).
const ENDED_CURSOR: u64 = 1 << 32;

/// Who asks: root sees everything, anyone else their own uid's watches.
#[derive(Debug, Clone, Copy)]
pub(super) struct Viewer {
    pub uid: u32,
}

impl Viewer {
    fn sees(self, owner_uid: u32) -> bool {
        self.uid == 0 || self.uid == owner_uid
    }
}

/// The newest samples a status answer carries.
fn newest<'a>(samples: impl ExactSizeIterator<Item = &'a Sample>) -> Vec<Sample> {
    let skip = samples.len().saturating_sub(STATUS_SAMPLES);
    samples.skip(skip).cloned().collect()
}

fn json_len<T: Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len() + 1)
}

/// Takes items while their JSON fits `budget` bytes (always at least one:
/// every item the agent pages is far below a frame).
fn fit<T: Serialize>(items: impl Iterator<Item = T>, budget: usize) -> (Vec<T>, bool) {
    let mut out = Vec::new();
    let mut used = 0;
    let mut items = items.peekable();
    while let Some(item) = items.peek() {
        let len = json_len(item);
        if !out.is_empty() && used + len > budget {
            return (out, true);
        }
        used += len;
        out.extend(items.next());
    }
    (out, false)
}

/// A live watch as status shows it, or `None` if it ended meanwhile.
struct Live {
    pid: u32,
    owner_uid: u32,
    limit: u64,
    timeline: Vec<Sample>,
    timeline_len: usize,
}

impl Shared {
    /// One page of the agent's state for `viewer`, after `after`.
    pub fn status_page(&self, viewer: Viewer, after: Option<u64>, pid: Option<u32>) -> AgentStatus {
        let wanted = |p: u32, owner: u32| viewer.sees(owner) && pid.is_none_or(|x| x == p);
        let mut live: Vec<Live> = lock(&self.watches)
            .iter()
            .filter(|(p, e)| wanted(**p, e.owner_uid))
            .map(|(p, e)| Live {
                pid: *p,
                owner_uid: e.owner_uid,
                limit: e.limit,
                timeline: newest(e.timeline.iter()),
                timeline_len: e.timeline.len(),
            })
            .collect();
        live.sort_by_key(|l| l.pid);
        let ended: Vec<(u64, WatchStatus)> = lock(&self.ended)
            .list
            .iter()
            .filter(|e| wanted(e.status.pid, e.owner_uid))
            .map(|e| {
                let status = WatchStatus {
                    timeline: newest(e.status.timeline.iter()),
                    ..e.status.clone()
                };
                (ENDED_CURSOR + e.seq, status)
            })
            .collect();
        let (total_watches, total_ended) = (live.len(), ended.len());
        let first = after.map_or(0, |a| a.saturating_add(1));
        let entries = live
            .into_iter()
            .filter(|l| u64::from(l.pid) >= first)
            .filter_map(|l| self.live_status(l).map(|w| (u64::from(w.pid), w)))
            .chain(ended.into_iter().filter(|(k, _)| *k >= first));
        let (page, more) = fit(entries, MAX_FRAME - PAGE_OVERHEAD);
        let next = if more {
            page.last().map(|(k, _)| *k)
        } else {
            None
        };
        let (mut watches, mut ended) = (Vec::new(), Vec::new());
        for (key, w) in page {
            if key < ENDED_CURSOR {
                watches.push(w);
            } else {
                ended.push(w);
            }
        }
        let probe = lock(&self.probe);
        let map_entries = probe
            .entry_counts()
            .map(|(watches, mm_owner, client_rings, bits)| MapEntries {
                watches,
                mm_owner,
                client_rings,
                bits,
            })
            .unwrap_or_default();
        let stats = probe.stats().unwrap_or_default();
        AgentStatus {
            clients: self.quotas.clients_seen_by(viewer.uid),
            watches,
            ended,
            total_watches,
            total_ended,
            next,
            map_entries,
            events: stats.events,
            dropped: stats.dropped,
        }
    }

    /// The kernel's view of a live watch.
    fn live_status(&self, l: Live) -> Option<WatchStatus> {
        let w = lock(&self.probe).watch_of(l.pid)?;
        Some(WatchStatus {
            pid: l.pid,
            owner_uid: Some(l.owner_uid),
            limit_bytes: l.limit,
            rss_bytes: w.state.rss_bytes,
            peak_rss_bytes: w.state.peak_rss_bytes,
            level: Level::from_raw(w.state.level).unwrap_or(Level::Below),
            faults: identity::ProcInfo::read(l.pid).map_or(0, |i| i.faults),
            rate_bytes_per_ms: w.state.rate_bytes_per_ms,
            timeline: l.timeline,
            timeline_len: l.timeline_len,
            thresholds: Some(ThresholdBytes {
                limit: w.config.limit_bytes,
                rearm: w.config.rearm_bytes,
                spill: w.config.spill_bytes,
                pause: w.config.pause_bytes,
                terminate: w.config.terminate_bytes,
            }),
        })
    }

    /// A page of the timeline of `pid` (watched, or recently ended), if
    /// `viewer` may see it.
    pub fn timeline_page(
        &self,
        viewer: Viewer,
        pid: u32,
        from: usize,
        max: usize,
    ) -> ServerMessage {
        let max = max.clamp(1, TIMELINE_PAGE);
        let page = |all: &mut dyn ExactSizeIterator<Item = &Sample>| {
            let total = all.len();
            let (samples, _) = fit(all.skip(from).take(max).cloned(), MAX_FRAME - PAGE_OVERHEAD);
            ServerMessage::Timeline {
                pid,
                from,
                total,
                samples,
            }
        };
        if let Some(e) = lock(&self.watches).get(&pid)
            && viewer.sees(e.owner_uid)
        {
            return page(&mut e.timeline.iter());
        }
        let ended = lock(&self.ended);
        if let Some(w) = ended
            .list
            .iter()
            .rev()
            .find(|w| w.status.pid == pid && viewer.sees(w.owner_uid))
        {
            return page(&mut w.status.timeline.iter());
        }
        // the same answer whether nothing is held or it is another user's
        ServerMessage::Refused {
            pid,
            reason: "the agent holds no timeline of yours for this pid".into(),
            code: Some(Denial::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_fit_their_budget_and_say_when_more_remain() {
        let items: Vec<String> = (0..100).map(|i| format!("{i:0>50}")).collect();
        let (page, more) = fit(items.iter(), 1000);
        assert!(more);
        assert!(page.len() < 100 && page.len() > 10);
        assert!(page.iter().map(json_len).sum::<usize>() <= 1000);
        let (all, more) = fit(items.iter(), usize::MAX);
        assert!(!more);
        assert_eq!(all.len(), 100);
        let (one, _) = fit(std::iter::once("x".repeat(5000)), 10);
        assert_eq!(one.len(), 1, "one item is always taken");
    }
}
