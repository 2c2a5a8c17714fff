//! The numeric kernels behind the `matmul` and `sparse` workloads, each with
//! the direct computation its result is checked against.

pub mod matmul;
pub mod sparse;
