//! A client's own BPF ring buffer, read without the agent in the way.
//!
//! When a registration asks for it (`direct: true`), the agent creates a
//! ring buffer for that process, has the kernel program write the process's
//! events into it as well, and hands its fd over with the answer. The client
//! maps it and reads records as the kernel commits them: one wake-up from
//! the faulting CPU to the reader, instead of two through the agent.
//!
//! Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (the
//! reader writes it), page 1 the producer position, then the data area,
//! mapped twice in a row so a record that wraps reads contiguously. Each
//! record is an 8-byte header (length with BUSY and DISCARD bits, page
//! offset) followed by the sample, padded to 8 bytes.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: usize = 8;

/// One shared mapping of the ring buffer's fd, unmapped when dropped.
#[derive(Debug)]
struct Mapping {
    at: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset` (page-aligned) with `prot`.
    fn new(fd: &OwnedFd, len: usize, prot: ProtFlags, offset: usize) -> io::Result<Self> {
        let length = NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty ring mapping"))?;
        let offset = offset.try_into().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring offset {offset} is beyond what mmap takes"),
            )
        })?;
        // SAFETY: a new shared mapping (no address asked for, so nothing
        // existing is replaced) of a ring buffer map fd at a page-aligned
        // offset, the only kind the kernel accepts for it; it is only read
        // through the bounds RingReader checks, and unmapped once, in drop.
        let at = unsafe { mmap(None, length, prot, MapFlags::MAP_SHARED, fd, offset) }?;
        Ok(Self { at: at.cast(), len })
    }

    fn ptr(&self) -> *mut u8 {
        self.at.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped, once; nothing borrows it
        // past the life of self. An error (never seen for a mapping made
        // here) would leave it mapped, which is harmless.
        let _ = unsafe { munmap(self.at.cast(), self.len) };
    }
}

/// A mapped ring buffer of [`amm_ebpf::Event`] records.
#[derive(Debug)]
pub struct RingReader {
    // the mappings go before the fd they map (fields drop in order)
    consumer: Mapping,
    producer: Mapping,
    fd: OwnedFd,
    data_bytes: usize,
    page: usize,
    spin: SpinWindow,
}

/// The longest spin window one alarm opens, whatever is asked.
pub const MAX_SPIN: Duration = Duration::from_secs(1);

/// When the reader busy-reads the ring instead of sleeping in `poll`
/// (see [`RingReader::spin_after_alarm`]): from a spike alarm until the
/// next level event, the alarm's predicted terminate crossing or `max`,
/// whichever comes first.
#[derive(Debug, Default)]
struct SpinWindow {
    max: Option<Duration>,
    until: Option<Instant>,
}

impl SpinWindow {
    /// A closed window that alarms open for at most `max` (capped at
    /// [`MAX_SPIN`]), or never on a single CPU.
    fn new(max: Option<Duration>) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            max: max.filter(|_| cpus > 1).map(|m| m.min(MAX_SPIN)),
            until: None,
        }
    }

    /// Opens or closes the window on an event the reader returns.
    fn note(&mut self, e: &amm_ebpf::Event) {
        match amm_ebpf::EventKind::from_raw(e.kind) {
            Some(amm_ebpf::EventKind::Spike) => {
                if let Some(max) = self.max {
                    let eta = Duration::from_nanos(e.eta_ns);
                    self.until = Some(Instant::now() + eta.min(max));
                }
            }
            // the crossing came (the manager needs the CPU now), the
            // level fell, or the watch ended
            Some(_) => self.until = None,
            None => {}
        }
    }

    /// Time left in the window, if open.
    fn left(&mut self) -> Option<Duration> {
        let left = self.until?.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.until = None;
            return None;
        }
        Some(left)
    }
}

// SAFETY: the mappings belong to this value alone and are only touched
// through &mut self (reads) or atomics.
unsafe impl Send for RingReader {}

impl RingReader {
    /// Maps the ring buffer behind `fd`, whose data area is `data_bytes`
    /// (a power of two, as the agent said in its answer).
    pub fn new(fd: OwnedFd, data_bytes: usize) -> io::Result<Self> {
        if !data_bytes.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring size {data_bytes} is not a power of two"),
            ));
        }
        let page = crate::sys::page_size();
        // the producer page, then the data area mapped twice
        let producer_len = data_bytes
            .checked_mul(2)
            .and_then(|d| d.checked_add(page))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("ring size {data_bytes} is too large to map"),
                )
            })?;
        let consumer = Mapping::new(&fd, page, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, 0)?;
        let producer = Mapping::new(&fd, producer_len, ProtFlags::PROT_READ, page)?;
        Ok(Self {
            consumer,
            producer,
            fd,
            data_bytes,
            page,
            spin: SpinWindow::default(),
        })
    }

    /// After a spike alarm, busy-read the ring for the next event instead
    /// of sleeping in `poll`, for at most `max` (`None`: never, the
    /// default), and never where this process may run on a single CPU
    /// (the spin would take it from the threads that must act). The window
    /// closes at the next level event, at the alarm's predicted terminate
    /// crossing, or after `max`. It saves the two wake-ups of the poll
    /// path (an IPI for the ring's irq_work, one to wake the reader's CPU):
    /// ~0.1 ms and, rarely, a vCPU the host is not running. Costs one CPU
    /// for at most `max` per alarm; an alarm re-arms only after a calm
    /// horizon.
    /// `max` is capped at [`MAX_SPIN`].
    pub fn spin_after_alarm(&mut self, max: Option<Duration>) {
        self.spin = SpinWindow::new(max);
    }

    /// Time left in an open spin window, if one is open.
    pub fn spinning(&mut self) -> Option<Duration> {
        self.spin.left()
    }

    /// Busy-reads the ring for at most `budget` (and never past the spin
    /// window): the first committed event, if one came.
    pub fn spin(&mut self, budget: Duration) -> Option<amm_ebpf::Event> {
        let end = Instant::now() + budget.min(self.spinning()?);
        loop {
            if let Some(e) = self.next_event() {
                return Some(e);
            }
            if Instant::now() >= end {
                return None;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the consumer page, 8-byte aligned,
        // mapped for the life of self.
        unsafe { &*self.consumer.ptr().cast::<AtomicU64>() }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the producer page, as above.
        unsafe { &*self.producer.ptr().cast::<AtomicU64>() }
    }

    /// The next committed event, if any. Records the kernel discarded are
    /// skipped, records too short to be an event are skipped.
    pub fn next_event(&mut self) -> Option<amm_ebpf::Event> {
        let mask = (self.data_bytes - 1) as u64;
        loop {
            let cons = self.consumer_pos().load(Ordering::Acquire);
            let prod = self.producer_pos().load(Ordering::Acquire);
            if cons >= prod {
                return None;
            }
            let at = self.page + (cons & mask) as usize;
            // SAFETY: `at` is inside the data area (masked), 8-byte aligned
            // as every record header is.
            let hdr = unsafe { &*self.producer.ptr().add(at).cast::<AtomicU32>() };
            let len = hdr.load(Ordering::Acquire);
            if len & BUSY != 0 {
                return None; // reserved, not committed yet
            }
            let sample_len = (len & !(BUSY | DISCARD)) as usize;
            let total = (HEADER + sample_len + 7) & !7;
            let event = (len & DISCARD == 0).then(|| {
                // SAFETY: the sample follows its header; the data area is
                // mapped twice, so it is contiguous even when it wraps.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.producer.ptr().add(at + HEADER), sample_len)
                };
                amm_ebpf::Event::from_bytes(bytes)
            });
            self.consumer_pos()
                .store(cons + total as u64, Ordering::Release);
            if let Some(Some(e)) = event {
                self.spin.note(&e);
                return Some(e);
            }
        }
    }

    /// Waits until a record may be ready or `timeout` passes (`None`: no
    /// limit). Returns false on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        Ok(crate::sys::poll(&mut fds, timeout)? > 0)
    }

    /// The next event, waiting at most `timeout` for one (busy-reading
    /// while a spin window is open, see [`Self::spin_after_alarm`]).
    pub fn recv(&mut self, timeout: Option<Duration>) -> io::Result<Option<amm_ebpf::Event>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(e) = self.next_event() {
                return Ok(Some(e));
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(None);
            }
            if self.spinning().is_some() {
                if let Some(e) = self.spin(left.unwrap_or(Duration::MAX)) {
                    return Ok(Some(e));
                }
                continue;
            }
            if !self.wait(left)? {
                return Ok(self.next_event());
            }
        }
    }
}

impl AsFd for RingReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use amm_ebpf::{Event, EventKind};

    use super::{MAX_SPIN, SpinWindow};

    fn event(kind: EventKind, eta: Duration) -> Event {
        Event {
            t_ns: 0,
            tgid: 1,
            kind: kind.raw(),
            level: 0,
            prev_level: 0,
            rss_bytes: 0,
            peak_rss_bytes: 0,
            faults: 0,
            rate_bytes_per_ms: 0,
            eta_ns: eta.as_nanos() as u64,
            flags: 0,
            cpu: 0,
        }
    }

    fn multi_cpu() -> bool {
        std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
    }

    #[test]
    fn a_spike_alarm_opens_the_window_and_the_next_level_event_closes_it() {
        if !multi_cpu() {
            println!("a single CPU: the window never opens; checking that");
        }
        let mut w = SpinWindow::new(Some(Duration::from_secs(60)));
        assert_eq!(w.left(), None, "closed until an alarm");
        w.note(&event(EventKind::Spike, Duration::from_secs(3600)));
        let left = w.left();
        if multi_cpu() {
            // open, for the capped max rather than the hour the alarm predicts
            assert!(left.is_some_and(|l| l <= MAX_SPIN), "{left:?}");
        } else {
            assert_eq!(left, None);
        }
        w.note(&event(EventKind::Level, Duration::ZERO));
        assert_eq!(w.left(), None, "the crossing closes it");
        w.note(&event(EventKind::Spike, Duration::from_secs(3600)));
        w.note(&event(EventKind::Exit, Duration::ZERO));
        assert_eq!(w.left(), None, "the end of the watch closes it");
    }

    #[test]
    fn an_alarm_that_predicts_the_crossing_now_opens_nothing() {
        let mut w = SpinWindow::new(Some(Duration::from_secs(1)));
        w.note(&event(EventKind::Spike, Duration::ZERO));
        assert_eq!(w.left(), None);
    }

    #[test]
    fn without_a_spin_budget_an_alarm_opens_nothing() {
        let mut w = SpinWindow::new(None);
        w.note(&event(EventKind::Spike, Duration::from_secs(3600)));
        assert_eq!(w.left(), None);
        assert_eq!(
            SpinWindow::new(Some(Duration::from_secs(600)))
                .max
                .is_some(),
            multi_cpu()
        );
        if multi_cpu() {
            assert_eq!(
                SpinWindow::new(Some(Duration::from_secs(600))).max,
                Some(MAX_SPIN)
            );
        }
    }
}
