//! Writing a timeline: one [`Line`] per call, flushed at once so a reader
//! can follow a live process, stamped with the writer's clock.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use crate::event::Event;
use crate::line::{Entry, Line};
use crate::summary::Summary;
use crate::tick::Tick;

/// CLOCK_MONOTONIC now, in ns: the clock of the kernel's events (one
/// definition for the workspace, in `amm_record::sys`).
pub use amm_record::sys::monotonic_ns;

/// A timeline writer shared by the threads of one process. Writing is best
/// effort: a full disk must not stop a worker, so write errors are counted
/// ([`Writer::errors`]), not returned.
#[derive(Debug)]
pub struct Writer<W: Write = File> {
    out: Mutex<BufWriter<W>>,
    start: Instant,
    start_ns: u64,
    errors: std::sync::atomic::AtomicU64,
}

impl Writer<File> {
    /// Creates (truncates) the file, or appends to it (`append`: a
    /// restarted process, a supervisor adding its exits), so one file holds
    /// every attempt.
    pub fn create(path: &Path, append: bool) -> io::Result<Writer<File>> {
        let f = if append {
            OpenOptions::new().create(true).append(true).open(path)
        } else {
            File::create(path)
        }
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create timeline {}: {e}", path.display()),
            )
        })?;
        Ok(Writer::new(f))
    }
}

impl<W: Write> Writer<W> {
    /// A writer on `out` whose clock (`t_ms` 0) starts now.
    pub fn new(out: W) -> Writer<W> {
        Writer {
            out: Mutex::new(BufWriter::new(out)),
            start: Instant::now(),
            start_ns: monotonic_ns(),
            errors: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// CLOCK_MONOTONIC ns at `t_ms` 0.
    pub fn origin_monotonic_ns(&self) -> u64 {
        self.start_ns
    }

    /// Milliseconds since `t_ms` 0.
    pub fn t_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Writes one line and flushes.
    pub fn line(&self, line: &Line) {
        let text = line.to_json();
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
            self.errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn entry_at(&self, t_ns: u64, entry: Entry) {
        self.line(&Line::new(self.t_ms(), Some(t_ns), entry));
    }

    /// Writes a tick measured at `t_ns` (CLOCK_MONOTONIC, taken just
    /// before its first read: statm, `/proc/PID/status`); `t_ms` is when
    /// it is written. An event written while the tick was measured then
    /// lies after it on the `t_ns` clock, whichever line was written first.
    /// There is no "tick, now": every writer says when its measurement
    /// began (amm-worker's monitor, the `-- CMD` supervisor).
    pub fn tick_at(&self, t_ns: u64, tick: Tick) {
        self.entry_at(t_ns, Entry::Tick(Box::new(tick)));
    }

    /// Writes an event, now.
    pub fn event(&self, event: Event) {
        self.entry_at(monotonic_ns(), Entry::Event(event));
    }

    /// Writes an event that happened at `t_ns` (CLOCK_MONOTONIC), e.g. a
    /// kernel event relayed later; `t_ms` is when it is written.
    pub fn event_at(&self, t_ns: u64, event: Event) {
        self.entry_at(t_ns, Entry::Event(event));
    }

    /// Writes the run's summary, now.
    pub fn summary(&self, summary: Summary) {
        self.entry_at(monotonic_ns(), Entry::Summary(Box::new(summary)));
    }

    /// Flushes buffered lines.
    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if out.flush().is_err() {
            self.errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Lines (or flushes) that could not be written.
    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Phase;
    use crate::read::{Item, Reader};

    #[test]
    fn what_is_written_reads_back() {
        let w = Writer::new(Vec::new());
        w.tick_at(monotonic_ns(), Tick::rss(4096));
        w.event(Event::Phase(Phase {
            name: "fill".into(),
            ..Phase::default()
        }));
        w.event_at(5, Event::Other);
        let bytes = w
            .out
            .into_inner()
            .expect("lock")
            .into_inner()
            .expect("flushed");
        let items: Vec<Item> = Reader::new(&bytes[..]).map(|i| i.expect("ok")).collect();
        assert_eq!(items.len(), 3);
        let Item::Line(3, l) = &items[2] else {
            panic!("{items:?}")
        };
        assert_eq!(l.t_ns, Some(5));
        assert!(monotonic_ns() > 0);
    }
}
