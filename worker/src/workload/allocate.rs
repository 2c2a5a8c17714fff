//! `op = "allocate"`: allocate `bytes` in chunks, kept as SpillBuffer values
//! (managed), held outside it (unmanaged) or freed when the task ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Deserialize;

use super::{Dur, Held, MIB8, PATTERN_TAG, Runner, Size, State};
use crate::pool::Task;
use crate::rng::{Rng, fill_pattern, seed_of};
use crate::spill::{Part, Value};

/// Where allocated memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// SpillBuffer values (counted as managed).
    Managed,
    /// Held outside the SpillBuffer until freed or dropped.
    Unmanaged,
    /// Freed when the task ends.
    Task,
}

/// Allocate `bytes` in chunks.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Allocate {
    /// Total bytes.
    pub bytes: Size,
    /// Fixed chunk size.
    pub chunk: Option<Size>,
    /// Smallest random chunk.
    pub chunk_min: Option<Size>,
    /// Largest random chunk.
    pub chunk_max: Option<Size>,
    /// Where the memory lives.
    pub keep: Keep,
    /// Name of what is kept (default `data`).
    pub key: Option<String>,
    /// Number of tasks.
    pub tasks: Option<u32>,
    /// Pause between chunks: chunk i is due i delays after the task
    /// started, so a late wake-up on a busy machine catches up and the
    /// rate holds.
    pub delay: Option<Dur>,
    /// Pause before a task ends.
    pub hold: Option<Dur>,
}

/// What one task of an `allocate` does.
struct Plan {
    key: String,
    keep: Keep,
    /// The task's number under `key` (managed keys are `key/<index>/<chunk>`).
    index: u64,
    bytes: u64,
    chunk: (u64, u64),
    delay: Option<Duration>,
    hold: Option<Duration>,
}

impl Allocate {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        match (self.chunk, self.chunk_min, self.chunk_max) {
            (Some(c), None, None) if c.0 > 0 => Ok(()),
            (None, Some(a), Some(b)) if a.0 > 0 && a.0 <= b.0 => Ok(()),
            _ => bail!("allocate needs `chunk` > 0, or `chunk-min` <= `chunk-max` (both > 0)"),
        }
    }

    pub(super) fn run(&self, r: &Runner) -> anyhow::Result<()> {
        let key = self.key.clone().unwrap_or_else(|| "data".into());
        let chunk = match (self.chunk, self.chunk_min, self.chunk_max) {
            (Some(c), _, _) => (c.0, c.0),
            (None, Some(a), Some(b)) => (a.0, b.0),
            _ => bail!("allocate needs chunk or chunk-min/chunk-max"),
        };
        let bytes = self.bytes.0;
        let ntasks = match (self.tasks, self.keep) {
            (Some(t), _) => t.max(1) as u64,
            (None, Keep::Task) => 1,
            (None, _) => (bytes / MIB8.max(chunk.1)).max(1),
        };
        let per_task = bytes / ntasks;
        // Managed keys are numbered per task: task t uses
        // key/<base+t>/<chunk>.
        let base = r.state.next_index(&key, ntasks);
        let list: Vec<Task> = (0..ntasks)
            .map(|t| {
                let plan = Plan {
                    key: key.clone(),
                    keep: self.keep,
                    index: base + t,
                    bytes: if t == ntasks - 1 {
                        bytes - per_task * (ntasks - 1)
                    } else {
                        per_task
                    },
                    chunk,
                    delay: self.delay.map(|d| d.0),
                    hold: self.hold.map(|d| d.0),
                };
                let st = r.state.clone();
                Box::new(move || {
                    plan.run(&st);
                    Ok(())
                }) as Task
            })
            .collect();
        r.stage(list)
    }
}

impl Plan {
    fn run(self, st: &Arc<State>) {
        let start = Instant::now();
        let mut rng = Rng::new(seed_of(&self.key) ^ self.index);
        let mut held: Held = Vec::new();
        let (mut done, mut i) = (0u64, 0u64);
        while done < self.bytes {
            let size = rng.range(self.chunk.0, self.chunk.1).min(self.bytes - done) as usize;
            if self.keep == Keep::Managed {
                self.put(st, i, size);
            } else {
                held.push(Some(vec![0xA5u8; size].into_boxed_slice()));
            }
            done += size as u64;
            i += 1;
            if let Some(d) = self.delay {
                // chunk i is due at i delays after the start:
                // a wake-up late on a busy machine catches up,
                // so the rate written is the rate run
                let due = start + d.mul_f64(i as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        if let Some(h) = self.hold {
            std::thread::sleep(h);
        }
        if self.keep == Keep::Unmanaged {
            st.unmanaged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(self.key)
                .or_default()
                .extend(held);
        }
    }

    /// Puts chunk `i` as a managed value holding a checkable pattern.
    fn put(&self, st: &State, i: u64, size: usize) {
        let k = format!("{}/{:06}/{i:06}", self.key, self.index);
        let seed = seed_of(&k);
        let mut v = vec![0u8; size];
        fill_pattern(&mut v, seed);
        st.buffer.put(
            &k,
            Value {
                meta: [PATTERN_TAG, seed, 0, 0],
                parts: vec![Part::U8(v)],
            },
        );
    }
}
