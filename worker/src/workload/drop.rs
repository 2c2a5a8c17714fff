//! `op = "drop"`: drop all of a key, managed values and unmanaged items.

use serde::Deserialize;

use super::Runner;

/// Drop all of `key`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DropKey {
    /// The name.
    pub key: String,
}

impl DropKey {
    pub(super) fn run(&self, r: &Runner) -> anyhow::Result<()> {
        let st = r.state.clone();
        let key = self.key.clone();
        r.stage(vec![Box::new(move || {
            let prefix = format!("{key}/");
            let mut n = 0;
            for k in st.buffer.keys_with_prefix(&prefix) {
                n += st.buffer.delete(&k) as u64;
            }
            let held = st
                .unmanaged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            let m = held.map_or(0, |h| h.len());
            tracing::info!(key, managed_values = n, unmanaged_items = m, "dropped");
            Ok(())
        })])
    }
}
