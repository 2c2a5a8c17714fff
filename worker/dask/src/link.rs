//! The worker's registration with amm-agent, for Python.
//!
//! [`AgentLink`] wraps [`amm_protocol::link::Link`] (direct ring buffer,
//! kernel kill at the terminate page, re-registration after the agent comes
//! back). Its thread acts first — closes or opens the [`crate::gate`] — and
//! then queues the event as one JSON line and writes a byte to a socket
//! whose other end the Python side watches from Dask's event loop
//! (`fileno()`), so the loop wakes for it without polling.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amm_ebpf::{EventKind, Level};
use amm_protocol::link::{Link, LinkConfig, LinkEvent};
use amm_protocol::{
    AllocatorKind, Fractions, HeapSample, PurgeSample, Registration, Split, TerminateBy,
};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::json;

use crate::gate;

/// Most events kept for the loop while it is busy (older ones are dropped
/// and counted).
const QUEUE_CAP: usize = 4096;

struct Shared {
    queue: Mutex<VecDeque<String>>,
    dropped: std::sync::atomic::AtomicU64,
    wake: UnixStream,
}

impl Shared {
    fn push(&self, line: serde_json::Value) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= QUEUE_CAP {
            q.pop_front();
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        q.push_back(line.to_string());
        drop(q);
        let _ = (&self.wake).write(&[1]);
    }
}

/// A live registration of this process with amm-agent.
#[pyclass(module = "amm_dask._native")]
pub struct AgentLink {
    link: Mutex<Option<Link>>,
    shared: Arc<Shared>,
    wake_rx: UnixStream,
}

/// What the link thread does with each report: act, then queue.
fn on_event(shared: &Shared, e: LinkEvent) {
    let now = crate::monotonic_ns();
    let line = match e {
        LinkEvent::Connected {
            thresholds,
            rss_bytes,
        } => json!({"kind": "connected", "rss": rss_bytes, "limit": thresholds.limit,
                    "target": thresholds.rearm, "spill": thresholds.spill,
                    "pause": thresholds.pause, "terminate": thresholds.terminate}),
        LinkEvent::Lost(reason) => json!({"kind": "lost", "reason": reason}),
        LinkEvent::Refused(reason) => json!({"kind": "refused", "reason": reason}),
        LinkEvent::Event(m) => {
            act(&m);
            json!({"kind": "event", "event": m.event, "level": m.level,
                   "prev_level": m.prev_level, "rss": m.rss_bytes, "t_ns": m.t_ns,
                   "seen_ns": now, "rate_bytes_per_ms": m.rate_bytes_per_ms,
                   "eta_ns": m.eta_ns, "signalled": m.signalled,
                   "peak": m.peak_rss_bytes})
        }
    };
    shared.push(line);
}

/// The gate's part of a kernel event: pause and terminate close it, a
/// spike closes it until the predicted crossing, the fall below target
/// opens it.
fn act(m: &amm_protocol::EventMessage) {
    match m.event {
        EventKind::Level if m.level > m.prev_level && m.level >= Level::Pause => {
            gate::close("the kernel reported the pause level", None)
        }
        EventKind::Level if m.level == Level::Below => gate::open(),
        EventKind::Spike => {
            let eta_ms = m.eta_ns.unwrap_or(0) / 1_000_000;
            gate::close(
                "the kernel predicts the terminate level (spike alarm)",
                Some(eta_ms.clamp(10, 1000)),
            )
        }
        _ => {}
    }
}

#[pymethods]
impl AgentLink {
    /// Starts registering this process (`pid`) with the agent on `socket`:
    /// `limit` bytes, the four fractions (None: off), the kernel's signal
    /// at the terminate page (None: events only).
    #[new]
    #[pyo3(signature = (socket, pid, limit, target, spill, pause, terminate,
                        terminate_signal=Some(9), spike_horizon_ms=None, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        socket: PathBuf,
        pid: u32,
        limit: u64,
        target: Option<f64>,
        spill: Option<f64>,
        pause: Option<f64>,
        terminate: Option<f64>,
        terminate_signal: Option<i32>,
        spike_horizon_ms: Option<u64>,
        name: Option<String>,
    ) -> PyResult<Self> {
        let thresholds = Fractions {
            target,
            spill,
            pause,
            terminate,
        };
        thresholds
            .to_bytes(limit)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let registration = Registration {
            thresholds,
            spike_horizon_ms,
            terminate_signal,
            terminate_by: TerminateBy::Kernel,
            ..Registration::new(pid, limit)
        };
        let (wake, wake_rx) = UnixStream::pair().map_err(os_err)?;
        wake.set_nonblocking(true).map_err(os_err)?;
        wake_rx.set_nonblocking(true).map_err(os_err)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            dropped: Default::default(),
            wake,
        });
        let config = LinkConfig {
            socket,
            registration,
            name: name.unwrap_or_else(|| format!("amm-dask {pid}")),
            retry: Duration::from_millis(500),
            reader: amm_protocol::sched::ReaderPolicy::Realtime(1),
            spin: None,
        };
        let s = shared.clone();
        let link = Link::spawn(config, move |e| on_event(&s, e)).map_err(os_err)?;
        Ok(Self {
            link: Mutex::new(Some(link)),
            shared,
            wake_rx,
        })
    }

    /// The fd the event loop watches: readable when events are queued.
    fn fileno(&self) -> i32 {
        self.wake_rx.as_raw_fd()
    }

    /// Every queued report, oldest first, as JSON lines (and clears the
    /// wake-up bytes).
    fn drain(&self) -> Vec<String> {
        let mut buf = [0u8; 256];
        while matches!(std::io::Read::read(&mut &self.wake_rx, &mut buf), Ok(n) if n > 0) {}
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }

    /// Events dropped because the loop did not drain in time.
    fn dropped(&self) -> u64 {
        self.shared
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Pushes one accounting split (bytes) to the agent's timeline, with
    /// the allocator's statistics (`heap_stats()`'s dict) when given.
    #[pyo3(signature = (t_ns, process, managed, unmanaged_live, hoarded, non_heap, spilled, unmanaged_recent, heap=None))]
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        t_ns: u64,
        process: u64,
        managed: u64,
        unmanaged_live: u64,
        hoarded: u64,
        non_heap: u64,
        spilled: u64,
        unmanaged_recent: u64,
        heap: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let split = Split {
            process,
            managed,
            unmanaged_live,
            hoarded,
            non_heap,
            spilled,
            unmanaged_recent,
        };
        let heap = heap.map(heap_sample).transpose()?;
        if let Some(link) = self.link.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            match heap {
                Some(h) => link.report_with_heap(t_ns, split, h),
                None => link.report(t_ns, split),
            }
        }
        Ok(())
    }

    /// Tells the agent about a purge/trim (bytes, seconds).
    #[pyo3(signature = (t_ns, reason, rss_before, rss_after, hoarded_before, hoarded_after, seconds))]
    #[allow(clippy::too_many_arguments)]
    fn report_purge(
        &self,
        t_ns: u64,
        reason: String,
        rss_before: u64,
        rss_after: u64,
        hoarded_before: u64,
        hoarded_after: u64,
        seconds: f64,
    ) {
        if let Some(link) = self.link.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            link.report_purge(
                t_ns,
                PurgeSample {
                    reason,
                    returned_bytes: rss_before.saturating_sub(rss_after),
                    rss_before,
                    rss_after,
                    hoarded_before,
                    hoarded_after,
                    duration_us: (seconds * 1e6) as u64,
                },
            );
        }
    }

    /// Unregisters (the link thread stops; the agent drops the watch).
    fn close(&self, py: Python<'_>) {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(move || drop(link));
    }
}

/// A `heap_stats()` dict as the protocol's [`HeapSample`].
fn heap_sample(d: &Bound<'_, PyDict>) -> PyResult<HeapSample> {
    let get = |k: &str| -> PyResult<u64> {
        Ok(match d.get_item(k)? {
            Some(v) => v.extract()?,
            None => 0,
        })
    };
    let allocator: String = match d.get_item("allocator")? {
        Some(v) => v.extract()?,
        None => String::new(),
    };
    Ok(HeapSample {
        allocator: if allocator == "jemalloc" {
            AllocatorKind::Jemalloc
        } else {
            AllocatorKind::Glibc
        },
        allocated: get("allocated")?,
        active: get("active")?,
        resident: get("resident")?,
        dirty: get("dirty")?,
        muzzy: get("muzzy")?,
        uordblks: get("uordblks")?,
        fordblks: get("fordblks")?,
        hblkhd: get("hblkhd")?,
        keepcost: get("keepcost")?,
    })
}

fn os_err(e: std::io::Error) -> PyErr {
    PyOSError::new_err(e.to_string())
}
