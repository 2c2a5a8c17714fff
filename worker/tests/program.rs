//! `amm-worker [OPTIONS] -- CMD ARGS...`: the nanny supervising programs
//! nobody wrote for amm (sh, python3): exit status passed through, amm's
//! environment, terminate by the nanny's polls, hooks at spill/pause,
//! restarts, a clear error without the preload library, the cgroup
//! warning. The kernel's kill at the terminate page is in
//! `tests/tests/program_agent.rs` (root, BPF).

mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// `amm-worker [extra] -- argv` on plain glibc (the preload library is
/// not needed for these tests: its own tests are the preload crate's).
fn program(s: &Scratch, extra: &[&str], argv: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "--allocator",
        "system",
        "--preload",
        "/nonexistent/libamm_preload.so",
    ])
    .arg("--summary")
    .arg(s.path("summary.json"))
    .args(extra)
    .arg("--")
    .args(argv)
    .env("AMM_LOG", "info")
    .env_remove("AMM_ALLOCATOR")
    .env_remove("MALLOC_TRIM_THRESHOLD_")
    .env_remove("PYTHONMALLOC")
    .stdin(Stdio::null());
    c
}

fn nanny_summary(s: &Scratch) -> Value {
    let text = std::fs::read_to_string(s.path("summary.json")).expect("the nanny's summary");
    serde_json::from_str(&text).expect("summary JSON")
}

/// A Python program holding `mib` MiB for `secs` seconds.
fn hold(mib: u64, secs: f64) -> String {
    format!("import time\nx = b'x' * ({mib} << 20)\ntime.sleep({secs})\n")
}

#[test]
fn the_programs_exit_status_passes_through_like_a_shell() {
    let s = Scratch::new();
    let r = run(program(
        &s,
        &["--max-restarts", "0"],
        &["sh", "-c", "exit 7"],
    ));
    assert_eq!(r.code, Some(7), "{}", r.describe());
    let sum = nanny_summary(&s);
    assert_eq!(sum["attempts"][0]["verdict"]["kind"], "crashed");
    assert_eq!(sum["crashes"], 1);
    let r = run(program(
        &s,
        &["--max-restarts", "0"],
        &["sh", "-c", "kill -USR1 $$"],
    ));
    assert_eq!(r.code, Some(128 + libc::SIGUSR1), "{}", r.describe());
    let cause = nanny_summary(&s)["attempts"][0]["cause"].to_string();
    assert!(cause.contains("outside amm"), "{cause}");
    let r = run(program(&s, &[], &["true"]));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(nanny_summary(&s)["restarts"], 0);
}

#[test]
fn a_crashing_program_is_restarted_then_its_last_status_returned() {
    let s = Scratch::new();
    let r = run(program(
        &s,
        &["--max-restarts", "2", "--restart-backoff", "10ms"],
        &["sh", "-c", "echo attempt $AMM_WORKER_ATTEMPT; exit 3"],
    ));
    assert_eq!(r.code, Some(3), "{}", r.describe());
    assert_eq!(
        r.stdout, "attempt 0\nattempt 1\nattempt 2\n",
        "stdout is the program's"
    );
    let sum = nanny_summary(&s);
    assert_eq!(sum["restarts"], 2);
    assert_eq!(sum["crashes"], 3);
    assert_eq!(sum["gave_up"], true);
}

#[test]
fn the_program_gets_amms_environment() {
    let s = Scratch::new();
    let r = run(program(
        &s,
        &["--name", "envtest"],
        &[
            "sh",
            "-c",
            "echo \"$MALLOC_TRIM_THRESHOLD_ $AMM_WORKER_NAME ${PYTHONMALLOC:-unset}\"",
        ],
    ));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.stdout.trim(), "65536 envtest unset");
    // a Python program keeps pymalloc (amm's measured choice), and the
    // user's own PYTHONMALLOC is left as it is
    let r = run(program(
        &s,
        &[],
        &[
            "python3",
            "-c",
            "import os; print(os.environ.get('PYTHONMALLOC', 'unset'))",
        ],
    ));
    assert_eq!(
        r.stdout.trim(),
        amm_worker::inject::python_malloc().unwrap_or("unset"),
        "{}",
        r.describe()
    );
    let mut c = program(
        &s,
        &[],
        &[
            "python3",
            "-c",
            "import os; print(os.environ['PYTHONMALLOC'])",
        ],
    );
    c.env("PYTHONMALLOC", "pymalloc");
    assert_eq!(run(c).stdout.trim(), "pymalloc");
}

#[test]
fn without_the_preload_library_jemalloc_is_a_clear_error() {
    let s = Scratch::new();
    let mut c2 = Command::new(bin());
    c2.args([
        "--allocator",
        "jemalloc",
        "--preload",
        "/nonexistent/libamm_preload.so",
        "--",
        "true",
    ]);
    let r = run(c2);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert!(
        r.stderr.contains("libamm_preload.so not found") && r.stderr.contains("cargo xtask build"),
        "{}",
        r.stderr
    );
    let r = run(Command::new(bin()));
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("nothing to run"), "{}", r.stderr);
    // a program that cannot be run is an error, not a crash to restart
    let r = run(program(&s, &[], &["/nonexistent/prog"]));
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert!(
        r.stderr
            .contains("cannot run /nonexistent/prog: No such file"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("restarting"), "{}", r.stderr);
}

/// Without the agent, the nanny's polls enforce terminate: SIGKILL by
/// default, the program restarted, and the end explained.
#[test]
fn the_nanny_terminates_a_program_past_terminate_and_says_so() {
    let s = Scratch::new();
    let tl = s.path("tl.jsonl");
    let r = run(program(
        &s,
        &[
            "--memory-limit",
            "128MiB",
            "--monitor-interval",
            "20ms",
            "--max-restarts",
            "1",
            "--restart-backoff",
            "10ms",
            "--timeline",
            tl.to_str().expect("utf8"),
        ],
        &["python3", "-c", &hold(200, 60.0)],
    ));
    assert_eq!(r.code, Some(128 + libc::SIGKILL), "{}", r.describe());
    let sum = nanny_summary(&s);
    assert_eq!(sum["terminations"], 2, "{sum}");
    assert_eq!(sum["crashes"], 0);
    for a in sum["attempts"].as_array().expect("attempts") {
        assert_eq!(
            a["verdict"],
            serde_json::json!({"kind": "terminated", "by": "nanny"})
        );
        let cause = a["cause"].as_str().expect("cause");
        assert!(cause.contains("nanny's terminate"), "{cause}");
    }
    let t = timeline(&tl);
    assert_eq!(events(&t, "start").len(), 2);
    assert_eq!(events(&t, "terminate").len(), 2);
    assert!(t.iter().any(|v| v["kind"] == "tick" && u(v, "process") > 0));
    let exits = events(&t, "exit");
    assert_eq!(exits.len(), 2);
    assert_eq!(exits[0]["signal"], libc::SIGKILL);
    assert_eq!(exits[0]["by"]["who"], "supervisor", "{}", exits[0]);
    assert_eq!(exits[0]["level"], "terminate", "{}", exits[0]);
    assert_eq!(events(&t, "restart").len(), 1, "one restart between two");
    terminates_lie_after_the_tick_that_measured_them(&t);
    // every line is the timeline contract's, and the report reads it: two
    // kills by the nanny, each with its signal
    assert!(t.iter().all(|v| v["v"] == 1), "{t:?}");
    let out = Command::new(bin())
        .args(["report", "--json"])
        .arg(&tl)
        .output()
        .expect("amm-worker report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("report --json");
    assert_eq!(report["verdict"]["kind"], "killed", "{}", report["verdict"]);
    let killed = report["run"]["killed"].as_array().expect("killed");
    assert_eq!(killed.len(), 2, "{killed:?}");
    for k in killed {
        assert_eq!(k["signal"], libc::SIGKILL, "{k}");
        assert!(k["by"].as_str().is_some_and(|b| b.contains("nanny")), "{k}");
    }
}

/// The nanny writes `terminate` between reading the program's RSS and
/// writing that read's tick (the next tick in the file, with the same
/// bytes): the tick is stamped when its measurement began, so on `t_ns` it
/// lies no later than the event its read caused (an ordering fact: stamped
/// when written, it lies after it).
fn terminates_lie_after_the_tick_that_measured_them(t: &[Value]) {
    for (i, term) in t.iter().enumerate() {
        if !(term["kind"] == "event" && term["event"] == "terminate") {
            continue;
        }
        let tick = t[i + 1..]
            .iter()
            .find(|v| v["kind"] == "tick")
            .unwrap_or_else(|| panic!("no tick written after {term}"));
        assert_eq!(u(tick, "process"), u(term, "process"), "{tick}\n{term}");
        assert!(
            u(tick, "t_ns") <= u(term, "t_ns"),
            "the tick that measured the terminate lies after it on t_ns:\n{tick}\n{term}"
        );
    }
}

/// SIGTERM with a grace instead of SIGKILL: a program that ignores SIGTERM
/// is killed when the grace is over.
#[test]
fn a_softer_terminate_signal_is_followed_by_sigkill_after_the_grace() {
    let s = Scratch::new();
    let code = format!(
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n{}",
        hold(200, 60.0)
    );
    let r = run(program(
        &s,
        &[
            "--memory-limit",
            "128MiB",
            "--monitor-interval",
            "20ms",
            "--max-restarts",
            "0",
            "--agent-terminate-signal",
            "SIGTERM",
            "--terminate-grace",
            "200ms",
        ],
        &["python3", "-c", &code],
    ));
    assert_eq!(r.code, Some(128 + libc::SIGKILL), "{}", r.describe());
    assert!(r.stderr.contains("terminate grace over"), "{}", r.stderr);
    assert_eq!(nanny_summary(&s)["terminations"], 1);
}

/// --on-spill runs a program (never through a shell, whatever its path
/// holds); --on-pause sends the program a signal it handles.
#[test]
fn hooks_fire_at_spill_and_pause() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let pwned = s.path("pwned");
    let hook_out = s.path("hook-out");
    // through a shell this name would create `pwned` in the nanny's cwd
    let hook = s.path("on spill; touch pwned #");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$AMM_LEVEL $AMM_PID\" >> '{}'\n",
            hook_out.display()
        ),
    )
    .expect("write hook");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let got_usr1 = s.path("usr1");
    // 216 MiB of a 256 MiB limit: 84 % (spill 70 %, pause 80 %, terminate 95 %)
    let code = format!(
        "import signal, time\n\
         def on_usr1(*_):\n    open('{}', 'w').write('paused')\n\
         signal.signal(signal.SIGUSR1, on_usr1)\n{}",
        got_usr1.display(),
        hold(216, 3.0)
    );
    let mut c = program(
        &s,
        &[
            "--memory-limit",
            "256MiB",
            "--monitor-interval",
            "20ms",
            "--on-spill",
            hook.to_str().expect("utf8"),
            "--on-pause",
            "SIGUSR1",
        ],
        &["python3", "-c", &code],
    );
    c.current_dir(s.path(""));
    let r = run(c);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    let out = std::fs::read_to_string(&hook_out).expect("the spill hook ran");
    assert!(out.starts_with("spill "), "{out}");
    assert_eq!(out.lines().count(), 1, "one hook per rise: {out}");
    assert!(!pwned.exists(), "the hook's path went through a shell");
    assert_eq!(
        std::fs::read_to_string(&got_usr1).expect("SIGUSR1 at pause"),
        "paused"
    );
}

/// The abuse case for a root nanny: a hook that another user could have
/// replaced is refused before anything runs.
#[test]
fn as_root_a_hook_in_a_world_writable_place_is_refused() {
    if !require_root("as_root_a_hook_in_a_world_writable_place_is_refused") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let hook = s.path("hook");
    std::fs::write(&hook, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let r = run(program(
        &s,
        &["--on-spill", hook.to_str().expect("utf8")],
        &["true"],
    ));
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert!(r.stderr.contains("will not run"), "{}", r.stderr);
}

/// A Dask user lost 16 of 16 workers to OOM kills at 93.6 % of a limit the
/// cgroup could not give: the nanny warns before it starts anything.
#[test]
fn a_limit_above_the_cgroups_is_warned_about() {
    if !require_root("a_limit_above_the_cgroups_is_warned_about") {
        return;
    }
    let s = Scratch::new();
    let cg = TestCgroup::new("cgwarn", 256 * MIB);
    let mut c = program(&s, &["--memory-limit", "512MiB"], &["true"]);
    cg.enter(&mut c);
    let r = run(c);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert!(
        r.stderr.contains("the cgroup allows only 256.00 MiB"),
        "{}",
        r.stderr
    );
    let mut c = program(&s, &["--memory-limit", "auto"], &["true"]);
    cg.enter(&mut c);
    let r = run(c);
    assert!(!r.stderr.contains("the cgroup allows only"), "{}", r.stderr);
}
