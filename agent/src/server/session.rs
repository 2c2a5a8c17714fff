//! One client connection: hello, then requests until it closes, breaks the
//! protocol, stops reading, or idles with nothing watched. Registrations
//! are checked here (thresholds, identity, quotas) before the probe is
//! touched.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amm_protocol::{
    ClientMessage, Denial, FrameError, Registration, SampleKind, ServerMessage, TerminateBy,
    VERSION, decode, nonblocking,
};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::lock;
use super::registry::{Shared, WatchEntry};
use super::status::Viewer;
use crate::identity::{self, Peer, Verified};
use crate::observe::Observation;
use crate::outbox::Outbox;

/// Why a session ends badly: a code for programs, words for people.
type Denied = (Denial, String);

/// Tells a client's task that its connection must close, and why.
#[derive(Default)]
pub(super) struct Closer {
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
pub(super) struct ClientHandle {
    pub id: u64,
    outbox: Arc<Outbox>,
    closer: Arc<Closer>,
}

impl ClientHandle {
    fn close(&self, reason: String) {
        self.closer.close(reason);
    }

    /// Sends (or queues) a message; a client that is not reading is closed.
    pub fn send(&self, msg: ServerMessage) {
        self.send_with_fd(msg, None);
    }

    /// Sends a message with an fd attached (SCM_RIGHTS).
    fn send_with_fd(&self, msg: ServerMessage, fd: Option<OwnedFd>) {
        let pushed = amm_protocol::encode(&msg)
            .map_err(|e| format!("cannot encode {}: {e}", short(&msg)))
            .and_then(|frame| self.outbox.push(frame, fd));
        if let Err(reason) = pushed {
            self.close(reason);
        }
    }
}

/// At most 200 characters of what a client sent, for logs and errors (a
/// whole frame echoed back would not fit in one).
fn short(x: &impl std::fmt::Debug) -> String {
    let s = format!("{x:?}");
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Serves one admitted client until its connection ends.
pub(super) async fn serve_client(shared: &Arc<Shared>, stream: UnixStream, peer: Peer, id: u64) {
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
        Err((code, reason)) => {
            // tell the client why, best effort, before closing
            handle.send(ServerMessage::Error {
                reason: reason.clone(),
                code: Some(code),
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

/// Reads the hello and answers it.
async fn greet(
    shared: &Shared,
    handle: &ClientHandle,
    rd: &mut OwnedReadHalf,
) -> Result<(), Denied> {
    let cfg = &shared.config;
    let protocol = |m: String| (Denial::Protocol, m);
    let hello = tokio::time::timeout(
        cfg.hello_timeout,
        nonblocking::read_frame(rd, cfg.frame_timeout),
    )
    .await
    .map_err(|_| protocol(format!("no hello within {:?}", cfg.hello_timeout)))?
    .map_err(|e| protocol(format!("bad hello: {e}")))?;
    match decode::<ClientMessage>(&hello).map_err(|e| protocol(format!("bad hello: {e}")))? {
        ClientMessage::Hello { version, client } if version == VERSION => {
            debug!(client = handle.id, name = %short(&client), "hello");
            handle.send(ServerMessage::Welcome {
                version: VERSION,
                agent: concat!("amm-agent ", env!("CARGO_PKG_VERSION")).into(),
            });
            Ok(())
        }
        ClientMessage::Hello { version, .. } => Err(protocol(format!(
            "protocol version {version} is not supported; this agent speaks version {VERSION}"
        ))),
        other => Err(protocol(format!(
            "the first message must be hello, got {}",
            short(&other)
        ))),
    }
}

/// The request loop of one client. `Err` carries the reason to log and send.
async fn client_session(
    shared: &Arc<Shared>,
    peer: &Peer,
    handle: &Arc<ClientHandle>,
    rd: &mut OwnedReadHalf,
) -> Result<(), Denied> {
    greet(shared, handle, rd).await?;
    let cfg = &shared.config;
    loop {
        // a client that watches nothing may not hold its slot forever
        let idle = !shared.has_watches(handle.id);
        let frame = tokio::select! {
            _ = handle.closer.notify.notified() => return Ok(()),
            _ = tokio::time::sleep(cfg.idle_timeout), if idle => {
                return Err((
                    Denial::Idle,
                    format!(
                        "idle for {:?} with nothing watched; connect again when you need the agent",
                        cfg.idle_timeout
                    ),
                ));
            }
            f = nonblocking::read_frame(rd, cfg.frame_timeout) => f,
        };
        let body = match frame {
            Ok(b) => b,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err((Denial::Protocol, e.to_string())),
        };
        let msg: ClientMessage = decode(&body).map_err(|e| (Denial::Protocol, e.to_string()))?;
        if let Some(answer) = answer(shared, peer, handle, msg)? {
            handle.send(answer);
        }
    }
}

/// Acts on one request; `Ok(None)` when the answer was sent already or
/// none is due.
fn answer(
    shared: &Arc<Shared>,
    peer: &Peer,
    handle: &Arc<ClientHandle>,
    msg: ClientMessage,
) -> Result<Option<ServerMessage>, Denied> {
    let viewer = Viewer { uid: peer.uid };
    Ok(Some(match msg {
        ClientMessage::Hello { .. } => {
            return Err((Denial::Protocol, "hello sent twice".into()));
        }
        ClientMessage::Ping { nonce } => ServerMessage::Pong { nonce },
        ClientMessage::Status { after, pid } => {
            ServerMessage::Status(shared.status_page(viewer, after, pid))
        }
        ClientMessage::Timeline { pid, from, max } => shared.timeline_page(viewer, pid, from, max),
        ClientMessage::Accounting {
            pid,
            t_ns,
            split,
            heap,
        } => {
            let mut samples = vec![(split.process, SampleKind::Accounting(split))];
            samples.extend(heap.map(|h| (split.process, SampleKind::Heap(h))));
            shared.accounting(handle.id, pid, t_ns, samples);
            return Ok(None);
        }
        ClientMessage::Purge { pid, t_ns, purge } => {
            let rss = purge.rss_after;
            shared.accounting(handle.id, pid, t_ns, vec![(rss, SampleKind::Purge(purge))]);
            return Ok(None);
        }
        ClientMessage::Register(reg) => {
            let (answer, ring) = register(shared, peer, handle, &reg);
            handle.send_with_fd(answer, ring);
            return Ok(None);
        }
        ClientMessage::Unregister { pid } => {
            if shared.forget(handle.id, Some(pid)).is_empty() {
                ServerMessage::Refused {
                    pid,
                    reason: "this connection did not register that pid".into(),
                    code: Some(Denial::Unknown),
                }
            } else {
                info!(client = handle.id, pid, "unregistered");
                ServerMessage::Unregistered { pid }
            }
        }
    }))
}

/// Answers a registration; with `direct`, also the fd of the process's own
/// ring buffer, to send with the answer.
fn register(
    shared: &Arc<Shared>,
    peer: &Peer,
    handle: &Arc<ClientHandle>,
    reg: &Registration,
) -> (ServerMessage, Option<OwnedFd>) {
    match try_register(shared, peer, handle, reg) {
        Ok(answer) => answer,
        Err((code, reason)) => {
            info!(client = handle.id, peer = peer.pid, pid = reg.pid, %reason, "registration refused");
            let answer = ServerMessage::Refused {
                pid: reg.pid,
                reason,
                code: Some(code),
            };
            (answer, None)
        }
    }
}

/// How the terminate level is enforced: the watch's flags and signal for
/// the kernel, or the signal the agent sends itself.
struct TerminatePlan {
    flags: u32,
    signal: u32,
    agent_signal: Option<i32>,
}

fn terminate_plan(reg: &Registration) -> Result<TerminatePlan, Denied> {
    let (flags, signal, agent_signal) = match (reg.terminate_signal, reg.terminate_by) {
        (None, _) => (0, 0, None),
        (Some(sig), _) if !(1..=64).contains(&sig) => {
            return Err((
                Denial::Invalid,
                format!("terminate_signal {sig} is not a signal number (1..=64)"),
            ));
        }
        (Some(sig), TerminateBy::Kernel) => (amm_ebpf::WATCH_SIGNAL_ON_TERMINATE, sig as u32, None),
        (Some(sig), TerminateBy::Agent) => (0, 0, Some(sig)),
    };
    Ok(TerminatePlan {
        flags,
        signal,
        agent_signal,
    })
}

/// Refuses a registration that would take `uid` past its watch quota.
fn check_watch_quota(shared: &Shared, uid: u32) -> Result<(), Denied> {
    let most = shared.config.max_watches_per_uid;
    let mine = shared.watches_of_uid(uid);
    if uid != 0 && mine >= most {
        return Err((
            Denial::TooManyWatches,
            format!(
                "uid {uid} already has {mine} watches, the most one user may (--max-watches-per-uid); unregister some first"
            ),
        ));
    }
    Ok(())
}

fn try_register(
    shared: &Arc<Shared>,
    peer: &Peer,
    handle: &Arc<ClientHandle>,
    reg: &Registration,
) -> Result<(ServerMessage, Option<OwnedFd>), Denied> {
    let thresholds = reg
        .thresholds
        .to_bytes(reg.limit_bytes)
        .map_err(|e| (Denial::Invalid, e.to_string()))?;
    let plan = terminate_plan(reg)?;
    let verified = identity::verify(peer, reg.pid, reg.start_time)
        .map_err(|e| (Denial::NotYours, e.to_string()))?;
    check_watch_quota(shared, peer.uid)?;
    let horizon = reg
        .spike_horizon_ms
        .filter(|&ms| ms > 0)
        .map_or(shared.config.default_spike_horizon, Duration::from_millis);
    let binding = crate::probe::Binding::of(&verified);
    let config =
        crate::probe::watch_config(&thresholds, horizon, plan.flags, plan.signal, &binding);
    let pid = verified.pid;
    let rss = verified.info.rss_bytes();
    let start_time = verified.info.start_time;
    let ring = install(
        shared, handle, peer.uid, verified, config, reg.direct, &plan,
    )?;
    shared.observe(|| Observation::Watched {
        pid,
        uid: peer.uid,
        start_time,
        thresholds,
        direct: reg.direct,
        rss_bytes: rss,
        t_ns: crate::clock::monotonic_ns(),
    });
    let level = thresholds.level_of(rss);
    info!(client = handle.id, pid, limit = thresholds.limit, rss, %level, direct = reg.direct, "registered");
    let answer = ServerMessage::Registered {
        pid,
        rss_bytes: rss,
        level,
        thresholds,
        ring_bytes: ring
            .is_some()
            .then_some(u64::from(amm_ebpf::CLIENT_RING_BYTES)),
    };
    Ok((answer, ring))
}

/// Writes the watch into the probe (and its ring, first, with `direct`) and
/// the registry; returns the ring's fd for the client.
fn install(
    shared: &Arc<Shared>,
    handle: &Arc<ClientHandle>,
    owner_uid: u32,
    verified: Verified,
    config: amm_ebpf::WatchConfig,
    direct: bool,
    plan: &TerminatePlan,
) -> Result<Option<OwnedFd>, Denied> {
    let pid = verified.pid;
    let mut watches = lock(&shared.watches);
    if let Some(e) = watches.get(&pid) {
        let why = if e.client.id == handle.id {
            "already registered on this connection"
        } else {
            "already watched for another client"
        };
        return Err((Denial::AlreadyWatched, why.into()));
    }
    shared.follow_watches(watches.len() + 1);
    let watched = {
        let mut probe = lock(&shared.probe);
        // the ring first: no event may come before it is in place
        let ring = if direct {
            probe.client_ring(pid).map(Some)
        } else {
            Ok(None)
        };
        ring.and_then(|ring| probe.watch(pid, config).map(|()| ring))
            .inspect_err(|_| {
                let _ = probe.unwatch(pid);
            })
    };
    let ring = match watched {
        Ok(ring) => ring,
        Err(e) => {
            shared.follow_watches(watches.len());
            let code = if e.is_full() {
                Denial::TooManyWatches
            } else {
                Denial::Probe
            };
            return Err((code, format!("the probe cannot watch it: {e}")));
        }
    };
    let pidfd = Arc::new(verified.pidfd);
    let exit_task = spawn_exit_watch(shared.clone(), pid, handle.id, pidfd.clone());
    watches.insert(
        pid,
        WatchEntry {
            client: handle.clone(),
            owner_uid,
            exit_task,
            pidfd,
            agent_signal: plan.agent_signal,
            limit: config.limit_bytes,
            timeline: VecDeque::new(),
        },
    );
    Ok(ring)
}

/// The backstop for an exit the ring buffer did not report: waits on the
/// pidfd, then closes the watch if the kernel's exit event has not.
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
        let faults = identity::ProcInfo::read(pid).ok().map(|i| i.faults);
        // the kernel's exit event (with the peak) normally arrives first
        tokio::time::sleep(Duration::from_millis(100)).await;
        shared.exited_without_event(pid, client, faults);
    });
    Some(task.abort_handle())
}
