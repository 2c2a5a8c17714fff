//! Anonymous memory that can be faulted in and released on demand.

use std::num::NonZeroUsize;
use std::ptr::NonNull;

use anyhow::{Result, bail};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous, munmap};

pub use amm_protocol::sys::page_size;

/// An anonymous mapping that can be faulted in and released repeatedly.
pub struct Region {
    base: NonNull<u8>,
    len: usize,
}

impl Region {
    /// Maps `len` bytes without touching them.
    pub fn new(len: usize) -> Result<Self> {
        let Some(length) = NonZeroUsize::new(len) else {
            bail!("mmap of 0 bytes: a region needs at least one byte");
        };
        // SAFETY: a new anonymous private mapping with no address asked
        // for, so nothing existing is replaced; unmapped once, in drop.
        let p = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        };
        match p {
            Ok(p) => Ok(Self {
                base: p.cast(),
                len,
            }),
            Err(e) => bail!("mmap of {len} bytes: {}", std::io::Error::from(e)),
        }
    }

    /// Writes one byte per page (one fault per page when released before).
    pub fn touch(&self) {
        for off in (0..self.len).step_by(page_size()) {
            // SAFETY: off < len, inside our writable mapping.
            unsafe { std::ptr::write_volatile(self.base.as_ptr().add(off), 1) };
        }
    }

    /// Gives the pages back (MADV_DONTNEED): the next touch faults again.
    pub fn release(&self) {
        // SAFETY: the range is our own private anonymous mapping, which
        // reads back as zeroes after; the only failure is for a range that
        // is not a mapping, which this one is.
        let _ = unsafe { madvise(self.base.cast(), self.len, MmapAdvise::MADV_DONTNEED) };
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.len / page_size()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a mapping of no bytes (never made: `new` maps at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its first address.
    pub fn addr(&self) -> usize {
        self.base.as_ptr() as usize
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}
