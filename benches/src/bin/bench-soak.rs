//! Soak: one `amm-agent run` for ten minutes under 64 registered workers
//! (each crossing spill and falling back every few seconds, pushing its
//! accounting), a churn of short-lived watched processes, and hostile
//! clients (garbage and half frames, a slow reader, floods of idle
//! connections, registrations of other users' pids). Every sample period it
//! records the agent's RSS and open fds, its watches against the probe's map
//! entries, and the event latency of a socket client and a direct-ring
//! client; the table goes to `benches/RESULTS.md`. Goal: flat RSS and fds,
//! no map entry left behind, the same p99 latency at the end as at the
//! start. Run as root: `cargo xtask bench soak` (`-- --seconds 60` for a
//! short run, `--no-write` to leave RESULTS.md alone).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amm_benches::{Faulter, monotonic_ns, percentiles, start_agent_with};
use amm_ebpf::EventKind;
use amm_protocol::{AgentStatus, Client, Registration};
use anyhow::{Context, Result, bail};
use clap::Parser;

/// The soak benchmark.
#[derive(Parser)]
struct Args {
    /// How long the soak runs, in seconds.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Registered workers.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Seconds between samples.
    #[arg(long, default_value_t = 30)]
    sample_seconds: u64,
    /// Short-lived watched processes started per second.
    #[arg(long, default_value_t = 5)]
    churn_per_second: u64,
    /// Print the table only; leave benches/RESULTS.md alone.
    #[arg(long)]
    no_write: bool,
}

const NOBODY: u32 = 65534;
/// A worker's limit: spill (70 %) is crossed by its 16 MiB touch, and the
/// fall below target (60 %) comes with the free.
const WORKER_LIMIT_MIB: u64 = 24;
const TOUCH_MIB: u64 = 16;

/// What the threads share.
struct Shared {
    stop: AtomicBool,
    socket: std::path::PathBuf,
    /// (path, delay in µs) of each latency probe event since the last sample.
    latency: Mutex<Vec<(&'static str, f64)>>,
    worker_events: AtomicU64,
    churned: AtomicU64,
    refused: AtomicU64,
    hostile: AtomicU64,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn client(&self, name: &str) -> Result<Client> {
        Ok(Client::connect(
            &self.socket,
            name,
            Duration::from_secs(10),
        )?)
    }
}

/// Sleeps `d` in small steps, returning early when the soak stops.
fn nap(s: &Shared, d: Duration) {
    let end = Instant::now() + d;
    while !s.stopped() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
}

/// 64 workers that register themselves (direct ring), cross spill and fall
/// back, push accounting and read their events, round after round.
fn workers(s: Arc<Shared>, n: usize) -> Result<()> {
    let mut all = Vec::new();
    for _ in 0..n {
        let mut f = Faulter::spawn()?;
        f.cmd(&format!("connect {}", s.socket.display()))?;
        f.cmd(&format!("register-direct 0 {WORKER_LIMIT_MIB}"))?;
        all.push(f);
    }
    while !s.stopped() {
        for f in &mut all {
            f.cmd(&format!("touch {TOUCH_MIB}"))?;
            f.cmd("free")?;
            f.cmd("account 1")?;
            let drained = f.cmd("drain")?;
            let on_socket: u64 = drained
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            s.worker_events.fetch_add(on_socket, Ordering::Relaxed);
            if s.stopped() {
                break;
            }
        }
        nap(&s, Duration::from_millis(500));
    }
    Ok(())
}

/// Short-lived processes, registered as they start and gone a moment later.
fn churn(s: Arc<Shared>, per_second: u64) -> Result<()> {
    let mut c = s.client("soak churn")?;
    let mut alive: Vec<std::process::Child> = Vec::new();
    let gap = Duration::from_millis(1000 / per_second.max(1));
    while !s.stopped() {
        let child = std::process::Command::new("sleep").arg("0.3").spawn()?;
        c.register(&Registration::new(child.id(), 1 << 30))
            .context("register a short-lived child")?;
        alive.push(child);
        s.churned.fetch_add(1, Ordering::Relaxed);
        alive.retain_mut(|ch| !matches!(ch.try_wait(), Ok(Some(_))));
        while c.next_event(Some(Duration::from_millis(1)))?.is_some() {}
        nap(&s, gap);
    }
    for mut ch in alive {
        let _ = ch.wait();
    }
    Ok(())
}

/// Where a latency probe's events are read.
enum Reader {
    Socket(Client),
    Ring(amm_protocol::ring::RingReader, Client),
}

impl Reader {
    /// The next level event, with its delay from the kernel's stamp (µs).
    fn level_event(&mut self) -> Result<Option<f64>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let e = match self {
                Self::Socket(c) => c.next_event(Some(Duration::from_millis(100)))?,
                Self::Ring(r, _) => r
                    .recv(Some(Duration::from_millis(100)))?
                    .and_then(|raw| amm_protocol::EventMessage::from_kernel(&raw)),
            };
            let now = monotonic_ns();
            if let Some(e) = e.filter(|e| e.event == EventKind::Level) {
                return Ok(Some(now.saturating_sub(e.t_ns) as f64 / 1e3));
            }
        }
        Ok(None)
    }

    /// Drops what else arrived (the socket copy of ring events, spikes).
    fn drain(&mut self) -> Result<()> {
        let c = match self {
            Self::Socket(c) | Self::Ring(_, c) => c,
        };
        while c.next_event(Some(Duration::from_millis(1)))?.is_some() {}
        if let Self::Ring(r, _) = self {
            while r.next_event().is_some() {}
        }
        Ok(())
    }
}

/// One crossing up and one down, each event's delay read while the probe
/// still faults or frees.
fn cross(probe: &mut Faulter, reader: &mut Reader) -> Result<Vec<f64>> {
    let mut delays = Vec::new();
    for line in [format!("touch {TOUCH_MIB}"), "free".to_string()] {
        probe.send(&line)?;
        delays.extend(reader.level_event()?);
        probe.wait_ok(&line)?;
    }
    reader.drain()?;
    Ok(delays)
}

/// Two probes crossing spill every second: one read on the socket, one on
/// its own ring; each level event's delay from the kernel's stamp to the
/// client is recorded.
fn latency(s: Arc<Shared>) -> Result<()> {
    // as amm-worker's event thread does by default (SCHED_FIFO 1 where
    // permitted, else the short slice): wake on the event, not a slice later
    let granted = amm_protocol::sched::ReaderPolicy::Realtime(1).apply();
    eprintln!("soak latency: the reading thread runs under {granted}");
    let limit = WORKER_LIMIT_MIB << 20;
    let mut f = Faulter::spawn()?;
    let mut sock = s.client("soak latency (socket)")?;
    sock.register(&Registration::new(f.pid(), limit))?;
    let mut d = Faulter::spawn()?;
    let mut direct = s.client("soak latency (direct)")?;
    let ring = direct
        .register(&Registration {
            direct: true,
            ..Registration::new(d.pid(), limit)
        })?
        .ring
        .context("no ring with a direct registration")?;
    let mut readers = [
        ("socket", Reader::Socket(sock)),
        ("direct", Reader::Ring(ring, direct)),
    ];
    while !s.stopped() {
        for (probe, (path, reader)) in [&mut f, &mut d].into_iter().zip(readers.iter_mut()) {
            let delays = cross(probe, reader)?;
            let mut l = s.latency.lock().unwrap_or_else(|p| p.into_inner());
            l.extend(delays.into_iter().map(|us| (*path, us)));
        }
        nap(&s, Duration::from_millis(1000));
    }
    Ok(())
}

/// Raw connections that break the protocol, each read until the agent
/// closes it.
fn garbage(s: &Shared) {
    for bytes in [
        &b"\xff\xff\xff\xffjunk"[..],
        &[0, 0, 0, 100, b'{'][..],
        b"\x00\x00\x00\x08not json",
    ] {
        if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&s.socket) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = c.write_all(bytes);
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
            s.hostile.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Another user's clients: garbage, a flood of idle connections, a reader
/// that never reads, and registrations of pids that are not theirs.
fn hostile(s: Arc<Shared>, victims: Vec<u32>, agent: u32) -> Result<()> {
    let mut flooder = Faulter::spawn_as(NOBODY, NOBODY)?;
    let mut thief = Faulter::spawn_as(NOBODY, NOBODY)?;
    thief.cmd(&format!("connect {}", s.socket.display()))?;
    let mut slow = Faulter::spawn_as(NOBODY, NOBODY)?;
    slow.cmd(&format!("connect {}", s.socket.display()))?;
    slow.cmd("register 0")?;
    let mut round = 0u64;
    while !s.stopped() {
        garbage(&s);
        for pid in [victims[round as usize % victims.len()], 1, agent] {
            let r = thief.try_cmd(&format!("register {pid}"))?;
            if !r.starts_with("err") {
                bail!("a hostile client registered pid {pid}: {r}");
            }
            s.refused.fetch_add(1, Ordering::Relaxed);
        }
        // the slow reader makes events it never reads
        let _ = slow.try_cmd(&format!("touch {TOUCH_MIB}"));
        let _ = slow.try_cmd("free");
        if round.is_multiple_of(10) {
            // the last flood's connections were closed as idle by now
            flooder.cmd("unflood")?;
            flooder.cmd(&format!("flood {} 40", s.socket.display()))?;
            s.hostile.fetch_add(40, Ordering::Relaxed);
        }
        round += 1;
        nap(&s, Duration::from_secs(2));
    }
    Ok(())
}

/// One row of the table.
struct Sample {
    t_s: f64,
    rss_kib: u64,
    fds: usize,
    status: AgentStatus,
    socket: (f64, f64),
    direct: (f64, f64),
}

/// One sample; each asks the agent afresh, as `amm-agent status` does (an
/// idle connection would be closed).
fn sample(s: &Shared, agent_pid: u32, start: Instant) -> Result<Sample> {
    let info = amm_agent::identity::ProcInfo::read(agent_pid)?;
    let fds = std::fs::read_dir(format!("/proc/{agent_pid}/fd"))?.count();
    let status = s.client("soak sampler")?.status()?;
    let taken: Vec<(&'static str, f64)> =
        std::mem::take(&mut *s.latency.lock().unwrap_or_else(|p| p.into_inner()));
    let pick = |path: &str| {
        let mut v: Vec<f64> = taken
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, us)| *us)
            .collect();
        let (p50, p99, _) = percentiles(&mut v);
        (p50, p99)
    };
    Ok(Sample {
        t_s: start.elapsed().as_secs_f64(),
        rss_kib: info.rss_bytes() >> 10,
        fds,
        socket: pick("socket"),
        direct: pick("direct"),
        status,
    })
}

fn row(x: &Sample) -> String {
    let m = &x.status.map_entries;
    format!(
        "| {:>5.0} | {:>7.1} | {:>4} | {:>5} | {} / {} / {} / {} | {:>4} | {:>8} | {} | {:.0} / {:.0} | {:.0} / {:.0} |",
        x.t_s,
        x.rss_kib as f64 / 1024.0,
        x.fds,
        x.status.total_watches,
        m.watches,
        m.mm_owner,
        m.client_rings,
        m.bits,
        x.status.clients,
        x.status.events,
        x.status.dropped,
        x.socket.0,
        x.socket.1,
        x.direct.0,
        x.direct.1,
    )
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().take(3).collect();
            format!("load average {}", f.join(", "))
        })
        .unwrap_or_default()
}

type Worker = std::thread::JoinHandle<Result<()>>;

fn spawn(name: &str, f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<Worker> {
    Ok(std::thread::Builder::new().name(name.into()).spawn(f)?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !amm_agent::probe::is_root() {
        bail!("the soak benchmark loads BPF and runs clients as other users: run it as root");
    }
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let socket = dir.path().join("agent.sock");
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    let agent = start_agent_with(
        &socket,
        &["--socket-mode", "0666", "--idle-timeout-ms", "10000"],
        log.into(),
    )?;
    let agent_pid = agent.pid();
    let s = Arc::new(Shared {
        stop: AtomicBool::new(false),
        socket,
        latency: Mutex::new(Vec::new()),
        worker_events: AtomicU64::new(0),
        churned: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        hostile: AtomicU64::new(0),
    });
    let load_before = uptime();
    let (rss0, fds0) = (
        amm_agent::identity::ProcInfo::read(agent_pid)?.rss_bytes() >> 10,
        std::fs::read_dir(format!("/proc/{agent_pid}/fd"))?.count(),
    );
    let threads = start_load(&s, &args, agent_pid)?;
    let samples = run_samples(&s, &args, agent_pid)?;
    s.stop.store(true, Ordering::SeqCst);
    for (name, t) in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("the {name} thread failed: {e:#}"),
            Err(_) => bail!("the {name} thread panicked"),
        }
    }
    let end = settle_and_check(&s, agent_pid)?;
    let report = render(&args, &samples, (rss0, fds0), &end, &s, &load_before);
    println!("{report}");
    if !args.no_write {
        write_results(&report)?;
    }
    drop(agent);
    Ok(())
}

fn start_load(s: &Arc<Shared>, args: &Args, agent_pid: u32) -> Result<Vec<(&'static str, Worker)>> {
    let mut threads = Vec::new();
    let (s1, n) = (s.clone(), args.workers);
    threads.push(("workers", spawn("soak-workers", move || workers(s1, n))?));
    // the workers register before the hostile client names their pids
    let deadline = Instant::now() + Duration::from_secs(120);
    let victims = loop {
        let st = s.client("soak setup")?.status()?;
        if st.total_watches >= args.workers {
            break st.watches.iter().map(|w| w.pid).collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            bail!("the workers did not register within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (s2, per_s) = (s.clone(), args.churn_per_second);
    threads.push(("churn", spawn("soak-churn", move || churn(s2, per_s))?));
    let s3 = s.clone();
    threads.push(("latency", spawn("soak-latency", move || latency(s3))?));
    let s4 = s.clone();
    threads.push((
        "hostile",
        spawn("soak-hostile", move || hostile(s4, victims, agent_pid))?,
    ));
    Ok(threads)
}

fn run_samples(s: &Shared, args: &Args, agent_pid: u32) -> Result<Vec<Sample>> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let period = Duration::from_secs(args.sample_seconds.max(1));
    let mut next = start + period;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += period;
        let x = sample(s, agent_pid, start)?;
        eprintln!("{}", row(&x));
        samples.push(x);
    }
    Ok(samples)
}

/// After the load stopped: (RSS KiB, fds, status) once every watch is gone.
fn settle_and_check(s: &Shared, agent_pid: u32) -> Result<(u64, usize, AgentStatus)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = s.client("soak sampler")?.status()?;
        if st.total_watches == 0 || Instant::now() > deadline {
            let rss = amm_agent::identity::ProcInfo::read(agent_pid)?.rss_bytes() >> 10;
            let fds = std::fs::read_dir(format!("/proc/{agent_pid}/fd"))?.count();
            return Ok((rss, fds, st));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn render(
    args: &Args,
    samples: &[Sample],
    (rss0, fds0): (u64, usize),
    (rss_end, fds_end, end): &(u64, usize, AgentStatus),
    s: &Shared,
    load_before: &str,
) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        "Command: `cargo xtask bench soak -- --seconds {} --workers {} --churn-per-second {} --sample-seconds {}` (release build, as root).\n\
         Load before: {load_before}; after: {}.\n\n",
        args.seconds, args.workers, args.churn_per_second, args.sample_seconds, uptime()
    ));
    o.push_str("| t (s) | agent RSS (MiB) | fds | watches | map: watches / mm / rings / bits | clients | events | dropped | socket p50 / p99 (µs) | direct p50 / p99 (µs) |\n");
    o.push_str("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |\n");
    for x in samples {
        o.push_str(&row(x));
        o.push('\n');
    }
    let m = &end.map_entries;
    o.push_str(&format!(
        "\nBefore the load: RSS {:.1} MiB, {} fds. After it stopped and every watch ended: RSS {:.1} MiB, {} fds, map entries {} / {} / {} / {} (watches / mm / rings / bits), {} watches left.\n\
         Load: {} workers made {} events read on their sockets; {} short-lived processes were registered and exited; \
         hostile clients made {} connections (garbage, half frames, idle floods) and had {} registrations of other users' pids refused.\n",
        rss0 as f64 / 1024.0,
        fds0,
        *rss_end as f64 / 1024.0,
        fds_end,
        m.watches,
        m.mm_owner,
        m.client_rings,
        m.bits,
        end.total_watches,
        args.workers,
        s.worker_events.load(Ordering::Relaxed),
        s.churned.load(Ordering::Relaxed),
        s.hostile.load(Ordering::Relaxed),
        s.refused.load(Ordering::Relaxed),
    ));
    o
}

/// Puts the report under `## Soak (issue 9)` in benches/RESULTS.md,
/// replacing an earlier one.
fn write_results(report: &str) -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md");
    let text = std::fs::read_to_string(&path).context("read benches/RESULTS.md")?;
    const HEAD: &str = "## Soak (issue 9)";
    let section = format!(
        "{HEAD}\n\nOne `amm-agent run` under 64 registered workers, a churn of short-lived watched processes and hostile clients (`benches/src/bin/bench-soak.rs`): the agent's RSS and open fds, its watches against the probe's map entries, and the latency of level events (kernel stamp to client) on the socket and on a direct ring, per sample period.\n\n{report}\n"
    );
    let out = match text.find(HEAD) {
        Some(i) => {
            let rest = &text[i + HEAD.len()..];
            let end = rest
                .find("\n## ")
                .map_or(text.len(), |j| i + HEAD.len() + j + 1);
            format!("{}{section}{}", &text[..i], &text[end..])
        }
        None => format!("{}\n{section}", text.trim_end()),
    };
    std::fs::write(&path, out).context("write benches/RESULTS.md")
}
