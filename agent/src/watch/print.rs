//! How a watch prints: a text line per event (with the kernel's peak so
//! far), or one JSON object per line.

use std::io::Write;

use amm_ebpf::EventKind;
use amm_protocol::{EventMessage, ThresholdBytes};
use amm_record::{Allocator, Notice};
use anyhow::Result;
use bytesize::ByteSize;

use super::{Ending, Scope};

fn show(bytes: u64) -> String {
    if bytes == amm_ebpf::DISABLED {
        "off".into()
    } else {
        ByteSize(bytes).display().iec().to_string()
    }
}

/// Prints a watch's lines.
pub(super) struct Printer {
    start: u64,
    json: bool,
}

impl Printer {
    /// Times count from `start` (CLOCK_MONOTONIC ns).
    pub(super) fn new(start: u64, json: bool) -> Self {
        Self { start, json }
    }

    /// The first line of a `--follow` or `--cgroup` watch, printed once the
    /// probe is loaded: from now on a new process is seen.
    pub(super) fn scope(&self, scope: &Scope, out: &mut dyn Write) -> Result<()> {
        let what = match scope {
            Scope::Pid(_) => return Ok(()),
            Scope::Follow(p) => format!("the children of pid {p}"),
            Scope::Cgroup(d) => format!("the processes in cgroup {}", d.display()),
        };
        if self.json {
            let v = serde_json::json!({"event": "following", "what": what});
            serde_json::to_writer(&mut *out, &v)?;
            writeln!(out)?;
        } else {
            writeln!(out, "following {what}")?;
        }
        out.flush()?;
        Ok(())
    }

    /// The line that says a process is now watched, and how.
    pub(super) fn header(
        &self,
        pid: u32,
        t: &ThresholdBytes,
        source: &str,
        scope: &Scope,
        out: &mut dyn Write,
    ) -> Result<()> {
        let why = match scope {
            Scope::Pid(_) => String::new(),
            Scope::Follow(p) => format!(", a child of pid {p}"),
            Scope::Cgroup(d) => format!(", in cgroup {}", d.display()),
        };
        if self.json {
            let v = serde_json::json!({
                "event": "watching", "pid": pid, "limit_bytes": t.limit, "limit_source": source,
                "spill_bytes": t.spill, "pause_bytes": t.pause, "terminate_bytes": t.terminate,
            });
            serde_json::to_writer(&mut *out, &v)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "watching pid {pid}{why} (limit {} from {source}; spill {}, pause {}, terminate {}; re-arm below {})",
                ByteSize(t.limit).display().iec(),
                show(t.spill),
                show(t.pause),
                show(t.terminate),
                show(t.rearm),
            )?;
        }
        out.flush()?;
        Ok(())
    }

    /// The line that says a process's allocator record is read from now on
    /// (news, so it goes with the process's story, not to stderr).
    pub(super) fn record(
        &self,
        pid: i32,
        allocator: Option<Allocator>,
        interval_ms: u64,
        out: &mut dyn Write,
    ) -> Result<()> {
        if self.json {
            let v = serde_json::json!({
                "event": "record", "pid": pid,
                "allocator": allocator.map(Allocator::name), "interval_ms": interval_ms,
            });
            serde_json::to_writer(&mut *out, &v)?;
            writeln!(out)?;
        } else {
            let n = Notice::Reading {
                pid,
                allocator,
                interval_ms,
            };
            writeln!(out, "{n}")?;
        }
        out.flush()?;
        Ok(())
    }

    /// The last line: how the process ended.
    pub(super) fn ending(&self, e: &Ending, out: &mut dyn Write) -> Result<()> {
        if self.json {
            let mut v = serde_json::to_value(e)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("event".into(), "ending".into());
            }
            serde_json::to_writer(&mut *out, &v)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", e.describe())?;
        }
        out.flush()?;
        Ok(())
    }

    /// One event; `peak` is the kernel's exact peak so far, `limit` the
    /// process's limit.
    pub(super) fn print(
        &self,
        m: &EventMessage,
        peak: u64,
        limit: u64,
        out: &mut dyn Write,
    ) -> Result<()> {
        if self.json {
            let mut v = serde_json::to_value(m)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("peak_rss_bytes".into(), peak.into());
            }
            serde_json::to_writer(&mut *out, &v)?;
            writeln!(out)?;
        } else {
            let t = m.t_ns.saturating_sub(self.start) as f64 / 1e6;
            writeln!(
                out,
                "{t:>12.3} ms  pid {}  {}  peak {} ({:.1}%)",
                m.pid,
                what(m, limit),
                ByteSize(peak).display().iec(),
                pct(peak, limit)
            )?;
        }
        out.flush()?;
        Ok(())
    }
}

fn pct(b: u64, limit: u64) -> f64 {
    100.0 * b as f64 / limit.max(1) as f64
}

/// What an event says.
fn what(m: &EventMessage, limit: u64) -> String {
    let rate = m.rate_bytes_per_ms.max(0) as u64 * 1000;
    match m.event {
        EventKind::Level => format!(
            "level {} -> {}  rss {} ({:.1}%){}",
            m.prev_level,
            m.level,
            ByteSize(m.rss_bytes).display().iec(),
            pct(m.rss_bytes, limit),
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
            pct(m.rss_bytes, limit),
        ),
        EventKind::Exit => format!(
            "exit  faults {}",
            m.faults
                .map_or_else(|| "unknown".to_string(), |f| f.to_string())
        ),
        EventKind::Credentials => {
            "credentials changed (setuid/setgid or file-capability exec): watch ended".into()
        }
    }
}
