//! The preload libraries under real programs: C programs compiled here and
//! Python, each run with `LD_PRELOAD`, read back through their allocator
//! record (`amm-record`).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amm_integration_tests::bin;
use amm_integration_tests::preload::{
    Driver, Preload, compile_c, record_fds, record_of, record_where, snapshot_where,
};
use amm_record::{Access, Allocator, ReadError, Snapshot};

const MIB: u64 = 1 << 20;

/// A directory any uid can enter, with the C programs compiled into it.
fn programs() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let p = dir.path().to_path_buf();
    (dir, p)
}

fn driver(dir: &Path, preload: Preload, env: &[(&str, &str)]) -> Driver {
    let exe = compile_c("driver", dir, &[]).expect("compile driver.c");
    let mut cmd = preload.command(&exe);
    cmd.env("AMM_PRELOAD_INTERVAL_MS", "20")
        .envs(env.iter().copied());
    Driver::start(cmd).expect("start driver")
}

/// Live bytes as the record's allocator counts them.
fn live(s: &Snapshot) -> u64 {
    s.live()
}

fn require_root(test: &str) -> bool {
    amm_integration_tests::require_root_for(test, amm_integration_tests::RootFor::OtherUids)
}

#[test]
fn jemalloc_serves_the_program_configured_from_malloc_conf() {
    let (_d, dir) = programs();
    let mut p = driver(
        &dir,
        Preload::Jemalloc,
        &[("MALLOC_CONF", "dirty_decay_ms:-1")],
    );
    let r = record_of(p.pid);
    assert_eq!(r.info().allocator, Some(Allocator::Jemalloc));
    let s = r.snapshot().expect("snapshot");
    assert_eq!(
        s.stats.jemalloc.dirty_decay_ms,
        u64::MAX,
        "MALLOC_CONF did not reach jemalloc"
    );
    assert_eq!(
        s.stats.jemalloc.muzzy_decay_ms, 0,
        "amm's default muzzy_decay_ms:0 is missing"
    );

    assert_eq!(p.cmd("alloc 64 4096").expect("alloc"), "ok alloc");
    snapshot_where(&r, "64 MiB live in jemalloc", |s| live(s) >= 64 * MIB);
    assert_eq!(p.cmd("free").expect("free"), "ok free");
    let freed = snapshot_where(&r, "the freed blocks dirty", |s| {
        live(s) < 16 * MIB && s.stats.jemalloc.dirty_bytes >= 32 * MIB
    });

    let (rw, ticket) = amm_record::request_purge(p.pid).expect("request a purge");
    let answer = rw
        .wait_purge(ticket, Duration::from_secs(60))
        .expect("wait for the purge")
        .expect("the preload answers");
    let last = answer.stats.purge.last;
    assert_eq!(last.ticket, u64::from(ticket.0));
    assert!(
        last.returned_bytes >= 32 * MIB,
        "the purge returned {} bytes of {} dirty",
        last.returned_bytes,
        freed.stats.jemalloc.dirty_bytes
    );
    assert!(answer.stats.jemalloc.dirty_bytes < MIB, "{answer:#?}");
    assert!(last.cpu_ns > 0 && answer.stats.purge.requested_count == 1);
    assert!(p.finish().expect("wait").success());
}

#[test]
fn glibc_mode_observes_glibc_and_trims_on_request() {
    let (_d, dir) = programs();
    let mut p = driver(&dir, Preload::Glibc, &[]);
    let r = record_of(p.pid);
    assert_eq!(r.info().allocator, Some(Allocator::System));
    p.cmd("alloc 64 4096").expect("alloc");
    // residency is measured before mallinfo2 in a sample (so a free never
    // looks like a hoard), so during the fill one publication can show the
    // 64 MiB in use but the pages not yet: the record must show both soon
    let held = snapshot_where(&r, "64 MiB in use and resident in glibc", |s| {
        live(s) >= 64 * MIB && s.stats.glibc.arena_resident >= 64 * MIB
    });
    assert_eq!(
        held.stats.jemalloc.allocated, 0,
        "the glibc preload replaced malloc"
    );
    p.cmd("free_but_last").expect("free");
    let hoard = snapshot_where(&r, "a glibc hoard", |s| {
        live(s) < 16 * MIB && s.hoarded() >= 32 * MIB
    });
    let (rw, ticket) = amm_record::request_purge(p.pid).expect("request");
    let answer = rw
        .wait_purge(ticket, Duration::from_secs(60))
        .expect("wait")
        .expect("answered");
    let last = answer.stats.purge.last;
    assert!(
        last.returned_bytes >= 32 * MIB,
        "malloc_trim returned {} of a {} byte hoard",
        last.returned_bytes,
        hoard.hoarded()
    );
    assert!(last.hoarded_after < hoard.hoarded() / 4, "{last:#?}");
    assert!(p.finish().expect("wait").success());
}

#[test]
fn both_purge_on_their_own_past_malloc_trim_threshold() {
    let (_d, dir) = programs();
    for preload in Preload::BOTH {
        let env = [
            ("MALLOC_TRIM_THRESHOLD_", "4194304"),
            ("AMM_PRELOAD_PURGE_INTERVAL_MS", "100"),
            // jemalloc: no decay, so only the threshold purge returns memory
            ("MALLOC_CONF", "dirty_decay_ms:-1"),
            ("AMM_PRELOAD_DECAY", "0"),
        ];
        let mut p = driver(&dir, preload, &env);
        let r = record_of(p.pid);
        p.cmd("alloc 64 4096").expect("alloc");
        snapshot_where(&r, "64 MiB live", |s| live(s) >= 64 * MIB);
        p.cmd("free_but_last").expect("free");
        let s = snapshot_where(&r, "a threshold purge that returned the hoard", |s| {
            s.stats.purge.threshold_count >= 1 && s.stats.purge.returned_bytes_total >= 32 * MIB
        });
        assert_eq!(s.stats.purge.threshold_bytes, 4 << 20, "{preload:?}");
        assert_eq!(
            s.stats.purge.last.why(),
            Some(amm_record::PurgeReason::Threshold)
        );
        assert!(p.finish().expect("wait").success());
    }
}

#[test]
fn a_fork_child_publishes_its_own_record_and_drops_its_parents() {
    let (_d, dir) = programs();
    let exe = compile_c("forker", &dir, &[]).expect("compile forker.c");
    for preload in Preload::BOTH {
        let mut cmd = preload.command(&exe);
        cmd.env("AMM_PRELOAD_INTERVAL_MS", "20");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("forker");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let (mut parent, mut kid) = (0, 0);
        for _ in 0..2 {
            let mut l = String::new();
            std::io::BufRead::read_line(&mut out, &mut l).expect("line");
            let mut w = l.split_whitespace();
            match (w.next(), w.next().and_then(|v| v.parse::<i32>().ok())) {
                (Some("parent"), Some(pid)) => parent = pid,
                (Some("child"), Some(pid)) => kid = pid,
                _ => panic!("forker said {l:?}"),
            }
        }
        let pr = record_of(parent);
        let cr = record_of(kid);
        assert_eq!(cr.info().ns_pid, kid as u32);
        assert_ne!(cr.info().start_time, 0);
        snapshot_where(&cr, "the child's 96 MiB", |s| live(s) >= 96 * MIB);
        let ps = snapshot_where(&pr, "the parent's 32 MiB", |s| live(s) >= 32 * MIB);
        assert!(
            live(&ps) < 64 * MIB,
            "{preload:?}: the parent counts its child's memory"
        );
        assert_eq!(
            record_fds(kid),
            1,
            "{preload:?}: the child kept its parent's record open"
        );
        drop(child.stdin.take());
        assert!(child.wait().expect("wait").success());
    }
}

#[test]
fn exec_drops_the_record_and_the_new_program_publishes_its_own() {
    let (_d, dir) = programs();
    let exe = compile_c("driver", &dir, &[]).expect("compile");
    let mut p = driver(&dir, Preload::Jemalloc, &[]);
    let before = record_of(p.pid).info().created_mono_ns;
    let again = p
        .cmd(&format!("exec {} again", exe.display()))
        .expect("exec");
    assert_eq!(again, format!("ready {}", p.pid), "the exec'd program");
    let after = record_where(p.pid, |r| r.info().created_mono_ns > before);
    assert_eq!(after.info().allocator, Some(Allocator::Jemalloc));
    assert_eq!(record_fds(p.pid), 1, "the old record survived the exec");
    assert!(p.finish().expect("wait").success());
}

#[test]
fn many_threads_through_every_entry_point() {
    let (_d, dir) = programs();
    let exe = compile_c("threads", &dir, &[]).expect("compile threads.c");
    for preload in Preload::BOTH {
        let out = preload
            .command(&exe)
            .env("AMM_PRELOAD_INTERVAL_MS", "1")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{preload:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `cmd` to its end; fails the test (and kills it) if it hangs.
fn run_to_end(mut cmd: Command, what: &str) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(_st) = child.try_wait().expect("try_wait") {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} hung (killed after 120 s)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exit_while_the_publisher_runs_never_crashes_or_hangs() {
    let (_d, dir) = programs();
    let exe = compile_c("threads", &dir, &[]).expect("compile threads.c");
    for preload in Preload::BOTH {
        for i in 0..30 {
            let mut cmd = preload.command(&exe);
            cmd.arg("exit").env("AMM_PRELOAD_INTERVAL_MS", "1");
            let out = run_to_end(cmd, &format!("{preload:?} run {i}"));
            assert!(
                out.status.success(),
                "{preload:?} run {i}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn allocation_before_main_and_programs_that_never_allocate() {
    let (_d, dir) = programs();
    let early = compile_c("early", &dir, &[]).expect("compile early.c");
    let idle = compile_c("early", &dir, &["NO_MALLOC"]).expect("compile early.c");
    for preload in Preload::BOTH {
        for exe in [&early, &idle] {
            let out = run_to_end(
                preload.command(exe),
                &format!("{preload:?} {}", exe.display()),
            );
            assert!(
                out.status.success(),
                "{preload:?} {}: {}",
                exe.display(),
                out.status
            );
            assert!(
                out.stderr.is_empty(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn a_program_that_never_frees_exits_cleanly() {
    let (_d, dir) = programs();
    for preload in Preload::BOTH {
        let mut p = driver(&dir, preload, &[]);
        let r = record_of(p.pid);
        p.cmd("alloc 128 1000").expect("alloc");
        snapshot_where(&r, "128 MiB live", |s| live(s) >= 128 * MIB);
        let _ = p.cmd("exit");
        assert!(p.finish().expect("wait").success(), "{preload:?}");
    }
}

#[test]
fn a_program_that_closes_every_descriptor_gets_a_new_record() {
    let (_d, dir) = programs();
    let mut p = driver(&dir, Preload::Jemalloc, &[]);
    let old = record_of(p.pid);
    assert_eq!(p.cmd("closefds").expect("closefds"), "ok closefds");
    let new = record_where(p.pid, |r| {
        r.info().created_mono_ns > old.info().created_mono_ns
    });
    assert_eq!(old.snapshot().err(), Some(ReadError::Superseded));
    assert!(new.snapshot().is_ok());
    assert!(p.finish().expect("wait").success());
}

/// A program that closes every descriptor while the publisher is reading a
/// `/proc` file of its own (every millisecond here) must lose nothing: the
/// publisher never closes a descriptor the program closed (a debug build
/// of Rust's `OwnedFd` aborts the process on that; a release build could
/// close a file the program opened meanwhile under the same number).
#[test]
fn closing_every_descriptor_again_and_again_never_kills_the_publisher() {
    let (_d, dir) = programs();
    for preload in Preload::BOTH {
        let exe = compile_c("driver", &dir, &[]).expect("compile driver.c");
        let mut cmd = preload.command(&exe);
        cmd.env("AMM_PRELOAD_INTERVAL_MS", "1");
        let mut p = Driver::start(cmd).expect("start driver");
        let old = record_of(p.pid);
        for i in 0..400 {
            let reply = p.cmd("closefds");
            assert_eq!(
                reply.as_deref().ok(),
                Some("ok closefds"),
                "{preload:?}: the program died at close_range number {i}: {reply:?}"
            );
            if i % 40 == 0 {
                // let the publisher make (and read into) a new record
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        let new = record_where(p.pid, |r| {
            r.info().created_mono_ns > old.info().created_mono_ns
        });
        snapshot_where(&new, "a publication in the new record", |s| {
            s.stats.publication.count > 0
        });
        assert!(p.finish().expect("wait").success(), "{preload:?}");
    }
}

/// Copies `bin` where any uid can run it.
fn world_runnable(dir: &Path, bin: &Path) -> PathBuf {
    let to = dir.join(bin.file_name().expect("name"));
    std::fs::copy(bin, &to).expect("copy");
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    to
}

fn show_as(uid: u32, cli: &Path, pid: i32) -> std::process::Output {
    Command::new(cli)
        .args(["show", &pid.to_string()])
        .uid(uid)
        .gid(uid)
        .output()
        .expect("amm-record")
}

#[test]
fn a_process_that_drops_root_publishes_a_record_its_new_uid_owns() {
    if !require_root("a_process_that_drops_root_publishes_a_record_its_new_uid_owns") {
        return;
    }
    let (_d, dir) = programs();
    let cli = world_runnable(&dir, &bin("amm-record"));
    let (user, stranger) = (65534u32, 65533u32);
    let mut p = driver(&dir, Preload::Jemalloc, &[]);
    let root_record = record_of(p.pid);
    assert_eq!(root_record.info().owner_uid, 0);
    assert_eq!(
        p.cmd(&format!("setuid {user}")).expect("setuid"),
        "ok setuid"
    );
    let r = record_where(p.pid, |r| r.info().owner_uid == user);
    assert!(r.snapshot().is_ok());
    assert_eq!(root_record.snapshot().err(), Some(ReadError::Superseded));
    // not dumpable after setuid: only root may look into it
    assert!(!show_as(user, &cli, p.pid).status.success());
    assert_eq!(p.cmd("dumpable").expect("dumpable"), "ok dumpable");
    let out = show_as(user, &cli, p.pid);
    assert!(
        out.status.success(),
        "its new uid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = show_as(stranger, &cli, p.pid);
    assert!(!out.status.success(), "a stranger read it");
    let (rw, t) = amm_record::request_purge(p.pid).expect("root requests");
    assert!(
        rw.wait_purge(t, Duration::from_secs(60))
            .expect("wait")
            .is_some()
    );
    let _ = amm_record::open_task(r.task(), Access::Read).expect("reopen");
    assert!(p.finish().expect("wait").success());
}

const PY_CHURN: &str = r#"
import os, sys, threading, subprocess
print("ready", os.getpid(), flush=True)
keep = [("x%d" % i) * 100 for i in range(100000)]   # ~60 MiB of malloc'd strings
def work():
    junk = [bytes(2000) for _ in range(5000)]
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
pid = os.fork()
if pid == 0:
    work()
    os._exit(0)
_, st = os.waitpid(pid, 0)
[t.join() for t in threads]
subprocess.run(["true"], check=True)
print("done", st, flush=True)
sys.stdin.read()
"#;

#[test]
fn python_runs_on_both_and_publishes() {
    for preload in Preload::BOTH {
        let mut cmd = preload.command(Path::new("python3"));
        cmd.args(["-c", PY_CHURN])
            .env("AMM_PRELOAD_INTERVAL_MS", "20")
            .env("PYTHONMALLOC", "malloc");
        let mut p = Driver::start(cmd).expect("python3");
        assert_eq!(p.line().expect("done"), "done 0", "{preload:?}");
        let r = record_of(p.pid);
        assert_eq!(r.info().allocator, Some(preload.allocator()));
        snapshot_where(&r, "Python's strings in the allocator", |s| {
            live(s) >= 32 * MIB
        });
        assert!(p.finish().expect("wait").success(), "{preload:?}");
    }
}
