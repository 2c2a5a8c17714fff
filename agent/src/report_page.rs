//! `/report/PID` of the live page: the leak-vs-hoard report (HTML) of a
//! watched or recently ended process, made from the timeline the agent
//! holds for it. The HTTP thread asks for it over the agent's own socket,
//! as `amm-worker report --agent` does, so it goes through the relay's
//! ordinary request path and takes none of its locks directly.

use std::path::Path;
use std::time::Duration;

use amm_protocol::Client;
use anyhow::{Context, Result};

/// How long the agent may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The report page of `pid`, or an error that says why there is none.
pub fn render(socket: &Path, pid: u32) -> Result<String> {
    let mut client = Client::connect(socket, "amm-agent live page", TIMEOUT)
        .context("the live page cannot reach its own agent's socket")?;
    let status = client.status().context("the agent did not answer status")?;
    let watch = status
        .watches
        .iter()
        .chain(status.ended.iter().rev())
        .find(|w| w.pid == pid)
        .with_context(|| {
            format!(
                "the agent holds no timeline for pid {pid}: it keeps the watched processes and \
                 the last ended ones only"
            )
        })?;
    let samples = client
        .timeline(pid)
        .with_context(|| format!("cannot read pid {pid}'s timeline"))?;
    let run = amm_report::from_agent::run_of_samples(watch, &samples);
    let report = amm_report::analyze(&run, &amm_report::Thresholds::default());
    Ok(amm_report::render(&run, &report, amm_report::Format::Html))
}
