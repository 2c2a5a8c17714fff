//! The agent against careless operators and hostile local users: what sits
//! at its socket path, connection floods, idle clients, other users'
//! watches, answers too large for a frame, a closed pipe, nonsense flags.
//! Needs root (the agent loads BPF; the tests create users).

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amm_integration_tests::{Agent, Faulter, TestUser, bin, bpf_object, require_root};
use amm_protocol::{ClientError, Registration, SampleKind, Split};

/// Waits for `child` at most `limit`; kills it if it is still running.
fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Runs `amm-agent ARGS`, which must fail within 20 s; returns its stderr.
fn agent_fails(args: &[&str]) -> String {
    let mut child = Command::new(bin("amm-agent"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("amm-agent");
    let status = wait_or_kill(&mut child, Duration::from_secs(20));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        status.is_some_and(|s| !s.success()),
        "amm-agent {args:?} did not fail (status {status:?}); stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn run_on(socket: &Path) -> String {
    let obj = bpf_object();
    agent_fails(&[
        "run",
        "--socket",
        socket.to_str().expect("utf-8 path"),
        "--bpf-object",
        obj.to_str().expect("utf-8 path"),
        "--realtime-priority",
        "0",
    ])
}

#[test]
fn the_socket_path_is_taken_only_from_a_stale_socket() {
    if !require_root("the_socket_path_is_taken_only_from_a_stale_socket") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("precious");
    std::fs::write(&file, b"do not delete").expect("write");
    let err = run_on(&file);
    assert!(
        err.contains("a regular file") && err.contains("--socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).expect("still there"), b"do not delete");

    let sub = dir.path().join("a-directory");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::write(sub.join("inside"), b"x").expect("write");
    let err = run_on(&sub);
    assert!(err.contains("a directory"), "{err}");
    assert!(sub.join("inside").exists());

    let link = dir.path().join("a-link");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    let err = run_on(&link);
    assert!(err.contains("a symbolic link"), "{err}");
    assert!(file.exists() && link.symlink_metadata().is_ok());

    // a live socket: another agent serves it
    let agent = Agent::start().expect("agent");
    let err = run_on(agent.socket());
    assert!(err.contains("already listens"), "{err}");
    agent
        .client()
        .expect("the first agent still serves")
        .ping(1)
        .expect("ping");

    // a stale socket (its agent was killed) is replaced
    let mut agent = agent;
    agent.kill();
    assert!(
        agent
            .socket()
            .symlink_metadata()
            .expect("stale socket left")
            .file_type()
            .is_socket()
    );
    agent.restart().expect("a stale socket is replaced");
    agent.client().expect("client").ping(2).expect("ping");
}

/// `flood SOCKET N` from a process of `user`: (opened, refused, first reason).
fn flood(agent: &Agent, f: &mut Faulter, n: usize) -> (usize, usize, String) {
    let r = f
        .cmd(&format!("flood {} {n}", agent.socket().display()))
        .expect("flood");
    let mut it = r.split_whitespace();
    let opened = it.next().and_then(|x| x.parse().ok()).expect("opened");
    let refused = it.next().and_then(|x| x.parse().ok()).expect("refused");
    (opened, refused, it.next().unwrap_or("").replace('_', " "))
}

fn status_cli(agent: &Agent) -> std::process::Output {
    Command::new(bin("amm-agent"))
        .args(["status", "--socket"])
        .arg(agent.socket())
        .output()
        .expect("amm-agent status")
}

#[test]
fn one_user_s_idle_connections_cannot_lock_out_anyone() {
    if !require_root("one_user_s_idle_connections_cannot_lock_out_anyone") {
        return;
    }
    let (a, b, c) = (
        TestUser::create("a").expect("user a"),
        TestUser::create("b").expect("user b"),
        TestUser::create("c").expect("user c"),
    );
    // no idle timeout in this test's lifetime: the slots stay taken
    let agent =
        Agent::start_with(&["--max-clients", "64", "--idle-timeout-ms", "3600000"]).expect("agent");
    let mut fa = Faulter::spawn_as(a.uid, a.gid).expect("a's process");
    let (opened, refused, why) = flood(&agent, &mut fa, 300);
    assert_eq!((opened, refused), (32, 268), "{why}");
    assert!(
        why.contains("busy")
            && why.contains(&format!("uid {}", a.uid))
            && why.contains("close idle"),
        "the refusal says why, not a broken pipe: {why}"
    );
    // another user is served: connects, registers itself, gets its events
    let mut fb = Faulter::spawn_as(b.uid, b.gid).expect("b's process");
    fb.cmd(&format!("connect {}", agent.socket().display()))
        .expect("b connects while a holds its most");
    fb.cmd("register 0").expect("b registers itself");
    // b fills the rest of the agent: only then is a third user turned away
    let (opened, _, _) = flood(&agent, &mut fb, 300);
    assert_eq!(opened, 64 - 32 - 1);
    let mut fc = Faulter::spawn_as(c.uid, c.gid).expect("c's process");
    let reply = fc
        .try_cmd(&format!("connect {}", agent.socket().display()))
        .expect("reply");
    assert!(reply.contains("at most 64 clients"), "{reply}");
    // root's status is always served, from its reserve
    let out = status_cli(&agent);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("client(s)"));
    assert!(
        fb.cmd("status-pids")
            .expect("b still served")
            .contains(&fb.pid().to_string())
    );
    fa.exit().expect("a exits");
    fb.exit().expect("b exits");
    fc.exit().expect("c exits");
}

#[test]
fn a_user_s_watches_are_capped() {
    if !require_root("a_user_s_watches_are_capped") {
        return;
    }
    let a = TestUser::create("q").expect("user");
    let agent = Agent::start_with(&["--max-watches-per-uid", "3"]).expect("agent");
    let mut fa = Faulter::spawn_as(a.uid, a.gid).expect("a's process");
    fa.cmd(&format!("connect {}", agent.socket().display()))
        .expect("connect");
    for _ in 0..3 {
        let child = fa.cmd("child").expect("child");
        fa.cmd(&format!("register {child}"))
            .expect("within the quota");
    }
    let child = fa.cmd("child").expect("child");
    let reply = fa.try_cmd(&format!("register {child}")).expect("reply");
    assert!(
        reply.starts_with("err") && reply.contains("already has 3 watches"),
        "{reply}"
    );
    fa.exit().expect("exit");
}

#[test]
fn an_idle_client_is_closed_and_a_watching_one_is_not() {
    if !require_root("an_idle_client_is_closed_and_a_watching_one_is_not") {
        return;
    }
    let user = TestUser::create("i").expect("user");
    let agent = Agent::start_with(&["--idle-timeout-ms", "1000"]).expect("agent");
    // a user's flood of idle connections is closed, and its slots come back
    let mut fu = Faulter::spawn_as(user.uid, user.gid).expect("user's process");
    let (opened, _, _) = flood(&agent, &mut fu, 40);
    assert_eq!(opened, 32);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let (opened, _, why) = flood(&agent, &mut fu, 1);
        if opened == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle connections kept their slots: {why}"
        );
    }
    fu.exit().expect("exit");
    let mut idle = agent.client().expect("idle client");
    let mut busy = agent.client().expect("watching client");
    let f = Faulter::spawn().expect("child");
    busy.register(&Registration::new(f.pid(), 1 << 30))
        .expect("register");
    std::thread::sleep(Duration::from_millis(3000));
    match idle.ping(1) {
        Err(ClientError::Busy(reason)) => assert!(reason.contains("idle"), "{reason}"),
        other => panic!("an idle client was not closed with a reason: {other:?}"),
    }
    busy.ping(2).expect("a client with a watch stays");
    drop(f);
}

#[test]
fn a_client_sees_only_its_own_uid_s_watches() {
    if !require_root("a_client_sees_only_its_own_uid_s_watches") {
        return;
    }
    let user = TestUser::create("v").expect("user");
    let agent = Agent::start().expect("agent");
    let mut root = agent.client().expect("root client");
    let f = Faulter::spawn().expect("root's child");
    root.register(&Registration::new(f.pid(), 1 << 30))
        .expect("register");
    root.send_message(&amm_protocol::ClientMessage::Accounting {
        pid: f.pid(),
        t_ns: 1,
        split: Split {
            process: 1 << 20,
            managed: 42,
            ..Split::default()
        },
        heap: None,
    })
    .expect("accounting");
    let mut u = Faulter::spawn_as(user.uid, user.gid).expect("user's process");
    u.cmd(&format!("connect {}", agent.socket().display()))
        .expect("connect");
    u.cmd("register 0").expect("register itself");
    let shown = u.cmd("status-pids").expect("status");
    assert_eq!(
        shown,
        u.pid().to_string(),
        "a user sees only its own watches"
    );
    let reply = u.try_cmd(&format!("timeline {}", f.pid())).expect("reply");
    assert!(
        reply.starts_with("err") && reply.contains("no timeline of yours"),
        "{reply}"
    );
    u.cmd(&format!("timeline {}", u.pid()))
        .expect("its own timeline");
    // root sees both, with the owners, and root's accounting
    let s = root.status().expect("status");
    let owners: Vec<(u32, Option<u32>)> = s.watches.iter().map(|w| (w.pid, w.owner_uid)).collect();
    assert!(owners.contains(&(f.pid(), Some(0))), "{owners:?}");
    assert!(owners.contains(&(u.pid(), Some(user.uid))), "{owners:?}");
    let t = root.timeline(f.pid()).expect("timeline");
    assert!(
        t.iter()
            .any(|x| matches!(x.what, SampleKind::Accounting(_)))
    );
    u.exit().expect("exit");
}

/// Children that sleep, reaped and killed on drop.
struct Sleepers(Vec<Child>);

impl Sleepers {
    fn spawn(n: usize) -> Self {
        Self(
            (0..n)
                .map(|_| Command::new("sleep").arg("600").spawn().expect("sleep"))
                .collect(),
        )
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn status_pages_through_a_thousand_watches_and_full_timelines() {
    if !require_root("status_pages_through_a_thousand_watches_and_full_timelines") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut c = agent.client().expect("client");
    let live = Sleepers::spawn(1000);
    for s in &live.0 {
        c.register(&Registration::new(s.id(), 1 << 30))
            .expect("register");
    }
    // watches that end with long accounting timelines
    let mut ending = Sleepers::spawn(40);
    for s in &ending.0 {
        c.register(&Registration::new(s.id(), 1 << 30))
            .expect("register");
        for i in 0..300u64 {
            let split = Split {
                process: (100 << 20) + i * 4096,
                managed: 50 << 20,
                unmanaged_live: 10 << 20,
                hoarded: 5 << 20,
                non_heap: 35 << 20,
                spilled: i << 20,
                unmanaged_recent: 1 << 20,
            };
            let t_ns = amm_agent::clock::monotonic_ns();
            c.send_message(&amm_protocol::ClientMessage::Accounting {
                pid: s.id(),
                t_ns,
                split,
                heap: None,
            })
            .expect("accounting");
        }
    }
    let ended_pids: Vec<u32> = ending.0.iter().map(Child::id).collect();
    for s in &mut ending.0 {
        let _ = s.kill();
        let _ = s.wait();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = c.status().expect("status, paged");
        if s.ended.len() >= amm_agent::server::ENDED_PER_UID {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "exits not seen: {} ended",
            s.ended.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s.watches.len(), 1000);
    assert_eq!((s.total_watches, s.total_ended), (1000, s.ended.len()));
    assert!(
        s.ended
            .iter()
            .all(|w| w.timeline_len > 300 && ended_pids.contains(&w.pid))
    );
    // the command-line tool pages too, as text and as JSON
    let out = status_cli(&agent);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("watched pid"))
            .count(),
        1000
    );
    let json = Command::new(bin("amm-agent"))
        .args(["status", "--json", "--timeline", "--socket"])
        .arg(agent.socket())
        .output()
        .expect("status --json");
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let parsed: amm_protocol::AgentStatus =
        serde_json::from_slice(&json.stdout).expect("status --json parses");
    assert!(
        parsed
            .ended
            .iter()
            .all(|w| w.timeline.len() == w.timeline_len)
    );
    // the live report of an ended worker still works among a thousand watches
    let last = s.ended.last().expect("an ended watch").pid;
    let report = Command::new(bin("amm-worker"))
        .args(["report", "--agent"])
        .arg(agent.socket())
        .args(["--pid", &last.to_string()])
        .output()
        .expect("amm-worker report --agent");
    assert!(
        report.status.success(),
        "report --agent failed: {}",
        String::from_utf8_lossy(&report.stderr)
    );
    drop(live);
}

#[test]
fn status_into_a_closed_pipe_does_not_panic() {
    if !require_root("status_into_a_closed_pipe_does_not_panic") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    // the reader is gone before the first line: `amm-agent status | head -0`
    drop(read_end);
    let out = Command::new(bin("amm-agent"))
        .args(["status", "--socket"])
        .arg(agent.socket())
        .stdout(Stdio::from(write_end))
        .output()
        .expect("amm-agent status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "status {:?}: {err}", out.status);
}

#[test]
fn nonsense_flags_are_refused_with_a_clear_error() {
    for (flag, value) in [
        ("--max-clients", "0"),
        ("--max-clients-per-uid", "0"),
        ("--max-watches-per-uid", "0"),
        ("--idle-timeout-ms", "0"),
        ("--hello-timeout-ms", "0"),
        ("--frame-timeout-ms", "0"),
        ("--spike-horizon-ms", "0"),
    ] {
        let err = agent_fails(&["run", "--socket", "/nonexistent/amm.sock", flag, value]);
        assert!(
            err.contains(flag) && err.contains("at least 1"),
            "{flag}: {err}"
        );
    }
    let err = agent_fails(&["run", "--max-clients", "8", "--max-clients-per-uid", "9"]);
    assert!(err.contains("--max-clients-per-uid 9 is above"), "{err}");
    let err = agent_fails(&[
        "run",
        "--socket",
        "/nonexistent/amm.sock",
        "--http",
        "127.0.0.1:0",
        "--http-max-connections",
        "18446744073709551615",
    ]);
    assert!(
        err.contains("--http-max-connections 18446744073709551615 is more than"),
        "{err}"
    );
    let err = agent_fails(&["run", "--socket-mode", "0007"]);
    assert!(err.contains("owner read and write"), "{err}");
    let me = std::process::id().to_string();
    let err = agent_fails(&[
        "watch",
        "--pid",
        &me,
        "--limit",
        "1GiB",
        "--spill",
        "0.99",
        "--terminate",
        "0.5",
    ]);
    assert!(err.contains("must not decrease"), "{err}");
    let err = agent_fails(&["watch", "--pid", &me, "--limit", "1GiB", "--pause", "NaN"]);
    assert!(err.contains("pause=NaN"), "{err}");
    let err = agent_fails(&[
        "watch",
        "--pid",
        &me,
        "--limit",
        "18446744073709551615",
        "--terminate",
        "1.0",
    ]);
    assert!(err.contains("never fire"), "{err}");
}

#[test]
fn the_largest_client_limits_serve_root_and_users() {
    if !require_root("the_largest_client_limits_serve_root_and_users") {
        return;
    }
    let most = "18446744073709551615";
    let agent =
        Agent::start_with(&["--max-clients", most, "--max-clients-per-uid", most]).expect("agent");
    agent
        .client()
        .expect("root connects")
        .ping(1)
        .expect("ping");
    let out = status_cli(&agent);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user = TestUser::create("m").expect("user");
    let mut f = Faulter::spawn_as(user.uid, user.gid).expect("a user's process");
    f.cmd(&format!("connect {}", agent.socket().display()))
        .expect("a user connects");
    f.exit().expect("exit");
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}
