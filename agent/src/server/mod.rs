//! `amm-agent run`: the socket server, the registry of watched processes and
//! the relay of kernel events to the clients that registered them.
//!
//! - [`socket`]: binds the listening socket (mode, group, stale sockets);
//! - `quota`: connection slots per uid, with a reserve for root;
//! - `session`: one client's hello, requests and registrations;
//! - `registry`: the watches, the ended ones, the routing of events;
//! - `status`: the paged, per-uid `status` and `timeline` answers.
//!
//! One task per client reads its requests; one writer task per client sends
//! its answers and events from a bounded queue, so a client that stops
//! reading loses its connection instead of stalling anyone else. One task
//! drains the BPF ring buffer and routes each event by pid. One task per
//! watch waits on the process's pidfd, the backstop for an exit the ring
//! buffer did not report.

mod quota;
mod registry;
mod session;
pub mod socket;
mod status;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use amm_protocol::{Denial, ServerMessage, nonblocking};
use anyhow::{Context, Result};
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tracing::{info, warn};

pub use quota::ROOT_RESERVE;
pub use registry::{ENDED_PER_UID, ENDED_TOTAL, TIMELINE_CAP};
pub use socket::group_id;

use crate::identity::{self, Peer};
use crate::probe::{EventReader, Probe};
use registry::Shared;

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Socket file mode (0660 by default).
    pub socket_mode: u32,
    /// Group owning the socket, if not the agent's.
    pub socket_group: Option<u32>,
    /// Most clients of users other than root connected at once (root has
    /// [`ROOT_RESERVE`] more).
    pub max_clients: usize,
    /// Most connections of one uid other than root.
    pub max_clients_per_uid: usize,
    /// Most watches of one uid other than root.
    pub max_watches_per_uid: usize,
    /// A client that watches nothing and sends nothing this long is closed.
    pub idle_timeout: Duration,
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
            max_clients_per_uid: 32,
            max_watches_per_uid: 128,
            idle_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            default_spike_horizon: Duration::from_millis(200),
            client_queue_bytes: 1 << 20,
            http: None,
        }
    }
}

impl ServerConfig {
    fn limits(&self) -> quota::Limits {
        quota::Limits {
            max_clients: self.max_clients,
            max_clients_per_uid: self.max_clients_per_uid,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic while holding a lock leaves plain data behind; keep serving
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: ServerConfig, mut probe: Probe) -> Result<()> {
    let reader = probe
        .take_events()
        .context("the probe's event ring buffer was already taken")?;
    let listener = socket::bind(&config)?;
    let observer = match &config.http {
        Some(http) => Some(crate::http::start(http, &probe, &config.socket)?),
        None => None,
    };
    info!(
        socket = %config.socket.display(),
        object = %probe.object_path().display(),
        "amm-agent listening"
    );
    let shared = Arc::new(Shared::new(config, probe, observer));
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

/// Refused connections kept open at once for a moment, so their client
/// reads the reason instead of a broken pipe; beyond that they are closed
/// at once (a flood of refused connections holds no more fds).
const LINGERING_MAX: usize = 64;
static LINGERING: AtomicUsize = AtomicUsize::new(0);

fn accept(shared: &Arc<Shared>, stream: UnixStream) {
    let id = shared.next_client.fetch_add(1, Ordering::SeqCst);
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
    let slot = shared.quotas.admit(peer.uid, shared.config.limits());
    let shared = shared.clone();
    tokio::spawn(async move {
        match slot {
            Ok(slot) => {
                shared.observe_clients();
                session::serve_client(&shared, stream, peer, id).await;
                drop(slot);
                shared.observe_clients();
            }
            Err((code, reason)) => refuse(&shared, stream, &peer, id, code, reason).await,
        }
    });
}

/// Tells a client it is not served and closes; the client's hello is read
/// and dropped first (up to a second) so its write does not fail before it
/// reads why.
async fn refuse(
    shared: &Shared,
    stream: UnixStream,
    peer: &Peer,
    id: u64,
    code: Denial,
    reason: String,
) {
    warn!(client = id, pid = peer.pid, uid = peer.uid, %reason, "refused a client");
    let (mut rd, mut wr) = stream.into_split();
    let msg = ServerMessage::Error {
        reason,
        code: Some(code),
    };
    let write = nonblocking::write_message(&mut wr, &msg);
    let _ = tokio::time::timeout(shared.config.write_timeout, write).await;
    if LINGERING.fetch_add(1, Ordering::SeqCst) < LINGERING_MAX {
        let mut sink = [0u8; 4096];
        let drain = async { while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
    LINGERING.fetch_sub(1, Ordering::SeqCst);
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
