//! The real-Dask baseline of the spike benchmark: one trial of a real Dask
//! worker under a real hard memory limit, watched by the real eBPF probe.
//!
//! [`DaskVenv::find`] finds the project's venv (`cargo xtask venv`, pinned
//! Dask). [`DaskRunner::run_trial`] starts `benches/dask/spike_trial.py`
//! (a `LocalCluster` with one nanny-managed worker and Dask's own memory
//! thresholds), and for every worker process it announces (`WORKER_PID`,
//! printed before the worker runs any Python; the worker waits until it has
//! been moved) it:
//!
//! 1. creates a fresh [`HardLimit`] cgroup with the limit (the worker alone:
//!    the scheduler and the nanny stay outside),
//! 2. starts `amm-agent watch --pid WORKER --limit N --json` on it and waits
//!    until the probe is attached,
//! 3. moves the worker into the cgroup, which lets it exec Python,
//!
//! and when the worker is gone, reads what the kernel saw: the watch's level
//! events and exit (peak RSS), the cgroup's peak and OOM-kill count. Dask
//! decides restarts itself; nothing here signals the worker.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amm_ebpf::{EventKind, Level};
use amm_integration_tests::cgroup::HardLimit;
use amm_protocol::EventMessage;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The trial script, in the source tree.
pub const TRIAL_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dask/spike_trial.py");

/// Dask's terminate threshold (fraction of the limit), which overshoot and
/// reaction are measured against.
pub const TERMINATE_FRACTION: f64 = 0.95;

/// How long a worker waits, before exec, to be put into its cgroup.
const GATE_MS: u64 = 30_000;

/// How long the watch may take to load and attach the probe.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

/// Time on top of the trial timeout for Dask to start and shut down.
const STARTUP_SHUTDOWN_MARGIN: Duration = Duration::from_secs(180);

/// stderr lines of the trial kept for error messages.
const LOG_TAIL_LINES: usize = 60;

/// The project's Python venv (`cargo xtask venv`), with Dask in it.
#[derive(Debug, Clone)]
pub struct DaskVenv {
    /// Its Python.
    pub python: PathBuf,
}

impl DaskVenv {
    /// The venv at `$AMM_PYTHON` or `target/venv` (see
    /// [`amm_integration_tests::python`]), or an error that says to run
    /// `cargo xtask venv`.
    pub fn find() -> Result<DaskVenv> {
        Ok(DaskVenv {
            python: amm_integration_tests::python::find()?,
        })
    }
}

/// The workloads of the spike benchmark (see `benches/dask/spike_trial.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// 2 GiB task-memory spikes on a 256 MiB managed base (at a 2 GiB limit).
    Spike,
    /// Blocked `(A @ A.T).sum()`, every block kept.
    Matmul,
    /// Single-cell-like CSR pipeline, raw and normalised blocks kept.
    Sparse,
    /// Managed growth plus spikes.
    Mix,
    /// Many small NumPy arrays built and dropped: what stays after release.
    Churn,
    /// Managed results past the spill threshold (1.5 x the limit, kept)
    /// while tasks keep running: how a spill holds the event loop.
    Spill,
}

impl Workload {
    /// Every workload, in table order.
    pub const ALL: [Workload; 6] = [
        Workload::Spike,
        Workload::Matmul,
        Workload::Sparse,
        Workload::Mix,
        Workload::Churn,
        Workload::Spill,
    ];

    /// Its name on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Spike => "spike",
            Workload::Matmul => "matmul",
            Workload::Sparse => "sparse",
            Workload::Mix => "mix",
            Workload::Churn => "churn",
            Workload::Spill => "spill",
        }
    }
}

/// How the worker runs: plain Dask, or with amm_dask (on glibc, or on the
/// jemalloc preload).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Dask as it is (glibc, Dask's own monitor and nanny).
    #[default]
    Plain,
    /// Dask + amm_dask registered with amm-agent, glibc.
    Amm,
    /// Dask + amm_dask on amm's jemalloc preload.
    AmmJemalloc,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Mode; 3] = [Mode::Plain, Mode::Amm, Mode::AmmJemalloc];

    /// Its name on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Amm => "amm",
            Mode::AmmJemalloc => "amm-jemalloc",
        }
    }
}

/// How amm_dask spills without holding the event loop (its `amm.spill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SpillMode {
    /// Evict one value at a time on the event loop, yielding after each.
    Incremental,
    /// Evict on a spill thread, under zict's locks, while the loop serves.
    Thread,
}

impl SpillMode {
    /// Every spill mode, in table order.
    pub const ALL: [SpillMode; 2] = [SpillMode::Incremental, SpillMode::Thread];

    /// Its name on the command line, in amm_dask's config and in the results.
    pub fn name(self) -> &'static str {
        match self {
            SpillMode::Incremental => "incremental",
            SpillMode::Thread => "thread",
        }
    }
}

/// One trial's settings.
#[derive(Debug, Clone)]
pub struct TrialConfig {
    /// Plain Dask or with amm_dask.
    pub mode: Mode,
    /// amm_dask's spill mode (amm modes; `None`: amm_dask's default).
    pub spill: Option<SpillMode>,
    /// What the worker runs.
    pub workload: Workload,
    /// Dask's `memory_limit` and the cgroup's hard limit, in bytes.
    pub limit_bytes: u64,
    /// Dask's `distributed.worker.memory.monitor-interval` in ms (`None`:
    /// Dask's default).
    pub poll_ms: Option<f64>,
    /// Seed of the workload's data.
    pub seed: u64,
    /// The workload gives up after this long.
    pub timeout: Duration,
    /// amm_dask settings this trial overrides (amm modes; `None`: its
    /// defaults), to run variants of one mode side by side.
    pub variant: Option<AmmVariant>,
}

/// A named set of amm_dask settings (`amm.<key>` = YAML value) a trial
/// runs with, e.g. `no-trim:trim-threshold=1TiB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmmVariant {
    /// Its name in the results and the tables.
    pub name: String,
    /// `(key, value)` pairs, keys without the `amm.` prefix.
    pub settings: Vec<(String, String)>,
}

impl std::str::FromStr for AmmVariant {
    type Err = String;

    /// `NAME:KEY=VALUE[;KEY=VALUE...]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("{s:?}: give NAME:KEY=VALUE[;KEY=VALUE...] (keys of amm_dask's `amm:` config)")
        };
        let (name, rest) = s.split_once(':').ok_or_else(bad)?;
        let settings = rest
            .split(';')
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        let valid = |x: &str| {
            !x.is_empty()
                && x.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !valid(name) || settings.iter().any(|(k, _)| !valid(k)) {
            return Err(bad());
        }
        Ok(AmmVariant {
            name: name.to_string(),
            settings,
        })
    }
}

/// How a trial went, decided by the first worker that died (or by the run
/// when none did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// No worker died and Dask finished the workload.
    Finished,
    /// The kernel's OOM killer killed a worker (its cgroup's count rose).
    OomKilled,
    /// Dask's nanny killed a worker past the terminate level and restarted it.
    TerminatedRestarted,
    /// A worker died otherwise, or Dask did not finish (error, timeout).
    Failed,
}

impl Outcome {
    /// Every outcome, in table order.
    pub const ALL: [Outcome; 4] = [
        Outcome::Finished,
        Outcome::TerminatedRestarted,
        Outcome::OomKilled,
        Outcome::Failed,
    ];

    /// Its name in the results.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::OomKilled => "oom_killed",
            Outcome::TerminatedRestarted => "terminated_restarted",
            Outcome::Failed => "failed",
        }
    }
}

/// How one worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifeEnd {
    /// Killed by the kernel's OOM killer (the cgroup counted it).
    OomKilled,
    /// Killed by Dask's nanny for passing the terminate level.
    TerminatedByNanny,
    /// Killed by the kernel at the page that crossed terminate (amm_dask's
    /// registration; its nanny said so).
    KilledAtPage,
    /// Closed with the cluster at the end of the trial.
    Shutdown,
    /// Died for another reason (or the trial script did not say).
    Died,
}

/// One worker process of a trial: what the kernel saw of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerLife {
    /// Its pid.
    pub pid: u32,
    /// How it ended.
    pub end: LifeEnd,
    /// Peak RSS (the watch's exit event: the kernel's count to the page).
    pub peak_rss_bytes: Option<u64>,
    /// `peak_rss_bytes / limit`.
    pub peak_fraction: Option<f64>,
    /// Bytes above the terminate level at the peak (0 if below).
    pub overshoot_bytes: Option<u64>,
    /// The cgroup's peak charge (RSS plus page cache and kernel memory).
    pub cgroup_peak_bytes: Option<u64>,
    /// OOM kills the cgroup counted.
    pub oom_kills: u64,
    /// Dask's nanny said it terminated this process for memory.
    pub nanny_terminated: bool,
    /// How many times RSS rose past the terminate level (counted again only
    /// after falling below the target level).
    pub terminate_crossings: u32,
    /// Kernel time (CLOCK_MONOTONIC ns) of the last rise past terminate
    /// before the exit.
    pub terminate_crossed_ns: Option<u64>,
    /// Kernel time of the first rise past spill and pause.
    pub spill_crossed_ns: Option<u64>,
    /// See `spill_crossed_ns`.
    pub pause_crossed_ns: Option<u64>,
    /// Kernel time of the exit.
    pub exit_ns: Option<u64>,
    /// From the last rise past terminate to the exit, in ms: the nanny's
    /// reaction when it killed the process, the time the process had left
    /// otherwise.
    pub exit_after_terminate_ms: Option<f64>,
    /// The watch reported spike alarms (terminate predicted within 200 ms).
    pub spike_alarms: u32,
    /// Every rise past spill (from below) to the next fall below the
    /// re-arm level (target), in ms, kernel time: how long a spill took to
    /// bring the process back under target.
    #[serde(default)]
    pub spill_to_target_ms: Vec<f64>,
    /// Rises past spill that never fell back below target before the exit.
    #[serde(default)]
    pub spill_unresolved: u32,
    /// The worker started before it was in its cgroup (the gate timed out).
    pub gate_timeout: bool,
    /// What went wrong watching it, if anything.
    pub error: Option<String>,
}

/// One trial, everything measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialResult {
    /// Which workload.
    pub workload: Workload,
    /// Plain Dask or with amm_dask.
    #[serde(default)]
    pub mode: Mode,
    /// amm_dask's spill mode as the trial script set it (amm modes).
    #[serde(default)]
    pub spill: Option<SpillMode>,
    /// The [`AmmVariant`] it ran with, by name (`None`: amm_dask's defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The event loop's longest stall during the workload (a 10 ms timer's
    /// lateness), of the last worker, in ms.
    #[serde(default)]
    pub loop_lag_max_ms: Option<f64>,
    /// Its 99th percentile, in ms.
    #[serde(default)]
    pub loop_lag_p99_ms: Option<f64>,
    /// How many of its ticks came more than 50 ms late.
    #[serde(default)]
    pub loop_late_50ms: Option<u64>,
    /// Dask's own measure: the longest `tick-duration` of the worker's
    /// event loop during the workload (ticks every 20 ms), in ms.
    #[serde(default)]
    pub dask_tick_max_ms: Option<f64>,
    /// Tasks the workload ran (when it counts them), for throughput.
    #[serde(default)]
    pub tasks: Option<u64>,
    /// The workers' RSS minus managed memory 5 s after the workload ended.
    #[serde(default)]
    pub unmanaged_after_release_bytes: Option<u64>,
    /// amm_dask's reaction times (kernel crossing → its link thread, →
    /// Dask's event loop), ms, by event, of the last worker.
    #[serde(default)]
    pub amm_reactions_ms: BTreeMap<String, Vec<f64>>,
    /// amm_dask's counters of the last worker (pauses, spills, purges...).
    #[serde(default)]
    pub amm_stats: BTreeMap<String, u64>,
    /// The limit, in bytes.
    pub limit_bytes: u64,
    /// The data seed.
    pub seed: u64,
    /// Dask's monitor interval in this trial, in ms.
    pub poll_ms: Option<f64>,
    /// How it went (decided by the first worker death).
    pub outcome: Outcome,
    /// Dask finished the workload (possibly after restarts).
    pub completed: bool,
    /// The client got `KilledWorker` (a task killed too many workers).
    pub killed_worker: bool,
    /// The work stopped moving and the trial gave up at its timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// Workers the nanny started after the first.
    pub worker_restarts: u32,
    /// Peak RSS over the limit, of the worker that decided the outcome (the
    /// first that died; otherwise the one with the highest peak).
    pub peak_fraction: Option<f64>,
    /// Its cgroup's peak over the limit.
    pub cgroup_peak_fraction: Option<f64>,
    /// Its bytes above `0.95 x limit` at the peak.
    pub overshoot_bytes: Option<u64>,
    /// Its exit after crossing terminate, in ms, when the nanny killed it.
    pub reaction_ms: Option<f64>,
    /// The workload's wall time as the trial script measured it, in ms.
    pub wall_ms: Option<f64>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Every worker process, in order.
    pub lives: Vec<WorkerLife>,
    /// The trial script's JSON, as printed.
    pub dask: serde_json::Value,
}

impl TrialResult {
    /// Reaction delays (exit after the terminate crossing, ms) of every
    /// worker of the trial that the nanny killed.
    pub fn nanny_reactions_ms(&self) -> Vec<f64> {
        self.lives
            .iter()
            .filter(|l| l.end == LifeEnd::TerminatedByNanny)
            .filter_map(|l| l.exit_after_terminate_ms)
            .collect()
    }
}

/// What the trial script prints (the fields the runner reads).
#[derive(Debug, Default, Deserialize)]
struct ScriptResult {
    #[serde(default)]
    finished: bool,
    #[serde(default)]
    worker_restarts: u32,
    #[serde(default)]
    killed_worker: bool,
    #[serde(default)]
    timed_out: bool,
    #[serde(default)]
    wall_ms: Option<f64>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    poll_ms: Option<f64>,
    #[serde(default)]
    nanny_terminations: Option<Vec<NannyTermination>>,
    #[serde(default)]
    amm_kills: Option<Vec<AmmKill>>,
    #[serde(default)]
    after_release: Option<AfterRelease>,
    #[serde(default)]
    result: Option<WorkloadSummary>,
    #[serde(default)]
    amm: Option<AmmSettings>,
}

#[derive(Debug, Default, Deserialize)]
struct WorkloadSummary {
    #[serde(default)]
    tasks: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct AmmSettings {
    #[serde(default)]
    spill: Option<SpillMode>,
}

#[derive(Debug, Deserialize)]
struct AmmKill {
    pid: Option<u32>,
    #[serde(default)]
    killed_at_page: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct AfterRelease {
    #[serde(default)]
    unmanaged_bytes: Option<u64>,
    #[serde(default)]
    workers: Vec<WorkerMemory>,
}

#[derive(Debug, Default, Deserialize)]
struct WorkerMemory {
    #[serde(default)]
    amm_reactions: Option<BTreeMap<String, Vec<f64>>>,
    #[serde(default)]
    amm_stats: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    loop_lag_max_ms: Option<f64>,
    #[serde(default)]
    loop_lag_p99_ms: Option<f64>,
    #[serde(default)]
    loop_late_50ms: Option<u64>,
    #[serde(default)]
    tick_max_ms: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct NannyTermination {
    pid: Option<u32>,
}

/// Runs trials: the venv, the script, the agent binary.
#[derive(Debug, Clone)]
pub struct DaskRunner {
    /// The venv with Dask.
    pub venv: DaskVenv,
    /// `spike_trial.py`.
    pub script: PathBuf,
    /// `amm-agent`.
    pub agent: PathBuf,
    /// BPF object for the watch (`None`: the agent's own search).
    pub bpf_object: Option<PathBuf>,
    /// Where to keep each trial's full stderr (`None`: only a tail, in
    /// errors).
    pub log_dir: Option<PathBuf>,
    /// The `amm-agent run` socket amm_dask registers with (amm modes).
    pub agent_socket: Option<PathBuf>,
    /// amm's jemalloc preload (`amm-jemalloc` mode).
    pub preload_library: Option<PathBuf>,
}

/// Lines from the trial script's stderr, as the reader thread sees them.
enum Line {
    /// `WORKER_PID`: a worker process waits to be put in its cgroup.
    Worker(u32),
    /// `WORKER_GATE_TIMEOUT`: it gave up waiting.
    GateTimeout(u32),
    /// `CLUSTER_CLOSING`, and when it was read (CLOCK_MONOTONIC ns).
    Closing(u64),
    /// End of the output.
    Closed,
}

/// A worker process being watched.
struct Live {
    pid: u32,
    cgroup: Option<HardLimit>,
    watch: Option<Child>,
    events: Option<JoinHandle<(Vec<EventMessage>, Vec<String>)>>,
    watch_stderr: Option<JoinHandle<String>>,
    gate_timeout: bool,
    error: Option<String>,
}

/// The process group of the trial running now (0: none).
static RUNNING_GROUP: AtomicI32 = AtomicI32::new(0);

/// Kills the trial that is running now, if any (its script, Dask and the
/// worker): for a signal handler, so that an interrupted run leaves nothing
/// behind. The trial then returns, as a failed one.
pub fn abort_running_trial() {
    let group = RUNNING_GROUP.load(Ordering::SeqCst);
    if group > 0 {
        // SAFETY: kill(2) on the process group of a child we started in its
        // own group; no memory is involved.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
}

/// Blocks SIGINT and SIGTERM in every thread (call it before any thread
/// starts) and handles them on a thread of their own: the first kills the
/// running trial and stops the run (its cgroups are removed as usual), the
/// second quits at once. A child inherits the blocked mask (measured: an
/// `amm-agent run` started after this never saw the SIGTERM that stops it),
/// so every child of a benchmark is spawned through [`unblock_signals`].
pub fn handle_stop_signals() -> Result<Arc<AtomicBool>> {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which
    // initialises it; sigaddset only writes inside it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    };
    // SAFETY: the set is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        bail!(
            "cannot block SIGINT/SIGTERM: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: the set is initialised and sig is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            let _ = writeln!(
                std::io::stderr(),
                "signal {sig}: killing the running trial and stopping (again to quit at once)"
            );
            abort_running_trial();
        }
    });
    Ok(stop)
}

/// Makes `cmd`'s child start with no signal blocked, whatever this
/// process blocks ([`handle_stop_signals`]).
pub fn unblock_signals(cmd: &mut Command) -> &mut Command {
    // SAFETY: the hook runs in the child between fork and exec and calls
    // only sigemptyset and pthread_sigmask, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            match libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) {
                0 => Ok(()),
                rc => Err(std::io::Error::from_raw_os_error(rc)),
            }
        })
    }
}

/// Kills the trial's process group (the script and anything it left) on
/// the way out, whatever happened.
struct GroupGuard(libc::pid_t);

impl GroupGuard {
    fn new(pid: u32) -> GroupGuard {
        let group = pid as libc::pid_t;
        RUNNING_GROUP.store(group, Ordering::SeqCst);
        GroupGuard(group)
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        RUNNING_GROUP.store(0, Ordering::SeqCst);
        // SAFETY: kill(2) on the process group of a child we started in its
        // own group (process_group(0)); no memory is involved.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// Number of BPF links the process holds open (attached programs).
fn bpf_links(pid: u32) -> usize {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            fs::read_link(e.path())
                .map(|t| t.to_string_lossy().contains("bpf_link"))
                .unwrap_or(false)
        })
        .count()
}

fn join_text(h: Option<JoinHandle<String>>) -> String {
    h.and_then(|h| h.join().ok()).unwrap_or_default()
}

impl DaskRunner {
    /// A runner with the default script and the `amm-agent` next to this
    /// binary; checks that they and root are there.
    pub fn new(venv: DaskVenv, bpf_object: Option<PathBuf>) -> Result<DaskRunner> {
        let agent = crate::profile_dir().join("amm-agent");
        if !agent.exists() {
            bail!(
                "{} is missing: build it with `cargo build --release -p amm-agent`",
                agent.display()
            );
        }
        let script = PathBuf::from(TRIAL_SCRIPT);
        if !script.exists() {
            bail!("{} is missing: is this a full checkout?", script.display());
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the Dask baseline needs root (memory cgroups and BPF): run it with sudo");
        }
        Ok(DaskRunner {
            venv,
            script,
            agent,
            bpf_object,
            log_dir: None,
            agent_socket: None,
            preload_library: None,
        })
    }

    /// Runs one trial. An `Err` means the harness could not run it (no
    /// Python, no cgroup, no probe); whatever Dask or the kernel did to the
    /// worker is in the [`TrialResult`].
    pub fn run_trial(&self, cfg: &TrialConfig) -> Result<TrialResult> {
        let mut child = self
            .trial_command(cfg)?
            .spawn()
            .with_context(|| format!("cannot start {}", self.venv.python.display()))?;
        let group = GroupGuard::new(child.id());
        let stdout = child.stdout.take().context("the trial's stdout")?;
        let stderr = child.stderr.take().context("the trial's stderr")?;
        let out_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stdout).read_to_string(&mut s);
            s
        });
        let (tx, rx) = mpsc::channel();
        let log_file = self.trial_log(cfg, child.id())?;
        let err_thread = std::thread::spawn(move || read_stderr(stderr, tx, log_file));

        let deadline = Instant::now() + cfg.timeout + STARTUP_SHUTDOWN_MARGIN;
        let mut followed = self.follow_workers(cfg, &rx, deadline);
        // the script is done (or given up on: then at once): reap it, then
        // the last worker
        let status = if followed.harness_error.is_some() {
            wait_until(&mut child, Instant::now())
        } else {
            wait_until(&mut child, deadline)
        };
        drop(group);
        if let Some(last) = followed.current.take() {
            followed.lives.push(finish_life(last, cfg.limit_bytes));
        }
        let tail = err_thread.join().unwrap_or_default();
        let stdout = out_thread.join().unwrap_or_default();
        if let Some(e) = followed.harness_error {
            return Err(e.context(format!("trial log (tail):\n{}", tail.join("\n"))));
        }
        let (script, raw, parse_error) = script_result(&stdout, status, &tail);
        Ok(assemble(
            cfg,
            script,
            raw,
            parse_error,
            followed.lives,
            followed.closing_ns,
        ))
    }

    /// The trial script's command for `cfg`: its stdout (the result) and
    /// stderr (the announcements) piped, in a process group of its own.
    fn trial_command(&self, cfg: &TrialConfig) -> Result<Command> {
        let mut cmd = Command::new(&self.venv.python);
        cmd.arg(&self.script)
            .args(["--workload", cfg.workload.name()])
            .arg("--limit-bytes")
            .arg(cfg.limit_bytes.to_string())
            .arg("--seed")
            .arg(cfg.seed.to_string())
            .arg("--timeout-s")
            .arg(format!("{:.0}", cfg.timeout.as_secs_f64()))
            .arg("--worker-gate-ms")
            .arg(GATE_MS.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PYTHONUNBUFFERED", "1")
            .process_group(0);
        unblock_signals(&mut cmd);
        if let Some(p) = cfg.poll_ms {
            cmd.arg("--poll-ms").arg(p.to_string());
        }
        self.mode_args(cfg.mode, cfg.spill, &mut cmd)?;
        if let (Some(v), true) = (&cfg.variant, cfg.mode != Mode::Plain) {
            for (k, val) in &v.settings {
                cmd.arg("--amm-config").arg(format!("{k}={val}"));
            }
        }
        Ok(cmd)
    }

    /// The file that keeps the trial's whole stderr (with `log_dir`).
    fn trial_log(&self, cfg: &TrialConfig, pid: u32) -> Result<Option<fs::File>> {
        let Some(d) = &self.log_dir else {
            return Ok(None);
        };
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        let p = d.join(format!(
            "{}-seed{}-{pid}.log",
            cfg.workload.name(),
            cfg.seed,
        ));
        let f = fs::File::create(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(Some(f))
    }

    /// Follows the script's announcements until it closes, the deadline
    /// passes or a worker cannot be watched: each new worker gets its life
    /// (cgroup, watch) and the one before is finished.
    fn follow_workers(
        &self,
        cfg: &TrialConfig,
        rx: &mpsc::Receiver<Line>,
        deadline: Instant,
    ) -> Followed {
        let mut f = Followed::default();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Line::Worker(pid)) => {
                    let next = match self.start_life(pid, cfg.limit_bytes) {
                        Ok(l) => l,
                        Err(e) => {
                            f.harness_error = Some(e);
                            break;
                        }
                    };
                    if let Some(prev) = f.current.replace(next) {
                        f.lives.push(finish_life(prev, cfg.limit_bytes));
                    }
                }
                Ok(Line::GateTimeout(pid)) => {
                    if let Some(l) = f.current.as_mut().filter(|l| l.pid == pid) {
                        l.gate_timeout = true;
                    }
                }
                Ok(Line::Closing(t)) => f.closing_ns = Some(t),
                Ok(Line::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        f.harness_error = Some(anyhow::anyhow!(
                            "the trial script did not end within {} s; killed it",
                            (cfg.timeout + STARTUP_SHUTDOWN_MARGIN).as_secs()
                        ));
                        break;
                    }
                }
            }
        }
        f
    }

    /// The trial script's arguments for a mode.
    fn mode_args(&self, mode: Mode, spill: Option<SpillMode>, cmd: &mut Command) -> Result<()> {
        if mode == Mode::Plain {
            return Ok(());
        }
        let socket = self
            .agent_socket
            .as_ref()
            .context("an amm mode needs an `amm-agent run` socket")?;
        cmd.arg("--amm-socket").arg(socket);
        if let Some(spill) = spill {
            cmd.args(["--spill-mode", spill.name()]);
        }
        if mode == Mode::AmmJemalloc {
            let lib = self
                .preload_library
                .as_ref()
                .context("the amm-jemalloc mode needs amm's preload library (--preload-library)")?;
            cmd.args(["--allocator", "jemalloc", "--preload-library"])
                .arg(lib);
        }
        Ok(())
    }

    /// Cgroup, watch, then the move that lets the worker exec.
    fn start_life(&self, pid: u32, limit: u64) -> Result<Live> {
        let cgroup =
            HardLimit::create("dask", limit).context("cannot create the worker's cgroup")?;
        let mut live = Live {
            pid,
            cgroup: None,
            watch: None,
            events: None,
            watch_stderr: None,
            gate_timeout: false,
            error: None,
        };
        let mut w = Command::new(&self.agent);
        w.args(["watch", "--pid", &pid.to_string(), "--json", "--limit"])
            .arg(limit.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        unblock_signals(&mut w);
        if let Some(o) = &self.bpf_object {
            w.arg("--bpf-object").arg(o);
        }
        match w.spawn() {
            Ok(mut watch) => {
                let out = watch.stdout.take();
                let err = watch.stderr.take();
                live.events = out.map(|o| std::thread::spawn(move || read_events(o)));
                live.watch_stderr = err.map(|e| {
                    std::thread::spawn(move || {
                        let mut s = String::new();
                        let _ = BufReader::new(e).read_to_string(&mut s);
                        s
                    })
                });
                let start = Instant::now();
                loop {
                    if let Ok(Some(st)) = watch.try_wait() {
                        live.error = Some(format!(
                            "amm-agent watch exited ({st}) before attaching: {}",
                            join_text(live.watch_stderr.take()).trim()
                        ));
                        break;
                    }
                    if bpf_links(watch.id()) > 0 {
                        // the links come last in loading; the watch entry
                        // is written right after
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                    if start.elapsed() > ATTACH_TIMEOUT {
                        live.error = Some(format!(
                            "amm-agent watch did not attach within {} s",
                            ATTACH_TIMEOUT.as_secs()
                        ));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                live.watch = Some(watch);
            }
            Err(e) => {
                live.error = Some(format!("cannot start {}: {e}", self.agent.display()));
            }
        }
        if let Err(e) = cgroup.add_pid(pid) {
            live.error.get_or_insert(format!("{e:#}"));
        }
        live.cgroup = Some(cgroup);
        Ok(live)
    }
}

/// What following a trial's workers gave.
#[derive(Default)]
struct Followed {
    /// The workers finished so far.
    lives: Vec<WorkerLife>,
    /// The worker alive when following stopped.
    current: Option<Live>,
    /// Why the harness gave up (then the trial is an `Err`).
    harness_error: Option<anyhow::Error>,
    /// When the script said it was closing the cluster.
    closing_ns: Option<u64>,
}

/// The script's result, its last JSON line on stdout (and the line as
/// JSON, kept raw), or why there is none.
fn script_result(
    stdout: &str,
    status: Option<std::process::ExitStatus>,
    tail: &[String],
) -> (ScriptResult, serde_json::Value, Option<String>) {
    let json_line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    match json_line.map(serde_json::from_str::<serde_json::Value>) {
        Some(Ok(v)) => match serde_json::from_value::<ScriptResult>(v.clone()) {
            Ok(s) => (s, v, None),
            Err(e) => (
                ScriptResult::default(),
                v,
                Some(format!("bad trial JSON: {e}")),
            ),
        },
        Some(Err(e)) => (
            ScriptResult::default(),
            serde_json::Value::Null,
            Some(format!("bad trial JSON: {e}")),
        ),
        None => (
            ScriptResult::default(),
            serde_json::Value::Null,
            Some(format!(
                "the trial script printed no result ({}); its log (tail):\n{}",
                status.map_or_else(|| "still running".to_string(), |s| s.to_string()),
                tail.join("\n")
            )),
        ),
    }
}

/// Reads the trial script's stderr: announces workers, keeps a tail, copies
/// everything to the log file.
fn read_stderr(
    stderr: impl Read,
    tx: mpsc::Sender<Line>,
    mut log: Option<fs::File>,
) -> Vec<String> {
    let mut tail = VecDeque::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(f) = log.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        let mut words = line.split_whitespace();
        let msg = match (words.next(), words.next().map(str::parse::<u32>)) {
            (Some("WORKER_PID"), Some(Ok(pid))) => Some(Line::Worker(pid)),
            (Some("WORKER_GATE_TIMEOUT"), Some(Ok(pid))) => Some(Line::GateTimeout(pid)),
            (Some("CLUSTER_CLOSING"), None) => Some(Line::Closing(crate::monotonic_ns())),
            _ => None,
        };
        if let Some(m) = msg {
            let _ = tx.send(m);
        }
        tail.push_back(line);
        if tail.len() > LOG_TAIL_LINES {
            tail.pop_front();
        }
    }
    let _ = tx.send(Line::Closed);
    tail.into()
}

/// Reads the watch's JSON lines.
fn read_events(out: impl Read) -> (Vec<EventMessage>, Vec<String>) {
    let mut events = Vec::new();
    let mut bad = Vec::new();
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<EventMessage>(&line) {
            Ok(e) => events.push(e),
            Err(_) if is_watch_note(&line) => {}
            Err(e) => bad.push(format!("{line:?}: {e}")),
        }
    }
    (events, bad)
}

/// The watch's own lines beside the kernel's events: what it watches
/// (`watching`), that it reads the allocator record (`record`) and how the
/// process ended (`ending`). Its stderr holds only warnings and errors
/// (the trial's `error`).
fn is_watch_note(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| {
            v.get("event")?
                .as_str()
                .map(|e| matches!(e, "watching" | "record" | "ending"))
        })
        .unwrap_or(false)
}

/// Waits for the child until `deadline`, then kills it.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return child.wait().ok();
            }
        }
    }
}

/// The worker is gone (or is about to be): collect the watch, read the
/// cgroup, remove it.
fn finish_life(mut live: Live, limit: u64) -> WorkerLife {
    let mut errors: Vec<String> = live.error.take().into_iter().collect();
    // the watch ends by itself with the worker's exit
    if let Some(mut w) = live.watch.take() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match w.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    // the worker is still alive (the script was killed):
                    // the cgroup's removal below kills it, and the watch
                    // with it
                    if let Some(c) = live.cgroup.as_ref()
                        && let Err(e) = c.kill_all()
                    {
                        errors.push(format!("{e:#}"));
                    }
                    if wait_or_kill(&mut w, Duration::from_secs(5)).is_err() {
                        errors.push("amm-agent watch did not exit".into());
                    }
                    break;
                }
            }
        }
    }
    let (events, bad) = live
        .events
        .take()
        .and_then(|h| h.join().ok())
        .unwrap_or_default();
    let watch_err = join_text(live.watch_stderr.take());
    if !bad.is_empty() {
        errors.push(format!("unreadable watch lines: {}", bad.join("; ")));
    }
    if !watch_err.trim().is_empty() {
        errors.push(format!("amm-agent watch: {}", watch_err.trim()));
    }
    let (mut oom_kills, mut cgroup_peak) = (0, None);
    if let Some(c) = live.cgroup.take() {
        match c.oom_kills() {
            Ok(n) => oom_kills = n,
            Err(e) => errors.push(format!("{e:#}")),
        }
        match c.peak_bytes() {
            Ok(p) => cgroup_peak = p,
            Err(e) => errors.push(format!("{e:#}")),
        }
        if let Err(e) = c.remove() {
            errors.push(format!("{e:#}"));
        }
    }
    life_from_events(
        live.pid,
        limit,
        &events,
        oom_kills,
        cgroup_peak,
        live.gate_timeout,
        errors,
    )
}

/// Waits a bounded time for a child, killing it past that.
fn wait_or_kill(child: &mut Child, t: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill()?;
    child.wait().map(|_| ())
}

/// What the watch's events say about one worker (its end is decided later,
/// with the trial script's report).
fn life_from_events(
    pid: u32,
    limit: u64,
    events: &[EventMessage],
    oom_kills: u64,
    cgroup_peak_bytes: Option<u64>,
    gate_timeout: bool,
    errors: Vec<String>,
) -> WorkerLife {
    let exit = events.iter().rev().find(|e| e.event == EventKind::Exit);
    let ups = |lvl: Level| {
        events
            .iter()
            .filter(move |e| e.event == EventKind::Level && e.level == lvl && e.prev_level < lvl)
    };
    // a jump from below straight to terminate passes spill and pause too
    let first_at_least = |lvl: Level| {
        events
            .iter()
            .find(|e| e.event == EventKind::Level && e.level >= lvl && e.prev_level < lvl)
            .map(|e| e.t_ns)
    };
    let exit_ns = exit.map(|e| e.t_ns);
    let terminate_crossed_ns = ups(Level::Terminate)
        .filter(|e| exit_ns.is_none_or(|x| e.t_ns <= x))
        .map(|e| e.t_ns)
        .next_back();
    let peak = exit
        .map(|e| e.peak_rss_bytes)
        .or_else(|| events.iter().map(|e| e.peak_rss_bytes).max());
    let terminate_bytes = (TERMINATE_FRACTION * limit as f64) as u64;
    let (spill_to_target_ms, spill_unresolved) = spill_episodes(events);
    WorkerLife {
        pid,
        end: LifeEnd::Died,
        peak_rss_bytes: peak,
        peak_fraction: peak.map(|p| p as f64 / limit as f64),
        overshoot_bytes: peak.map(|p| p.saturating_sub(terminate_bytes)),
        cgroup_peak_bytes,
        oom_kills,
        nanny_terminated: false,
        terminate_crossings: ups(Level::Terminate).count() as u32,
        terminate_crossed_ns,
        spill_crossed_ns: first_at_least(Level::Spill),
        pause_crossed_ns: first_at_least(Level::Pause),
        exit_ns,
        exit_after_terminate_ms: match (terminate_crossed_ns, exit_ns) {
            (Some(t), Some(x)) => Some(x.saturating_sub(t) as f64 / 1e6),
            _ => None,
        },
        spike_alarms: events
            .iter()
            .filter(|e| e.event == EventKind::Spike)
            .count() as u32,
        spill_to_target_ms,
        spill_unresolved,
        gate_timeout,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

/// Each rise past spill from below to the next fall below the re-arm level
/// (target), in ms of kernel time; and how many rises never fell back.
fn spill_episodes(events: &[EventMessage]) -> (Vec<f64>, u32) {
    let mut done = Vec::new();
    let mut open: Option<u64> = None;
    for e in events.iter().filter(|e| e.event == EventKind::Level) {
        if e.prev_level == Level::Below && e.level >= Level::Spill {
            open = open.or(Some(e.t_ns));
        } else if e.level == Level::Below
            && let Some(t) = open.take()
        {
            done.push(e.t_ns.saturating_sub(t) as f64 / 1e6);
        }
    }
    (done, u32::from(open.is_some()))
}

/// Each worker's end: OOM-killed, killed at the terminate page (amm),
/// terminated by Dask's nanny, shut down (it exited after the script said
/// it was closing, at `closing_ns`) or died.
fn decide_ends(lives: &mut [WorkerLife], script: &ScriptResult, closing_ns: Option<u64>) {
    let terminated: Vec<u32> = script
        .nanny_terminations
        .iter()
        .flatten()
        .filter_map(|t| t.pid)
        .collect();
    let at_page: Vec<u32> = script
        .amm_kills
        .iter()
        .flatten()
        .filter(|k| k.killed_at_page == Some(true))
        .filter_map(|k| k.pid)
        .collect();
    for l in lives.iter_mut() {
        l.nanny_terminated = terminated.contains(&l.pid);
        l.end = if l.oom_kills > 0 {
            LifeEnd::OomKilled
        } else if at_page.contains(&l.pid) {
            LifeEnd::KilledAtPage
        } else if l.nanny_terminated {
            LifeEnd::TerminatedByNanny
        } else if closing_ns.is_some_and(|c| l.exit_ns.is_none_or(|x| x >= c)) {
            LifeEnd::Shutdown
        } else {
            LifeEnd::Died
        };
    }
}

/// What went wrong in a trial: the script's result unreadable, the
/// script's own error, a worker that ran before its cgroup held it, and
/// each worker's (its watch, its cgroup).
fn trial_errors(
    parse_error: Option<String>,
    script: &ScriptResult,
    lives: &[WorkerLife],
) -> Vec<String> {
    let mut errors: Vec<String> = parse_error.into_iter().collect();
    errors.extend(script.error.clone());
    for l in lives {
        if l.gate_timeout {
            errors.push(format!(
                "worker {} started before it was in its cgroup (the gate timed out)",
                l.pid
            ));
        }
        if let Some(e) = &l.error {
            errors.push(format!("worker {}: {e}", l.pid));
        }
    }
    errors
}

/// Decides each worker's end and the trial's outcome. `closing_ns`: when
/// the script said it was closing the cluster (a worker that exits after
/// that was shut down; one that exited before, unexplained, died).
fn assemble(
    cfg: &TrialConfig,
    script: ScriptResult,
    raw: serde_json::Value,
    parse_error: Option<String>,
    mut lives: Vec<WorkerLife>,
    closing_ns: Option<u64>,
) -> TrialResult {
    let n = lives.len();
    decide_ends(&mut lives, &script, closing_ns);
    let first_death = lives.iter().find(|l| l.end != LifeEnd::Shutdown);
    let outcome = match first_death.map(|l| l.end) {
        Some(LifeEnd::OomKilled) => Outcome::OomKilled,
        Some(LifeEnd::TerminatedByNanny | LifeEnd::KilledAtPage) => Outcome::TerminatedRestarted,
        Some(_) => Outcome::Failed,
        None if script.finished => Outcome::Finished,
        None => Outcome::Failed,
    };
    let decisive =
        first_death.or_else(|| lives.iter().max_by_key(|l| l.peak_rss_bytes.unwrap_or(0)));
    let limit = cfg.limit_bytes as f64;
    let errors = trial_errors(parse_error, &script, &lives);
    let last = script.after_release.as_ref().and_then(|a| a.workers.last());
    TrialResult {
        workload: cfg.workload,
        mode: cfg.mode,
        spill: script.amm.as_ref().and_then(|a| a.spill),
        variant: cfg.variant.as_ref().map(|v| v.name.clone()),
        loop_lag_max_ms: last.and_then(|w| w.loop_lag_max_ms),
        loop_lag_p99_ms: last.and_then(|w| w.loop_lag_p99_ms),
        loop_late_50ms: last.and_then(|w| w.loop_late_50ms),
        dask_tick_max_ms: last.and_then(|w| w.tick_max_ms),
        tasks: script.result.as_ref().and_then(|r| r.tasks),
        unmanaged_after_release_bytes: script
            .after_release
            .as_ref()
            .and_then(|a| a.unmanaged_bytes),
        amm_reactions_ms: last
            .and_then(|w| w.amm_reactions.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(|s| s * 1e3).collect()))
            .collect(),
        amm_stats: last.and_then(|w| w.amm_stats.clone()).unwrap_or_default(),
        limit_bytes: cfg.limit_bytes,
        seed: cfg.seed,
        poll_ms: script.poll_ms.or(cfg.poll_ms),
        outcome,
        completed: script.finished,
        killed_worker: script.killed_worker,
        timed_out: script.timed_out,
        worker_restarts: script.worker_restarts.max(n.saturating_sub(1) as u32),
        peak_fraction: decisive.and_then(|l| l.peak_fraction),
        cgroup_peak_fraction: decisive
            .and_then(|l| l.cgroup_peak_bytes)
            .map(|p| p as f64 / limit),
        overshoot_bytes: decisive.and_then(|l| l.overshoot_bytes),
        reaction_ms: decisive
            .filter(|l| matches!(l.end, LifeEnd::TerminatedByNanny | LifeEnd::KilledAtPage))
            .and_then(|l| l.exit_after_terminate_ms),
        wall_ms: script.wall_ms,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
        lives,
        dask: raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: u64 = 1000 << 20;

    fn ev(event: EventKind, t_ns: u64, rss: u64, level: Level, prev: Level) -> EventMessage {
        EventMessage {
            event,
            t_ns,
            pid: 7,
            rss_bytes: rss,
            level,
            prev_level: prev,
            peak_rss_bytes: rss,
            faults: None,
            rate_bytes_per_ms: 0,
            eta_ns: None,
            foreign: false,
            signalled: false,
        }
    }

    /// The watch's own lines (what it watches, the record it reads, the
    /// ending) are neither events nor unreadable lines (the trial's error).
    #[test]
    fn the_watchs_own_lines_are_no_events_and_no_errors() {
        let level = ev(EventKind::Level, 5, 700 << 20, Level::Spill, Level::Below);
        let text = [
            r#"{"event":"watching","pid":7,"limit_bytes":1048576000}"#.to_string(),
            r#"{"event":"record","pid":7,"allocator":"jemalloc","interval_ms":100}"#.into(),
            serde_json::to_string(&level).expect("json"),
            r#"{"event":"ending","pid":7,"peak_rss_bytes":1}"#.into(),
        ]
        .join("\n");
        let (events, bad) = read_events(text.as_bytes());
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].t_ns, 5);
        let (_, bad) = read_events(&b"pid 7: reading its allocator record\n"[..]);
        assert_eq!(bad.len(), 1, "a line that is no JSON is still reported");
    }

    #[test]
    fn reaction_is_measured_from_the_last_rise_past_terminate() {
        use EventKind::{Exit, Level as Lv};
        use Level::*;
        let events = vec![
            ev(Lv, 100, 700 << 20, Spill, Below),
            ev(Lv, 200, 960 << 20, Terminate, Spill),
            ev(Lv, 300, 500 << 20, Below, Terminate),
            ev(Lv, 1_000_000, 990 << 20, Terminate, Below),
            ev(Exit, 41_000_000, 0, Below, Terminate),
        ];
        let mut events = events;
        events[4].peak_rss_bytes = 1000 << 20;
        let life = life_from_events(7, L, &events, 0, Some(L), false, vec![]);
        assert_eq!(life.terminate_crossings, 2);
        assert_eq!(life.terminate_crossed_ns, Some(1_000_000));
        assert_eq!(life.exit_after_terminate_ms, Some(40.0));
        assert_eq!(life.spill_crossed_ns, Some(100));
        assert_eq!(life.pause_crossed_ns, Some(200));
        assert_eq!(life.peak_fraction, Some(1.0));
        assert_eq!(life.overshoot_bytes, Some(L - (0.95 * L as f64) as u64));
    }

    #[test]
    fn a_spill_episode_runs_from_the_rise_past_spill_to_the_fall_below_target() {
        use EventKind::Level as Lv;
        use Level::*;
        let events = vec![
            ev(Lv, 1_000_000, 700 << 20, Spill, Below),
            // pause on the way does not end the episode
            ev(Lv, 2_000_000, 800 << 20, Pause, Spill),
            ev(Lv, 5_000_000, 590 << 20, Below, Pause),
            ev(Lv, 9_000_000, 950 << 20, Terminate, Below),
            ev(EventKind::Exit, 9_500_000, 0, Below, Terminate),
        ];
        let (done, open) = spill_episodes(&events);
        assert_eq!(done, [4.0]);
        assert_eq!(open, 1, "the last rise never came back below target");
    }

    fn life(pid: u32, oom: u64) -> WorkerLife {
        life_from_events(pid, L, &[], oom, None, false, vec![])
    }

    fn cfg() -> TrialConfig {
        TrialConfig {
            mode: Mode::Plain,
            spill: None,
            workload: Workload::Spike,
            limit_bytes: L,
            poll_ms: None,
            seed: 1,
            timeout: Duration::from_secs(1),
            variant: None,
        }
    }

    #[test]
    fn the_first_death_decides_the_outcome() {
        let script = ScriptResult {
            nanny_terminations: Some(vec![NannyTermination { pid: Some(2) }]),
            killed_worker: true,
            ..ScriptResult::default()
        };
        let r = assemble(
            &cfg(),
            script,
            serde_json::Value::Null,
            None,
            vec![life(1, 1), life(2, 0), life(3, 0)],
            Some(0),
        );
        assert_eq!(r.outcome, Outcome::OomKilled);
        let ends: Vec<LifeEnd> = r.lives.iter().map(|l| l.end).collect();
        assert_eq!(
            ends,
            [
                LifeEnd::OomKilled,
                LifeEnd::TerminatedByNanny,
                LifeEnd::Shutdown
            ]
        );
        assert_eq!(r.worker_restarts, 2);
    }

    #[test]
    fn a_run_without_deaths_finishes_only_if_dask_finished() {
        let done = ScriptResult {
            finished: true,
            ..ScriptResult::default()
        };
        let one = || vec![life(1, 0)];
        let null = serde_json::Value::Null;
        let r = assemble(&cfg(), done, null.clone(), None, one(), Some(0));
        assert_eq!(r.outcome, Outcome::Finished);
        let r = assemble(
            &cfg(),
            ScriptResult::default(),
            null.clone(),
            None,
            one(),
            Some(0),
        );
        assert_eq!(r.outcome, Outcome::Failed);
        // no report at all: the last worker's death is unexplained
        let r = assemble(
            &cfg(),
            ScriptResult::default(),
            null,
            Some("no result".into()),
            one(),
            None,
        );
        assert_eq!(r.lives[0].end, LifeEnd::Died);
        assert_eq!(r.outcome, Outcome::Failed);
    }

    #[test]
    fn a_worker_gone_before_the_cluster_closed_died() {
        let mut early = life(2, 0);
        early.exit_ns = Some(100);
        let mut late = life(3, 0);
        late.exit_ns = Some(300);
        let script = ScriptResult {
            nanny_terminations: Some(vec![NannyTermination { pid: Some(1) }]),
            ..ScriptResult::default()
        };
        let r = assemble(
            &cfg(),
            script,
            serde_json::Value::Null,
            None,
            vec![life(1, 0), early, late],
            Some(200),
        );
        let ends: Vec<LifeEnd> = r.lives.iter().map(|l| l.end).collect();
        assert_eq!(
            ends,
            [LifeEnd::TerminatedByNanny, LifeEnd::Died, LifeEnd::Shutdown]
        );
        assert_eq!(r.outcome, Outcome::TerminatedRestarted);
    }

    #[test]
    fn a_variant_is_a_name_and_amm_settings_and_nothing_else() {
        let v: AmmVariant = "no-trim:trim-threshold=1TiB; gate=false"
            .parse()
            .expect("a valid variant");
        assert_eq!(v.name, "no-trim");
        assert_eq!(
            v.settings,
            [
                ("trim-threshold".to_string(), "1TiB".to_string()),
                ("gate".to_string(), "false".to_string())
            ]
        );
        for bad in [
            "no-colon",
            "x:",
            "x:k",
            ":k=v",
            "x y:k=v",
            "x:k/../v=1",
            "x:k=v;",
        ] {
            assert!(bad.parse::<AmmVariant>().is_err(), "{bad:?} was accepted");
        }
    }
}
