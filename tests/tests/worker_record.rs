//! amm-worker publishes its own allocator record, as the preload library
//! does inside any program: `amm-record show PID` and every reader see its
//! statistics (on both allocators), and a purge requested through the
//! record is served.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use amm_integration_tests::bin;
use amm_integration_tests::preload::{record_of, snapshot_where};
use amm_record::Allocator;

const MIB: u64 = 1 << 20;

/// 96 MiB held by the workload, then a long sleep (the test ends it).
const WORKLOAD: &str = r#"
name = "hold"
[[phase]]
name = "fill"
[[phase.op]]
op = "allocate"
bytes = "96MiB"
chunk-min = "16KiB"
chunk-max = "64KiB"
keep = "unmanaged"
key = "held"
tasks = 4
[[phase]]
name = "wait"
[[phase.op]]
op = "sleep"
duration = "300s"
tasks = 1
"#;

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(allocator: &str, dir: &std::path::Path) -> Worker {
    let wl = dir.join("hold.toml");
    std::fs::write(&wl, WORKLOAD).expect("write the workload");
    let child = Command::new(bin("amm-worker"))
        .arg("run")
        .arg(&wl)
        .args([
            "--no-nanny",
            "--allocator",
            allocator,
            "--memory-limit",
            "0",
        ])
        .arg("--local-directory")
        .arg(dir)
        .env_remove("AMM_ALLOCATOR")
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start amm-worker");
    Worker(child)
}

fn check(allocator: Allocator) {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(allocator.name(), dir.path());
    let pid = w.0.id() as i32;
    let r = record_of(pid);
    assert_eq!(r.info().allocator, Some(allocator), "{:?}", r.info());
    let s = snapshot_where(&r, "the 96 MiB held counted as live", |s| {
        s.live() >= 96 * MIB
    });
    assert!(
        s.resident() >= s.live() && s.stats.publication.rss_bytes >= 96 * MIB,
        "{s:#?}"
    );
    if allocator == Allocator::System {
        assert!(s.stats.glibc.arena_resident > 0, "{:#?}", s.stats.glibc);
    }
    // it keeps publishing
    let count = s.stats.publication.count;
    snapshot_where(&r, "a later publication", |s| {
        s.stats.publication.count > count
    });

    // the command-line tool reads it the same way
    let out = Command::new(bin("amm-record"))
        .args(["show", &pid.to_string()])
        .output()
        .expect("run amm-record show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "amm-record show failed: {text}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
    assert_eq!(v["snapshot"]["allocator"], allocator.name(), "{v}");
    assert_eq!(v["snapshot"]["state"], "live", "{v}");
    assert!(v["live"].as_u64().unwrap_or(0) >= 96 * MIB, "{v}");

    // a purge asked through the record is served and recorded
    let (reader, ticket) = amm_record::request_purge(pid).expect("request a purge");
    reader
        .wait_purge(ticket, Duration::from_secs(60))
        .expect("waiting for the purge")
        .expect("the worker answers the purge within 60 s");
    let s = snapshot_where(&r, "the purge recorded", |s| {
        s.stats.purge.requested_count >= 1
    });
    assert_eq!(u64::from(ticket.0), s.stats.purge.last.ticket, "{s:#?}");
}

#[test]
fn amm_worker_on_jemalloc_publishes_its_record() {
    check(Allocator::Jemalloc);
}

#[test]
fn amm_worker_on_glibc_publishes_its_record() {
    check(Allocator::System);
}
