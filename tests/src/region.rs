//! Anonymous memory that can be faulted in and released on demand.

use anyhow::{Result, bail};

/// Page size in bytes.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// An anonymous mapping that can be faulted in and released repeatedly.
pub struct Region {
    base: *mut u8,
    len: usize,
}

impl Region {
    /// Maps `len` bytes without touching them.
    pub fn new(len: usize) -> Result<Self> {
        // SAFETY: anonymous private mapping, no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap of {len} bytes: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            base: p.cast(),
            len,
        })
    }

    /// Writes one byte per page (one fault per page when released before).
    pub fn touch(&self) {
        for off in (0..self.len).step_by(page_size()) {
            // SAFETY: off < len, inside our writable mapping.
            unsafe { std::ptr::write_volatile(self.base.add(off), 1) };
        }
    }

    /// Gives the pages back (MADV_DONTNEED): the next touch faults again.
    pub fn release(&self) {
        // SAFETY: the range is our own mapping.
        unsafe { libc::madvise(self.base.cast(), self.len, libc::MADV_DONTNEED) };
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
        self.base as usize
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
