//! `op = "read-back"`: get every managed value under a key and verify its
//! bytes; the check counts and names (up to [`NAMED`](super::NAMED)) every
//! value that could not be read or held the wrong bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Deserialize;

use super::{PATTERN_TAG, Runner, State, named_list};
use crate::pool::Task;
use crate::rng::check_pattern;
use crate::spill::Part;
use crate::units::format_bytes;

/// Read back and verify every managed value under `key`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReadBack {
    /// The name.
    pub key: String,
}

impl ReadBack {
    pub(super) fn run(&self, r: &Runner) -> anyhow::Result<()> {
        let (st, key) = (&r.state, &self.key);
        let keys = st.buffer.keys_with_prefix(&format!("{key}/"));
        let bad = Arc::new(Mutex::new(Vec::<String>::new()));
        let bytes = Arc::new(AtomicU64::new(0));
        let n = keys.len();
        let start = Instant::now();
        let list: Vec<Task> = keys
            .into_iter()
            .map(|k| {
                let (st, bad, bytes) = (st.clone(), bad.clone(), bytes.clone());
                Box::new(move || {
                    if let Err(e) = verify(&st, &k, &bytes) {
                        bad.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(e.clone());
                        anyhow::bail!(e);
                    }
                    Ok(())
                }) as Task
            })
            .collect();
        let result = r.stage(list);
        let mut bad = bad.lock().unwrap_or_else(|e| e.into_inner()).clone();
        bad.sort();
        let total = bytes.load(Ordering::Relaxed);
        st.check(
            format!("read-back {key}"),
            result.is_ok() && bad.is_empty(),
            format!(
                "{n} values, {} read and verified in {} ms, {}",
                format_bytes(total),
                start.elapsed().as_millis(),
                if bad.is_empty() {
                    "0 wrong".to_string()
                } else {
                    named_list(&bad, "wrong")
                }
            ),
        );
        result
    }
}

/// Gets `k` (adding its payload to `bytes`) and checks a pattern value's
/// bytes; the error names the key.
fn verify(st: &State, k: &str, bytes: &AtomicU64) -> Result<(), String> {
    let v = st.buffer.get(k).map_err(|e| e.to_string())?;
    bytes.fetch_add(v.payload_len(), Ordering::Relaxed);
    match (v.meta[0], v.parts.first()) {
        (PATTERN_TAG, Some(Part::U8(b))) if !check_pattern(b, v.meta[1]) => {
            Err(format!("{k}: wrong bytes"))
        }
        _ => Ok(()),
    }
}
