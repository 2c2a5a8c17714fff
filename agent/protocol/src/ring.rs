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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: usize = 8;

/// A mapped ring buffer of [`amm_ebpf::Event`] records.
#[derive(Debug)]
pub struct RingReader {
    fd: OwnedFd,
    consumer: *mut u8,
    producer: *mut u8,
    data_bytes: usize,
    page: usize,
}

// SAFETY: the mappings belong to this value alone and are only touched
// through &mut self (reads) or atomics.
unsafe impl Send for RingReader {}

fn map(fd: &OwnedFd, len: usize, prot: i32, offset: usize) -> io::Result<*mut u8> {
    // SAFETY: shared mapping of a ring buffer map fd at page-aligned offsets,
    // the only kind the kernel accepts for it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

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
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let consumer = map(&fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = match map(&fd, page + 2 * data_bytes, libc::PROT_READ, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: unmapping what was just mapped.
                unsafe { libc::munmap(consumer.cast(), page) };
                return Err(e);
            }
        };
        Ok(Self {
            fd,
            consumer,
            producer,
            data_bytes,
            page,
        })
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the consumer page, 8-byte aligned,
        // mapped for the life of self.
        unsafe { &*self.consumer.cast::<AtomicU64>() }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the producer page, as above.
        unsafe { &*self.producer.cast::<AtomicU64>() }
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
            let hdr = unsafe { &*self.producer.add(at).cast::<AtomicU32>() };
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
                    std::slice::from_raw_parts(self.producer.add(at + HEADER), sample_len)
                };
                amm_ebpf::Event::from_bytes(bytes)
            });
            self.consumer_pos()
                .store(cons + total as u64, Ordering::Release);
            if let Some(Some(e)) = event {
                return Some(e);
            }
        }
    }

    /// Waits until a record may be ready or `timeout` passes (`None`: no
    /// limit). Returns false on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let mut fds = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut fds, 1, ms) };
            if rc >= 0 {
                return Ok(rc > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// The next event, waiting at most `timeout` for one.
    pub fn recv(&mut self, timeout: Option<Duration>) -> io::Result<Option<amm_ebpf::Event>> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(e) = self.next_event() {
                return Ok(Some(e));
            }
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if left.is_some_and(|l| l.is_zero()) || !self.wait(left)? {
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

impl Drop for RingReader {
    fn drop(&mut self) {
        // SAFETY: unmapping the two mappings made in new(), once.
        unsafe {
            libc::munmap(self.consumer.cast(), self.page);
            libc::munmap(self.producer.cast(), self.page + 2 * self.data_bytes);
        }
    }
}
