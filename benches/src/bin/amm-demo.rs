//! amm's end-to-end demo (`sudo cargo xtask demo`): start the real agent,
//! register a child that allocates past its limit at full speed, and show
//! what the kernel reported at each page against what a 100 ms and a 200 ms
//! poller (Dask's monitor) would have seen.

use std::time::{Duration, Instant};

use amm_benches::{Faulter, monotonic_ns, profile_dir, target_dir};
use amm_ebpf::EventKind;
use amm_protocol::{Client, EventMessage, Registration};
use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use clap::Parser;

/// The demo.
#[derive(Parser)]
struct Args {
    /// The child's memory limit, MiB.
    #[arg(long, default_value_t = 1024)]
    limit_mib: u64,
    /// How much it allocates, MiB.
    #[arg(long, default_value_t = 1200)]
    alloc_mib: u64,
}

fn iec(b: u64) -> String {
    ByteSize(b).display().iec().to_string()
}

fn rss_of(pid: u32) -> u64 {
    amm_agent::identity::proc_info(pid).map_or(0, |i| i.rss_bytes)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !amm_agent::probe::is_root() {
        bail!("the demo starts amm-agent, which loads BPF: run it as root (sudo cargo xtask demo)");
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");
    let mut agent = std::process::Command::new(profile_dir().join("amm-agent"))
        .arg("run")
        .arg("--socket")
        .arg(&socket)
        .arg("--bpf-object")
        .arg(target_dir().join("bpf/amm.bpf.o"))
        .env("AMM_LOG", "warn")
        .spawn()
        .context("start amm-agent")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        if let Ok(c) = Client::connect(&socket, "amm-demo", Duration::from_secs(10)) {
            break c;
        }
        if Instant::now() > deadline {
            bail!("amm-agent did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut child = Faulter::spawn()?;
    child.cmd("free")?;
    let limit = args.limit_mib << 20;
    let reg = client.register(&Registration::new(child.pid(), limit))?;
    let t = reg.thresholds;

    println!(
        "amm demo: pid {} allocates {} at full speed; its limit is {} (spill {}, pause {}, terminate {})",
        child.pid(),
        iec(args.alloc_mib << 20),
        iec(limit),
        iec(t.spill),
        iec(t.pause),
        iec(t.terminate)
    );
    // /proc sampled every 5 ms: from it, what a 100 ms or 200 ms poller
    // (Dask's monitor) would have seen, for every phase of its clock
    let pid = child.pid();
    let start_ns = monotonic_ns();
    let poller = std::thread::spawn(move || {
        let mut samples = Vec::new();
        let t0 = Instant::now();
        for k in 1..=800u32 {
            let at = t0 + Duration::from_millis(5) * k;
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            samples.push((k * 5, rss_of(pid)));
        }
        samples
    });
    child.send(&format!("touch {}", args.alloc_mib))?;
    let mut events: Vec<(EventMessage, u64)> = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        match client.next_event(Some(Duration::from_millis(100)))? {
            Some(e) => {
                let got = monotonic_ns();
                let done = e.event == EventKind::Level && e.level == amm_ebpf::Level::Terminate;
                events.push((e, got));
                if done {
                    break;
                }
            }
            None => continue,
        }
    }
    child.wait_ok("touch")?;
    let samples = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))?;
    let peak = client
        .status()?
        .watches
        .first()
        .map_or(0, |w| w.peak_rss_bytes);

    println!();
    println!(
        "what the kernel reported, at the page that crossed (time from the start of the allocation):"
    );
    for (e, got) in &events {
        let t_ms = e.t_ns.saturating_sub(start_ns) as f64 / 1e6;
        let relay_us = got.saturating_sub(e.t_ns) as f64 / 1e3;
        let what = match e.event {
            EventKind::Spike => format!(
                "spike alarm: terminate predicted in {:.0} ms at {}/s",
                e.eta_ns.unwrap_or(0) as f64 / 1e6,
                iec(e.rate_bytes_per_ms.max(0) as u64 * 1000)
            ),
            _ => format!("{} -> {}", e.prev_level, e.level),
        };
        println!(
            "  {t_ms:>8.1} ms  {what:<52} rss {:>10} ({:>5.1} %)   in the client {relay_us:.0} µs later",
            iec(e.rss_bytes),
            100.0 * e.rss_bytes as f64 / limit as f64
        );
    }
    let crossed = events
        .iter()
        .find(|(e, _)| e.event == EventKind::Level && e.level == amm_ebpf::Level::Terminate);
    println!();
    println!("what a poller of /proc would have seen (over every phase of its clock):");
    let crossed_ms = crossed.map(|(e, _)| e.t_ns.saturating_sub(start_ns) as f64 / 1e6);
    for every in [100u32, 200] {
        let mut seen: Vec<(u32, u64)> = (0..every)
            .step_by(5)
            .filter_map(|phase| {
                samples
                    .iter()
                    .filter(|(ms, _)| ms % every == phase)
                    .find(|(_, rss)| *rss >= t.terminate)
                    .copied()
            })
            .collect();
        seen.sort_by_key(|(ms, _)| *ms);
        let (Some(first), Some(last)) = (seen.first(), seen.last()) else {
            println!("  every {every} ms: never saw terminate");
            continue;
        };
        let (med_ms, med_rss) = seen[seen.len() / 2];
        let late = |ms: u32| {
            crossed_ms.map_or(String::new(), |c| {
                format!(" ({:.0} ms late)", f64::from(ms) - c)
            })
        };
        println!(
            "  every {every} ms: saw terminate at {}..{} ms (median {med_ms}{}); rss then up to {} ({:.1} % of the limit), median {}",
            first.0,
            last.0,
            late(med_ms),
            iec(seen.iter().map(|x| x.1).max().unwrap_or(0)),
            100.0 * seen.iter().map(|x| x.1).max().unwrap_or(0) as f64 / limit as f64,
            iec(med_rss),
        );
    }
    println!();
    println!(
        "peak rss {} ({:.1} % of the limit). Under a hard limit, everything past 100 % is an OOM kill;\n\
         the kernel's events arrive at the crossing, while the poll is still up to one interval away.",
        iec(peak),
        100.0 * peak as f64 / limit as f64
    );
    drop(child);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    let _ = agent.wait();
    Ok(())
}
