//! The real `amm-agent run` daemon: registrations, identity, hostile
//! clients, and clean-up after disconnects and exits. Needs root.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use amm_ebpf::{EventKind, Level};
use amm_integration_tests::{Agent, Faulter, event_where, require_root, spawn_at_pid};
use amm_protocol::{
    ClientError, ClientMessage, MapEntries, Registration, ServerMessage, VERSION, decode, encode,
    read_frame,
};

const MIB: u64 = 1 << 20;
const NOBODY: u32 = 65534;

fn start_time_of(pid: u32) -> u64 {
    amm_agent::identity::ProcInfo::read(pid)
        .expect("proc info")
        .start_time
}

#[test]
fn a_registered_child_s_events_reach_its_client() {
    if !require_root("a_registered_child_s_events_reach_its_client") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut client = agent.client().expect("client");
    let mut f = Faulter::spawn().expect("child");
    let (_, rss0) = f.hwm_rss().expect("status");
    let limit = rss0 + 200 * MIB;
    let mut reg = Registration::new(f.pid(), limit);
    reg.start_time = Some(start_time_of(f.pid()));
    let r = client.register(&reg).expect("a child of ours is accepted");
    assert_eq!(r.level, Level::Below);
    assert!(r.rss_bytes > 0);

    f.cmd("touch 150").expect("touch");
    // a spike alarm may come first: 150 MiB at full speed predicts
    // terminate within the default 200 ms horizon
    let e = event_where(&mut client, "a level event", |e| {
        e.event == EventKind::Level
    });
    assert_eq!((e.prev_level, e.level), (Level::Below, Level::Spill));
    assert!(e.rss_bytes >= r.thresholds.spill);
    let status = client.status().expect("status");
    assert_eq!(status.watches.len(), 1);
    assert_eq!(status.watches[0].pid, f.pid());

    let (hwm, _) = f.hwm_rss().expect("status");
    f.exit().expect("exit");
    let e = event_where(&mut client, "the exit", |e| e.event == EventKind::Exit);
    assert!(e.peak_rss_bytes >= hwm && e.peak_rss_bytes - hwm < 64 * 4096);
    let status = client.status().expect("status");
    assert!(status.watches.is_empty());
    assert_eq!(status.map_entries, MapEntries::default());
}

#[test]
fn a_direct_client_reads_its_own_ring_buffer() {
    if !require_root("a_direct_client_reads_its_own_ring_buffer") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut client = agent.client().expect("client");
    let mut f = Faulter::spawn().expect("child");
    let (_, rss0) = f.hwm_rss().expect("status");
    let r = client
        .register(&Registration {
            direct: true,
            ..Registration::new(f.pid(), rss0 + 200 * MIB)
        })
        .expect("register");
    let mut ring = r.ring.expect("a ring buffer came with the answer");
    assert_eq!(client.status().expect("status").map_entries.client_rings, 1);
    f.cmd("touch 150").expect("touch");
    let mut from_ring = Vec::new();
    while let Some(raw) = ring.recv(Some(Duration::from_secs(2))).expect("ring") {
        from_ring.push(amm_protocol::EventMessage::from_kernel(&raw).expect("known event"));
        if from_ring.iter().any(|e| e.event == EventKind::Level) {
            break;
        }
    }
    let up = from_ring
        .iter()
        .find(|e| e.event == EventKind::Level)
        .expect("the level event on the client's own ring");
    assert_eq!((up.pid, up.level), (f.pid(), Level::Spill));
    // the same event also came over the socket
    let mut from_socket = Vec::new();
    while let Some(e) = client
        .next_event(Some(Duration::from_secs(2)))
        .expect("socket")
    {
        let done = e.event == EventKind::Level;
        from_socket.push(e);
        if done {
            break;
        }
    }
    assert_eq!(from_socket.last(), Some(up));
    f.exit().expect("exit");
    let exit = loop {
        let raw = ring
            .recv(Some(Duration::from_secs(10)))
            .expect("ring")
            .expect("the exit on the ring");
        let e = amm_protocol::EventMessage::from_kernel(&raw).expect("known");
        if e.event == EventKind::Exit {
            break e;
        }
    };
    assert!(exit.faults.is_some());
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.status().expect("status").map_entries != MapEntries::default() {
        assert!(Instant::now() < deadline, "the ring was not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn registrations_that_prove_no_right_are_refused() {
    if !require_root("registrations_that_prove_no_right_are_refused") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut client = agent.client().expect("client");

    // forged: a pid that is neither the client nor its child (init, and
    // this test's own parent)
    let parent = nix::unistd::getppid().as_raw() as u32;
    for pid in [1, parent] {
        match client.register(&Registration::new(pid, 1 << 30)) {
            Err(ClientError::Refused { reason, .. }) => {
                assert!(reason.contains("neither you"), "{reason}")
            }
            other => panic!("pid {pid} was not refused: {other:?}"),
        }
    }
    // a pid no process has
    match client.register(&Registration::new(4_000_000, 1 << 30)) {
        Err(ClientError::Refused { reason, .. }) => {
            assert!(reason.contains("no process"), "{reason}")
        }
        other => panic!("a missing pid was not refused: {other:?}"),
    }
    // bad thresholds
    let mut bad = Registration::new(std::process::id(), 1 << 30);
    bad.thresholds.pause = Some(2.0);
    assert!(matches!(
        client.register(&bad),
        Err(ClientError::Refused { .. })
    ));

    // another user's pid: an unprivileged client asks for a root process
    // (its own parent, this test)
    let mut nobody = Faulter::spawn_as(NOBODY, NOBODY).expect("unprivileged client");
    nobody
        .cmd(&format!("connect {}", agent.socket().display()))
        .expect("connect");
    let reply = nobody
        .try_cmd(&format!("register {}", std::process::id()))
        .expect("reply");
    assert!(
        reply.starts_with("err") && reply.contains("runs as uid 0"),
        "{reply}"
    );
    // a non-child of the same user
    let sibling = Faulter::spawn_as(NOBODY, NOBODY).expect("sibling");
    let reply = nobody
        .try_cmd(&format!("register {}", sibling.pid()))
        .expect("reply");
    assert!(
        reply.starts_with("err") && reply.contains("neither you"),
        "{reply}"
    );
    // ... while the same client may register itself, with a ring buffer of
    // its own that it maps and reads without privileges
    let own = nobody.cmd("pid").expect("pid");
    let own_pid = own.split_whitespace().next().expect("pid");
    let rss: u64 = nobody
        .cmd(&format!("register-direct {own_pid} 200"))
        .expect("an unprivileged client may register itself")
        .parse()
        .expect("rss");
    assert!(rss < 100 * MIB);
    nobody.cmd("touch 180").expect("touch");
    let e = nobody.cmd("ring-event").expect("an event on its own ring");
    assert!(e.contains(r#""pid":"#) && e.contains(own_pid), "{e}");

    // the good client still works after all that
    client.ping(7).expect("ping");
    assert!(client.status().expect("status").watches.len() == 1);
}

#[test]
fn a_recycled_pid_is_refused() {
    if !require_root("a_recycled_pid_is_refused") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut client = agent.client().expect("client");
    let first = Faulter::spawn().expect("child");
    let pid = first.pid();
    let start = start_time_of(pid);
    first.kill();
    // the tick counter must move so the new process has another start time
    std::thread::sleep(Duration::from_millis(50));
    let second =
        spawn_at_pid(pid, Faulter::spawn).expect("the pid could be reused through ns_last_pid");
    let mut reg = Registration::new(pid, 1 << 30);
    reg.start_time = Some(start);
    match client.register(&reg) {
        Err(ClientError::Refused { reason, .. }) => {
            assert!(reason.contains("recycled"), "{reason}")
        }
        other => panic!("a recycled pid was accepted: {other:?}"),
    }
    reg.start_time = Some(start_time_of(second.pid()));
    client
        .register(&reg)
        .expect("the process now holding the pid, named precisely, is accepted");
}

fn raw(agent: &Agent) -> UnixStream {
    let s = UnixStream::connect(agent.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

fn hello(s: &mut UnixStream) {
    s.write_all(
        &encode(&ClientMessage::Hello {
            version: VERSION,
            client: "raw".into(),
        })
        .expect("encode"),
    )
    .expect("write");
    let body = read_frame(s).expect("welcome");
    assert!(matches!(
        decode::<ServerMessage>(&body).expect("decode"),
        ServerMessage::Welcome { .. }
    ));
}

/// Reads until the agent closes; returns the error reason it sent, if any.
fn closed_with(s: &mut UnixStream) -> Option<String> {
    let mut reason = None;
    loop {
        match read_frame(s) {
            Ok(body) => {
                if let Ok(ServerMessage::Error { reason: r, .. }) = decode::<ServerMessage>(&body) {
                    reason = Some(r);
                }
            }
            Err(amm_protocol::FrameError::Closed) => return reason,
            // closing a socket with unread input resets it; the reason sent
            // just before may be lost with it (the agent's log keeps it)
            Err(amm_protocol::FrameError::Io(e))
                if e.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                return reason;
            }
            Err(e) => panic!("the agent did not close the connection: {e}"),
        }
    }
}

/// The connection is closed, and the reason (sent to the client, or at
/// least logged by the agent) mentions `needle`.
fn expect_closed(agent: &Agent, s: &mut UnixStream, needle: &str) {
    if closed_with(s).is_some_and(|r| r.contains(needle)) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if agent.log().contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "no reason mentioning {needle:?}; agent log:\n{}",
        agent.log()
    );
}

#[test]
fn hostile_clients_lose_their_connection_and_nobody_else_notices() {
    if !require_root("hostile_clients_lose_their_connection_and_nobody_else_notices") {
        return;
    }
    let mut agent = Agent::start().expect("agent");
    let mut good = agent.client().expect("client");
    let mut f = Faulter::spawn().expect("child");
    let (_, rss0) = f.hwm_rss().expect("status");
    good.register(&Registration::new(f.pid(), rss0 + 200 * MIB))
        .expect("register");

    // garbage with a huge length prefix
    let mut s = raw(&agent);
    s.write_all(b"\xff\xff\xff\xffgarbage").expect("write");
    expect_closed(&agent, &mut s, "larger than the");
    // a frame that is not JSON
    let mut s = raw(&agent);
    s.write_all(&[0, 0, 0, 8]).expect("write");
    s.write_all(b"not json").expect("write");
    expect_closed(&agent, &mut s, "bad hello");
    // valid JSON of the wrong shape after a hello
    let mut s = raw(&agent);
    hello(&mut s);
    let body = br#"{"type":"register","pid":"twelve"}"#;
    s.write_all(&(body.len() as u32).to_be_bytes())
        .expect("write");
    s.write_all(body).expect("write");
    expect_closed(&agent, &mut s, "malformed");
    // half a frame, then silence: cut at the frame timeout
    let mut s = raw(&agent);
    hello(&mut s);
    s.write_all(&[0, 0, 0, 100, b'{']).expect("write");
    expect_closed(&agent, &mut s, "not completed");
    // no hello at all
    let mut s = raw(&agent);
    expect_closed(&agent, &mut s, "no hello");
    // a version this agent does not speak
    let mut s = raw(&agent);
    s.write_all(
        &encode(&ClientMessage::Hello {
            version: 99,
            client: "future".into(),
        })
        .expect("encode"),
    )
    .expect("write");
    expect_closed(&agent, &mut s, "version 99 is not supported");
    // a client that connects and vanishes mid-frame
    let mut s = raw(&agent);
    s.write_all(&[0, 0]).expect("write");
    drop(s);
    // many connections at once, all dropped
    let many: Vec<UnixStream> = (0..100).map(|_| raw(&agent)).collect();
    drop(many);

    // the good client was not disturbed: still served, still gets events
    assert!(agent.running(), "the agent died:\n{}", agent.log());
    good.ping(1).expect("ping");
    f.cmd("touch 150").expect("touch");
    let e = good
        .next_event(Some(Duration::from_secs(10)))
        .expect("event")
        .expect("an event within 10 s");
    assert!(
        matches!(e.event, EventKind::Level | EventKind::Spike),
        "{e:?}"
    );
}

#[test]
fn a_disconnect_removes_the_client_s_watches() {
    if !require_root("a_disconnect_removes_the_client_s_watches") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let f = Faulter::spawn().expect("child");
    {
        let mut c = agent.client().expect("client");
        c.register(&Registration::new(f.pid(), 1 << 30))
            .expect("register");
        c.register(&Registration::new(std::process::id(), 1 << 30))
            .expect("register self");
        assert_eq!(c.status().expect("status").map_entries.watches, 2);
    }
    let mut c = agent.client().expect("client");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = c.status().expect("status");
        if s.watches.is_empty() && s.map_entries == MapEntries::default() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "watches left after disconnect: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // an explicit unregister works too, and only for one's own pids
    c.register(&Registration::new(f.pid(), 1 << 30))
        .expect("register");
    c.unregister(f.pid()).expect("unregister");
    assert!(matches!(
        c.unregister(f.pid()),
        Err(ClientError::Refused { .. })
    ));
}

#[test]
fn a_thousand_short_lived_processes_leave_no_map_entries() {
    if !require_root("a_thousand_short_lived_processes_leave_no_map_entries") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut c = agent.client().expect("client");
    let mut exits = 0;
    for _ in 0..1000 {
        let mut f = Faulter::spawn().expect("child");
        c.register(&Registration::new(f.pid(), 1 << 30))
            .expect("register");
        f.cmd("touch 1").expect("touch");
        f.exit().expect("exit");
        // drain what has arrived without waiting
        while let Some(e) = c.next_event(Some(Duration::from_millis(1))).expect("event") {
            if e.event == EventKind::Exit {
                exits += 1;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while exits < 1000 && Instant::now() < deadline {
        if let Some(e) = c
            .next_event(Some(Duration::from_millis(200)))
            .expect("event")
            && e.event == EventKind::Exit
        {
            exits += 1;
        }
    }
    assert_eq!(exits, 1000, "every exit is reported");
    let s = c.status().expect("status");
    assert!(s.watches.is_empty(), "{:?}", s.watches);
    assert_eq!(s.map_entries, MapEntries::default());
    assert_eq!(s.dropped, 0);
}

#[test]
fn an_exit_the_ring_buffer_dropped_still_ends_the_watch() {
    if !require_root("an_exit_the_ring_buffer_dropped_still_ends_the_watch") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut client = agent.client().expect("client");
    let mut f = Faulter::spawn().expect("child");
    let pid = f.pid();
    // re-arm 1 MiB above where it is, every level within 4 MiB of it
    let (_, rss0) = f.hwm_rss().expect("status");
    let limit = (rss0 + MIB) * 10 / 6;
    client
        .register(&Registration::new(pid, limit))
        .expect("register");
    // the agent stops reading its ring; the churn fills it (each round is
    // at least two level events: 1500 rounds are twice its 256 KiB), so the
    // kernel's exit record is dropped
    let agent_pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::SIGSTOP).expect("stop the agent");
    let churned = f.cmd("churn 1500 4");
    let exited = f.exit();
    nix::sys::signal::kill(agent_pid, nix::sys::signal::SIGCONT).expect("continue the agent");
    churned.expect("churn");
    exited.expect("exit");
    // the pidfd tells the agent what the ring could not
    let e = event_where(&mut client, "the exit", |e| e.event == EventKind::Exit);
    assert_eq!(e.pid, pid);
    assert!(!e.signalled);
    let s = client.status().expect("status");
    assert!(
        s.dropped > 0,
        "the ring never overflowed, so this test proved nothing: {s:?}"
    );
    assert!(s.watches.is_empty(), "{:?}", s.watches);
    assert!(s.ended.iter().any(|w| w.pid == pid), "{:?}", s.ended);
    assert_eq!(s.map_entries, MapEntries::default());
    assert!(
        agent.log().contains("exited without a kernel exit event"),
        "{}",
        agent.log()
    );
}

#[test]
fn the_socket_speaks_framed_json_with_a_size_cap() {
    if !require_root("the_socket_speaks_framed_json_with_a_size_cap") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut s = raw(&agent);
    hello(&mut s);
    s.write_all(&encode(&ClientMessage::Ping { nonce: 42 }).expect("encode"))
        .expect("write");
    let body = read_frame(&mut s).expect("pong");
    assert_eq!(
        decode::<ServerMessage>(&body).expect("decode"),
        ServerMessage::Pong { nonce: 42 }
    );
    // a frame just over the cap is refused before its body is read
    let len = (amm_protocol::MAX_FRAME + 1) as u32;
    s.write_all(&len.to_be_bytes()).expect("write");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let reason = rest.get(4..).and_then(|b| decode::<ServerMessage>(b).ok());
    assert!(
        matches!(reason, Some(ServerMessage::Error { ref reason, .. }) if reason.contains("larger")),
        "{reason:?}"
    );
}
