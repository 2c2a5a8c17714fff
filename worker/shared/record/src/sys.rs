//! The few system calls nix has no wrapper for (shared futexes), and the
//! clocks, each behind one small safe function.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// `CLOCK_MONOTONIC` in nanoseconds (0 if the clock cannot be read).
pub fn monotonic_ns() -> u64 {
    clock_ns(ClockId::CLOCK_MONOTONIC)
}

/// `CLOCK_BOOTTIME` in nanoseconds (the clock of a task's `start_boottime`,
/// which binds a watch to the process it was made for).
pub fn boottime_ns() -> u64 {
    clock_ns(ClockId::CLOCK_BOOTTIME)
}

/// `CLOCK_REALTIME` in nanoseconds since the Unix epoch.
pub fn unix_ns() -> u64 {
    clock_ns(ClockId::CLOCK_REALTIME)
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`), nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(ClockId::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(id: ClockId) -> u64 {
    clock_gettime(id)
        .map(|t| {
            (t.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

/// Sleeps while `word` holds `expected`, at most `timeout`; returns early
/// when another thread or process calls [`futex_wake`] on the same shared
/// word (or spuriously). The word may live in memory shared between
/// processes, so the operation is not `FUTEX_PRIVATE`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call;
    // the kernel only reads it and the timespec. EAGAIN (the value already
    // changed), EINTR and ETIMEDOUT all mean "look again", so the result is
    // ignored.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter of [`futex_wait`] on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE reads nothing else.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Reads the whole of `/proc/self/<name>` without ever closing a
/// descriptor the program closed.
///
/// The publisher runs inside programs that may close every descriptor they
/// did not open (`close_range(3, ~0)`, as daemons do) from another thread
/// at any moment. A plain `File` would then close a number that is no
/// longer ours (Rust's debug builds abort the process on that; a release
/// build closes whatever file the program opened meanwhile under the same
/// number). So the descriptor is never owned: it is read with `pread`
/// (which moves no file offset, so reading a program's file by mistake
/// changes nothing), and closed only if it still is the file the path names
/// (same device and inode); otherwise the number is left to the program and
/// the read fails, to be retried at the next publication.
pub fn read_proc_self(name: &str) -> std::io::Result<Vec<u8>> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::{Mode, fstat, stat};
    use std::mem::ManuallyDrop;

    let path = format!("/proc/self/{name}");
    let fd = ManuallyDrop::new(open(
        path.as_str(),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?);
    // after the open, so the path names the file just opened
    let want = stat(path.as_str()).map(|s| (s.st_dev, s.st_ino));
    let ours = || {
        let got = fstat(&*fd).map(|s| (s.st_dev, s.st_ino));
        matches!((got, want), (Ok(g), Ok(w)) if g == w)
    };
    let mut out = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let read = loop {
        match nix::sys::uio::pread(&*fd, &mut chunk, out.len() as libc::off_t) {
            Ok(0) => break Ok(()),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break Err(e),
        }
    };
    if !ours() {
        return Err(std::io::Error::other(format!(
            "{path}: the program closed the descriptor while it was read"
        )));
    }
    // Still ours an instant ago. An EBADF here (closed since) closes
    // nothing, so it is ignored.
    let _ = nix::unistd::close(ManuallyDrop::into_inner(fd));
    read?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_proc_self_file_whole_and_closes_it() {
        let fds = || {
            std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let before = fds();
        let maps = read_proc_self("maps").expect("maps");
        let text = String::from_utf8_lossy(&maps);
        assert!(text.contains("[stack]") && text.ends_with('\n'), "{text}");
        assert_eq!(fds(), before, "the descriptor was not closed");
        assert!(read_proc_self("no-such-file").is_err());
    }
}
