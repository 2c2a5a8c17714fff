//! The cost of the agent's `--http` side and what it costs the relay, with
//! `--workers` watched processes (`amm-fault` children registered by this
//! process, each pushing an accounting split 5 times a second as a worker
//! does) against one real `amm-agent run --http` (each request carrying
//! the token from the file beside the socket, as Prometheus and a browser
//! do):
//!
//! 1. the agent's CPU (utime + stime from /proc, its HTTP thread apart)
//!    with no viewer, with `--viewers` live streams (`/events`, read as a
//!    page reads them), and with those plus a `/metrics` scrape a second;
//! 2. the time of a `/metrics` scrape (sequential GETs) and its size;
//! 3. the relay's latency, kernel → this client over the socket, for level
//!    crossings of one child, quiet against under HTTP load (the viewers, a
//!    scrape loop, a stream that never reads, idle connections), in
//!    interleaved blocks;
//! 4. kernel event → pixel: headless Chromium on `/`, the page's own
//!    `data-pixel-ms` of each feed item (paint time minus the kernel's
//!    stamp, both on the wall clock).
//!
//! Run as root: `cargo xtask bench dashboard`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amm_benches::{Faulter, monotonic_ns, percentiles, settle, start_agent_http};
use amm_ebpf::EventKind;
use amm_integration_tests::HttpListener;
use amm_integration_tests::browser::Browser;
use amm_protocol::{Client, ClientMessage, Registration, Split};
use anyhow::{Context, Result};
use clap::Parser;

/// The dashboard benchmark.
#[derive(Parser)]
struct Args {
    /// Watched processes.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Live streams open at once.
    #[arg(long, default_value_t = 4)]
    viewers: usize,
    /// Seconds per CPU measurement.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Sequential `/metrics` scrapes timed.
    #[arg(long, default_value_t = 200)]
    scrapes: usize,
    /// Crossing pairs per relay block (4 blocks: quiet, loaded, quiet,
    /// loaded).
    #[arg(long, default_value_t = 30)]
    relay_trials: usize,
    /// Crossings timed to the pixel.
    #[arg(long, default_value_t = 40)]
    pixel_trials: usize,
}

const TOUCH_MIB: u64 = 32;

/// utime + stime of a process (or one of its threads), in seconds.
fn cpu_s(stat_path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(stat_path).with_context(|| format!("read {stat_path}"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let f = |n: usize| fields.get(n - 3).and_then(|s| s.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((f(14).unwrap_or(0.0) + f(15).unwrap_or(0.0)) / hz)
}

/// The stat file of the agent's HTTP thread.
fn http_thread(agent: u32) -> Result<String> {
    for t in std::fs::read_dir(format!("/proc/{agent}/task"))? {
        let p = t?.path();
        if std::fs::read_to_string(p.join("comm"))?.trim() == "amm-http" {
            return Ok(p.join("stat").display().to_string());
        }
    }
    anyhow::bail!("the agent has no amm-http thread")
}

/// A live stream reader, as the page reads it; stops when `stop` is set.
fn viewer(http: &HttpListener, stop: Arc<AtomicBool>, read: bool) -> std::thread::JoinHandle<u64> {
    let (addr, auth) = (http.addr, http.auth_header());
    std::thread::spawn(move || {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return 0;
        };
        let _ = write!(s, "GET /events HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n");
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if !read {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(_) => {}
            }
        }
        got
    })
}

fn scrape(http: &HttpListener) -> Result<usize> {
    let (status, body) = http.get("/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(body.len())
}

/// The watched children and the client that registered them.
struct Fleet {
    children: Vec<Faulter>,
    client: Client,
}

fn fleet(socket: &std::path::Path, n: usize) -> Result<Fleet> {
    let mut client = Client::connect(socket, "bench-dashboard", Duration::from_secs(10))?;
    let mut children = Vec::new();
    for _ in 0..n {
        let mut c = Faulter::spawn()?;
        c.cmd("free")?;
        let base = amm_agent::identity::ProcInfo::read(c.pid())?.rss_bytes();
        // spill (70 %) at 90 % of a touch
        let limit = ((base + (TOUCH_MIB << 20) * 9 / 10) as f64 / 0.7) as u64;
        client.register(&Registration::new(c.pid(), limit))?;
        children.push(c);
    }
    Ok(Fleet { children, client })
}

impl Fleet {
    /// One accounting push per child, with its real RSS split as a worker
    /// without managed data would push it.
    fn push(&mut self) -> Result<()> {
        for c in &self.children {
            let rss = amm_agent::identity::ProcInfo::read(c.pid())?.rss_bytes();
            let split = Split {
                process: rss,
                managed: 0,
                unmanaged_live: rss / 2,
                hoarded: rss / 8,
                non_heap: rss - rss / 2 - rss / 8,
                spilled: 0,
                unmanaged_recent: 0,
            };
            self.client.send_message(&ClientMessage::Accounting {
                pid: c.pid(),
                t_ns: monotonic_ns(),
                split,
                heap: None,
            })?;
        }
        // drain events so the agent never sees us as not reading
        while self
            .client
            .next_event(Some(Duration::from_micros(1)))?
            .is_some()
        {}
        Ok(())
    }

    /// Pushes for `d` at 5 Hz.
    fn push_for(&mut self, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let t = Instant::now();
            self.push()?;
            std::thread::sleep(Duration::from_millis(200).saturating_sub(t.elapsed()));
        }
        Ok(())
    }

    /// One crossing up and one down on child `i`; the relay's latency of
    /// each, µs, measured here.
    fn crossing_pair(&mut self, i: usize) -> Result<Vec<f64>> {
        let mut out = Vec::new();
        for cmd in [format!("touch {TOUCH_MIB}"), "free".to_string()] {
            self.children[i].send(&cmd)?;
            loop {
                let e = self
                    .client
                    .next_event(Some(Duration::from_secs(10)))?
                    .context("no event within 10 s")?;
                if e.event == EventKind::Level && e.pid == self.children[i].pid() {
                    out.push(monotonic_ns().saturating_sub(e.t_ns) as f64 / 1e3);
                    break;
                }
            }
            self.children[i].wait_ok(&cmd)?;
            settle();
        }
        Ok(out)
    }
}

fn fmt(v: &mut [f64]) -> String {
    let (m, p99, max) = percentiles(v);
    format!("{m:.1} / {p99:.1} / {max:.1} (n = {})", v.len())
}

fn cpu_phase(name: &str, fleet: &mut Fleet, agent: u32, secs: u64) -> Result<()> {
    let http = http_thread(agent)?;
    let (a0, h0, t0) = (
        cpu_s(&format!("/proc/{agent}/stat"))?,
        cpu_s(&http)?,
        Instant::now(),
    );
    fleet.push_for(Duration::from_secs(secs))?;
    let wall = t0.elapsed().as_secs_f64();
    let (a1, h1) = (cpu_s(&format!("/proc/{agent}/stat"))?, cpu_s(&http)?);
    println!(
        "| {name} | {:.2} % | {:.2} % | {:.2} % |",
        100.0 * (a1 - a0) / wall,
        100.0 * (h1 - h0) / wall,
        100.0 * ((a1 - a0) - (h1 - h0)) / wall
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        amm_agent::probe::is_root(),
        "run it as root: cargo xtask bench dashboard"
    );
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");
    let (agent, http) = start_agent_http(&socket, &dir.path().join("agent.log"))?;
    let agent_pid = agent.pid();
    let mut fleet = fleet(&socket, args.workers)?;
    println!(
        "load before: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let viewers = cpu_table(&args, &mut fleet, agent_pid, &http, &stop)?;
    scrape_time(&args, &http)?;
    relay(&args, &mut fleet, &http)?;
    stop.store(true, Ordering::Relaxed);
    for v in viewers {
        let _ = v.join();
    }
    pixels(&args, &mut fleet, &http)?;
    println!(
        "load after: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    drop(agent);
    Ok(())
}

/// The agent's CPU with no viewer, with live streams, and with streams
/// and a /metrics scrape every second. The streams stay open (until
/// `stop`): their join handles.
fn cpu_table(
    args: &Args,
    fleet: &mut Fleet,
    agent_pid: u32,
    http: &HttpListener,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<u64>>> {
    println!(
        "\n{} watched processes, each pushing a split every 200 ms; agent CPU over {} s:\n",
        args.workers, args.seconds
    );
    println!("| HTTP side | agent, all threads | its HTTP thread | the rest (relay) |");
    println!("| --- | --- | --- | --- |");
    cpu_phase("no viewer", fleet, agent_pid, args.seconds)?;
    let viewers: Vec<_> = (0..args.viewers)
        .map(|_| viewer(http, stop.clone(), true))
        .collect();
    cpu_phase(
        &format!("{} live streams", args.viewers),
        fleet,
        agent_pid,
        args.seconds,
    )?;
    let scraping = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (s, http) = (scraping.clone(), http.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let _ = scrape(&http);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    cpu_phase(
        &format!("{} live streams + /metrics every 1 s", args.viewers),
        fleet,
        agent_pid,
        args.seconds,
    )?;
    scraping.store(true, Ordering::Relaxed);
    let _ = scraper.join();
    Ok(viewers)
}

/// /metrics' size and the time to scrape it, with the streams open.
fn scrape_time(args: &Args, http: &HttpListener) -> Result<()> {
    let mut ms = Vec::new();
    let mut size = 0;
    for _ in 0..args.scrapes {
        let t = Instant::now();
        size = scrape(http)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "\n/metrics with {} watched processes and {} live streams: {} bytes; ms median / p99 / max: {}",
        args.workers,
        args.viewers,
        size,
        fmt(&mut ms)
    );
    Ok(())
}

/// The relay's latency, quiet against under HTTP load.
fn relay(args: &Args, fleet: &mut Fleet, http: &HttpListener) -> Result<()> {
    let (mut quiet, mut loaded) = (Vec::new(), Vec::new());
    for block in 0..4 {
        let load = block % 2 == 1;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut idle = Vec::new();
        if load {
            // a stream that never reads, idle connections, a scrape loop
            threads.push(viewer(http, stop.clone(), false));
            for _ in 0..16 {
                if let Ok(s) = TcpStream::connect(http.addr) {
                    idle.push(s);
                }
            }
            let (s, http) = (stop.clone(), http.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0;
                while !s.load(Ordering::Relaxed) {
                    let _ = scrape(&http);
                    n += 1;
                }
                n
            }));
        }
        for _ in 0..args.relay_trials {
            let v = fleet.crossing_pair(0)?;
            if load { &mut loaded } else { &mut quiet }.extend(v);
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
        drop(idle);
    }
    println!("\nRelay latency, kernel -> this client over the socket, µs median / p99 / max:");
    println!("| HTTP side | latency |");
    println!("| --- | --- |");
    println!(
        "| quiet ({} live streams) | {} |",
        args.viewers,
        fmt(&mut quiet)
    );
    println!(
        "| + a scrape loop, a stream that never reads, 16 idle connections | {} |",
        fmt(&mut loaded)
    );
    Ok(())
}

/// Kernel → pixel, read from the page.
fn pixels(args: &Args, fleet: &mut Fleet, http: &HttpListener) -> Result<()> {
    let b = Browser::start(1400, 900)?;
    b.goto(&http.login_url("/"))?;
    b.wait_for(
        "the live stream",
        "return window.ammLive && window.ammLive.frames > 2;",
        Duration::from_secs(60),
    )?;
    let pid = fleet.children[1].pid();
    let mut ms = Vec::new();
    for _ in 0..args.pixel_trials {
        let before = b
            .eval("return Math.max(0, ...[...document.querySelectorAll('#feed li')].map(li => Number(li.dataset.seq)));")?
            .as_f64()
            .unwrap_or(0.0);
        fleet.crossing_pair(1)?;
        let got = b.wait_for(
            "the crossing, painted",
            &format!(
                "const d = [...document.querySelectorAll('#feed li[data-pixel-ms]')]
                   .filter(li => li.dataset.pid === '{pid}' && Number(li.dataset.seq) > {before}
                                 && li.dataset.kind === 'level')
                   .map(li => Number(li.dataset.pixelMs));
                 return d.length >= 2 ? d : null;"
            ),
            Duration::from_secs(20),
        )?;
        for v in got.as_array().into_iter().flatten() {
            ms.push(v.as_f64().unwrap_or(f64::NAN));
        }
    }
    println!(
        "\nKernel event -> pixel (socket delivery; the page's data-pixel-ms), ms median / p99 / max: {}",
        fmt(&mut ms)
    );
    Ok(())
}
