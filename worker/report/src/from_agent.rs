//! The [`Run`] of a process's timeline at amm-agent: the accounting split a
//! worker pushes each tick and the kernel's level, spike and exit samples
//! (`amm-worker report --agent`, the agent's live page). No allocator
//! statistics travel to the agent, so such a report says hoard and
//! fragmentation cannot be told apart there.

use amm_protocol::{Sample, SampleKind, WatchStatus};

use crate::{EventKind, Levels, Run, Source, Split, Tick};

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
    let mut run = Run::kernel(Some(watch.limit_bytes), levels);
    run.source = Source::AgentTimeline;
    let t0 = samples.iter().map(|s| s.t_ns).min().unwrap_or(0);
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by_key(|s| s.t_ns);
    for s in sorted {
        let t = s.t_ns.saturating_sub(t0) as f64 / 1e9;
        match &s.what {
            SampleKind::Accounting(x) => run.push_tick(Tick {
                t,
                process: x.process,
                split: Some(Split {
                    managed: x.managed,
                    unmanaged_live: x.unmanaged_live,
                    hoarded: x.hoarded,
                    non_heap: x.non_heap,
                    spilled: x.spilled,
                }),
                ..Tick::default()
            }),
            SampleKind::Level { from, to, .. } => run.push_event(
                t,
                EventKind::Level {
                    from: from.name().to_string(),
                    to: to.name().to_string(),
                    rss: s.rss_bytes,
                },
            ),
            SampleKind::Spike { .. } => run.push_event(t, EventKind::Spike { rss: s.rss_bytes }),
            SampleKind::Exit { peak_rss_bytes }
            | SampleKind::Unwatched { peak_rss_bytes }
            | SampleKind::Credentials { peak_rss_bytes } => run.push_event(
                t,
                EventKind::Exit {
                    peak: *peak_rss_bytes,
                },
            ),
            SampleKind::AgentSignal { .. } => run.push_event(t, EventKind::Terminate),
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
        let split = amm_protocol::Split {
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
    fn a_process_without_accounting_says_so() {
        let run = run_of_samples(&watch(), &[]);
        assert!(run.ticks.is_empty());
        assert!(run.notes.iter().any(|n| n.contains("no accounting")));
    }
}
