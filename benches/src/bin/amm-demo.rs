//! amm's end-to-end demo (`sudo cargo xtask demo`): the same worker under
//! the same hard cgroup limit, running memory spikes, once polling only (as
//! Dask does) and once with amm-agent's kernel events; then what happened,
//! in a form a person reads in ten seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use amm_benches::{profile_dir, start_agent};
use amm_integration_tests::cgroup::HardLimit;
use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use clap::Parser;
use serde_json::Value;

/// The demo.
#[derive(Parser)]
struct Args {
    /// The worker's memory limit, which is also its cgroup's hard limit, MiB.
    #[arg(long, default_value_t = 1024)]
    limit_mib: u64,
    /// Runs of each mode (interleaved).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn iec(b: u64) -> String {
    ByteSize(b).display().iec().to_string()
}

/// A managed base of 30 % of the limit, then four spikes of task memory of
/// 70 % each, faulted in as fast as the machine can, held briefly.
fn workload(limit: u64) -> String {
    let mib = |f: f64| format!("{}MiB", (limit as f64 * f) as u64 >> 20);
    format!(
        r#"
name = "demo-spikes"
[[phase]]
name = "base"
[[phase.op]]
op = "allocate"
bytes = "{}"
chunk = "8MiB"
keep = "managed"
key = "base"
[[phase]]
name = "spike"
repeat = 4
[[phase.op]]
op = "allocate"
bytes = "{}"
chunk = "32MiB"
keep = "task"
hold = "300ms"
[[phase.op]]
op = "sleep"
duration = "700ms"
[[phase]]
name = "check"
[[phase.op]]
op = "read-back"
key = "base"
"#,
        mib(0.30),
        mib(0.70)
    )
}

struct Outcome {
    summary: Value,
    timeline: Vec<Value>,
    oom_kills: u64,
    cgroup_peak: Option<u64>,
}

fn run_worker(dir: &Path, limit: u64, agent: Option<&Path>) -> Result<Outcome> {
    let tag = if agent.is_some() { "agent" } else { "poll" };
    let w = dir.join("demo.toml");
    std::fs::write(&w, workload(limit))?;
    let timeline = dir.join(format!("timeline-{tag}.jsonl"));
    let cg = HardLimit::create(&format!("demo-{tag}"), limit)?;
    let mut cmd = Command::new(profile_dir().join("amm-worker"));
    cmd.arg("run")
        .arg(&w)
        .arg("--memory-limit")
        .arg(format!("{limit}"))
        .arg("--local-directory")
        .arg(dir)
        .arg("--timeline")
        .arg(&timeline)
        .args(["--max-restarts", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(a) = agent {
        cmd.arg("--agent").arg(a);
    }
    cg.enter_before_exec(&mut cmd)?;
    let out = cmd.output().context("run amm-worker")?;
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    let timeline = std::fs::read_to_string(&timeline)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok(Outcome {
        summary,
        timeline,
        oom_kills: cg.oom_kills()?,
        cgroup_peak: cg.peak_bytes()?,
    })
}

fn count(tl: &[Value], event: &str) -> usize {
    tl.iter()
        .filter(|v| v["kind"] == "event" && v["event"] == event)
        .count()
}

fn verdict(o: &Outcome) -> String {
    let s = &o.summary;
    if o.oom_kills > 0 {
        format!("OOM-killed by the kernel ({} kill)", o.oom_kills)
    } else if s["terminations"].as_u64().unwrap_or(0) > 0 {
        "terminated at 95 % (the nanny would restart it)".to_string()
    } else if s["result_ok"] == true {
        "finished, results correct".to_string()
    } else {
        format!("failed (exit {})", s["exit_code"])
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !amm_agent::probe::is_root() {
        bail!(
            "the demo creates cgroups and starts amm-agent, which loads BPF: run it as root (sudo cargo xtask demo)"
        );
    }
    let limit = args.limit_mib << 20;
    let dir = tempfile::tempdir()?;
    let socket: PathBuf = dir.path().join("agent.sock");
    println!(
        "amm demo: a worker under a hard {} cgroup limit keeps a {} managed base and runs 4 spikes of {} task memory, faulted in at full speed.",
        iec(limit),
        iec(limit * 30 / 100),
        iec(limit * 70 / 100)
    );
    println!(
        "Running it {} times each, interleaved: polling every 200 ms (Dask's documented default), and with amm-agent ...",
        args.runs
    );
    let agent = start_agent(&socket, Stdio::null())?;
    let mut polls = Vec::new();
    let mut withs = Vec::new();
    let mut failure = None;
    for _ in 0..args.runs {
        match run_worker(dir.path(), limit, None)
            .and_then(|p| Ok((p, run_worker(dir.path(), limit, Some(&socket))?)))
        {
            Ok((p, w)) => {
                polls.push(p);
                withs.push(w);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(agent);
    if let Some(e) = failure {
        return Err(e);
    }

    let outcomes = |runs: &[Outcome]| {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for o in runs {
            let v = verdict(o);
            match seen.iter_mut().find(|(k, _)| *k == v) {
                Some((_, n)) => *n += 1,
                None => seen.push((v, 1)),
            }
        }
        seen.iter()
            .map(|(v, n)| format!("{n}x {v}"))
            .collect::<Vec<_>>()
    };
    let worst_peak = |runs: &[Outcome]| {
        let p = runs
            .iter()
            .map(|o| o.summary["peak_rss_bytes"].as_u64().unwrap_or(0))
            .max()
            .unwrap_or(0);
        format!("{} ({:.0} %)", iec(p), 100.0 * p as f64 / limit as f64)
    };
    let worst_cgroup = |runs: &[Outcome]| {
        runs.iter()
            .filter_map(|o| o.cgroup_peak)
            .max()
            .map_or("-".to_string(), iec)
    };
    let spilled = |runs: &[Outcome]| {
        let b: u64 = runs
            .iter()
            .map(|o| o.summary["spilled_bytes_total"].as_u64().unwrap_or(0))
            .sum();
        iec(b / runs.len().max(1) as u64)
    };
    let pauses = |runs: &[Outcome]| {
        runs.iter()
            .map(|o| count(&o.timeline, "pause"))
            .sum::<usize>()
            .to_string()
    };
    let row = |name: &str, a: String, b: String| println!("  {name:<22}{a:<52}{b}");
    println!();
    row("", "poll only, 200 ms".into(), "with amm-agent".into());
    // one line per kind of outcome, side by side
    let (a, b) = (outcomes(&polls), outcomes(&withs));
    for i in 0..a.len().max(b.len()) {
        row(
            if i == 0 { "outcome" } else { "" },
            a.get(i).cloned().unwrap_or_default(),
            b.get(i).cloned().unwrap_or_default(),
        );
    }
    row("worst peak RSS", worst_peak(&polls), worst_peak(&withs));
    row(
        "worst cgroup usage",
        worst_cgroup(&polls),
        worst_cgroup(&withs),
    );
    row("spilled, per run", spilled(&polls), spilled(&withs));
    row("pauses, all runs", pauses(&polls), pauses(&withs));
    let with = withs.first().context("no run")?;
    println!();
    let kernel: Vec<&Value> = with
        .timeline
        .iter()
        .filter(|v| v["kind"] == "event" && v["event"] == "agent")
        .collect();
    if kernel.is_empty() {
        println!("The worker got no kernel event (is the agent working?).");
    } else {
        println!(
            "What the kernel told the worker, at the page it happened (delay = kernel -> worker):"
        );
        for e in kernel.iter().take(12) {
            let what = match e["agent_event"].as_str() {
                Some("spike") => format!(
                    "spike alarm: terminate predicted in {:.0} ms",
                    e["eta_ns"].as_f64().unwrap_or(0.0) / 1e6
                ),
                _ => format!(
                    "{} -> {}",
                    e["prev_level"].as_str().unwrap_or("?"),
                    e["level"].as_str().unwrap_or("?")
                ),
            };
            println!(
                "  {:>7} ms  {what:<46} rss {:>10}   delay {} µs",
                e["t_ms"].as_u64().unwrap_or(0),
                iec(e["rss"].as_u64().unwrap_or(0)),
                e["delay_us"]
            );
        }
        if kernel.len() > 12 {
            println!("  ... and {} more", kernel.len() - 12);
        }
    }
    Ok(())
}
