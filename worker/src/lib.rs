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
//! input or a full disk, or die because it was asked for its spilled data.
//!
//! Modules: [`alloc`] (allocator choice, statistics, purge/trim), [`proc`]
//! (what the kernel counts; the cgroup's side is the `amm-cgroup` crate),
//! [`limit`] (`--memory-limit`), [`config`] (Dask's keys), [`spill`]
//! (SpillBuffer and its disk format), [`memory`] (MemoryManager and
//! thresholds), [`pool`] (task threads),
//! [`workload`] and [`compute`] (what runs), [`worker`] and [`nanny`] (the
//! two processes), [`timeline`] and [`summary`] (what is reported), [`cli`],
//! [`agent`] (the optional link to amm-agent's kernel events).

pub mod agent;
pub mod alloc;
pub mod child;
pub mod cli;
pub mod compute;
pub mod config;
pub mod hook;
pub mod inject;
pub mod limit;
pub mod memory;
pub mod nanny;
pub mod pool;
pub mod proc;
pub mod report_live;
pub mod rng;
pub mod signals;
pub mod spill;
pub mod summary;
pub mod timeline;
pub mod trusted_path;
pub mod units;
pub mod worker;
pub mod workload;
