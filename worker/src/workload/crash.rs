//! `op = "crash"`: end the process abnormally while the nanny's attempt
//! number is below `until-attempt` (for the nanny's tests).

use anyhow::bail;
use nix::sys::signal::{SigHandler, Signal, raise, signal};
use serde::Deserialize;

use super::Runner;

/// How `crash` ends the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrashHow {
    /// `abort()` (SIGABRT).
    Abort,
    /// A real SIGSEGV.
    Segfault,
}

/// End the process abnormally (for nanny tests).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Crash {
    /// How.
    pub how: CrashHow,
    /// Only while the attempt number is below this.
    pub until_attempt: Option<u32>,
}

impl Crash {
    pub(super) fn run(&self, r: &Runner) -> anyhow::Result<()> {
        let st = &r.state;
        if self.until_attempt.is_some_and(|u| st.attempt >= u) {
            tracing::info!(attempt = st.attempt, "crash skipped on this attempt");
            return Ok(());
        }
        tracing::warn!(how = ?self.how, attempt = st.attempt, "crashing on purpose");
        if let Some(t) = &st.timeline {
            t.flush();
        }
        match self.how {
            CrashHow::Abort => std::process::abort(),
            CrashHow::Segfault => {
                // SAFETY: SIG_DFL installs no handler of ours, so nothing
                // of ours can run in a signal context.
                unsafe { signal(Signal::SIGSEGV, SigHandler::SigDfl) }?;
                // the default action of SIGSEGV ends the process
                raise(Signal::SIGSEGV)?;
                bail!("SIGSEGV did not end the process")
            }
        }
    }
}
