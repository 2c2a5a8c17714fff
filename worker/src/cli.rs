//! The command line: `amm-worker run | report | limit | workloads | check-allocator`.
//!
//! `--allocator` is honoured before any work: the nanny puts the choice in
//! its worker's environment; a process that must itself run on another
//! allocator than the one its first allocation picked (`--no-nanny`,
//! `check-allocator`) re-executes itself with `AMM_ALLOCATOR` set.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::alloc::{self, ALLOCATOR_ENV, Allocator};
use crate::config::{ConfigFlags, Loader, MemoryConfig};
use crate::limit::{self, HostMemory, LimitSpec};
use crate::nanny::{self, ATTEMPT_ENV, NAME_ENV, NannyOptions, RestartPolicy};
use crate::pool::MAX_THREADS;
use crate::units::parse_duration;
use crate::worker::{self, WorkerOptions};
use crate::workload::{BUILTINS, Workload};

/// Guards against re-exec loops.
const REEXEC_ENV: &str = "AMM_REEXECED";

#[derive(Parser, Debug)]
#[command(
    name = "amm-worker",
    version,
    about = "A data-processing worker that stays alive under memory pressure: Dask's \
             target/spill/pause/terminate, allocator-aware (jemalloc or glibc). \
             `amm-worker [OPTIONS] -- CMD ARGS...` puts any program on amm.",
    args_conflicts_with_subcommands = true,
    override_usage = "amm-worker [OPTIONS] -- CMD [ARGS]...\n       amm-worker <COMMAND>"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    program: ProgramArgs,
}

/// `amm-worker [OPTIONS] -- CMD ARGS...`: the nanny supervising any program.
#[derive(Args, Debug)]
struct ProgramArgs {
    /// jemalloc | system: the program's malloc, through the preload library
    /// (system: glibc, observed) [default: $AMM_ALLOCATOR, else jemalloc].
    #[arg(long)]
    allocator: Option<String>,
    /// The preload library (default: next to amm-worker, the target
    /// directory, /usr/lib/amm/; or $AMM_PRELOAD_LIB).
    #[arg(long, value_name = "PATH")]
    preload: Option<PathBuf>,
    /// auto | available | SIZE (4GiB, at least 16MiB) | FRACTION (0.5, 1.0) | 0 (no limit).
    #[arg(long, default_value = "auto", allow_hyphen_values = true)]
    memory_limit: String,
    /// After a terminate signal other than SIGKILL, SIGKILL after this long.
    #[arg(long, default_value = "3s")]
    terminate_grace: String,
    /// At a rise into spill: a signal for the program (SIGUSR1) or a program
    /// to run (no shell; AMM_LEVEL, AMM_PID, AMM_RSS_BYTES, AMM_LIMIT_BYTES).
    #[arg(long, value_name = "SIGNAL|PROGRAM")]
    on_spill: Option<String>,
    /// At a rise into pause: as --on-spill.
    #[arg(long, value_name = "SIGNAL|PROGRAM")]
    on_pause: Option<String>,
    /// Run --on-spill/--on-pause with /bin/sh -c instead of as one path.
    #[arg(long)]
    hook_shell: bool,
    /// A hook still running after this long is killed.
    #[arg(long, default_value = "10s")]
    hook_timeout: String,
    /// Write the nanny's timeline (ticks, the kernel's events, exits).
    #[arg(long, value_name = "PATH")]
    timeline: Option<PathBuf>,
    /// Write the nanny's JSON summary (attempts, causes) to this file.
    #[arg(long, value_name = "PATH")]
    summary: Option<PathBuf>,
    /// Name (AMM_WORKER_NAME in the program's environment).
    #[arg(long)]
    name: Option<String>,
    /// Most restarts before giving up (0: never restart).
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,
    /// First back-off before a restart (doubles each time, at most 10s).
    #[arg(long, default_value = "500ms")]
    restart_backoff: String,
    /// Dask's memory keys (listed last in `--help`, under their own heading).
    #[command(flatten)]
    memory: MemoryFlags,
    /// The program and its arguments.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a workload (a built-in name or a TOML file) under the memory
    /// manager; logs go to stderr, a JSON summary to stdout.
    Run(Box<RunArgs>),
    /// Print the effective memory limit and where it comes from.
    Limit {
        /// auto | available | SIZE (4GiB, at least 16MiB) | FRACTION (0.5, 1.0) | 0 (none).
        #[arg(long, default_value = "auto", allow_hyphen_values = true)]
        memory_limit: String,
        /// Read /proc and /sys below this directory (for fixtures).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Say what explains a run's unmanaged memory, stretch by stretch (leak,
    /// hoard, fragmentation, task temporaries, non-heap or managed growth),
    /// with the evidence; from the file a worker wrote with `--timeline`
    /// (a running worker's file too: the report covers what it holds so far),
    /// or live from the timeline amm-agent holds (`--agent SOCKET --pid PID`).
    Report(ReportArgs),
    /// List the built-in workloads.
    Workloads,
    /// Show which allocator serves this binary: allocate a block and report
    /// which allocator's counters grew (JSON).
    CheckAllocator {
        /// jemalloc | system (default: $AMM_ALLOCATOR, else jemalloc).
        #[arg(long)]
        allocator: Option<String>,
        /// Size of the probe allocation.
        #[arg(long, default_value = "64MiB")]
        bytes: String,
    },
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The timeline file (`amm-worker run ... --timeline PATH`).
    #[arg(required_unless_present = "agent", conflicts_with = "agent")]
    timeline: Option<PathBuf>,
    /// Instead of a file: ask the amm-agent at this socket for a registered
    /// worker's timeline (its accounting split and the kernel's levels; no
    /// allocator statistics).
    #[arg(long, value_name = "SOCKET")]
    agent: Option<PathBuf>,
    /// With `--agent`: which worker (its pid, as `amm-agent status` lists
    /// it); may be left out when the agent watches exactly one.
    #[arg(long, requires = "agent")]
    pid: Option<u32>,
    /// Print the report as JSON (schema: amm-report's `report` module).
    #[arg(long)]
    json: bool,
    /// Also write a self-contained HTML page (chart and tables) to this file.
    #[arg(long, value_name = "PATH")]
    html: Option<PathBuf>,
    /// Follow a running worker: report again every SECONDS until its
    /// workload ends.
    #[arg(long, value_name = "SECONDS")]
    every: Option<f64>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// A built-in workload (see `amm-worker workloads`) or a TOML file.
    workload: String,
    /// jemalloc | system (default: $AMM_ALLOCATOR, else jemalloc).
    #[arg(long)]
    allocator: Option<String>,
    /// auto | available | SIZE (4GiB, at least 16MiB) | FRACTION (0.5, 1.0) | 0 (no limit).
    #[arg(long, default_value = "auto", allow_hyphen_values = true)]
    memory_limit: String,
    /// Task threads (1 to 1024).
    #[arg(long, default_value_t = 2, value_parser = nthreads)]
    nthreads: usize,
    /// Where the spill directory (amm-spill-<name>) goes [default: the temp dir].
    #[arg(long)]
    local_directory: Option<PathBuf>,
    /// Worker name [default: from the nanny, else worker-<pid>].
    #[arg(long)]
    name: Option<String>,
    /// Write one JSON line per monitor tick (and events) to this file.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Run the worker in this process, without a nanny.
    #[arg(long)]
    no_nanny: bool,
    /// Nanny: most restarts before giving up.
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,
    /// Nanny: first back-off before a restart (doubles each time, at most 10s).
    #[arg(long, default_value = "500ms")]
    restart_backoff: String,
    /// Dask's memory keys (listed last in `--help`, under their own heading).
    #[command(flatten)]
    memory: MemoryFlags,
}

/// Dask's memory keys (`[worker.memory]`, `[worker.agent]`): a TOML file,
/// the `AMM_*` environment and a flag per key, the same for the built-in
/// worker and for `-- CMD`.
#[derive(Args, Debug)]
struct MemoryFlags {
    /// TOML config file with Dask's keys ([worker.memory] target = 0.6 ...).
    #[arg(long, env = "AMM_CONFIG")]
    config: Option<PathBuf>,
    /// Every `[worker.*]` config key as a flag (declared in `config.rs`).
    #[command(
        flatten,
        next_help_heading = "Config keys (flag > AMM_* env > --config file)"
    )]
    config_flags: ConfigFlags,
}

/// `--nthreads`: 1 to [`MAX_THREADS`] (100000 used to abort in the
/// middle of spawning them, with a backtrace).
fn nthreads(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number of task threads from 1 to {MAX_THREADS} (e.g. the number of cores)"
        )),
    }
}

fn memory_config(a: &MemoryFlags) -> anyhow::Result<MemoryConfig> {
    let mut l = Loader::new();
    if let Some(p) = &a.config {
        l.file(p).map_err(anyhow::Error::msg)?;
    }
    l.env(std::env::vars()).map_err(anyhow::Error::msg)?;
    l.flags(&a.config_flags).map_err(anyhow::Error::msg)?;
    l.build().map_err(anyhow::Error::msg)
}

/// The allocator asked for: the flag, else `$AMM_ALLOCATOR`, else
/// jemalloc (the mission's default; `--allocator system` opts out).
fn wanted_allocator(flag: Option<&str>) -> anyhow::Result<Allocator> {
    if let Some(f) = flag {
        return f.parse().map_err(anyhow::Error::msg);
    }
    match std::env::var(ALLOCATOR_ENV) {
        Ok(v) => v
            .parse()
            .map_err(|e: String| anyhow::anyhow!("{ALLOCATOR_ENV}: {e}")),
        Err(_) => Ok(Allocator::Jemalloc),
    }
}

/// Replaces this process with itself on `want` if it runs on the other one.
fn ensure_allocator(want: Allocator) -> anyhow::Result<()> {
    if alloc::active() == want {
        return Ok(());
    }
    if std::env::var_os(REEXEC_ENV).is_some() {
        bail!(
            "re-executed with {ALLOCATOR_ENV}={want} but still running on {}",
            alloc::active()
        );
    }
    let exe = std::env::current_exe().context("cannot find the amm-worker binary")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let err = std::process::Command::new(exe)
        .args(args)
        .env(ALLOCATOR_ENV, want.name())
        .env(REEXEC_ENV, "1")
        .exec();
    Err(err).context("cannot re-execute amm-worker on the chosen allocator")
}

/// stderr that never fails: a log line to a closed pipe (the nanny or a
/// test harness gone) is dropped instead of panicking the logging thread.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn run(a: RunArgs) -> anyhow::Result<i32> {
    let want = wanted_allocator(a.allocator.as_deref())?;
    let memory = memory_config(&a.memory)?;
    let spec: LimitSpec = a.memory_limit.parse()?;
    // Check the limit before spawning anything: a bad value fails once, and
    // the nanny warns once about a cgroup that gives less.
    if a.no_nanny {
        limit::resolve(spec, &HostMemory::current()?)?;
    } else {
        resolve_limit(&a.memory_limit)?;
    }
    let workload = Workload::load(&a.workload)?;
    let local_directory = a.local_directory.clone().unwrap_or_else(std::env::temp_dir);
    if !a.no_nanny {
        let name = a
            .name
            .clone()
            .unwrap_or_else(|| format!("nanny-{}", std::process::id()));
        let backoff = parse_duration(&a.restart_backoff)
            .map_err(|e| anyhow::anyhow!("--restart-backoff: {e}"))?;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        return nanny::builtin::run(
            args,
            NannyOptions {
                allocator: want,
                trim_threshold: memory.trim_threshold,
                name,
                local_directory,
                restart: RestartPolicy {
                    max_restarts: a.max_restarts,
                    backoff,
                },
                agent: memory.agent_socket.clone(),
                timeline: a.timeline.clone(),
            },
        );
    }
    ensure_allocator(want)?;
    let name = a
        .name
        .clone()
        .or_else(|| std::env::var(NAME_ENV).ok())
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let attempt = std::env::var(ATTEMPT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    worker::run(WorkerOptions {
        workload,
        limit: spec,
        nthreads: a.nthreads,
        local_directory,
        name,
        memory,
        timeline: a.timeline.clone(),
        attempt,
    })
}

/// `amm-worker [OPTIONS] -- CMD ARGS...`.
fn run_program(a: ProgramArgs) -> anyhow::Result<i32> {
    use crate::hook::Action;
    use crate::nanny::program::{AnyProgram, ProgramOptions};
    if a.cmd.is_empty() {
        bail!(
            "nothing to run: give a command after `--` (amm-worker -- python job.py), \
             or a subcommand (amm-worker --help)"
        );
    }
    let allocator = wanted_allocator(a.allocator.as_deref())?;
    let memory = memory_config(&a.memory)?;
    let limit = resolve_limit(&a.memory_limit)?;
    let euid = nix::unistd::geteuid().as_raw();
    let library = match (
        crate::inject::find_library(a.preload.as_deref(), allocator, euid),
        allocator,
    ) {
        (Ok(l), _) => Some(l),
        (Err(e), Allocator::Jemalloc) => return Err(e),
        (Err(e), Allocator::System) => {
            tracing::warn!("{e:#}; running on plain glibc, without allocator statistics");
            None
        }
    };
    let python = crate::inject::is_python(&a.cmd[0]);
    let injection = crate::inject::injection(
        allocator,
        library.as_deref(),
        memory.trim_threshold,
        python,
        &|k| std::env::var_os(k),
    );
    let hook = |text: &Option<String>, flag: &str| -> anyhow::Result<Option<Action>> {
        let Some(t) = text else { return Ok(None) };
        let action = Action::parse(t, a.hook_shell).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
        action
            .check(euid)
            .map_err(|e| anyhow::anyhow!("{flag}: will not run {t:?}: {e}"))?;
        Ok(Some(action))
    };
    let duration =
        |text: &str, flag: &str| parse_duration(text).map_err(|e| anyhow::anyhow!("{flag}: {e}"));
    let opts = ProgramOptions {
        on_spill: hook(&a.on_spill, "--on-spill")?,
        on_pause: hook(&a.on_pause, "--on-pause")?,
        hook_timeout: duration(&a.hook_timeout, "--hook-timeout")?,
        terminate_grace: duration(&a.terminate_grace, "--terminate-grace")?,
        argv: a.cmd.clone(),
        allocator,
        injection,
        memory,
        limit,
        name: a
            .name
            .clone()
            .unwrap_or_else(|| format!("nanny-{}", std::process::id())),
        timeline: a.timeline.clone(),
    };
    tracing::info!(
        allocator = %allocator,
        preload = ?opts.injection.library,
        python,
        "amm-worker: supervising {:?}",
        a.cmd
    );
    let policy = RestartPolicy {
        max_restarts: a.max_restarts,
        backoff: duration(&a.restart_backoff, "--restart-backoff")?,
    };
    let summary = nanny::run(&mut AnyProgram::new(opts), &policy)?;
    if let Some(path) = &a.summary {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("cannot write the summary {}", path.display()))?;
    }
    Ok(summary.exit_code)
}

/// Resolves `--memory-limit` for this process's host and cgroup, and warns
/// when the cgroup allows less than the limit (the kernel would OOM-kill
/// the program before amm's terminate level).
fn resolve_limit(spec: &str) -> anyhow::Result<limit::Limit> {
    let spec: LimitSpec = spec.parse()?;
    let host = HostMemory::current()?;
    let l = limit::resolve(spec, &host)?;
    tracing::info!("memory limit: {l}");
    if let Some(w) = limit::cgroup_shortfall(&l, &host) {
        tracing::warn!("{w}");
    }
    Ok(l)
}

fn print_limit(spec: &str, root: &Path) -> anyhow::Result<i32> {
    let spec: LimitSpec = spec.parse()?;
    let rlimit = if root == Path::new("/") {
        limit::rlimit_rss()
    } else {
        None
    };
    let host = HostMemory::read(root, rlimit)?;
    let l = limit::resolve(spec, &host)?;
    eprintln!("memory limit: {l}");
    println!(
        "{}",
        serde_json::json!({"limit_bytes": l.bytes, "source": l.source, "host": host})
    );
    Ok(0)
}

fn report(a: &ReportArgs) -> anyhow::Result<i32> {
    use std::io::Write;
    let every = match a.every {
        Some(s) if !(s > 0.0 && s.is_finite()) => {
            bail!("--every must be a positive number of seconds")
        }
        Some(s) => Some(std::time::Duration::from_secs_f64(s)),
        None => None,
    };
    loop {
        let run = match (&a.timeline, &a.agent) {
            (_, Some(socket)) => crate::report_live::run_from_agent(socket, a.pid)?,
            (Some(timeline), None) => {
                let file = std::fs::File::open(timeline).with_context(|| {
                    format!(
                        "cannot open the timeline {}: give the file a worker wrote with --timeline",
                        timeline.display()
                    )
                })?;
                amm_report::Run::from_timeline(std::io::BufReader::new(file))
                    .with_context(|| format!("cannot use {}", timeline.display()))?
            }
            (None, None) => bail!("give a timeline file, or --agent SOCKET"),
        };
        let report = amm_report::analyze(&run, &amm_report::Thresholds::default());
        let format = if a.json {
            amm_report::Format::Json
        } else {
            amm_report::Format::Text
        };
        let text = amm_report::render(&run, &report, format);
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .context("cannot write the report")?;
        out.flush().context("cannot write the report")?;
        if let Some(path) = &a.html {
            let page = amm_report::render(&run, &report, amm_report::Format::Html);
            std::fs::write(path, page)
                .with_context(|| format!("cannot write the HTML report {}", path.display()))?;
            eprintln!("HTML report: {}", path.display());
        }
        let ended = run.events.iter().any(|e| {
            matches!(
                e.item,
                amm_report::Event::End(_)
                    | amm_report::Event::Terminate(_)
                    | amm_report::Event::Exit(_)
            )
        });
        match every {
            Some(d) if !ended => {
                std::thread::sleep(d);
                writeln!(out).context("cannot write the report")?;
            }
            _ => return Ok(0),
        }
    }
}

fn check_allocator(flag: Option<&str>, bytes: &str) -> anyhow::Result<i32> {
    let want = wanted_allocator(flag)?;
    ensure_allocator(want)?;
    let n = crate::units::parse_bytes(bytes).map_err(anyhow::Error::msg)?;
    let c = alloc::verify_serving(n as usize)?;
    println!("{}", serde_json::to_string(&c)?);
    Ok(if c.verified { 0 } else { 1 })
}

/// Parses the command line and runs it; the binary's `main`.
pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_program(cli.program),
        Some(Command::Run(a)) => run(*a),
        Some(Command::Report(a)) => report(&a),
        Some(Command::Limit { memory_limit, root }) => print_limit(&memory_limit, &root),
        Some(Command::Workloads) => {
            for (name, _) in BUILTINS {
                match Workload::load(name) {
                    Ok(w) => println!("{name:10} {}", w.description.unwrap_or_default()),
                    Err(e) => println!("{name:10} (broken: {e:#})"),
                }
            }
            Ok(0)
        }
        Some(Command::CheckAllocator { allocator, bytes }) => {
            check_allocator(allocator.as_deref(), &bytes)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("amm-worker: error: {e:#}");
            match e.downcast_ref::<crate::summary::Refused>() {
                Some(_) => ExitCode::from(crate::summary::REFUSED as u8),
                None => ExitCode::from(1),
            }
        }
    }
}
