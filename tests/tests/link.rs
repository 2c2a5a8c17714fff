//! A worker's link to the agent, and what the agent keeps and enforces for
//! it: reconnection across agent deaths, the per-worker timeline, and the
//! terminate signal sent by the kernel at the crossing page. Needs root.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use amm_ebpf::{EventKind, Level};
use amm_integration_tests::{Agent, Faulter, event_where, require_root};
use amm_protocol::link::{Link, LinkConfig, LinkEvent};
use amm_protocol::sched::{InForce, ReaderPolicy};
use amm_protocol::{Registration, SampleKind, Split, TerminateBy};

const MIB: u64 = 1 << 20;

fn next(rx: &mpsc::Receiver<LinkEvent>, what: &str, ok: impl Fn(&LinkEvent) -> bool) -> LinkEvent {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if ok(&e) => return e,
            Ok(_) => continue,
            Err(_) => panic!("no {what} within 15 s"),
        }
    }
}

#[test]
fn the_link_survives_the_agent_dying_and_coming_back() {
    if !require_root("the_link_survives_the_agent_dying_and_coming_back") {
        return;
    }
    let mut agent = Agent::start().expect("agent");
    agent.kill();
    let mut f = Faulter::spawn().expect("child");
    let (_, rss0) = f.hwm_rss().expect("status");
    let (tx, rx) = mpsc::channel();
    let link = Link::spawn(
        LinkConfig {
            socket: agent.socket().to_path_buf(),
            registration: Registration::new(f.pid(), rss0 + 200 * MIB),
            name: "link-test".into(),
            retry: Duration::from_millis(50),
            reader: ReaderPolicy::Realtime(1),
            spin: None,
        },
        move |e| {
            let _ = tx.send(e);
        },
    )
    .expect("link thread");

    // the agent is down: one "lost", however many retries fail
    next(&rx, "a lost report", |e| matches!(e, LinkEvent::Lost(_)));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rx.try_iter().all(|e| !matches!(e, LinkEvent::Lost(_))),
        "the outage is reported once"
    );
    // it comes up: the link registers by itself and events flow
    agent.restart().expect("agent");
    next(&rx, "a registration", |e| {
        matches!(e, LinkEvent::Connected { .. })
    });
    f.cmd("touch 150").expect("touch");
    next(
        &rx,
        "a spill event",
        |e| matches!(e, LinkEvent::Event(m) if m.event == EventKind::Level && m.level == Level::Spill),
    );
    // the worker's accounting reaches the agent's timeline
    link.report(
        amm_agent::clock::monotonic_ns(),
        Split {
            process: 42,
            managed: 7,
            ..Split::default()
        },
    );
    let mut client = agent.client().expect("client");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.status().expect("status");
        let timeline = &status.watches.first().expect("one watch").timeline;
        let has_level = timeline.iter().any(|s| {
            matches!(
                s.what,
                SampleKind::Level {
                    to: Level::Spill,
                    ..
                }
            )
        });
        let has_split = timeline
            .iter()
            .any(|s| matches!(s.what, SampleKind::Accounting(Split { managed: 7, .. })));
        if has_level && has_split {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timeline lacks samples: {timeline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(client);
    // killed mid-run: reported once, then back again
    agent.kill();
    next(&rx, "a lost report", |e| matches!(e, LinkEvent::Lost(_)));
    agent.restart().expect("agent");
    next(&rx, "a second registration", |e| {
        matches!(e, LinkEvent::Connected { .. })
    });
    f.cmd("free").expect("free");
    next(
        &rx,
        "the fall below target",
        |e| matches!(e, LinkEvent::Event(m) if m.event == EventKind::Level && m.level == Level::Below),
    );
    drop(link);
}

#[test]
fn terminate_is_enforced_at_the_crossing_page() {
    if !require_root("terminate_is_enforced_at_the_crossing_page") {
        return;
    }
    let agent = Agent::start().expect("agent");
    for by in [TerminateBy::Kernel, TerminateBy::Agent] {
        let mut client = agent.client().expect("client");
        let mut f = Faulter::spawn().expect("child");
        let (_, rss0) = f.hwm_rss().expect("status");
        let limit = rss0 + 200 * MIB;
        let reg = client
            .register(&Registration {
                terminate_signal: Some(libc::SIGKILL),
                terminate_by: by,
                ..Registration::new(f.pid(), limit)
            })
            .expect("register");
        // asks for far more than the limit; it must die on the way
        let reply = f.try_cmd("touch 400");
        assert!(reply.is_err(), "{by:?}: the child survived: {reply:?}");
        let exit = event_where(&mut client, "the exit", |e| e.event == EventKind::Exit);
        let over = exit.peak_rss_bytes.saturating_sub(reg.thresholds.terminate);
        eprintln!("{by:?}: peak {} bytes past terminate", over);
        if by == TerminateBy::Kernel {
            // killed at the page that crossed: nothing past it but what the
            // last fault mapped
            assert!(over <= 64 * 1024, "{over} bytes past terminate");
            let status = client.status().expect("status");
            let ended = status.ended.last().expect("the ended watch");
            assert!(ended.timeline.iter().any(|s| matches!(
                s.what,
                SampleKind::Level {
                    to: Level::Terminate,
                    signalled: true,
                    ..
                }
            )));
        } else {
            assert!(
                exit.peak_rss_bytes < limit,
                "the agent's signal came too late"
            );
            let status = client.status().expect("status");
            let ended = status.ended.last().expect("the ended watch");
            assert!(ended.timeline.iter().any(
                |s| matches!(s.what, SampleKind::AgentSignal { signal } if signal == libc::SIGKILL)
            ));
        }
        f.kill();
    }
}

/// The policy of every thread of this process named `name`, as the kernel
/// reports it (`policy` in /proc/self/task/TID/sched).
fn policies_of_threads_named(name: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task").path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if comm.trim() != name {
            continue;
        }
        let Ok(sched) = std::fs::read_to_string(dir.join("sched")) else {
            continue;
        };
        let policy = sched
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == "policy"))
            .and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
            .expect("a policy line");
        out.push(policy);
    }
    out
}

#[test]
fn the_link_thread_reads_events_under_sched_fifo() {
    if !require_root("the_link_thread_reads_events_under_sched_fifo") {
        return;
    }
    // no agent needed: the thread sets its policy before it connects
    let dir = tempfile::tempdir().expect("tempdir");
    let link = Link::spawn(
        LinkConfig {
            socket: dir.path().join("no-agent.sock"),
            registration: Registration::new(std::process::id(), 1 << 30),
            name: "link-sched-test".into(),
            retry: Duration::from_millis(50),
            reader: ReaderPolicy::Realtime(1),
            spin: None,
        },
        |_| {},
    )
    .expect("link thread");
    assert_eq!(link.reader_scheduling(), &InForce::Fifo(1));
    assert_eq!(
        link.reader_scheduling().to_string(),
        "SCHED_FIFO priority 1"
    );
    let policies = policies_of_threads_named("amm-agent-link");
    assert!(!policies.is_empty(), "no amm-agent-link thread");
    assert!(
        policies.iter().all(|&p| p == libc::SCHED_FIFO as u64),
        "link threads' policies: {policies:?}"
    );
    // and a link asked to leave its thread alone does
    let plain = Link::spawn(
        LinkConfig {
            socket: dir.path().join("no-agent.sock"),
            registration: Registration::new(std::process::id(), 1 << 30),
            name: "link-sched-test".into(),
            retry: Duration::from_millis(50),
            reader: ReaderPolicy::Inherit,
            spin: None,
        },
        |_| {},
    )
    .expect("link thread");
    assert_eq!(
        plain.reader_scheduling(),
        &InForce::Inherited { refused: None }
    );
    drop((link, plain));
}
