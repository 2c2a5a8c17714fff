//! The [`Run`] of a process's timeline at amm-agent: the accounting split a
//! worker pushes each tick, the allocator's statistics and purges when the
//! worker sends them (the Dask plugin does), and the kernel's level, spike
//! and exit samples (`amm-worker report --agent`, the agent's live page),
//! turned into the timeline contract's ticks and events. Without allocator
//! statistics such a report says hoard and fragmentation cannot be told
//! apart there.

use amm_protocol::{AllocatorKind, HeapSample, PurgeSample, Sample, SampleKind, WatchStatus};
use amm_timeline::{
    Allocator, Event, Exit, GlibcStats, Heap, JemallocStats, Killer, LevelCrossing, Levels,
    PeakSource, PurgeReport, Spike, Tick,
};

use crate::{Run, Source};

/// The signal the kernel's terminate sends by default (Linux's number).
const SIGKILL: i32 = 9;

/// The [`Run`] a timeline of agent samples makes.
pub fn run_of_samples(watch: &WatchStatus, samples: &[Sample]) -> Run {
    let levels = watch.thresholds.map_or_else(Levels::default, |t| {
        let on = |b: u64| (b != amm_ebpf::DISABLED).then_some(b);
        Levels {
            target: on(t.rearm),
            spill: on(t.spill),
            pause: on(t.pause),
            terminate: on(t.terminate),
        }
    });
    let mut run = Run::new(Source::AgentTimeline, Some(watch.limit_bytes), levels);
    let t0 = samples.iter().map(|s| s.t_ns).min().unwrap_or(0);
    let mut killed_at: Option<u64> = None;
    let mut agent_signal: Option<i32> = None;
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by_key(|s| s.t_ns);
    for s in sorted {
        let t = s.t_ns.saturating_sub(t0) as f64 / 1e9;
        match &s.what {
            SampleKind::Accounting(x) => run.push_tick(
                t,
                Tick {
                    process: x.process,
                    split: Some(*x),
                    ..Tick::default()
                },
            ),
            SampleKind::Level {
                from,
                to,
                signalled,
                ..
            } => {
                if *signalled && *to == amm_ebpf::Level::Terminate {
                    killed_at = Some(s.rss_bytes);
                }
                run.push_event(
                    t,
                    Event::Level(LevelCrossing {
                        from: *from,
                        to: *to,
                        rss: s.rss_bytes,
                        signalled: *signalled,
                        delay_us: None,
                    }),
                )
            }
            SampleKind::Spike { .. } => run.push_event(
                t,
                Event::Spike(Spike {
                    rss: s.rss_bytes,
                    ..Spike::default()
                }),
            ),
            SampleKind::Exit { peak_rss_bytes }
            | SampleKind::Unwatched { peak_rss_bytes }
            | SampleKind::Credentials { peak_rss_bytes } => run.push_event(
                t,
                exit_of(watch.pid, *peak_rss_bytes, killed_at, agent_signal),
            ),
            // the agent signalled it at terminate (terminate by signal)
            SampleKind::AgentSignal { signal } => agent_signal = Some(*signal),
            SampleKind::Heap(h) => attach_heap(&mut run, t, h),
            SampleKind::Purge(p) => run.push_event(t, Event::Purge(purge_report(p))),
        }
    }
    if run.ticks.is_empty() {
        run.notes.push(
            "the agent holds no accounting for this process: it is not an amm-worker, or it \
             registered without pushing its split (use `amm-agent watch --report` for a \
             process amm does not run)"
                .to_string(),
        );
    }
    run
}

/// The exit event: killed by the kernel at the terminate page when the
/// agent's probe signalled there, by amm-agent when it sent a signal (its
/// terminate by signal), else an exit nobody is known to have caused.
fn exit_of(pid: u32, peak: u64, killed_at: Option<u64>, agent_signal: Option<i32>) -> Event {
    let (signal, by) = match (killed_at, agent_signal) {
        (Some(_), _) => (Some(SIGKILL), Some(Killer::KernelTerminate)),
        (None, Some(sig)) => (
            Some(sig),
            Some(Killer::Process {
                pid: None,
                comm: Some("amm-agent".into()),
            }),
        ),
        (None, None) => (None, None),
    };
    Event::Exit(Exit {
        pid,
        signal,
        level: by.is_some().then_some(amm_ebpf::Level::Terminate),
        by,
        rss_bytes: killed_at,
        peak_rss_bytes: Some(peak),
        peak_source: Some(PeakSource::Bpf),
        ..Exit::default()
    })
}

/// An allocator sample belongs to the accounting tick of the same instant.
fn attach_heap(run: &mut Run, t: f64, h: &HeapSample) {
    let Some(tick) = run.ticks.last_mut().filter(|k| k.t == t) else {
        return;
    };
    let heap = match h.allocator {
        AllocatorKind::Jemalloc => Heap::Jemalloc(JemallocStats {
            allocated: h.allocated,
            active: h.active,
            resident: h.resident,
            dirty_bytes: h.dirty,
            muzzy_bytes: h.muzzy,
            ..JemallocStats::default()
        }),
        AllocatorKind::Glibc => Heap::System(GlibcStats {
            uordblks: h.uordblks,
            fordblks: h.fordblks,
            hblkhd: h.hblkhd,
            keepcost: h.keepcost,
            ..GlibcStats::default()
        }),
    };
    run.allocator.get_or_insert(match h.allocator {
        AllocatorKind::Jemalloc => Allocator::Jemalloc,
        AllocatorKind::Glibc => Allocator::System,
    });
    tick.item.heap = Some(heap);
}

/// A purge the worker pushed, as the timeline's purge event.
fn purge_report(p: &PurgeSample) -> PurgeReport {
    PurgeReport {
        reason: p.reason.clone(),
        returned_bytes: p.returned_bytes,
        rss_before: p.rss_before,
        rss_after: p.rss_after,
        hoarded_before: p.hoarded_before,
        hoarded_after: p.hoarded_after,
        duration_us: p.duration_us,
        ..PurgeReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amm_ebpf::Level;

    const MIB: u64 = 1 << 20;

    fn watch() -> WatchStatus {
        WatchStatus {
            pid: 42,
            owner_uid: None,
            limit_bytes: 1 << 30,
            rss_bytes: 0,
            peak_rss_bytes: 0,
            level: Level::Below,
            faults: 0,
            rate_bytes_per_ms: 0,
            timeline: Vec::new(),
            timeline_len: 0,
            thresholds: None,
        }
    }

    fn accounting(t_ms: u64, unmanaged: u64) -> Sample {
        let split = amm_timeline::Split {
            process: 100 * MIB + unmanaged,
            managed: 64 * MIB,
            unmanaged_live: unmanaged,
            hoarded: 4 * MIB,
            non_heap: 32 * MIB - 4 * MIB,
            spilled: 0,
            unmanaged_recent: 0,
        };
        Sample {
            t_ns: 1_000_000_000 + t_ms * 1_000_000,
            rss_bytes: split.process,
            what: SampleKind::Accounting(split),
        }
    }

    #[test]
    fn a_leak_pushed_to_the_agent_is_a_leak_without_allocator_detail() {
        // 2 MiB/s for 10 s at 200 ms ticks, managed data steady
        let mut samples: Vec<Sample> = (0..=50)
            .map(|i| accounting(i * 200, 10 * MIB + i * 400 * 1024))
            .collect();
        samples.push(Sample {
            t_ns: 1_000_000_000 + 3_000_000_000,
            rss_bytes: 700 * MIB,
            what: SampleKind::Level {
                from: Level::Below,
                to: Level::Spill,
                foreign: false,
                signalled: false,
            },
        });
        let run = run_of_samples(&watch(), &samples);
        assert_eq!(run.ticks.len(), 51);
        assert_eq!(run.events.len(), 1);
        let report = crate::analyze(&run, &crate::Thresholds::default());
        assert_eq!(
            report.verdict.kind,
            crate::Kind::Leak,
            "{}",
            report.verdict.headline
        );
        assert!(!report.allocator.available);
    }

    #[test]
    fn allocator_samples_and_a_trim_make_a_hoard_through_the_agent() {
        // 300 MiB freed into glibc's free chunks at 2 s, trimmed at 3 s
        let mut samples = Vec::new();
        for i in 0..=40u64 {
            let hoard = if (20..30).contains(&i) { 300 * MIB } else { 0 };
            let mut a = accounting(i * 100, 10 * MIB);
            if let SampleKind::Accounting(sp) = &mut a.what {
                sp.hoarded = hoard;
                sp.process += hoard;
                a.rss_bytes = sp.process;
            }
            let heap = Sample {
                t_ns: a.t_ns,
                rss_bytes: a.rss_bytes,
                what: SampleKind::Heap(HeapSample {
                    allocator: AllocatorKind::Glibc,
                    uordblks: 74 * MIB,
                    fordblks: hoard,
                    ..HeapSample::default()
                }),
            };
            samples.push(a);
            samples.push(heap);
        }
        samples.push(Sample {
            t_ns: 1_000_000_000 + 2_950_000_000,
            rss_bytes: 100 * MIB,
            what: SampleKind::Purge(amm_protocol::PurgeSample {
                reason: "threshold".into(),
                returned_bytes: 300 * MIB,
                rss_before: 400 * MIB,
                rss_after: 100 * MIB,
                hoarded_before: 300 * MIB,
                hoarded_after: 0,
                duration_us: 900,
            }),
        });
        let run = run_of_samples(&watch(), &samples);
        assert!(run.ticks.iter().all(|t| t.heap.is_some()));
        let report = crate::analyze(&run, &crate::Thresholds::default());
        assert!(report.allocator.available);
        assert_eq!(
            report.verdict.kind,
            crate::Kind::Hoard,
            "{}",
            report.verdict.headline
        );
    }

    #[test]
    fn a_process_without_accounting_says_so() {
        let run = run_of_samples(&watch(), &[]);
        assert!(run.ticks.is_empty());
        assert!(run.notes.iter().any(|n| n.contains("no accounting")));
    }
}
