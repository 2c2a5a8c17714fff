//! The leak/hoard verdict of the worker's own accounting, in-process:
//! each tick's split and allocator figures go into a bounded series, and
//! [`Verdicts::verdict`] runs `amm-report`'s analysis on it — the same rules
//! `amm-worker report` applies — so the worker can say in its log (and its
//! metrics) what its unmanaged memory is.

use std::collections::VecDeque;
use std::sync::Mutex;

use amm_report::{Levels, Run, Source, Split, Thresholds, Tick};
use amm_timeline::{Heap, JemallocStats};
use pyo3::prelude::*;

/// Ticks kept (at Dask's 100 ms monitor interval: 20 minutes).
const MAX_TICKS: usize = 12_000;

/// A worker's series of accounting ticks.
#[pyclass(module = "amm_dask._native")]
pub struct Verdicts {
    limit: u64,
    levels: Levels,
    ticks: Mutex<VecDeque<(f64, Tick)>>,
    t0: u64,
}

#[pymethods]
impl Verdicts {
    /// A series for a worker with `limit` and the levels in bytes.
    #[new]
    #[pyo3(signature = (limit, target=None, spill=None, pause=None, terminate=None))]
    fn new(
        limit: u64,
        target: Option<u64>,
        spill: Option<u64>,
        pause: Option<u64>,
        terminate: Option<u64>,
    ) -> Self {
        Self {
            limit,
            levels: Levels {
                target,
                spill,
                pause,
                terminate,
            },
            ticks: Mutex::new(VecDeque::new()),
            t0: crate::monotonic_ns(),
        }
    }

    /// Adds one tick (bytes); `jemalloc` carries (allocated, active,
    /// resident, dirty, muzzy) when jemalloc serves the process.
    #[pyo3(signature = (t_ns, process, managed, unmanaged_live, hoarded, non_heap, spilled, paused, jemalloc=None))]
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        t_ns: u64,
        process: u64,
        managed: u64,
        unmanaged_live: u64,
        hoarded: u64,
        non_heap: u64,
        spilled: u64,
        paused: bool,
        jemalloc: Option<(u64, u64, u64, u64, u64)>,
    ) {
        let heap = jemalloc.map(|(allocated, active, resident, dirty, muzzy)| {
            Heap::Jemalloc(JemallocStats {
                allocated,
                active,
                resident,
                dirty_bytes: dirty,
                muzzy_bytes: muzzy,
                ..JemallocStats::default()
            })
        });
        let t = t_ns.saturating_sub(self.t0) as f64 / 1e9;
        let tick = Tick {
            process,
            split: Some(Split {
                process,
                managed,
                unmanaged_live,
                hoarded,
                non_heap,
                spilled,
                unmanaged_recent: 0,
            }),
            heap,
            paused: Some(paused),
            ..Tick::default()
        };
        let mut q = self.ticks.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_TICKS {
            q.pop_front();
        }
        q.push_back((t, tick));
    }

    /// Ticks held.
    fn __len__(&self) -> usize {
        self.ticks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// `(kind, headline, also)` of the series so far.
    fn verdict(&self, py: Python<'_>) -> (String, String, Vec<String>) {
        let ticks: Vec<(f64, Tick)> = self
            .ticks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let (limit, levels) = (self.limit, self.levels);
        py.detach(move || {
            let mut run = Run::new(Source::AgentTimeline, Some(limit), levels);
            for (t, tick) in ticks {
                run.push_tick(t, tick);
            }
            let r = amm_report::analyze(&run, &Thresholds::default());
            (
                r.verdict.kind.name().to_string(),
                r.verdict.headline,
                r.verdict.also,
            )
        })
    }
}
