//! `amm-agent watch`: load the probe, watch existing processes (a Python
//! Dask worker, say) and print what the kernel saw between polls. It takes
//! no action on them. What it watches ([`members`]): one pid, the children
//! of a nanny across restarts (`--follow`), or every process of a cgroup
//! (`--cgroup`). `--limit auto` takes each process's limit from its memory
//! cgroup ([`limit`]); each end says how the process ended and who ended
//! it, with the kernel's exact peak ([`ending`]). With `--report PATH` it
//! also writes the leak-vs-hoard report from kernel data alone
//! (`kernel_report`).

pub mod ending;
pub mod limit;
pub mod members;
mod print;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use amm_ebpf::EventKind;
use amm_protocol::{EventMessage, Fractions, ThresholdBytes};
use amm_record::Notice;
use anyhow::{Context, Result, bail};

use crate::clock::monotonic_ns;
use crate::identity;
use crate::kernel_report::KernelRecorder;
use crate::probe::{EventReader, Probe};

pub use ending::Ending;
pub use limit::LimitArg;
pub use members::Scope;
use members::{Finder, Member};
use print::Printer;

/// What to watch and how to print it.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The process(es).
    pub scope: Scope,
    /// Their memory limit: a size, or `auto` (each one's cgroup's).
    pub limit: LimitArg,
    /// Level fractions (default 0.6 / 0.7 / 0.8 / 0.95).
    pub fractions: Fractions,
    /// Spike horizon (zero: no spike alarm).
    pub spike_horizon: Duration,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// BPF object to load instead of the default.
    pub object: Option<PathBuf>,
    /// Write the leak-vs-hoard report from kernel data here when the
    /// watch ends (or is interrupted); see `kernel_report`. With
    /// `--follow` one report covers every child (each one an attempt);
    /// with `--cgroup` each process gets its own, `-PID` before the
    /// extension.
    pub report: Option<PathBuf>,
    /// amm-agent's socket, asked whether it had the kernel kill a process
    /// at the terminate page (skipped when nothing is there).
    pub agent: Option<PathBuf>,
}

/// Set by SIGINT/SIGTERM while a watch runs, so it ends cleanly and its
/// reports are still written.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// What the watch saw.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchOutcome {
    /// Every event, in order.
    pub events: Vec<EventMessage>,
    /// How each process ended, in order (none for a process still running
    /// when the watch was interrupted).
    pub endings: Vec<Ending>,
}

/// Watches until the scope is over (the process exited; the followed
/// parent and its children exited; the cgroup was removed) or SIGINT/
/// SIGTERM, printing each event to `out`; with [`WatchOptions::report`],
/// also samples RSS and writes the reports.
pub fn watch(opts: &WatchOptions, out: &mut dyn Write) -> Result<WatchOutcome> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal(sig, SigHandler::Handler(on_signal)) }
            .with_context(|| format!("cannot handle {sig}"))?;
    }
    let finder = Finder::new(opts.scope.clone(), members::caller_uid())?;
    let mut probe = Probe::load(opts.object.as_deref())?;
    let reader = probe
        .take_events()
        .context("the probe's ring buffer was already taken")?;
    let start = monotonic_ns();
    let mut session = Session {
        opts,
        finder,
        probe,
        printer: Printer::new(start, opts.json),
        start,
        watched: BTreeMap::new(),
        shared: None,
        outcome: WatchOutcome {
            events: Vec::new(),
            endings: Vec::new(),
        },
    };
    session.printer.scope(session.finder.scope(), out)?;
    session.run(reader, out)?;
    session.close()
}

/// One process being watched.
struct Watched {
    member: Member,
    thresholds: ThresholdBytes,
    counters: ending::OomCounters,
    exited_at: Option<Instant>,
    zombie_faults: Option<u64>,
    /// Its own report (`--cgroup`).
    recorder: Option<KernelRecorder>,
    /// Its allocator record, when it runs on the preload library.
    record: amm_record::Follower,
}

/// A watch in progress.
struct Session<'a> {
    opts: &'a WatchOptions,
    finder: Finder,
    probe: Probe,
    printer: Printer,
    start: u64,
    watched: BTreeMap<u32, Watched>,
    /// The report for one pid or a followed parent's children.
    shared: Option<KernelRecorder>,
    outcome: WatchOutcome,
}

impl Session<'_> {
    fn run(&mut self, mut reader: EventReader, out: &mut dyn Write) -> Result<()> {
        loop {
            self.discover(out)?;
            if self.watched.is_empty() && self.finder.exhausted() {
                return Ok(());
            }
            poll_readable(&reader, Duration::from_millis(100))?;
            self.sample(out)?;
            if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            self.drain(&mut reader, out)?;
            self.exits_without_event(out)?;
        }
    }

    /// Admits the scope's new processes and puts the probe on them.
    fn discover(&mut self, out: &mut dyn Write) -> Result<()> {
        for found in self.finder.discover() {
            let member = match found {
                Ok(m) => m,
                Err(e) if matches!(self.finder.scope(), Scope::Pid(_)) => bail!(e),
                Err(e) => {
                    eprintln!("{e}");
                    continue;
                }
            };
            match self.admit(member, out) {
                Ok(()) => {}
                Err(e) if matches!(self.finder.scope(), Scope::Pid(_)) => return Err(e),
                Err(e) => eprintln!("{e:#}"),
            }
        }
        Ok(())
    }

    /// Resolves a new member's limit, watches it, starts its report.
    fn admit(&mut self, member: Member, out: &mut dyn Write) -> Result<()> {
        let (pid, start_time) = (member.pid, member.start_time);
        let who = format!("pid {pid}");
        let limit = limit::resolve(self.opts.limit, member.cgroup.as_ref(), &who)?;
        if let Some(w) = &limit.warning {
            eprintln!("warning: {w}");
        }
        let thresholds = self
            .opts
            .fractions
            .to_bytes(limit.bytes)
            .context("invalid thresholds")?;
        // no signal; bound to the pinned task and its credentials, so a
        // recycled pid is another task and a setuid exec ends the watch
        let config =
            crate::probe::watch_config(&thresholds, self.opts.spike_horizon, 0, 0, &member.binding);
        self.probe.watch(pid, config)?;
        let counters = ending::OomCounters::read(member.cgroup.clone());
        let mut recorder = None;
        if let Some(path) = &self.opts.report {
            match self.finder.scope() {
                Scope::Cgroup(_) => {
                    recorder = Some(KernelRecorder::new(
                        &path_for(path, pid),
                        pid,
                        &thresholds,
                        self.start,
                    ));
                }
                _ => match &mut self.shared {
                    Some(r) => r.follow(pid, (monotonic_ns() - self.start) as f64 / 1e9),
                    None => {
                        self.shared = Some(KernelRecorder::new(path, pid, &thresholds, self.start));
                    }
                },
            }
        }
        self.printer
            .header(pid, &thresholds, &limit.source, self.finder.scope(), out)?;
        self.watched.insert(
            pid,
            Watched {
                member,
                thresholds,
                counters,
                exited_at: None,
                zombie_faults: None,
                recorder,
                record: amm_record::Follower::new(pid as i32, start_time, amm_record::Access::Read),
            },
        );
        Ok(())
    }

    /// Reads each process's allocator record, and samples RSS (and the
    /// record) for the reports. A record found is a line of the watch's
    /// output; a record refused or left alone is a warning on stderr.
    fn sample(&mut self, out: &mut dyn Write) -> Result<()> {
        for (pid, w) in self.watched.iter_mut() {
            let snap = w.record.read_or_recent(amm_record::STAND_IN);
            match w.record.notice() {
                Some(Notice::Reading {
                    pid,
                    allocator,
                    interval_ms,
                }) => self.printer.record(pid, allocator, interval_ms, out)?,
                Some(n) => eprintln!("warning: {n}"),
                None => {}
            }
            let state = self.probe.watch_of(*pid).map(|x| x.state);
            let r = w.recorder.as_mut().or(self.shared.as_mut());
            if let Some(r) = r {
                r.sample(state.as_ref(), snap.as_ref());
            }
        }
        Ok(())
    }

    /// The kernel's peak for `pid`: the map's, or the event's.
    fn peak(&self, pid: u32, m: Option<&EventMessage>) -> u64 {
        let map = self
            .probe
            .watch_of(pid)
            .map_or(0, |w| w.state.peak_rss_bytes);
        map.max(m.map_or(0, |m| m.peak_rss_bytes))
    }

    /// Prints and records the kernel's events; ends the processes that
    /// exited.
    fn drain(&mut self, reader: &mut EventReader, out: &mut dyn Write) -> Result<()> {
        while let Some(raw) = reader.next_event() {
            let Some(msg) = EventMessage::from_kernel(&raw) else {
                continue;
            };
            self.event(msg, out)?;
        }
        Ok(())
    }

    /// One event of a watched process.
    fn event(&mut self, msg: EventMessage, out: &mut dyn Write) -> Result<()> {
        let peak = self.peak(msg.pid, Some(&msg));
        let Some(w) = self.watched.get_mut(&msg.pid) else {
            return Ok(());
        };
        self.printer.print(&msg, peak, w.thresholds.limit, out)?;
        if let Some(r) = w.recorder.as_mut().or(self.shared.as_mut()) {
            r.event(&msg);
        }
        let (pid, kind) = (msg.pid, msg.event);
        self.outcome.events.push(msg);
        if matches!(kind, EventKind::Exit | EventKind::Credentials) {
            self.end(pid, peak, kind == EventKind::Credentials, out)?;
        }
        Ok(())
    }

    /// A pidfd said its process exited but no exit event came (it exited
    /// before the watch was in place, or the ring buffer was full): after
    /// 200 ms, an exit made up from the map's last state.
    fn exits_without_event(&mut self, out: &mut dyn Write) -> Result<()> {
        let mut due = Vec::new();
        for (pid, w) in self.watched.iter_mut() {
            if w.exited_at.is_none() && identity::pidfd_exited(&w.member.pidfd) {
                w.exited_at = Some(Instant::now());
                // the zombie still shows its fault counts, until reaped
                w.zombie_faults = identity::ProcInfo::read(*pid).ok().map(|i| i.faults);
            }
            if w.exited_at
                .is_some_and(|t| t.elapsed() > Duration::from_millis(200))
            {
                due.push((*pid, w.zombie_faults));
            }
        }
        for (pid, faults) in due {
            let state = self
                .probe
                .watch_of(pid)
                .map(|w| w.state)
                .unwrap_or_default();
            let msg = crate::probe::exit_from_state(pid, &state, faults, monotonic_ns());
            self.event(msg, out)?;
        }
        Ok(())
    }

    /// Ends the watch of `pid` after its exit (how it ended, who ended it)
    /// or after the kernel saw its credentials change (it is never read
    /// again: a setuid program is not the caller's to watch).
    fn end(&mut self, pid: u32, peak: u64, credentials: bool, out: &mut dyn Write) -> Result<()> {
        self.probe.unwatch(pid)?;
        let Some(w) = self.watched.remove(&pid) else {
            return Ok(());
        };
        let end = if credentials {
            Ending::credentials_changed(pid, peak, w.thresholds.limit)
        } else {
            ending::ending(
                pid,
                &w.member.pidfd,
                &w.counters,
                self.opts.agent.as_deref().filter(|p| p.exists()),
                peak,
                w.thresholds.limit,
                w.record.last().and_then(ending::HeapAtEnd::of),
            )
        };
        self.printer.ending(&end, out)?;
        self.outcome.endings.push(end);
        if let Some(r) = w.recorder {
            report_written(r.finish()?);
        }
        Ok(())
    }

    /// Unwatches what is left and writes the reports.
    fn close(mut self) -> Result<WatchOutcome> {
        for (pid, w) in std::mem::take(&mut self.watched) {
            self.probe.unwatch(pid)?;
            if let Some(r) = w.recorder {
                report_written(r.finish()?);
            }
        }
        if let Some(r) = self.shared.take() {
            report_written(r.finish()?);
        }
        Ok(self.outcome)
    }
}

fn report_written(path: PathBuf) {
    eprintln!("report written to {}", path.display());
}

/// `report.json` for pid 42 → `report-42.json`.
fn path_for(path: &Path, pid: u32) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "report".into(), |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{pid}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{pid}"),
    };
    path.with_file_name(name)
}

/// Waits until the ring buffer is readable or `timeout` passes.
fn poll_readable(reader: &EventReader, timeout: Duration) -> Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => bail!("poll failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_process_report_paths() {
        assert_eq!(
            path_for(Path::new("/tmp/r.json"), 42),
            PathBuf::from("/tmp/r-42.json")
        );
        assert_eq!(path_for(Path::new("out"), 7), PathBuf::from("out-7"));
    }
}
