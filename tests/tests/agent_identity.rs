//! A watch belongs to the process it was made for, not to a pid number or
//! to whatever that process turns into: zombies are refused, a recycled
//! pid never matches, an exec with the same credentials keeps the watch and
//! a setuid, setgid or file-capability exec ends it; a client in another PID
//! namespace names its own processes and nobody else's. Needs root (BPF,
//! users, setuid files, `unshare`).

use std::process::Command;

use amm_ebpf::{EventKind, Level};
use amm_integration_tests::{
    Agent, Faulter, Privileged, TestUser, bin, event_where, require_root, spawn_at_pid,
};
use amm_protocol::{EventMessage, Registration, SampleKind};

const MIB: u64 = 1 << 20;

fn parse_event(reply: &str) -> EventMessage {
    serde_json::from_str(reply).unwrap_or_else(|e| panic!("bad event {reply:?}: {e}"))
}

/// A user's client process with a child worker it spawned and registered
/// (direct ring, SIGKILL at terminate).
fn client_and_worker(agent: &Agent, user: &TestUser, limit_mib: u64) -> (Faulter, u32) {
    let mut client = Faulter::spawn_as(user.uid, user.gid).expect("client");
    client
        .cmd(&format!("connect {}", agent.socket().display()))
        .expect("connect");
    let worker: u32 = client.cmd("spawn").expect("spawn").parse().expect("pid");
    client
        .cmd(&format!("register-kill {worker} {limit_mib}"))
        .expect("the client registers its child with the kernel kill");
    (client, worker)
}

fn ends_on_credentials_change(privileged: &Privileged) {
    let user = TestUser::create("s").expect("user");
    let agent = Agent::start().expect("agent");
    let (mut client, worker) = client_and_worker(&agent, &user, 200);
    // the child runs the privileged program (its stdin and stdout go on)
    let reply = client
        .cmd(&format!("to-child exec {}", privileged.path().display()))
        .expect("exec");
    assert_eq!(reply, worker.to_string(), "the new program runs");
    // far past terminate: the kernel must not kill it for the user
    let reply = client.try_cmd("to-child touch 300").expect("relay");
    assert!(
        reply.starts_with("ok"),
        "the privileged process was killed: {reply}"
    );
    // a spike or level of the old program (its start, the exec's own
    // faults) may come first; the end comes once, and nothing after it
    let end_on = |cmd: &str, client: &mut Faulter| loop {
        let e = parse_event(&client.cmd(cmd).expect("the end"));
        assert!(!e.signalled, "{e:?}");
        if e.event == EventKind::Credentials {
            break e;
        }
        assert!(
            matches!(e.event, EventKind::Spike | EventKind::Level) && e.level != Level::Terminate,
            "{e:?}"
        );
    };
    let e = end_on("ring-event", &mut client);
    assert_eq!(e.pid, worker, "{e:?}");
    let e = end_on("event", &mut client);
    assert_eq!(e.pid, worker, "{e:?}");
    // nothing more: not a level, not a spike, on either path
    let reply = client.try_cmd("to-child touch 100").expect("relay");
    assert!(reply.starts_with("ok"), "{reply}");
    let r = client.try_cmd("event-within 1000").expect("reply");
    assert!(r.starts_with("err no event"), "an event after the end: {r}");
    let r = client.try_cmd("ring-event-within 1000").expect("reply");
    assert!(
        r.starts_with("err no event"),
        "a ring record after the end: {r}"
    );
    // the agent dropped the watch and says why in the timeline
    assert_eq!(client.cmd("status-pids").expect("status"), "");
    let mut root = agent.client().expect("root client");
    let s = root.status_of(worker).expect("status");
    assert!(s.watches.is_empty());
    let t = root.timeline(worker).expect("timeline");
    assert!(
        matches!(
            t.last().map(|x| &x.what),
            Some(SampleKind::Credentials { .. })
        ),
        "{t:?}"
    );
    assert_eq!(s.map_entries.watches, 0, "{s:?}");
    client.cmd("to-child exit").expect("child exits");
    client.exit().expect("exit");
}

#[test]
fn a_setuid_exec_ends_the_watch_before_any_signal() {
    if !require_root("a_setuid_exec_ends_the_watch_before_any_signal") {
        return;
    }
    ends_on_credentials_change(&Privileged::copy(0o4755, None));
}

#[test]
fn a_setgid_exec_ends_the_watch_before_any_signal() {
    if !require_root("a_setgid_exec_ends_the_watch_before_any_signal") {
        return;
    }
    ends_on_credentials_change(&Privileged::copy(0o2755, Some(0)));
}

#[test]
fn a_file_capability_exec_ends_the_watch_before_any_signal() {
    if !require_root("a_file_capability_exec_ends_the_watch_before_any_signal") {
        return;
    }
    ends_on_credentials_change(&Privileged::with_capability("cap_net_raw+ep"));
}

#[test]
fn an_exec_with_the_same_credentials_keeps_the_watch_from_any_thread() {
    if !require_root("an_exec_with_the_same_credentials_keeps_the_watch_from_any_thread") {
        return;
    }
    let agent = Agent::start().expect("agent");
    let mut client = agent.client().expect("client");
    let mut f = Faulter::spawn().expect("child");
    let pid = f.pid();
    let (_, rss0) = f.hwm_rss().expect("status");
    let reg = client
        .register(&Registration::new(pid, rss0 + 600 * MIB))
        .expect("register");
    // a worker that re-execs itself, then from a second thread
    let me = bin("amm-fault");
    assert_eq!(
        f.cmd(&format!("exec {}", me.display())).expect("exec"),
        pid.to_string()
    );
    assert_eq!(
        f.cmd(&format!("thread-exec {}", me.display()))
            .expect("thread-exec"),
        pid.to_string()
    );
    // faults of another thread count for the process
    f.cmd("thread-touch 500").expect("touch");
    let e = event_where(&mut client, "a level event after the execs", |e| {
        e.event == EventKind::Level
    });
    assert_eq!((e.pid, e.level), (pid, Level::Spill), "{e:?}");
    assert!(e.rss_bytes >= reg.thresholds.spill);
    f.exit().expect("exit");
    let e = event_where(&mut client, "the exit", |e| e.event == EventKind::Exit);
    assert_eq!(e.pid, pid);
}

#[test]
fn a_zombie_is_refused_and_its_recycled_pid_is_never_touched() {
    if !require_root("a_zombie_is_refused_and_its_recycled_pid_is_never_touched") {
        return;
    }
    let (hostile, victim) = (
        TestUser::create("h").expect("user"),
        TestUser::create("w").expect("user"),
    );
    let agent = Agent::start().expect("agent");
    let mut client = Faulter::spawn_as(hostile.uid, hostile.gid).expect("client");
    client
        .cmd(&format!("connect {}", agent.socket().display()))
        .expect("connect");
    let zombie: u32 = client.cmd("zombie").expect("zombie").parse().expect("pid");
    for how in [
        format!("register {zombie}"),
        format!("register-direct {zombie} 64"),
    ] {
        let r = client.try_cmd(&how).expect("reply");
        assert!(
            r.starts_with("err") && r.contains("has exited"),
            "{how}: {r}"
        );
    }
    // the pid goes to another user's process, which grows past any terminate
    client.cmd(&format!("reap {zombie}")).expect("reap");
    let mut other = spawn_at_pid(zombie, || Faulter::spawn_as(victim.uid, victim.gid))
        .expect("the pid could be steered through ns_last_pid");
    other
        .cmd("touch 200")
        .expect("the other user's process lives");
    other.cmd("status").expect("and still answers");
    let r = client.try_cmd("event-within 500").expect("reply");
    assert!(r.starts_with("err"), "the hostile client got an event: {r}");
    let mut root = agent.client().expect("root");
    assert_eq!(root.status().expect("status").map_entries.watches, 0);
    other.exit().expect("exit");
    client.exit().expect("exit");
}

#[test]
fn a_client_in_a_container_names_its_own_processes_and_nobody_else_s() {
    if !require_root("a_client_in_a_container_names_its_own_processes_and_nobody_else_s") {
        return;
    }
    let (user, neighbour) = (
        TestUser::create("c").expect("user"),
        TestUser::create("n").expect("user"),
    );
    let agent = Agent::start().expect("agent");
    let mut inside = Command::new("unshare");
    inside
        .args(["--pid", "--fork", "--kill-child", "setpriv"])
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .arg(bin("amm-fault"));
    let mut c = Faulter::spawn_command(inside).expect("unshare (util-linux)");
    let own = c.cmd("pid").expect("pid");
    assert!(
        own.starts_with("1 "),
        "amm-fault is pid 1 in its namespace: {own}"
    );
    c.cmd(&format!("connect {}", agent.socket().display()))
        .expect("connect");
    // itself, by its own number and by 0
    let reply = c.cmd("register 1").expect("pid 1 is itself in there");
    let host: u32 = reply
        .split_whitespace()
        .next()
        .expect("pid")
        .parse()
        .expect("pid");
    assert_ne!(host, 1, "the answer gives the pid the agent and kernel use");
    c.cmd("unregister-host").expect("unregister");
    let reply = c.cmd("register 0").expect("0 is itself");
    assert!(reply.starts_with(&host.to_string()), "{reply}");
    // a child, by the number it has in there
    let child: u32 = c.cmd("child").expect("child").parse().expect("pid");
    assert!(child < 100, "a small number in a new namespace: {child}");
    let reply = c.cmd(&format!("register {child}")).expect("its own child");
    let child_host: u32 = reply
        .split_whitespace()
        .next()
        .expect("pid")
        .parse()
        .expect("pid");
    assert!(child_host != child && child_host != host);
    // abuse: host pids it does not own, whatever their owner
    let mut stranger = Faulter::spawn_as(user.uid, user.gid).expect("same user, outside");
    let mut other = Faulter::spawn_as(neighbour.uid, neighbour.gid).expect("another user");
    for pid in [stranger.pid(), other.pid(), agent.pid(), host, 2_000_000] {
        let r = c.try_cmd(&format!("register {pid}")).expect("reply");
        assert!(
            r.starts_with("err") && r.contains("your PID namespace"),
            "pid {pid}: {r}"
        );
    }
    stranger.cmd("status").expect("untouched");
    other.cmd("status").expect("untouched");
    c.exit().expect("exit");
}
