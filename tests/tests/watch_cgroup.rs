//! `amm-agent watch PID --limit auto` on a process in a real cgroup v1 (or
//! v2) child cgroup: the limit is the cgroup's hard limit, a larger
//! `--limit` is warned about, an unlimited cgroup is a clear error, and the
//! end says how the process ended and who ended it (the cgroup's OOM
//! killer, with the kernel's exact peak). Root: it loads the BPF probe and
//! creates cgroups (unique names, removed at the end).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use amm_integration_tests::cgroup::{HardLimit, Version};
use amm_integration_tests::{
    Faulter, Privileged, TestUser, bin, bpf_object, require_root, spawn_at_pid,
};

const MIB: u64 = 1 << 20;

/// `amm-agent watch PID ARGS...` with its stdout piped; returns once the
/// header line (printed after the watch is in place) has come.
fn start_watch(pid: u32, args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>, String) {
    let mut child = Command::new(bin("amm-agent"))
        .arg("watch")
        .arg(pid.to_string())
        .args(args)
        .arg("--bpf-object")
        .arg(bpf_object())
        // no agent to ask in these tests
        .arg("--agent")
        .arg("/nonexistent/amm-agent.sock")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn amm-agent watch");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut header = String::new();
    out.read_line(&mut header).expect("read the header");
    (child, out, header)
}

/// The rest of the watch's stdout and its stderr, after it ended.
fn finish_watch(
    mut child: Child,
    mut out: BufReader<std::process::ChildStdout>,
) -> (String, String) {
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("read stdout");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("read stderr");
    }
    let status = child.wait().expect("wait for watch");
    assert!(status.success(), "watch failed: {status}\n{rest}\n{err}");
    (rest, err)
}

#[test]
fn auto_takes_the_cgroup_limit_and_the_end_names_the_cgroup_oom_kill() {
    if !require_root("auto_takes_the_cgroup_limit_and_the_end_names_the_cgroup_oom_kill") {
        return;
    }
    let limit = HardLimit::create("watch-auto", 64 * MIB).expect("create the cgroup");
    let mut f = Faulter::spawn().expect("amm-fault");
    limit.add_pid(f.pid()).expect("join the cgroup");
    let (watch, out, header) = start_watch(f.pid(), &["--limit", "auto"]);
    assert!(
        header.contains("limit 64.0 MiB"),
        "the limit is not the cgroup's: {header}"
    );
    // past the hard limit: the cgroup's OOM killer ends it
    let reply = f.try_cmd("touch 200");
    assert!(reply.is_err(), "200 MiB fit under 64 MiB: {reply:?}");
    f.kill(); // reaps it, so its exit status is published
    let (rest, _) = finish_watch(watch, out);
    let last = rest.lines().last().unwrap_or_default();
    assert!(
        last.contains("killed by signal 9 (SIGKILL)") && last.contains("OOM kill by its cgroup"),
        "the end does not name the cgroup's OOM kill: {rest}"
    );
    assert!(last.contains("oom_kill 0 -> 1"), "{last}");
    assert!(last.contains("kernel peak"), "{last}");
    // every event line carries the kernel's peak so far
    for l in rest.lines().filter(|l| l.contains(" ms  pid ")) {
        assert!(l.contains("peak "), "no peak on {l}");
    }
    assert_eq!(limit.oom_kills().expect("count"), 1);
}

#[test]
fn a_limit_above_the_cgroup_is_warned_about_and_unlimited_auto_is_refused() {
    if !require_root("a_limit_above_the_cgroup_is_warned_about_and_unlimited_auto_is_refused") {
        return;
    }
    let limit = HardLimit::create("watch-warn", 64 * MIB).expect("create the cgroup");
    let mut f = Faulter::spawn().expect("amm-fault");
    limit.add_pid(f.pid()).expect("join the cgroup");
    let (watch, out, header) = start_watch(f.pid(), &["--limit", "1GiB"]);
    assert!(header.contains("limit 1.0 GiB"), "{header}");
    f.cmd("touch 8").expect("8 MiB fit");
    f.exit().expect("exit");
    let (rest, err) = finish_watch(watch, out);
    assert!(
        err.contains("warning: --limit 1.0 GiB is above what the cgroup of pid")
            && err.contains("64.0 MiB")
            && err.contains("6.2 % of this limit"),
        "no warning: {err}"
    );
    assert!(
        rest.lines()
            .last()
            .is_some_and(|l| l.contains("exited with code 0")),
        "{rest}"
    );

    // the same cgroup made unlimited: auto is an error that says so, unless
    // an ancestor still limits it (then auto takes that one)
    let (file, unlimited) = match limit.version() {
        Version::V1 => ("memory.limit_in_bytes", "-1"),
        Version::V2 => ("memory.max", "max"),
    };
    // v1: the memory+swap limit first (it may never be below the memory one)
    let memsw = limit.dir().join("memory.memsw.limit_in_bytes");
    if limit.version() == Version::V1 && memsw.exists() {
        std::fs::write(&memsw, unlimited).expect("lift the memory+swap limit");
    }
    std::fs::write(limit.dir().join(file), unlimited).expect("lift the limit");
    let f = Faulter::spawn().expect("amm-fault");
    limit.add_pid(f.pid()).expect("join the cgroup");
    let out = Command::new(bin("amm-agent"))
        .args(["watch", &f.pid().to_string(), "--limit", "auto"])
        .arg("--bpf-object")
        .arg(bpf_object())
        .output()
        .expect("run watch");
    let cg = amm_cgroup_of(f.pid());
    let stderr = String::from_utf8_lossy(&out.stderr);
    match cg {
        None => {
            assert!(!out.status.success(), "an unlimited cgroup was watched");
            assert!(
                stderr.contains("no memory limit (unlimited)") && stderr.contains("--limit SIZE"),
                "{stderr}"
            );
        }
        Some(bytes) => eprintln!(
            "an ancestor cgroup limits this machine's processes to {bytes} bytes: \
             the unlimited case is not reachable here"
        ),
    }
    f.kill();
}

/// The hard limit of `pid`'s cgroup, as amm's cgroup code reads it.
fn amm_cgroup_of(pid: u32) -> Option<u64> {
    let cg = amm_integration_tests::cgroup::find_for_pid(std::path::Path::new("/"), pid)
        .expect("read the cgroup")?;
    cg.hard_limit().expect("limits").map(|l| l.bytes)
}

/// `--follow`: a nanny-like parent runs three children one after the
/// other; each new child is watched (a new pid, pinned by its pidfd), each
/// end says how it ended, and the watch ends with the parent.
#[test]
fn follow_watches_each_new_child_of_the_parent_and_how_it_ended() {
    if !require_root("follow_watches_each_new_child_of_the_parent_and_how_it_ended") {
        return;
    }
    // waits for a line, then: a child that exits 0, one killed by SIGTERM,
    // one that exits 3
    let mut parent = Command::new("sh")
        .args([
            "-c",
            "read go; sleep 0.6; sh -c 'sleep 0.6; kill -TERM $$'; sh -c 'sleep 0.6; exit 3'; exit 0",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn the parent");
    let (watch, out, first) = start_watch(parent.id(), &["--follow", "--limit", "1GiB"]);
    assert!(
        first.starts_with(&format!("following the children of pid {}", parent.id())),
        "{first}"
    );
    let mut stdin = parent.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"go\n").expect("start the children");
    drop(stdin);
    assert!(parent.wait().expect("wait for the parent").success());
    let (rest, err) = finish_watch(watch, out);
    let headers: Vec<&str> = rest
        .lines()
        .filter(|l| l.contains(&format!(", a child of pid {}", parent.id())))
        .collect();
    assert_eq!(headers.len(), 3, "three children watched:\n{rest}\n{err}");
    let ends: Vec<&str> = rest
        .lines()
        .filter(|l| l.starts_with("pid ") && l.contains("; kernel peak"))
        .collect();
    assert_eq!(ends.len(), 3, "{rest}");
    assert!(ends[0].contains("exited with code 0"), "{}", ends[0]);
    assert!(
        ends[1].contains("killed by signal 15 (SIGTERM)"),
        "{}",
        ends[1]
    );
    assert!(ends[2].contains("exited with code 3"), "{}", ends[2]);
}

/// `--cgroup`: every process of the cgroup is watched when root asks;
/// a caller that is not root (uid 65534 with only CAP_BPF and CAP_PERFMON,
/// enough to load the probe) is refused the other user's process in the
/// same cgroup and watches only its own.
#[test]
fn cgroup_watches_its_processes_and_never_another_users_for_a_non_root_caller() {
    if !require_root("cgroup_watches_its_processes_and_never_another_users_for_a_non_root_caller") {
        return;
    }
    const NOBODY: u32 = 65534;
    let limit = HardLimit::create("watch-cgroup", 256 * MIB).expect("create the cgroup");
    let mut mine = Faulter::spawn_as(NOBODY, NOBODY).expect("amm-fault as nobody");
    let theirs = Faulter::spawn().expect("amm-fault as root");
    limit.add_pid(mine.pid()).expect("join");
    limit.add_pid(theirs.pid()).expect("join");
    let dir = limit.dir().to_string_lossy().into_owned();
    for as_root in [true, false] {
        let mut cmd = if as_root {
            Command::new(bin("amm-agent"))
        } else {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "--inh-caps=+bpf,+perfmon",
                "--ambient-caps=+bpf,+perfmon",
            ])
            .arg(bin("amm-agent"));
            c
        };
        let mut watch = cmd
            .args(["watch", "--cgroup", &dir, "--limit", "auto", "--json"])
            .arg("--bpf-object")
            .arg(bpf_object())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn watch");
        let mut out = BufReader::new(watch.stdout.take().expect("stdout"));
        // "following", then one "watching" per admitted process
        let mut watching = Vec::new();
        let want = if as_root { 2 } else { 1 };
        let mut line = String::new();
        while watching.len() < want {
            line.clear();
            assert!(
                out.read_line(&mut line).expect("read") > 0,
                "watch ended early"
            );
            let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
            if v["event"] == "watching" {
                assert_eq!(v["limit_bytes"], 256 * MIB, "{v}");
                watching.push(v["pid"].as_u64().unwrap_or(0) as u32);
            }
        }
        // touch some memory in both: only the watched ones show events
        mine.cmd("touch 8").expect("touch");
        // SIGTERM ends a cgroup watch
        std::thread::sleep(std::time::Duration::from_millis(300));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(watch.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("stop the watch");
        let (rest, err) = finish_watch(watch, out);
        watching.sort_unstable();
        if as_root {
            let mut both = vec![mine.pid(), theirs.pid()];
            both.sort_unstable();
            assert_eq!(watching, both, "{rest}\n{err}");
        } else {
            assert_eq!(watching, vec![mine.pid()], "{rest}\n{err}");
            assert!(
                err.contains(&format!(
                    "pid {} runs as uid 0, not as your uid {NOBODY}: not watched",
                    theirs.pid()
                )),
                "no refusal of the other user's process: {err}"
            );
            for l in rest.lines() {
                let v: serde_json::Value = serde_json::from_str(l).expect("json line");
                assert_ne!(
                    v["pid"],
                    theirs.pid(),
                    "acted on another user's process: {l}"
                );
            }
        }
    }
    mine.exit().expect("exit");
    theirs.kill();
}

/// `--follow` on amm-worker's nanny, whose worker registers with a running
/// amm-agent and runs away: each worker is killed by the kernel at the
/// terminate page for the agent, restarted once, and the watch (a separate
/// probe) says so for each, asking the agent, then ends with the nanny.
#[test]
fn follow_a_nanny_names_the_kernel_kill_at_the_terminate_page_for_the_agent() {
    if !require_root("follow_a_nanny_names_the_kernel_kill_at_the_terminate_page_for_the_agent") {
        return;
    }
    let agent = amm_integration_tests::Agent::start().expect("agent");
    let dir = tempfile::tempdir().expect("tempdir");
    let workload = dir.path().join("runaway.toml");
    std::fs::write(
        &workload,
        "[[phase]]\nname = \"wait\"\n[[phase.op]]\nop = \"sleep\"\nduration = \"1s\"\n\
         [[phase]]\nname = \"runaway\"\n[[phase.op]]\nop = \"allocate\"\nbytes = \"1GiB\"\n\
         chunk = \"8MiB\"\nkeep = \"unmanaged\"\nkey = \"u\"\ntasks = 1\n",
    )
    .expect("write the workload");
    let mut nanny = Command::new(bin("amm-worker"))
        .arg("run")
        .arg(&workload)
        .arg("--agent")
        .arg(agent.socket())
        .arg("--local-directory")
        .arg(dir.path())
        .args(["--memory-limit", "256MiB", "--max-restarts", "1"])
        .args(["--restart-backoff", "1s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn amm-worker");
    let mut watch = Command::new(bin("amm-agent"))
        .args([
            "watch",
            &nanny.id().to_string(),
            "--follow",
            "--limit",
            "256MiB",
        ])
        .arg("--bpf-object")
        .arg(bpf_object())
        .arg("--agent")
        .arg(agent.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let out = BufReader::new(watch.stdout.take().expect("stdout"));
    let status = nanny.wait().expect("wait for the nanny");
    assert!(
        !status.success(),
        "the nanny gave up after its restart: {status}"
    );
    let (rest, err) = finish_watch(watch, out);
    let killed: Vec<&str> = rest
        .lines()
        .filter(|l| {
            l.contains("killed by signal 9 (SIGKILL): by the kernel at the terminate page, as amm-agent asked")
        })
        .collect();
    // the first worker may have been killed before the watch was in place
    assert!(
        !killed.is_empty(),
        "no kill at the terminate page named:\n{rest}\n{err}"
    );
    for l in &killed {
        assert!(l.contains("kernel peak"), "{l}");
    }
}

/// Every line of a watch's stdout, as it comes.
fn lines_of(out: BufReader<std::process::ChildStdout>) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads lines into `seen` until one matches `pred` (panics after 60 s).
fn wait_line(
    rx: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    what: &str,
    pred: impl Fn(&str) -> bool,
) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = pred(&l);
                seen.push(l);
                if hit {
                    return;
                }
            }
            Err(e) => panic!("no line for {what} ({e}):\n{}", seen.join("\n")),
        }
    }
}

/// The abuse case of a root watch that follows what a user creates: the
/// user's child that execs a setuid-root program is no longer watched (the
/// kernel ends its watch at the credentials change, before the program
/// grows past terminate), and a zombie child is refused, once, and its pid
/// (reaped and given to another user's process) is never watched, whether
/// named by `--follow` or directly.
#[test]
fn follow_never_watches_a_setuid_exec_nor_a_recycled_pid() {
    if !require_root("follow_never_watches_a_setuid_exec_nor_a_recycled_pid") {
        return;
    }
    let (user, victim) = (
        TestUser::create("wf").expect("user"),
        TestUser::create("wv").expect("user"),
    );
    let privileged = Privileged::copy(0o4755, None);
    let mut parent = Faulter::spawn_as(user.uid, user.gid).expect("the user's parent");
    let zombie: u32 = parent.cmd("zombie").expect("zombie").parse().expect("pid");
    let child: u32 = parent.cmd("spawn").expect("spawn").parse().expect("pid");
    // a zombie named directly is refused, not watched as whatever gets
    // its pid later
    let out = Command::new(bin("amm-agent"))
        .args(["watch", &zombie.to_string(), "--limit", "1GiB"])
        .arg("--bpf-object")
        .arg(bpf_object())
        .output()
        .expect("run watch");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("pid {zombie} exited before")),
        "a zombie was watched: {err}"
    );

    let (watch, out, first) = start_watch(parent.pid(), &["--follow", "--limit", "256MiB"]);
    assert!(
        first.starts_with("following the children of pid"),
        "{first}"
    );
    let rx = lines_of(out);
    let mut seen = Vec::new();
    let header = format!("watching pid {child}, a child of pid {}", parent.pid());
    wait_line(&rx, &mut seen, "the child's header", |l| {
        l.starts_with(&header)
    });
    // the zombie's pid goes to another user's process, which grows
    parent
        .cmd(&format!("reap {zombie}"))
        .expect("reap the zombie");
    let mut other = spawn_at_pid(zombie, || Faulter::spawn_as(victim.uid, victim.gid))
        .expect("the pid could be steered through ns_last_pid");
    other
        .cmd("touch 64")
        .expect("the other user's process lives");
    // the child runs a setuid-root program, which grows past terminate
    assert_eq!(
        parent
            .cmd(&format!("to-child exec {}", privileged.path().display()))
            .expect("exec"),
        child.to_string()
    );
    let reply = parent.try_cmd("to-child touch 300").expect("relay");
    assert!(reply.starts_with("ok"), "{reply}");
    let end = format!("pid {child} is no longer watched: its credentials changed");
    wait_line(&rx, &mut seen, "the credentials end", |l| {
        l.starts_with(&end)
    });
    let ended_at = seen.len();
    let reply = parent.try_cmd("to-child touch 100").expect("relay");
    assert!(reply.starts_with("ok"), "{reply}");
    other.cmd("touch 64").expect("touch");
    std::thread::sleep(std::time::Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("stop the watch");
    let mut watch = watch;
    let status = watch.wait().expect("wait for watch");
    let mut err = String::new();
    if let Some(mut e) = watch.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("read stderr");
    }
    seen.extend(rx.iter());
    let all = seen.join("\n");
    assert!(status.success(), "watch failed: {status}\n{all}\n{err}");
    let of_child = format!("  pid {child}  ");
    let of_zombie = |l: &str| {
        [" ", ",", "  "]
            .iter()
            .any(|e| l.contains(&format!("pid {zombie}{e}")))
    };
    for (i, l) in seen.iter().enumerate() {
        assert!(
            !(l.contains(&of_child) && l.contains("-> terminate")),
            "the setuid program was watched to terminate: {l}\n{all}"
        );
        assert!(
            i < ended_at || !l.contains(&of_child),
            "an event after the end: {l}\n{all}"
        );
        assert!(!of_zombie(l), "the recycled pid was watched: {l}\n{all}");
    }
    assert!(
        err.matches(&format!("pid {zombie} exited before it could be watched"))
            .count()
            <= 1,
        "the zombie's refusal was said more than once: {err}"
    );
    parent.cmd("to-child exit").ok();
    parent.exit().expect("exit");
    other.exit().expect("exit");
}
