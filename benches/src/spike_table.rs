//! The spike benchmark's Markdown table: per row (a workload, or later a
//! workload under one of amm's modes) survival counts by outcome, peak RSS
//! and overshoot past the terminate level, the reaction delay, and the wall
//! time of the runs that survived.
//!
//! It reads [`Sample`]s, not Dask's results directly, so any runner that
//! can say what happened to its worker can share the table.

use std::fmt::Write as _;

use crate::dask::{LifeEnd, Outcome, TrialResult};
use crate::percentiles;

/// One trial as the table sees it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The row it belongs to.
    pub row: String,
    /// How the trial went.
    pub outcome: Outcome,
    /// The work got done (possibly after restarts).
    pub completed: bool,
    /// The work stopped moving and the trial gave up at its timeout.
    pub timed_out: bool,
    /// Peak RSS over the limit (of the worker that decided the outcome).
    pub peak_fraction: Option<f64>,
    /// Its bytes above the terminate level at the peak.
    pub overshoot_bytes: Option<u64>,
    /// For each worker killed by its nanny (or by amm): ms from the
    /// kernel's crossing of the terminate level to its exit.
    pub reactions_ms: Vec<f64>,
    /// For each worker the OOM killer took: ms from the crossing of the
    /// terminate level to the kill (the time a reaction had, and missed).
    pub oom_after_terminate_ms: Vec<f64>,
    /// Worker deaths: killed by the nanny, by the OOM killer, otherwise.
    pub deaths: [u32; 3],
    /// Rises past the terminate level that no kill followed (the poll never
    /// saw them).
    pub unanswered_crossings: u32,
    /// Wall time of the work, in ms.
    pub wall_ms: Option<f64>,
}

impl From<&TrialResult> for Sample {
    fn from(t: &TrialResult) -> Sample {
        let mut deaths = [0u32; 3];
        let mut oom_after = Vec::new();
        let mut unanswered = 0;
        for l in &t.lives {
            let killed = match l.end {
                LifeEnd::TerminatedByNanny | LifeEnd::KilledAtPage => {
                    deaths[0] += 1;
                    true
                }
                LifeEnd::OomKilled => {
                    deaths[1] += 1;
                    if let Some(ms) = l.exit_after_terminate_ms {
                        oom_after.push(ms);
                    }
                    true
                }
                LifeEnd::Died => {
                    deaths[2] += 1;
                    false
                }
                LifeEnd::Shutdown => false,
            };
            unanswered += l.terminate_crossings.saturating_sub(u32::from(killed));
        }
        Sample {
            row: t.workload.name().to_string(),
            outcome: t.outcome,
            completed: t.completed,
            // results written before the flag existed say it in the error
            timed_out: t.timed_out
                || t.error
                    .as_deref()
                    .is_some_and(|e| e.contains("timeout: not done")),
            peak_fraction: t.peak_fraction,
            overshoot_bytes: t.overshoot_bytes,
            reactions_ms: t.nanny_reactions_ms(),
            oom_after_terminate_ms: oom_after,
            deaths,
            unanswered_crossings: unanswered,
            wall_ms: t.wall_ms,
        }
    }
}

/// `median / max` of a sample, formatted; `-` when empty.
fn median_max(mut v: Vec<f64>, digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, _, max) = percentiles(&mut v);
    format!("{m:.digits$} / {max:.digits$}")
}

/// `median / p99 (n)`; `-` when empty.
fn median_p99(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "- (0)".into();
    }
    let n = v.len();
    let (m, p99, _) = percentiles(&mut v);
    format!("{m:.0} / {p99:.0} ({n})")
}

/// The table, one row per distinct `row` in order of first appearance.
pub fn markdown(samples: &[Sample]) -> String {
    let mut rows: Vec<&str> = Vec::new();
    for s in samples {
        if !rows.contains(&s.row.as_str()) {
            rows.push(&s.row);
        }
    }
    let mut out = String::new();
    out.push_str(
        "| workload | trials | finished | terminated_restarted | oom_killed | failed \
         | work completed | timed out | worker deaths: nanny / OOM / other \
         | peak % of limit, median / max | overshoot past 95 %, MiB, median / max \
         | reaction ms, median / p99 (n) | OOM kill after 95 %, ms, median / p99 (n) \
         | 95 % crossings with no reaction | wall s of survivors, median / max |\n",
    );
    out.push_str(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for row in rows {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.row == row).collect();
        let count = |o: Outcome| mine.iter().filter(|s| s.outcome == o).count();
        let deaths = mine.iter().fold([0u32; 3], |a, s| {
            [a[0] + s.deaths[0], a[1] + s.deaths[1], a[2] + s.deaths[2]]
        });
        let peaks = mine
            .iter()
            .filter_map(|s| s.peak_fraction.map(|f| f * 100.0))
            .collect();
        let over = mine
            .iter()
            .filter_map(|s| s.overshoot_bytes.map(|b| b as f64 / (1u64 << 20) as f64))
            .collect();
        let reactions = mine.iter().flat_map(|s| s.reactions_ms.clone()).collect();
        let oom_after = mine
            .iter()
            .flat_map(|s| s.oom_after_terminate_ms.clone())
            .collect();
        let wall = mine
            .iter()
            .filter(|s| s.outcome == Outcome::Finished)
            .filter_map(|s| s.wall_ms.map(|w| w / 1000.0))
            .collect();
        let _ = writeln!(
            out,
            "| {row} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} |",
            mine.len(),
            count(Outcome::Finished),
            count(Outcome::TerminatedRestarted),
            count(Outcome::OomKilled),
            count(Outcome::Failed),
            mine.iter().filter(|s| s.completed).count(),
            mine.iter().filter(|s| s.timed_out).count(),
            deaths[0],
            deaths[1],
            deaths[2],
            median_max(peaks, 1),
            median_max(over, 0),
            median_p99(reactions),
            median_p99(oom_after),
            mine.iter().map(|s| s.unanswered_crossings).sum::<u32>(),
            median_max(wall, 1),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(row: &str, outcome: Outcome, peak: f64, reaction: Option<f64>) -> Sample {
        Sample {
            row: row.into(),
            outcome,
            completed: outcome == Outcome::Finished,
            timed_out: false,
            peak_fraction: Some(peak),
            overshoot_bytes: Some((((peak - 0.95).max(0.0) * 1024.0) as u64) << 20),
            reactions_ms: reaction.into_iter().collect(),
            oom_after_terminate_ms: vec![],
            deaths: [u32::from(reaction.is_some()), 0, 0],
            unanswered_crossings: 0,
            wall_ms: Some(12_000.0),
        }
    }

    #[test]
    fn rows_keep_their_order_and_count_outcomes() {
        let t = markdown(&[
            sample("spike", Outcome::TerminatedRestarted, 1.0, Some(40.0)),
            sample("matmul", Outcome::Finished, 0.5, None),
            sample("spike", Outcome::TerminatedRestarted, 1.1, Some(80.0)),
            sample("spike", Outcome::OomKilled, 1.0, None),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[2].starts_with("| spike | 3 | 0 | 2 | 1 | 0 | 0 | 0 | 2 / 0 / 0 |"),
            "{t}"
        );
        assert!(lines[2].contains("| 80 / 80 (2) |"), "{t}");
        assert!(lines[2].contains("| 100.0 / 110.0 |"), "{t}");
        assert!(lines[3].starts_with("| matmul | 1 | 1 | 0 |"), "{t}");
        assert!(lines[3].contains("| 12.0 / 12.0 |"), "{t}");
    }
}
