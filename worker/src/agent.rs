//! The worker's side of amm-agent: register this process, act on the
//! kernel's events between polls, push the accounting to the agent.
//!
//! The worker stays correct without the agent: when the agent is absent,
//! dies or restarts, it keeps polling, logs the outage once, and registers
//! again when the agent is back ([`amm_protocol::link`]). Events arrive on a
//! ring buffer of the worker's own (the fastest path measured, see
//! `benches/RESULTS.md`) and reach the MemoryManager through its
//! [`EventSink`]:
//!
//! | kernel event | reaction |
//! | --- | --- |
//! | up to spill | a tick now: spill down to target |
//! | up to pause | a tick now: pause (no new task), keep spilling |
//! | up to terminate | the kernel already sent the terminate signal at that page (SIGKILL by default); without one, the tick terminates |
//! | spike alarm | pause pre-emptively, look again at the predicted crossing (10 ms–1 s) |
//! | down below target | a tick now: unpause |

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use amm_ebpf::EventKind;
use amm_protocol::link::{Link, LinkConfig, LinkEvent};
use amm_protocol::sched::ReaderPolicy;
use amm_protocol::{Fractions, Registration, TerminateBy};
use amm_timeline::{AgentConnected, AgentReason, Event, LevelCrossing, Spike};

use crate::config::MemoryConfig;
use crate::memory::{Accounting, EventSink};
use crate::timeline::{Timeline, monotonic_ns};

/// What the worker saw of the agent, for its summary.
#[derive(Debug, Default)]
pub struct AgentCounters {
    /// Kernel events received.
    pub events: AtomicU64,
    /// Times the agent was (re)registered with.
    pub connects: AtomicU64,
    /// Outages reported.
    pub lost: AtomicU64,
}

/// The running link and what the manager needs from it.
pub struct AgentLink {
    link: Arc<Link>,
    sink: Arc<OnceLock<EventSink>>,
    /// Set when the workload is over: what the ticks see after it is the
    /// process tearing down, not the workload, and stays out of the agent's
    /// timeline (as it stays out of a report on the worker's own timeline).
    workload_over: Arc<std::sync::atomic::AtomicBool>,
    /// Counters for the summary.
    pub counters: Arc<AgentCounters>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink").finish_non_exhaustive()
    }
}

impl AgentLink {
    /// Starts registering this process with the agent on `socket`, with the
    /// limit and the thresholds of `cfg`.
    pub fn start(
        socket: PathBuf,
        limit: u64,
        cfg: &MemoryConfig,
        timeline: Option<Arc<Timeline>>,
    ) -> std::io::Result<AgentLink> {
        let registration = Registration {
            start_time: None,
            thresholds: Fractions {
                target: cfg.target,
                spill: cfg.spill,
                pause: cfg.pause,
                terminate: cfg.terminate,
            },
            terminate_signal: cfg
                .agent_terminate_signal
                .filter(|_| !cfg.agent_observe_only),
            terminate_by: TerminateBy::Kernel,
            ..Registration::new(std::process::id(), limit)
        };
        let sink: Arc<OnceLock<EventSink>> = Arc::new(OnceLock::new());
        let counters = Arc::new(AgentCounters::default());
        let on_event = {
            let (sink, counters) = (sink.clone(), counters.clone());
            move |e: LinkEvent| handle(e, sink.get(), &counters, timeline.as_deref())
        };
        let link = Link::spawn(
            LinkConfig {
                socket,
                registration,
                name: format!("amm-worker {}", std::process::id()),
                retry: Duration::from_millis(500),
                reader: match cfg.agent_reader_priority {
                    Some(p) => ReaderPolicy::Realtime(p),
                    None => ReaderPolicy::ShortSlice,
                },
                spin: cfg.agent_reader_spin,
            },
            on_event,
        )?;
        tracing::info!(
            "the thread reading amm-agent's events runs under {}",
            link.reader_scheduling()
        );
        Ok(AgentLink {
            link: Arc::new(link),
            sink,
            workload_over: Arc::default(),
            counters,
        })
    }

    /// Connects the events to the running manager (not when only
    /// observing: then the events are only recorded).
    pub fn attach(&self, sink: EventSink, observe_only: bool) {
        if !observe_only {
            let _ = self.sink.set(sink);
        }
    }

    /// Stops pushing accounting: the workload is over and what follows is
    /// teardown.
    pub fn workload_ended(&self) {
        self.workload_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A hook for the manager's ticks: pushes each accounting split to the
    /// agent's timeline.
    pub fn tick_hook(&self) -> crate::memory::TickHook {
        let link = self.link.clone();
        let over = self.workload_over.clone();
        Box::new(move |acc: &Accounting| {
            if over.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            link.report(monotonic_ns(), acc.split)
        })
    }
}

fn handle(
    e: LinkEvent,
    sink: Option<&EventSink>,
    counters: &AgentCounters,
    timeline: Option<&Timeline>,
) {
    match &e {
        LinkEvent::Connected { rss_bytes, .. } => {
            counters.connects.fetch_add(1, Ordering::SeqCst);
            tracing::info!(rss_bytes, "registered with amm-agent: kernel events on");
        }
        LinkEvent::Lost(reason) => {
            counters.lost.fetch_add(1, Ordering::SeqCst);
            tracing::warn!("amm-agent unavailable ({reason}); polling only until it is back");
        }
        LinkEvent::Refused(reason) => {
            tracing::warn!("amm-agent refused to watch this worker ({reason}); polling only");
        }
        LinkEvent::Event(m) => {
            counters.events.fetch_add(1, Ordering::SeqCst);
            // act first, record after
            if let Some(sink) = sink {
                match m.event {
                    EventKind::Level if m.level > m.prev_level => sink.on_level_event(m.level),
                    EventKind::Level => sink.wake(),
                    EventKind::Spike => {
                        // until the predicted crossing, then look again
                        let eta = Duration::from_nanos(m.eta_ns.unwrap_or(0));
                        sink.pause_briefly(
                            eta.clamp(Duration::from_millis(10), Duration::from_secs(1)),
                        )
                    }
                    // the watch is over: the worker polls on, as without
                    // the agent (the link reports why)
                    EventKind::Exit | EventKind::Credentials => {}
                }
            }
        }
    }
    if let Some(t) = timeline {
        record(t, &e);
    }
}

/// Writes what the link to amm-agent reported to `timeline`, in the
/// timeline contract's terms: the link's state as `agent_connected`,
/// `agent_lost`, `agent_refused`; the kernel's `level` and `spike` at the
/// kernel's time (when it happened), with the delay to this line. The end
/// of a watch is left out: the supervisor writes the exit, with its cause,
/// and a watch ended by a change of credentials is not the process's
/// business. Used by the worker and by the supervisor of `-- CMD` alike.
pub fn record(timeline: &Timeline, e: &LinkEvent) {
    let event = match e {
        LinkEvent::Connected {
            thresholds,
            rss_bytes,
        } => Event::AgentConnected(AgentConnected {
            rss: *rss_bytes,
            terminate: thresholds.terminate,
        }),
        LinkEvent::Lost(reason) => Event::AgentLost(AgentReason {
            reason: reason.clone(),
        }),
        LinkEvent::Refused(reason) => Event::AgentRefused(AgentReason {
            reason: reason.clone(),
        }),
        LinkEvent::Event(m) => {
            let delay_us = Some(monotonic_ns().saturating_sub(m.t_ns) / 1000);
            let event = match m.event {
                EventKind::Level => Event::Level(LevelCrossing {
                    from: m.prev_level,
                    to: m.level,
                    rss: m.rss_bytes,
                    signalled: m.signalled,
                    delay_us,
                }),
                EventKind::Spike => Event::Spike(Spike {
                    rss: m.rss_bytes,
                    eta_ns: m.eta_ns,
                    delay_us,
                }),
                EventKind::Exit | EventKind::Credentials => return,
            };
            timeline.event_at(m.t_ns, event);
            return;
        }
    };
    timeline.event(event);
}
