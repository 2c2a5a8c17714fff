//! The scheduling policy of the agent's threads: the relay runs under
//! `SCHED_FIFO` so an event is relayed the moment it happens; everything
//! else (the HTTP thread) runs under the normal scheduler and can never
//! take the CPU from it.

use std::io;

/// sched_setscheduler(2) for the calling thread: neither nix nor rustix
/// wraps it, so it is this one call through libc.
fn set_policy(policy: i32, priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: param is a valid sched_param; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Moves the calling thread to `SCHED_FIFO` at `priority` (1-99).
pub fn set_fifo(priority: u8) -> io::Result<()> {
    set_policy(libc::SCHED_FIFO, i32::from(priority))
}

/// Moves the calling thread back to the normal scheduler (`SCHED_OTHER`):
/// a thread spawned by a `SCHED_FIFO` thread inherits its policy.
pub fn set_normal() -> io::Result<()> {
    set_policy(libc::SCHED_OTHER, 0)
}
