//! amm-worker on amm-agent's events: it acts between its polls, it keeps
//! working when the agent dies and registers again when it is back. Runs
//! the real binaries as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use amm_integration_tests::{Agent, bin, require_root, spill_then_hold};
use serde_json::Value;

struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    fn new() -> Run {
        Run {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn workload(&self, toml: &str) -> PathBuf {
        let p = self.path("workload.toml");
        std::fs::write(&p, toml).expect("write workload");
        p
    }

    fn worker(&self, workload: &Path, agent: &Agent, extra: &[&str]) -> Command {
        let mut c = Command::new(bin("amm-worker"));
        c.arg("run")
            .arg(workload)
            .arg("--agent")
            .arg(agent.socket())
            .arg("--local-directory")
            .arg(self.dir.path())
            .arg("--timeline")
            .arg(self.path("timeline.jsonl"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn timeline(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("timeline.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn summary(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no summary; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn events<'a>(tl: &'a [Value], name: &str) -> Vec<&'a Value> {
    tl.iter()
        .filter(|v| v["kind"] == "event" && v["event"] == name)
        .collect()
}

#[test]
fn a_registered_worker_spills_on_the_event_before_its_poll() {
    if !require_root("a_registered_worker_spills_on_the_event_before_its_poll") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let run = Run::new();
    // 240 MiB managed (under target, 0.6 of 512 MiB: nothing spills on
    // put), then 160 MiB unmanaged lifts the process past spill (0.7)
    let w = run.workload(&spill_then_hold("2s"));
    // a 10 s poll: its first tick is at the start, its second would come
    // long after the workload ended; only the agent's event can explain a
    // spill in between
    let out = run
        .worker(
            &w,
            &agent,
            &[
                "--no-nanny",
                "--memory-limit",
                "512MiB",
                "--monitor-interval",
                "10s",
            ],
        )
        .output()
        .expect("run amm-worker");
    let s = summary(&out);
    assert_eq!(s["exit_code"], 0, "{s}");
    assert!(s["agent_events"].as_u64().unwrap_or(0) >= 1, "{s}");
    let tl = run.timeline();
    // the kernel's level crossings, relayed by the agent (typed: the
    // timeline contract is what the worker writes)
    let kernel = events(&tl, "level");
    let first_spill_event = kernel
        .iter()
        .find(|e| {
            serde_json::from_value::<amm_timeline::Line>((**e).clone()).is_ok_and(|l| {
                matches!(
                    l.entry,
                    amm_timeline::Entry::Event(amm_timeline::Event::Level(x))
                        if x.to == amm_timeline::Level::Spill
                )
            })
        })
        .unwrap_or_else(|| panic!("no spill event from the agent: {tl:?}"));
    let spills = events(&tl, "spill");
    let spill = spills
        .first()
        .unwrap_or_else(|| panic!("the worker never spilled: {s}"));
    let (t_event, t_spill) = (
        first_spill_event["t_ms"].as_u64().unwrap_or(u64::MAX),
        spill["t_ms"].as_u64().unwrap_or(u64::MAX),
    );
    assert!(
        t_spill >= t_event && t_spill < 10_000,
        "spilled at {t_spill} ms, the event came at {t_event} ms, the second poll is at 10 000 ms"
    );
    let ticks = tl.iter().filter(|v| v["kind"] == "tick").count();
    assert!(s["spill_count"].as_u64().unwrap_or(0) >= 1);
    eprintln!(
        "event at {t_event} ms, spill at {t_spill} ms, {ticks} ticks, delay {} us",
        first_spill_event["delay_us"]
    );
}

#[test]
fn the_worker_outlives_the_agent_and_registers_again() {
    if !require_root("the_worker_outlives_the_agent_and_registers_again") {
        return;
    }
    let mut agent = Agent::start().expect("agent");
    let run = Run::new();
    let w = run.workload(
        r#"
[[phase]]
name = "managed"
[[phase.op]]
op = "allocate"
bytes = "64MiB"
chunk = "4MiB"
keep = "managed"
key = "m"
[[phase]]
name = "wait"
[[phase.op]]
op = "sleep"
duration = "5s"
[[phase]]
name = "more"
[[phase.op]]
op = "allocate"
bytes = "64MiB"
chunk = "4MiB"
keep = "managed"
key = "n"
[[phase.op]]
op = "read-back"
key = "m"
"#,
    );
    let child = run
        .worker(
            &w,
            &agent,
            &[
                "--no-nanny",
                "--memory-limit",
                "1GiB",
                "--monitor-interval",
                "100ms",
            ],
        )
        .spawn()
        .expect("start amm-worker");
    // registered, then the agent dies mid-run and comes back
    let deadline = Instant::now() + Duration::from_secs(20);
    while events(&run.timeline(), "agent_connected").is_empty() {
        assert!(Instant::now() < deadline, "the worker never registered");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while events(&run.timeline(), "agent_lost").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the worker never noticed the agent died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.restart().expect("agent back");
    let out = child.wait_with_output().expect("amm-worker");
    let s = summary(&out);
    assert_eq!(s["exit_code"], 0, "the worker finished on polling: {s}");
    assert_eq!(s["result_ok"], true, "{s}");
    assert_eq!(s["agent_lost"], 1, "one outage, reported once: {s}");
    assert_eq!(s["agent_connects"], 2, "registered again: {s}");
    let mut client = agent.client().expect("client");
    let status = client.status().expect("status");
    let pid = events(&run.timeline(), "start")
        .first()
        .and_then(|e| e["pid"].as_u64())
        .expect("the worker's pid") as u32;
    assert!(
        status.ended.iter().any(|w| w.pid == pid),
        "the restarted agent watched the worker until it exited: {status:?}"
    );
}

#[test]
fn terminate_at_the_page_keeps_the_worker_under_its_hard_limit() {
    if !require_root("terminate_at_the_page_keeps_the_worker_under_its_hard_limit") {
        return;
    }
    const LIMIT: u64 = 512 << 20;
    let agent = Agent::start().expect("agent");
    let run = Run::new();
    // twice the limit of task memory, as fast as it can be faulted in
    let w = run.workload(
        r#"
[[phase]]
name = "runaway"
[[phase.op]]
op = "allocate"
bytes = "1GiB"
chunk = "8MiB"
keep = "unmanaged"
key = "u"
tasks = 1
"#,
    );
    let cg = amm_integration_tests::cgroup::HardLimit::create("terminate-page", LIMIT)
        .expect("a hard-limit cgroup");
    let mut cmd = run.worker(
        &w,
        &agent,
        &[
            "--memory-limit",
            "512MiB",
            "--max-restarts",
            "1",
            "--restart-backoff",
            "100ms",
        ],
    );
    cg.enter_before_exec(&mut cmd).expect("enter the cgroup");
    let out = cmd.output().expect("run amm-worker");
    let s = summary(&out);
    let oom = cg.oom_kills().expect("oom count");
    let peak = cg.peak_bytes().expect("peak").unwrap_or(0);
    eprintln!(
        "peak cgroup usage {peak} of {LIMIT}; oom kills {oom}; attempts {}",
        s["attempts"]
    );
    assert_eq!(oom, 0, "the kernel's OOM killer acted: {s}");
    if peak > 0 {
        assert!(peak < LIMIT, "the cgroup reached its limit: {peak}");
    }
    assert_eq!(s["restarts"], 1, "the nanny restarted it: {s}");
    assert_eq!(
        s["terminations"], 2,
        "both attempts ended at terminate: {s}"
    );
    let attempts = s["attempts"].as_array().expect("attempts");
    assert!(
        attempts
            .iter()
            .all(|a| a["ending"] == "terminated at the page by amm-agent"),
        "{s}"
    );
    assert_eq!(s["gave_up"], true);
}

#[test]
fn a_worker_report_through_the_agent_finds_the_leak_the_timeline_shows() {
    if !require_root("a_worker_report_through_the_agent_finds_the_leak_the_timeline_shows") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let run = Run::new();
    let suite =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/suite/leak-medium.toml");
    let out = run
        .worker(&suite, &agent, &["--memory-limit", "4GiB"])
        .output()
        .expect("amm-worker");
    let s = summary(&out);
    assert_eq!(s["exit_code"], 0, "{s}");
    let pid = events(&run.timeline(), "start")
        .first()
        .and_then(|e| e["pid"].as_u64())
        .expect("the worker's pid") as u32;
    // the agent keeps an ended worker's timeline: report from it
    let report = |args: &[&str]| -> Value {
        let out = Command::new(bin("amm-worker"))
            .arg("report")
            .arg("--json")
            .args(args)
            .output()
            .expect("amm-worker report");
        assert!(
            out.status.success(),
            "report {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("report --json is JSON")
    };
    let socket = agent.socket().display().to_string();
    let live = report(&["--agent", &socket, "--pid", &pid.to_string()]);
    assert_eq!(live["source"], "agent_timeline", "{}", live["run"]);
    assert_eq!(live["allocator"]["available"], false);
    assert!(
        live["run"]["ticks"].as_u64().unwrap_or(0) >= 20,
        "the worker pushed its split every tick: {}",
        live["run"]
    );
    assert_eq!(live["verdict"]["kind"], "leak", "{}", live["verdict"]);
    // the same verdict as the worker's own timeline
    let tl = run.path("timeline.jsonl").display().to_string();
    let file = report(&[&tl]);
    assert_eq!(file["verdict"]["kind"], "leak", "{}", file["verdict"]);
    // a pid the agent never watched is a clear error
    let out = Command::new(bin("amm-worker"))
        .args(["report", "--agent", &socket, "--pid", "1"])
        .output()
        .expect("amm-worker report");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no timeline for pid 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
