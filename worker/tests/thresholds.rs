//! Each threshold acts at its fraction of a real cgroup v1/v2 hard limit:
//! the worker detects the limit from its own cgroup (`--memory-limit auto`),
//! and its timeline shows that no tick above a threshold passed without the
//! action, and that no action came before the threshold was crossed.

mod common;

use common::*;

const LIMIT: u64 = 256 * MIB;

/// The fraction of the limit at each tick line before timeline index `i`.
fn fractions_before(tl: &[serde_json::Value], i: usize) -> Vec<f64> {
    tl[..i]
        .iter()
        .filter(|v| v["kind"] == "tick")
        .map(|v| f(v, "fraction"))
        .collect()
}

#[test]
fn target_spills_managed_memory_at_its_fraction() {
    if !require_root("target_spills_managed_memory_at_its_fraction") {
        return;
    }
    let s = Scratch::new();
    let cg = TestCgroup::new("target", LIMIT);
    // 0.7 of the limit as managed values, 2 MiB at a time.
    let w = s.workload(
        "target",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "180MiB"
chunk = "2MiB"
keep = "managed"
key = "d"
tasks = 1
delay = "5ms"
[[phase]]
[[phase.op]]
op = "sleep"
duration = "300ms"
"#,
    );
    let tl = s.path("tl.jsonl");
    let mut cmd = worker_cmd(
        &s,
        &w,
        &[
            "--no-nanny",
            "--monitor-interval",
            "50ms",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
    );
    cg.enter(&mut cmd);
    let r = run(cmd);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(
        r.u64("limit_bytes"),
        LIMIT,
        "limit not taken from the cgroup"
    );
    assert!(
        r.summary()["limit_source"]
            .as_str()
            .is_some_and(|s| s.contains("memory.")),
        "{}",
        r.describe()
    );
    let target = (LIMIT as f64 * 0.6) as u64;
    let tl = timeline(&tl);
    let ticks = ticks(&tl);
    assert!(ticks.len() > 5, "too few ticks");
    // Never above target by more than one value plus its overhead (put spills
    // the LRU value as soon as managed passes target)...
    let slack = 2 * MIB + 4096;
    for t in &ticks {
        let managed = u(t, "managed");
        assert!(
            managed <= target + slack,
            "managed {managed} > target {target}"
        );
        // ...and nothing spilled while managed was below target.
        if t["spill"]["spill_count"] == 0 {
            assert!(managed <= target + slack);
        }
    }
    let first_spilled = ticks
        .iter()
        .position(|t| u(&t["spill"], "spill_count") > 0)
        .expect("never spilled");
    // The tick before the first finished spill may catch the first eviction
    // in flight (a value being written still counts as managed).
    let before = u(ticks[first_spilled - 1], "managed");
    assert!(
        before <= target + slack,
        "spilled only after managed was {before} > {target}"
    );
    // It used its budget: managed reached the target before spilling began.
    let max_managed = ticks.iter().map(|t| u(t, "managed")).max().unwrap_or(0);
    assert!(
        max_managed + 3 * slack >= target,
        "spilled too early: managed peaked at {max_managed}, target {target}"
    );
    assert!(r.u64("spill_count") >= 10);
    assert_eq!(cg.oom_kills(), 0);
}

fn spill_case(allocator: &str) {
    let s = Scratch::new();
    let cg = TestCgroup::new(&format!("spill-{allocator}"), LIMIT);
    // 0.5 of the limit managed (under target), then unmanaged memory ramps
    // the process past 0.7: the manager must spill managed values until the
    // process is back at target (0.6).
    let w = s.workload(
        "spill",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "128MiB"
chunk = "2MiB"
keep = "managed"
key = "d"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "64MiB"
chunk = "1MiB"
keep = "unmanaged"
key = "u"
tasks = 1
delay = "40ms"
[[phase]]
[[phase.op]]
op = "sleep"
duration = "300ms"
"#,
    );
    let tl = s.path("tl.jsonl");
    let mut cmd = worker_cmd(
        &s,
        &w,
        &[
            // Without the nanny a glibc worker has no MALLOC_TRIM_THRESHOLD_:
            // glibc's dynamic mmap threshold then keeps freed 2 MiB values in
            // its heap, and only a trim makes a spill show in RSS.
            "--no-nanny",
            "--allocator",
            allocator,
            "--monitor-interval",
            "50ms",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
    );
    cg.enter(&mut cmd);
    let r = run(cmd);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.summary()["allocator"], allocator);
    let tl = timeline(&tl);
    let i = first_event(&tl, "spill", |e| e["reason"] == "process")
        .unwrap_or_else(|| panic!("no process spill; {}", r.describe()));
    let at = tick_before(&tl, i).expect("tick before spill");
    assert!(f(at, "fraction") > 0.7, "spilled at {}", f(at, "fraction"));
    for fr in fractions_before(&tl, i).iter().rev().skip(1) {
        assert!(*fr <= 0.7, "a tick at {fr} > 0.7 passed without spilling");
    }
    let e = &tl[i];
    let goal = u(e, "goal");
    assert_eq!(goal, (LIMIT as f64 * 0.6) as u64, "spill goal is target");
    assert!(
        u(e, "process_after") <= goal + 4 * MIB,
        "spilled only down to {} (goal {goal}): {e}",
        u(e, "process_after")
    );
    // And not much further: what the allocator kept was purged instead of
    // spilling every value to make RSS move. What is needed is the excess at
    // the start plus what the 64 MiB unmanaged ramp may still add while the
    // spill runs (on a loaded machine a spill takes over a second and the
    // ramp goes on).
    let ramp_left = (64 * MIB).saturating_sub(u(at, "unmanaged_live"));
    let needed = u(e, "process_before") - goal + ramp_left;
    assert!(
        u(e, "bytes") <= needed + 24 * MIB,
        "{allocator}: spilled {} MiB where {} MiB were needed (the ramp had {} MiB to go): {e}",
        u(e, "bytes") / MIB,
        needed / MIB,
        ramp_left / MIB
    );
    assert!(r.u64("spill_count") > 0);
    assert_eq!(cg.oom_kills(), 0);
}

#[test]
fn spill_acts_on_process_memory_at_its_fraction_jemalloc() {
    if require_root("spill_acts_on_process_memory_at_its_fraction_jemalloc") {
        spill_case("jemalloc");
    }
}

#[test]
fn spill_acts_on_process_memory_at_its_fraction_system() {
    if require_root("spill_acts_on_process_memory_at_its_fraction_system") {
        spill_case("system");
    }
}

fn pause_case(allocator: &str) {
    let s = Scratch::new();
    let cg = TestCgroup::new(&format!("pause-{allocator}"), LIMIT);
    // One task ramps to 0.88 of the limit and holds it; meanwhile the other
    // thread runs short tasks. Past 0.8 no new task may start; the running
    // ramp task goes on, ends and frees its memory; below 0.8 tasks resume.
    let w = s.workload(
        "pause",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "225MiB"
chunk = "1MiB"
keep = "task"
tasks = 1
delay = "6ms"
hold = "1s"
[[phase.op]]
op = "sleep"
duration = "10ms"
tasks = 500
"#,
    );
    let tl = s.path("tl.jsonl");
    let mut cmd = worker_cmd(
        &s,
        &w,
        &[
            "--no-nanny",
            "--allocator",
            allocator,
            "--nthreads",
            "2",
            "--monitor-interval",
            "50ms",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
    );
    cg.enter(&mut cmd);
    let r = run(cmd);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    let tl = timeline(&tl);
    let p = first_event(&tl, "pause", |_| true)
        .unwrap_or_else(|| panic!("never paused; {}", r.describe()));
    // The pause event carries the measurement it was decided on (the
    // freshest one: after a purge or a spill attempt the manager reads RSS
    // again, and a ramp keeps growing meanwhile).
    let pe = &tl[p];
    assert!(f(pe, "fraction") > 0.8, "paused at {pe}");
    assert_eq!(pe["reason"], "pause threshold", "{pe}");
    for fr in fractions_before(&tl, p).iter().rev().skip(1) {
        assert!(*fr <= 0.8, "a tick at {fr} > 0.8 passed without pausing");
    }
    let up = first_event(&tl, "unpause", |_| true).expect("never unpaused");
    assert!(up > p);
    let (pe, ue) = (&tl[p], &tl[up]);
    assert!(
        u(pe, "tasks_started") < 501,
        "all tasks had started before the pause: nothing to hold back"
    );
    assert_eq!(
        u(pe, "tasks_started"),
        u(ue, "tasks_started"),
        "a task started while paused"
    );
    assert!(
        u(ue, "tasks_finished") > u(pe, "tasks_finished"),
        "the running task did not go on while paused"
    );
    assert!(
        f(ue, "fraction") <= 0.8,
        "unpaused at {}",
        f(ue, "fraction")
    );
    // All of it was task memory: past spill the manager found nothing to
    // spill and said so, once for the one rise, before pausing.
    let nothing: Vec<usize> = (0..tl.len())
        .filter(|&i| tl[i]["kind"] == "event" && tl[i]["event"] == "nothing_to_spill")
        .collect();
    assert_eq!(nothing.len(), 1, "nothing_to_spill events: {nothing:?}");
    let n = &tl[nothing[0]];
    assert_eq!(u(n, "managed"), 0, "{n}");
    assert!(u(n, "process") > (LIMIT as f64 * 0.7) as u64, "{n}");
    assert!(nothing[0] < p, "said nothing to spill only after pausing");
    for fr in fractions_before(&tl, nothing[0]).iter().rev().skip(1) {
        assert!(*fr <= 0.7, "a tick at {fr} > 0.7 passed without a decision");
    }
    assert!(
        !tl.iter()
            .any(|v| v["event"] == "spill" && v["reason"] == "process"),
        "spilled process memory with no managed value"
    );
    assert!(r.u64("paused_ms") > 0);
    assert_eq!(r.u64("tasks"), 501);
    assert_eq!(cg.oom_kills(), 0);
}

#[test]
fn pause_holds_new_tasks_and_lets_running_ones_finish_system() {
    if require_root("pause_holds_new_tasks_and_lets_running_ones_finish_system") {
        pause_case("system");
    }
}

#[test]
fn pause_holds_new_tasks_and_lets_running_ones_finish_jemalloc() {
    if require_root("pause_holds_new_tasks_and_lets_running_ones_finish_jemalloc") {
        pause_case("jemalloc");
    }
}

#[test]
fn terminate_exits_with_its_code_at_its_fraction() {
    if !require_root("terminate_exits_with_its_code_at_its_fraction") {
        return;
    }
    let s = Scratch::new();
    let cg = TestCgroup::new("terminate", LIMIT);
    let w = s.workload(
        "terminate",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "300MiB"
chunk = "1MiB"
keep = "task"
tasks = 1
delay = "12ms"
"#,
    );
    let tl = s.path("tl.jsonl");
    let mut cmd = worker_cmd(
        &s,
        &w,
        &[
            "--no-nanny",
            "--monitor-interval",
            "50ms",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
    );
    cg.enter(&mut cmd);
    let r = run(cmd);
    assert_eq!(
        r.code,
        Some(amm_worker::memory::TERMINATE_EXIT_CODE),
        "{}",
        r.describe()
    );
    assert_eq!(r.u64("terminations"), 1);
    assert_eq!(r.summary()["result_ok"], false);
    let tl = timeline(&tl);
    let t = first_event(&tl, "terminate", |_| true).expect("no terminate event");
    let at = tick_before(&tl, t).expect("tick");
    assert!(
        f(at, "fraction") > 0.95,
        "terminated at {}",
        f(at, "fraction")
    );
    for fr in fractions_before(&tl, t).iter().rev().skip(1) {
        assert!(
            *fr <= 0.95,
            "a tick at {fr} > 0.95 passed without terminating"
        );
    }
    // It paused on the way (the running task went on) and was not OOM-killed.
    assert!(first_event(&tl, "pause", |_| true).is_some());
    assert_eq!(cg.oom_kills(), 0);
    assert!(
        !s.path("spill").join("amm-spill").exists()
            && std::fs::read_dir(s.path("spill")).map_or(0, |d| d.count()) == 0,
        "spill directory left behind"
    );
}
