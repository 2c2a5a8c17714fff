//! The labelled suite: workloads whose truth is known (`tests/suite/*.toml`,
//! each file says what it is), run by the real `amm-worker` on both
//! allocators, then `amm-worker report --json` on the timeline. Any wrong
//! verdict fails; so does a leak verdict anywhere in a run that has no leak
//! (the worst failure: it sends users chasing nothing). The table of what
//! the report says for each case is in `worker/shared/report/README.md`.
//!
//! Each case runs for seconds (the slow leak for about 25 s, because that is
//! what a leak of 512 KiB/s needs to be told from noise). No assertion
//! depends on how long anything took.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn suite(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/suite")
        .join(file)
}

/// Runs a suite workload and returns (the report as JSON, the timeline path,
/// the scratch directory that holds it).
fn run_case(file: &str, allocator: &str, extra: &[&str]) -> (Value, PathBuf, Scratch) {
    let s = Scratch::new();
    let tl = s.path("timeline.jsonl");
    let tl_arg = tl.display().to_string();
    let mut args = vec![
        "--allocator",
        allocator,
        "--memory-limit",
        "4GiB",
        "--timeline",
        &tl_arg,
    ];
    args.extend_from_slice(extra);
    let r = run(worker_cmd(&s, &suite(file), &args));
    assert_eq!(
        r.code,
        Some(0),
        "{file} on {allocator} failed: {}",
        r.describe()
    );
    let report = report_json(&tl);
    (report, tl, s)
}

fn report_json(timeline: &Path) -> Value {
    let out = std::process::Command::new(bin())
        .arg("report")
        .arg("--json")
        .arg(timeline)
        .output()
        .expect("spawn amm-worker report");
    assert!(
        out.status.success(),
        "amm-worker report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "report --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The stretch that covers `phase`.
fn stretch<'a>(r: &'a Value, phase: &str) -> &'a Value {
    r["stretches"]
        .as_array()
        .and_then(|s| {
            s.iter().find(|x| {
                x["phases"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|n| n == phase))
            })
        })
        .unwrap_or_else(|| panic!("no stretch covers phase {phase}: {}", brief(r)))
}

/// Every finding of every stretch.
fn findings(r: &Value) -> Vec<&Value> {
    r["stretches"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["findings"].as_array().into_iter().flatten())
        .collect()
}

/// The verdicts in a line, for failure messages and the suite table.
fn brief(r: &Value) -> String {
    let mut o = format!(
        "verdict {}: {}",
        r["verdict"]["kind"], r["verdict"]["headline"]
    );
    for s in r["stretches"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "\n  [{}] {:?} {}: {}",
            s["index"], s["phases"], s["verdict"], s["headline"]
        ));
    }
    o
}

/// Prints the suite-table row straight to stderr (the harness captures
/// println!): `SUITE case allocator verdict | headline`.
fn row(case: &str, allocator: &str, r: &Value) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SUITE {case} {allocator} {} | {}",
        r["verdict"]["kind"].as_str().unwrap_or("?"),
        r["verdict"]["headline"].as_str().unwrap_or("?")
    );
}

fn expect_verdict(r: &Value, kind: &str, phase: &str, what: &str) {
    assert_eq!(
        r["verdict"]["kind"],
        kind,
        "{what}: wrong verdict\n{}",
        brief(r)
    );
    assert_eq!(
        stretch(r, phase)["verdict"],
        kind,
        "{what}: phase {phase} has the wrong verdict\n{}",
        brief(r)
    );
}

fn no_leak(r: &Value, what: &str) {
    for f in findings(r) {
        assert_ne!(
            f["kind"],
            "leak",
            "{what} has no leak, but the report found one: {}\n{}",
            f["headline"],
            brief(r)
        );
    }
}

/// A leak of `total` bytes in phase `phase`: the fitted growth is most of
/// it, and on jemalloc the class that grew most is `class_size`.
fn leak_case(
    file: &str,
    allocator: &str,
    phase: &str,
    total: u64,
    class_size: &[u64],
    extra: &[&str],
) -> (Value, PathBuf, Scratch) {
    let (r, tl, s) = run_case(file, allocator, extra);
    row(file, allocator, &r);
    let what = format!("{file} on {allocator}");
    expect_verdict(&r, "leak", phase, &what);
    let leak = &stretch(&r, phase)["findings"][0];
    let growth = leak["trend"]["growth_bytes"].as_i64().unwrap_or(0) as f64;
    assert!(
        (0.5 * total as f64..=1.25 * total as f64).contains(&growth),
        "{what}: fitted growth {growth} is not most of the {total} bytes leaked\n{}",
        brief(&r)
    );
    assert!(
        leak["trend"]["mann_kendall"]["p_increasing"]
            .as_f64()
            .unwrap_or(1.0)
            <= 0.01,
        "{what}: a leak verdict without a significant trend"
    );
    if allocator == "jemalloc" {
        let top = leak["size_classes"][0]["size"].as_u64().unwrap_or(0);
        assert!(
            class_size.contains(&top),
            "{what}: the class that grew most is {top} B, expected one of {class_size:?}\n{}",
            leak["size_classes"]
        );
    }
    (r, tl, s)
}

#[test]
fn suite_hoard() {
    for a in ["system", "jemalloc"] {
        let (r, _tl, _s) = run_case("hoard.toml", a, &[]);
        row("hoard.toml", a, &r);
        let what = format!("hoard on {a}");
        expect_verdict(&r, "hoard", "hoard", &what);
        no_leak(&r, &what);
        // a purge returned most of what was hoarded
        let f = &stretch(&r, "hoard")["findings"][0];
        let returned: u64 = f["purges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["returned_bytes"].as_u64().unwrap_or(0))
            .sum();
        assert!(
            returned >= 150 * MIB,
            "{what}: purges returned only {returned} bytes of a ~230 MiB hoard\n{}",
            brief(&r)
        );
    }
}

#[test]
fn suite_fragmentation() {
    for a in ["system", "jemalloc"] {
        let (r, _tl, _s) = run_case("fragment.toml", a, &[]);
        row("fragment.toml", a, &r);
        let what = format!("fragmentation on {a}");
        expect_verdict(&r, "fragmentation", "hold", &what);
        no_leak(&r, &what);
        let f = &stretch(&r, "hold")["findings"][0];
        if a == "jemalloc" {
            // the slack sits in the small classes the workload used
            let sizes: Vec<u64> = f["size_classes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["size"].as_u64())
                .collect();
            assert!(
                !sizes.is_empty() && sizes.iter().all(|&s| (16..=256).contains(&s)),
                "{what}: slack should be in the 16-256 B classes, got {sizes:?}"
            );
        } else {
            assert!(
                f["arenas"].as_array().is_some_and(|a| !a.is_empty()),
                "{what}: the glibc arenas holding it are not named\n{f}"
            );
        }
    }
}

#[test]
fn suite_leak_fast() {
    for a in ["system", "jemalloc"] {
        leak_case("leak-fast.toml", a, "leak", 160 * MIB, &[65536], &[]);
    }
}

#[test]
fn suite_leak_medium_with_probe_purges() {
    for a in ["system", "jemalloc"] {
        let (r, _tl, _s) = leak_case(
            "leak-medium.toml",
            a,
            "leak",
            24 * MIB,
            &[16384],
            &["--probe-purge", "1s"],
        );
        // the probes ran, and returned none of it
        let probes = r["run"]["probe_purge"]["count"].as_u64().unwrap_or(0);
        assert!(
            probes >= 2,
            "medium leak on {a}: only {probes} probe purges\n{}",
            brief(&r)
        );
        let note = stretch(&r, "leak")["findings"][0]["headline"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(note.contains("left unmanaged_live where it was"), "{note}");
    }
}

#[test]
fn suite_leak_slow_needs_a_long_window() {
    for a in ["system", "jemalloc"] {
        let (_r, tl, s) = leak_case(
            "leak-slow.toml",
            a,
            "leak",
            12 * MIB,
            &[1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096],
            &[],
        );
        // the first 5 s of the same run are too little to call
        let text = std::fs::read_to_string(&tl).expect("timeline");
        let short: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["t_ms"].as_u64())
                    .is_some_and(|t| t <= 5000)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let cut = s.path("first-5s.jsonl");
        std::fs::write(&cut, short).expect("write");
        let r = report_json(&cut);
        row("leak-slow.toml (first 5 s)", a, &r);
        let what = format!("the first 5 s of the slow leak on {a}");
        no_leak(&r, &what);
        expect_verdict(&r, "undecided", "leak", &what);
        let f = &stretch(&r, "leak")["findings"][0];
        assert!(
            f["would_decide"]
                .as_str()
                .is_some_and(|d| d.contains("window")),
            "{what}: 'undecided' must say a longer window decides: {f}"
        );
    }
}

#[test]
fn suite_managed_growth_is_not_a_leak() {
    for a in ["system", "jemalloc"] {
        let (r, _tl, _s) = run_case("managed-growth.toml", a, &[]);
        row("managed-growth.toml", a, &r);
        let what = format!("managed growth on {a}");
        no_leak(&r, &what);
        expect_verdict(&r, "managed_growth", "grow", &what);
    }
}

#[test]
fn suite_spikes_are_transient() {
    for a in ["system", "jemalloc"] {
        let (r, _tl, _s) = run_case("spikes.toml", a, &[]);
        row("spikes.toml", a, &r);
        let what = format!("spikes on {a}");
        no_leak(&r, &what);
        expect_verdict(&r, "transient", "spiky", &what);
    }
}

#[test]
fn suite_leak_under_spikes() {
    for a in ["system", "jemalloc"] {
        leak_case(
            "spikes-leak.toml",
            a,
            "spiky",
            14 * MIB,
            &[65536],
            &["--nthreads", "3"],
        );
    }
}

#[test]
fn suite_hoard_that_looks_like_a_leak() {
    for a in ["system", "jemalloc"] {
        let (r, _tl, _s) = run_case(
            "hoard-like-leak.toml",
            a,
            &["--nthreads", "1", "--probe-purge", "1s"],
        );
        row("hoard-like-leak.toml --probe-purge", a, &r);
        let what = format!("hoard-like-leak on {a}");
        no_leak(&r, &what);
        expect_verdict(&r, "hoard", "grow", &what);
    }
    // without a purge, glibc's statistics cannot tell: undecided, not a leak
    let (r, _tl, _s) = run_case("hoard-like-leak.toml", "system", &["--nthreads", "1"]);
    row("hoard-like-leak.toml (no purge)", "system", &r);
    let what = "hoard-like-leak on system without a purge";
    no_leak(&r, what);
    expect_verdict(&r, "undecided", "grow", what);
    let f = &stretch(&r, "grow")["findings"][0];
    assert!(
        f["would_decide"]
            .as_str()
            .is_some_and(|d| d.contains("--probe-purge")),
        "{what}: must say a purge decides: {f}"
    );
}

#[test]
fn report_renders_text_and_html() {
    let (_r, tl, s) = run_case("hoard.toml", "system", &[]);
    let html = s.path("report.html");
    let out = std::process::Command::new(bin())
        .arg("report")
        .arg(&tl)
        .arg("--html")
        .arg(&html)
        .output()
        .expect("spawn");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("VERDICT: HOARD"), "verdict first:\n{text}");
    let page = std::fs::read_to_string(&html).expect("html");
    assert!(page.contains("<svg id=\"amm-chart\""), "no chart");
    assert!(
        !page.contains("<script") && !page.contains("src="),
        "the page must load and run nothing"
    );
    // a missing file is an error that says what to give
    let out = std::process::Command::new(bin())
        .args(["report", "/nonexistent/timeline.jsonl"])
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeline"));
}
