//! The nanny restarts a terminated or crashed worker with back-off, gives up
//! after `--max-restarts`, and forwards SIGTERM.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A worker that always passes terminate: one task ramps to 200 MiB under a
/// 128 MiB limit (terminate needs no cgroup: it acts on RSS vs the limit).
const RAMP: &str = r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "200MiB"
chunk = "1MiB"
keep = "task"
tasks = 1
delay = "8ms"
"#;

#[test]
fn nanny_restarts_a_terminated_worker_and_gives_up_after_the_bound() {
    let s = Scratch::new();
    let w = s.workload("ramp", RAMP);
    let tl = s.path("tl.jsonl");
    let r = run(worker_cmd(
        &s,
        &w,
        &[
            "--memory-limit",
            "128MiB",
            "--monitor-interval",
            "50ms",
            "--max-restarts",
            "2",
            "--restart-backoff",
            "50ms",
            "--name",
            "giveup",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
    ));
    assert_eq!(
        r.code,
        Some(amm_worker::summary::NANNY_GAVE_UP),
        "{}",
        r.describe()
    );
    assert_eq!(r.u64("restarts"), 2);
    assert_eq!(r.u64("terminations"), 3);
    assert_eq!(r.u64("crashes"), 0);
    assert_eq!(r.summary()["gave_up"], true);
    assert_eq!(r.summary()["result_ok"], false);
    let attempts = r.summary()["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3);
    for a in attempts {
        assert_eq!(a["ending"], "terminated", "{a}");
        assert_eq!(a["exit_code"], amm_worker::memory::TERMINATE_EXIT_CODE);
    }
    assert!(
        r.stderr.contains("restarting the worker") && r.stderr.contains("giving up"),
        "restarts not reported: {}",
        tail(&r.stderr, 2000)
    );
    assert!(!s.path("spill").join("amm-spill-giveup").exists());
    // One timeline holds all three attempts, each ending in a terminate.
    let t = timeline(&tl);
    let starts: Vec<u64> = events(&t, "start")
        .iter()
        .map(|e| u(e, "attempt"))
        .collect();
    assert_eq!(starts, vec![0, 1, 2]);
    assert_eq!(events(&t, "terminate").len(), 3);
}

#[test]
fn nanny_restarts_a_crashed_worker_which_then_finishes() {
    let s = Scratch::new();
    let w = s.workload(
        "crash",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "16MiB"
chunk = "1MiB"
keep = "managed"
key = "d"
[[phase]]
[[phase.op]]
op = "crash"
how = "abort"
until-attempt = 1
[[phase]]
[[phase.op]]
op = "read-back"
key = "d"
"#,
    );
    let tl = s.path("tl.jsonl");
    let r = run(worker_cmd(
        &s,
        &w,
        &[
            "--restart-backoff",
            "20ms",
            "--max-restarts",
            "3",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
    ));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.u64("restarts"), 1);
    assert_eq!(r.u64("crashes"), 1);
    assert_eq!(r.u64("terminations"), 0);
    assert_eq!(r.summary()["result_ok"], true);
    let attempts = r.summary()["attempts"].as_array().expect("attempts");
    assert_eq!(attempts[0]["signal"], libc::SIGABRT);
    assert_eq!(attempts[0]["verdict"]["kind"], "crashed");
    assert_eq!(attempts[1]["ending"], "done");
    // the nanny wrote what the aborted worker could not: its exit (who
    // sent the signal: nobody amm knows) and the restart, in the
    // worker's own timeline, between the two attempts' starts; the second
    // worker wrote its own exit
    let t = timeline(&tl);
    let names: Vec<&str> = t
        .iter()
        .filter_map(|v| v["event"].as_str())
        .filter(|e| matches!(*e, "start" | "exit" | "restart"))
        .collect();
    assert_eq!(names, ["start", "exit", "restart", "start", "exit"]);
    let exit = &events(&t, "exit")[0];
    assert_eq!(exit["signal"], libc::SIGABRT, "{exit}");
    assert_eq!(exit["by"]["who"], "unknown", "{exit}");
    assert_eq!(exit["peak_source"], "wait4", "{exit}");
    assert!(u(exit, "peak_rss_bytes") >= 16 << 20, "{exit}");
    for (k, v) in attempts[0]["exit"].as_object().expect("the attempt's exit") {
        assert_eq!(&exit[k], v, "{k}: the summary's exit is the timeline's");
    }
}

#[test]
fn no_nanny_runs_the_worker_alone() {
    let s = Scratch::new();
    let w = s.workload("ramp", RAMP);
    let r = run(worker_cmd(
        &s,
        &w,
        &[
            "--no-nanny",
            "--memory-limit",
            "128MiB",
            "--monitor-interval",
            "50ms",
        ],
    ));
    assert_eq!(r.code, Some(amm_worker::memory::TERMINATE_EXIT_CODE));
    assert_eq!(r.u64("terminations"), 1);
    assert_eq!(r.u64("restarts"), 0);
    assert!(r.summary().get("attempts").is_none(), "a nanny ran");
}

const LONG: &str = r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "8MiB"
chunk = "1MiB"
keep = "managed"
key = "d"
[[phase]]
[[phase.op]]
op = "sleep"
duration = "60s"
"#;

/// Waits until the worker named `name` has spilled a value (it is up).
fn wait_until_spilled(dir: &std::path::Path) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let spilled = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "spill"))
            })
            .unwrap_or(false);
        if spilled {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "worker never started: no spilled value in {}",
        dir.display()
    );
}

/// The pids of `pid`'s children.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Alive and not a zombie.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Issue 9 item 10: SIGKILL of the nanny must not leave its worker running
/// as an orphan. The worker gets SIGTERM from the kernel (PR_SET_PDEATHSIG)
/// and cleans up its spill directory on its way out.
#[test]
fn a_killed_nanny_leaves_no_orphan_worker() {
    let s = Scratch::new();
    let w = s.workload("long", LONG);
    let mut cmd = worker_cmd(&s, &w, &["--name", "orphan", "--target", "0.0000001"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut nanny = cmd.spawn().expect("spawn");
    let dir = s.path("spill").join("amm-spill-orphan");
    wait_until_spilled(&dir);
    let workers = children_of(nanny.id());
    assert_eq!(workers.len(), 1, "the nanny has one worker: {workers:?}");
    let worker = workers[0];
    assert!(running(worker));
    // SAFETY: kill has no memory-safety preconditions; the child is ours.
    unsafe { libc::kill(nanny.id() as i32, libc::SIGKILL) };
    let _ = nanny.wait();
    let start = Instant::now();
    while running(worker) && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let orphan = running(worker);
    if orphan {
        // SAFETY: as above; do not leave it behind even when failing.
        unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    }
    assert!(!orphan, "worker {worker} outlived its SIGKILLed nanny");
    // it ended on SIGTERM, so it removed its spill directory itself
    let start = Instant::now();
    while dir.exists() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !dir.exists(),
        "the orphaned worker left its spill directory"
    );
}

#[test]
fn nanny_forwards_sigterm_and_does_not_restart() {
    let s = Scratch::new();
    let w = s.workload(
        "long",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "8MiB"
chunk = "1MiB"
keep = "managed"
key = "d"
[[phase]]
[[phase.op]]
op = "sleep"
duration = "60s"
"#,
    );
    let mut cmd = worker_cmd(&s, &w, &["--name", "sigtest", "--target", "0.0000001"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    // The worker is up once its spill directory holds a spilled value.
    let dir = s.path("spill").join("amm-spill-sigtest");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let spilled = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "spill"))
            })
            .unwrap_or(false);
        if spilled {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dir.exists(), "worker never started");
    // SAFETY: kill has no memory-safety preconditions; the child is ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = Run::from_output(child.wait_with_output().expect("wait"));
    assert_eq!(r.code, Some(128 + libc::SIGTERM), "{}", r.describe());
    assert_eq!(r.u64("restarts"), 0);
    // a stop asked for is not a crash (issue 9 item 10)
    assert_eq!(r.u64("crashes"), 0, "{}", r.describe());
    assert_eq!(r.u64("terminations"), 0);
    assert_eq!(r.summary()["stopped_by_signal"], libc::SIGTERM);
    let attempts: &Vec<Value> = r.summary()["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1);
    // The worker got the signal and cleaned up itself.
    assert_eq!(attempts[0]["exit_code"], 128 + libc::SIGTERM);
    assert_eq!(attempts[0]["verdict"]["kind"], "stopped");
    assert_eq!(attempts[0]["verdict"]["signal"], libc::SIGTERM);
    assert!(!dir.exists(), "spill directory left behind");
}

/// Workers run on jemalloc unless told otherwise (the mission's default).
#[test]
fn the_default_allocator_is_jemalloc() {
    let s = Scratch::new();
    let w = s.workload(
        "small",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "4MiB"
chunk = "1MiB"
keep = "managed"
key = "d"
"#,
    );
    let r = run(worker_cmd(&s, &w, &[]));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.summary()["allocator"], "jemalloc");
    assert_eq!(r.summary()["allocator_verified"], true);
}
