//! Scheduling for the thread that waits for events.
//!
//! On Linux 6.12+ (EEVDF) an ordinary, unprivileged thread may ask for a
//! shorter time slice; a woken thread with a shorter slice preempts the one
//! running instead of waiting for it to use up its own (up to a few ms).
//! That is the difference between an event read within ~0.1 ms and one read
//! a scheduler tick later when every CPU is busy.

use std::io;
use std::time::Duration;

/// Asks the kernel for a `slice` time slice for the calling thread (normal
/// policy, its nice value kept). The kernel clamps it to 0.1–100 ms; older
/// kernels ignore the request or refuse it (the error says so).
pub fn request_short_slice(slice: Duration) -> io::Result<()> {
    let nice = rustix::process::getpriority_process(None)?;
    set_attr(&libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: slice.as_nanos().min(u64::MAX as u128) as u64,
        sched_deadline: 0,
        sched_period: 0,
    })
}

/// sched_setattr(2) for the calling thread: neither nix nor rustix wraps
/// it, so it is this one call through `libc::syscall`.
fn set_attr(attr: &libc::sched_attr) -> io::Result<()> {
    // SAFETY: attr is a valid sched_attr of the size it declares, borrowed
    // for the call; pid 0 is the calling thread; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(attr), 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// The slice the kernel reports for the calling thread, in ns, where it
    /// reports one (`se.slice` in /proc/thread-self/sched, Linux 6.12+).
    fn reported_slice() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = text.lines().find(|l| l.starts_with("se.slice"))?;
        line.split(':').nth(1)?.trim().parse().ok()
    }

    #[test]
    fn a_short_slice_is_granted_to_the_calling_thread() {
        std::thread::spawn(|| {
            super::request_short_slice(Duration::from_micros(100)).expect("sched_setattr");
            if let Some(ns) = reported_slice() {
                assert_eq!(ns, 100_000, "se.slice after asking for 0.1 ms");
            } else {
                println!("this kernel does not report se.slice; only the call was checked");
            }
        })
        .join()
        .expect("thread");
    }
}
