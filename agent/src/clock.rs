//! The two clocks the agent reads: CLOCK_MONOTONIC (the kernel's event
//! stamps, `bpf_ktime_get_ns`) and CLOCK_BOOTTIME (a task's
//! `start_boottime`, which binds a watch to the process it was made for).

use nix::time::{ClockId, clock_gettime};

fn now_ns(clock: ClockId) -> u64 {
    // both clocks exist on every Linux the agent runs on; 0 would only make
    // a delay look long or a watch match nothing
    clock_gettime(clock).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

/// CLOCK_MONOTONIC now, in ns (the clock of the kernel's event stamps).
pub fn monotonic_ns() -> u64 {
    now_ns(ClockId::CLOCK_MONOTONIC)
}

/// CLOCK_BOOTTIME now, in ns (the clock of `task_struct::start_boottime`).
pub fn boottime_ns() -> u64 {
    now_ns(ClockId::CLOCK_BOOTTIME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_move_forward_and_boottime_is_not_behind_monotonic() {
        let (m0, b0) = (monotonic_ns(), boottime_ns());
        let (m1, b1) = (monotonic_ns(), boottime_ns());
        assert!(m0 > 0 && m1 >= m0 && b1 >= b0);
        // boottime counts suspend too, so it is never behind monotonic
        assert!(b0 + 1_000_000 >= m0, "boottime {b0} monotonic {m0}");
    }
}
