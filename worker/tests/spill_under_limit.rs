//! Spilling under a real cgroup hard limit: `matmul` finishes with the right
//! result where the same run without spilling is OOM-killed; reading back
//! more spilled data than fits does not kill the worker; spilled bytes leave
//! the cgroup's page cache; a full spill disk pauses the worker instead of
//! killing it.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

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

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mkdir");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs failed");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_spill_disk_pauses_instead_of_dying() {
    if !require_root("full_spill_disk_pauses_instead_of_dying") {
        return;
    }
    let s = Scratch::new();
    let disk = s.path("small-disk");
    let _fs = Tmpfs::mount(&disk, "8m");
    // 0.75 of a 256 MiB limit as managed values: above spill (0.7), below
    // pause (0.8). Spilling fails after 8 MiB, so the manager must pause
    // (and not die, not lose data); SIGTERM then ends it cleanly.
    let w = s.workload(
        "full",
        r#"
[[phase]]
[[phase.op]]
op = "allocate"
bytes = "184MiB"
chunk = "2MiB"
keep = "managed"
key = "d"
[[phase]]
[[phase.op]]
op = "sleep"
duration = "60s"
"#,
    );
    let tl = s.path("tl.jsonl");
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("run")
        .arg(&w)
        .args([
            "--no-nanny",
            "--memory-limit",
            "256MiB",
            "--monitor-interval",
            "50ms",
            "--name",
            "fulldisk",
            "--timeline",
        ])
        .arg(&tl)
        .arg("--local-directory")
        .arg(&disk)
        .env_remove("AMM_ALLOCATOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    let start = Instant::now();
    let mut paused = None;
    while start.elapsed() < Duration::from_secs(60) {
        let t = timeline(&tl);
        if let Some(i) = first_event(&t, "pause", |e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("spilling failed"))
        }) {
            paused = Some(t[i].clone());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill has no memory-safety preconditions; the child is ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = Run::from_output(child.wait_with_output().expect("wait"));
    let paused = paused.unwrap_or_else(|| panic!("never paused on a full disk: {}", r.describe()));
    let t = timeline(&tl);
    let failed = events(&t, "spill_failed");
    assert!(
        failed.iter().any(|e| e["error"]
            .as_str()
            .is_some_and(|m| m.contains("no space left") && m.contains("key"))),
        "no clean disk-full error: {failed:?}"
    );
    assert!(
        f(&paused, "fraction") < 0.8,
        "paused by the pause threshold instead"
    );
    assert_eq!(r.code, Some(128 + libc::SIGTERM), "{}", r.describe());
    assert!(r.u64("spill_failures") > 0);
    // Nothing was lost before the stop: every value is either in memory or
    // fully on disk (the summary counts what was written successfully).
    assert!(r.u64("spill_count") >= 1 && r.u64("spill_count") <= 4);
    let left: Vec<_> = std::fs::read_dir(&disk)
        .expect("read tmpfs")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "spill directory not cleaned: {left:?}");
}
