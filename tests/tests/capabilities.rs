//! The agent does all its work with only the capabilities its systemd unit
//! grants (`agent/systemd/amm-agent.service`, `CapabilityBoundingSet`): run
//! as root under `setpriv` with exactly that bounding set and no inheritable
//! ones, it loads and attaches the probe, has the kernel kill at the
//! terminate page, signals another user's process through its pidfd,
//! hands out a direct ring, resolves a client in another PID namespace and
//! answers `status`. Needs root.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use amm_ebpf::EventKind;
use amm_integration_tests::{Agent, Faulter, TestUser, bin, event_where, require_root};
use amm_protocol::Registration;

const MIB: u64 = 1 << 20;

/// The unit's `CapabilityBoundingSet`, as setpriv spells capabilities
/// (`bpf`, `perfmon`, ...).
fn unit_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/systemd/amm-agent.service");
    let text = std::fs::read_to_string(&unit).expect("the systemd unit");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// `setpriv` arguments that leave root with exactly `caps`.
fn only(caps: &[String]) -> Vec<String> {
    let list: String = caps.iter().map(|c| format!(",+{c}")).collect();
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all{list}"),
        "--inh-caps=-all".into(),
        "--".into(),
    ]
}

#[test]
fn the_agent_needs_no_more_than_its_unit_grants() {
    if !require_root("the_agent_needs_no_more_than_its_unit_grants") {
        return;
    }
    let caps = unit_capabilities();
    assert!(
        caps.iter().any(|c| c == "bpf") && !caps.iter().any(|c| c == "sys_admin"),
        "{caps:?}"
    );
    let wrapper = only(&caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = Agent::start_wrapped(&wrapper, &[]).expect("the agent starts with the unit's set");
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    assert!(
        eff.count_ones() as usize <= caps.len(),
        "CapEff {eff:x} for {caps:?}"
    );

    // the kernel kill at the terminate page
    let mut root = agent.client().expect("client");
    let mut f = Faulter::spawn().expect("child");
    let (_, rss0) = f.hwm_rss().expect("status");
    root.register(&Registration {
        terminate_signal: Some(9),
        ..Registration::new(f.pid(), rss0 + 100 * MIB)
    })
    .expect("register");
    assert!(
        f.cmd("touch 200").is_err(),
        "the kernel killed it at terminate"
    );
    let e = event_where(&mut root, "the terminate crossing", |e| {
        e.event == EventKind::Level && e.signalled
    });
    assert_eq!(e.pid, f.pid());

    // another user's process, signalled by the agent through its pidfd,
    // registered with a direct ring of its own
    let user = TestUser::create("k").expect("user");
    let mut u = Faulter::spawn_as(user.uid, user.gid).expect("user's process");
    u.cmd(&format!("connect {}", agent.socket().display()))
        .expect("connect");
    u.cmd("register-agent-kill 0 100").expect("register itself");
    let _ = u.cmd("touch 200");
    // the agent signals when it reads the event: soon after the crossing
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while u.cmd("status").is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent's pidfd signal did not kill it:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = agent.log();
    assert!(log.contains("signalled through the pidfd"), "{log}");
    assert!(!log.contains("cannot switch to SCHED_FIFO"), "{log}");

    // a client in another PID namespace
    let mut inside = Command::new("unshare");
    inside
        .args(["--pid", "--fork", "--kill-child", "setpriv"])
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .arg(bin("amm-fault"));
    let mut c = Faulter::spawn_command(inside).expect("unshare");
    c.cmd(&format!("connect {}", agent.socket().display()))
        .expect("connect");
    c.cmd("register 1")
        .expect("a container client registers itself");
    std::thread::sleep(Duration::from_millis(10));
    let s = root.status().expect("status");
    assert_eq!(s.watches.len(), 1, "{s:?}");
    c.exit().expect("exit");
}
