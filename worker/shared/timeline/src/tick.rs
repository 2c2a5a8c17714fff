//! One sample of a process: what every writer measures, each part optional
//! except RSS, because a kernel-only writer (`amm-agent watch`) knows RSS
//! and faults, a foreign process on the preload library adds the
//! allocator's statistics, and amm-worker knows everything.

use serde::{Deserialize, Serialize};

use crate::heap::Heap;
use crate::split::Split;

/// One sample. In JSON the split's parts are top-level keys of the line
/// (`"process"`, `"managed"`, ...) as amm has always written them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "TickWire", into = "TickWire")]
pub struct Tick {
    /// RSS as the kernel counts it (file + anon + shmem), bytes.
    pub process: u64,
    /// Anonymous RSS, bytes.
    pub rss_anon: Option<u64>,
    /// File-backed and shared RSS, bytes.
    pub rss_file_shmem: Option<u64>,
    /// The accounting split, when the writer could make it (amm-worker, the
    /// Dask plugin, a supervisor reading the preload's record). Its
    /// `process` is this tick's `process`.
    pub split: Option<Split>,
    /// The allocator's live bytes, when known.
    pub heap_live: Option<u64>,
    /// The allocator's resident bytes, when known.
    pub allocator_resident: Option<u64>,
    /// How far RSS moved while the allocator was read: the split is exact
    /// only to within this, bytes.
    pub rss_moved: Option<u64>,
    /// The memory limit the writer works to, bytes.
    pub limit: Option<u64>,
    /// New tasks held back at this tick.
    pub paused: Option<bool>,
    /// Tasks started so far.
    pub tasks_started: Option<u64>,
    /// Tasks finished so far.
    pub tasks_finished: Option<u64>,
    /// The SpillBuffer's counters.
    pub spill: Option<SpillStats>,
    /// What the process's memory cgroup is charged.
    pub cgroup: Option<CgroupUsage>,
    /// The allocator's statistics.
    pub heap: Option<Heap>,
    /// minflt + majflt of the process so far.
    pub faults: Option<u64>,
    /// The kernel's exact peak RSS so far (amm-agent's BPF map, or
    /// `VmHWM`), bytes: spikes between two ticks are in it.
    pub peak_rss_bytes: Option<u64>,
    /// How old `heap` was when the tick was written, ms (a foreign process
    /// publishes its statistics from its own thread; 0 or absent when read
    /// in-process).
    pub stats_age_ms: Option<u64>,
}

impl Tick {
    /// A tick of RSS alone.
    pub fn rss(process: u64) -> Tick {
        Tick {
            process,
            ..Tick::default()
        }
    }

    /// The split: the one written, else the one the allocator's statistics
    /// give with nothing managed (a program amm did not write), else none.
    pub fn split_or_derived(&self) -> Option<Split> {
        if let Some(s) = self.split {
            return Some(s);
        }
        let h = self.heap.as_ref()?;
        Some(Split::of(self.process, 0, h.live(), h.resident()))
    }

    /// Whether the tick says new tasks were held back.
    pub fn is_paused(&self) -> bool {
        self.paused.unwrap_or(false)
    }
}

/// The SpillBuffer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpillStats {
    /// Bytes (`sizeof`) of values in memory.
    pub managed: u64,
    /// Bytes (`sizeof`) of values only on disk.
    pub spilled: u64,
    /// Bytes of files on disk (spilled values and clean copies).
    pub disk: u64,
    /// Values in the buffer.
    pub keys: u64,
    /// Values written to disk so far.
    pub spill_count: u64,
    /// Bytes (`sizeof`) moved out of memory so far.
    pub spilled_bytes_total: u64,
    /// Bytes written to files so far.
    pub written_bytes_total: u64,
    /// Values read back so far.
    pub unspill_count: u64,
    /// Bytes (`sizeof`) read back so far.
    pub unspilled_bytes_total: u64,
    /// Evictions that failed (disk full, max-spill, I/O).
    pub spill_failures: u64,
    /// Time spent writing, microseconds.
    pub write_us: u64,
    /// Time spent reading, microseconds.
    pub read_us: u64,
}

/// What the cgroup is charged for right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CgroupUsage {
    /// `memory.usage_in_bytes` (v1) or `memory.current` (v2).
    pub usage: u64,
    /// Page cache charged to the cgroup (`total_cache`/`cache` in v1,
    /// `file` in v2).
    pub file: u64,
    /// OOM kills in this cgroup so far (`oom_kill` of `memory.oom_control` /
    /// `memory.events`), when the kernel reports it.
    pub oom_kills: u64,
}

/// The tick as it is on the line: flat, every part optional.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct TickWire {
    process: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    managed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unmanaged_live: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hoarded: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    non_heap: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spilled: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unmanaged_recent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_error: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_anon: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_file_shmem: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heap_live: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocator_resident: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_moved: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    paused: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tasks_started: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tasks_finished: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spill: Option<SpillStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<CgroupUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heap: Option<Heap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats_age_ms: Option<u64>,
}

impl From<TickWire> for Tick {
    fn from(w: TickWire) -> Tick {
        // the split needs its four parts; spilled and recent may be absent
        let split = match (w.managed, w.unmanaged_live, w.hoarded, w.non_heap) {
            (Some(managed), Some(unmanaged_live), Some(hoarded), Some(non_heap)) => Some(Split {
                process: w.process,
                managed,
                unmanaged_live,
                hoarded,
                non_heap,
                spilled: w.spilled.unwrap_or(0),
                unmanaged_recent: w.unmanaged_recent.unwrap_or(0),
            }),
            _ => None,
        };
        Tick {
            process: w.process,
            rss_anon: w.rss_anon,
            rss_file_shmem: w.rss_file_shmem,
            split,
            heap_live: w.heap_live,
            allocator_resident: w.allocator_resident,
            rss_moved: w.rss_moved,
            limit: w.limit,
            paused: w.paused,
            tasks_started: w.tasks_started,
            tasks_finished: w.tasks_finished,
            spill: w.spill,
            cgroup: w.cgroup,
            heap: w.heap,
            faults: w.faults,
            peak_rss_bytes: w.peak_rss_bytes,
            stats_age_ms: w.stats_age_ms,
        }
    }
}

impl From<Tick> for TickWire {
    fn from(t: Tick) -> TickWire {
        let s = t.split;
        TickWire {
            process: t.process,
            managed: s.map(|s| s.managed),
            unmanaged_live: s.map(|s| s.unmanaged_live),
            hoarded: s.map(|s| s.hoarded),
            non_heap: s.map(|s| s.non_heap),
            spilled: s.map(|s| s.spilled),
            unmanaged_recent: s.map(|s| s.unmanaged_recent),
            identity_error: s.map(|s| {
                Split {
                    process: t.process,
                    ..s
                }
                .identity_error()
            }),
            rss_anon: t.rss_anon,
            rss_file_shmem: t.rss_file_shmem,
            heap_live: t.heap_live,
            allocator_resident: t.allocator_resident,
            rss_moved: t.rss_moved,
            limit: t.limit,
            fraction: match (t.limit, t.process) {
                (Some(l), p) if l > 0 => Some(p as f64 / l as f64),
                _ => None,
            },
            paused: t.paused,
            tasks_started: t.tasks_started,
            tasks_finished: t.tasks_finished,
            spill: t.spill,
            cgroup: t.cgroup,
            heap: t.heap,
            faults: t.faults,
            peak_rss_bytes: t.peak_rss_bytes,
            stats_age_ms: t.stats_age_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heap::JemallocStats;

    #[test]
    fn the_split_is_flat_on_the_line_and_whole_in_the_type() {
        let t = Tick {
            process: 100,
            split: Some(Split {
                process: 100,
                managed: 10,
                unmanaged_live: 20,
                hoarded: 30,
                non_heap: 40,
                spilled: 5,
                unmanaged_recent: 1,
            }),
            limit: Some(1000),
            heap: Some(Heap::Jemalloc(JemallocStats::default())),
            ..Tick::default()
        };
        let v = serde_json::to_value(&t).expect("json");
        assert_eq!(v["managed"], 10);
        assert_eq!(v["identity_error"], 0);
        assert_eq!(v["fraction"], 0.1);
        assert_eq!(v["heap"]["allocator"], "jemalloc");
        assert!(v.get("faults").is_none(), "absent parts are left out");
        let back: Tick = serde_json::from_value(v).expect("back");
        assert_eq!(back, t);
    }

    #[test]
    fn a_tick_without_all_four_parts_has_no_split() {
        let t: Tick =
            serde_json::from_str(r#"{"process":7,"managed":1,"hoarded":2}"#).expect("tick");
        assert_eq!(t.process, 7);
        assert_eq!(t.split, None);
        assert_eq!(t.split_or_derived(), None);
    }

    #[test]
    fn a_foreign_tick_with_allocator_statistics_derives_its_split() {
        let t = Tick {
            process: 1000,
            heap: Some(Heap::Jemalloc(JemallocStats {
                allocated: 400,
                resident: 700,
                ..JemallocStats::default()
            })),
            stats_age_ms: Some(40),
            ..Tick::default()
        };
        let s = t.split_or_derived().expect("split");
        assert_eq!(
            (s.managed, s.unmanaged_live, s.hoarded, s.non_heap),
            (0, 400, 300, 300)
        );
    }
}
