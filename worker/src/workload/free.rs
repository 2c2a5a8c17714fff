//! `op = "free"`: free a fraction of what a key holds, managed and
//! unmanaged, in a pattern that leaves holes where a real program would.

use anyhow::bail;
use serde::Deserialize;

use super::{Runner, State};
use crate::rng::{Rng, seed_of};
use crate::units::format_bytes;

/// Which items `free` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreePattern {
    /// Evenly spread over allocation order (holes everywhere).
    #[default]
    Spread,
    /// Random items.
    Random,
    /// The oldest items.
    First,
}

/// Free a fraction of what `key` holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Free {
    /// The name.
    pub key: String,
    /// Fraction of the live items.
    pub fraction: f64,
    /// Which items.
    #[serde(default)]
    pub pattern: FreePattern,
}

impl Free {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.fraction) {
            bail!("free: fraction must be in [0, 1], not {}", self.fraction)
        }
        Ok(())
    }

    pub(super) fn run(&self, r: &Runner) -> anyhow::Result<()> {
        let st = r.state.clone();
        let op = self.clone();
        r.stage(vec![Box::new(move || {
            op.free(&st);
            Ok(())
        })])
    }

    /// Whether the `j`-th of `live` items goes.
    fn pick(&self, j: usize, live: usize, rng: &mut Rng) -> bool {
        let fraction = self.fraction;
        match self.pattern {
            FreePattern::Spread => {
                ((j + 1) as f64 * fraction).floor() > (j as f64 * fraction).floor()
            }
            FreePattern::Random => rng.next_f64() < fraction,
            FreePattern::First => (j as f64) < (live as f64 * fraction).round(),
        }
    }

    fn free(&self, st: &State) {
        let key = self.key.as_str();
        let mut rng = Rng::new(seed_of(key) ^ 0xF4EE);
        let (freed, freed_bytes) = self.free_unmanaged(st, &mut rng);
        // Managed values under the key too.
        let keys = st.buffer.keys_with_prefix(&format!("{key}/"));
        let live = keys.len();
        let mut managed = 0usize;
        for (j, k) in keys.iter().enumerate() {
            if self.pick(j, live, &mut rng) && st.buffer.delete(k) {
                managed += 1;
            }
        }
        tracing::info!(
            key,
            fraction = self.fraction,
            unmanaged_items = freed,
            unmanaged_bytes = %format_bytes(freed_bytes),
            managed_values = managed,
            "freed"
        );
    }

    /// Frees the picked unmanaged items: how many, how many bytes.
    fn free_unmanaged(&self, st: &State, rng: &mut Rng) -> (usize, u64) {
        let mut freed_bytes = 0u64;
        let mut freed = 0usize;
        let mut map = st.unmanaged.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(items) = map.get_mut(&self.key) {
            let live = items.iter().filter(|i| i.is_some()).count();
            let mut j = 0;
            for slot in items.iter_mut() {
                if slot.is_none() {
                    continue;
                }
                if self.pick(j, live, rng) {
                    freed_bytes += slot.as_ref().map_or(0, |b| b.len() as u64);
                    *slot = None;
                    freed += 1;
                }
                j += 1;
            }
            items.retain(Option::is_some);
        }
        (freed, freed_bytes)
    }
}
