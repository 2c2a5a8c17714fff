//! The publisher's side: create the record, publish statistics, serve purge
//! requests.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::stat::{Mode, fchmod, fstat};
use nix::unistd::{ftruncate, geteuid, getpid};
use procfs::FromRead;

use crate::layout::{
    MAGIC, RECORD_LEN, RawRecord, STATE_CLOSED, STATE_LIVE, STATE_SUPERSEDED, Stats, VERSION,
};
use crate::mapping::Mapping;
use crate::{Allocator, MEMFD_NAME, allocator_code, seqlock, sys};

/// A purge request found in the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The request's number (answer it with [`Writer::answer`]).
    pub ticket: u32,
    /// Who asked, as the requester wrote it (advisory: only the owner and
    /// root can write the record at all).
    pub requester_pid: u32,
    /// The requester's uid, as it wrote it.
    pub requester_uid: u32,
}

/// The publishing side of a record: owns the memfd and its mapping. One
/// writer per record; its methods take `&mut self` where they write.
#[derive(Debug)]
pub struct Writer {
    fd: Option<OwnedFd>,
    ino: u64,
    dev: u64,
    map: Mapping,
    seq: u64,
    served: u32,
    owner_uid: u32,
}

impl Writer {
    /// Creates this process's record: a memfd named [`MEMFD_NAME`]
    /// (`MFD_CLOEXEC`, so an `exec` drops it), mode 0600, sealed against
    /// shrinking and growing (a reader's mapping can never fault), mapped
    /// shared; the header is written before the magic. `allocator` is the
    /// allocator serving the process (`None`: another one, nothing to read).
    pub fn create(allocator: Option<Allocator>, interval: Duration) -> io::Result<Writer> {
        let stat = sys::read_proc_self("stat")?;
        let start_time = procfs::process::Stat::from_read(stat.as_slice())
            .map_err(|e| io::Error::other(format!("reading /proc/self/stat: {e}")))?
            .starttime;
        // Not owned until the record is set up: a program that closes every
        // descriptor meanwhile (from another thread) must not have a
        // number closed under it that may be its own file by then.
        let fd = ManuallyDrop::new(memfd_create(
            MEMFD_NAME,
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?);
        let st = fstat(&*fd)?;
        let map = match set_up(fd.as_fd()) {
            Ok(map) => map,
            Err(e) => {
                if fstat(&*fd).is_ok_and(|now| now.st_ino == st.st_ino && now.st_dev == st.st_dev) {
                    let _ = nix::unistd::close(ManuallyDrop::into_inner(fd));
                }
                return Err(e);
            }
        };
        let owner_uid = geteuid().as_raw();
        let h = &map.record().header;
        h.version.store(VERSION, Ordering::Relaxed);
        h.size
            .store(size_of::<RawRecord>() as u32, Ordering::Relaxed);
        h.pid.store(getpid().as_raw() as u32, Ordering::Relaxed);
        h.owner_uid.store(owner_uid, Ordering::Relaxed);
        h.start_time.store(start_time, Ordering::Relaxed);
        h.allocator
            .store(allocator_code(allocator), Ordering::Relaxed);
        h.state.store(STATE_LIVE, Ordering::Relaxed);
        h.interval_ns
            .store(duration_ns(interval), Ordering::Relaxed);
        h.created_mono_ns
            .store(sys::monotonic_ns(), Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(Writer {
            fd: Some(ManuallyDrop::into_inner(fd)),
            ino: st.st_ino,
            dev: st.st_dev,
            map,
            seq: 0,
            served: 0,
            owner_uid,
        })
    }

    /// Publishes `stats` (one seqlock write).
    pub fn publish(&mut self, stats: &Stats) {
        let r = self.map.record();
        seqlock::write(&r.seq, &r.data, &mut self.seq, stats);
    }

    /// The purge request waiting, if any (requests that arrived meanwhile
    /// are folded into it: one purge answers them all).
    pub fn pending_request(&self) -> Option<Request> {
        let c = &self.map.record().control;
        let ticket = c.request.load(Ordering::Acquire);
        (ticket != self.served).then(|| Request {
            ticket,
            requester_pid: c.requester_pid.load(Ordering::Relaxed),
            requester_uid: c.requester_uid.load(Ordering::Relaxed),
        })
    }

    /// Sleeps up to `timeout` or until a purge request arrives, and returns
    /// the request waiting then (the publisher's sleep between two
    /// publications: a request wakes it at once).
    pub fn wait_for_request(&self, timeout: Duration) -> Option<Request> {
        if let Some(r) = self.pending_request() {
            return Some(r);
        }
        sys::futex_wait(&self.map.record().control.request, self.served, timeout);
        self.pending_request()
    }

    /// Marks `request` served and wakes whoever waits for the answer.
    /// Publish the purge's outcome (in [`Stats::purge`]) first.
    pub fn answer(&mut self, request: &Request) {
        self.served = request.ticket;
        let c = &self.map.record().control;
        c.answered.store(request.ticket, Ordering::Release);
        sys::futex_wake(&c.answered);
    }

    /// Whether readers can still find the record: its descriptor is still
    /// open on the same memfd (a program may close every descriptor it does
    /// not know, or `dup2` over it).
    pub fn is_reachable(&self) -> bool {
        self.fd_is_ours()
    }

    /// The effective uid the record was created under (a process that
    /// changes uid should publish a new record, readable by its new owner).
    pub fn owner_uid(&self) -> u32 {
        self.owner_uid
    }

    /// Ends this record in favour of a new one: readers see
    /// [`crate::layout::STATE_SUPERSEDED`] and open the process again.
    pub fn supersede(self) {
        self.map
            .record()
            .header
            .state
            .store(STATE_SUPERSEDED, Ordering::Release);
    }

    /// What a `fork` child must release: see [`InheritedSlot`].
    pub fn inherited_parts(&self) -> InheritedParts {
        let (addr, len) = self.map.raw();
        InheritedParts {
            fd: self.fd.as_ref().map_or(-1, |f| f.as_raw_fd()),
            ino: self.ino,
            addr,
            len,
        }
    }

    fn fd_is_ours(&self) -> bool {
        self.fd
            .as_ref()
            .and_then(|fd| fstat(fd).ok())
            .is_some_and(|st| st.st_ino == self.ino && st.st_dev == self.dev)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let h = &self.map.record().header;
        let _ = h.state.compare_exchange(
            STATE_LIVE,
            STATE_CLOSED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        let ours = self.fd_is_ours();
        if let Some(fd) = self.fd.take() {
            if ours {
                // an EBADF (the program closed it an instant ago) closes
                // nothing: nix reports it instead of aborting as `OwnedFd`'s
                // drop does in debug builds
                let _ = nix::unistd::close(fd);
            } else {
                // The program closed our descriptor and the number may now
                // be one of its own files: never close it.
                let _ = fd.into_raw_fd();
            }
        }
    }
}

/// Where a record's descriptor and mapping are, so that the child of a
/// `fork` can let go of its parent's record (it publishes its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InheritedParts {
    /// The memfd's descriptor number.
    pub fd: RawFd,
    /// The memfd's inode.
    pub ino: u64,
    /// The mapping's address.
    pub addr: usize,
    /// The mapping's length.
    pub len: usize,
}

/// A static slot holding the current record's [`InheritedParts`] in
/// atomics, for a `pthread_atfork` child handler: [`InheritedSlot::abandon`]
/// is async-signal-safe (`fstat`, `close`, `munmap`; no allocation, no
/// lock), as code between `fork` and `exec` must be.
#[derive(Debug)]
pub struct InheritedSlot {
    fd: AtomicU64,
    ino: AtomicU64,
    addr: AtomicU64,
    len: AtomicU64,
}

impl Default for InheritedSlot {
    fn default() -> Self {
        InheritedSlot::new()
    }
}

impl InheritedSlot {
    /// An empty slot.
    pub const fn new() -> InheritedSlot {
        InheritedSlot {
            fd: AtomicU64::new(u64::MAX),
            ino: AtomicU64::new(0),
            addr: AtomicU64::new(0),
            len: AtomicU64::new(0),
        }
    }

    /// Remembers the current record (call after creating it).
    pub fn set(&self, p: InheritedParts) {
        self.addr.store(p.addr as u64, Ordering::Relaxed);
        self.len.store(p.len as u64, Ordering::Relaxed);
        self.ino.store(p.ino, Ordering::Relaxed);
        self.fd.store(p.fd as u64, Ordering::Release);
    }

    /// Forgets the record without touching it (the writer is dropped).
    pub fn clear(&self) {
        self.fd.store(u64::MAX, Ordering::Release);
    }

    /// In a `fork` child: closes the parent's record descriptor (only if it
    /// is still that memfd) and unmaps the parent's record, so the child
    /// neither shows nor writes its parent's record. Async-signal-safe.
    pub fn abandon(&self) {
        let fd = self.fd.swap(u64::MAX, Ordering::AcqRel);
        if fd == u64::MAX {
            return;
        }
        let fd = fd as RawFd;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a stat into st; fd is a number, valid or not.
        let same = unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0
            // SAFETY: fstat succeeded, so st is initialised.
            && unsafe { st.assume_init() }.st_ino == self.ino.load(Ordering::Relaxed);
        if same {
            // SAFETY: fd is the inherited memfd (same inode), which only the
            // record used; nothing in the child refers to it.
            unsafe { libc::close(fd) };
        }
        let (addr, len) = (
            self.addr.load(Ordering::Relaxed),
            self.len.load(Ordering::Relaxed),
        );
        if addr != 0 && len != 0 {
            // SAFETY: [addr, addr + len) is the parent's record mapping,
            // inherited by the child; the only thread that used it (the
            // parent's publisher) does not exist in the child.
            unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
        }
    }
}

/// Makes a new memfd the record: mode 0600, its size, sealed, mapped.
fn set_up(fd: BorrowedFd<'_>) -> io::Result<Mapping> {
    fchmod(fd, Mode::from_bits_truncate(0o600))?;
    ftruncate(fd, RECORD_LEN as libc::off_t)?;
    fcntl(
        fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Mapping::new(fd, true)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
