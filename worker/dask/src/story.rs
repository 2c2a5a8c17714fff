//! What the agent saw of a worker that died: for the nanny, which tells
//! Dask *why* (a kernel kill at the terminate page, at what RSS, growing
//! how fast). Read from the agent's `status` (its recently ended watches)
//! and the pid's timeline.

use std::path::PathBuf;
use std::time::Duration;

use amm_protocol::{Client, SampleKind};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use serde_json::json;

/// How long the nanny waits for the agent.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The agent's story of `pid` as one JSON object: `limit`, `peak`,
/// `killed_at_page` (the kernel signalled it at the terminate page),
/// `rss_at_kill`, `rate_bytes_per_ms` (the growth rate the kernel last
/// measured), `terminate`. Errors when the agent holds nothing for it.
#[pyfunction]
pub fn kill_story(py: Python<'_>, socket: PathBuf, pid: u32) -> PyResult<String> {
    py.detach(|| story(&socket, pid))
        .map_err(PyOSError::new_err)
}

fn story(socket: &std::path::Path, pid: u32) -> Result<String, String> {
    let mut c = Client::connect(socket, "amm-dask nanny", TIMEOUT).map_err(|e| e.to_string())?;
    let status = c.status().map_err(|e| e.to_string())?;
    let watch = status
        .ended
        .iter()
        .rev()
        .chain(status.watches.iter())
        .find(|w| w.pid == pid)
        .ok_or_else(|| format!("amm-agent holds nothing for pid {pid}"))?
        .clone();
    let samples = c.timeline(pid).map_err(|e| e.to_string())?;
    let mut killed = None;
    let mut rate = watch.rate_bytes_per_ms;
    let mut terminate = watch.thresholds.map(|t| t.terminate);
    for s in &samples {
        match &s.what {
            SampleKind::Level {
                to,
                signalled: true,
                ..
            } if *to == amm_ebpf::Level::Terminate => killed = Some((s.t_ns, s.rss_bytes)),
            SampleKind::Spike {
                rate_bytes_per_ms, ..
            } => rate = *rate_bytes_per_ms,
            _ => {}
        }
    }
    if terminate.is_none() && watch.limit_bytes > 0 {
        terminate = Some((watch.limit_bytes as f64 * 0.95) as u64);
    }
    Ok(json!({
        "pid": pid,
        "limit": watch.limit_bytes,
        "peak": watch.peak_rss_bytes,
        "killed_at_page": killed.is_some(),
        "rss_at_kill": killed.map(|k| k.1),
        "t_ns": killed.map(|k| k.0),
        "rate_bytes_per_ms": rate,
        "terminate": terminate,
    })
    .to_string())
}
