//! `amm-worker -- CMD` with the preload libraries, on real programs nobody
//! wrote for amm: the C driver of `tests/c/driver.c` (compiled here) and
//! Python. On both allocators the supervisor reads the program's allocator
//! record every tick (the split and statistics in its timeline), a purge
//! it asks for under pressure returns a hoard of freed medium objects (its
//! returned bytes in the timeline), and the program's exit status passes
//! through. The abuse case: the record is written by the program, so a
//! hostile or broken one (forged, stuck mid-update, absurd numbers) must
//! neither crash nor stall the supervisor, and a purge request only ever
//! reaches the supervised child.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amm_integration_tests::preload::{Driver, Preload, compile_c, wait_for};
use amm_integration_tests::{bin, profile_dir};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// `amm-worker --allocator A --preload LIB -- argv`, writing its timeline
/// and summary into `dir`, polling every 50 ms.
fn supervised(dir: &Path, preload: Option<Preload>, extra: &[&str], argv: &[&Path]) -> Command {
    let mut c = Command::new(bin("amm-worker"));
    match preload {
        Some(p) => c
            .args(["--allocator", p.allocator().name(), "--preload"])
            .arg(p.path()),
        // plain glibc: the program publishes its own record, or none
        None => c.args([
            "--allocator",
            "system",
            "--preload",
            "/nonexistent/libamm_preload_glibc.so",
        ]),
    };
    c.arg("--timeline")
        .arg(dir.join("timeline.jsonl"))
        .arg("--summary")
        .arg(dir.join("summary.json"))
        .args(["--monitor-interval", "50ms", "--max-restarts", "0"])
        .args(extra)
        .arg("--")
        .args(argv)
        .env("AMM_LOG", "info")
        .env("AMM_PRELOAD_INTERVAL_MS", "20")
        .env_remove("AMM_ALLOCATOR")
        .env_remove("LD_PRELOAD")
        .env_remove("MALLOC_TRIM_THRESHOLD_")
        .env_remove("PYTHONMALLOC")
        .stderr(Stdio::inherit());
    c
}

fn timeline(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("timeline.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn summary(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("the nanny's summary");
    serde_json::from_str(&text).expect("summary JSON")
}

/// The first timeline line `pred` accepts, waiting for it (a bound on
/// waiting, not a timing assertion).
fn line_where(dir: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(90), || {
        timeline(dir).into_iter().find(|v| pred(v))
    })
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn is_tick(v: &Value) -> bool {
    v["kind"] == "tick"
}

fn is_event(v: &Value, name: &str) -> bool {
    v["kind"] == "event" && v["event"] == name
}

#[test]
fn a_purge_under_pressure_returns_a_hoard_of_freed_medium_objects_on_both_allocators() {
    for preload in Preload::BOTH {
        let dir = tempfile::tempdir().expect("tmp");
        let exe = compile_c("driver", dir.path(), &[]).expect("compile driver.c");
        let mut cmd = supervised(
            dir.path(),
            Some(preload),
            &["--memory-limit", "256MiB"],
            &[exe.as_path()],
        );
        // only the supervisor purges: the program's own threshold purges off
        // (glibc keeps its freed chunks too), jemalloc keeps its dirty pages
        cmd.env("MALLOC_TRIM_THRESHOLD_", (1u64 << 40).to_string())
            .env("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
            .env("AMM_PRELOAD_DECAY", "0");
        let mut p = Driver::start(cmd).expect("start amm-worker -- driver");
        let name = preload.allocator().name();

        // the record is read: small objects kept, in the tick's split
        assert_eq!(p.cmd("alloc 24 64").expect("alloc"), "ok alloc");
        let tick = line_where(dir.path(), "a tick with 24 MiB live", |v| {
            is_tick(v) && u(v, "heap_live") >= 24 * MIB
        });
        assert_eq!(tick["heap"]["allocator"], name, "{tick}");
        assert_eq!(tick["managed"], 0, "{tick}");
        let parts = ["unmanaged_live", "hoarded", "non_heap"];
        let sum: u64 = parts.iter().map(|k| u(&tick, k)).sum();
        assert!(
            sum.abs_diff(u(&tick, "process")) <= u(&tick, "rss_moved") + 4 * MIB,
            "{name}: the split does not add up to RSS: {tick}"
        );
        assert!(tick.get("stats_age_ms").is_some(), "{tick}");

        // past spill (179 MiB of 256), then freed but the last block: a hoard
        assert_eq!(p.cmd("alloc 170 16384").expect("alloc"), "ok alloc");
        assert_eq!(p.cmd("free_but_last").expect("free"), "ok free_but_last");
        let purge = line_where(dir.path(), "a pressure purge returning the hoard", |v| {
            is_event(v, "purge") && v["reason"] == "pressure" && u(v, "returned_bytes") >= 128 * MIB
        });
        assert_eq!(purge["allocator"], name, "{purge}");
        // what the supervisor saw before it asked: a purgeable hoard in the
        // record, in a tick before the purge; and the purge's own account:
        // the hoard it found and returned. The supervisor asks as soon as
        // the hoard passes 1 MiB, which may be while the program is still
        // freeing: then no tick sees the whole hoard before the purge
        // returns it (seen once in ~25 runs: the last tick before it had
        // 24 of ~190 MiB freed, the purge 30 ms later returned 200 MB), so
        // the whole hoard's evidence is the purge's, not a tick's. On
        // glibc the record's mallinfo2 is rate-limited by its CPU budget and
        // lags a free of 10,000 chunks (it said 22 of ~170 MiB hoarded): the
        // trim's returned bytes are the evidence.
        if preload == Preload::Jemalloc {
            let tl = timeline(dir.path());
            let at = tl.iter().position(|v| v == &purge).unwrap_or(0);
            let purgeable = |v: &Value| u(&v["heap"], "dirty_bytes") + u(&v["heap"], "muzzy_bytes");
            let seen = tl[..at].iter().filter(|v| is_tick(v)).map(purgeable).max();
            assert!(
                seen.unwrap_or(0) >= MIB,
                "{name}: no tick before the purge showed a purgeable hoard (at most {seen:?} bytes)"
            );
            assert!(
                u(&purge, "hoarded_before") >= 128 * MIB,
                "{name}: the purge found no hoard: {purge}"
            );
        }
        line_where(dir.path(), "a tick after the purge, below target", |v| {
            is_tick(v) && u(v, "heap_live") >= 24 * MIB && u(v, "process") < 150 * MIB
        });
        // the program's own threshold purges were off: every purge was asked
        let tl = timeline(dir.path());
        assert!(
            tl.iter()
                .filter(|v| is_event(v, "purge"))
                .all(|v| v["reason"] == "pressure"),
            "{name}: {:?}",
            tl.iter()
                .filter(|v| is_event(v, "purge"))
                .collect::<Vec<_>>()
        );

        let _ = p.cmd("exit");
        let status = p.finish().expect("wait for amm-worker");
        assert_eq!(status.code(), Some(0), "{name}");
        let s = summary(dir.path());
        assert_eq!(s["attempts"][0]["verdict"]["kind"], "done", "{s}");
    }
}

#[test]
fn a_python_program_runs_on_the_preload_and_its_exit_status_passes_through() {
    for preload in Preload::BOTH {
        let dir = tempfile::tempdir().expect("tmp");
        let script = dir.path().join("job.py");
        std::fs::write(
            &script,
            "import sys, time\nx = bytearray(96 << 20)\nx[::4096] = b'x' * len(x[::4096])\n\
             time.sleep(4)\nsys.exit(5)\n",
        )
        .expect("write job.py");
        let out = supervised(
            dir.path(),
            Some(preload),
            &[],
            &[Path::new("python3"), script.as_path()],
        )
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run amm-worker -- python3 job.py");
        let name = preload.allocator().name();
        assert_eq!(out.status.code(), Some(5), "{name}: the job's own status");
        let tl = timeline(dir.path());
        let tick = tl
            .iter()
            .find(|v| is_tick(v) && u(v, "heap_live") >= 96 * MIB)
            .unwrap_or_else(|| {
                let live: Vec<u64> = tl.iter().map(|v| u(v, "heap_live")).collect();
                panic!(
                    "{name}: no tick with the job's 96 MiB live (heap_live per line: {live:?}); \
                     log: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert_eq!(tick["heap"]["allocator"], name, "{tick}");
        let start = tl
            .iter()
            .find(|v| is_event(v, "start"))
            .expect("start event");
        let lib = preload.path();
        assert_eq!(
            start["preload"].as_str(),
            lib.to_str(),
            "{name}: the start names the library: {start}"
        );
        let s = summary(dir.path());
        assert_eq!(s["attempts"][0]["exit_code"], 5, "{s}");
        assert_eq!(s["attempts"][0]["verdict"]["kind"], "crashed", "{s}");
    }
}

/// `amm-record`'s `publish` example: a process that publishes a record of
/// its own (valid, forged, stuck or absurd).
fn publisher() -> PathBuf {
    let p = profile_dir().join("examples/publish");
    assert!(
        p.exists(),
        "{} missing: `cargo xtask test` builds it (or `cargo build -p amm-record --examples`)",
        p.display()
    );
    p
}

/// What one supervised hostile program left: the supervisor's exit code,
/// its log, what the program printed, the timeline.
struct Hostile {
    code: Option<i32>,
    log: String,
    said: Vec<String>,
    timeline: Vec<Value>,
}

/// Runs `argv` under the supervisor at the spill level (its RSS is above
/// 1 % of a 64 MiB limit; pause and terminate are off) for `secs`, with
/// pressure purges allowed every 500 ms.
fn run_hostile(argv: &[&Path], secs: u64) -> Hostile {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cmd = supervised(
        dir.path(),
        None,
        &[
            "--memory-limit",
            "64MiB",
            "--target",
            "0.005",
            "--spill",
            "0.01",
            "--pause",
            "false",
            "--terminate",
            "false",
            "--purge-interval",
            "500ms",
        ],
        argv,
    );
    let mut child: Child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn amm-worker");
    let stdin = child.stdin.take();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut ready = String::new();
    out.read_line(&mut ready).expect("ready line");
    assert!(ready.starts_with("ready "), "the program said {ready:?}");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    drop(stdin); // the publisher ends when its stdin closes
    let said: Vec<String> = out.lines().map_while(Result::ok).collect();
    let o = child.wait_with_output().expect("wait for amm-worker");
    assert!(
        t0.elapsed() < Duration::from_secs(secs + 60),
        "the supervisor did not end with its program"
    );
    Hostile {
        code: o.status.code(),
        log: String::from_utf8_lossy(&o.stderr).into_owned(),
        said,
        timeline: timeline(dir.path()),
    }
}

#[test]
fn a_hostile_record_never_crashes_nor_misleads_the_supervisor_and_purges_reach_only_the_child() {
    let publish = publisher();

    // absurd numbers (every statistic u64::MAX): clamped, the supervisor
    // lives, and its requests (rate-limited) reach the child itself
    let h = run_hostile(&[&publish, Path::new("--absurd")], 3);
    assert_eq!(h.code, Some(0), "{}", h.log);
    let heaps: Vec<&Value> = h.timeline.iter().filter(|v| is_tick(v)).collect();
    let with_heap = heaps.iter().filter(|v| v.get("heap").is_some()).count();
    assert!(with_heap > 0, "the record was never read: {}", h.log);
    let cap = 1u64 << 48;
    for t in &heaps {
        for k in [
            "heap_live",
            "allocator_resident",
            "hoarded",
            "unmanaged_live",
        ] {
            assert!(u(t, k) <= cap, "{k} not clamped: {t}");
        }
    }
    let asked: Vec<&String> = h
        .said
        .iter()
        .filter(|l| l.starts_with("purge requested by "))
        .collect();
    assert!(!asked.is_empty(), "no pressure purge asked: {}", h.log);
    // at most one per 500 ms over ~3 s (plus the first and slack for the
    // answer's wait): the limit, never a flood
    assert!(
        asked.len() <= 8,
        "not rate-limited: {} requests",
        asked.len()
    );

    // a grandchild with a valid record of its own: the supervisor reads
    // and purges only its child (sh, without a record), never the grandchild
    let script = format!("{} --absurd; exit $?", publish.display());
    let h = run_hostile(&[Path::new("sh"), Path::new("-c"), Path::new(&script)], 3);
    assert_eq!(h.code, Some(0), "{}", h.log);
    assert!(
        !h.said.iter().any(|l| l.starts_with("purge requested")),
        "a purge reached a process other than the child: {:?}",
        h.said
    );
    assert!(
        h.timeline.iter().all(|v| v.get("heap").is_none()),
        "the grandchild's record was read as the child's"
    );

    // forged records (naming another pid, a newer version) are refused and
    // said once; a record stuck mid-update is left alone; RSS ticks go on
    for (forge, says) in [
        ("pid", "refused the allocator record"),
        ("version", "refused the allocator record"),
        ("stuck", "stayed mid-update"),
    ] {
        let h = run_hostile(&[&publish, Path::new("--forge"), Path::new(forge)], 3);
        assert_eq!(h.code, Some(0), "{forge}: {}", h.log);
        assert!(h.log.contains(says), "{forge}: not said: {}", h.log);
        assert!(
            h.log.matches(says).count() <= 2,
            "{forge}: said on every tick: {}",
            h.log
        );
        let ticks: Vec<&Value> = h.timeline.iter().filter(|v| is_tick(v)).collect();
        assert!(!ticks.is_empty(), "{forge}: no tick: {}", h.log);
        assert!(
            ticks.iter().all(|v| v.get("heap").is_none()),
            "{forge}: a refused record was read"
        );
    }
}

/// What glibc's mmap threshold a program gets: on the glibc observer (whose
/// publisher trims past `MALLOC_TRIM_THRESHOLD_`) glibc keeps freed blocks
/// up to 32 MiB for reuse instead of the 128 KiB the trim threshold pins;
/// the user's own threshold stays; jemalloc's program gets none.
#[test]
fn a_glibc_program_amm_trims_keeps_large_blocks_unless_the_user_chose() {
    let dir = tempfile::tempdir().expect("tmp");
    let sh = Path::new("sh");
    let script = Path::new("echo \"${MALLOC_MMAP_THRESHOLD_:-unset} $MALLOC_TRIM_THRESHOLD_\"");
    let argv = [sh, Path::new("-c"), script];
    let said = |preload, mmap: Option<&str>| {
        let mut c = supervised(dir.path(), Some(preload), &[], &argv);
        c.env_remove("MALLOC_MMAP_THRESHOLD_")
            .stdout(Stdio::piped());
        if let Some(m) = mmap {
            c.env("MALLOC_MMAP_THRESHOLD_", m);
        }
        let out = c.output().expect("amm-worker runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(said(Preload::Glibc, None), format!("{} 65536", 32 * MIB));
    assert_eq!(said(Preload::Glibc, Some("131072")), "131072 65536");
    assert_eq!(said(Preload::Jemalloc, None), "unset 65536");
}
