//! What the probe costs a page-fault-heavy process: touch fresh anonymous
//! pages, release them with MADV_DONTNEED, repeat, with the probe detached,
//! attached (process unwatched), attached and watching this process; and,
//! for comparison, the same filter on a per-fault BTF hook (what counting
//! faults on exceptions:page_fault_user would add) and on the classic
//! tracepoints.
//!
//! Modes are interleaved round by round (order rotated each round) after a
//! warm-up, and each mode's cost is reported as the median over rounds of
//! its time divided by the same round's detached time: drift of the VM
//! cancels out. Run as root: `cargo xtask bench overhead`.

use std::time::Instant;

use amm_agent::probe::Probe;
use amm_benches::{Region, percentiles, pin_to_cpu, target_dir};
use amm_ebpf::WatchConfig;
use anyhow::{Context, Result, bail};
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::programs::trace_point::TracePointLinkId;
use aya::programs::{BtfTracePoint, TracePoint};
use clap::Parser;

/// Probe overhead on a page-fault loop.
#[derive(Parser)]
struct Args {
    /// Size of the region touched and released each iteration, MiB.
    #[arg(long, default_value_t = 64)]
    region_mib: usize,
    /// Iterations per mode per round.
    #[arg(long, default_value_t = 4)]
    iters: usize,
    /// Rounds (each runs every mode once).
    #[arg(long, default_value_t = 40)]
    rounds: usize,
    /// Warm-up iterations before measuring.
    #[arg(long, default_value_t = 30)]
    warmup: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Detached,
    EmptyProgram,
    Unwatched,
    Watched,
    UnwatchedWithFaultHook,
    Classic,
}

impl Mode {
    const ALL: [Mode; 6] = [
        Mode::Detached,
        Mode::EmptyProgram,
        Mode::Unwatched,
        Mode::Watched,
        Mode::UnwatchedWithFaultHook,
        Mode::Classic,
    ];

    fn label(self) -> &'static str {
        match self {
            Mode::Detached => "probe detached",
            Mode::EmptyProgram => "an empty tp_btf program on rss_stat (the floor)",
            Mode::Unwatched => {
                "probe attached (tp_btf rss_stat + sched_process_exit), process unwatched"
            }
            Mode::Watched => "probe attached, process watched",
            Mode::UnwatchedWithFaultHook => {
                "probe + a tp_btf page_fault_user hook (not used by amm), unwatched"
            }
            Mode::Classic => {
                "classic tracepoints rss_stat + page_fault_user (same filter), unwatched"
            }
        }
    }
}

/// The benchmark-only programs of bench.bpf.o.
struct Others {
    ebpf: aya::Ebpf,
    classic: Vec<TracePointLinkId>,
    fault_hook: Option<BtfTracePointLinkId>,
    empty: Option<BtfTracePointLinkId>,
}

fn ensure_tracefs() -> Result<()> {
    if std::path::Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .context("cannot run mount")?;
    if !status.success() {
        bail!("classic tracepoints need tracefs at /sys/kernel/tracing and mounting it failed");
    }
    Ok(())
}

impl Others {
    fn load() -> Result<Self> {
        ensure_tracefs()?;
        let path = target_dir().join("bpf/bench.bpf.o");
        let btf = aya::Btf::from_sys_fs()?;
        let mut ebpf = aya::Ebpf::load_file(&path)
            .with_context(|| format!("load {} (cargo xtask build-ebpf)", path.display()))?;
        for name in CLASSIC.map(|(n, _, _)| n) {
            let p: &mut TracePoint = ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()?;
            p.load()?;
        }
        for (name, tp) in [
            ("btf_page_fault_user", "page_fault_user"),
            ("btf_rss_stat_empty", "rss_stat"),
        ] {
            let p: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()?;
            p.load(tp, &btf)?;
        }
        Ok(Self {
            ebpf,
            classic: Vec::new(),
            fault_hook: None,
            empty: None,
        })
    }

    fn attach_classic(&mut self) -> Result<()> {
        for (name, cat, ev) in CLASSIC {
            let p: &mut TracePoint = self
                .ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()?;
            self.classic.push(p.attach(cat, ev)?);
        }
        Ok(())
    }

    fn attach_btf(&mut self, name: &str) -> Result<BtfTracePointLinkId> {
        let p: &mut BtfTracePoint = self
            .ebpf
            .program_mut(name)
            .context("program missing")?
            .try_into()?;
        Ok(p.attach()?)
    }

    fn detach_btf(&mut self, name: &str, link: Option<BtfTracePointLinkId>) -> Result<()> {
        if let Some(link) = link {
            let p: &mut BtfTracePoint = self
                .ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()?;
            p.detach(link)?;
        }
        Ok(())
    }

    fn detach(&mut self) -> Result<()> {
        for (link, (name, _, _)) in std::mem::take(&mut self.classic).into_iter().zip(CLASSIC) {
            let p: &mut TracePoint = self
                .ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()?;
            p.detach(link)?;
        }
        let (hook, empty) = (self.fault_hook.take(), self.empty.take());
        self.detach_btf("btf_page_fault_user", hook)?;
        self.detach_btf("btf_rss_stat_empty", empty)
    }
}

const CLASSIC: [(&str, &str, &str); 2] = [
    ("classic_rss_stat", "kmem", "rss_stat"),
    ("classic_page_fault_user", "exceptions", "page_fault_user"),
];

fn set_mode(mode: Mode, probe: &mut Probe, others: &mut Others, me: u32) -> Result<()> {
    match mode {
        Mode::Detached => {}
        Mode::EmptyProgram => others.empty = Some(others.attach_btf("btf_rss_stat_empty")?),
        Mode::Unwatched => probe.attach()?,
        Mode::UnwatchedWithFaultHook => {
            probe.attach()?;
            others.fault_hook = Some(others.attach_btf("btf_page_fault_user")?);
        }
        Mode::Watched => {
            probe.attach()?;
            probe.watch(
                me,
                WatchConfig {
                    limit_bytes: u64::MAX,
                    rearm_bytes: 0,
                    spill_bytes: amm_ebpf::DISABLED,
                    pause_bytes: amm_ebpf::DISABLED,
                    terminate_bytes: amm_ebpf::DISABLED,
                    spike_horizon_ns: 0,
                    flags: 0,
                    signal: 0,
                    born_before_ns: amm_agent::identity::pin(me)?.born_before_ns,
                    ..WatchConfig::default()
                },
            )?;
        }
        Mode::Classic => others.attach_classic()?,
    }
    Ok(())
}

fn clear_mode(mode: Mode, probe: &mut Probe, others: &mut Others, me: u32) -> Result<()> {
    if mode == Mode::Watched {
        probe.unwatch(me)?;
    }
    probe.detach()?;
    others.detach()
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !amm_agent::probe::is_root() {
        bail!("the overhead benchmark loads BPF: run it as root");
    }
    pin_to_cpu(1);
    let me = std::process::id();
    let mut probe = Probe::load_detached(Some(&target_dir().join("bpf/amm.bpf.o")))?;
    let mut others = Others::load()?;
    let region = Region::new(args.region_mib << 20)?;
    let pages = region.pages() as f64;
    let run = |n: usize| {
        let t = Instant::now();
        for _ in 0..n {
            region.touch();
            region.release();
        }
        t.elapsed().as_nanos() as f64 / (n as f64 * pages)
    };
    run(args.warmup);

    let mut per_mode: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    for round in 0..args.rounds {
        let mut this_round = [0.0f64; Mode::ALL.len()];
        for k in 0..Mode::ALL.len() {
            let i = (k + round) % Mode::ALL.len();
            let mode = Mode::ALL[i];
            set_mode(mode, &mut probe, &mut others, me)?;
            this_round[i] = run(args.iters);
            clear_mode(mode, &mut probe, &mut others, me)?;
        }
        for i in 0..Mode::ALL.len() {
            per_mode[i].push(this_round[i]);
            ratios[i].push(this_round[i] / this_round[0]);
        }
    }
    let state = probe.stats()?;
    println!(
        "page-fault loop: {} MiB region, {} rounds x {} iterations per mode, warm-up {}; kernel {}",
        args.region_mib,
        args.rounds,
        args.iters,
        args.warmup,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!();
    println!(
        "| mode | ns/page (median) | cost vs detached (median of per-round ratios) | p90 of ratios |"
    );
    println!("| --- | --- | --- | --- |");
    for (i, mode) in Mode::ALL.iter().enumerate() {
        let (ns, _, _) = percentiles(&mut per_mode[i]);
        let mut r = ratios[i].clone();
        r.sort_by(f64::total_cmp);
        let p90 = r[((r.len() - 1) as f64 * 0.9).round() as usize];
        let (med, _, _) = percentiles(&mut ratios[i]);
        println!(
            "| {} | {:.1} | {:+.1} % | {:+.1} % |",
            mode.label(),
            ns,
            (med - 1.0) * 100.0,
            (p90 - 1.0) * 100.0
        );
    }
    println!();
    println!("(probe events emitted during the run: {})", state.events);
    Ok(())
}
