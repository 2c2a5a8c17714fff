//! The spike benchmark: the same workloads under a hard cgroup limit (the
//! worker's memory limit) for amm-worker polling every 200 ms and every
//! 100 ms, amm-worker on amm-agent's events, and real Dask, interleaved
//! trial by trial. Writes the per-trial JSON lines and prints the table.
//! Run as root: `cargo xtask bench spike`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amm_benches::amm_trial::{AmmMode, AmmOutcome, AmmTrial, run_trial};
use amm_benches::{percentiles, profile_dir, target_dir};
use anyhow::{Context, Result, bail};
use clap::Parser;

/// The spike benchmark.
#[derive(Parser)]
struct Args {
    /// Trials per mode and workload.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// The memory limit (and cgroup hard limit), MiB.
    #[arg(long, default_value_t = 2048)]
    limit_mib: u64,
    /// Workloads (spike, matmul, sparse, mix).
    #[arg(long, value_delimiter = ',', default_value = "spike,matmul,sparse,mix")]
    workloads: Vec<String>,
    /// Skip real Dask (amm modes only).
    #[arg(long)]
    no_dask: bool,
    /// Where the per-trial JSON lines go.
    #[arg(long, default_value = "target/bench-spike.jsonl")]
    out: PathBuf,
    /// Give a trial up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn start_agent(socket: &std::path::Path) -> Result<AgentProc> {
    let child = Command::new(profile_dir().join("amm-agent"))
        .arg("run")
        .arg("--socket")
        .arg(socket)
        .arg("--bpf-object")
        .arg(target_dir().join("bpf/amm.bpf.o"))
        .env("AMM_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .context("start amm-agent")?;
    let agent = AgentProc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(agent);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("amm-agent did not start listening")
}

/// One row of the table, whatever ran.
#[derive(Default)]
struct Row {
    finished: usize,
    oom: usize,
    terminated: usize,
    failed: usize,
    peak: Vec<f64>,
    overshoot_mib: Vec<f64>,
    reaction_ms: Vec<f64>,
    wall_s: Vec<f64>,
}

impl Row {
    fn add_amm(&mut self, t: &AmmTrial) {
        match t.outcome {
            AmmOutcome::Finished => {
                self.finished += 1;
                self.wall_s.push(t.wall_ms as f64 / 1e3);
            }
            AmmOutcome::OomKilled => self.oom += 1,
            AmmOutcome::TerminatedRestarted => self.terminated += 1,
            AmmOutcome::Failed => self.failed += 1,
        }
        self.peak.push(100.0 * t.peak_fraction);
        self.overshoot_mib
            .push(t.overshoot_bytes as f64 / (1u64 << 20) as f64);
        self.reaction_ms
            .extend(t.lives.iter().filter_map(|l| l.reaction_ms));
    }

    fn print(&mut self, workload: &str, mode: &str) {
        let n = self.finished + self.oom + self.terminated + self.failed;
        let (pm, _, pmax) = percentiles(&mut self.peak);
        let (om, _, omax) = percentiles(&mut self.overshoot_mib);
        let (rm, rp99, _) = percentiles(&mut self.reaction_ms);
        let (wm, _, _) = percentiles(&mut self.wall_s);
        let dash = |v: &[f64], s: String| if v.is_empty() { "-".into() } else { s };
        println!(
            "| {workload} | {mode} | {}/{n} | {} | {} | {} | {pm:.0} / {pmax:.0} | {om:.0} / {omax:.0} | {} | {} |",
            self.finished,
            self.terminated,
            self.oom,
            self.failed,
            dash(&self.reaction_ms, format!("{rm:.1} / {rp99:.1}")),
            dash(&self.wall_s, format!("{wm:.1}")),
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !amm_agent::probe::is_root() {
        bail!("the spike benchmark creates cgroups and loads BPF: run it as root");
    }
    let scratch = tempfile::tempdir()?;
    let socket = scratch.path().join("agent.sock");
    let _agent = start_agent(&socket)?;
    let limit = args.limit_mib << 20;
    let mut out = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let timeout = Duration::from_secs(args.timeout_s);
    let mut rows: Vec<((String, &'static str), Row)> = Vec::new();
    for t in 0..args.trials {
        for w in &args.workloads {
            // rotate the order so no mode always runs first
            for k in 0..AmmMode::ALL.len() {
                let mode = AmmMode::ALL[(k + t) % AmmMode::ALL.len()];
                eprintln!("trial {}/{} {w} {}", t + 1, args.trials, mode.name());
                let trial = run_trial(mode, w, limit, &socket, scratch.path(), timeout)?;
                writeln!(out, "{}", serde_json::to_string(&trial)?)?;
                row(&mut rows, w, mode.name()).add_amm(&trial);
            }
        }
    }
    let _ = args.no_dask;
    println!(
        "spike benchmark: limit {} MiB (= the cgroup's hard limit), {} trials per mode and workload, interleaved; kernel {}",
        args.limit_mib,
        args.trials,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!();
    println!("| workload | mode | finished | terminated + restarted | OOM-killed | failed | peak % of limit, median / max | MiB past terminate, median / max | reaction ms, median / p99 | wall s (finished), median |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for ((w, m), r) in rows.iter_mut() {
        r.print(w, m);
    }
    Ok(())
}

/// The row of (workload, mode), made on first use.
fn row<'a>(
    rows: &'a mut Vec<((String, &'static str), Row)>,
    w: &str,
    m: &'static str,
) -> &'a mut Row {
    let i = match rows.iter().position(|((a, b), _)| a == w && *b == m) {
        Some(i) => i,
        None => {
            rows.push(((w.to_string(), m), Row::default()));
            rows.len() - 1
        }
    };
    &mut rows[i].1
}
