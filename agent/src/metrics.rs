//! `/metrics`: the dashboard's picture ([`Live`]) in the OpenMetrics text
//! format Prometheus scrapes, encoded by `prometheus-client`.
//!
//! Per watched process (labels `pid`, `name`, `uid`; a process's series
//! disappear when its watch ends, so cardinality is bounded by the watches):
//!
//! | metric | what |
//! | --- | --- |
//! | `amm_process_rss_bytes` | RSS at the kernel's last update |
//! | `amm_process_peak_rss_bytes` | peak RSS since the watch began, to the page |
//! | `amm_process_level` | 0 below, 1 spill, 2 pause, 3 terminate |
//! | `amm_process_limit_bytes` | the memory limit the levels refer to |
//! | `amm_process_threshold_bytes{level}` | target, spill, pause, terminate in bytes |
//! | `amm_process_level_crossings_total{to}` | kernel level events: up to spill, pause, terminate; down to below |
//! | `amm_process_spike_alarms_total` | spike alarms |
//! | `amm_process_terminate_kills_total` | kills at the terminate page |
//! | `amm_process_memory_bytes{part}` | the worker's split: managed, unmanaged_live, hoarded, non_heap (they add up to its RSS) |
//! | `amm_process_heap_live_bytes` | managed + unmanaged_live |
//! | `amm_process_spilled_bytes` | managed bytes on disk |
//!
//! The split is there only for workers that push it (amm-worker, the Dask
//! plugin). Agent-wide: `amm_agent_watches`, `amm_agent_clients`,
//! `amm_agent_probe_attached`, `amm_agent_kernel_events_total`,
//! `amm_agent_ring_buffer_dropped_events_total`,
//! `amm_agent_event_latency_seconds{stage,delivery}`,
//! `amm_agent_dashboard_dropped_observations_total`,
//! `amm_agent_http_connections`, `amm_agent_http_refused_connections_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::live::Live;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The labels of a process's series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Proc {
    pid: u32,
    name: String,
    uid: u32,
}

/// A process's series with one more label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcLevel {
    pid: u32,
    name: String,
    uid: u32,
    level: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcTo {
    pid: u32,
    name: String,
    uid: u32,
    to: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcPart {
    pid: u32,
    name: String,
    uid: u32,
    part: &'static str,
}

type Gauges<L> = Family<L, Gauge>;
type Counters<L> = Family<L, Counter>;

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The per-process families, filled from the rows.
#[derive(Default)]
struct ProcessFamilies {
    rss: Gauges<Proc>,
    peak: Gauges<Proc>,
    level: Gauges<Proc>,
    limit: Gauges<Proc>,
    threshold: Gauges<ProcLevel>,
    crossings: Counters<ProcTo>,
    spikes: Counters<Proc>,
    kills: Counters<Proc>,
    memory: Gauges<ProcPart>,
    heap_live: Gauges<Proc>,
    spilled: Gauges<Proc>,
}

impl ProcessFamilies {
    fn fill(&self, live: &Live) {
        for row in live.rows() {
            let p = Proc {
                pid: row.pid,
                name: row.name.clone(),
                uid: row.uid,
            };
            self.rss.get_or_create(&p).set(gauge_value(row.rss));
            self.peak.get_or_create(&p).set(gauge_value(row.peak));
            self.level.get_or_create(&p).set(i64::from(row.level.raw()));
            self.limit.get_or_create(&p).set(gauge_value(row.limit));
            let l = &row.levels;
            for (level, v) in [
                ("target", l.target),
                ("spill", l.spill),
                ("pause", l.pause),
                ("terminate", l.terminate),
            ] {
                if let Some(v) = v {
                    let k = ProcLevel {
                        pid: p.pid,
                        name: p.name.clone(),
                        uid: p.uid,
                        level,
                    };
                    self.threshold.get_or_create(&k).set(gauge_value(v));
                }
            }
            let c = &row.counts;
            for (to, n) in [
                ("spill", c.spill),
                ("pause", c.pause),
                ("terminate", c.terminate),
                ("below", c.below),
            ] {
                let k = ProcTo {
                    pid: p.pid,
                    name: p.name.clone(),
                    uid: p.uid,
                    to,
                };
                self.crossings.get_or_create(&k).inc_by(n);
            }
            self.spikes.get_or_create(&p).inc_by(c.spikes);
            self.kills.get_or_create(&p).inc_by(c.kills);
            if let Some(s) = &row.split {
                for (part, v) in [
                    ("managed", s.managed),
                    ("unmanaged_live", s.unmanaged_live),
                    ("hoarded", s.hoarded),
                    ("non_heap", s.non_heap),
                ] {
                    let k = ProcPart {
                        pid: p.pid,
                        name: p.name.clone(),
                        uid: p.uid,
                        part,
                    };
                    self.memory.get_or_create(&k).set(gauge_value(v));
                }
                self.heap_live
                    .get_or_create(&p)
                    .set(gauge_value(s.heap_live));
                self.spilled.get_or_create(&p).set(gauge_value(s.spilled));
            }
        }
    }

    fn register(self, r: &mut Registry) {
        let b = Unit::Bytes;
        r.register_with_unit(
            "amm_process_rss",
            "RSS of the watched process at the kernel's last update",
            b.clone(),
            self.rss,
        );
        r.register_with_unit(
            "amm_process_peak_rss",
            "Peak RSS since the watch began, exact to the page",
            b.clone(),
            self.peak,
        );
        r.register(
            "amm_process_level",
            "Memory level now: 0 below, 1 spill, 2 pause, 3 terminate",
            self.level,
        );
        r.register_with_unit(
            "amm_process_limit",
            "The memory limit the levels are fractions of",
            b.clone(),
            self.limit,
        );
        r.register_with_unit(
            "amm_process_threshold",
            "A level in bytes (target re-arms, spill, pause, terminate)",
            b.clone(),
            self.threshold,
        );
        r.register(
            "amm_process_level_crossings",
            "Kernel level events: up to spill, pause or terminate, or down below the target",
            self.crossings,
        );
        r.register(
            "amm_process_spike_alarms",
            "Spike alarms: terminate predicted within the horizon",
            self.spikes,
        );
        r.register(
            "amm_process_terminate_kills",
            "Kills at the page that crossed terminate",
            self.kills,
        );
        r.register_with_unit(
            "amm_process_memory",
            "The worker's accounting split of its RSS (managed + unmanaged_live + hoarded + non_heap)",
            b.clone(),
            self.memory,
        );
        r.register_with_unit(
            "amm_process_heap_live",
            "Live heap bytes (managed + unmanaged_live) the worker's allocator counts",
            b.clone(),
            self.heap_live,
        );
        r.register_with_unit(
            "amm_process_spilled",
            "Managed bytes the worker holds on disk",
            b,
            self.spilled,
        );
    }
}

fn agent_metrics(live: &Live, r: &mut Registry) {
    let a = live.agent();
    let gauge = |v: u64| {
        let g: Gauge = Gauge::default();
        g.set(gauge_value(v));
        g
    };
    let counter = |v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        c
    };
    r.register(
        "amm_agent_watches",
        "Processes watched now",
        gauge(a.watches as u64),
    );
    r.register(
        "amm_agent_clients",
        "Clients connected to the socket",
        gauge(a.clients as u64),
    );
    r.register(
        "amm_agent_probe_attached",
        "1 while the BPF programs are attached (they are while anything is watched)",
        gauge(u64::from(a.attached)),
    );
    r.register(
        "amm_agent_kernel_events",
        "Events the BPF program submitted since it was loaded",
        counter(a.kernel_events),
    );
    r.register(
        "amm_agent_ring_buffer_dropped_events",
        "Events lost to a full ring buffer",
        counter(a.ring_dropped),
    );
    r.register_with_unit(
        "amm_agent_event_latency",
        "From the kernel's stamp of an event to the agent reading it (stage=read) and writing it to the client's socket (stage=sent)",
        Unit::Seconds,
        live.latency.clone(),
    );
    r.register(
        "amm_agent_dashboard_dropped_observations",
        "Observations the dashboard lost because its channel was full",
        counter(a.observations_dropped),
    );
    r.register(
        "amm_agent_http_connections",
        "HTTP connections open now",
        gauge(a.http_connections as u64),
    );
    r.register(
        "amm_agent_http_refused_connections",
        "HTTP connections refused because the cap was reached",
        counter(a.http_refused),
    );
}

/// The exposition of `live`.
pub fn encode(live: &Live) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    let families = ProcessFamilies::default();
    families.fill(live);
    families.register(&mut r);
    agent_metrics(live, &mut r);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{Ending, Observation};

    #[test]
    fn a_watch_has_series_until_it_ends() {
        let mut live = Live::new();
        let thresholds = amm_protocol::Fractions::default()
            .to_bytes(1 << 30)
            .expect("valid");
        live.apply(Observation::Watched {
            pid: 42,
            uid: 1000,
            start_time: 0,
            thresholds,
            direct: true,
            rss_bytes: 5 << 20,
            t_ns: 1,
        });
        live.apply(Observation::Accounting {
            pid: 42,
            t_ns: 2,
            split: amm_protocol::Split {
                process: 100,
                managed: 40,
                unmanaged_live: 30,
                hoarded: 20,
                non_heap: 10,
                spilled: 7,
                unmanaged_recent: 0,
            },
        });
        let text = encode(&live).expect("encodes");
        for line in [
            r#"amm_process_rss_bytes{pid="42",name="?",uid="1000"} 5242880"#,
            r#"amm_process_limit_bytes{pid="42",name="?",uid="1000"} 1073741824"#,
            r#"amm_process_memory_bytes{pid="42",name="?",uid="1000",part="hoarded"} 20"#,
            r#"amm_process_heap_live_bytes{pid="42",name="?",uid="1000"} 70"#,
            r#"amm_process_spilled_bytes{pid="42",name="?",uid="1000"} 7"#,
            r#"amm_process_level_crossings_total{pid="42",name="?",uid="1000",to="spill"} 0"#,
            "amm_agent_watches 1",
            "# TYPE amm_agent_event_latency_seconds histogram",
            "# EOF",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        live.apply(Observation::Ended {
            pid: 42,
            how: Ending::Unwatched,
            t_ns: 3,
        });
        let text = encode(&live).expect("encodes");
        assert!(!text.contains(r#"pid="42""#), "{text}");
        assert!(text.contains("amm_agent_watches 0"), "{text}");
    }
}
