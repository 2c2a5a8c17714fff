//! `op = "purge"`: purge/trim the allocator now and report what came back
//! (counted in the run's `purged_bytes`, and a `purge` timeline event).

use std::sync::atomic::Ordering;

use amm_timeline::Event;

use super::Runner;
use crate::units::format_bytes;

/// Runs one purge as a task.
pub(super) fn run(r: &Runner) -> anyhow::Result<()> {
    let st = r.state.clone();
    r.stage(vec![Box::new(move || {
        let r = crate::alloc::reclaim("workload")?;
        tracing::info!(
            allocator = ?r.allocator,
            returned = %format_bytes(r.returned_bytes),
            hoarded_before = %format_bytes(r.hoarded_before),
            hoarded_after = %format_bytes(r.hoarded_after),
            us = r.duration_us,
            "purge"
        );
        st.purged.fetch_add(r.returned_bytes, Ordering::Relaxed);
        st.purges.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = &st.timeline {
            t.event(Event::Purge(r));
        }
        Ok(())
    })])
}
