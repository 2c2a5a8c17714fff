//! The nanny of amm-worker's own worker (`amm-worker run W`): the same
//! binary with `--no-nanny`, on the allocator chosen in its environment
//! (`AMM_ALLOCATOR`, and `MALLOC_TRIM_THRESHOLD_` for a glibc worker, as
//! Dask's nanny does). The worker prints its JSON summary on stdout; the
//! nanny adds its own fields and prints the result. With `--timeline` the
//! nanny appends to the worker's timeline what the worker cannot write
//! itself: the `exit` of an attempt a signal ended (who sent it, the level,
//! the exact peak) and each `restart`.

use std::ffi::OsString;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amm_timeline::{Entry, Event, Killer, Level, Line, Restart, Summary};
use anyhow::Context;
use nix::sys::signal::Signal;

use super::{ATTEMPT_ENV, Attempt, NAME_ENV, OomKills, Program, RestartPolicy, Verdict};
use crate::alloc::{ALLOCATOR_ENV, Allocator};
use crate::child::{Child, Ending};
use crate::memory::TERMINATE_EXIT_CODE;
use crate::summary::{REFUSED, RESULT_FAILED};

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
    /// Restarts and back-off.
    pub restart: RestartPolicy,
    /// amm-agent's socket, when the worker registers with it: the nanny asks
    /// the agent why a worker died of a signal.
    pub agent: Option<PathBuf>,
    /// The worker's `--timeline` file: the nanny appends the `exit` of an
    /// attempt a signal ended, and each `restart`.
    pub timeline: Option<PathBuf>,
}

/// What amm-agent saw at the end of a process killed by a signal: the RSS
/// at the page where the kernel signalled it, if that is how it ended.
pub fn killed_at_terminate(socket: &Path, pid: u32) -> Option<u64> {
    amm_protocol::Client::connect(socket, "amm-worker nanny", Duration::from_secs(2))
        .ok()?
        .killed_at_terminate(pid)
        .ok()
        .flatten()
}

/// amm-worker's own worker as the nanny's program.
struct BuiltinWorker {
    exe: PathBuf,
    args: Vec<OsString>,
    opts: NannyOptions,
    summary: Arc<Mutex<Option<Summary>>>,
    reader: Option<JoinHandle<()>>,
    last_summary: Option<Summary>,
    cgroup: Option<amm_cgroup::MemoryCgroup>,
    /// When the attempt started: its lines' `t_ms` count from here.
    t0: Instant,
    /// OOM kills when the attempt started.
    ooms_at_start: OomKills,
    /// RSS at the page where the kernel killed the attempt, if it did.
    at_terminate: Option<u64>,
}

impl BuiltinWorker {
    /// Appends `event` to the worker's timeline, on the attempt's clock.
    fn record(&self, event: Event) {
        let Some(path) = &self.opts.timeline else {
            return;
        };
        match amm_timeline::Writer::create(path, true) {
            Ok(w) => w.line(&Line::new(
                self.t0.elapsed().as_millis() as u64,
                Some(amm_timeline::monotonic_ns()),
                Entry::Event(event),
            )),
            Err(e) => tracing::warn!("nanny: cannot add to the timeline: {e}"),
        }
    }

    /// Who ended an attempt a signal ended: the kernel at the terminate
    /// page (amm-agent says so), the nanny (it forwarded a stop), the OOM
    /// killer (a count moved), else nobody can say.
    fn killer(&self, a: &Attempt) -> Killer {
        if self.at_terminate.is_some() {
            Killer::KernelTerminate
        } else if matches!(a.verdict, Some(Verdict::Stopped { .. })) {
            Killer::Supervisor
        } else {
            OomKills::now(self.cgroup.as_ref())
                .since(&self.ooms_at_start)
                .unwrap_or(Killer::Unknown)
        }
    }
}

impl Program for BuiltinWorker {
    fn command(&mut self, attempt: u32) -> anyhow::Result<Command> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .arg("--no-nanny")
            .env(ALLOCATOR_ENV, self.opts.allocator.name())
            .env(NAME_ENV, &self.opts.name)
            .env(ATTEMPT_ENV, attempt.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if self.opts.allocator == Allocator::System
            && let Some(t) = self.opts.trim_threshold
        {
            cmd.env("MALLOC_TRIM_THRESHOLD_", t.to_string());
        }
        Ok(cmd)
    }

    fn on_nanny_death(&self) -> Signal {
        // the worker cleans its spill directory on SIGTERM
        Signal::SIGTERM
    }

    fn started(&mut self, _attempt: u32, child: &mut Child) -> anyhow::Result<()> {
        tracing::info!(allocator = %self.opts.allocator, "nanny: worker allocator");
        self.t0 = Instant::now();
        self.ooms_at_start = OomKills::now(self.cgroup.as_ref());
        self.at_terminate = None;
        let Some(out) = child.stdout.take() else {
            return Ok(());
        };
        let summary = self.summary.clone();
        self.reader = Some(std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                // the worker's summary is its one JSON object line
                match serde_json::from_str::<Summary>(&line) {
                    Ok(v) if line.trim_start().starts_with('{') => {
                        *summary.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
                    }
                    _ => println!("{line}"),
                }
            }
        }));
        Ok(())
    }

    fn verdict(&mut self, pid: u32, ending: Ending) -> Verdict {
        match ending {
            Ending::Exited(0) => Verdict::Done,
            Ending::Exited(RESULT_FAILED) => Verdict::ResultFailed,
            Ending::Exited(REFUSED) => Verdict::Refused,
            Ending::Exited(TERMINATE_EXIT_CODE) => Verdict::Terminated {
                by: "worker".into(),
            },
            Ending::Exited(_) => Verdict::Crashed,
            Ending::Signaled(s) => {
                self.at_terminate = self
                    .opts
                    .agent
                    .as_deref()
                    .and_then(|a| killed_at_terminate(a, pid));
                match self.at_terminate {
                    Some(rss) => {
                        tracing::warn!(
                            pid,
                            signal = s,
                            rss_bytes = rss,
                            "nanny: the kernel (amm-agent) killed the worker at the page that crossed terminate"
                        );
                        Verdict::Terminated {
                            by: "kernel".into(),
                        }
                    }
                    None => Verdict::Crashed,
                }
            }
        }
    }

    fn finished(&mut self, attempt: &mut Attempt) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.last_summary = self
            .summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(s) = &self.last_summary {
            attempt.max_rss_bytes = attempt.max_rss_bytes.max(s.peak_rss_bytes);
        }
        let Some(signal) = attempt.signal else {
            // a worker that exits by itself writes its own exit
            return;
        };
        let by = self.killer(attempt);
        if matches!(by, Killer::OomKill { .. }) {
            attempt.ending = "killed by the OOM killer".into();
        }
        attempt.cause = Some(format!("killed by signal {signal}: {}", by.describe()));
        let level = self.at_terminate.map(|_| Level::Terminate);
        let exit = super::exit_event(attempt, Some(by), level, self.at_terminate);
        self.record(Event::Exit(exit.clone()));
        attempt.exit = Some(exit);
    }

    fn restarting(&mut self, restart: &Restart) {
        self.record(Event::Restart(restart.clone()));
    }

    fn summary(&mut self) -> Summary {
        self.last_summary.take().unwrap_or_else(|| Summary {
            name: self.opts.name.clone(),
            allocator: self.opts.allocator.name().to_string(),
            errors: vec!["the last worker printed no summary".into()],
            ..Summary::default()
        })
    }

    fn exit_code(&self, last: &Attempt, gave_up: bool) -> i32 {
        super::worker_exit_code(last, gave_up)
    }
}

/// Runs the built-in worker under the nanny; prints the summary (the last
/// worker's, with the nanny's fields) and returns the nanny's exit code.
/// `args` are the command line after the program name.
pub fn run(args: Vec<OsString>, opts: NannyOptions) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("cannot find the amm-worker binary")?;
    let mut w = BuiltinWorker {
        exe,
        args,
        opts,
        summary: Arc::default(),
        reader: None,
        last_summary: None,
        cgroup: amm_cgroup::find(Path::new("/")).ok().flatten(),
        t0: Instant::now(),
        ooms_at_start: OomKills::default(),
        at_terminate: None,
    };
    let policy = w.opts.restart.clone();
    let summary = super::run(&mut w, &policy)?;
    // The worker's spill directory, in case it died without cleaning up.
    let dir = crate::spill::dir::path_for(&w.opts.local_directory, &w.opts.name);
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    crate::summary::print(&summary);
    Ok(summary.exit_code)
}
