//! jemalloc vs glibc malloc on the `hoard` and `fragment` workloads: peak
//! RSS, RSS right after the workload's purge/trim, and wall time, as
//! jemalloc/system ratios measured in one run.
//!
//! Each run is the real binary with its nanny and default settings (so the
//! glibc worker gets `MALLOC_TRIM_THRESHOLD_=65536` and the jemalloc worker
//! purges its hoard above 65536 bytes at most once a second), no memory
//! limit, a timeline to read the RSS after the purge from. A short warm-up
//! run of each allocator comes first and is not counted.
//!
//! Settings (environment): `AMM_BENCH_WORKLOADS` (default `hoard,fragment`).

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

struct Measure {
    peak: f64,
    after_purge: f64,
    wall: f64,
    purged: f64,
}

fn run(workload: &str, allocator: &str, dir: &Path) -> Measure {
    let tl = dir.join(format!("{workload}-{allocator}.jsonl"));
    let out = Command::new(env!("CARGO_BIN_EXE_amm-worker"))
        .args([
            "run",
            workload,
            "--allocator",
            allocator,
            "--memory-limit",
            "0",
        ])
        .arg("--timeline")
        .arg(&tl)
        .arg("--local-directory")
        .arg(dir)
        .env_remove("AMM_ALLOCATOR")
        .env_remove("MALLOC_TRIM_THRESHOLD_")
        .env("AMM_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .expect("run amm-worker");
    assert!(
        out.status.success(),
        "{workload}/{allocator} failed: {out:?}"
    );
    let s: Value = serde_json::from_slice(&out.stdout).expect("summary");
    let text = std::fs::read_to_string(&tl).expect("timeline");
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // RSS at the first tick after each workload purge, averaged over rounds.
    let mut after = Vec::new();
    for (i, v) in lines.iter().enumerate() {
        if v["event"] == "purge"
            && v["reason"] == "workload"
            && let Some(t) = lines[i..].iter().find(|x| x["kind"] == "tick")
        {
            after.push(t["process"].as_f64().unwrap_or(0.0));
        }
    }
    let after_purge = after.iter().sum::<f64>() / after.len().max(1) as f64;
    Measure {
        peak: s["peak_rss_bytes"].as_f64().unwrap_or(0.0),
        after_purge,
        wall: s["wall_ms"].as_f64().unwrap_or(0.0),
        purged: s["purged_bytes_total"].as_f64().unwrap_or(0.0),
    }
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

fn main() {
    let workloads =
        std::env::var("AMM_BENCH_WORKLOADS").unwrap_or_else(|_| "hoard,fragment".into());
    let dir = tempfile::tempdir().expect("tempdir");
    // Warm-up: one tiny run per allocator (binary in the page cache, jemalloc
    // and glibc both exercised once).
    let warm = dir.path().join("warm.toml");
    std::fs::write(
        &warm,
        "[[phase]]\n[[phase.op]]\nop = \"allocate\"\nbytes = \"256MiB\"\nchunk = \"1MiB\"\nkeep = \"task\"\n",
    )
    .expect("write");
    for a in ["system", "jemalloc"] {
        run(warm.to_str().expect("utf8"), a, dir.path());
    }
    println!(
        "{:>9} {:>9} {:>12} {:>16} {:>10} {:>14}",
        "workload", "allocator", "peak RSS", "RSS after purge", "wall", "purged total"
    );
    let mut json = Vec::new();
    for w in workloads.split(',') {
        let sys = run(w, "system", dir.path());
        let je = run(w, "jemalloc", dir.path());
        for (name, m) in [("system", &sys), ("jemalloc", &je)] {
            println!(
                "{:>9} {:>9} {:>8.0} MiB {:>12.0} MiB {:>8.1} s {:>10.0} MiB",
                w,
                name,
                mib(m.peak),
                mib(m.after_purge),
                m.wall / 1000.0,
                mib(m.purged)
            );
        }
        let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let (rp, ra, rw) = (
            r(je.peak, sys.peak),
            r(je.after_purge, sys.after_purge),
            r(je.wall, sys.wall),
        );
        println!(
            "{:>9} jemalloc/system: peak RSS {rp:.2}, RSS after purge {ra:.2}, wall time {rw:.2}",
            w
        );
        json.push(serde_json::json!({"workload": w, "peak_rss_ratio": rp,
            "rss_after_purge_ratio": ra, "wall_ratio": rw,
            "system": {"peak": sys.peak, "after_purge": sys.after_purge, "wall_ms": sys.wall},
            "jemalloc": {"peak": je.peak, "after_purge": je.after_purge, "wall_ms": je.wall}}));
    }
    println!(
        "{}",
        serde_json::json!({"bench": "allocators", "results": json})
    );
}
