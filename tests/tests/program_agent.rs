//! `amm-worker --agent SOCKET -- CMD`: any program registered with the real
//! amm-agent by its nanny before its first page, killed by the kernel at
//! the page that crosses terminate, and the end explained. Runs the real
//! binaries as root, with BPF.

use std::path::Path;
use std::process::{Command, Stdio};

use amm_integration_tests::{Agent, bin, require_root};
use serde_json::Value;

fn program(dir: &Path, agent: &Agent, extra: &[&str], argv: &[&str]) -> Command {
    let mut c = Command::new(bin("amm-worker"));
    c.args([
        "--allocator",
        "system",
        "--preload",
        "/nonexistent/libamm_preload.so",
    ])
    .arg("--agent")
    .arg(agent.socket())
    .arg("--summary")
    .arg(dir.join("summary.json"))
    .arg("--timeline")
    .arg(dir.join("timeline.jsonl"))
    .args(extra)
    .arg("--")
    .args(argv)
    .env("AMM_LOG", "info")
    .env_remove("AMM_ALLOCATOR")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
}

fn timeline(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn the_kernel_kills_a_program_at_the_terminate_page_and_the_nanny_says_so() {
    if !require_root("the_kernel_kills_a_program_at_the_terminate_page_and_the_nanny_says_so") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let dir = tempfile::tempdir().expect("tmp");
    // polling every 10 s: only the kernel can stop it at the page
    let out = program(
        dir.path(),
        &agent,
        &[
            "--memory-limit",
            "128MiB",
            "--monitor-interval",
            "10s",
            "--max-restarts",
            "0",
        ],
        &[
            "python3",
            "-c",
            "import time\nx = b'x' * (400 << 20)\ntime.sleep(30)\n",
        ],
    )
    .output()
    .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGKILL),
        "stderr:\n{stderr}\nagent:\n{}",
        agent.log()
    );
    let s = read_json(&dir.path().join("summary.json"));
    let a = &s["attempts"][0];
    assert_eq!(
        a["verdict"],
        serde_json::json!({"kind": "terminated", "by": "kernel"}),
        "{s}"
    );
    let cause = a["cause"].as_str().expect("cause");
    assert!(cause.contains("kernel program at the page"), "{cause}");
    // at the page: 95 % of 128 MiB, give or take the page the fault mapped
    let tl = timeline(&dir.path().join("timeline.jsonl"));
    let kill = tl
        .iter()
        .find(|v| v["event"] == "level" && v["to"] == "terminate")
        .unwrap_or_else(|| panic!("no terminate event: {tl:?}"));
    assert_eq!(kill["signalled"], true);
    let rss = kill["rss"].as_u64().expect("rss");
    let at = (128u64 << 20) * 95 / 100;
    assert!(
        rss >= at && rss < at + (2 << 20),
        "killed at {rss}, terminate {at}"
    );
    assert!(
        a["max_rss_bytes"].as_u64().expect("peak") < 128 << 20,
        "{a}"
    );
    let exit = tl
        .iter()
        .find(|v| v["event"] == "exit")
        .expect("exit event");
    assert_eq!(exit["signal"], libc::SIGKILL);
    assert_eq!(exit["by"]["who"], "kernel_terminate", "{exit}");
    assert_eq!(exit["level"], "terminate", "{exit}");
    assert_eq!(exit["rss_bytes"], kill["rss"], "{exit}");
}
