//! The vocabulary amm's kernel program shares with userspace.
//!
//! The program itself is C (`ebpf/c/amm.bpf.c`, structs in `ebpf/c/amm.h`),
//! compiled by `cargo xtask build-ebpf` into [`OBJECT_RELATIVE_PATH`]. This
//! crate holds the `#[repr(C)]` mirrors of the C structs, the levels and
//! event kinds, and nothing that loads BPF: aya is an optional dependency
//! (feature `aya`, only for its `Pod` trait), so the unprivileged worker can
//! use it. The mirrors are checked against the BTF in the compiled object by
//! `tests/tests/layout.rs`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `cargo xtask build-ebpf` writes the object, relative to the
/// workspace root.
pub const OBJECT_RELATIVE_PATH: &str = "target/bpf/amm.bpf.o";

/// Environment variable that overrides where binaries look for the object.
pub const OBJECT_ENV: &str = "AMM_BPF_OBJECT";

/// A threshold that is switched off (`AMM_DISABLED`).
pub const DISABLED: u64 = u64::MAX;

/// Words in the watched-tgid bitmap (`AMM_PID_WORDS`): 4 Mi bits, the
/// kernel's `PID_MAX_LIMIT`.
pub const PID_WORDS: u32 = 65536;

/// Size of a client's own ring buffer (`AMM_CLIENT_RING_BYTES`).
pub const CLIENT_RING_BYTES: u32 = 64 * 1024;

/// Most possible CPUs the program sums per-CPU counters over.
pub const MAX_CPUS: u32 = 512;

/// `amm_watch_config.flags`: signal the process at the page that crosses
/// terminate.
pub const WATCH_SIGNAL_ON_TERMINATE: u32 = 1 << 0;
/// `amm_watch_config.flags`: the process must keep the ids and (at most)
/// the capabilities in its config; a change ends the watch with
/// [`EventKind::Credentials`].
pub const WATCH_BIND_CREDENTIALS: u32 = 1 << 1;

/// `amm_watch_state.ended`: the watch is live.
pub const END_NONE: u32 = 0;
/// `amm_watch_state.ended`: the process changed credentials; nothing counts
/// for the watch any more.
pub const END_CREDENTIALS: u32 = 1;

/// `amm_event.flags`: the update was made by another task (`curr == 0`).
pub const EVENT_FLAG_FOREIGN: u32 = 1 << 0;
/// `amm_event.flags`: the program sent the terminate signal with this event.
pub const EVENT_FLAG_SIGNALLED: u32 = 1 << 1;

/// Names of the programs in the object, with the tracepoint each attaches to.
pub const PROGRAMS: [(&str, &str); 2] = [
    ("amm_rss_stat", "rss_stat"),
    ("amm_process_exit", "sched_process_exit"),
];

/// Names of the maps in the object.
pub mod maps {
    /// tgid → [`crate::Watch`].
    pub const WATCHES: &str = "watches";
    /// Bitmap of watched tgids, one `u64` word per 64 tgids.
    pub const WATCH_BITS: &str = "watch_bits";
    /// mm_struct address → tgid.
    pub const MM_OWNER: &str = "mm_owner";
    /// Ring buffer of [`crate::Event`].
    pub const EVENTS: &str = "events";
    /// tgid → the registering client's own ring buffer.
    pub const CLIENT_RINGS: &str = "client_rings";
    /// Per-CPU [`crate::Stats`].
    pub const STATS: &str = "stats";
}

/// Names of the `.rodata` globals the loader sets.
pub mod globals {
    /// Number of possible CPUs (`u32`).
    pub const NR_CPUS: &str = "nr_cpus";
    /// log2 of the page size (`u32`).
    pub const PAGE_SHIFT: &str = "page_shift";
    /// Length of one growth-rate window in ns (`u64`).
    pub const RATE_WINDOW_NS: &str = "rate_window_ns";
}

/// Memory level of a watched process, in increasing urgency
/// (`enum amm_level`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum Level {
    /// Below the spill threshold (or fallen back below the re-arm level).
    #[default]
    Below,
    /// At or above spill.
    Spill,
    /// At or above pause.
    Pause,
    /// At or above terminate.
    Terminate,
}

impl Level {
    /// Every level, in increasing urgency.
    pub const ALL: [Self; 4] = [Self::Below, Self::Spill, Self::Pause, Self::Terminate];

    /// The level for the C constant `AMM_LEVEL_*`, if it is one.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.raw() == raw)
    }

    /// The C constant `AMM_LEVEL_*`.
    pub fn raw(self) -> u32 {
        self as u32
    }

    /// The lowercase name used in JSON and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Below => "below",
            Self::Spill => "spill",
            Self::Pause => "pause",
            Self::Terminate => "terminate",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Kind of a ring-buffer event (`enum amm_event_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum EventKind {
    /// The level changed: up, or down below the re-arm level.
    Level = 1,
    /// The growth rate predicts terminate within the horizon.
    Spike = 2,
    /// The watched process exited; the program removed its entries.
    Exit = 3,
    /// The watched process's credentials changed (setuid/setgid or
    /// file-capability exec, setresuid): the program stopped counting,
    /// emitting and signalling for it; the watch is over.
    Credentials = 4,
}

impl EventKind {
    /// Every kind, in C order.
    pub const ALL: [Self; 4] = [Self::Level, Self::Spike, Self::Exit, Self::Credentials];

    /// The kind for the C constant `AMM_EVENT_*`, if it is one.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.raw() == raw)
    }

    /// The C constant `AMM_EVENT_*`.
    pub fn raw(self) -> u32 {
        self as u32
    }

    /// The lowercase name used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Level => "level",
            Self::Spike => "spike",
            Self::Exit => "exit",
            Self::Credentials => "credentials",
        }
    }
}

/// Mirror of `struct amm_watch_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchConfig {
    /// The memory limit the fractions refer to.
    pub limit_bytes: u64,
    /// Below this a raised level falls back to below (Dask's target).
    pub rearm_bytes: u64,
    /// Spill threshold, or [`DISABLED`].
    pub spill_bytes: u64,
    /// Pause threshold, or [`DISABLED`].
    pub pause_bytes: u64,
    /// Terminate threshold, or [`DISABLED`].
    pub terminate_bytes: u64,
    /// Spike alarm horizon; 0 switches the alarm off.
    pub spike_horizon_ns: u64,
    /// `WATCH_*` bits.
    pub flags: u32,
    /// Signal sent with [`WATCH_SIGNAL_ON_TERMINATE`].
    pub signal: u32,
    /// CLOCK_BOOTTIME ns at which the agent last saw the process running: a
    /// task whose thread group leader started later (a recycled pid) never
    /// matches the watch.
    pub born_before_ns: u64,
    /// With [`WATCH_BIND_CREDENTIALS`]: the capabilities the process may
    /// hold.
    pub cap_permitted: u64,
    /// With [`WATCH_BIND_CREDENTIALS`]: its real uid.
    pub uid: u32,
    /// Its effective uid.
    pub euid: u32,
    /// Its saved uid.
    pub suid: u32,
    /// Its real gid.
    pub gid: u32,
    /// Its effective gid.
    pub egid: u32,
    /// Its saved gid.
    pub sgid: u32,
}

/// Mirror of `struct amm_watch_state`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchState {
    /// Address of the mm_struct followed (0 until the first update).
    pub mm: u64,
    /// Exact RSS counters in pages: FILE, ANON, SWAPENTS (unused), SHMEM.
    pub rss_pages: [i64; 4],
    /// FILE + ANON + SHMEM in bytes.
    pub rss_bytes: u64,
    /// Highest `rss_bytes` seen.
    pub peak_rss_bytes: u64,
    /// minflt + majflt of the process, set at exit.
    pub faults: u64,
    /// Smoothed growth rate.
    pub rate_bytes_per_ms: i64,
    /// Start of the current rate window.
    pub window_start_ns: u64,
    /// RSS at the start of the window.
    pub window_start_rss: u64,
    /// rss_stat updates seen.
    pub updates: u64,
    /// Of which made by another task (`curr == 0`).
    pub foreign_updates: u64,
    /// Current level (`AMM_LEVEL_*`).
    pub level: u32,
    /// A spike alarm is out and not re-armed yet.
    pub spike_active: u32,
    /// Since when the growth has been calm (the alarm re-arms after a
    /// horizon of calm); 0 while it is not.
    pub spike_calm_since_ns: u64,
    /// [`END_NONE`], or why the kernel ended the watch ([`END_CREDENTIALS`]).
    pub ended: u32,
    /// Padding, zero.
    pub reserved: u32,
}

/// Mirror of `struct amm_watch`, the value of the `watches` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    /// Written by userspace.
    pub config: WatchConfig,
    /// Kept by the program.
    pub state: WatchState,
}

/// Mirror of `struct amm_event`, one ring-buffer record.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub t_ns: u64,
    /// The watched process.
    pub tgid: u32,
    /// `AMM_EVENT_*`.
    pub kind: u32,
    /// Level after the event.
    pub level: u32,
    /// Level before it.
    pub prev_level: u32,
    /// RSS at the event.
    pub rss_bytes: u64,
    /// Peak RSS so far.
    pub peak_rss_bytes: u64,
    /// Exit: minflt + majflt of the whole process.
    pub faults: u64,
    /// Smoothed growth rate.
    pub rate_bytes_per_ms: i64,
    /// Spike: predicted time until terminate.
    pub eta_ns: u64,
    /// `EVENT_FLAG_*`.
    pub flags: u32,
    /// CPU the program ran on.
    pub cpu: u32,
}

/// Mirror of `struct amm_stats`, per CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records submitted.
    pub events: u64,
    /// Records lost to a full ring buffer.
    pub dropped: u64,
    /// Watches bound to their mm.
    pub bound: u64,
    /// Watches removed by process exit.
    pub exits: u64,
    /// Updates of a watched pid by another process than the watched one (a
    /// recycled pid), ignored.
    pub strangers: u64,
    /// Watches ended by a credentials change.
    pub credentials: u64,
}

// SAFETY: each type is repr(C), made only of integers, with no implicit
// padding (the layout test checks the C side has the same offsets), so any
// bit pattern is a valid value.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for WatchConfig {}
// SAFETY: as above.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for WatchState {}
// SAFETY: as above.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for Watch {}
// SAFETY: as above.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for Event {}
// SAFETY: as above.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for Stats {}

impl Event {
    /// Decodes one ring-buffer record; `None` if it is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: Event is repr(C), every bit pattern is a valid value, and
        // the length was checked; read_unaligned copes with any alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

/// A C struct and its Rust mirror: name, size and field offsets, for the
/// layout check against the object's BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The C struct's name.
    pub c_name: &'static str,
    /// `size_of` the mirror.
    pub size: usize,
    /// Field names as in C, with the mirror's offsets.
    pub fields: Vec<(&'static str, usize)>,
}

macro_rules! layout {
    ($c:literal, $t:ty, [$($f:ident),* $(,)?]) => {
        Layout {
            c_name: $c,
            size: std::mem::size_of::<$t>(),
            fields: vec![$((stringify!($f), std::mem::offset_of!($t, $f))),*],
        }
    };
}

/// Layouts of every mirrored struct.
pub fn layouts() -> Vec<Layout> {
    vec![
        layout!(
            "amm_watch_config",
            WatchConfig,
            [
                limit_bytes,
                rearm_bytes,
                spill_bytes,
                pause_bytes,
                terminate_bytes,
                spike_horizon_ns,
                flags,
                signal,
                born_before_ns,
                cap_permitted,
                uid,
                euid,
                suid,
                gid,
                egid,
                sgid
            ]
        ),
        layout!(
            "amm_watch_state",
            WatchState,
            [
                mm,
                rss_pages,
                rss_bytes,
                peak_rss_bytes,
                faults,
                rate_bytes_per_ms,
                window_start_ns,
                window_start_rss,
                updates,
                foreign_updates,
                level,
                spike_active,
                spike_calm_since_ns,
                ended,
                reserved
            ]
        ),
        layout!("amm_watch", Watch, [config, state]),
        layout!(
            "amm_event",
            Event,
            [
                t_ns,
                tgid,
                kind,
                level,
                prev_level,
                rss_bytes,
                peak_rss_bytes,
                faults,
                rate_bytes_per_ms,
                eta_ns,
                flags,
                cpu
            ]
        ),
        layout!(
            "amm_stats",
            Stats,
            [events, dropped, bound, exits, strangers, credentials]
        ),
    ]
}

/// A C enum of `amm.h` and the values the Rust side gives its members, for
/// the layout check against the object's BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CEnum {
    /// The C enum's name.
    pub c_name: &'static str,
    /// Every member, as C names it, with the Rust value.
    pub members: Vec<(&'static str, u64)>,
}

/// Every enum shared with the C side.
pub fn c_enums() -> Vec<CEnum> {
    let level = |l: Level| u64::from(l.raw());
    let kind = |k: EventKind| u64::from(k.raw());
    vec![
        CEnum {
            c_name: "amm_level",
            members: vec![
                ("AMM_LEVEL_BELOW", level(Level::Below)),
                ("AMM_LEVEL_SPILL", level(Level::Spill)),
                ("AMM_LEVEL_PAUSE", level(Level::Pause)),
                ("AMM_LEVEL_TERMINATE", level(Level::Terminate)),
            ],
        },
        CEnum {
            c_name: "amm_event_kind",
            members: vec![
                ("AMM_EVENT_LEVEL", kind(EventKind::Level)),
                ("AMM_EVENT_SPIKE", kind(EventKind::Spike)),
                ("AMM_EVENT_EXIT", kind(EventKind::Exit)),
                ("AMM_EVENT_CREDENTIALS", kind(EventKind::Credentials)),
            ],
        },
        CEnum {
            c_name: "amm_watch_flag",
            members: vec![
                (
                    "AMM_WATCH_SIGNAL_ON_TERMINATE",
                    u64::from(WATCH_SIGNAL_ON_TERMINATE),
                ),
                (
                    "AMM_WATCH_BIND_CREDENTIALS",
                    u64::from(WATCH_BIND_CREDENTIALS),
                ),
            ],
        },
        CEnum {
            c_name: "amm_event_flag",
            members: vec![
                ("AMM_EVENT_FLAG_FOREIGN", u64::from(EVENT_FLAG_FOREIGN)),
                ("AMM_EVENT_FLAG_SIGNALLED", u64::from(EVENT_FLAG_SIGNALLED)),
            ],
        },
        CEnum {
            c_name: "amm_end",
            members: vec![
                ("AMM_END_NONE", u64::from(END_NONE)),
                ("AMM_END_CREDENTIALS", u64::from(END_CREDENTIALS)),
            ],
        },
        CEnum {
            c_name: "amm_limit",
            members: vec![
                ("AMM_PID_WORDS", u64::from(PID_WORDS)),
                ("AMM_CLIENT_RING_BYTES", u64::from(CLIENT_RING_BYTES)),
                ("AMM_MAX_CPUS", u64::from(MAX_CPUS)),
            ],
        },
    ]
}

/// Where a binary should load the object from: `$AMM_BPF_OBJECT`, then
/// `<workspace>/target/bpf/amm.bpf.o` next to the running executable's
/// target directory, then `/usr/lib/amm/amm.bpf.o`. Returns every candidate
/// in that order; the caller takes the first that exists.
pub fn object_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(OBJECT_ENV) {
        out.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/exe or target/<profile>/deps/exe
        for dir in exe.ancestors().skip(1).take(3) {
            if dir.file_name().is_some_and(|n| n == "target") {
                out.push(dir.join("bpf").join("amm.bpf.o"));
            }
        }
    }
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(OBJECT_RELATIVE_PATH),
    );
    out.push(PathBuf::from("/usr/lib/amm/amm.bpf.o"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip_and_order() {
        for raw in 0..4 {
            let l = Level::from_raw(raw).expect("known level");
            assert_eq!(l.raw(), raw);
        }
        assert!(Level::from_raw(4).is_none());
        assert!(Level::Below < Level::Spill && Level::Pause < Level::Terminate);
    }

    #[test]
    fn event_decoding_needs_a_whole_record() {
        let e = Event {
            t_ns: 7,
            tgid: 42,
            kind: 3,
            ..Event::default()
        };
        // SAFETY: Event is repr(C) plain data; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts((&e as *const Event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(Event::from_bytes(bytes), Some(e));
        assert_eq!(Event::from_bytes(&bytes[..bytes.len() - 1]), None);
    }
}
