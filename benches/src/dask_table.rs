//! The table of `bench-dask`: plain Dask against Dask + amm_dask, one row
//! per workload and mode, ratios to plain Dask measured in the same run.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::dask::{LifeEnd, Mode, TrialResult, Workload};

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// What one row of the table says.
#[derive(Debug, Default)]
struct Row {
    trials: usize,
    finished: usize,
    killed_worker: usize,
    /// Deaths: at the page, by the nanny, by the OOM killer, otherwise.
    deaths: [u32; 4],
    oom_kills: u64,
    /// Per-trial peak (the decisive worker), fraction.
    peaks: Vec<f64>,
    /// Peaks of the workers that were killed (any killer).
    kill_peaks: Vec<f64>,
    wall_s: Vec<f64>,
    unmanaged_mib: Vec<f64>,
    /// Crossing 95 % → exit, ms, of killed workers.
    kill_ms: Vec<f64>,
    /// Kernel crossing → Dask's loop acting, ms (amm modes).
    pause_loop_ms: Vec<f64>,
    spill_loop_ms: Vec<f64>,
}

impl Row {
    fn add(&mut self, t: &TrialResult) {
        self.trials += 1;
        self.finished += usize::from(t.completed);
        self.killed_worker += usize::from(t.killed_worker);
        for l in &t.lives {
            let i = match l.end {
                LifeEnd::KilledAtPage => 0,
                LifeEnd::TerminatedByNanny => 1,
                LifeEnd::OomKilled => 2,
                LifeEnd::Died => 3,
                LifeEnd::Shutdown => continue,
            };
            self.deaths[i] += 1;
            self.oom_kills += l.oom_kills;
            self.kill_peaks.extend(l.peak_fraction);
            if i < 2 {
                self.kill_ms.extend(l.exit_after_terminate_ms);
            }
        }
        self.peaks.extend(t.peak_fraction);
        if t.completed {
            self.wall_s.extend(t.wall_ms.map(|ms| ms / 1e3));
        }
        self.unmanaged_mib.extend(
            t.unmanaged_after_release_bytes
                .map(|b| b as f64 / (1u64 << 20) as f64),
        );
        for (k, v) in &t.amm_reactions_ms {
            if k.starts_with("level_pause") && k.ends_with("_loop") {
                self.pause_loop_ms.extend(v);
            } else if k.starts_with("level_spill") && k.ends_with("_loop") {
                self.spill_loop_ms.extend(v);
            }
        }
    }
}

/// The Markdown table of `results`, rows by workload then mode; wall time
/// and unmanaged memory also as a ratio to plain Dask's median.
pub fn markdown(results: &[TrialResult]) -> String {
    let mut rows: BTreeMap<(usize, usize), Row> = BTreeMap::new();
    for t in results {
        let w = Workload::ALL
            .iter()
            .position(|&x| x == t.workload)
            .unwrap_or(99);
        let m = Mode::ALL.iter().position(|&x| x == t.mode).unwrap_or(99);
        rows.entry((w, m)).or_default().add(t);
    }
    let mut out = String::new();
    out.push_str(
        "| workload | mode | trials | finished | KilledWorker | worker deaths: at page / nanny / OOM / other \
         | OOM kills | peak % median / max | killed workers' peak % max | wall s median (vs plain) \
         | unmanaged after release MiB median (vs plain) | 95 % → exit ms median / max \
         | kernel → loop ms: pause / spill median |\n",
    );
    out.push_str(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut plain: BTreeMap<usize, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for ((w, m), row) in rows.iter_mut() {
        let wall = median(&mut row.wall_s);
        let unmanaged = median(&mut row.unmanaged_mib);
        if *m == 0 {
            plain.insert(*w, (wall, unmanaged));
        }
        let (pw, pu) = plain.get(w).copied().unwrap_or((None, None));
        let ratio = |x: Option<f64>, base: Option<f64>| match (x, base) {
            (Some(x), Some(b)) if b > 0.0 && *m != 0 => {
                format!(" ({:+.1} %)", (x / b - 1.0) * 100.0)
            }
            _ => String::new(),
        };
        let pct = |v: Option<f64>| opt(v.map(|f| f * 100.0), 1);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} / {} / {} / {} | {} | {} / {} | {} | {}{} | {}{} | {} / {} | {} / {} |",
            Workload::ALL.get(*w).map_or("?", |x| x.name()),
            Mode::ALL.get(*m).map_or("?", |x| x.name()),
            row.trials,
            row.finished,
            row.killed_worker,
            row.deaths[0],
            row.deaths[1],
            row.deaths[2],
            row.deaths[3],
            row.oom_kills,
            pct(median(&mut row.peaks)),
            pct(max(&row.peaks)),
            pct(max(&row.kill_peaks)),
            opt(wall, 1),
            ratio(wall, pw),
            opt(unmanaged, 0),
            ratio(unmanaged, pu),
            opt(median(&mut row.kill_ms), 1),
            opt(max(&row.kill_ms), 1),
            opt(median(&mut row.pause_loop_ms), 2),
            opt(median(&mut row.spill_loop_ms), 2),
        );
    }
    out
}
