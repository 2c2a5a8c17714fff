//! `--memory-limit` parsing and detection (cgroup v1 and v2 files from
//! fixture directories, and a real cgroup), and the config precedence
//! flag > env > file > default through the real binary.

mod common;

use std::path::Path;
use std::process::Command;

use amm_worker::limit::{self, HostMemory, LimitSpec};
use common::*;
use serde_json::Value;

const GIB: u64 = 1 << 30;

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

fn meminfo(root: &Path) {
    write(
        root,
        "proc/meminfo",
        "MemTotal:       16777216 kB\nMemFree:         1000000 kB\nMemAvailable:    8388608 kB\n",
    );
}

/// A v1 host: the memory controller at /sys/fs/cgroup/memory, the process
/// in /kubepods/pod1 (512 MiB hard, 384 MiB soft), its parent at 1 GiB.
fn v1_fixture(root: &Path) {
    meminfo(root);
    write(
        root,
        "proc/self/cgroup",
        "12:cpu,cpuacct:/kubepods/pod1\n4:memory:/kubepods/pod1\n0::/\n",
    );
    write(
        root,
        "proc/self/mountinfo",
        "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
         31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:12 - cgroup cgroup rw,memory\n\
         32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
    );
    let d = "sys/fs/cgroup/memory";
    write(
        root,
        &format!("{d}/memory.limit_in_bytes"),
        "9223372036854771712\n",
    );
    write(
        root,
        &format!("{d}/kubepods/memory.limit_in_bytes"),
        &format!("{}\n", GIB),
    );
    write(
        root,
        &format!("{d}/kubepods/memory.soft_limit_in_bytes"),
        "9223372036854771712\n",
    );
    write(
        root,
        &format!("{d}/kubepods/pod1/memory.limit_in_bytes"),
        "536870912\n",
    );
    write(
        root,
        &format!("{d}/kubepods/pod1/memory.soft_limit_in_bytes"),
        "402653184\n",
    );
}

/// A v2 host: the process in /user.slice/app.scope (memory.max unlimited,
/// memory.high 768 MiB), its parent with memory.max 1 GiB.
fn v2_fixture(root: &Path) {
    meminfo(root);
    write(root, "proc/self/cgroup", "0::/user.slice/app.scope\n");
    write(
        root,
        "proc/self/mountinfo",
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
    );
    let d = "sys/fs/cgroup";
    write(root, &format!("{d}/memory.stat"), "anon 0\n");
    write(
        root,
        &format!("{d}/user.slice/memory.max"),
        &format!("{GIB}\n"),
    );
    write(root, &format!("{d}/user.slice/memory.high"), "max\n");
    write(
        root,
        &format!("{d}/user.slice/app.scope/memory.max"),
        "max\n",
    );
    write(
        root,
        &format!("{d}/user.slice/app.scope/memory.high"),
        "805306368\n",
    );
}

#[test]
fn v1_fixture_auto_is_the_smallest_limit_and_names_its_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    v1_fixture(tmp.path());
    let host = HostMemory::read(tmp.path(), None).expect("host");
    assert_eq!(host.total_ram, 16 * GIB);
    assert_eq!(host.available, 8 * GIB);
    assert_eq!(host.cgroup.len(), 3, "{:?}", host.cgroup);
    let auto = limit::auto(&host);
    assert_eq!(
        auto.bytes,
        Some(384 << 20),
        "the soft limit is the smallest"
    );
    assert!(
        auto.source
            .ends_with("kubepods/pod1/memory.soft_limit_in_bytes"),
        "{}",
        auto.source
    );
    // RLIMIT_RSS below all of them wins.
    let host = HostMemory::read(tmp.path(), Some(256 << 20)).expect("host");
    assert_eq!(limit::auto(&host).source, "RLIMIT_RSS");
    // available and fractions.
    let host = HostMemory::read(tmp.path(), None).expect("host");
    let a = limit::resolve(LimitSpec::Available, &host).expect("available");
    assert_eq!(a.bytes, Some(8 * GIB));
    let half = limit::resolve("0.5".parse().expect("spec"), &host).expect("half");
    assert_eq!(half.bytes, Some(192 << 20));
}

#[test]
fn v2_fixture_reads_memory_max_and_high_up_the_tree() {
    let tmp = tempfile::tempdir().expect("tmp");
    v2_fixture(tmp.path());
    let cg = amm_cgroup::find(tmp.path())
        .expect("find")
        .expect("a cgroup");
    assert_eq!(cg.version, amm_cgroup::Version::V2);
    let host = HostMemory::read(tmp.path(), None).expect("host");
    let auto = limit::auto(&host);
    assert_eq!(auto.bytes, Some(768 << 20));
    assert!(
        auto.source.ends_with("app.scope/memory.high"),
        "{}",
        auto.source
    );
    // Without memory.high the parent's memory.max applies.
    write(
        tmp.path(),
        "sys/fs/cgroup/user.slice/app.scope/memory.high",
        "max\n",
    );
    let host = HostMemory::read(tmp.path(), None).expect("host");
    let auto = limit::auto(&host);
    assert_eq!(auto.bytes, Some(GIB));
    assert!(
        auto.source.ends_with("user.slice/memory.max"),
        "{}",
        auto.source
    );
}

#[test]
fn no_cgroup_means_total_ram() {
    let tmp = tempfile::tempdir().expect("tmp");
    meminfo(tmp.path());
    let host = HostMemory::read(tmp.path(), None).expect("host");
    assert!(host.cgroup.is_empty());
    assert_eq!(limit::auto(&host).bytes, Some(16 * GIB));
    // A malformed limit file is an error naming it, not a silent default.
    v1_fixture(tmp.path());
    write(
        tmp.path(),
        "sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes",
        "lots\n",
    );
    let e = HostMemory::read(tmp.path(), None).expect_err("malformed");
    assert!(e.to_string().contains("memory.limit_in_bytes"), "{e}");
}

fn limit_cli(root: &Path, spec: &str) -> (Option<i32>, Value, String) {
    let out = Command::new(bin())
        .args(["limit", "--memory-limit", spec, "--root"])
        .arg(root)
        .output()
        .expect("run");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_binary_prints_the_limit_and_its_source_and_rejects_bad_values() {
    let tmp = tempfile::tempdir().expect("tmp");
    v1_fixture(tmp.path());
    let (code, v, err) = limit_cli(tmp.path(), "auto");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(v["limit_bytes"], 384u64 << 20);
    assert!(err.contains("memory limit: 384.00 MiB"), "{err}");
    assert!(err.contains("memory.soft_limit_in_bytes"), "{err}");
    let (code, v, _) = limit_cli(tmp.path(), "2GiB");
    assert_eq!(code, Some(0));
    assert_eq!(v["limit_bytes"], 2 * GIB);
    let (code, v, _) = limit_cli(tmp.path(), "0");
    assert_eq!(code, Some(0));
    assert!(v["limit_bytes"].is_null());
    for (bad, says) in [
        ("banana", "invalid memory limit \"banana\""),
        ("-1GiB", "cannot be negative"),
        ("-0.5", "cannot be negative"),
        ("1.5", "fraction must be in (0, 1]"),
        ("17GiB", "more than this machine's RAM"),
        ("5 parsecs", "invalid memory limit"),
    ] {
        let (code, _, err) = limit_cli(tmp.path(), bad);
        assert_eq!(code, Some(1), "{bad}: {err}");
        assert!(err.contains(says), "{bad}: {err}");
    }
    // The run command rejects them before spawning a worker.
    let s = Scratch::new();
    let w = s.workload(
        "t",
        "[[phase]]\n[[phase.op]]\nop = \"sleep\"\nduration = \"1ms\"\n",
    );
    let r = run(worker_cmd(&s, &w, &["--memory-limit", "banana"]));
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("invalid memory limit"), "{}", r.stderr);
}

#[test]
fn a_real_cgroup_limit_is_detected() {
    if !require_root("a_real_cgroup_limit_is_detected") {
        return;
    }
    let cg = TestCgroup::new("detect", 300 * MIB);
    let mut cmd = Command::new(bin());
    cmd.args(["limit"]);
    cg.enter(&mut cmd);
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["limit_bytes"], 300 * MIB);
    let file = if cg.v2 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    let src = v["source"].as_str().expect("source");
    assert!(
        src.contains("amm-test-detect") && src.ends_with(file),
        "{src}"
    );
}

fn effective(extra: &[&str], env: &[(&str, &str)], config: Option<&str>) -> Run {
    let s = Scratch::new();
    let w = s.workload(
        "t",
        "[[phase]]\n[[phase.op]]\nop = \"sleep\"\nduration = \"1ms\"\n",
    );
    let mut args: Vec<String> = vec!["--no-nanny".into()];
    if let Some(c) = config {
        let p = s.path("amm.toml");
        std::fs::write(&p, c).expect("config");
        args.push("--config".into());
        args.push(p.display().to_string());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = worker_cmd(&s, &w, &refs);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(cmd)
}

#[test]
fn config_precedence_is_flag_then_env_then_file() {
    let file = "[worker.memory]\ntarget = 0.4\nspill = 0.65\npause = false\nmonitor-interval = \"150ms\"\nmax-spill = \"1GiB\"\n";
    let r = effective(&[], &[], Some(file));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    let c = &r.summary()["memory_config"];
    assert_eq!(c["target"], 0.4);
    assert_eq!(c["spill"], 0.65);
    assert!(c["pause"].is_null());
    assert_eq!(c["terminate"], 0.95, "default kept");
    assert_eq!(c["monitor_interval"], 150);
    assert_eq!(c["max_spill"], GIB);

    let env = [
        ("AMM_WORKER__MEMORY__TARGET", "0.5"),
        ("AMM_WORKER__MEMORY__MONITOR_INTERVAL", "120ms"),
    ];
    let r = effective(&[], &env, Some(file));
    let c = &r.summary()["memory_config"];
    assert_eq!(c["target"], 0.5, "env beats file");
    assert_eq!(c["monitor_interval"], 120);
    assert_eq!(c["spill"], 0.65, "file still applies");

    let r = effective(&["--target", "0.55", "--pause", "0.85"], &env, Some(file));
    let c = &r.summary()["memory_config"];
    assert_eq!(c["target"], 0.55, "flag beats env");
    assert_eq!(c["pause"], 0.85, "flag beats file");
}

#[test]
fn malformed_config_is_a_clear_error() {
    for (config, env, says) in [
        (
            Some("[worker.memory\ntarget = "),
            vec![],
            "malformed config file",
        ),
        (
            Some("[worker.memory]\ntargte = 0.5\n"),
            vec![],
            "unknown config key `worker.memory.targte`",
        ),
        (
            Some("[worker.memory]\nspill = 7\n"),
            vec![],
            "invalid value 7 for `worker.memory.spill`",
        ),
        (
            None,
            vec![("AMM_WORKER__MEMORY__PAUSE", "banana")],
            "AMM_WORKER__MEMORY__PAUSE",
        ),
        (
            None,
            vec![("AMM_WORKER__MEMORY__MONITOR_INTERVAL", "fast")],
            "not a duration",
        ),
    ] {
        let r = effective(&[], &env, config);
        assert_eq!(r.code, Some(1), "{}", r.describe());
        assert!(
            r.stderr.contains(says),
            "expected {says:?} in: {}",
            r.stderr
        );
        assert!(r.summary.is_none(), "ran despite a bad config");
    }
    let r = effective(&["--target", "2"], &[], None);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("--target"), "{}", r.stderr);
}

/// Issue 9 item 10: `--nthreads 100000` aborted with a backtrace; tiny or
/// ambiguous limits silently meant "no limit" or two bytes.
#[test]
fn thread_counts_and_limits_that_make_no_sense_are_clear_errors() {
    let r = effective(&["--nthreads", "100000"], &[], None);
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert!(r.stderr.contains("from 1 to 1024"), "{}", r.stderr);
    assert!(!r.stderr.contains("backtrace"), "{}", r.stderr);
    for limit in ["1", "2", "0.4B", "1e-300", "2e-9"] {
        let r = effective(&["--memory-limit", limit], &[], None);
        assert_eq!(r.code, Some(1), "{limit}: {}", r.describe());
        assert!(
            r.stderr.contains("1.0 is the whole auto limit"),
            "{}",
            r.stderr
        );
    }
    let r = effective(&["--memory-limit", "1.0", "--nthreads", "1024"], &[], None);
    assert_eq!(r.code, Some(0), "{}", r.describe());
}

/// Issue 9 item 10: levels out of order, and sizes that are not sizes, are
/// refused before anything runs, the way the agent refuses them.
#[test]
fn levels_out_of_order_and_nan_sizes_are_refused() {
    for (flags, env, config, says) in [
        (
            vec!["--spill", "0.99", "--terminate", "0.5"],
            vec![],
            None,
            "spill from flag --spill",
        ),
        (
            vec!["--pause", "0.5"],
            vec![("AMM_WORKER__MEMORY__TERMINATE", "0.4")],
            None,
            "terminate from environment variable AMM_WORKER__MEMORY__TERMINATE",
        ),
        (
            vec![],
            vec![],
            Some("[worker.memory]\ntarget = 0.9\n"),
            "must not decrease",
        ),
        (
            vec![],
            vec![],
            Some("[worker.memory]\nmax-spill = nan\n"),
            "invalid value NaN for `worker.memory.max-spill`",
        ),
        (
            vec![],
            vec![],
            Some("[worker.memory]\ntrim-threshold = 0.5\n"),
            "not a whole number of bytes",
        ),
    ] {
        let r = effective(&flags, &env, config);
        assert_eq!(r.code, Some(1), "{flags:?} {config:?}: {}", r.describe());
        assert!(
            r.stderr.contains(says),
            "expected {says:?} in: {}",
            r.stderr
        );
        assert!(r.summary.is_none(), "ran despite bad levels");
    }
    // Equal levels are allowed (the higher one wins at that byte).
    let r = effective(&["--spill", "0.8", "--pause", "0.8"], &[], None);
    assert_eq!(r.code, Some(0), "{}", r.describe());
}
