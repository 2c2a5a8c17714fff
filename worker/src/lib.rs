//! amm-worker: a data-processing worker that keeps itself alive under memory
//! pressure, with Dask's memory model (target / spill / pause / terminate)
//! made allocator-aware.
//!
//! It knows live bytes from bytes the allocator merely hoards (jemalloc or
//! glibc statistics), gives hoarded memory back (purge/trim) before spilling
//! data, spills least-recently-used values to disk, pauses, and as a last
//! resort exits so that its nanny restarts it.
//!
//! What it must never do: need privileges (it polls `/proc/self` and its own
//! cgroup's files, all readable unprivileged), lose or corrupt data on bad
//! input or a full disk, or spin on a failing disk.

pub mod alloc;
pub mod cgroup;
pub mod config;
pub mod limit;
pub mod proc;
pub mod spill;
pub mod units;
