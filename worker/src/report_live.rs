//! `amm-worker report --agent SOCKET [--pid PID]`: the report of a running
//! (or recently ended) worker from the timeline amm-agent holds for it —
//! the accounting split the worker pushes each tick, its allocator's
//! statistics and purges when it sends them (amm_dask does), and the
//! kernel's level, spike and exit samples (`amm_report::from_agent`).

use std::path::Path;
use std::time::Duration;

use amm_protocol::{Client, WatchStatus};
use amm_report::Run;
use amm_report::from_agent::run_of_samples;
use anyhow::{Context, bail};

/// How long to wait for the agent to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches `pid`'s timeline from the agent at `socket` (the only watched
/// process when `pid` is `None`) and turns it into a [`Run`].
pub fn run_from_agent(socket: &Path, pid: Option<u32>) -> anyhow::Result<Run> {
    // its error says where it tried and what to check
    let mut client = Client::connect(socket, "amm-worker report", AGENT_TIMEOUT)?;
    let status = match pid {
        // only that pid's watches: one page however many the agent holds
        Some(p) => client.status_of(p),
        None => client.status(),
    }
    .context("amm-agent did not answer status")?;
    let all: Vec<&WatchStatus> = status
        .watches
        .iter()
        .chain(status.ended.iter().rev())
        .collect();
    let watch = match pid {
        Some(p) => all.iter().find(|w| w.pid == p).copied(),
        None if status.watches.len() == 1 => status.watches.first(),
        None => None,
    };
    let Some(watch) = watch else {
        let pids: Vec<String> = all.iter().map(|w| w.pid.to_string()).collect();
        match pid {
            Some(p) => bail!(
                "amm-agent holds no timeline for pid {p}; it has: {}",
                if pids.is_empty() {
                    "none".to_string()
                } else {
                    pids.join(", ")
                }
            ),
            None => bail!(
                "say which worker with --pid; amm-agent watches {} process(es): {}",
                status.watches.len(),
                pids.join(", ")
            ),
        }
    };
    let samples = client
        .timeline(watch.pid)
        .with_context(|| format!("cannot read pid {}'s timeline from amm-agent", watch.pid))?;
    Ok(run_of_samples(watch, &samples))
}
