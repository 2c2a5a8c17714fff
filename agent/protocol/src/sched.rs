//! Scheduling for the thread that waits for events.
//!
//! On Linux 6.12+ (EEVDF) an ordinary, unprivileged thread may ask for a
//! shorter time slice; a woken thread with a shorter slice preempts the one
//! running instead of waiting for it to use up its own (up to a few ms).
//! That is the difference between an event read within ~0.1 ms and one read
//! a scheduler tick later when every CPU is busy.

use std::io;
use std::time::Duration;

/// `struct sched_attr` of sched_setattr(2).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// Asks the kernel for a `slice` time slice for the calling thread (normal
/// policy, its nice value kept). The kernel clamps it to 0.1–100 ms; older
/// kernels ignore the request or refuse it (the error says so).
pub fn request_short_slice(slice: Duration) -> io::Result<()> {
    // SAFETY: getpriority has no memory arguments.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: slice.as_nanos().min(u64::MAX as u128) as u64,
        ..SchedAttr::default()
    };
    // SAFETY: attr is a valid sched_attr of the size it declares; pid 0 is
    // the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
