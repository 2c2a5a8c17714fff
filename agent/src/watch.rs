//! `amm-agent watch`: load the probe, watch one existing process (a Python
//! Dask worker, say) and print what the kernel saw between polls. It takes
//! no action on the process. With `--report PATH` it also writes the
//! leak-vs-hoard report from kernel data alone (`kernel_report`).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

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
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only stores to an atomic.
            unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        }
    }
    let outcome = watch_recording(opts, out, &mut recorder)?;
    if let Some(r) = recorder {
        let path = r.finish()?;
        eprintln!("report written to {}", path.display());
    }
    Ok(outcome)
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
    let pidfd = identity::pidfd_open(opts.pid)
        .with_context(|| format!("cannot open pid {}: is it running?", opts.pid))?;
    let mut probe = Probe::load(opts.object.as_deref())?;
    let mut reader = probe
        .take_events()
        .context("the probe's ring buffer was already taken")?;
    let config = crate::probe::watch_config(&thresholds, opts.spike_horizon, 0, 0);
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
    if !opts.json {
        writeln!(
            out,
            "watching pid {} (limit {}; spill {}, pause {}, terminate {}; re-arm below {})",
            opts.pid,
            ByteSize(thresholds.limit).display().iec(),
            show(thresholds.spill),
            show(thresholds.pause),
            show(thresholds.terminate),
            show(thresholds.rearm),
        )?;
    }
    let mut events = Vec::new();
    let mut exited_at: Option<std::time::Instant> = None;
    let mut zombie_faults = None;
    loop {
        let ready = poll2(&reader, &pidfd, Duration::from_millis(100))?;
        if let Some(r) = recorder.as_mut() {
            r.sample(probe.watch_of(opts.pid).map(|w| w.state).as_ref());
            if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                probe.unwatch(opts.pid)?;
                return Ok(WatchOutcome {
                    events,
                    exit_from_kernel: false,
                });
            }
        }
        while let Some(raw) = reader.next_event() {
            let Some(msg) = EventMessage::from_kernel(&raw) else {
                continue;
            };
            if msg.pid != opts.pid {
                continue;
            }
            printer.print(&msg, out)?;
            if let Some(r) = recorder.as_mut() {
                r.event(&msg);
            }
            let done = msg.event == EventKind::Exit;
            events.push(msg);
            if done {
                probe.unwatch(opts.pid)?;
                return Ok(WatchOutcome {
                    events,
                    exit_from_kernel: true,
                });
            }
        }
        if ready.1 && exited_at.is_none() {
            exited_at = Some(std::time::Instant::now());
            // the zombie still shows its fault counts, until it is reaped
            zombie_faults = identity::ProcInfo::read(opts.pid).ok().map(|i| i.faults);
        }
        // the pidfd said it exited but no exit event came: the process
        // exited before the watch was in place, or the ring buffer was full
        if exited_at.is_some_and(|t| t.elapsed() > Duration::from_millis(200)) {
            let state = probe
                .watch_of(opts.pid)
                .map(|w| w.state)
                .unwrap_or_default();
            probe.unwatch(opts.pid)?;
            let level = Level::from_raw(state.level).unwrap_or(Level::Below);
            let msg = EventMessage {
                event: EventKind::Exit,
                t_ns: monotonic_ns(),
                pid: opts.pid,
                rss_bytes: state.rss_bytes,
                level,
                prev_level: level,
                peak_rss_bytes: state.peak_rss_bytes,
                faults: zombie_faults,
                rate_bytes_per_ms: state.rate_bytes_per_ms,
                eta_ns: None,
                foreign: false,
                signalled: false,
            };
            printer.print(&msg, out)?;
            if let Some(r) = recorder.as_mut() {
                r.event(&msg);
            }
            events.push(msg);
            return Ok(WatchOutcome {
                events,
                exit_from_kernel: false,
            });
        }
    }
}

/// Polls the ring buffer and the pidfd; returns which are readable.
fn poll2(reader: &EventReader, pidfd: &OwnedFd, timeout: Duration) -> Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: fds is a valid array of two pollfd for the call's duration.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as libc::c_int) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        bail!("poll failed: {e}");
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
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
