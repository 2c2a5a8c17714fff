//! `--timeline PATH`: one JSON object per line, in the timeline contract's
//! types (crate `amm-timeline`, whose docs describe the format and its
//! version rule).
//!
//! * a `tick` once per monitor tick: the accounting split, RSS (anon,
//!   file+shmem), `heap_live`, `allocator_resident`, `rss_moved` (how far
//!   RSS moved while the allocator was read), the limit, pause state and
//!   task counts, the SpillBuffer's counters, the cgroup's usage and page
//!   cache, and the allocator's statistics (`heap`: jemalloc totals,
//!   per-arena dirty/muzzy and per-size-class counts, or glibc `mallinfo2`,
//!   arena residency and `malloc_info` per arena);
//! * an `event` for `start` (each attempt), `spill`, `spill_failed`,
//!   `nothing_to_spill` (process memory above spill with no value left in
//!   memory, once per rise), `purge` (with what it returned), `pause`,
//!   `unpause`, `terminate`, the kernel's `level` and `spike` (through
//!   amm-agent), the workload's `phase`, `check` and `end`, and the nanny's
//!   `exit` (cause and exact peak) and `restart`.
//!
//! Every line has `t_ns`, CLOCK_MONOTONIC when it happened (the clock of
//! the kernel's events); a `spill` for process memory has `began_ns`, when
//! it started. Lines are flushed as written so a reader can follow a live
//! worker. A worker restarted by its nanny appends to the same file after a
//! `start` event.

pub use amm_timeline::monotonic_ns;

/// The timeline writer the manager, the workload and the agent link share.
pub type Timeline = amm_timeline::Writer;
