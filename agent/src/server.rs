//! `amm-agent run`: the socket server, the registry of watched processes and
//! the relay of kernel events to the clients that registered them.
//!
//! One task per client reads its requests; one writer task per client sends
//! its answers and events from a bounded queue, so a client that stops
//! reading loses its connection instead of stalling anyone else. One task
//! drains the BPF ring buffer and routes each event by pid. One task per
//! watch waits on the process's pidfd, the backstop for an exit the ring
//! buffer did not report.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use amm_ebpf::{EventKind, Level};
use amm_protocol::{
    AgentStatus, ClientMessage, EventMessage, FrameError, MapEntries, Registration, Sample,
    SampleKind, ServerMessage, Split, TerminateBy, ThresholdBytes, VERSION, WatchStatus, decode,
    nonblocking,
};
use anyhow::{Context, Result, bail};
use tokio::io::unix::AsyncFd;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::identity::{self, Peer};
use crate::observe::{Ending, Observation, Observer};
use crate::outbox::Outbox;
use crate::probe::{EventReader, Probe};

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Socket file mode (0660 by default).
    pub socket_mode: u32,
    /// Group owning the socket, if not the agent's.
    pub socket_group: Option<u32>,
    /// Most clients connected at once.
    pub max_clients: usize,
    /// Time a new client has to say hello.
    pub hello_timeout: Duration,
    /// Time a frame may take once its first byte arrived.
    pub frame_timeout: Duration,
    /// Time one write to a client may take.
    pub write_timeout: Duration,
    /// Spike horizon for registrations that give none.
    pub default_spike_horizon: Duration,
    /// Bytes queued per client before it counts as not reading.
    pub client_queue_bytes: usize,
    /// The metrics and dashboard listener (`--http`), off when `None`.
    pub http: Option<crate::http::HttpConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(amm_protocol::DEFAULT_SOCKET),
            socket_mode: 0o660,
            socket_group: None,
            max_clients: 256,
            hello_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            default_spike_horizon: Duration::from_millis(200),
            client_queue_bytes: 1 << 20,
            http: None,
        }
    }
}

/// Tells a client's task that its connection must close, and why.
#[derive(Default)]
struct Closer {
    notify: Notify,
    reason: Mutex<Option<String>>,
}

impl Closer {
    fn close(&self, reason: String) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            *r = Some(reason);
        }
        self.notify.notify_one();
    }
}

/// One connected client, as others see it.
struct ClientHandle {
    id: u64,
    outbox: Arc<Outbox>,
    closer: Arc<Closer>,
}

impl ClientHandle {
    fn close(&self, reason: String) {
        self.closer.close(reason);
    }

    /// Sends (or queues) a message; a client that is not reading is closed.
    fn send(&self, msg: ServerMessage) {
        self.send_with_fd(msg, None);
    }

    /// Sends a message with an fd attached (SCM_RIGHTS).
    fn send_with_fd(&self, msg: ServerMessage, fd: Option<OwnedFd>) {
        let pushed = amm_protocol::encode(&msg)
            .map_err(|e| format!("cannot encode {msg:?}: {e}"))
            .and_then(|frame| self.outbox.push(frame, fd));
        if let Err(reason) = pushed {
            self.close(reason);
        }
    }
}

/// Samples kept per watched process.
const TIMELINE_CAP: usize = 4096;
/// Ended watches whose timeline `status` still shows.
const ENDED_KEPT: usize = 16;

struct WatchEntry {
    client: Arc<ClientHandle>,
    exit_task: Option<AbortHandle>,
    /// Pins the process; the agent's terminate signal goes through it.
    pidfd: Arc<OwnedFd>,
    /// Signal the agent sends itself at terminate (`terminate_by: agent`).
    agent_signal: Option<i32>,
    limit: u64,
    timeline: VecDeque<Sample>,
}

impl WatchEntry {
    fn record(&mut self, sample: Sample) {
        if self.timeline.len() == TIMELINE_CAP {
            self.timeline.pop_front();
        }
        self.timeline.push_back(sample);
    }

    /// What `status` shows of a watch that has ended (with its whole
    /// timeline; `status` trims it).
    fn ended(self, pid: u32, faults: u64) -> WatchStatus {
        let last = self.timeline.back();
        let peak =
            self.timeline
                .iter()
                .filter_map(|s| match s.what {
                    SampleKind::Exit { peak_rss_bytes }
                    | SampleKind::Unwatched { peak_rss_bytes } => Some(peak_rss_bytes),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
        WatchStatus {
            pid,
            limit_bytes: self.limit,
            rss_bytes: last.map_or(0, |s| s.rss_bytes),
            peak_rss_bytes: peak,
            level: Level::Below,
            faults,
            rate_bytes_per_ms: 0,
            timeline_len: self.timeline.len(),
            timeline: self.timeline.into(),
            thresholds: None,
        }
    }
}

/// The newest samples a status answer carries.
fn newest<'a>(samples: impl ExactSizeIterator<Item = &'a Sample>) -> Vec<Sample> {
    let skip = samples.len().saturating_sub(amm_protocol::STATUS_SAMPLES);
    samples.skip(skip).cloned().collect()
}

/// The sample a kernel event leaves in a timeline.
fn sample_of(m: &EventMessage) -> Sample {
    let what = match m.event {
        EventKind::Level => SampleKind::Level {
            from: m.prev_level,
            to: m.level,
            foreign: m.foreign,
            signalled: m.signalled,
        },
        EventKind::Spike => SampleKind::Spike {
            eta_ns: m.eta_ns.unwrap_or(0),
            rate_bytes_per_ms: m.rate_bytes_per_ms,
        },
        EventKind::Exit => SampleKind::Exit {
            peak_rss_bytes: m.peak_rss_bytes,
        },
    };
    Sample {
        t_ns: m.t_ns,
        rss_bytes: m.rss_bytes,
        what,
    }
}

struct Shared {
    probe: Mutex<Probe>,
    watches: Mutex<HashMap<u32, WatchEntry>>,
    ended: Mutex<VecDeque<WatchStatus>>,
    config: ServerConfig,
    next_client: AtomicU64,
    clients: AtomicUsize,
    /// The dashboard's feed, when `--http` is on.
    observer: Option<Observer>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic while holding a lock leaves plain data behind; keep serving
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Tells the dashboard (if any) what happened; never waits.
    fn observe(&self, what: impl FnOnce() -> Observation) {
        if let Some(o) = &self.observer {
            o.send(what());
        }
    }

    /// Attaches the programs while something is watched and detaches them
    /// when nothing is: a node with no registered worker pays nothing.
    fn follow_watches(&self, watched: usize) {
        let mut probe = lock(&self.probe);
        let r = if watched == 0 && probe.is_attached() {
            info!("nothing watched: detaching the probe");
            probe.detach()
        } else if watched > 0 && !probe.is_attached() {
            info!("first watch: attaching the probe");
            probe.attach()
        } else {
            Ok(())
        };
        if let Err(e) = r {
            warn!("cannot attach or detach the probe: {e}");
        }
        let attached = probe.is_attached();
        self.observe(|| Observation::Attached(attached));
    }

    /// Routes one kernel event to the client that registered its pid.
    fn dispatch(&self, raw: amm_ebpf::Event) {
        let read_ns = monotonic_ns();
        let Some(msg) = EventMessage::from_kernel(&raw) else {
            warn!(?raw, "unknown event record from the probe");
            return;
        };
        let pid = msg.pid;
        let mut watches = lock(&self.watches);
        let client = if msg.event == EventKind::Exit {
            let Some(mut entry) = watches.remove(&pid) else {
                return;
            };
            if let Some(t) = entry.exit_task.take() {
                t.abort();
            }
            entry.record(sample_of(&msg));
            if let Err(e) = lock(&self.probe).unwatch(pid) {
                warn!(pid, "cannot clear the watch after exit: {e}");
            }
            self.follow_watches(watches.len());
            info!(
                pid,
                peak = msg.peak_rss_bytes,
                faults = msg.faults,
                "watched process exited"
            );
            let client = entry.client.clone();
            self.keep_ended(entry.ended(pid, msg.faults.unwrap_or(0)));
            self.observe(|| Observation::Ended {
                pid,
                how: Ending::Exited,
                t_ns: read_ns,
            });
            client
        } else {
            let Some(entry) = watches.get_mut(&pid) else {
                return;
            };
            entry.record(sample_of(&msg));
            if msg.event == EventKind::Level
                && msg.level == Level::Terminate
                && msg.level > msg.prev_level
                && let Some(sig) = entry.agent_signal
            {
                let t_ns = monotonic_ns();
                match identity::pidfd_send_signal(&entry.pidfd, sig) {
                    Ok(()) => {
                        info!(pid, signal = sig, "terminate: signalled through the pidfd");
                        self.observe(|| Observation::AgentSignal {
                            pid,
                            signal: sig,
                            t_ns,
                            rss_bytes: msg.rss_bytes,
                        });
                        entry.record(Sample {
                            t_ns,
                            rss_bytes: msg.rss_bytes,
                            what: SampleKind::AgentSignal { signal: sig },
                        });
                    }
                    Err(e) => warn!(pid, "cannot signal through the pidfd: {e}"),
                }
            }
            entry.client.clone()
        };
        drop(watches);
        debug!(
            pid,
            event = ?msg.event,
            level = %msg.level,
            rss = msg.rss_bytes,
            delay_us = monotonic_ns().saturating_sub(msg.t_ns) / 1000,
            "event"
        );
        let observed = self.observer.is_some().then(|| msg.clone());
        client.send(ServerMessage::Event(msg));
        if let Some(msg) = observed {
            let sent_ns = monotonic_ns();
            self.observe(|| Observation::Event {
                msg,
                read_ns,
                sent_ns,
            });
        }
    }

    fn keep_ended(&self, w: WatchStatus) {
        let mut ended = lock(&self.ended);
        if ended.len() == ENDED_KEPT {
            ended.pop_front();
        }
        ended.push_back(w);
    }

    /// A page of the timeline of `pid` (watched, or recently ended).
    fn timeline_page(&self, pid: u32, from: usize, max: usize) -> ServerMessage {
        let max = max.min(amm_protocol::TIMELINE_PAGE);
        let page = |all: &mut dyn ExactSizeIterator<Item = &Sample>| {
            let total = all.len();
            let samples = all.skip(from).take(max).cloned().collect();
            ServerMessage::Timeline {
                pid,
                from,
                total,
                samples,
            }
        };
        if let Some(e) = lock(&self.watches).get(&pid) {
            return page(&mut e.timeline.iter());
        }
        if let Some(w) = lock(&self.ended).iter().rev().find(|w| w.pid == pid) {
            return page(&mut w.timeline.iter());
        }
        ServerMessage::Refused {
            pid,
            reason: "the agent holds no timeline for this pid".into(),
        }
    }

    /// Records a worker's accounting in its timeline, if `client` owns it.
    fn accounting(&self, client: u64, pid: u32, t_ns: u64, split: Split) {
        let mut watches = lock(&self.watches);
        if let Some(entry) = watches.get_mut(&pid)
            && entry.client.id == client
        {
            entry.record(Sample {
                t_ns,
                rss_bytes: split.process,
                what: SampleKind::Accounting(split),
            });
            self.observe(|| Observation::Accounting { pid, t_ns, split });
        }
    }

    /// The agent's state for a status request.
    fn status(&self) -> AgentStatus {
        let timelines: Vec<(u32, Vec<Sample>, usize)> = lock(&self.watches)
            .iter()
            .map(|(pid, e)| (*pid, newest(e.timeline.iter()), e.timeline.len()))
            .collect();
        let probe = lock(&self.probe);
        let mut watches: Vec<WatchStatus> = timelines
            .into_iter()
            .filter_map(|(pid, timeline, timeline_len)| {
                let w = probe.watch_of(pid)?;
                Some(WatchStatus {
                    pid,
                    limit_bytes: w.config.limit_bytes,
                    rss_bytes: w.state.rss_bytes,
                    peak_rss_bytes: w.state.peak_rss_bytes,
                    level: Level::from_raw(w.state.level).unwrap_or(Level::Below),
                    faults: identity::proc_info(pid).map_or(0, |i| i.faults),
                    rate_bytes_per_ms: w.state.rate_bytes_per_ms,
                    timeline,
                    timeline_len,
                    thresholds: Some(ThresholdBytes {
                        limit: w.config.limit_bytes,
                        rearm: w.config.rearm_bytes,
                        spill: w.config.spill_bytes,
                        pause: w.config.pause_bytes,
                        terminate: w.config.terminate_bytes,
                    }),
                })
            })
            .collect();
        watches.sort_by_key(|w| w.pid);
        let map_entries = probe
            .entry_counts()
            .map(|(watches, mm_owner, client_rings, bits)| MapEntries {
                watches,
                mm_owner,
                client_rings,
                bits,
            })
            .unwrap_or_default();
        let stats = probe.stats().unwrap_or_default();
        AgentStatus {
            clients: self.clients.load(Ordering::SeqCst),
            watches,
            ended: lock(&self.ended)
                .iter()
                .map(|w| WatchStatus {
                    timeline: newest(w.timeline.iter()),
                    ..w.clone()
                })
                .collect(),
            map_entries,
            events: stats.events,
            dropped: stats.dropped,
        }
    }

    /// Removes a watch of `client` (all of them with `pid == None`).
    fn forget(&self, client: u64, pid: Option<u32>) -> Vec<u32> {
        let mut watches = lock(&self.watches);
        let pids: Vec<u32> = watches
            .iter()
            .filter(|(p, e)| e.client.id == client && pid.is_none_or(|x| x == **p))
            .map(|(p, _)| *p)
            .collect();
        for p in &pids {
            let state = lock(&self.probe).watch_of(*p).map(|w| w.state);
            if let Some(mut entry) = watches.remove(p) {
                if let Some(t) = entry.exit_task.take() {
                    t.abort();
                }
                if let Some(st) = state {
                    entry.record(Sample {
                        t_ns: monotonic_ns(),
                        rss_bytes: st.rss_bytes,
                        what: SampleKind::Unwatched {
                            peak_rss_bytes: st.peak_rss_bytes,
                        },
                    });
                }
                self.keep_ended(entry.ended(*p, 0));
                self.observe(|| Observation::Ended {
                    pid: *p,
                    how: Ending::Unwatched,
                    t_ns: monotonic_ns(),
                });
            }
            if let Err(e) = lock(&self.probe).unwatch(*p) {
                warn!(pid = p, "cannot remove the watch: {e}");
            }
        }
        self.follow_watches(watches.len());
        pids
    }

    /// The process behind a watch exited but the ring buffer said nothing
    /// (it was full, or the exit raced the registration): close the watch
    /// from the map's last state.
    fn exited_without_event(&self, pid: u32, client: u64, faults: Option<u64>) {
        let mut watches = lock(&self.watches);
        if watches.get(&pid).is_none_or(|e| e.client.id != client) {
            return;
        }
        let Some(mut entry) = watches.remove(&pid) else {
            return;
        };
        let left = watches.len();
        drop(watches);
        let mut probe = lock(&self.probe);
        let state = probe.watch_of(pid).map(|w| w.state).unwrap_or_default();
        if let Err(e) = probe.unwatch(pid) {
            warn!(pid, "cannot remove the watch: {e}");
        }
        drop(probe);
        self.follow_watches(left);
        warn!(pid, "watched process exited without a kernel exit event");
        let msg = EventMessage {
            event: EventKind::Exit,
            t_ns: monotonic_ns(),
            pid,
            rss_bytes: state.rss_bytes,
            level: Level::from_raw(state.level).unwrap_or(Level::Below),
            prev_level: Level::from_raw(state.level).unwrap_or(Level::Below),
            peak_rss_bytes: state.peak_rss_bytes,
            faults,
            rate_bytes_per_ms: state.rate_bytes_per_ms,
            eta_ns: None,
            foreign: false,
            signalled: false,
        };
        entry.record(sample_of(&msg));
        let client = entry.client.clone();
        self.keep_ended(entry.ended(pid, faults.unwrap_or(0)));
        self.observe(|| Observation::Ended {
            pid,
            how: Ending::Exited,
            t_ns: msg.t_ns,
        });
        client.send(ServerMessage::Event(msg));
    }
}

/// CLOCK_MONOTONIC now, in ns (the clock of the kernel's event stamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid for writes; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Binds the socket: refuses to steal one another agent serves, removes a
/// stale one, sets mode and group.
fn bind(config: &ServerConfig) -> Result<UnixListener> {
    let path = &config.socket;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agent already listens on {}; stop it or choose another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    if let Some(gid) = config.socket_group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
    }
    Ok(listener)
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: ServerConfig, mut probe: Probe) -> Result<()> {
    let reader = probe
        .take_events()
        .context("the probe's event ring buffer was already taken")?;
    let listener = bind(&config)?;
    let observer = match &config.http {
        Some(http) => Some(crate::http::start(http, &probe, &config.socket)?),
        None => None,
    };
    info!(
        socket = %config.socket.display(),
        object = %probe.object_path().display(),
        "amm-agent listening"
    );
    let shared = Arc::new(Shared {
        probe: Mutex::new(probe),
        watches: Mutex::new(HashMap::new()),
        ended: Mutex::new(VecDeque::new()),
        config,
        next_client: AtomicU64::new(1),
        clients: AtomicUsize::new(0),
        observer,
    });
    let pump = tokio::spawn(pump_events(shared.clone(), reader));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let result = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => accept(&shared, stream),
                Err(e) => warn!("accept failed: {e}"),
            },
            r = tokio::signal::ctrl_c() => break r.context("cannot wait for SIGINT"),
            _ = term.recv() => break Ok(()),
        }
    };
    pump.abort();
    info!("amm-agent stopping");
    let _ = std::fs::remove_file(&shared.config.socket);
    result
}

fn accept(shared: &Arc<Shared>, stream: UnixStream) {
    let n = shared.clients.fetch_add(1, Ordering::SeqCst);
    shared.observe(|| Observation::Clients(n + 1));
    let id = shared.next_client.fetch_add(1, Ordering::SeqCst);
    let shared = shared.clone();
    tokio::spawn(async move {
        if n >= shared.config.max_clients {
            let (_, mut wr) = stream.into_split();
            let msg = ServerMessage::Error {
                reason: format!(
                    "the agent serves at most {} clients at once; try again later",
                    shared.config.max_clients
                ),
            };
            let _ = tokio::time::timeout(
                shared.config.write_timeout,
                nonblocking::write_message(&mut wr, &msg),
            )
            .await;
            warn!(client = id, "refused a client: too many clients");
        } else {
            serve_client(&shared, stream, id).await;
        }
        let left = shared.clients.fetch_sub(1, Ordering::SeqCst) - 1;
        shared.observe(|| Observation::Clients(left));
    });
}

/// How often the agent drains its ring buffer without being woken: events
/// already delivered on a client's own ring do not wake it.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

async fn pump_events(shared: Arc<Shared>, reader: EventReader) {
    // SAFETY: the reader owns the ring buffer's fd and keeps it open and
    // unchanged for as long as the AsyncFd holds it.
    let registered =
        unsafe { AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE) };
    let mut afd = match registered {
        Ok(a) => a,
        Err(e) => {
            warn!("cannot poll the probe's ring buffer: {e}; no events will be relayed");
            return;
        }
    };
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = afd.readable_mut() => match ready {
                Ok(mut guard) => {
                    // clear first, then drain: a record submitted after the
                    // drain sets readiness again, so none waits for the next
                    guard.clear_ready();
                    while let Some(ev) = guard.get_inner_mut().next_event() {
                        shared.dispatch(ev);
                    }
                }
                Err(e) => {
                    warn!("polling the ring buffer failed: {e}");
                    return;
                }
            },
            _ = tick.tick() => {
                while let Some(ev) = afd.get_mut().next_event() {
                    shared.dispatch(ev);
                }
            }
        }
    }
}

async fn serve_client(shared: &Arc<Shared>, stream: UnixStream, id: u64) {
    let peer = match identity::peer_of(&stream) {
        Ok(p) => p,
        Err(e) => {
            warn!(
                client = id,
                "cannot read the peer's credentials: {e}; closing"
            );
            return;
        }
    };
    let (mut rd, wr) = stream.into_split();
    let outbox = Arc::new(Outbox::new(wr, shared.config.client_queue_bytes));
    let closer = Arc::new(Closer::default());
    let handle = Arc::new(ClientHandle {
        id,
        outbox: outbox.clone(),
        closer: closer.clone(),
    });
    let timeout = shared.config.write_timeout;
    let writer = tokio::spawn(async move {
        if let Err(reason) = outbox.run(timeout).await {
            closer.close(reason);
        }
    });
    info!(
        client = id,
        pid = peer.pid,
        uid = peer.uid,
        "client connected"
    );

    let outcome = client_session(shared, &peer, &handle, &mut rd).await;
    let reason = match outcome {
        Ok(()) => lock(&handle.closer.reason)
            .clone()
            .unwrap_or_else(|| "closed".into()),
        Err(reason) => {
            // tell the client why, best effort, before closing
            handle.send(ServerMessage::Error {
                reason: reason.clone(),
            });
            reason
        }
    };
    let forgotten = shared.forget(id, None);
    // let the writer flush the last message, then stop it
    handle.outbox.finish();
    drop(handle);
    let _ = tokio::time::timeout(shared.config.write_timeout, writer).await;
    info!(client = id, pid = peer.pid, watches_removed = forgotten.len(), %reason, "client gone");
}

/// The request loop of one client. `Err` carries the reason to log and send.
async fn client_session(
    shared: &Arc<Shared>,
    peer: &Peer,
    handle: &Arc<ClientHandle>,
    rd: &mut OwnedReadHalf,
) -> Result<(), String> {
    let cfg = &shared.config;
    let hello = tokio::time::timeout(
        cfg.hello_timeout,
        nonblocking::read_frame(rd, cfg.frame_timeout),
    )
    .await
    .map_err(|_| format!("no hello within {:?}", cfg.hello_timeout))?
    .map_err(|e| format!("bad hello: {e}"))?;
    match decode::<ClientMessage>(&hello).map_err(|e| format!("bad hello: {e}"))? {
        ClientMessage::Hello { version, client } if version == VERSION => {
            debug!(client = handle.id, name = %client, "hello");
            handle.send(ServerMessage::Welcome {
                version: VERSION,
                agent: concat!("amm-agent ", env!("CARGO_PKG_VERSION")).into(),
            });
        }
        ClientMessage::Hello { version, .. } => {
            return Err(format!(
                "protocol version {version} is not supported; this agent speaks version {VERSION}"
            ));
        }
        other => return Err(format!("the first message must be hello, got {other:?}")),
    }
    loop {
        let frame = tokio::select! {
            _ = handle.closer.notify.notified() => return Ok(()),
            f = nonblocking::read_frame(rd, cfg.frame_timeout) => f,
        };
        let body = match frame {
            Ok(b) => b,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let msg: ClientMessage = decode(&body).map_err(|e| e.to_string())?;
        let answer = match msg {
            ClientMessage::Hello { .. } => return Err("hello sent twice".into()),
            ClientMessage::Ping { nonce } => ServerMessage::Pong { nonce },
            ClientMessage::Status => ServerMessage::Status(shared.status()),
            ClientMessage::Timeline { pid, from, max } => shared.timeline_page(pid, from, max),
            ClientMessage::Accounting { pid, t_ns, split } => {
                shared.accounting(handle.id, pid, t_ns, split);
                continue;
            }
            ClientMessage::Register(reg) => {
                let (answer, ring) = register(shared, peer, handle, &reg);
                handle.send_with_fd(answer, ring);
                continue;
            }
            ClientMessage::Unregister { pid } => {
                if shared.forget(handle.id, Some(pid)).is_empty() {
                    ServerMessage::Refused {
                        pid,
                        reason: "this connection did not register that pid".into(),
                    }
                } else {
                    info!(client = handle.id, pid, "unregistered");
                    ServerMessage::Unregistered { pid }
                }
            }
        };
        handle.send(answer);
    }
}

/// Answers a registration; with `direct`, also the fd of the process's own
/// ring buffer, to send with the answer.
fn register(
    shared: &Arc<Shared>,
    peer: &Peer,
    handle: &Arc<ClientHandle>,
    reg: &Registration,
) -> (ServerMessage, Option<OwnedFd>) {
    let refuse = |reason: String| {
        info!(client = handle.id, peer = peer.pid, pid = reg.pid, %reason, "registration refused");
        (
            ServerMessage::Refused {
                pid: reg.pid,
                reason,
            },
            None,
        )
    };
    let thresholds = match reg.thresholds.to_bytes(reg.limit_bytes) {
        Ok(t) => t,
        Err(e) => return refuse(e.to_string()),
    };
    let (flags, signal, agent_signal) = match (reg.terminate_signal, reg.terminate_by) {
        (None, _) => (0, 0, None),
        (Some(sig), _) if !(1..=64).contains(&sig) => {
            return refuse(format!(
                "terminate_signal {sig} is not a signal number (1..=64)"
            ));
        }
        (Some(sig), TerminateBy::Kernel) => (amm_ebpf::WATCH_SIGNAL_ON_TERMINATE, sig as u32, None),
        (Some(sig), TerminateBy::Agent) => (0, 0, Some(sig)),
    };
    let verified = match identity::verify(peer, reg.pid, reg.start_time) {
        Ok(v) => v,
        Err(e) => return refuse(e.to_string()),
    };
    let horizon = reg
        .spike_horizon_ms
        .filter(|&ms| ms > 0)
        .map_or(shared.config.default_spike_horizon, Duration::from_millis);
    let config = crate::probe::watch_config(&thresholds, horizon, flags, signal);
    let mut watches = lock(&shared.watches);
    if let Some(e) = watches.get(&reg.pid) {
        return refuse(if e.client.id == handle.id {
            "already registered on this connection".into()
        } else {
            "already watched for another client".into()
        });
    }
    shared.follow_watches(watches.len() + 1);
    let watched = {
        let mut probe = lock(&shared.probe);
        // the ring first: no event may come before it is in place
        let ring = if reg.direct {
            probe.client_ring(reg.pid).map(Some)
        } else {
            Ok(None)
        };
        ring.and_then(|ring| probe.watch(reg.pid, config).map(|()| ring))
            .inspect_err(|_| {
                let _ = probe.unwatch(reg.pid);
            })
    };
    let ring = match watched {
        Ok(ring) => ring,
        Err(e) => {
            shared.follow_watches(watches.len());
            return refuse(format!("the probe cannot watch it: {e}"));
        }
    };
    let pidfd = Arc::new(verified.pidfd);
    let exit_task = spawn_exit_watch(shared.clone(), reg.pid, handle.id, pidfd.clone());
    watches.insert(
        reg.pid,
        WatchEntry {
            client: handle.clone(),
            exit_task,
            pidfd,
            agent_signal,
            limit: thresholds.limit,
            timeline: VecDeque::new(),
        },
    );
    drop(watches);
    shared.observe(|| Observation::Watched {
        pid: reg.pid,
        uid: peer.uid,
        start_time: verified.info.start_time,
        thresholds,
        direct: reg.direct,
        rss_bytes: verified.info.rss_bytes,
        t_ns: monotonic_ns(),
    });
    let rss = verified.info.rss_bytes;
    let level = level_of(&thresholds, rss);
    info!(client = handle.id, pid = reg.pid, limit = thresholds.limit, rss, %level, direct = reg.direct, "registered");
    (
        ServerMessage::Registered {
            pid: reg.pid,
            rss_bytes: rss,
            level,
            thresholds,
            ring_bytes: ring
                .is_some()
                .then_some(u64::from(amm_ebpf::CLIENT_RING_BYTES)),
        },
        ring,
    )
}

/// The level of `rss` under `t` (as the kernel program computes it).
pub fn level_of(t: &amm_protocol::ThresholdBytes, rss: u64) -> Level {
    if rss >= t.terminate {
        Level::Terminate
    } else if rss >= t.pause {
        Level::Pause
    } else if rss >= t.spill {
        Level::Spill
    } else {
        Level::Below
    }
}

fn spawn_exit_watch(
    shared: Arc<Shared>,
    pid: u32,
    client: u64,
    pidfd: Arc<OwnedFd>,
) -> Option<AbortHandle> {
    // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open
    // and unchanged until it is dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    let afd = match registered {
        Ok(a) => a,
        Err(e) => {
            warn!(
                pid,
                "cannot poll the pidfd: {e}; relying on the kernel's exit event"
            );
            return None;
        }
    };
    let task = tokio::spawn(async move {
        if afd.readable().await.is_err() {
            return;
        }
        // the zombie still shows its fault counts, until its parent reaps it
        let faults = identity::proc_info(pid).ok().map(|i| i.faults);
        // the kernel's exit event (with the peak) normally arrives first
        tokio::time::sleep(Duration::from_millis(100)).await;
        shared.exited_without_event(pid, client, faults);
    });
    Some(task.abort_handle())
}

/// Resolves a group name or number.
pub fn group_id(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").context("cannot read /etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .with_context(|| format!("no group named {group:?}; create it or give a gid"))
}
