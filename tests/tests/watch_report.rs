//! `amm-agent watch --pid PID --report PATH` on a process amm does not run
//! (a plain Python program on glibc, standing in for a Python Dask worker:
//! no preload library, so no allocator record): the report comes from
//! kernel data alone, says the allocator's part is unavailable, never calls
//! a leak (it cannot tell one from a hoard), and still sees temporaries
//! come and go. Root: it loads the BPF probe.

use std::process::{Command, Stdio};

use amm_integration_tests::{bin, bpf_object, python, report_kinds as kinds, require_root};
use serde_json::Value;

/// Keeps 1 MiB more every 0.25 s for 8 s (a steady rise of anonymous
/// memory: a leak to the program, undecided to the kernel).
const LEAK: &str = "
import time
kept = []
for _ in range(32):
    kept.append(bytearray(b'x' * (1 << 20)))
    time.sleep(0.25)
time.sleep(1.0)
";

/// Six 200 MiB temporaries, each held 0.3 s and freed (an mmapped chunk:
/// glibc unmaps it, so RSS goes back each time).
const SPIKES: &str = "
import time
time.sleep(1.0)
for _ in range(6):
    t = bytearray(b'x' * (200 << 20))
    time.sleep(0.3)
    del t
    time.sleep(0.7)
";

/// Runs `script` under a kernel-only watch; returns the JSON report.
fn watched(script: &str) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report.json");
    let py = python::find().unwrap_or_else(|e| panic!("{e:#}"));
    let mut program = Command::new(py)
        .args(["-c", script])
        // what a Dask nanny sets for its worker; no LD_PRELOAD
        .env("MALLOC_TRIM_THRESHOLD_", "65536")
        .env_remove("LD_PRELOAD")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn python");
    let out = Command::new(bin("amm-agent"))
        .args([
            "watch",
            "--pid",
            &program.id().to_string(),
            "--limit",
            "1GiB",
        ])
        .arg("--bpf-object")
        .arg(bpf_object())
        .arg("--report")
        .arg(&report)
        .output()
        .expect("spawn amm-agent watch");
    let status = program.wait().expect("wait for the program");
    assert!(status.success(), "the program failed: {status}");
    assert!(
        out.status.success(),
        "watch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&report).expect("the report was not written");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report is not JSON ({e}): {text}"))
}

#[test]
fn kernel_only_reports_never_guess_about_the_allocator() {
    if !require_root("kernel_only_reports_never_guess_about_the_allocator") {
        return;
    }
    // a leak: RSS grows, and the kernel cannot say whether it is a leak
    let r = watched(LEAK);
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
    let r = watched(SPIKES);
    assert_eq!(r["verdict"]["kind"], "transient", "{}", r["verdict"]);
    assert!(!kinds(&r).contains(&"leak".to_string()));
}
