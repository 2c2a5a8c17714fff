//! The tables of `bench-dask`: plain Dask against Dask + amm_dask, one row
//! per workload, mode and spill mode, ratios to plain Dask measured in the
//! same run; and the spill table (event-loop stalls, spill → under target,
//! throughput), ratios of amm_dask's spill thread to its incremental spill.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::dask::{LifeEnd, Mode, SpillMode, TrialResult, Workload};

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

/// A fraction as a percentage with one decimal (`-` when absent).
fn pct(v: Option<f64>) -> String {
    opt(v.map(|f| f * 100.0), 1)
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
    /// The event loop's longest stall per trial (10 ms timer), ms.
    loop_max_ms: Vec<f64>,
    /// Dask's longest tick per trial, ms.
    tick_max_ms: Vec<f64>,
    /// Ticks more than 50 ms late per trial.
    late_50: Vec<f64>,
    /// Rise past spill → below target, ms, every episode of every worker.
    spill_to_target_ms: Vec<f64>,
    /// Rises past spill that never came back below target.
    spill_unresolved: u32,
    /// Tasks per second of finished trials that count their tasks.
    tasks_per_s: Vec<f64>,
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
        for l in &t.lives {
            self.spill_to_target_ms.extend(&l.spill_to_target_ms);
            self.spill_unresolved += l.spill_unresolved;
        }
        self.peaks.extend(t.peak_fraction);
        if t.completed {
            self.wall_s.extend(t.wall_ms.map(|ms| ms / 1e3));
            if let (Some(n), Some(ms)) = (t.tasks, t.wall_ms) {
                self.tasks_per_s.push(n as f64 / (ms / 1e3));
            }
        }
        self.loop_max_ms.extend(t.loop_lag_max_ms);
        self.tick_max_ms.extend(t.dask_tick_max_ms);
        self.late_50.extend(t.loop_late_50ms.map(|n| n as f64));
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

/// A row's place: workload, mode, spill mode (0: none, then
/// [`SpillMode::ALL`] + 1), settings variant (empty: amm_dask's defaults),
/// in table order.
type Key = (usize, usize, usize, String);

fn key(t: &TrialResult) -> Key {
    let pos = |found: Option<usize>| found.unwrap_or(99);
    (
        pos(Workload::ALL.iter().position(|&x| x == t.workload)),
        pos(Mode::ALL.iter().position(|&x| x == t.mode)),
        t.spill
            .map_or(0, |s| pos(SpillMode::ALL.iter().position(|&x| x == s)) + 1),
        t.variant.clone().unwrap_or_default(),
    )
}

fn rows(results: &[TrialResult]) -> BTreeMap<Key, Row> {
    let mut rows: BTreeMap<Key, Row> = BTreeMap::new();
    for t in results {
        rows.entry(key(t)).or_default().add(t);
    }
    rows
}

fn workload_name(w: usize) -> &'static str {
    Workload::ALL.get(w).map_or("?", |x| x.name())
}

/// The mode's name, with a spill thread said (the incremental spill is
/// amm_dask's default and stays unsaid, as in earlier tables), and its
/// settings variant.
fn mode_name((_, m, s, v): &Key) -> String {
    let mode = Mode::ALL.get(*m).map_or("?", |x| x.name());
    let mode = match s.checked_sub(1).and_then(|i| SpillMode::ALL.get(i)) {
        Some(SpillMode::Thread) => format!("{mode}, spill thread"),
        _ => mode.to_string(),
    };
    if v.is_empty() {
        mode
    } else {
        format!("{mode} [{v}]")
    }
}

/// ` (+x.x %)` of `x` against `base`, empty when either is unknown.
fn ratio(x: Option<f64>, base: Option<f64>) -> String {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => format!(" ({:+.1} %)", (x / b - 1.0) * 100.0),
        _ => String::new(),
    }
}

/// The Markdown table of `results`, rows by workload, mode then spill mode;
/// wall time and unmanaged memory also as a ratio to plain Dask's median.
/// With trials that measured the event loop, the spill table follows.
pub fn markdown(results: &[TrialResult]) -> String {
    let mut rows = rows(results);
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
    for (k, row) in rows.iter_mut() {
        let &(w, m, _, _) = k;
        let wall = median(&mut row.wall_s);
        let unmanaged = median(&mut row.unmanaged_mib);
        if m == 0 {
            plain.insert(w, (wall, unmanaged));
        }
        let (pw, pu) = match plain.get(&w) {
            Some(&p) if m != 0 => p,
            _ => (None, None),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} / {} / {} / {} | {} | {} / {} | {} | {}{} | {}{} | {} / {} | {} / {} |",
            workload_name(w),
            mode_name(k),
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
    if rows.values().any(|r| !r.loop_max_ms.is_empty()) {
        out.push('\n');
        out.push_str(&spill_table(&mut rows));
    }
    out
}

/// The spill table: per row the event loop's stalls, the time from a rise
/// past spill to memory back under target, throughput and peaks; the
/// spill-thread rows with ratios to the incremental row of the same mode.
fn spill_table(rows: &mut BTreeMap<Key, Row>) -> String {
    let mut out = String::from(
        "| workload | mode | trials | loop stall ms median / max (vs incremental) \
         | Dask tick max ms median | ticks > 50 ms late median \
         | rise past spill → under target ms median / max (vs incremental) [episodes, unresolved] \
         | tasks/s median (vs incremental, defaults) | peak % median / max |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut incremental: BTreeMap<(usize, usize), [Option<f64>; 3]> = BTreeMap::new();
    for (k, row) in rows.iter_mut() {
        let (w, m, s) = (k.0, k.1, k.2);
        let default = k.3.is_empty();
        let stall = median(&mut row.loop_max_ms);
        let back = median(&mut row.spill_to_target_ms);
        let rate = median(&mut row.tasks_per_s);
        if s == 1 && default {
            incremental.insert((w, m), [stall, back, rate]);
        }
        let base = match incremental.get(&(w, m)) {
            Some(&b) if s > 1 || !default => b,
            _ => [None; 3],
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} / {}{} | {} | {} | {} / {}{} [{}, {}] | {}{} | {} / {} |",
            workload_name(w),
            mode_name(k),
            row.trials,
            opt(stall, 0),
            opt(max(&row.loop_max_ms), 0),
            ratio(stall, base[0]),
            opt(median(&mut row.tick_max_ms), 0),
            opt(median(&mut row.late_50), 0),
            opt(back, 0),
            opt(max(&row.spill_to_target_ms), 0),
            ratio(back, base[1]),
            row.spill_to_target_ms.len(),
            row.spill_unresolved,
            opt(rate, 1),
            ratio(rate, base[2]),
            pct(median(&mut row.peaks)),
            pct(max(&row.peaks)),
        );
    }
    out
}
