//! The record between real processes: a publisher child (the `publish`
//! example), readers in this process or in children running as other uids.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use amm_record::layout::STATS_WORDS;
use amm_record::{
    Access, Allocator, OpenError, PurgeError, ReadError, Refusal, Stats, Task, Writer,
};

/// target/<profile>, from this test's own path (target/<profile>/deps/NAME).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

fn example() -> PathBuf {
    let p = profile_dir().join("examples/publish");
    assert!(
        p.exists(),
        "{} missing: run `cargo test -p amm-record` (builds the examples)",
        p.display()
    );
    p
}

/// A running publisher; dropping it closes its stdin, which ends it.
struct Publisher {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: i32,
}

impl Publisher {
    fn start(args: &[&str]) -> Publisher {
        Publisher::start_with(Command::new(example()).args(args))
    }

    fn start_with(cmd: &mut Command) -> Publisher {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the publish example");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the ready line");
        assert!(line.starts_with("ready "), "publisher said {line:?}");
        let pid = child.id() as i32;
        Publisher { child, stdin, pid }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Root-only tests skip visibly outside CI; `AMM_REQUIRE_ROOT=1` (CI) makes
/// a skip a failure.
fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("AMM_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test} needs root and AMM_REQUIRE_ROOT=1 forbids skipping it");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs root (other uids)");
    false
}

#[test]
fn a_publication_is_read_back_whole_and_purges_are_answered() {
    let p = Publisher::start(&[]);
    let reader = amm_record::open(p.pid).expect("open the publisher's record");
    assert_eq!(reader.info().allocator, Some(Allocator::Jemalloc));
    assert_eq!(reader.task().pid, p.pid);
    let first = reader.snapshot().expect("snapshot");
    assert_eq!(first.state, "live");
    // the counter moves: the reader sees new publications, not a copy
    let later = loop {
        let s = reader.snapshot().expect("snapshot");
        if s.stats.publication.count > first.stats.publication.count {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(later.stats.publication.mono_ns >= first.stats.publication.mono_ns);

    // read-only readers cannot request
    assert!(matches!(reader.request_purge(), Err(PurgeError::ReadOnly)));
    let (rw, ticket) = amm_record::request_purge(p.pid).expect("request a purge");
    let answer = rw
        .wait_purge(ticket, Duration::from_secs(30))
        .expect("wait")
        .expect("the publisher answers");
    assert!(answer.stats.purge.last.ticket >= u64::from(ticket.0));
    assert_eq!(
        answer.stats.purge.last.requested_by_pid,
        u64::from(std::process::id())
    );
}

#[test]
fn a_reader_never_sees_a_torn_publication_across_processes() {
    let p = Publisher::start(&["--hammer"]);
    let reader = amm_record::open(p.pid).expect("open");
    let mut last = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut reads = 0;
    while reads < 20_000 {
        // a loaded machine can keep this reader off the CPU past its
        // patience while the hammer writes on: read again (bounded)
        let snap = match reader.snapshot() {
            Ok(s) => s,
            Err(ReadError::Stuck) if std::time::Instant::now() < deadline => continue,
            Err(e) => panic!("after {reads} reads: {e}"),
        };
        reads += 1;
        let words: &[u64; STATS_WORDS] = bytemuck::cast_ref(&snap.stats);
        assert!(
            words.iter().all(|w| *w == words[0]),
            "torn publication: {} beside {:?}",
            words[0],
            words.iter().find(|w| **w != words[0])
        );
        assert!(words[0] >= last);
        last = words[0];
    }
    assert!(last > 0, "the hammer published nothing");
}

#[test]
fn forged_records_are_refused() {
    type Expect = fn(&Refusal) -> bool;
    let cases: &[(&str, Expect)] = &[
        ("magic", |r| *r == Refusal::Magic),
        ("version", |r| *r == Refusal::Version(99)),
        ("pid", |r| matches!(r, Refusal::Pid { .. })),
        ("start-time", |r| matches!(r, Refusal::StartTime { .. })),
        ("unsealed", |r| *r == Refusal::NotSealed),
        ("unmapped", |r| *r == Refusal::NotMapped),
    ];
    for (kind, expected) in cases {
        let p = Publisher::start(&["--forge", kind]);
        match amm_record::open(p.pid) {
            Err(OpenError::Refused { reason, .. }) => {
                assert!(
                    expected(&reason),
                    "{kind}: refused for the wrong reason: {reason}"
                )
            }
            Ok(_) => panic!("{kind}: a forged record was accepted"),
            Err(e) => panic!("{kind}: expected a refusal, got {e}"),
        }
    }
}

#[test]
fn a_record_owned_by_a_stranger_uid_is_refused() {
    if !require_root("a_record_owned_by_a_stranger_uid_is_refused") {
        return;
    }
    let p = Publisher::start(&["--forge", "owner"]);
    match amm_record::open(p.pid) {
        Err(OpenError::Refused {
            reason: Refusal::Owner(12345),
            ..
        }) => {}
        other => panic!("expected an owner refusal, got {other:?}"),
    }
}

#[test]
fn a_publisher_stuck_inside_a_write_does_not_hang_the_reader() {
    let p = Publisher::start(&["--forge", "stuck"]);
    let reader = amm_record::open(p.pid).expect("the header is valid");
    assert_eq!(reader.snapshot().err(), Some(ReadError::Stuck));
}

#[test]
fn a_pid_now_held_by_another_task_is_refused() {
    let p = Publisher::start(&[]);
    let mut task = Task::of(p.pid).expect("task");
    task.start_time -= 1; // the task the caller meant started earlier
    match amm_record::open_task(&task, Access::Read) {
        Err(OpenError::Replaced { pid, .. }) => assert_eq!(pid, p.pid),
        other => panic!("expected Replaced, got {other:?}"),
    }
}

#[test]
fn a_process_without_a_record_says_how_to_get_one() {
    let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
    let err = amm_record::open(child.id() as i32).expect_err("no record");
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(err, OpenError::NoRecord(_)), "{err:?}");
    assert!(err.to_string().contains("LD_PRELOAD"), "{err}");
}

#[test]
fn the_record_is_not_inherited_across_exec_and_closes_with_its_writer() {
    let w = Writer::create(Some(Allocator::System), Duration::from_millis(100)).expect("writer");
    let out = Command::new("sh")
        .args(["-c", "ls -l /proc/$$/fd/"])
        .output()
        .expect("sh");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        !listing.contains("amm-record"),
        "exec inherited the record:\n{listing}"
    );
    let mut stats = Stats::default();
    stats.publication.count = 1;
    let mut w = w;
    w.publish(&stats);
    let ino = w.inherited_parts().ino;
    drop(w);
    // other tests of this binary hold readers of their children's records
    // (also memfds named amm-record) at the same time: look for this
    // writer's own memfd, by inode
    let left = std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .filter(|m| std::os::unix::fs::MetadataExt::ino(m) == ino)
        .count();
    assert_eq!(left, 0, "the dropped writer left its descriptor open");
}

/// Copies the example where any uid can run it (the build tree may be
/// private) and returns (dir guard, path).
fn world_runnable(bin: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let to = dir.path().join(bin.file_name().expect("name"));
    std::fs::copy(bin, &to).expect("copy");
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (dir, to)
}

fn record_cli() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_amm-record"))
}

/// `amm-record CMD PID` as `uid`.
fn cli_as(uid: u32, bin: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin)
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("run amm-record")
}

#[test]
fn only_the_owner_and_root_can_read_or_purge_a_record() {
    if !require_root("only_the_owner_and_root_can_read_or_purge_a_record") {
        return;
    }
    let (_d1, publish) = world_runnable(&example());
    let (_d2, cli) = world_runnable(&record_cli());
    let (owner, stranger) = (65534u32, 65533u32);
    let p = Publisher::start_with(Command::new(&publish).uid(owner).gid(owner));
    let pid = p.pid.to_string();

    let out = cli_as(stranger, &cli, &["show", &pid]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stranger read the record");
    assert!(err.contains("permission denied"), "stranger's error: {err}");
    let out = cli_as(stranger, &cli, &["purge", &pid, "1000"]);
    assert!(!out.status.success(), "a stranger requested a purge");

    let out = cli_as(owner, &cli, &["show", &pid]);
    assert!(
        out.status.success(),
        "the owner cannot read: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli_as(owner, &cli, &["purge", &pid, "30000"]);
    assert!(
        out.status.success(),
        "the owner cannot purge: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let reader = amm_record::open(p.pid).expect("root reads any record");
    assert_eq!(reader.info().owner_uid, owner);
    let (_rw, _ticket) = amm_record::request_purge(p.pid).expect("root may request");
}
