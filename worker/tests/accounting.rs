//! The accounting split adds up to the kernel's RSS on both allocators, each
//! part is where the workload put its bytes, and a hoard followed by a
//! purge/trim gives memory back with the accounting saying where it went.
//! Also: the allocator named on the command line is the one serving
//! allocations.

mod common;

use common::*;
use serde_json::Value;

/// The identity may miss only by the allocators' own rounding. Stated
/// tolerance: 2 MiB or 1% of RSS, whichever is larger, plus, for jemalloc,
/// `stats.active - stats.allocated`: the slab slack and the page of padding
/// each large extent gets (cache-oblivious placement), which jemalloc counts
/// as resident although no program ever touches them. Plus `rss_moved`: how
/// far RSS moved while the worker read its allocator (a task trimming or
/// allocating at that moment), which the worker measures and reports.
fn tolerance(t: &Value) -> u64 {
    let base = (2 * MIB).max(u(t, "process") / 100) + u(t, "rss_moved");
    let h = &t["heap"];
    if h["allocator"] == "jemalloc" {
        base + u(h, "active").saturating_sub(u(h, "allocated"))
    } else {
        base
    }
}

fn check_identity(ticks: &[&Value], allocator: &str) -> u64 {
    let mut worst = 0;
    for t in ticks {
        let process = u(t, "process");
        let parts = u(t, "managed") + u(t, "unmanaged_live") + u(t, "hoarded") + u(t, "non_heap");
        let err = parts.abs_diff(process);
        worst = worst.max(err);
        assert!(
            err <= tolerance(t),
            "{allocator}: parts {parts} vs process {process} (error {err}) at {t}"
        );
    }
    worst
}

/// The ticks measured wholly in the phase named `name`: written after its
/// `phase` event and before the next phase (or the end), so measured before
/// that began, and begun after the phase's event (`t_ns`, when a tick's
/// measurement began). Under load a measurement spans tens of ms: one begun
/// before the phase and written after its event read 62.7 MiB of the 64 MiB
/// the previous phase's tasks were still allocating; one begun before the
/// end and written after it read 57.5 MiB while the workload's data was
/// being freed.
fn phase_ticks<'a>(tl: &'a [Value], name: &str) -> Vec<&'a Value> {
    let Some(start) = first_event(tl, "phase", |e| e["name"] == name) else {
        return Vec::new();
    };
    let t_ns = |v: &Value| v["t_ns"].as_u64().expect("every line has t_ns");
    let from = t_ns(&tl[start]);
    tl[start + 1..]
        .iter()
        .take_while(|v| !(v["kind"] == "event" && (v["event"] == "phase" || v["event"] == "end")))
        .filter(|v| v["kind"] == "tick" && t_ns(v) >= from)
        .collect()
}

fn accounting_case(allocator: &str) {
    let s = Scratch::new();
    let w = s.workload(
        "parts",
        r#"
[[phase]]
name = "managed"
[[phase.op]]
op = "allocate"
bytes = "96MiB"
chunk = "1MiB"
keep = "managed"
key = "m"
[[phase]]
name = "unmanaged"
[[phase.op]]
op = "allocate"
bytes = "64MiB"
chunk = "32KiB"
keep = "unmanaged"
key = "u"
tasks = 4
[[phase]]
name = "steady"
[[phase.op]]
op = "sleep"
duration = "600ms"
"#,
    );
    let tl = s.path("tl.jsonl");
    let r = run(worker_cmd(
        &s,
        &w,
        &[
            "--no-nanny",
            "--allocator",
            allocator,
            "--memory-limit",
            "0",
            "--trim-threshold",
            "false",
            "--monitor-interval",
            "50ms",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
    ));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.summary()["allocator"], allocator);
    assert_eq!(r.summary()["allocator_verified"], true, "{}", r.describe());
    let tl = timeline(&tl);
    let all = ticks(&tl);
    let worst = check_identity(&all, allocator);
    eprintln!(
        "{allocator}: {} ticks, worst identity error {worst} bytes",
        all.len()
    );
    let steady = phase_ticks(&tl, "steady");
    assert!(!steady.is_empty(), "no tick in the steady phase");
    for t in steady {
        let managed = u(t, "managed");
        // 96 values of 1 MiB plus their struct overhead.
        assert!(
            (96 * MIB..96 * MIB + 64 * 1024).contains(&managed),
            "managed {managed}"
        );
        let unmanaged = u(t, "unmanaged_live");
        assert!(
            (64 * MIB..64 * MIB + 12 * MIB).contains(&unmanaged),
            "{allocator}: unmanaged_live {unmanaged} for 64 MiB kept"
        );
        assert!(u(t, "non_heap") < 48 * MIB, "{allocator}: non_heap {t}");
        assert!(u(t, "hoarded") < 24 * MIB, "{allocator}: hoarded {t}");
        assert_eq!(t["heap"]["allocator"], allocator);
    }
}

#[test]
fn accounting_adds_up_to_rss_system() {
    accounting_case("system");
}

#[test]
fn accounting_adds_up_to_rss_jemalloc() {
    accounting_case("jemalloc");
}

fn hoard_case(allocator: &str) {
    let s = Scratch::new();
    // 256 MiB of 16-64 KiB objects; free 90% spread evenly, so survivors
    // pin the top of the heap: only a purge/trim can give it back.
    let w = s.workload(
        "hoard",
        r#"
[[phase]]
name = "fill"
[[phase.op]]
op = "allocate"
bytes = "256MiB"
chunk-min = "16KiB"
chunk-max = "64KiB"
keep = "unmanaged"
key = "objs"
tasks = 4
[[phase]]
name = "filled"
[[phase.op]]
op = "sleep"
duration = "300ms"
[[phase]]
name = "free"
[[phase.op]]
op = "free"
key = "objs"
fraction = 0.9
[[phase]]
name = "hoarding"
[[phase.op]]
op = "sleep"
duration = "300ms"
[[phase]]
name = "purge"
[[phase.op]]
op = "purge"
[[phase]]
name = "after"
[[phase.op]]
op = "sleep"
duration = "300ms"
"#,
    );
    let tl = s.path("tl.jsonl");
    let r = run(worker_cmd(
        &s,
        &w,
        &[
            "--no-nanny",
            "--allocator",
            allocator,
            "--memory-limit",
            "0",
            // No automatic purge and no MALLOC_TRIM_THRESHOLD_: the hoard
            // stays until the workload's purge.
            "--trim-threshold",
            "false",
            "--monitor-interval",
            "50ms",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
    ));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    let tl = timeline(&tl);
    check_identity(&ticks(&tl), allocator);
    let last = |name: &str| -> Value {
        phase_ticks(&tl, name)
            .last()
            .map(|v| (*v).clone())
            .unwrap_or_else(|| panic!("no tick in phase {name}"))
    };
    let after = phase_ticks(&tl, "after")
        .first()
        .map(|v| (*v).clone())
        .expect("no tick after the purge");
    let (filled, hoarding) = (last("filled"), last("hoarding"));
    let freed = 230 * MIB; // 90% of 256 MiB
    // Freeing moved the bytes from unmanaged_live to hoarded, not out.
    let live_drop = u(&filled, "unmanaged_live") - u(&hoarding, "unmanaged_live");
    let hoard_rise = u(&hoarding, "hoarded").saturating_sub(u(&filled, "hoarded"));
    assert!(
        live_drop >= freed * 9 / 10,
        "{allocator}: live fell by {live_drop}"
    );
    assert!(
        hoard_rise >= freed / 2,
        "{allocator}: hoarded rose by only {hoard_rise} after freeing {freed}"
    );
    assert!(
        u(&hoarding, "process") + 32 * MIB >= u(&filled, "process"),
        "{allocator}: RSS fell at free already; nothing was hoarded"
    );
    // The purge gave it back, and says how much.
    let p = first_event(&tl, "purge", |e| e["reason"] == "workload").expect("purge event");
    let pe = &tl[p];
    let returned = u(pe, "returned_bytes");
    assert!(
        returned >= hoard_rise * 8 / 10,
        "{allocator}: purge returned {returned} of {hoard_rise} hoarded"
    );
    assert!(u(pe, "hoarded_after") < u(pe, "hoarded_before") / 4, "{pe}");
    // Giving back 200 MiB costs the purging thread CPU time (what the purge
    // budget counts), never more than the wall time it took.
    let cpu = u(pe, "cpu_us");
    assert!(cpu > 0 && cpu <= u(pe, "duration_us") + 1_000, "{pe}");
    let rss_drop = u(&hoarding, "process") - u(&after, "process");
    let hoard_drop = u(&hoarding, "hoarded") - u(&after, "hoarded");
    assert!(
        rss_drop >= hoard_rise * 8 / 10,
        "{allocator}: RSS fell {rss_drop}"
    );
    assert!(
        hoard_drop.abs_diff(rss_drop) <= 16 * MIB,
        "{allocator}: RSS fell {rss_drop} but hoarded fell {hoard_drop}: the accounting \
         does not say where the memory went"
    );
    assert!(r.u64("purged_bytes_total") >= returned);
    eprintln!(
        "{allocator}: freed {} MiB, hoarded +{} MiB, purge returned {} MiB in {} us",
        freed / MIB,
        hoard_rise / MIB,
        returned / MIB,
        u(pe, "duration_us")
    );
}

#[test]
fn hoard_then_purge_gives_memory_back_system() {
    hoard_case("system");
}

#[test]
fn hoard_then_purge_gives_memory_back_jemalloc() {
    hoard_case("jemalloc");
}

#[test]
fn the_chosen_allocator_serves_allocations() {
    for (allocator, other) in [("jemalloc", "glibc"), ("system", "jemalloc")] {
        let out = std::process::Command::new(bin())
            .args([
                "check-allocator",
                "--allocator",
                allocator,
                "--bytes",
                "64MiB",
            ])
            .env_remove("AMM_ALLOCATOR")
            .output()
            .expect("run");
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let je = v["jemalloc_allocated_delta"].as_i64().expect("je");
        let gl = v["glibc_live_delta"].as_i64().expect("gl");
        let (mine, theirs) = if allocator == "jemalloc" {
            (je, gl)
        } else {
            (gl, je)
        };
        assert!(mine >= 64 << 20, "{allocator}: its counter grew by {mine}");
        assert!(
            theirs < 1 << 20,
            "{allocator}: {other}'s counter grew by {theirs}"
        );
        assert_eq!(v["chosen"], allocator);
    }
    // Through the environment as the nanny sets it, too.
    let out = std::process::Command::new(bin())
        .args(["check-allocator"])
        .env("AMM_ALLOCATOR", "jemalloc")
        .output()
        .expect("run");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["chosen"], "jemalloc");
    // A bad name is an error, not a silent default.
    let out = std::process::Command::new(bin())
        .args(["check-allocator", "--allocator", "tcmalloc"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown allocator"));
}

#[test]
fn nanny_runs_its_worker_on_the_chosen_allocator() {
    let s = Scratch::new();
    let w = s.workload(
        "tiny",
        "[[phase]]\n[[phase.op]]\nop = \"sleep\"\nduration = \"10ms\"\n",
    );
    for allocator in ["jemalloc", "system"] {
        let r = run(worker_cmd(&s, &w, &["--allocator", allocator]));
        assert_eq!(r.code, Some(0), "{}", r.describe());
        assert_eq!(r.summary()["allocator"], allocator);
        assert_eq!(r.summary()["allocator_verified"], true);
        assert_eq!(r.u64("restarts"), 0);
        // Dask's nanny default, for a glibc worker only.
        let env = &r.summary()["malloc_trim_threshold_env"];
        if allocator == "system" {
            assert_eq!(env, "65536");
        } else {
            assert!(env.is_null(), "{env}");
        }
    }
}
