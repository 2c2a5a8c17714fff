//! A worker's lasting link to the agent: register, read events as they
//! come, and when the agent is absent, dies or restarts, say so once and
//! register again when it is back. The worker never depends on it: without
//! the agent it polls, as Dask does.
//!
//! One thread owns the connection. It registers with `direct: true` and
//! reads the process's own ring buffer (one wake-up from the faulting CPU);
//! the socket carries the worker's accounting to the agent and tells when
//! the agent goes away.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags};

use crate::client::Client;
use crate::ring::RingReader;
use crate::sched::{InForce, ReaderPolicy};
use crate::{
    ClientMessage, EventMessage, HeapSample, PurgeSample, Registration, Split, ThresholdBytes,
};

/// What the link reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// Registered (again); events flow from now on.
    Connected {
        /// The thresholds the kernel uses.
        thresholds: ThresholdBytes,
        /// RSS at registration.
        rss_bytes: u64,
    },
    /// A kernel event for the registered process.
    Event(EventMessage),
    /// The agent could not be reached or went away; the link retries.
    /// Reported once per outage.
    Lost(String),
    /// The agent refused the registration on its merits, or ended the
    /// watch (the process changed credentials): it will not change its mind
    /// by itself, so the link stops. A refusal for capacity (too many
    /// clients or watches) is reported as [`LinkEvent::Lost`] and retried.
    Refused(String),
}

/// Settings of a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The agent's socket.
    pub socket: PathBuf,
    /// What to register (`direct` is forced on).
    pub registration: Registration,
    /// Name in the agent's log.
    pub name: String,
    /// Time between reconnection attempts.
    pub retry: Duration,
    /// How the link thread, which reads the events, asks to be scheduled
    /// so an event is read the moment it is written
    /// ([`crate::sched`]: `SCHED_FIFO` where permitted, else a short
    /// slice).
    pub reader: ReaderPolicy,
    /// After a spike alarm, busy-read the ring for at most this long
    /// instead of sleeping in `poll` (until the next level event or the
    /// predicted terminate crossing, if sooner): the event is read within
    /// µs instead of ~0.1 ms, for one CPU during the window
    /// ([`RingReader::spin_after_alarm`]). `None`: never.
    pub spin: Option<Duration>,
}

enum Outgoing {
    Accounting {
        t_ns: u64,
        split: Split,
        heap: Option<HeapSample>,
    },
    Purge {
        t_ns: u64,
        purge: PurgeSample,
    },
    Stop,
}

/// The running link; dropping it stops the thread.
#[derive(Debug)]
pub struct Link {
    tx: mpsc::Sender<Outgoing>,
    wake: std::os::unix::net::UnixStream,
    thread: Option<JoinHandle<()>>,
    reader: InForce,
}

impl Link {
    /// Starts the link thread; `on_event` runs on it for every report.
    pub fn spawn(
        config: LinkConfig,
        on_event: impl FnMut(LinkEvent) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (wake, wake_rx) = std::os::unix::net::UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        let (granted_tx, granted) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("amm-agent-link".into())
            .spawn(move || {
                // the policy is the thread's own: set it there, first
                let _ = granted_tx.send(config.reader.apply());
                run(config, rx, wake_rx, on_event)
            })?;
        let reader = granted
            .recv()
            .map_err(|_| std::io::Error::other("the link thread ended before it was scheduled"))?;
        Ok(Self {
            tx,
            wake,
            thread: Some(thread),
            reader,
        })
    }

    /// The scheduling in force for the link thread (which reads the
    /// events), for the owner's log.
    pub fn reader_scheduling(&self) -> &InForce {
        &self.reader
    }

    /// Sends the worker's accounting to the agent (dropped while the agent
    /// is away).
    pub fn report(&self, t_ns: u64, split: Split) {
        self.send(Outgoing::Accounting {
            t_ns,
            split,
            heap: None,
        });
    }

    /// Sends the worker's accounting with its allocator's statistics.
    pub fn report_with_heap(&self, t_ns: u64, split: Split, heap: HeapSample) {
        self.send(Outgoing::Accounting {
            t_ns,
            split,
            heap: Some(heap),
        });
    }

    /// Tells the agent about a purge/trim the worker ran.
    pub fn report_purge(&self, t_ns: u64, purge: PurgeSample) {
        self.send(Outgoing::Purge { t_ns, purge });
    }

    fn send(&self, m: Outgoing) {
        if self.tx.send(m).is_ok() {
            let _ = std::io::Write::write(&mut &self.wake, &[1]);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.tx.send(Outgoing::Stop);
        let _ = std::io::Write::write(&mut &self.wake, &[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a session ended.
enum End {
    Stop,
    Lost(String),
    Refused(String),
}

fn run(
    config: LinkConfig,
    rx: mpsc::Receiver<Outgoing>,
    wake: std::os::unix::net::UnixStream,
    mut on_event: impl FnMut(LinkEvent),
) {
    // one report per outage: set when reported, cleared by a registration
    let mut lost = false;
    loop {
        let mut connected = false;
        let end = session(&config, &rx, &wake, &mut |e: LinkEvent| {
            connected |= matches!(e, LinkEvent::Connected { .. });
            on_event(e)
        });
        if connected {
            lost = false;
        }
        match end {
            End::Stop => return,
            End::Refused(reason) => {
                on_event(LinkEvent::Refused(reason));
                return;
            }
            End::Lost(reason) => {
                if !lost {
                    on_event(LinkEvent::Lost(reason));
                    lost = true;
                }
            }
        }
        // wait before retrying, but stop at once when asked
        if wait_readable(&[wake.as_fd()], Some(config.retry)).is_some_and(|r| r[0]) {
            drain(&wake);
            if rx.try_iter().any(|m| matches!(m, Outgoing::Stop)) {
                return;
            }
        }
    }
}

fn session(
    config: &LinkConfig,
    rx: &mpsc::Receiver<Outgoing>,
    wake: &std::os::unix::net::UnixStream,
    on_event: &mut dyn FnMut(LinkEvent),
) -> End {
    let mut client = match Client::connect(&config.socket, &config.name, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => return End::Lost(e.to_string()),
    };
    let reg = Registration {
        direct: true,
        ..config.registration.clone()
    };
    let registered = match client.register(&reg) {
        Ok(r) => r,
        Err(e) if e.is_transient() => return End::Lost(e.to_string()),
        Err(crate::ClientError::Refused { reason, .. }) => return End::Refused(reason),
        Err(e) => return End::Lost(e.to_string()),
    };
    on_event(LinkEvent::Connected {
        thresholds: registered.thresholds,
        rss_bytes: registered.rss_bytes,
    });
    let Some(mut ring) = registered.ring else {
        return End::Lost("the agent sent no ring buffer".into());
    };
    ring.spin_after_alarm(config.spin);
    // the number the agent knows the process by (its own PID namespace's)
    serve(client, ring, registered.pid, rx, wake, on_event)
}

/// How often a spinning reader looks at the socket and at its owner.
const SPIN_CHECK: Duration = Duration::from_millis(1);

/// Reads events until the session ends: sleeping in `poll` on the ring, the
/// socket and the owner's wake-up, or, in a spin window after a spike
/// alarm, busy-reading the ring and looking at the others every
/// [`SPIN_CHECK`].
fn serve(
    mut client: Client,
    mut ring: RingReader,
    pid: u32,
    rx: &mpsc::Receiver<Outgoing>,
    wake: &std::os::unix::net::UnixStream,
    on_event: &mut dyn FnMut(LinkEvent),
) -> End {
    loop {
        while let Some(raw) = ring.next_event() {
            if let Some(end) = deliver(&raw, on_event) {
                return end;
            }
        }
        let spinning = ring.spinning().is_some();
        if spinning && let Some(raw) = ring.spin(SPIN_CHECK) {
            if let Some(end) = deliver(&raw, on_event) {
                return end;
            }
            continue;
        }
        let fds = [ring.as_fd(), client.stream().as_fd(), wake.as_fd()];
        let Some(ready) = wait_readable(&fds, spinning.then_some(Duration::ZERO)) else {
            return End::Lost("poll failed".into());
        };
        if let Some(end) = serve_fds(&ready, &mut client, pid, rx, wake) {
            return end;
        }
    }
}

/// Hands one kernel event to the owner; the end of the session if the
/// watch ended.
fn deliver(raw: &amm_ebpf::Event, on_event: &mut dyn FnMut(LinkEvent)) -> Option<End> {
    let m = EventMessage::from_kernel(raw)?;
    let ended = m.event == amm_ebpf::EventKind::Credentials;
    on_event(LinkEvent::Event(m));
    ended.then(|| {
        End::Refused(
            "the process changed credentials (setuid/setgid or file-capability exec): the agent ended its watch".into(),
        )
    })
}

/// Serves the socket and the owner's messages when `ready` says so (the
/// ring is read by the caller); the end of the session, if it ended.
fn serve_fds(
    ready: &[bool],
    client: &mut Client,
    pid: u32,
    rx: &mpsc::Receiver<Outgoing>,
    wake: &std::os::unix::net::UnixStream,
) -> Option<End> {
    let gone = |e: &dyn std::fmt::Display| Some(End::Lost(format!("the agent went away: {e}")));
    if ready[1] {
        // the agent only writes events we already have from the ring,
        // answers, or closes: read to notice a close
        if let Err(e) = client.next_event(Some(Duration::from_millis(1))) {
            return gone(&e);
        }
    }
    if !ready[2] {
        return None;
    }
    drain(wake);
    for m in rx.try_iter() {
        let msg = match m {
            Outgoing::Stop => return Some(End::Stop),
            Outgoing::Accounting { t_ns, split, heap } => ClientMessage::Accounting {
                pid,
                t_ns,
                split,
                heap,
            },
            Outgoing::Purge { t_ns, purge } => ClientMessage::Purge { pid, t_ns, purge },
        };
        if let Err(e) = client.send_message(&msg) {
            return gone(&e);
        }
    }
    None
}

fn drain(s: &std::os::unix::net::UnixStream) {
    let mut buf = [0u8; 64];
    while matches!(std::io::Read::read(&mut &*s, &mut buf), Ok(n) if n > 0) {}
}

/// poll(2) for readability: for each fd, whether it is readable (or hung
/// up, or in error); `None` on error.
fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Option<Vec<bool>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|&fd| PollFd::new(fd, PollFlags::POLLIN))
        .collect();
    crate::sys::poll(&mut pfds, timeout).ok()?;
    // flags nix does not know are still flags the kernel set
    Some(
        pfds.iter()
            .map(|p| p.revents().is_none_or(|r| !r.is_empty()))
            .collect(),
    )
}
