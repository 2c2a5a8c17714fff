//! The BPF side seen from userspace: load the object, attach its BTF
//! tracepoints, and read and write its maps.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use amm_ebpf::{Event, PROGRAMS, Stats, Watch, WatchConfig, WatchState, globals, maps};
use aya::maps::{Array, HashMap, HashOfMaps, IterableMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::{Btf, Ebpf, EbpfLoader};
use nix::errno::Errno;

/// Why the probe could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No object file was found.
    #[error(
        "the BPF object was not found (looked in {0}); build it with `cargo xtask build-ebpf` or point AMM_BPF_OBJECT at it"
    )]
    ObjectMissing(String),
    /// The kernel has no BTF to load tp_btf programs against.
    #[error(
        "cannot read the kernel's BTF ({0}); amm needs a kernel built with CONFIG_DEBUG_INFO_BTF (/sys/kernel/btf/vmlinux)"
    )]
    Btf(#[source] aya::BtfError),
    /// Loading failed (often: not root).
    #[error(
        "cannot load the BPF object {path}: {source}{hint}",
        hint = if is_root() { "" } else { "; loading BPF needs root (CAP_BPF and CAP_PERFMON)" }
    )]
    Load {
        /// The object.
        path: PathBuf,
        /// aya's error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program is missing from the object or would not load or attach.
    #[error("BPF program {name}: {detail}")]
    Program {
        /// The program.
        name: &'static str,
        /// What went wrong (with the verifier log when there is one).
        detail: String,
    },
    /// A map is missing from the object or has the wrong type.
    #[error("BPF map {name}: {detail}")]
    Map {
        /// The map.
        name: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A map operation failed.
    #[error("BPF map operation failed: {0}")]
    MapOp(#[from] MapError),
    /// The pid cannot be watched (pid 0, or above the kernel's PID limit).
    #[error("pid {0} cannot be watched")]
    BadPid(u32),
    /// A watch config not bound to a process (it would match any holder of
    /// the pid).
    #[error("the watch of pid {0} is bound to no process (born_before_ns is 0)")]
    Unbound(u32),
    /// Reading system facts failed.
    #[error("{0}")]
    System(String),
}

impl ProbeError {
    /// True when the probe's maps hold as many watches as they can.
    pub fn is_full(&self) -> bool {
        match self {
            Self::MapOp(MapError::SyscallError(e)) => {
                e.io_error.raw_os_error() == Some(Errno::E2BIG as i32)
            }
            _ => false,
        }
    }
}

/// The credentials a watched process must keep: a change (setuid/setgid or
/// file-capability exec, setresuid) ends its watch in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// Real, effective, saved uid.
    pub uids: [u32; 3],
    /// Real, effective, saved gid.
    pub gids: [u32; 3],
    /// Capabilities it may hold (more is a change).
    pub cap_permitted: u64,
}

impl Credentials {
    /// The credentials /proc showed for the process.
    pub fn of(info: &crate::identity::ProcInfo) -> Self {
        Self {
            uids: [info.uids[0], info.uids[1], info.uids[2]],
            gids: [info.gids[0], info.gids[1], info.gids[2]],
            cap_permitted: info.cap_permitted,
        }
    }
}

/// Whom a watch is for: the kernel program matches a task to it only if
/// its thread group's leader started at or before `born_before_ns` (see
/// [`crate::identity::Verified::born_before_ns`]) and, with `credentials`,
/// only while the task keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// CLOCK_BOOTTIME at which the process was last seen running.
    pub born_before_ns: u64,
    /// The credentials it must keep (`None`: not checked, for
    /// `amm-agent watch`, which never signals).
    pub credentials: Option<Credentials>,
}

impl Binding {
    /// The binding of a process the agent verified for a client: its time
    /// and its credentials.
    pub fn of(v: &crate::identity::Verified) -> Self {
        Self {
            born_before_ns: v.born_before_ns,
            credentials: Some(Credentials::of(&v.info)),
        }
    }
}

/// The program's watch configuration for thresholds in bytes, a spike
/// horizon, the terminate-signal flags (`0, 0` for none) and the process it
/// is bound to.
pub fn watch_config(
    t: &amm_protocol::ThresholdBytes,
    spike_horizon: std::time::Duration,
    flags: u32,
    signal: u32,
    binding: &Binding,
) -> WatchConfig {
    let mut c = WatchConfig {
        limit_bytes: t.limit,
        rearm_bytes: t.rearm,
        spill_bytes: t.spill,
        pause_bytes: t.pause,
        terminate_bytes: t.terminate,
        spike_horizon_ns: spike_horizon.as_nanos().min(u64::MAX as u128) as u64,
        flags,
        signal,
        born_before_ns: binding.born_before_ns,
        ..WatchConfig::default()
    };
    if let Some(cr) = binding.credentials {
        c.flags |= amm_ebpf::WATCH_BIND_CREDENTIALS;
        [c.uid, c.euid, c.suid] = cr.uids;
        [c.gid, c.egid, c.sgid] = cr.gids;
        c.cap_permitted = cr.cap_permitted;
    }
    c
}

/// The exit of a watched process that no kernel exit event reported (it
/// exited before the watch was in place, or the ring buffer was full),
/// made up at `t_ns` from the probe's last `state` of it.
pub fn exit_from_state(
    pid: u32,
    state: &WatchState,
    faults: Option<u64>,
    t_ns: u64,
) -> amm_protocol::EventMessage {
    let level = amm_ebpf::Level::from_raw(state.level).unwrap_or(amm_ebpf::Level::Below);
    amm_protocol::EventMessage {
        event: amm_ebpf::EventKind::Exit,
        t_ns,
        pid,
        rss_bytes: state.rss_bytes,
        level,
        prev_level: level,
        peak_rss_bytes: state.peak_rss_bytes,
        faults,
        rate_bytes_per_ms: state.rate_bytes_per_ms,
        eta_ns: None,
        foreign: false,
        signalled: false,
    }
}

/// True when the process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Finds the object to load: an explicit path, or the first candidate of
/// [`amm_ebpf::object_candidates`] that exists.
pub fn find_object(explicit: Option<&Path>) -> Result<PathBuf, ProbeError> {
    if let Some(p) = explicit {
        return if p.exists() {
            Ok(p.to_path_buf())
        } else {
            Err(ProbeError::ObjectMissing(p.display().to_string()))
        };
    }
    let candidates = amm_ebpf::object_candidates();
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or_else(|| {
            ProbeError::ObjectMissing(
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

fn page_shift() -> u32 {
    amm_protocol::sys::page_size().trailing_zeros()
}

fn possible_cpus() -> Result<u32, ProbeError> {
    let n = aya::util::nr_cpus().map_err(|(what, e)| {
        ProbeError::System(format!("cannot read the possible CPUs from {what}: {e}"))
    })? as u32;
    if n > amm_ebpf::MAX_CPUS {
        return Err(ProbeError::System(format!(
            "this machine has {n} possible CPUs; amm's probe sums at most {}",
            amm_ebpf::MAX_CPUS
        )));
    }
    Ok(n)
}

/// The loaded, attached probe and handles on its maps.
pub struct Probe {
    ebpf: Ebpf,
    btf: Btf,
    watches: HashMap<MapData, u32, Watch>,
    bits: Array<MapData, u64>,
    mm_owner: HashMap<MapData, u64, u32>,
    client_rings: HashOfMaps<MapData, u32>,
    stats: PerCpuArray<MapData, Stats>,
    events: Option<RingBuf<MapData>>,
    links: Vec<(&'static str, BtfTracePointLinkId)>,
    path: PathBuf,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("path", &self.path)
            .field("attached", &self.links.len())
            .finish_non_exhaustive()
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name).ok_or(ProbeError::Map {
        name,
        detail: "not in the object; rebuild it with `cargo xtask build-ebpf`".into(),
    })
}

fn typed<T, E: std::fmt::Display>(name: &'static str, r: Result<T, E>) -> Result<T, ProbeError> {
    r.map_err(|e| ProbeError::Map {
        name,
        detail: e.to_string(),
    })
}

impl Probe {
    /// Loads the object and attaches every program.
    pub fn load(object: Option<&Path>) -> Result<Self, ProbeError> {
        let mut p = Self::load_detached(object)?;
        p.attach()?;
        Ok(p)
    }

    /// Loads the object and its programs without attaching them.
    pub fn load_detached(object: Option<&Path>) -> Result<Self, ProbeError> {
        let path = find_object(object)?;
        let btf = Btf::from_sys_fs().map_err(ProbeError::Btf)?;
        let nr_cpus = possible_cpus()?;
        let shift = page_shift();
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global(globals::NR_CPUS, &nr_cpus, true)
            .override_global(globals::PAGE_SHIFT, &shift, true)
            .load_file(&path)
            .map_err(|source| ProbeError::Load {
                path: path.clone(),
                source: Box::new(source),
            })?;
        for (name, tracepoint) in PROGRAMS {
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or(ProbeError::Program {
                    name,
                    detail: "not in the object; rebuild it with `cargo xtask build-ebpf`".into(),
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| ProbeError::Program {
                    name,
                    detail: e.to_string(),
                })?;
            prog.load(tracepoint, &btf)
                .map_err(|e| ProbeError::Program {
                    name,
                    detail: verifier_detail(&e),
                })?;
        }
        let watches = typed(
            maps::WATCHES,
            HashMap::try_from(take_map(&mut ebpf, maps::WATCHES)?),
        )?;
        let bits = typed(
            maps::WATCH_BITS,
            Array::try_from(take_map(&mut ebpf, maps::WATCH_BITS)?),
        )?;
        let mm_owner = typed(
            maps::MM_OWNER,
            HashMap::try_from(take_map(&mut ebpf, maps::MM_OWNER)?),
        )?;
        let stats = typed(
            maps::STATS,
            PerCpuArray::try_from(take_map(&mut ebpf, maps::STATS)?),
        )?;
        let client_rings = typed(
            maps::CLIENT_RINGS,
            HashOfMaps::try_from(take_map(&mut ebpf, maps::CLIENT_RINGS)?),
        )?;
        let events = typed(
            maps::EVENTS,
            RingBuf::try_from(take_map(&mut ebpf, maps::EVENTS)?),
        )?;
        Ok(Self {
            ebpf,
            btf,
            watches,
            bits,
            mm_owner,
            client_rings,
            stats,
            events: Some(events),
            links: Vec::new(),
            path,
        })
    }

    /// The object file loaded.
    pub fn object_path(&self) -> &Path {
        &self.path
    }

    /// Attaches every program that is not attached yet.
    pub fn attach(&mut self) -> Result<(), ProbeError> {
        self.attach_only(&PROGRAMS.map(|(name, _)| name))
    }

    /// Attaches the named programs (the overhead benchmark attaches them one
    /// by one).
    pub fn attach_only(&mut self, names: &[&'static str]) -> Result<(), ProbeError> {
        for &name in names {
            if self.links.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let prog: &mut BtfTracePoint = self
                .ebpf
                .program_mut(name)
                .ok_or(ProbeError::Program {
                    name,
                    detail: "not in the object".into(),
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| ProbeError::Program {
                    name,
                    detail: e.to_string(),
                })?;
            let link = prog.attach().map_err(|e| ProbeError::Program {
                name,
                detail: format!("cannot attach: {e}"),
            })?;
            self.links.push((name, link));
        }
        Ok(())
    }

    /// True when every program is attached.
    pub fn is_attached(&self) -> bool {
        self.links.len() == PROGRAMS.len()
    }

    /// Detaches every program; the maps and watches stay.
    pub fn detach(&mut self) -> Result<(), ProbeError> {
        for (name, link) in std::mem::take(&mut self.links) {
            let prog: &mut BtfTracePoint = self
                .ebpf
                .program_mut(name)
                .ok_or(ProbeError::Program {
                    name,
                    detail: "not in the object".into(),
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| ProbeError::Program {
                    name,
                    detail: e.to_string(),
                })?;
            prog.detach(link).map_err(|e| ProbeError::Program {
                name,
                detail: format!("cannot detach: {e}"),
            })?;
        }
        Ok(())
    }

    /// The kernel BTF the programs were loaded against.
    pub fn btf(&self) -> &Btf {
        &self.btf
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Option<EventReader> {
        self.events.take().map(|ring| EventReader { ring })
    }

    /// Starts watching `tgid` with `config`; its state starts zeroed. The
    /// config must be bound to a process ([`watch_config`]'s `binding`).
    pub fn watch(&mut self, tgid: u32, config: WatchConfig) -> Result<(), ProbeError> {
        let (word, mask) = bit_of(tgid)?;
        if config.born_before_ns == 0 {
            return Err(ProbeError::Unbound(tgid));
        }
        let watch = Watch {
            config,
            state: WatchState::default(),
        };
        self.watches.insert(tgid, watch, 0)?;
        let bits = self.bits.get(&word, 0)?;
        self.bits.set(word, bits | mask, 0)?;
        Ok(())
    }

    /// Gives `tgid` a ring buffer of its own, which the program fills with
    /// the same events as the agent's; returns its fd, for the client.
    /// Removed by [`Self::unwatch`].
    pub fn client_ring(&mut self, tgid: u32) -> Result<OwnedFd, ProbeError> {
        bit_of(tgid)?;
        let def = aya_obj::Map::new_from_params(
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
            0,
            0,
            amm_ebpf::CLIENT_RING_BYTES,
            0,
        );
        let ring = MapData::create(def, "amm_client_ring", None)?;
        self.client_rings.insert(tgid, &ring, 0)?;
        ring.fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| ProbeError::System(format!("cannot duplicate the ring's fd: {e}")))
    }

    /// Stops watching `tgid`: clears its bit and removes its entries if the
    /// program has not already done so at exit. Idempotent.
    pub fn unwatch(&mut self, tgid: u32) -> Result<(), ProbeError> {
        let (word, mask) = bit_of(tgid)?;
        ignore_missing(self.client_rings.remove(&tgid))?;
        let bits = self.bits.get(&word, 0)?;
        if bits & mask != 0 {
            self.bits.set(word, bits & !mask, 0)?;
        }
        if let Ok(w) = self.watches.get(&tgid, 0) {
            ignore_missing(self.watches.remove(&tgid))?;
            if w.state.mm != 0 {
                ignore_missing(self.mm_owner.remove(&w.state.mm))?;
            }
        }
        Ok(())
    }

    /// The watch of `tgid` as the program sees it now.
    pub fn watch_of(&self, tgid: u32) -> Option<Watch> {
        self.watches.get(&tgid, 0).ok()
    }

    /// Entries in (watches, mm_owner, client_rings, set bits): all zero
    /// when nothing is watched, whatever happened before.
    pub fn entry_counts(&self) -> Result<(usize, usize, usize, usize), ProbeError> {
        let w = self.watches.keys().filter(Result::is_ok).count();
        let m = self.mm_owner.keys().filter(Result::is_ok).count();
        let r = self.client_rings.keys().filter(Result::is_ok).count();
        let mut b = 0usize;
        for word in self.bits.iter() {
            b += word?.count_ones() as usize;
        }
        Ok((w, m, r, b))
    }

    /// The program's own counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, ProbeError> {
        sum_stats(&self.stats)
    }

    /// A read-only view of the `watches` and `stats` maps through handles of
    /// its own, for a thread that must never wait for the one holding the
    /// probe (the dashboard reads it while the relay works).
    pub fn view(&self) -> Result<ProbeView, ProbeError> {
        let dup = |name: &'static str, map: &MapData| {
            let fd = map.fd().as_fd().try_clone_to_owned().map_err(|e| {
                ProbeError::System(format!("cannot duplicate the fd of map {name}: {e}"))
            })?;
            MapData::from_fd(fd).map_err(ProbeError::from)
        };
        Ok(ProbeView {
            watches: typed(
                maps::WATCHES,
                HashMap::try_from(aya::maps::Map::HashMap(dup(
                    maps::WATCHES,
                    self.watches.map(),
                )?)),
            )?,
            stats: typed(
                maps::STATS,
                PerCpuArray::try_from(aya::maps::Map::PerCpuArray(dup(
                    maps::STATS,
                    self.stats.map(),
                )?)),
            )?,
        })
    }
}

fn sum_stats(stats: &PerCpuArray<MapData, Stats>) -> Result<Stats, ProbeError> {
    let per_cpu = stats.get(&0, 0)?;
    let mut s = Stats::default();
    for c in per_cpu.iter() {
        s.events += c.events;
        s.dropped += c.dropped;
        s.bound += c.bound;
        s.exits += c.exits;
        s.strangers += c.strangers;
        s.credentials += c.credentials;
    }
    Ok(s)
}

/// Read-only handles on the probe's `watches` and `stats` maps (see
/// [`Probe::view`]): reading them takes no lock the relay holds.
pub struct ProbeView {
    watches: HashMap<MapData, u32, Watch>,
    stats: PerCpuArray<MapData, Stats>,
}

impl std::fmt::Debug for ProbeView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeView").finish_non_exhaustive()
    }
}

impl ProbeView {
    /// The watch of `tgid` as the program sees it now.
    pub fn watch_of(&self, tgid: u32) -> Option<Watch> {
        self.watches.get(&tgid, 0).ok()
    }

    /// The program's own counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, ProbeError> {
        sum_stats(&self.stats)
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(Errno::ENOENT as i32) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn bit_of(tgid: u32) -> Result<(u32, u64), ProbeError> {
    let word = tgid >> 6;
    if tgid == 0 || word >= amm_ebpf::PID_WORDS {
        return Err(ProbeError::BadPid(tgid));
    }
    Ok((word, 1u64 << (tgid & 63)))
}

fn verifier_detail(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            format!("the kernel refused it ({io_error}); verifier log:\n{verifier_log}")
        }
        other => other.to_string(),
    }
}

/// The event ring buffer: poll its fd, then drain it with [`Self::next_event`].
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader").finish_non_exhaustive()
    }
}

impl EventReader {
    /// The next record, if one is ready. Records too short to be an event
    /// are skipped (they cannot come from this object).
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let item = self.ring.next()?;
            if let Some(e) = Event::from_bytes(&item) {
                return Some(e);
            }
        }
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl AsFd for EventReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}
