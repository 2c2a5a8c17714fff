//! Event latency: from the kernel's timestamp of the RSS update that crosses
//! a level to the moment a client holds the event, over many crossings.
//!
//! Two paths through the real `amm-agent run`, measured side by side in one
//! run; this process registers its child either way:
//! - `socket`: the agent reads its ring buffer and relays each event over
//!   the Unix socket;
//! - `direct`: the registration asks for a ring buffer of its own, whose fd
//!   comes with the answer; this process reads it directly.
//!
//! Each trial makes the child touch enough memory to cross spill, then free
//! it to fall below the re-arm level: two level events per trial. Run as
//! root: `cargo xtask bench latency`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amm_benches::{Faulter, monotonic_ns, percentiles, profile_dir, settle, target_dir};
use amm_ebpf::EventKind;
use amm_protocol::sched::{InForce, ReaderPolicy};
use amm_protocol::{Client, EventMessage, Registration, TerminateBy};
use anyhow::{Context, Result, bail};
use clap::Parser;

/// Event latency benchmark.
#[derive(Parser)]
struct Args {
    /// Crossing pairs (up + down) per path.
    #[arg(long, default_value_t = 60)]
    trials: usize,
    /// Terminate trials per enforcer (kernel signal at the page, agent
    /// signal through the pidfd).
    #[arg(long, default_value_t = 30)]
    terminate_trials: usize,
    /// Also print every sample (µs), sorted.
    #[arg(long)]
    dump: bool,
    /// SCHED_FIFO priority of the thread that reads the events, as
    /// amm-worker's `--agent-reader-priority`; 0: the short EEVDF slice
    /// only (the worker's fallback where SCHED_FIFO is not permitted).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=99))]
    reader_priority: u8,
    /// After a spike alarm, the direct reader busy-reads its ring for at
    /// most this many ms, as amm-worker's `--agent-reader-spin` (default
    /// 100 ms); 0: it always sleeps in `poll` until woken.
    #[arg(long, default_value_t = 100)]
    spin_ms: u64,
    /// Write every sample to this file, one line each: path, crossing,
    /// the kernel's stamp and the moment the client held the event (ns,
    /// CLOCK_MONOTONIC, the clock of tracefs' `mono` trace_clock), so a
    /// slow one can be found in a trace.
    #[arg(long, value_name = "FILE")]
    samples: Option<std::path::PathBuf>,
}

const TOUCH_MIB: usize = 80;

/// A limit whose spill level (70 %) sits at 90 % of the touch and whose
/// pause level (80 %) lies beyond it: one up-crossing per touch.
fn limit_for(base: u64) -> u64 {
    ((base + ((TOUCH_MIB as u64 * 9 / 10) << 20)) as f64 / 0.7) as u64
}

struct AgentProc {
    child: Child,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn start_agent() -> Result<AgentProc> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");
    let child = Command::new(profile_dir().join("amm-agent"))
        .arg("run")
        .arg("--socket")
        .arg(&socket)
        .arg("--bpf-object")
        .arg(target_dir().join("bpf/amm.bpf.o"))
        .env(
            "AMM_LOG",
            std::env::var("AMM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .spawn()
        .context("start amm-agent (cargo xtask bench builds it)")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(AgentProc {
                child,
                _dir: dir,
                socket,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("amm-agent did not start listening")
}

/// RSS of the toucher once it is up and idle.
fn base_rss(toucher: &mut Faulter) -> Result<u64> {
    toucher.cmd("free")?;
    Ok(amm_agent::identity::ProcInfo::read(toucher.pid())?.rss_bytes())
}

/// Latencies in µs of upward and downward crossings, and every sample's
/// (up, kernel stamp, held at) in ns.
#[derive(Default)]
struct Samples {
    up: Vec<f64>,
    down: Vec<f64>,
    stamps: Vec<(bool, u64, u64)>,
}

impl Samples {
    fn extend(&mut self, other: Samples) {
        self.up.extend(other.up);
        self.down.extend(other.down);
        self.stamps.extend(other.stamps);
    }
}

/// Runs the trials, getting each level event through `next`; returns the
/// latencies in µs. `next` waits at most the given time (zero: only what
/// is already there).
fn trials(
    n: usize,
    toucher: &mut Faulter,
    mut next: impl FnMut(Duration) -> Result<Option<EventMessage>>,
) -> Result<Samples> {
    let mut lat = Samples::default();
    for _ in 0..n {
        for (up, cmd) in [
            (true, format!("touch {TOUCH_MIB}")),
            (false, "free".to_string()),
        ] {
            // the event is read while the child is still touching
            toucher.send(&cmd)?;
            loop {
                let e = next(Duration::from_secs(10))?.context("no event within 10 s")?;
                let at = monotonic_ns();
                if e.event == EventKind::Level {
                    let us = at.saturating_sub(e.t_ns) as f64 / 1e3;
                    if up { &mut lat.up } else { &mut lat.down }.push(us);
                    lat.stamps.push((up, e.t_ns, at));
                    break;
                }
            }
            toucher.wait_ok(&cmd)?;
            settle();
            // a stale event would be measured as the next trial's
            while let Some(e) = next(Duration::ZERO)? {
                if e.event == EventKind::Level {
                    bail!("more than one level crossing per step: {e:?}");
                }
            }
        }
    }
    Ok(lat)
}

fn via_agent(n: usize) -> Result<Samples> {
    let agent = start_agent()?;
    let mut toucher = Faulter::spawn()?;
    let limit = limit_for(base_rss(&mut toucher)?);
    let mut client = Client::connect(&agent.socket, "bench-latency", Duration::from_secs(10))?;
    client.register(&Registration::new(toucher.pid(), limit))?;
    trials(n, &mut toucher, |wait| {
        Ok(client.next_event(Some(wait.max(Duration::from_micros(1))))?)
    })
}

fn via_ring(n: usize, spin: Option<Duration>) -> Result<Samples> {
    let agent = start_agent()?;
    let mut toucher = Faulter::spawn()?;
    let limit = limit_for(base_rss(&mut toucher)?);
    let mut client = Client::connect(&agent.socket, "bench-latency", Duration::from_secs(10))?;
    let reg = client.register(&Registration {
        direct: true,
        ..Registration::new(toucher.pid(), limit)
    })?;
    let mut ring = reg.ring.context("the agent sent no ring buffer")?;
    ring.spin_after_alarm(spin);
    trials(n, &mut toucher, |wait| {
        Ok(ring
            .recv(Some(wait))?
            .and_then(|raw| EventMessage::from_kernel(&raw)))
    })
}

/// One terminate trial: the child allocates past its limit until killed.
/// Returns (µs from the terminate crossing to the exit, bytes past the
/// terminate level at the peak).
fn terminate_trial(agent: &AgentProc, by: TerminateBy) -> Result<(f64, f64)> {
    let mut toucher = Faulter::spawn()?;
    let base = base_rss(&mut toucher)?;
    let limit = base + (200 << 20);
    let mut client = Client::connect(&agent.socket, "bench-terminate", Duration::from_secs(10))?;
    let reg = client.register(&Registration {
        terminate_signal: Some(libc::SIGKILL),
        terminate_by: by,
        ..Registration::new(toucher.pid(), limit)
    })?;
    toucher.send("touch 400")?;
    let mut crossed = None;
    loop {
        let e = client
            .next_event(Some(Duration::from_secs(10)))?
            .context("no event within 10 s")?;
        match e.event {
            EventKind::Level if e.level == amm_ebpf::Level::Terminate => crossed = Some(e.t_ns),
            EventKind::Exit => {
                let crossed = crossed.context("exit without a terminate crossing")?;
                let over = e.peak_rss_bytes.saturating_sub(reg.thresholds.terminate);
                return Ok((e.t_ns.saturating_sub(crossed) as f64 / 1e3, over as f64));
            }
            _ => {}
        }
    }
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> Result<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)?;
    Ok(Duration::from(t))
}

/// One line per sample: path, up/down, kernel stamp ns, held at ns.
fn write_samples(path: &std::path::Path, paths: &[(&str, &Samples)]) -> Result<()> {
    use std::fmt::Write as _;
    let mut text = String::new();
    for (name, s) in paths {
        for (up, t_ns, at) in &s.stamps {
            let dir = if *up { "up" } else { "down" };
            let _ = writeln!(text, "{name} {dir} {t_ns} {at}");
        }
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The socket and direct paths' samples and their reader's CPU time,
/// interleaved in blocks of 10 so drift hits both.
struct Paths {
    agent: Samples,
    ring: Samples,
    agent_cpu: Duration,
    ring_cpu: Duration,
}

fn run_paths(trials: usize, spin: Option<Duration>) -> Result<Paths> {
    // warm-up: fault the memory once so the first trials are not slower
    let _ = via_ring(3, spin)?;
    let mut p = Paths {
        agent: Samples::default(),
        ring: Samples::default(),
        agent_cpu: Duration::ZERO,
        ring_cpu: Duration::ZERO,
    };
    let mut left = trials;
    while left > 0 {
        let k = left.min(10);
        // the reader thread's CPU time on each path (setup included, alike)
        let t0 = thread_cpu()?;
        p.agent.extend(via_agent(k)?);
        let t1 = thread_cpu()?;
        p.ring.extend(via_ring(k, spin)?);
        p.agent_cpu += t1.saturating_sub(t0);
        p.ring_cpu += thread_cpu()?.saturating_sub(t1);
        left -= k;
    }
    Ok(p)
}

/// Terminate trials per enforcer, interleaved: (enforcer, µs from the
/// crossing to the exit, bytes past terminate at the peak).
type TerminateSamples = Vec<(TerminateBy, Vec<f64>, Vec<f64>)>;

fn run_terminate(trials: usize) -> Result<TerminateSamples> {
    let agent_proc = start_agent()?;
    let mut term: TerminateSamples = vec![
        (TerminateBy::Kernel, Vec::new(), Vec::new()),
        (TerminateBy::Agent, Vec::new(), Vec::new()),
    ];
    for _ in 0..trials {
        for (by, delay, over) in term.iter_mut() {
            let (d, o) = terminate_trial(&agent_proc, *by)?;
            delay.push(d);
            over.push(o);
            settle();
        }
    }
    Ok(term)
}

fn print_paths(args: &Args, reader: &InForce, p: &mut Paths) {
    println!(
        "event latency, kernel timestamp of the crossing -> the client holds the event; {} trials per path, each one crossing up (while touching {TOUCH_MIB} MiB) and one down (inside the munmap of it); reader thread: {reader}, spinning after a spike alarm for at most {} ms; kernel {}",
        p.agent.up.len(),
        args.spin_ms,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!();
    let per_trial = |d: Duration| d.as_secs_f64() * 1e3 / args.trials.max(1) as f64;
    println!(
        "reader thread CPU per trial (setup included): socket {:.2} ms, direct {:.2} ms",
        per_trial(p.agent_cpu),
        per_trial(p.ring_cpu)
    );
    println!();
    println!("| path | crossing | median µs | p99 µs | max µs |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, s) in [
        (
            "socket: kernel -> agent -> Unix socket -> client",
            &mut p.agent,
        ),
        (
            "direct: kernel -> the client's own ring buffer",
            &mut p.ring,
        ),
    ] {
        let mut all: Vec<f64> = s.up.iter().chain(&s.down).copied().collect();
        for (dir, v) in [("up", &mut s.up), ("down", &mut s.down), ("all", &mut all)] {
            let (m, p99, max) = percentiles(v);
            println!("| {name} | {dir} | {m:.1} | {p99:.1} | {max:.1} |");
            if args.dump {
                eprintln!("{name} {dir}: {v:.0?}");
            }
        }
    }
}

fn print_terminate(trials: usize, term: &mut TerminateSamples) {
    println!(
        "terminate enforcement: a child allocates 400 MiB at full speed under a 200 MiB limit with terminate_signal SIGKILL; {trials} trials each, interleaved"
    );
    println!();
    println!(
        "| signalled by | crossing -> exit, median µs | p99 µs | past terminate at the peak, median KiB | max KiB |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (by, delay, over) in term.iter_mut() {
        let (dm, dp99, _) = percentiles(delay);
        let (om, _, omax) = percentiles(over);
        let name = match by {
            TerminateBy::Kernel => "kernel (bpf_send_signal at the page)",
            TerminateBy::Agent => "agent (pidfd_send_signal on the event)",
        };
        println!(
            "| {name} | {dm:.0} | {dp99:.0} | {:.1} | {:.1} |",
            om / 1024.0,
            omax / 1024.0
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !amm_agent::probe::is_root() {
        bail!("the latency benchmark loads BPF: run it as root");
    }
    // the thread that waits for events is scheduled as a worker's event
    // thread is (amm-worker --agent-reader-priority, default 1)
    let reader = match args.reader_priority {
        0 => ReaderPolicy::ShortSlice,
        p => ReaderPolicy::Realtime(p),
    }
    .apply();
    let spin = (args.spin_ms > 0).then(|| Duration::from_millis(args.spin_ms));
    let mut paths = run_paths(args.trials, spin)?;
    if let Some(path) = &args.samples {
        write_samples(path, &[("socket", &paths.agent), ("direct", &paths.ring)])?;
    }
    let mut term = run_terminate(args.terminate_trials)?;
    print_paths(&args, &reader, &mut paths);
    println!();
    print_terminate(args.terminate_trials, &mut term);
    Ok(())
}
