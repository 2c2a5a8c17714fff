//! Spilling under a real cgroup hard limit: `matmul` finishes with the right
//! result where the same run without spilling is OOM-killed; reading back
//! more spilled data than fits does not kill the worker; spilled bytes leave
//! the cgroup's page cache. A full spill disk: `full_disk.rs`.

mod common;

use common::*;

const MATMUL: &str = r#"
# A and C are 72 MiB each: 144 MiB of blocks alive under a 128 MiB limit.
[[phase]]
[[phase.op]]
op = "matmul"
n = 3072
block = 384
"#;

#[test]
fn matmul_finishes_with_spilling_and_is_oom_killed_without() {
    if !require_root("matmul_finishes_with_spilling_and_is_oom_killed_without") {
        return;
    }
    let s = Scratch::new();
    let w = s.workload("matmul", MATMUL);
    let limit = 128 * MIB;

    let cg = TestCgroup::new("mm-spill", limit);
    let mut cmd = worker_cmd(&s, &w, &["--no-nanny", "--monitor-interval", "50ms"]);
    cg.enter(&mut cmd);
    let r = run(cmd);
    assert_eq!(r.code, Some(0), "with spilling: {}", r.describe());
    assert_eq!(r.summary()["result_ok"], true);
    assert!(r.u64("spill_count") > 0, "never spilled");
    assert!(r.u64("peak_rss_bytes") < limit);
    assert_eq!(cg.oom_kills(), 0);
    drop(cg);

    let cg = TestCgroup::new("mm-nospill", limit);
    let mut cmd = worker_cmd(
        &s,
        &w,
        &[
            "--no-nanny",
            "--target",
            "false",
            "--spill",
            "false",
            // Pausing without spilling would wait forever, and terminate
            // would exit before the kernel acts: both off, as in a worker
            // whose thresholds are all disabled.
            "--pause",
            "false",
            "--terminate",
            "false",
        ],
    );
    cg.enter(&mut cmd);
    let r = run(cmd);
    assert_eq!(
        r.signal,
        Some(libc::SIGKILL),
        "without spilling: {}",
        r.describe()
    );
    assert!(cg.oom_kills() >= 1, "killed, but not by the OOM killer");
}

#[test]
fn reading_back_more_than_fits_does_not_kill_the_worker() {
    if !require_root("reading_back_more_than_fits_does_not_kill_the_worker") {
        return;
    }
    // Dask unspills every requested key at once; asked for 1.5x its limit of
    // spilled data, a worker must bring values back a few at a time.
    let s = Scratch::new();
    let limit = 128 * MIB;
    let w = s.workload(
        "readback",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "192MiB"
chunk = "2MiB"
keep = "managed"
key = "d"
[[phase]]
[[phase.op]]
op = "read-back"
key = "d"
[[phase]]
[[phase.op]]
op = "read-back"
key = "d"
"#,
    );
    for allocator in ["system", "jemalloc"] {
        let cg = TestCgroup::new(&format!("readback-{allocator}"), limit);
        let mut cmd = worker_cmd(
            &s,
            &w,
            &[
                "--no-nanny",
                "--allocator",
                allocator,
                "--monitor-interval",
                "50ms",
            ],
        );
        cg.enter(&mut cmd);
        let r = run(cmd);
        assert_eq!(r.code, Some(0), "{allocator}: {}", r.describe());
        assert_eq!(r.summary()["result_ok"], true);
        // Every value was read back at least once per read-back phase.
        assert!(r.u64("unspill_count") >= 96, "{}", r.describe());
        assert!(r.u64("unspilled_bytes_total") >= 192 * MIB);
        assert!(r.u64("peak_rss_bytes") < limit);
        assert_eq!(cg.oom_kills(), 0, "{allocator}: OOM kill");
    }
}

fn last_tick_cgroup(tl: &[serde_json::Value]) -> (u64, u64, u64) {
    let t = ticks(tl).last().copied().cloned().expect("no tick");
    let cg = &t["cgroup"];
    (u(cg, "usage"), u(cg, "file"), u(&t, "process"))
}

#[test]
fn spilled_bytes_leave_the_cgroup_page_cache() {
    if !require_root("spilled_bytes_leave_the_cgroup_page_cache") {
        return;
    }
    // 192 MiB of managed data with a 5% target of 512 MiB: nearly all of it
    // is spilled. The page cache holding the spill files is charged to the
    // worker's cgroup; with write-back + DONTNEED it must be gone, without
    // it (--no-drop-cache) it stays charged.
    let s = Scratch::new();
    let w = s.workload(
        "pagecache",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "192MiB"
chunk = "4MiB"
keep = "managed"
key = "d"
[[phase]]
[[phase.op]]
op = "sleep"
duration = "400ms"
"#,
    );
    let mut results = Vec::new();
    for drop_cache in [true, false] {
        let cg = TestCgroup::new(&format!("pc-{drop_cache}"), 1024 * MIB);
        let tl = s.path(&format!("tl-{drop_cache}.jsonl"));
        let mut args = vec![
            "--no-nanny",
            "--target",
            "0.05",
            "--memory-limit",
            "512MiB",
            "--monitor-interval",
            "100ms",
            "--timeline",
            tl.to_str().expect("utf8"),
        ];
        if !drop_cache {
            args.push("--no-drop-cache");
        }
        let mut cmd = worker_cmd(&s, &w, &args);
        cg.enter(&mut cmd);
        let r = run(cmd);
        assert_eq!(r.code, Some(0), "{}", r.describe());
        assert!(
            r.u64("written_bytes_total") >= 160 * MIB,
            "{}",
            r.describe()
        );
        results.push(last_tick_cgroup(&timeline(&tl)));
    }
    let (usage_drop, file_drop, rss_drop) = results[0];
    let (usage_keep, file_keep, _) = results[1];
    eprintln!(
        "with drop: usage {} MiB, file cache {} MiB, rss {} MiB; without: usage {} MiB, file cache {} MiB",
        usage_drop / MIB,
        file_drop / MIB,
        rss_drop / MIB,
        usage_keep / MIB,
        file_keep / MIB
    );
    assert!(
        file_drop < 16 * MIB,
        "spilled bytes still in the cgroup's page cache: {} MiB",
        file_drop / MIB
    );
    assert!(
        usage_drop < rss_drop + 48 * MIB,
        "cgroup usage {} MiB far above RSS {} MiB",
        usage_drop / MIB,
        rss_drop / MIB
    );
    assert!(
        file_keep > 120 * MIB,
        "without dropping, the cache should hold the spill files ({} MiB)",
        file_keep / MIB
    );
    assert!(usage_keep > usage_drop + 100 * MIB);
}
