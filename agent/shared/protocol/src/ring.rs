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
use std::time::Duration;

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
        })
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
