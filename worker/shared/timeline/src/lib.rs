//! amm-timeline: the one contract between everything that records a
//! worker's memory over time and everything that reads it.
//!
//! Writers: `amm-worker` (its memory manager's ticks, its workload's events,
//! its nanny's exits and restarts, the summary), the supervisor of
//! `amm-worker -- CMD`, `amm-agent watch`, the agent's per-worker timeline
//! and the Dask plugin. Reader: the report (`amm-report`). They all use the
//! types here, so a new source cannot drift from the reader.
//!
//! # The file
//!
//! JSON lines, one [`Line`] each, flushed as written so a reader can follow a
//! live process:
//!
//! ```text
//! {"v":1,"t_ms":200,"t_ns":81234567890,"kind":"tick","process":104857600,"managed":0,...}
//! {"v":1,"t_ms":250,"t_ns":81284567890,"kind":"event","event":"purge","reason":"probe",...}
//! ```
//!
//! * `v` — [`VERSION`] of the contract the line was written with (a line
//!   without it was written before the contract existed, by amm 473be8f or
//!   earlier, and reads the same as version 1).
//! * `t_ms` — milliseconds since the writing process started (each attempt
//!   of a restarted worker starts again at 0 after its `start` event);
//!   `t_ns` — CLOCK_MONOTONIC when it happened (the clock of the kernel's
//!   events).
//! * `kind` — `tick` ([`Tick`]: the accounting [`Split`] and the
//!   allocator's statistics [`Heap`]) or `event` ([`Event`], named by
//!   `event`).
//!
//! # Versions
//!
//! Adding an optional field or a new event does not change [`VERSION`]:
//! readers ignore fields they do not know and read unknown events as
//! [`Event::Other`]. A change of meaning (a field renamed, a unit changed)
//! bumps it, and a reader refuses lines newer than it knows with
//! [`ReadError::Newer`], which says to upgrade.
//!
//! # Reading
//!
//! [`Reader`] streams a file line by line with a cap on a line's length
//! ([`MAX_LINE`]): a 300 MiB line or `/dev/zero` is never held in memory.
//! A line that is not UTF-8, not JSON or not a timeline line is skipped and
//! reported with its number ([`Skipped`]); the caller decides what the rest
//! is worth (the report uses it and says what it skipped).
//!
//! The summary a process prints when it ends is a [`Summary`].

mod event;
mod heap;
mod line;
mod read;
pub mod record;
mod split;
mod summary;
mod tick;
mod write;

pub use amm_ebpf::Level;
pub use event::{
    AgentConnected, AgentReason, AgentV0, Check, End, Event, Exit, Hook, Killer, LevelCrossing,
    Levels, NothingToSpill, PauseChange, PeakSource, Phase, PurgeReport, Restart, Spike, Spill,
    SpillFailed, SpillGaveUp, SpillResumed, Start, Terminate,
};
pub use heap::{Allocator, ArenaPages, GlibcArena, GlibcStats, Heap, JemallocStats, SizeClass};
pub use line::{Entry, Line, VERSION};
pub use read::{Item, MAX_LINE, ReadError, Reader, Skipped};
pub use split::Split;
pub use summary::{Attempt, Summary, Verdict};
pub use tick::{CgroupUsage, SpillStats, Tick};
pub use write::{Writer, monotonic_ns};
