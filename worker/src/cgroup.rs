//! The memory cgroup this process lives in: the `amm-cgroup` crate, which
//! amm-agent shares (`amm-agent watch --limit auto` reads a target's cgroup
//! with it).

pub use amm_cgroup::*;
