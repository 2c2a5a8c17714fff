//! amm's end-to-end demo (`cargo xtask demo`, as root): the same worker
//! under the same hard cgroup limit, running bursts of memory, once acting
//! on its 200 ms poll only (as Dask does) and once on amm-agent's kernel
//! events; then what happened, in a form a person reads in ten seconds.
//! `--dashboard` also serves the agent's live page, opens it in headless
//! Chromium and saves a screenshot.
//!
//! The workload decides: each burst puts a managed base of 55 % of the limit
//! (under target, so nothing spills on put), then grows unmanaged memory by
//! 45 % in small tasks as fast as the machine faults pages. Unless the
//! worker spills and pauses in time, that is 100 % of a hard limit: the
//! kernel's OOM killer. With the agent the pause comes at the page that
//! crosses 80 % and growth stops there; a poll comes up to 200 ms later.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use amm_benches::{AgentProc, profile_dir, start_agent, start_agent_http, target_dir};
use amm_integration_tests::HttpListener;
use amm_integration_tests::browser::Browser;
use amm_integration_tests::cgroup::HardLimit;
use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use clap::Parser;
use serde_json::Value;

/// The demo.
#[derive(Parser)]
struct Args {
    /// The worker's memory limit, which is also its cgroup's hard limit, MiB.
    #[arg(long, default_value_t = 256)]
    limit_mib: u64,
    /// Runs of each mode (interleaved).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Bursts per run.
    #[arg(long, default_value_t = 3)]
    bursts: u32,
    /// Serve the agent's live page, open it in headless Chromium and save
    /// a screenshot (see --screenshot).
    #[arg(long)]
    dashboard: bool,
    /// Where the screenshot goes.
    #[arg(long, default_value = "target/demo-dashboard.png")]
    screenshot: PathBuf,
    /// With --dashboard: keep the agent and its page up this many seconds
    /// after the runs, to look at it in a browser of your own.
    #[arg(long, default_value_t = 0)]
    linger_s: u64,
}

fn iec(b: u64) -> String {
    ByteSize(b).display().iec().to_string()
}

/// `bursts` times: a managed base of 55 % of the limit (1 MiB values: a
/// spill to a slow disk checks for a pause between two), then 45 % more of
/// unmanaged memory in 4 MiB tasks at full speed; drop that, read the base
/// back and check it, drop it.
fn workload(limit: u64, bursts: u32) -> String {
    let mib = |f: f64| format!("{}MiB", (limit as f64 * f) as u64 >> 20);
    let tasks = ((limit as f64 * 0.45) as u64 >> 22).max(1);
    format!(
        r#"
name = "demo-bursts"
repeat = {bursts}
[[phase]]
name = "base"
[[phase.op]]
op = "allocate"
bytes = "{base}"
chunk = "1MiB"
keep = "managed"
key = "base"
[[phase]]
name = "burst"
[[phase.op]]
op = "allocate"
bytes = "{burst}"
chunk = "4MiB"
keep = "unmanaged"
key = "cache"
tasks = {tasks}
[[phase]]
name = "release"
[[phase.op]]
op = "drop"
key = "cache"
[[phase]]
name = "check"
[[phase.op]]
op = "read-back"
key = "base"
[[phase]]
name = "drop"
[[phase.op]]
op = "drop"
key = "base"
"#,
        base = mib(0.55),
        burst = mib(0.45),
    )
}

/// How the worker meets memory pressure.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Acts on its 200 ms poll; the agent only watches (for the page).
    Poll,
    /// Acts on the agent's kernel events too.
    Agent,
}

impl Mode {
    fn tag(self) -> &'static str {
        match self {
            Mode::Poll => "poll",
            Mode::Agent => "agent",
        }
    }
}

struct Outcome {
    summary: Value,
    timeline: Vec<Value>,
    oom_kills: u64,
    cgroup_peak: Option<u64>,
}

fn run_worker(dir: &Path, limit: u64, bursts: u32, socket: &Path, mode: Mode) -> Result<Outcome> {
    let tag = mode.tag();
    let w = dir.join("demo.toml");
    std::fs::write(&w, workload(limit, bursts))?;
    let timeline = dir.join(format!("timeline-{tag}.jsonl"));
    let _ = std::fs::remove_file(&timeline);
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
        .args(["--max-restarts", "0", "--name", &format!("demo-{tag}")])
        .arg("--agent")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if mode == Mode::Poll {
        // the agent watches it (for the page) and never acts for it
        cmd.arg("--agent-observe-only");
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

/// "17x OOM-killed", "3x finished", ... in order of first appearance.
fn outcomes(runs: &[Outcome]) -> Vec<String> {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for o in runs {
        let v = verdict(o);
        match seen.iter_mut().find(|(k, _)| *k == v) {
            Some((_, n)) => *n += 1,
            None => seen.push((v, 1)),
        }
    }
    seen.iter().map(|(v, n)| format!("{n}x {v}")).collect()
}

fn print_table(polls: &[Outcome], withs: &[Outcome], limit: u64) {
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
        let n: usize = runs.iter().map(|o| count(&o.timeline, "pause")).sum();
        n.to_string()
    };
    let row = |name: &str, a: String, b: String| println!("  {name:<22}{a:<52}{b}");
    println!();
    row("", "poll only, 200 ms".into(), "with amm-agent".into());
    // one line per kind of outcome, side by side
    let (a, b) = (outcomes(polls), outcomes(withs));
    for i in 0..a.len().max(b.len()) {
        row(
            if i == 0 { "outcome" } else { "" },
            a.get(i).cloned().unwrap_or_default(),
            b.get(i).cloned().unwrap_or_default(),
        );
    }
    row("worst peak RSS", worst_peak(polls), worst_peak(withs));
    row(
        "worst cgroup usage",
        worst_cgroup(polls),
        worst_cgroup(withs),
    );
    row("spilled, per run", spilled(polls), spilled(withs));
    row("pauses, all runs", pauses(polls), pauses(withs));
}

fn print_kernel_events(with: &Outcome) {
    println!();
    // the kernel's events the worker wrote, in the timeline contract's types
    let kernel: Vec<(u64, amm_timeline::Event)> = with
        .timeline
        .iter()
        .filter_map(|v| serde_json::from_value::<amm_timeline::Line>(v.clone()).ok())
        .filter_map(|l| match l.entry {
            amm_timeline::Entry::Event(
                e @ (amm_timeline::Event::Level(_) | amm_timeline::Event::Spike(_)),
            ) => Some((l.t_ms, e)),
            _ => None,
        })
        .collect();
    if kernel.is_empty() {
        println!("The worker got no kernel event (is the agent working?).");
        return;
    }
    println!(
        "What the kernel told the worker, at the page it happened (delay = kernel -> worker):"
    );
    for (t_ms, e) in kernel.iter().take(12) {
        let (what, rss, delay) = match e {
            amm_timeline::Event::Spike(s) => (
                format!(
                    "spike alarm: terminate predicted in {:.0} ms",
                    s.eta_ns.unwrap_or(0) as f64 / 1e6
                ),
                s.rss,
                s.delay_us,
            ),
            amm_timeline::Event::Level(l) => (format!("{} -> {}", l.from, l.to), l.rss, l.delay_us),
            _ => continue,
        };
        let delay = delay.map_or("?".to_string(), |d| d.to_string());
        println!(
            "  {t_ms:>7} ms  {what:<46} rss {:>10}   delay {delay} µs",
            iec(rss)
        );
    }
    if kernel.len() > 12 {
        println!("  ... and {} more", kernel.len() - 12);
    }
}

/// The agent's live page in headless Chromium.
struct Dashboard {
    browser: Browser,
    http: HttpListener,
}

impl Dashboard {
    fn open(http: HttpListener) -> Result<Dashboard> {
        let browser = Browser::start(1500, 900)?;
        browser.goto(&http.login_url("/"))?;
        Ok(Dashboard { browser, http })
    }

    /// A screenshot of the whole page (the window grown to its height).
    fn screenshot(&self, path: &Path) -> Result<PathBuf> {
        let h = self
            .browser
            .eval("return document.documentElement.scrollHeight;")?
            .as_u64()
            .unwrap_or(900)
            .clamp(600, 4000);
        self.browser.resize(1500, h as u32 + 20)?;
        std::thread::sleep(Duration::from_millis(300));
        self.browser.screenshot(path)
    }
}

/// `path` relative to the workspace (target/..).
fn screenshot_path(path: &Path) -> PathBuf {
    let root = target_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    root.join(path)
}

fn start(args: &Args, socket: &Path, dir: &Path) -> Result<(AgentProc, Option<Dashboard>)> {
    if !args.dashboard {
        return Ok((start_agent(socket, Stdio::null())?, None));
    }
    let (agent, http) = start_agent_http(socket, &dir.join("agent.log"))?;
    println!(
        "Live page: {} (open it in a browser on this machine; the token in it lives as long as \
         this demo's agent; a headless Chromium watches it too)",
        http.login_url("/")
    );
    Ok((agent, Some(Dashboard::open(http)?)))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !amm_agent::probe::is_root() {
        bail!(
            "the demo creates cgroups and starts amm-agent, which loads BPF: run `cargo xtask demo` as root"
        );
    }
    let limit = args.limit_mib << 20;
    let dir = tempfile::tempdir()?;
    let socket: PathBuf = dir.path().join("agent.sock");
    println!(
        "amm demo: a worker under a hard {} cgroup limit, {} times: a managed base of {} (55 %), then {} (45 %) more of unmanaged memory in small tasks, faulted in at full speed.",
        iec(limit),
        args.bursts,
        iec(limit * 55 / 100),
        iec(limit * 45 / 100)
    );
    println!(
        "Running it {} times each, interleaved: acting on a poll every 200 ms (Dask's documented default), and on amm-agent's kernel events ...",
        args.runs
    );
    let (agent, dash) = start(&args, &socket, dir.path())?;
    let mut polls = Vec::new();
    let mut withs = Vec::new();
    let mut shot = None;
    for i in 0..args.runs {
        let p = run_worker(dir.path(), limit, args.bursts, &socket, Mode::Poll)?;
        let agent_run = || run_worker(dir.path(), limit, args.bursts, &socket, Mode::Agent);
        let w = match &dash {
            // the screenshot shows the last run live, the earlier ones ended
            Some(d) if i + 1 == args.runs => std::thread::scope(|s| {
                let run = s.spawn(agent_run);
                std::thread::sleep(Duration::from_millis(1500));
                shot = Some(d.screenshot(&screenshot_path(&args.screenshot)));
                run.join()
                    .unwrap_or_else(|_| bail!("the demo's run panicked"))
            })?,
            _ => agent_run()?,
        };
        println!(
            "  run {:>2}: poll: {:<40} agent: {}",
            i + 1,
            verdict(&p),
            verdict(&w)
        );
        polls.push(p);
        withs.push(w);
    }
    print_table(&polls, &withs, limit);
    print_kernel_events(withs.first().context("no run")?);
    if let Some(d) = &dash {
        let saved = shot.context("no screenshot was taken")??;
        println!();
        println!("The live page during the last run: {}", saved.display());
        if args.linger_s > 0 {
            println!(
                "Keeping {} up for {} s ...",
                d.http.login_url("/"),
                args.linger_s
            );
            std::thread::sleep(Duration::from_secs(args.linger_s));
        }
    }
    drop(dash);
    drop(agent);
    Ok(())
}
