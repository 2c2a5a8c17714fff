//! The nanny: by default `amm-worker run` is this small parent process. It
//! spawns the worker (the same binary, same arguments, plus `--no-nanny`)
//! with the allocator chosen in its environment (`AMM_ALLOCATOR`, and
//! `MALLOC_TRIM_THRESHOLD_` for a glibc worker, as Dask's nanny does),
//! restarts it after a terminate or a crash with exponential back-off, at
//! most `--max-restarts` times, forwards SIGINT/SIGTERM to it, and prints
//! the final summary with `restarts`, `terminations` and `crashes`.
//!
//! A worker that exits 0 (done) or 3 (a result check failed: running it
//! again gives the same answer) is not restarted.

use std::ffi::OsString;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::alloc::{ALLOCATOR_ENV, Allocator};
use crate::memory::TERMINATE_EXIT_CODE;
use crate::signals;
use crate::summary::{NANNY_GAVE_UP, REFUSED, RESULT_FAILED};

/// Environment variable carrying the worker's name to the child.
pub const NAME_ENV: &str = "AMM_WORKER_NAME";
/// Environment variable carrying the attempt number (0, 1, ...).
pub const ATTEMPT_ENV: &str = "AMM_WORKER_ATTEMPT";

/// How the nanny runs its worker.
#[derive(Debug, Clone)]
pub struct NannyOptions {
    /// The worker's allocator.
    pub allocator: Allocator,
    /// `MALLOC_TRIM_THRESHOLD_` for a glibc worker (`None`: leave unset).
    pub trim_threshold: Option<u64>,
    /// The worker's name.
    pub name: String,
    /// Where its spill directory lives (cleaned after the last attempt).
    pub local_directory: PathBuf,
    /// Most restarts before giving up.
    pub max_restarts: u32,
    /// First back-off (doubles per restart, at most 10 s).
    pub backoff: Duration,
    /// amm-agent's socket, when the worker registers with it: the nanny asks
    /// the agent why a worker died of a signal.
    pub agent: Option<PathBuf>,
}

/// What amm-agent saw at the end of a worker killed by a signal: the RSS at
/// the page where the kernel signalled it, if that is how it ended.
fn killed_at_terminate(socket: &std::path::Path, pid: u32) -> Option<u64> {
    use amm_protocol::{Client, SampleKind};
    // the agent records the end when its exit event arrives; give it a moment
    for _ in 0..10 {
        let mut c = Client::connect(socket, "amm-worker nanny", Duration::from_secs(2)).ok()?;
        let status = c.status_of(pid).ok()?;
        if let Some(w) = status.ended.iter().rev().find(|w| w.pid == pid) {
            return w.timeline.iter().rev().find_map(|s| match s.what {
                SampleKind::Level {
                    to: amm_ebpf::Level::Terminate,
                    signalled: true,
                    ..
                } => Some(s.rss_bytes),
                _ => None,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Exited with a code.
    Exited(i32),
    /// Killed by a signal (9 is what the OOM killer sends).
    Signaled(i32),
}

fn wait_child(pid: i32) -> anyhow::Result<Option<(Ending, u64)>> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; status and ru are valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(e).context("wait4 on the worker");
    }
    if r == 0 {
        return Ok(None);
    }
    let maxrss = ru.ru_maxrss.max(0) as u64 * 1024;
    let ending = if libc::WIFEXITED(status) {
        Ending::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Ending::Signaled(libc::WTERMSIG(status))
    } else {
        return Ok(None);
    };
    Ok(Some((ending, maxrss)))
}

/// Runs the worker under supervision; returns the nanny's exit code.
/// `args` are the arguments after the program name.
pub fn run(args: Vec<OsString>, opts: NannyOptions) -> anyhow::Result<i32> {
    signals::install().context("cannot install signal handlers")?;
    let exe = std::env::current_exe().context("cannot find the amm-worker binary")?;
    let start = Instant::now();
    let mut restarts = 0u32;
    let mut terminations = 0u32;
    let mut crashes = 0u32;
    let mut attempts: Vec<Value> = Vec::new();
    let mut backoff = opts.backoff;
    let mut peak = 0u64;
    let mut last_summary: Option<Value>;
    let mut stopped_by: Option<i32> = None;
    let code = loop {
        let attempt = attempts.len() as u32;
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .arg("--no-nanny")
            .env(ALLOCATOR_ENV, opts.allocator.name())
            .env(NAME_ENV, &opts.name)
            .env(ATTEMPT_ENV, attempt.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if opts.allocator == Allocator::System
            && let Some(t) = opts.trim_threshold
        {
            cmd.env("MALLOC_TRIM_THRESHOLD_", t.to_string());
        }
        let t0 = Instant::now();
        let mut child = cmd.spawn().context("cannot spawn the worker")?;
        let pid = child.id() as i32;
        tracing::info!(pid, attempt, allocator = %opts.allocator, "nanny: worker started");
        let summary: Arc<Mutex<Option<Value>>> = Arc::new(Mutex::new(None));
        let reader = child.stdout.take().map(|out| {
            let summary = summary.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.is_object() => {
                            *summary.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
                        }
                        _ => println!("{line}"),
                    }
                }
            })
        });
        let (ending, maxrss) = loop {
            if let Some(sig) = signals::take() {
                tracing::warn!(signal = sig, pid, "nanny: forwarding signal to the worker");
                // SAFETY: pid is our child, not yet reaped.
                unsafe { libc::kill(pid, sig) };
                stopped_by = Some(sig);
            }
            if let Some(r) = wait_child(pid)? {
                break r;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = reader {
            let _ = r.join();
        }
        peak = peak.max(maxrss);
        last_summary = summary.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = last_summary
            .as_ref()
            .and_then(|s| s.get("peak_rss_bytes"))
            .and_then(Value::as_u64)
        {
            peak = peak.max(p);
        }
        let (kind, code) = match ending {
            Ending::Exited(0) => ("done", 0),
            Ending::Exited(RESULT_FAILED) => ("result check failed", RESULT_FAILED),
            Ending::Exited(REFUSED) => ("refused to start", REFUSED),
            Ending::Exited(TERMINATE_EXIT_CODE) => {
                terminations += 1;
                ("terminated", TERMINATE_EXIT_CODE)
            }
            Ending::Exited(c) => {
                crashes += 1;
                ("crashed", c)
            }
            Ending::Signaled(s) => match opts
                .agent
                .as_deref()
                .and_then(|sock| killed_at_terminate(sock, pid as u32))
            {
                Some(rss) => {
                    terminations += 1;
                    tracing::warn!(
                        pid,
                        signal = s,
                        rss_bytes = rss,
                        "nanny: the kernel (amm-agent) killed the worker at the page that crossed terminate"
                    );
                    ("terminated at the page by amm-agent", 128 + s)
                }
                None => {
                    crashes += 1;
                    ("killed by signal", 128 + s)
                }
            },
        };
        attempts.push(json!({
            "attempt": attempt, "ending": kind, "exit_code": code,
            "signal": match ending { Ending::Signaled(s) => Some(s), _ => None },
            "max_rss_bytes": maxrss, "ms": t0.elapsed().as_millis() as u64,
        }));
        tracing::info!(attempt, ending = ?ending, kind, "nanny: worker ended");
        if stopped_by.is_some() || code == 0 || code == RESULT_FAILED || code == REFUSED {
            break code;
        }
        if restarts >= opts.max_restarts {
            tracing::error!(
                restarts,
                "nanny: giving up after {} restarts (the worker {kind} every time)",
                restarts
            );
            break NANNY_GAVE_UP;
        }
        restarts += 1;
        tracing::warn!(
            restart = restarts,
            max = opts.max_restarts,
            backoff_ms = backoff.as_millis() as u64,
            "nanny: restarting the worker ({kind})"
        );
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if signals::peek().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(sig) = signals::take() {
            stopped_by = Some(sig);
            break 128 + sig;
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    };
    // The worker's spill directory, in case it died without cleaning up.
    let dir = crate::spill::dir::path_for(&opts.local_directory, &opts.name);
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let mut s = last_summary.unwrap_or_else(|| {
        json!({"workload": null, "name": opts.name, "allocator": opts.allocator.name(),
               "result_ok": false, "spilled_bytes_total": 0, "spill_count": 0,
               "paused_ms": 0, "purged_bytes_total": 0, "limit_bytes": null,
               "errors": ["the last worker printed no summary"]})
    });
    if let Some(m) = s.as_object_mut() {
        m.insert("restarts".into(), json!(restarts));
        m.insert("terminations".into(), json!(terminations));
        m.insert("crashes".into(), json!(crashes));
        m.insert("peak_rss_bytes".into(), json!(peak));
        m.insert("attempts".into(), Value::Array(attempts));
        m.insert(
            "nanny_wall_ms".into(),
            json!(start.elapsed().as_millis() as u64),
        );
        m.insert("gave_up".into(), json!(code == NANNY_GAVE_UP));
        m.insert("exit_code".into(), json!(code));
        if code != 0 {
            m.insert("result_ok".into(), json!(false));
        }
        if let Some(sig) = stopped_by {
            m.insert("stopped_by_signal".into(), json!(sig));
        }
    }
    println!("{s}");
    Ok(code)
}
