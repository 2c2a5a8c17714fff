//! `amm-agent watch --pid PID --report PATH` on a process amm does not run
//! (an `amm-worker --no-nanny`, standing in for a Python Dask worker): the
//! report comes from kernel data alone, says the allocator's part is
//! unavailable, never calls a leak (it cannot tell one from a hoard), and
//! still sees temporaries come and go. Root: it loads the BPF probe.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use amm_integration_tests::{bin, bpf_object, report_kinds as kinds, require_root};
use serde_json::Value;

fn suite(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../worker/tests/suite")
        .join(file)
}

/// Runs a suite workload under a kernel-only watch; returns the JSON report.
fn watched(file: &str, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report.json");
    let mut worker = Command::new(bin("amm-worker"))
        .arg("run")
        .arg(suite(file))
        .args([
            "--no-nanny",
            "--allocator",
            "system",
            "--memory-limit",
            "4GiB",
        ])
        .args(extra)
        .arg("--local-directory")
        .arg(dir.path())
        // what a Dask nanny sets for its worker
        .env("MALLOC_TRIM_THRESHOLD_", "65536")
        .env_remove("AMM_ALLOCATOR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn amm-worker");
    let out = Command::new(bin("amm-agent"))
        .args([
            "watch",
            "--pid",
            &worker.id().to_string(),
            "--limit",
            "1GiB",
        ])
        .arg("--bpf-object")
        .arg(bpf_object())
        .arg("--report")
        .arg(&report)
        .output()
        .expect("spawn amm-agent watch");
    let status = worker.wait().expect("wait for the worker");
    assert!(status.success(), "{file}: the worker failed: {status}");
    assert!(
        out.status.success(),
        "{file}: watch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&report).expect("the report was not written");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{file}: report is not JSON ({e}): {text}"))
}

#[test]
fn kernel_only_reports_never_guess_about_the_allocator() {
    if !require_root("kernel_only_reports_never_guess_about_the_allocator") {
        return;
    }
    // a leak: RSS grows, and the kernel cannot say whether it is a leak
    let r = watched("leak-medium.toml", &[]);
    assert_eq!(r["source"], "kernel");
    assert_eq!(r["allocator"]["available"], false);
    assert!(
        r["allocator"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("unavailable"))
    );
    assert!(
        r["run"]["ticks"].as_u64().unwrap_or(0) >= 10,
        "too few samples: {}",
        r["run"]
    );
    assert_eq!(r["verdict"]["kind"], "undecided", "{}", r["verdict"]);
    assert!(
        !kinds(&r).contains(&"leak".to_string()),
        "a kernel-only report called a leak"
    );
    let would = r["stretches"][r["verdict"]["stretch"].as_u64().unwrap_or(0) as usize]["findings"]
        [0]["would_decide"]
        .as_str()
        .unwrap_or("");
    assert!(would.contains("allocator"), "{would}");
    // spikes: RSS goes back to the kernel each time
    let r = watched("spikes.toml", &[]);
    assert_eq!(r["verdict"]["kind"], "transient", "{}", r["verdict"]);
    assert!(!kinds(&r).contains(&"leak".to_string()));
}
