//! The two clocks the agent reads: CLOCK_MONOTONIC (the kernel's event
//! stamps, `bpf_ktime_get_ns`) and CLOCK_BOOTTIME (a task's
//! `start_boottime`, which binds a watch to the process it was made for).
//! Both are read by `amm_record::sys`, the workspace's one clock reader.

pub use amm_record::sys::{boottime_ns, monotonic_ns};

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
