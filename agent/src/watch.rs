//! `amm-agent watch`: load the probe, watch one existing process (a Python
//! Dask worker, say) and print what the kernel saw between polls. It takes
//! no action on the process. With `--report PATH` it also writes the
//! leak-vs-hoard report from kernel data alone (`kernel_report`).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use amm_ebpf::{EventKind, Level};
use amm_protocol::{EventMessage, Fractions, ThresholdBytes};
use anyhow::{Context, Result, bail};
use bytesize::ByteSize;

use crate::clock::monotonic_ns;
use crate::identity;
use crate::kernel_report::KernelRecorder;
use crate::probe::{EventReader, Probe};

/// What to watch and how to print it.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The process.
    pub pid: u32,
    /// Its memory limit in bytes.
    pub limit: u64,
    /// Level fractions (default 0.6 / 0.7 / 0.8 / 0.95).
    pub fractions: Fractions,
    /// Spike horizon (zero: no spike alarm).
    pub spike_horizon: Duration,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// BPF object to load instead of the default.
    pub object: Option<PathBuf>,
    /// Write the leak-vs-hoard report from kernel data here when the
    /// process exits (or the watch is interrupted); see `kernel_report`.
    pub report: Option<PathBuf>,
}

/// Set by SIGINT/SIGTERM while a watch that writes a report runs, so the
/// report is still written.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// What the watch saw, returned when the process has exited.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchOutcome {
    /// Every event, in order (the last is the exit).
    pub events: Vec<EventMessage>,
    /// True if the exit came from the kernel's exit event; false if it was
    /// noticed through the pidfd and made up from the map's last state.
    pub exit_from_kernel: bool,
}

/// Watches until the process exits, printing each event to `out`; with
/// [`WatchOptions::report`], also samples RSS and writes the report at the
/// end (and on SIGINT/SIGTERM, which then end the watch).
pub fn watch(opts: &WatchOptions, out: &mut dyn Write) -> Result<WatchOutcome> {
    let mut recorder = None;
    if opts.report.is_some() {
        use nix::sys::signal::{SigHandler, Signal, signal};
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores to an atomic.
            unsafe { signal(sig, SigHandler::Handler(on_signal)) }
                .with_context(|| format!("cannot handle {sig}"))?;
        }
    }
    let outcome = watch_recording(opts, out, &mut recorder)?;
    if let Some(r) = recorder {
        let path = r.finish()?;
        eprintln!("report written to {}", path.display());
    }
    Ok(outcome)
}

/// One watch in progress.
struct Session<'a> {
    pid: u32,
    probe: Probe,
    reader: EventReader,
    pidfd: OwnedFd,
    printer: Printer,
    recorder: &'a mut Option<KernelRecorder>,
    events: Vec<EventMessage>,
    /// When the pidfd said the process exited, and its fault count then.
    exited: Option<(Instant, Option<u64>)>,
}

fn watch_recording(
    opts: &WatchOptions,
    out: &mut dyn Write,
    recorder: &mut Option<KernelRecorder>,
) -> Result<WatchOutcome> {
    let thresholds = opts
        .fractions
        .to_bytes(opts.limit)
        .context("invalid thresholds")?;
    let pinned = identity::pin(opts.pid)
        .with_context(|| format!("cannot open pid {}: is it running?", opts.pid))?;
    let mut probe = Probe::load(opts.object.as_deref())?;
    let reader = probe
        .take_events()
        .context("the probe's ring buffer was already taken")?;
    // no signal and no credentials check: this watch only looks
    let config =
        crate::probe::watch_config(&thresholds, opts.spike_horizon, 0, 0, &pinned.binding());
    probe.watch(opts.pid, config)?;
    let start = monotonic_ns();
    *recorder = opts
        .report
        .as_deref()
        .map(|p| KernelRecorder::new(p, opts.pid, &thresholds, start));
    let printer = Printer {
        start,
        thresholds,
        json: opts.json,
    };
    printer.header(opts.pid, out)?;
    let mut s = Session {
        pid: opts.pid,
        probe,
        reader,
        pidfd: pinned.pidfd,
        printer,
        recorder,
        events: Vec::new(),
        exited: None,
    };
    loop {
        let exited = poll2(&s.reader, &s.pidfd, Duration::from_millis(100))?;
        if let Some(done) = s.sample()? {
            return Ok(done);
        }
        if let Some(done) = s.drain(out)? {
            return Ok(done);
        }
        if let Some(done) = s.backstop(exited, out)? {
            return Ok(done);
        }
    }
}

impl Session<'_> {
    fn outcome(&mut self, exit_from_kernel: bool) -> Result<WatchOutcome> {
        self.probe.unwatch(self.pid)?;
        Ok(WatchOutcome {
            events: std::mem::take(&mut self.events),
            exit_from_kernel,
        })
    }

    /// Samples RSS for the report; ends the watch when interrupted.
    fn sample(&mut self) -> Result<Option<WatchOutcome>> {
        let Some(r) = self.recorder.as_mut() else {
            return Ok(None);
        };
        r.sample(self.probe.watch_of(self.pid).map(|w| w.state).as_ref());
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            return self.outcome(false).map(Some);
        }
        Ok(None)
    }

    fn record(&mut self, msg: EventMessage, out: &mut dyn Write) -> Result<()> {
        self.printer.print(&msg, out)?;
        if let Some(r) = self.recorder.as_mut() {
            r.event(&msg);
        }
        self.events.push(msg);
        Ok(())
    }

    /// Prints what the ring buffer holds; done at the exit.
    fn drain(&mut self, out: &mut dyn Write) -> Result<Option<WatchOutcome>> {
        while let Some(raw) = self.reader.next_event() {
            let Some(msg) = EventMessage::from_kernel(&raw) else {
                continue;
            };
            if msg.pid != self.pid {
                continue;
            }
            let done = matches!(msg.event, EventKind::Exit | EventKind::Credentials);
            self.record(msg, out)?;
            if done {
                return self.outcome(true).map(Some);
            }
        }
        Ok(None)
    }

    /// The pidfd said the process exited but no exit event came (it exited
    /// before the watch was in place, or the ring buffer was full): after a
    /// moment, end from the map's last state.
    fn backstop(&mut self, exited: bool, out: &mut dyn Write) -> Result<Option<WatchOutcome>> {
        if exited && self.exited.is_none() {
            // the zombie still shows its fault counts, until it is reaped
            let faults = identity::ProcInfo::read(self.pid).ok().map(|i| i.faults);
            self.exited = Some((Instant::now(), faults));
        }
        let Some((at, faults)) = self.exited else {
            return Ok(None);
        };
        if at.elapsed() <= Duration::from_millis(200) {
            return Ok(None);
        }
        let state = self
            .probe
            .watch_of(self.pid)
            .map(|w| w.state)
            .unwrap_or_default();
        let level = Level::from_raw(state.level).unwrap_or(Level::Below);
        let msg = EventMessage {
            event: EventKind::Exit,
            t_ns: monotonic_ns(),
            pid: self.pid,
            rss_bytes: state.rss_bytes,
            level,
            prev_level: level,
            peak_rss_bytes: state.peak_rss_bytes,
            faults,
            rate_bytes_per_ms: state.rate_bytes_per_ms,
            eta_ns: None,
            foreign: false,
            signalled: false,
        };
        self.record(msg, out)?;
        self.outcome(false).map(Some)
    }
}

/// Polls the ring buffer and the pidfd; true when the pidfd says the
/// process exited.
fn poll2(reader: &EventReader, pidfd: &OwnedFd, timeout: Duration) -> Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [
        PollFd::new(reader.as_fd(), PollFlags::POLLIN),
        PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
    ];
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(_) => Ok(fds[1].any().unwrap_or(false)),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => bail!("poll failed: {e}"),
    }
}

fn show(bytes: u64) -> String {
    if bytes == amm_ebpf::DISABLED {
        "off".into()
    } else {
        ByteSize(bytes).display().iec().to_string()
    }
}

struct Printer {
    start: u64,
    thresholds: ThresholdBytes,
    json: bool,
}

impl Printer {
    fn header(&self, pid: u32, out: &mut dyn Write) -> Result<()> {
        if !self.json {
            let t = &self.thresholds;
            writeln!(
                out,
                "watching pid {pid} (limit {}; spill {}, pause {}, terminate {}; re-arm below {})",
                ByteSize(t.limit).display().iec(),
                show(t.spill),
                show(t.pause),
                show(t.terminate),
                show(t.rearm),
            )?;
        }
        Ok(())
    }

    fn print(&self, m: &EventMessage, out: &mut dyn Write) -> Result<()> {
        if self.json {
            serde_json::to_writer(&mut *out, m)?;
            writeln!(out)?;
        } else {
            let t = m.t_ns.saturating_sub(self.start) as f64 / 1e6;
            let pct = |b: u64| 100.0 * b as f64 / self.thresholds.limit as f64;
            let rate = m.rate_bytes_per_ms.max(0) as u64 * 1000;
            let what = match m.event {
                EventKind::Level => format!(
                    "level {} -> {}  rss {} ({:.1}%){}",
                    m.prev_level,
                    m.level,
                    ByteSize(m.rss_bytes).display().iec(),
                    pct(m.rss_bytes),
                    if m.foreign {
                        "  [update by another task]"
                    } else {
                        ""
                    },
                ),
                EventKind::Spike => format!(
                    "spike: terminate predicted in {:.0} ms at {}/s  rss {} ({:.1}%)",
                    m.eta_ns.unwrap_or(0) as f64 / 1e6,
                    ByteSize(rate).display().iec(),
                    ByteSize(m.rss_bytes).display().iec(),
                    pct(m.rss_bytes),
                ),
                EventKind::Exit => format!(
                    "exit  peak {} ({:.1}%)  faults {}",
                    ByteSize(m.peak_rss_bytes).display().iec(),
                    pct(m.peak_rss_bytes),
                    m.faults
                        .map_or_else(|| "unknown".to_string(), |f| f.to_string())
                ),
                EventKind::Credentials => format!(
                    "credentials changed (setuid/setgid or file-capability exec): watch ended, peak {}",
                    ByteSize(m.peak_rss_bytes).display().iec()
                ),
            };
            writeln!(out, "{t:>12.3} ms  pid {}  {what}", m.pid)?;
        }
        out.flush()?;
        Ok(())
    }
}
