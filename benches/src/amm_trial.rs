//! One trial of amm-worker for the spike benchmark: the same workloads as
//! the real-Dask baseline (`benches/dask/spike_trial.py`, mirrored here as
//! amm workload files, sized by the limit), under a hard cgroup limit equal
//! to the worker's memory limit, polling only or on amm-agent's events.
//!
//! Every mode registers the worker with the benchmark's agent so the kernel
//! measures all of them alike (crossing times, peak to the page); the
//! polling modes register with `--agent-observe-only`: the events are
//! recorded, never acted on, and the kernel sends no terminate signal.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amm_integration_tests::cgroup::HardLimit;
use amm_protocol::{Client, Sample, SampleKind};
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::profile_dir;

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;
/// The limit the workloads are written for; others scale them.
const REFERENCE_LIMIT: f64 = 2.0 * GIB;

/// How the worker learns about its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AmmMode {
    /// Polls every 200 ms (Dask's documented default).
    Poll200,
    /// Polls every 100 ms (Dask's current default).
    Poll100,
    /// Polls every 200 ms and acts on amm-agent's events.
    Agent,
}

impl AmmMode {
    /// Every mode, in table order.
    pub const ALL: [AmmMode; 3] = [AmmMode::Poll200, AmmMode::Poll100, AmmMode::Agent];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            AmmMode::Poll200 => "amm-worker, poll 200 ms",
            AmmMode::Poll100 => "amm-worker, poll 100 ms",
            AmmMode::Agent => "amm-worker + amm-agent",
        }
    }
}

/// The amm workload file for one of the benchmark's workloads at `limit`
/// bytes, the same tasks in the same proportions as the Dask trial script.
pub fn workload_toml(name: &str, limit: u64) -> Option<String> {
    let s = limit as f64 / REFERENCE_LIMIT;
    let mib = |x: f64| format!("{}MiB", ((x * s) / MIB).round().max(1.0) as u64);
    Some(match name {
        "spike" => format!(
            r#"
name = "bench-spike"
[[phase]]
name = "base"
[[phase.op]]
op = "allocate"
bytes = "{base}"
chunk = "{eight}"
keep = "managed"
key = "base"
[[phase]]
name = "spike"
repeat = 12
[[phase.op]]
op = "allocate"
bytes = "{spike}"
chunk = "{chunk}"
keep = "task"
hold = "1s"
[[phase.op]]
op = "sleep"
duration = "4s"
"#,
            base = mib(256.0 * MIB),
            eight = mib(8.0 * MIB),
            spike = mib(2.0 * GIB),
            chunk = mib(64.0 * MIB),
        ),
        "mix" => format!(
            r#"
name = "bench-mix"
[[phase]]
name = "round"
repeat = 10
[[phase.op]]
op = "allocate"
bytes = "{grow}"
chunk = "{eight}"
keep = "managed"
key = "kept"
[[phase.op]]
op = "allocate"
bytes = "{spike}"
chunk = "{chunk}"
keep = "task"
hold = "500ms"
[[phase.op]]
op = "sleep"
duration = "1s"
"#,
            grow = mib(128.0 * MIB),
            eight = mib(8.0 * MIB),
            spike = mib(1536.0 * MIB),
            chunk = mib(64.0 * MIB),
        ),
        "matmul" => {
            let b = ((512.0 * s.sqrt() / 8.0).round() as u64 * 8).max(8);
            format!(
                "name = \"bench-matmul\"\n[[phase]]\nname = \"matmul\"\n[[phase.op]]\nop = \"matmul\"\nkey = \"mm\"\nn = {}\nblock = {b}\n",
                12 * b
            )
        }
        "sparse" => format!(
            "name = \"bench-sparse\"\n[[phase]]\nname = \"sparse\"\n[[phase.op]]\nop = \"sparse\"\nkey = \"sc\"\ncells = {}\ngenes = 20000\ndensity = 0.012\nblocks = 40\nhvg = 1000\nmin-genes = 120\nmin-cells = 20\n",
            (120_000.0 * s) as u64
        ),
        _ => return None,
    })
}

/// How a trial went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AmmOutcome {
    /// Finished with correct results and no worker death.
    Finished,
    /// The kernel's OOM killer killed a worker.
    OomKilled,
    /// A worker was terminated at 95 % and restarted by its nanny.
    TerminatedRestarted,
    /// Anything else (crash, wrong result, timeout).
    Failed,
}

/// One worker process of a trial, as the kernel saw it.
#[derive(Debug, Clone, Serialize)]
pub struct AmmLife {
    /// Its pid.
    pub pid: u32,
    /// Peak RSS to the page.
    pub peak_rss_bytes: u64,
    /// For each rise past spill (from below target), the time to the
    /// worker's first reaction to it (a spill, a pause, a terminate, or its
    /// decision that no value was left to spill) before it fell back below
    /// target, ms; 0 when the kernel killed it at the terminate page.
    pub reactions_ms: Vec<f64>,
    /// Rises past spill the worker never reacted to before they ended.
    pub missed: u32,
    /// Rises whose first reaction was `nothing_to_spill`: all of process
    /// memory was unmanaged, so no spill could follow.
    pub nothing_to_spill: u32,
    /// From the kernel's crossing of terminate to the exit, ms.
    pub terminate_to_exit_ms: Option<f64>,
    /// The kernel signalled it at the terminate page.
    pub killed_at_page: bool,
    /// How the nanny saw it end (`done`, `terminated`, `terminated at the
    /// page by amm-agent`, `killed by signal`, ...).
    pub ending: String,
}

/// One trial, measured.
#[derive(Debug, Clone, Serialize)]
pub struct AmmTrial {
    /// The mode.
    pub mode: AmmMode,
    /// The workload.
    pub workload: String,
    /// The limit.
    pub limit_bytes: u64,
    /// How it went.
    pub outcome: AmmOutcome,
    /// Highest peak RSS of its workers over the limit.
    pub peak_fraction: f64,
    /// The cgroup's peak charge over the limit.
    pub cgroup_peak_fraction: Option<f64>,
    /// Bytes above the terminate level at the highest peak.
    pub overshoot_bytes: u64,
    /// OOM kills in its cgroup.
    pub oom_kills: u64,
    /// Restarts by the nanny.
    pub restarts: u64,
    /// Wall time, ms.
    pub wall_ms: u64,
    /// Its workers.
    pub lives: Vec<AmmLife>,
    /// The nanny's summary.
    pub summary: Value,
}

fn timeline(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The agent's kernel record of one worker.
fn kernel_life(client: &mut Client, pid: u32, t0: u64, after: &[&Value]) -> Result<AmmLife> {
    let samples = client.timeline(pid)?;
    Ok(life_from(pid, &samples, t0, after))
}

/// One worker's life from the kernel's samples of it and its own timeline
/// lines (`after`: those of this life; `t0`: its timeline's start on the
/// kernel's clock).
fn life_from(pid: u32, samples: &[Sample], t0: u64, after: &[&Value]) -> AmmLife {
    let k = KernelStory::of(samples);
    let actions = worker_actions(after, t0);
    let (reactions_ns, missed, nothing_to_spill) = reactions(&k, &actions);
    let ms = |ns: u64| ns as f64 / 1e6;
    AmmLife {
        pid,
        peak_rss_bytes: k.peak,
        reactions_ms: reactions_ns.into_iter().map(ms).collect(),
        missed,
        nothing_to_spill,
        terminate_to_exit_ms: k
            .term_ns
            .zip(k.exit_ns)
            .map(|(t, e)| ms(e.saturating_sub(t))),
        killed_at_page: k.killed_at_page,
        ending: String::new(),
    }
}

/// What the kernel's samples of one worker say.
#[derive(Debug, Default)]
struct KernelStory {
    /// The last crossing of terminate.
    term_ns: Option<u64>,
    /// The exit.
    exit_ns: Option<u64>,
    /// Peak RSS, bytes.
    peak: u64,
    /// The kernel signalled it at the terminate page.
    killed_at_page: bool,
    /// Episodes above spill: (rise from below, fall below target).
    episodes: Vec<(u64, Option<u64>)>,
}

impl KernelStory {
    fn of(samples: &[Sample]) -> KernelStory {
        let mut k = KernelStory::default();
        for s in samples {
            match &s.what {
                SampleKind::Level {
                    from,
                    to,
                    signalled,
                    ..
                } => {
                    if *from == amm_ebpf::Level::Below && *to >= amm_ebpf::Level::Spill {
                        k.episodes.push((s.t_ns, None));
                    }
                    if *to == amm_ebpf::Level::Below
                        && let Some(e) = k.episodes.last_mut()
                    {
                        e.1.get_or_insert(s.t_ns);
                    }
                    if *to == amm_ebpf::Level::Terminate {
                        k.term_ns = Some(s.t_ns);
                        k.killed_at_page |= *signalled;
                    }
                }
                SampleKind::Exit { peak_rss_bytes } => {
                    k.exit_ns = Some(s.t_ns);
                    k.peak = k.peak.max(*peak_rss_bytes);
                }
                SampleKind::Unwatched { peak_rss_bytes } => k.peak = k.peak.max(*peak_rss_bytes),
                _ => {}
            }
        }
        k
    }
}

/// The worker's own reactions to process memory, on the kernel's clock,
/// each with whether it was `nothing_to_spill` (not the spills a put makes
/// when managed memory passes target; a spill event is written when the
/// spill is done: it began `ms` earlier).
fn worker_actions(after: &[&Value], t0: u64) -> Vec<(u64, bool)> {
    after
        .iter()
        .filter(|v| {
            v["kind"] == "event"
                && v["reason"] != "target"
                && matches!(
                    v["event"].as_str(),
                    Some("spill" | "pause" | "terminate" | "spill_failed" | "nothing_to_spill")
                )
        })
        .filter_map(|v| {
            let nothing = v["event"] == "nothing_to_spill";
            // exact stamps when the worker wrote them (`began_ns`, `t_ns`),
            // else its 1 ms `t_ms` clock
            if let Some(ns) = v["began_ns"].as_u64() {
                return Some((ns, nothing));
            }
            if let Some(ns) = v["t_ns"].as_u64() {
                let ms = v["ms"].as_u64().unwrap_or(0);
                return Some((ns.saturating_sub(ms * 1_000_000), nothing));
            }
            let t = v["t_ms"]
                .as_u64()?
                .saturating_sub(v["ms"].as_u64().unwrap_or(0));
            Some((t0 + t * 1_000_000, nothing))
        })
        .collect()
}

/// For each episode above spill, the time to the worker's first action in
/// it (0 for the last when the kernel killed it at the page); the episodes
/// with none; the first actions that were `nothing_to_spill`.
fn reactions(k: &KernelStory, actions: &[(u64, bool)]) -> (Vec<u64>, u32, u32) {
    let mut reactions_ns = Vec::new();
    let (mut missed, mut nothing_to_spill) = (0, 0);
    let last = k.episodes.len().saturating_sub(1);
    for (i, &(up, down)) in k.episodes.iter().enumerate() {
        let end = down.or(k.exit_ns).unwrap_or(u64::MAX);
        // t_ms has a 1 ms resolution
        match actions
            .iter()
            .find(|&&(t, _)| t + 1_000_000 >= up && t <= end)
        {
            Some(&(t, nothing)) => {
                reactions_ns.push(t.saturating_sub(up));
                nothing_to_spill += u32::from(nothing);
            }
            None if k.killed_at_page && i == last => reactions_ns.push(0),
            None => missed += 1,
        }
    }
    (reactions_ns, missed, nothing_to_spill)
}

/// Runs one trial; `agent` is the benchmark's running agent's socket; the
/// worker's timeline is copied into `keep` when given (for a closer look).
pub fn run_trial(
    mode: AmmMode,
    workload: &str,
    limit: u64,
    agent: &Path,
    scratch: &Path,
    timeout: Duration,
    keep: Option<&Path>,
) -> Result<AmmTrial> {
    let toml = workload_toml(workload, limit).context("unknown workload")?;
    let dir = tempfile::tempdir_in(scratch)?;
    let w = dir.path().join("workload.toml");
    std::fs::write(&w, toml)?;
    let tl_path: PathBuf = dir.path().join("timeline.jsonl");
    let cg = HardLimit::create("spike-amm", limit)?;
    let mut cmd = worker_command(mode, &w, limit, agent, &tl_path, dir.path());
    cg.enter_before_exec(&mut cmd)?;
    let (wall_ms, out) = run_until(cmd, timeout)?;
    let summary = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    let tl = timeline(&tl_path);
    let oom_kills = cg.oom_kills()?;
    let cgroup_peak = cg.peak_bytes()?;
    drop(cg);

    let mut lives = lives_of(agent, &tl)?;
    if let Some(attempts) = summary["attempts"].as_array() {
        for (l, a) in lives.iter_mut().zip(attempts) {
            l.ending = a["ending"].as_str().unwrap_or("").to_string();
        }
    }
    if let Some(k) = keep {
        let to = k.join(format!(
            "{workload}-{}-{}.jsonl",
            mode.name().replace([' ', ',', '+'], ""),
            lives.first().map_or(0, |l| l.pid)
        ));
        std::fs::copy(&tl_path, &to)
            .with_context(|| format!("cannot keep the timeline as {}", to.display()))?;
    }
    let peak = lives.iter().map(|l| l.peak_rss_bytes).max().unwrap_or(0);
    let terminate = (limit as f64 * 0.95) as u64;
    Ok(AmmTrial {
        mode,
        workload: workload.to_string(),
        limit_bytes: limit,
        outcome: outcome_of(oom_kills, &summary),
        peak_fraction: peak as f64 / limit as f64,
        cgroup_peak_fraction: cgroup_peak.map(|p| p as f64 / limit as f64),
        overshoot_bytes: peak.saturating_sub(terminate),
        oom_kills,
        restarts: summary["restarts"].as_u64().unwrap_or(0),
        wall_ms,
        lives,
        summary,
    })
}

/// `amm-worker run` of the workload `w` in `mode`, its timeline at `tl`,
/// spilling under `dir`.
fn worker_command(
    mode: AmmMode,
    w: &Path,
    limit: u64,
    agent: &Path,
    tl: &Path,
    dir: &Path,
) -> Command {
    let mut cmd = Command::new(profile_dir().join("amm-worker"));
    cmd.arg("run")
        .arg(w)
        .arg("--memory-limit")
        .arg(limit.to_string())
        .arg("--monitor-interval")
        .arg(if mode == AmmMode::Poll100 {
            "100ms"
        } else {
            "200ms"
        })
        .arg("--agent")
        .arg(agent)
        .arg("--timeline")
        .arg(tl)
        .arg("--local-directory")
        .arg(dir)
        .args([
            "--nthreads",
            "1",
            "--max-restarts",
            "3",
            "--restart-backoff",
            "200ms",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if mode != AmmMode::Agent {
        cmd.arg("--agent-observe-only");
    }
    cmd
}

/// Runs `cmd` to its end, killed past `timeout`: the wall time (ms) and
/// its stdout.
fn run_until(mut cmd: Command, timeout: Duration) -> Result<(u64, String)> {
    let start = Instant::now();
    let mut child = cmd.spawn().context("start amm-worker")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    while child.try_wait()?.is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall_ms = start.elapsed().as_millis() as u64;
    Ok((wall_ms, reader.join().unwrap_or_default()))
}

/// Each attempt in the timeline `tl` (it starts with a `start` event), as
/// the agent's kernel record of it and its own lines tell it.
fn lives_of(agent: &Path, tl: &[Value]) -> Result<Vec<AmmLife>> {
    let starts: Vec<usize> = tl
        .iter()
        .enumerate()
        .filter(|(_, v)| v["kind"] == "event" && v["event"] == "start")
        .map(|(i, _)| i)
        .collect();
    let mut client = Client::connect(agent, "bench-spike", Duration::from_secs(10))?;
    let mut lives = Vec::new();
    for (k, &i) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(tl.len());
        let (Some(pid), Some(t0)) = (tl[i]["pid"].as_u64(), tl[i]["t0_monotonic_ns"].as_u64())
        else {
            continue;
        };
        let after: Vec<&Value> = tl[i..end].iter().collect();
        // the agent records the end when the exit event arrives
        let mut life = kernel_life(&mut client, pid as u32, t0, &after);
        for _ in 0..20 {
            if life.as_ref().is_ok_and(|l| l.peak_rss_bytes > 0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            life = kernel_life(&mut client, pid as u32, t0, &after);
        }
        lives.push(life?);
    }
    Ok(lives)
}

/// How a trial went, from its cgroup's OOM kills and the nanny's summary.
fn outcome_of(oom_kills: u64, summary: &Value) -> AmmOutcome {
    let terminations = summary["terminations"].as_u64().unwrap_or(0);
    if oom_kills > 0 {
        AmmOutcome::OomKilled
    } else if terminations > 0 {
        AmmOutcome::TerminatedRestarted
    } else if summary["result_ok"] == true && summary["exit_code"] == 0 {
        AmmOutcome::Finished
    } else {
        AmmOutcome::Failed
    }
}

impl AmmTrial {
    /// The trial as the shared spike table sees it (row: workload and mode).
    pub fn sample(&self) -> crate::spike_table::Sample {
        use crate::dask::Outcome;
        let mut deaths = [0u32; 3];
        let mut reactions = Vec::new();
        let mut oom_after = Vec::new();
        let mut oom_left = self.oom_kills;
        for l in &self.lives {
            if l.ending.starts_with("terminated") {
                deaths[0] += 1;
                reactions.extend(l.terminate_to_exit_ms);
            } else if l.ending == "killed by signal" && oom_left > 0 {
                oom_left -= 1;
                deaths[1] += 1;
                oom_after.extend(l.terminate_to_exit_ms);
            } else if !l.ending.is_empty() && l.ending != "done" {
                deaths[2] += 1;
            }
        }
        crate::spike_table::Sample {
            row: format!("{} / {}", self.workload, self.mode.name()),
            outcome: match self.outcome {
                AmmOutcome::Finished => Outcome::Finished,
                AmmOutcome::OomKilled => Outcome::OomKilled,
                AmmOutcome::TerminatedRestarted => Outcome::TerminatedRestarted,
                AmmOutcome::Failed => Outcome::Failed,
            },
            completed: self.summary["result_ok"] == true,
            timed_out: false,
            peak_fraction: Some(self.peak_fraction),
            overshoot_bytes: Some(self.overshoot_bytes),
            reactions_ms: reactions,
            oom_after_terminate_ms: oom_after,
            deaths,
            // the Dask runner's count of 95 % crossings no kill followed;
            // amm's missed 70 % crossings are in the benchmark's second table
            unanswered_crossings: 0,
            wall_ms: Some(self.wall_ms as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amm_ebpf::Level;
    use serde_json::json;

    fn level(t_ns: u64, from: Level, to: Level) -> Sample {
        Sample {
            t_ns,
            rss_bytes: 0,
            what: SampleKind::Level {
                from,
                to,
                foreign: false,
                signalled: false,
            },
        }
    }

    #[test]
    fn each_rise_counts_its_first_reaction_and_says_when_nothing_could_spill() {
        const MS: u64 = 1_000_000;
        let samples = [
            // rise 1: nothing to spill at +0.4 ms, a pause at +52 ms
            level(100 * MS, Level::Below, Level::Spill),
            level(900 * MS, Level::Spill, Level::Below),
            // rise 2: a spill at +0.3 ms
            level(2_000 * MS, Level::Below, Level::Spill),
            level(2_500 * MS, Level::Spill, Level::Below),
            // rise 3: no reaction before it fell
            level(3_000 * MS, Level::Below, Level::Spill),
            level(3_100 * MS, Level::Spill, Level::Below),
        ];
        let lines = [
            json!({"kind": "event", "event": "nothing_to_spill", "began_ns": 100 * MS + 400_000}),
            json!({"kind": "event", "event": "pause", "t_ns": 152 * MS}),
            // a target spill is no reaction to process memory
            json!({"kind": "event", "event": "spill", "reason": "target", "began_ns": 1_990 * MS}),
            json!({"kind": "event", "event": "spill", "reason": "process", "began_ns": 2_000 * MS + 300_000}),
            json!({"kind": "event", "event": "spill", "reason": "target", "began_ns": 3_050 * MS}),
        ];
        let after: Vec<&Value> = lines.iter().collect();
        let life = life_from(7, &samples, 0, &after);
        assert_eq!(life.reactions_ms, vec![0.4, 0.3]);
        assert_eq!(life.nothing_to_spill, 1);
        assert_eq!(life.missed, 1);
    }
}
