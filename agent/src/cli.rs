//! Command-line interface of `amm-agent`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use amm_protocol::{Fractions, SampleKind};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::probe::Probe;
use crate::server::{self, ServerConfig};
use crate::watch::{self, WatchOptions};

/// amm's node agent: kernel-exact memory events for registered workers.
#[derive(Debug, Parser)]
#[command(name = "amm-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the privileged daemon: load the probe and serve registrations.
    Run(RunArgs),
    /// Watch one running process and print its memory events (no action).
    Watch(WatchArgs),
    /// Ask a running agent for its clients and watches.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The agent's socket.
    #[arg(long, env = "AMM_AGENT_SOCKET", default_value = amm_protocol::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Include every sample of each timeline (paged from the agent), not
    /// only the newest.
    #[arg(long)]
    timeline: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Unix socket to listen on.
    #[arg(long, env = "AMM_AGENT_SOCKET", default_value = amm_protocol::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Mode of the socket file, in octal.
    #[arg(long, default_value = "0660", value_parser = parse_mode)]
    socket_mode: u32,
    /// Group (name or gid) that may connect, when not the agent's own.
    #[arg(long)]
    socket_group: Option<String>,
    /// BPF object to load (default: target/bpf/amm.bpf.o, see README).
    #[arg(long, env = amm_ebpf::OBJECT_ENV)]
    bpf_object: Option<PathBuf>,
    /// Spike-alarm horizon for registrations that give none, in ms.
    #[arg(long, default_value_t = 200, value_parser = at_least_one::<u64>)]
    spike_horizon_ms: u64,
    /// Most clients of users other than root connected at once (root has a
    /// reserve of its own).
    #[arg(long, default_value_t = 256, value_parser = at_least_one::<usize>)]
    max_clients: usize,
    /// Most connections one user (other than root) may hold.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    max_clients_per_uid: usize,
    /// Most processes one user (other than root) may have watched.
    #[arg(long, default_value_t = 128, value_parser = at_least_one::<usize>)]
    max_watches_per_uid: usize,
    /// A client that watches nothing and sends nothing for this many ms is
    /// disconnected.
    #[arg(long, default_value_t = 60_000, value_parser = at_least_one::<u64>)]
    idle_timeout_ms: u64,
    /// Real-time (SCHED_FIFO) priority of the agent, 1-99, so an event is
    /// relayed the moment it happens even when every CPU is busy; 0 keeps
    /// the normal scheduler.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=99))]
    realtime_priority: u8,
    /// Time a new client has to send its hello, in ms.
    #[arg(long, default_value_t = 5000, value_parser = at_least_one::<u64>)]
    hello_timeout_ms: u64,
    /// Time a frame may take once its first byte arrived, in ms.
    #[arg(long, default_value_t = 5000, value_parser = at_least_one::<u64>)]
    frame_timeout_ms: u64,
    /// Serve Prometheus metrics (/metrics) and the live page (/) on this
    /// address: PORT (on 127.0.0.1), IP:PORT or [::1]:PORT. Off unless
    /// given. The page shows every watched process of every user.
    #[arg(long, value_name = "ADDR", value_parser = crate::http::parse_addr)]
    http: Option<std::net::SocketAddr>,
    /// Allow --http on an address that is not loopback (put an
    /// authenticating proxy in front: see SECURITY.md).
    #[arg(long, requires = "http")]
    http_allow_remote: bool,
    /// Most HTTP connections open at once (more are answered 503).
    #[arg(long, default_value_t = 32, requires = "http")]
    http_max_connections: usize,
    /// File the HTTP listener's bearer token is written to at each start
    /// (mode 0640, removed at exit); default: beside the socket, with the
    /// extension `.http-token`.
    #[arg(long, value_name = "PATH", requires = "http")]
    http_token_file: Option<PathBuf>,
    /// Group (name or gid) that may read the token file, and so the page
    /// and /metrics (e.g. the group Prometheus runs as).
    #[arg(long, value_name = "GROUP", requires = "http")]
    http_group: Option<String>,
    /// Serve the page and /metrics without a token to anyone who can
    /// connect (a single-user machine; they show every user's processes).
    #[arg(long, requires = "http", conflicts_with_all = ["http_token_file", "http_group"])]
    http_public: bool,
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// The process to watch (with --follow: the parent whose children to
    /// watch).
    #[arg(value_name = "PID", required_unless_present_any = ["pid_flag", "cgroup"])]
    pid: Option<u32>,
    /// The process to watch (same as PID).
    #[arg(long = "pid", value_name = "PID", conflicts_with = "pid")]
    pid_flag: Option<u32>,
    /// Watch every child of PID, now and to come (a nanny's worker across
    /// its restarts), each pinned by its pidfd and start time; ends when
    /// PID and its children have exited.
    #[arg(long)]
    follow: bool,
    /// Watch every process that is or comes to be in this cgroup (its
    /// directory, v1 or v2); ends when the cgroup is removed, or on Ctrl-C.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["pid", "pid_flag", "follow"])]
    cgroup: Option<PathBuf>,
    /// Its memory limit: `auto` (the hard limit of its memory cgroup: v1
    /// memory.limit_in_bytes, v2 memory.max, the lowest up the hierarchy;
    /// an error when unlimited), or bytes or a size such as 2GiB, 512MiB
    /// (warned about when above the cgroup's).
    #[arg(long)]
    limit: watch::LimitArg,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Re-arm fraction: a raised level falls back below this.
    #[arg(long, default_value_t = 0.6)]
    target: f64,
    /// Spill fraction.
    #[arg(long, default_value_t = 0.7)]
    spill: f64,
    /// Pause fraction.
    #[arg(long, default_value_t = 0.8)]
    pause: f64,
    /// Terminate fraction.
    #[arg(long, default_value_t = 0.95)]
    terminate: f64,
    /// Spike alarm when terminate is predicted within this many ms (0: off).
    #[arg(long, default_value_t = 200)]
    spike_horizon_ms: u64,
    /// BPF object to load.
    #[arg(long, env = amm_ebpf::OBJECT_ENV)]
    bpf_object: Option<PathBuf>,
    /// When the process exits (or on Ctrl-C), write the leak-vs-hoard
    /// report from kernel data alone to this file: `.html` a page with the
    /// chart, `.json` JSON, anything else text. The allocator's part is
    /// marked unavailable.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// amm-agent's socket: asked, when the process dies of a signal,
    /// whether the kernel killed it at the terminate page for the agent
    /// (skipped when no socket is there).
    #[arg(long, env = "AMM_AGENT_SOCKET", default_value = amm_protocol::DEFAULT_SOCKET)]
    agent: PathBuf,
}

/// Parses a size: plain bytes, or a number with a unit (KiB, MiB, GiB, KB, MB, GB, ...).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("{s:?} is negative; give a size such as 2GiB"));
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| format!("{s:?} is not a size; give bytes or a size such as 512MiB or 2GiB"))
}

/// A count or a duration that 0 would make meaningless (no client ever
/// served, every frame timed out at once).
fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
{
    match s.trim().parse::<T>() {
        Ok(v) if v >= T::from(1) => Ok(v),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 0660"))?;
    if m > 0o777 {
        return Err(format!("{s:?} is not a file mode (at most 0777)"));
    }
    if m & 0o600 != 0o600 {
        return Err(format!(
            "{s:?} does not let the socket's owner read and write it; use e.g. 0660"
        ));
    }
    Ok(m)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

impl Cli {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        init_logging();
        match self.command {
            Command::Run(a) => run(a),
            Command::Status(a) => status(a),
            Command::Watch(a) => {
                let scope = match (a.pid.or(a.pid_flag), a.cgroup, a.follow) {
                    (_, Some(dir), _) => watch::Scope::Cgroup(dir),
                    (Some(p), None, true) => watch::Scope::Follow(p),
                    (Some(p), None, false) => watch::Scope::Pid(p),
                    (None, None, _) => bail!("give the PID to watch, or --cgroup PATH"),
                };
                let opts = WatchOptions {
                    scope,
                    limit: a.limit,
                    fractions: Fractions {
                        target: Some(a.target),
                        spill: Some(a.spill),
                        pause: Some(a.pause),
                        terminate: Some(a.terminate),
                    },
                    spike_horizon: Duration::from_millis(a.spike_horizon_ms),
                    json: a.json,
                    object: a.bpf_object,
                    report: a.report,
                    agent: Some(a.agent),
                };
                let stdout = std::io::stdout();
                let mut out = stdout.lock();
                watch::watch(&opts, &mut out)?;
                Ok(())
            }
        }
    }
}

fn status(a: StatusArgs) -> Result<()> {
    let mut client =
        amm_protocol::Client::connect(&a.socket, "amm-agent status", Duration::from_secs(5))?;
    let mut s = client.status()?;
    if a.timeline {
        for w in s.watches.iter_mut().chain(s.ended.iter_mut()) {
            w.timeline = client.timeline(w.pid)?;
        }
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let written = if a.json {
        serde_json::to_writer_pretty(&mut out, &s)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        print_status(&s, &mut out)
    };
    match written.and_then(|()| out.flush()) {
        // `amm-agent status | head -1`: the reader has all it wanted
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print_status(s: &amm_protocol::AgentStatus, out: &mut dyn Write) -> std::io::Result<()> {
    let iec = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
    writeln!(
        out,
        "{} client(s), {} watch(es); probe: {} events, {} dropped; map entries: {} watches, {} mm, {} rings, {} bits",
        s.clients,
        s.watches.len(),
        s.events,
        s.dropped,
        s.map_entries.watches,
        s.map_entries.mm_owner,
        s.map_entries.client_rings,
        s.map_entries.bits
    )?;
    let now = crate::clock::monotonic_ns();
    for (title, list) in [("watched", &s.watches), ("ended", &s.ended)] {
        for w in list {
            writeln!(
                out,
                "{title} pid {:>7}  {:<9}  rss {:>10}  peak {:>10}  limit {:>10}  faults {}  ({} samples)",
                w.pid,
                w.level.name(),
                iec(w.rss_bytes),
                iec(w.peak_rss_bytes),
                iec(w.limit_bytes),
                w.faults,
                w.timeline_len
            )?;
            for sample in &w.timeline {
                let ago = now.saturating_sub(sample.t_ns) as f64 / 1e9;
                writeln!(
                    out,
                    "    {ago:>9.3} s ago  rss {:>10}  {}",
                    iec(sample.rss_bytes),
                    describe(&sample.what)
                )?;
            }
        }
    }
    Ok(())
}

/// One timeline sample in words.
fn describe(what: &SampleKind) -> String {
    let iec = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
    match what {
        SampleKind::Level {
            from,
            to,
            foreign,
            signalled,
        } => format!(
            "level {from} -> {to}{}{}",
            if *foreign { " (another task)" } else { "" },
            if *signalled {
                " [kernel signalled]"
            } else {
                ""
            }
        ),
        SampleKind::Spike { eta_ns, .. } => {
            format!("spike: terminate in {:.0} ms", *eta_ns as f64 / 1e6)
        }
        SampleKind::AgentSignal { signal } => format!("agent sent signal {signal}"),
        SampleKind::Accounting(sp) => format!(
            "managed {} unmanaged {} hoarded {} non-heap {} spilled {}",
            iec(sp.managed),
            iec(sp.unmanaged_live),
            iec(sp.hoarded),
            iec(sp.non_heap),
            iec(sp.spilled)
        ),
        SampleKind::Heap(h) => format!(
            "heap ({:?}) resident {} dirty {} free chunks {}",
            h.allocator,
            iec(h.resident.max(h.uordblks + h.fordblks + h.hblkhd)),
            iec(h.dirty + h.muzzy),
            iec(h.fordblks)
        ),
        SampleKind::Purge(p) => format!(
            "{} purge returned {} (hoarded {} -> {})",
            p.reason,
            iec(p.returned_bytes),
            iec(p.hoarded_before),
            iec(p.hoarded_after)
        ),
        SampleKind::Exit { peak_rss_bytes } => format!("exit, peak {}", iec(*peak_rss_bytes)),
        SampleKind::Unwatched { peak_rss_bytes } => {
            format!("unwatched, peak {}", iec(*peak_rss_bytes))
        }
        SampleKind::Credentials { peak_rss_bytes } => format!(
            "credentials changed: watch ended, peak {}",
            iec(*peak_rss_bytes)
        ),
    }
}

/// Raises the soft limit on open files to the hard one: the agent holds a
/// pidfd per watch and a socket per client (thousands of each at most).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

/// Moves the agent to SCHED_FIFO; logs and carries on if the kernel says no.
fn set_realtime(priority: u8) {
    match crate::realtime::set_fifo(priority) {
        Ok(()) => tracing::info!(priority, "running under SCHED_FIFO"),
        Err(e) => tracing::warn!(
            "cannot switch to SCHED_FIFO priority {priority} ({e}); events may wait for a busy CPU"
        ),
    }
}

/// The `--http*` flags as the listener's settings, with a fresh token
/// unless `--http-public`.
fn http_config(a: &RunArgs) -> Result<Option<crate::http::HttpConfig>> {
    use crate::http_auth::{self, Access};
    let Some(addr) = a.http else {
        return Ok(None);
    };
    let access = if a.http_public {
        Access::Public
    } else {
        let file = a
            .http_token_file
            .clone()
            .unwrap_or_else(|| http_auth::default_file(&a.socket));
        Access::with_token(file)?
    };
    Ok(Some(crate::http::HttpConfig {
        addr,
        allow_remote: a.http_allow_remote,
        max_connections: a.http_max_connections,
        access,
        token_group: a.http_group.as_deref().map(server::group_id).transpose()?,
    }))
}

fn run(a: RunArgs) -> Result<()> {
    if a.max_clients_per_uid > a.max_clients {
        bail!(
            "--max-clients-per-uid {} is above --max-clients {}; lower it, or raise --max-clients",
            a.max_clients_per_uid,
            a.max_clients
        );
    }
    let http = http_config(&a)?;
    let config = ServerConfig {
        socket: a.socket,
        socket_mode: a.socket_mode,
        socket_group: a
            .socket_group
            .as_deref()
            .map(server::socket::group_id)
            .transpose()?,
        max_clients: a.max_clients,
        max_clients_per_uid: a.max_clients_per_uid,
        max_watches_per_uid: a.max_watches_per_uid,
        idle_timeout: Duration::from_millis(a.idle_timeout_ms),
        hello_timeout: Duration::from_millis(a.hello_timeout_ms),
        frame_timeout: Duration::from_millis(a.frame_timeout_ms),
        default_spike_horizon: Duration::from_millis(a.spike_horizon_ms),
        http,
        ..ServerConfig::default()
    };
    if let Some(h) = &config.http {
        // before loading anything: a refused address is a usage error
        crate::http::check(h)?;
    }
    // removes the token file however `run` ends
    let _token_file = config.http.as_ref().and_then(|h| h.access.remover());
    raise_fd_limit();
    // loaded now (so a broken object fails at start), attached with the
    // first watch
    let probe = Probe::load_detached(a.bpf_object.as_deref())?;
    if a.realtime_priority > 0 {
        set_realtime(a.realtime_priority);
    }
    // one thread: an event goes from the ring buffer to the client's socket
    // without waking another thread on the way
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(server::run(config, probe))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bananas_do_not() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert!(
            parse_size("banana")
                .expect_err("banana")
                .contains("not a size")
        );
        assert!(
            parse_size("-1GiB")
                .expect_err("negative")
                .contains("negative")
        );
    }

    #[test]
    fn http_access_flags_need_http_and_public_excludes_a_token() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["amm-agent", "run"].iter().chain(args)).map(|_| ())
        };
        assert!(parse(&["--http", "9464"]).is_ok());
        assert!(
            parse(&[
                "--http",
                "9464",
                "--http-group",
                "adm",
                "--http-token-file",
                "/t"
            ])
            .is_ok()
        );
        assert!(parse(&["--http", "9464", "--http-public"]).is_ok());
        assert!(
            parse(&["--http-public"]).is_err(),
            "--http-public without --http"
        );
        assert!(parse(&["--http-group", "adm"]).is_err());
        assert!(parse(&["--http", "9464", "--http-public", "--http-group", "adm"]).is_err());
        assert!(parse(&["--http", "9464", "--http-public", "--http-token-file", "/t"]).is_err());
    }

    #[test]
    fn modes_parse() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("9").is_err());
        assert!(parse_mode("01777").is_err());
    }
}
