//! One shared mapping of a record.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::layout::{RECORD_LEN, RawRecord};

/// A `MAP_SHARED` mapping of [`RECORD_LEN`] bytes of a record's memfd,
/// unmapped on drop. Only atomics live in it, so shared references to it
/// are sound however the other side writes.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<RawRecord>,
}

// SAFETY: the mapping is plain shared memory holding only atomics; it stays
// mapped until the Mapping is dropped.
unsafe impl Send for Mapping {}
// SAFETY: as above: every access goes through atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the record. The caller has checked that the file is at least
    /// [`RECORD_LEN`] bytes and can never shrink (`F_SEAL_SHRINK`), so no
    /// access through the mapping can fault.
    pub(crate) fn new(fd: BorrowedFd<'_>, writable: bool) -> io::Result<Mapping> {
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        let len = NonZeroUsize::new(RECORD_LEN).ok_or_else(|| io::Error::other("empty record"))?;
        // SAFETY: a fresh mapping chosen by the kernel (no address given),
        // of a file the caller checked is long enough and sealed.
        let ptr = unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, fd, 0) }?;
        Ok(Mapping { ptr: ptr.cast() })
    }

    /// The record.
    pub(crate) fn record(&self) -> &RawRecord {
        // SAFETY: the mapping is valid, page-aligned and RECORD_LEN >=
        // size_of::<RawRecord>() bytes long for as long as self lives;
        // RawRecord is only atomics, valid for any bit pattern.
        unsafe { self.ptr.as_ref() }
    }

    /// The mapping's address and length, for [`crate::abandon_inherited`].
    pub(crate) fn raw(&self) -> (usize, usize) {
        (self.ptr.as_ptr() as usize, RECORD_LEN)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/RECORD_LEN is exactly the mapping made in `new`, and
        // no reference into it outlives self.
        let _ = unsafe { munmap(self.ptr.cast(), RECORD_LEN) };
    }
}
