//! Scheduling for the thread that waits for kernel events.
//!
//! An event is only as early as the thread that reads it gets a CPU. Two
//! ways to ask for one, tried in this order by [`ReaderPolicy::apply`]:
//!
//! - **`SCHED_FIFO`** at a low priority (1 by default), where the kernel
//!   allows it (root, `CAP_SYS_NICE`, or `RLIMIT_RTPRIO` at least that
//!   priority): woken, the thread runs before every normal thread at once,
//!   whatever their nice value or cgroup/autogroup. Safe for a thread that
//!   only blocks in `poll` and does a few µs of work per event (decode,
//!   wake the manager, write a timeline line): it cannot starve anything,
//!   and the kernel's RT throttling (`sched_rt_runtime_us`) and fair server
//!   bound it even if it misbehaved.
//! - **A short EEVDF time slice** (Linux 6.12+; normal policy, nice kept):
//!   a woken thread with a shorter slice preempts the one running instead
//!   of waiting for its slice to end, but only within its own group, and
//!   after the normal threads' lag: under a busy machine (others' builds in
//!   their own autogroups) it waited milliseconds (benches/RESULTS.md).
//!
//! What was granted is returned as [`InForce`], for the owner to log.

use std::fmt;
use std::io;
use std::time::Duration;

/// The slice asked for when `SCHED_FIFO` is not used or not allowed: the
/// shortest the kernel grants (it clamps to 0.1–100 ms).
pub const SHORT_SLICE: Duration = Duration::from_micros(100);

/// How the thread that waits for events asks to be scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderPolicy {
    /// Leave the thread as it was spawned.
    Inherit,
    /// Normal policy with [`SHORT_SLICE`].
    ShortSlice,
    /// `SCHED_FIFO` at this priority (1–99) where permitted, else
    /// [`ReaderPolicy::ShortSlice`].
    Realtime(u8),
}

/// The scheduling in force for the reader thread after
/// [`ReaderPolicy::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InForce {
    /// Left as spawned (asked for, or both requests refused: `refused`
    /// says why).
    Inherited {
        /// Why the requests were refused, if any were made.
        refused: Option<String>,
    },
    /// `SCHED_FIFO` at this priority.
    Fifo(u8),
    /// Normal policy with [`SHORT_SLICE`]; `fifo_refused` says why
    /// `SCHED_FIFO`, if asked for, was not granted.
    ShortSlice {
        /// The kernel's refusal of `SCHED_FIFO`, if it was asked for.
        fifo_refused: Option<String>,
    },
}

impl fmt::Display for InForce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InForce::Fifo(p) => write!(f, "SCHED_FIFO priority {p}"),
            InForce::ShortSlice { fifo_refused: None } => {
                write!(f, "normal policy, {} µs slice", SHORT_SLICE.as_micros())
            }
            InForce::ShortSlice {
                fifo_refused: Some(why),
            } => write!(
                f,
                "normal policy, {} µs slice (SCHED_FIFO refused: {why})",
                SHORT_SLICE.as_micros()
            ),
            InForce::Inherited { refused: None } => write!(f, "as spawned"),
            InForce::Inherited { refused: Some(why) } => {
                write!(f, "as spawned (requests refused: {why})")
            }
        }
    }
}

impl ReaderPolicy {
    /// Applies the policy to the calling thread and says what the kernel
    /// granted; never fails (a refusal falls back, and is in the answer).
    pub fn apply(self) -> InForce {
        let fifo_refused = match self {
            ReaderPolicy::Inherit => return InForce::Inherited { refused: None },
            ReaderPolicy::ShortSlice => None,
            ReaderPolicy::Realtime(priority) => match set_fifo(priority) {
                Ok(()) => return InForce::Fifo(priority),
                Err(e) => Some(fifo_refusal(priority, &e)),
            },
        };
        match request_short_slice(SHORT_SLICE) {
            Ok(()) => InForce::ShortSlice { fifo_refused },
            Err(e) => InForce::Inherited {
                refused: Some(match fifo_refused {
                    Some(f) => format!("SCHED_FIFO: {f}; short slice: {e}"),
                    None => format!("short slice: {e}"),
                }),
            },
        }
    }
}

/// The kernel's refusal of `SCHED_FIFO`, with what would allow it.
fn fifo_refusal(priority: u8, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::EPERM) {
        format!(
            "{e}: needs root, CAP_SYS_NICE or RLIMIT_RTPRIO >= {priority} (ulimit -r, limits.conf rtprio)"
        )
    } else {
        e.to_string()
    }
}

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

/// Moves the calling thread to `SCHED_FIFO` at `priority` (1–99).
pub fn set_fifo(priority: u8) -> io::Result<()> {
    set_policy(libc::SCHED_FIFO, i32::from(priority))
}

/// Moves the calling thread back to the normal scheduler (`SCHED_OTHER`):
/// a thread spawned by a `SCHED_FIFO` thread inherits its policy.
pub fn set_normal() -> io::Result<()> {
    set_policy(libc::SCHED_OTHER, 0)
}

/// sched_setscheduler(2) for the calling thread: neither nix nor rustix
/// wraps it, so it is this one call through libc.
fn set_policy(policy: i32, priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: param is a valid sched_param borrowed for the call; pid 0 is
    // the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
    use super::{InForce, ReaderPolicy};

    /// A field of /proc/thread-self/sched (`policy`, `prio`, `se.slice`),
    /// as the kernel reports it for the calling thread.
    fn sched_field(name: &str) -> Option<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = text
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))?;
        line.split(':').nth(1)?.trim().parse().ok()
    }

    /// Whether this process may use SCHED_FIFO priority 1: root (the
    /// agent's and CI's case) or an RLIMIT_RTPRIO of at least 1.
    fn fifo_permitted() -> bool {
        use nix::sys::resource::{Resource, getrlimit};
        nix::unistd::geteuid().is_root()
            || getrlimit(Resource::RLIMIT_RTPRIO).is_ok_and(|(soft, _)| soft >= 1)
    }

    /// Runs `f` on a fresh thread, so the test thread keeps its policy.
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("thread")
    }

    #[test]
    fn a_short_slice_is_granted_to_the_calling_thread() {
        on_thread(|| {
            assert_eq!(
                ReaderPolicy::ShortSlice.apply(),
                InForce::ShortSlice { fifo_refused: None }
            );
            assert_eq!(sched_field("policy"), Some(libc::SCHED_OTHER as u64));
            if let Some(ns) = sched_field("se.slice") {
                assert_eq!(ns, 100_000, "se.slice after asking for 0.1 ms");
            } else {
                println!("this kernel does not report se.slice; only the call was checked");
            }
        });
    }

    #[test]
    fn realtime_is_sched_fifo_where_permitted_and_the_short_slice_elsewhere() {
        let permitted = fifo_permitted();
        if !permitted && std::env::var_os("AMM_REQUIRE_ROOT").is_some() {
            panic!("AMM_REQUIRE_ROOT is set but this test may not use SCHED_FIFO");
        }
        on_thread(move || {
            let got = ReaderPolicy::Realtime(1).apply();
            let policy = sched_field("policy");
            if permitted {
                assert_eq!(got, InForce::Fifo(1));
                assert_eq!(policy, Some(libc::SCHED_FIFO as u64));
                // the kernel's prio of SCHED_FIFO priority p is 99 - p
                assert_eq!(sched_field("prio"), Some(98));
                // SAFETY: reads the calling thread's policy, no pointers
                assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_FIFO);
            } else {
                println!("SCHED_FIFO not permitted here: checking the fallback to the short slice");
                assert!(
                    matches!(&got, InForce::ShortSlice { fifo_refused: Some(why) } if why.contains("RLIMIT_RTPRIO")),
                    "{got:?}"
                );
                assert_eq!(policy, Some(libc::SCHED_OTHER as u64));
            }
            println!("in force: {got}");
        });
    }

    /// The agent's readers run as root, a user's worker often does not: as
    /// uid 65534 without capabilities, SCHED_FIFO is refused with what would
    /// allow it and the short slice is in force. Only the test's own thread
    /// changes uid (the raw `setresuid` syscall changes the calling thread's
    /// credentials, not the process's, unlike libc's wrapper).
    #[test]
    fn an_unprivileged_thread_falls_back_to_the_short_slice_with_the_reason() {
        use nix::sys::resource::{Resource, getrlimit};
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("AMM_REQUIRE_ROOT").is_none(),
                "AMM_REQUIRE_ROOT is set but this test cannot become uid 65534"
            );
            println!("SKIPPED: needs root to run one thread as uid 65534");
            return;
        }
        let rtprio = getrlimit(Resource::RLIMIT_RTPRIO).map_or(0, |(soft, _)| soft);
        let got = on_thread(move || {
            // SAFETY: plain integer arguments; affects the calling thread only.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
            let got = ReaderPolicy::Realtime(1).apply();
            // SAFETY: reads the calling thread's policy, no pointers
            let policy = unsafe { libc::sched_getscheduler(0) };
            (got, policy)
        });
        // a uid change makes the process non-dumpable; give the other tests
        // their /proc back as it was
        let _ = nix::sys::prctl::set_dumpable(true);
        let (got, policy) = got;
        println!("as uid 65534 (RLIMIT_RTPRIO {rtprio}): {got}");
        if rtprio >= 1 {
            assert_eq!(got, InForce::Fifo(1), "RLIMIT_RTPRIO allows priority 1");
            return;
        }
        assert!(
            matches!(&got, InForce::ShortSlice { fifo_refused: Some(why) } if why.contains("RLIMIT_RTPRIO")),
            "{got:?}"
        );
        assert_eq!(policy, libc::SCHED_OTHER);
    }

    #[test]
    fn a_priority_the_kernel_refuses_falls_back_to_the_short_slice_and_says_why() {
        on_thread(|| {
            let got = ReaderPolicy::Realtime(100).apply();
            let InForce::ShortSlice {
                fifo_refused: Some(why),
            } = &got
            else {
                panic!("SCHED_FIFO 100 does not exist, yet: {got:?}");
            };
            assert!(why.contains("Invalid argument"), "{why}");
            assert_eq!(sched_field("policy"), Some(libc::SCHED_OTHER as u64));
            assert!(got.to_string().contains("SCHED_FIFO refused"), "{got}");
        });
    }

    #[test]
    fn inherit_leaves_the_thread_alone() {
        on_thread(|| {
            assert_eq!(
                ReaderPolicy::Inherit.apply(),
                InForce::Inherited { refused: None }
            );
            assert_eq!(sched_field("policy"), Some(libc::SCHED_OTHER as u64));
        });
    }
}
