//! `op = "sleep"`: `tasks` tasks that each sleep `duration` (they hold task
//! threads, as a slow task does).

use serde::Deserialize;

use super::{Dur, Runner};
use crate::pool::Task;

/// Sleep in `tasks` tasks.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Sleep {
    /// How long each.
    pub duration: Dur,
    /// How many tasks.
    pub tasks: Option<u32>,
}

impl Sleep {
    pub(super) fn run(&self, r: &Runner) -> anyhow::Result<()> {
        let d = self.duration.0;
        let list: Vec<Task> = (0..self.tasks.unwrap_or(1).max(1))
            .map(|_| {
                Box::new(move || {
                    std::thread::sleep(d);
                    Ok(())
                }) as Task
            })
            .collect();
        r.stage(list)
    }
}
