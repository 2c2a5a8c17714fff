//! How a run's processes ended when something ended them: the kernel at
//! the terminate page, the OOM killer, a signal from another process, or
//! the worker's own terminate. Such a run is reported as killed — at what
//! level, by whom — never as memory that "went back to the kernel".

use amm_timeline::{Event, Exit, Killer, Level};

use crate::input::Run;
use crate::report::Killed;

/// Every kill in the run, in time order.
pub(super) fn kills(run: &Run) -> Vec<Killed> {
    let mut out: Vec<Killed> = Vec::new();
    // the kernel signalled at the terminate page (a kernel-only timeline's
    // exit does not say who ended it; the level crossing does)
    let mut signalled: Option<(u32, u64)> = None;
    // the attempt amm's own terminate ended (its exit is that kill)
    let mut terminated: Option<u32> = None;
    // (attempt, file system) when the attempt spilled into tmpfs or ramfs
    let mut spill_in_memory: Option<(u32, &str)> = None;
    for e in &run.events {
        match &e.item {
            Event::Start(s) => {
                spill_in_memory = s.spill_in_memory.as_deref().map(|fs| (e.attempt, fs));
            }
            Event::Level(l) if l.signalled && l.to == Level::Terminate => {
                signalled = Some((e.attempt, l.rss));
            }
            Event::Terminate(x) => {
                terminated = Some(e.attempt);
                out.push(Killed {
                    attempt: e.attempt,
                    t_s: e.t,
                    signal: x.signal,
                    by: match x.signal {
                        // amm-worker -- CMD: the nanny polled the program
                        Some(_) => "amm-worker's nanny (terminate)".into(),
                        None => "amm-worker's own monitor (terminate)".into(),
                    },
                    level: Some(Level::Terminate.name().into()),
                    rss_bytes: Some(x.process),
                    peak_rss_bytes: None,
                    limit_fraction: fraction(x.process, run.limit),
                    cause: None,
                })
            }
            Event::Exit(x) if terminated == Some(e.attempt) => {
                // the terminate is already counted: the exit adds its peak
                if let Some(k) = out.last_mut().filter(|k| k.attempt == e.attempt) {
                    k.peak_rss_bytes = k.peak_rss_bytes.or(x.peak_rss_bytes);
                }
            }
            Event::Exit(x) => {
                let at_page = signalled.filter(|s| s.0 == e.attempt).map(|s| s.1);
                let mut kill = of_exit(x, at_page, e.attempt, e.t, run.limit);
                if let (Some(k), Some((_, fs))) =
                    (kill.as_mut(), spill_in_memory.filter(|s| s.0 == e.attempt))
                    && matches!(x.by, Some(Killer::OomKill { .. }))
                {
                    k.cause = Some(spilled_into_memory(fs));
                }
                out.extend(kill);
            }
            _ => {}
        }
    }
    out
}

/// The kill an exit records, if it was one.
fn of_exit(
    x: &Exit,
    at_page: Option<u64>,
    attempt: u32,
    t: f64,
    limit: Option<u64>,
) -> Option<Killed> {
    let by = match (&x.by, x.signal, at_page) {
        (Some(Killer::KernelTerminate), _, _) | (None, _, Some(_)) => {
            "the kernel at the terminate page (amm-agent's BPF program)".to_string()
        }
        (Some(Killer::OomKill { scope }), _, _) => match scope {
            Some(s) => format!("the kernel's OOM killer ({s})"),
            None => "the kernel's OOM killer".to_string(),
        },
        (Some(Killer::Process { pid, comm }), _, _) => match (comm, pid) {
            (Some(c), Some(p)) => format!("{c} (pid {p})"),
            (Some(c), None) => c.clone(),
            (None, Some(p)) => format!("pid {p}"),
            (None, None) => "another process".to_string(),
        },
        (Some(Killer::Supervisor), _, _) if x.level == Some(Level::Terminate) => {
            "its supervisor at the terminate level".to_string()
        }
        (Some(Killer::Supervisor), _, _) => return None,
        (Some(Killer::Unknown), Some(_), _) | (None, Some(_), None) => {
            "a sender nobody could name".to_string()
        }
        (Some(Killer::Unknown), None, _) | (None, None, None) => return None,
    };
    let rss = x.rss_bytes.or(at_page);
    let level = x
        .level
        .or(at_page.map(|_| Level::Terminate))
        .map(|l| l.name().to_string());
    Some(Killed {
        attempt,
        t_s: t,
        signal: x.signal.or(at_page.map(|_| SIGKILL)),
        by,
        level,
        rss_bytes: rss,
        peak_rss_bytes: x.peak_rss_bytes,
        limit_fraction: rss.and_then(|r| fraction(r, limit)),
        cause: None,
    })
}

/// Why an OOM killer found a worker whose spill directory was on `fs`.
fn spilled_into_memory(fs: &str) -> String {
    format!(
        "its spill directory was on {fs}, which is memory: what it spilled stayed in RAM, \
         charged to its own cgroup, so spilling freed nothing the limit counts; give \
         --local-directory on a disk"
    )
}

/// Linux's SIGKILL, what the kernel's terminate sends by default.
const SIGKILL: i32 = 9;

fn fraction(rss: u64, limit: Option<u64>) -> Option<f64> {
    limit.filter(|&l| l > 0).map(|l| rss as f64 / l as f64)
}
