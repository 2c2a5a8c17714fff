//! A blocking client for the agent's socket.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::ring::RingReader;
use crate::{
    AgentStatus, ClientMessage, Denial, EventMessage, FrameError, Registration, ServerMessage,
    ThresholdBytes, VERSION, decode, write_message,
};
use amm_ebpf::Level;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error(
        "cannot connect to the agent at {path}: {source}; is `amm-agent run` running, and may this user open its socket?"
    )]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// A frame could not be exchanged.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The agent refused a request about `pid`.
    #[error("the agent refused pid {pid}: {reason}")]
    Refused {
        /// The pid.
        pid: u32,
        /// The agent's reason.
        reason: String,
        /// The reason for programs (`None` from an older agent).
        code: Option<Denial>,
    },
    /// The agent serves its most clients (overall or for this uid), or
    /// closed this connection as idle: try again later.
    #[error("the agent is busy: {0}")]
    Busy(String),
    /// The agent reported a protocol error and closed.
    #[error("the agent closed the connection: {0}")]
    Agent(String),
    /// The agent answered something unexpected.
    #[error("unexpected answer from the agent: {0:?}")]
    Unexpected(Box<ServerMessage>),
}

impl ClientError {
    /// The error for an agent's closing `Error` message.
    fn closed(reason: String, code: Option<Denial>) -> Self {
        match code {
            Some(Denial::TooManyClients | Denial::Idle) => Self::Busy(reason),
            _ => Self::Agent(reason),
        }
    }

    /// True when retrying later may succeed: the agent is busy, full, or
    /// could not be reached; false when it refused on the merits.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Refused { code, .. } => code.is_some_and(Denial::is_transient),
            Self::Busy(_) | Self::Connect { .. } | Self::Frame(_) => true,
            Self::Agent(_) | Self::Unexpected(_) => false,
        }
    }
}

/// What the agent answered to a successful registration.
#[derive(Debug)]
pub struct Registered {
    /// The process.
    pub pid: u32,
    /// Its RSS when the watch started.
    pub rss_bytes: u64,
    /// Its level then.
    pub level: Level,
    /// Thresholds in bytes.
    pub thresholds: ThresholdBytes,
    /// With [`Registration::direct`]: the process's own ring buffer.
    pub ring: Option<RingReader>,
}

/// A connection to the agent that said hello.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    pending: VecDeque<EventMessage>,
    fds: Vec<OwnedFd>,
}

impl Client {
    /// Connects, says hello and waits for the welcome (at most `timeout`).
    pub fn connect(path: &Path, name: &str, timeout: Duration) -> Result<Self, ClientError> {
        let stream = crate::connect(path, timeout).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::handshake(stream, name)
    }

    /// Says hello on a connected socket and waits for the welcome. An agent
    /// that refuses the connection (too many clients) may close it before
    /// the hello is written: the write fails ("Broken pipe") and the
    /// refusal waiting in the socket is the error returned.
    fn handshake(stream: UnixStream, name: &str) -> Result<Self, ClientError> {
        let mut c = Self {
            stream,
            pending: VecDeque::new(),
            fds: Vec::new(),
        };
        c.send(&ClientMessage::Hello {
            version: VERSION,
            client: name.to_string(),
        })?;
        match c.recv()? {
            ServerMessage::Welcome { .. } => Ok(c),
            ServerMessage::Error { reason, code } => Err(ClientError::closed(reason, code)),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The underlying socket (e.g. to poll it).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Writes a request. When the agent has closed the connection, the
    /// write fails but the agent's last word (why it closed: idle, busy, a
    /// protocol error) may still be waiting to be read: that is the error
    /// returned then.
    fn send(&mut self, msg: &ClientMessage) -> Result<(), ClientError> {
        let err = match write_message(&mut self.stream, msg) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        loop {
            match self.recv() {
                Ok(ServerMessage::Event(e)) => self.pending.push_back(e),
                Ok(ServerMessage::Error { reason, code }) => {
                    return Err(ClientError::closed(reason, code));
                }
                Ok(_) => {}
                Err(_) => return Err(err.into()),
            }
        }
    }

    /// Sends a message that has no answer (e.g. accounting).
    pub fn send_message(&mut self, msg: &ClientMessage) -> Result<(), ClientError> {
        self.send(msg)
    }

    fn recv(&mut self) -> Result<ServerMessage, ClientError> {
        let fd = self.stream.as_raw_fd();
        let fds = &mut self.fds;
        // recvmsg, so an fd that comes with a frame is kept
        let body = crate::read_frame_with(|buf| crate::fdpass::recv_with_fds(fd, buf, fds))?;
        Ok(decode(&body)?)
    }

    /// Waits for the answer to a request, queueing events that arrive first.
    fn answer(&mut self) -> Result<ServerMessage, ClientError> {
        loop {
            match self.recv()? {
                ServerMessage::Event(e) => self.pending.push_back(e),
                ServerMessage::Error { reason, code } => {
                    return Err(ClientError::closed(reason, code));
                }
                ServerMessage::Refused { pid, reason, code } => {
                    return Err(ClientError::Refused { pid, reason, code });
                }
                other => return Ok(other),
            }
        }
    }

    /// Asks the agent to watch `reg.pid`.
    pub fn register(&mut self, reg: &Registration) -> Result<Registered, ClientError> {
        self.send(&ClientMessage::Register(reg.clone()))?;
        match self.answer()? {
            ServerMessage::Registered {
                pid,
                rss_bytes,
                level,
                thresholds,
                ring_bytes,
            } => {
                let ring = match ring_bytes {
                    None => None,
                    Some(bytes) => {
                        if self.fds.is_empty() {
                            return Err(ClientError::Agent(
                                "the answer announced a ring buffer but carried no fd".into(),
                            ));
                        }
                        let fd = self.fds.remove(0);
                        Some(RingReader::new(fd, bytes as usize).map_err(FrameError::from)?)
                    }
                };
                Ok(Registered {
                    pid,
                    rss_bytes,
                    level,
                    thresholds,
                    ring,
                })
            }
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Stops watching `pid`.
    pub fn unregister(&mut self, pid: u32) -> Result<(), ClientError> {
        self.send(&ClientMessage::Unregister { pid })?;
        match self.answer()? {
            ServerMessage::Unregistered { .. } => Ok(()),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// One page of the agent's state: the first with `after: None`, then
    /// the page after each answer's `next`; `pid` keeps only that pid's
    /// watches.
    pub fn status_page(
        &mut self,
        after: Option<u64>,
        pid: Option<u32>,
    ) -> Result<AgentStatus, ClientError> {
        self.send(&ClientMessage::Status { after, pid })?;
        match self.answer()? {
            ServerMessage::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The agent's whole state, every page gathered (the counters are those
    /// of the last page).
    pub fn status(&mut self) -> Result<AgentStatus, ClientError> {
        self.status_pages(None)
    }

    /// The live and ended watches of one pid (and the agent's counters).
    pub fn status_of(&mut self, pid: u32) -> Result<AgentStatus, ClientError> {
        self.status_pages(Some(pid))
    }

    fn status_pages(&mut self, pid: Option<u32>) -> Result<AgentStatus, ClientError> {
        let mut all = self.status_page(None, pid)?;
        // a cursor that does not move would loop forever: stop on it
        while let Some(after) = all.next.take() {
            let page = self.status_page(Some(after), pid)?;
            if page.next.is_some_and(|n| n <= after) {
                return Err(ClientError::Agent(format!(
                    "status paging did not advance (cursor {after})"
                )));
            }
            all.watches.extend(page.watches);
            all.ended.extend(page.ended);
            all = AgentStatus {
                watches: all.watches,
                ended: all.ended,
                ..page
            };
        }
        Ok(all)
    }

    /// Whether the kernel killed `pid` at the page that crossed terminate,
    /// as the agent asked: the RSS at that page, from the agent's record of
    /// the ended watch. `Ok(None)` when it did not, or the agent never
    /// watched the pid. Waits up to 0.5 s for the agent to record the end
    /// (it does when its own exit event arrives).
    pub fn killed_at_terminate(&mut self, pid: u32) -> Result<Option<u64>, ClientError> {
        for _ in 0..10 {
            let status = self.status_of(pid)?;
            if let Some(w) = status.ended.iter().rev().find(|w| w.pid == pid) {
                return Ok(w.timeline.iter().rev().find_map(|s| match s.what {
                    crate::SampleKind::Level {
                        to: amm_ebpf::Level::Terminate,
                        signalled: true,
                        ..
                    } => Some(s.rss_bytes),
                    _ => None,
                }));
            }
            if !status.watches.iter().any(|w| w.pid == pid) {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(None)
    }

    /// All of one process's timeline at the agent, page by page.
    pub fn timeline(&mut self, pid: u32) -> Result<Vec<crate::Sample>, ClientError> {
        let mut out = Vec::new();
        loop {
            self.send(&ClientMessage::Timeline {
                pid,
                from: out.len(),
                max: crate::TIMELINE_PAGE,
            })?;
            match self.answer()? {
                ServerMessage::Timeline { total, samples, .. } => {
                    let done = samples.is_empty() || out.len() + samples.len() >= total;
                    out.extend(samples);
                    if done {
                        return Ok(out);
                    }
                }
                other => return Err(ClientError::Unexpected(Box::new(other))),
            }
        }
    }

    /// Round trip to check the agent still serves this connection.
    pub fn ping(&mut self, nonce: u64) -> Result<(), ClientError> {
        self.send(&ClientMessage::Ping { nonce })?;
        match self.answer()? {
            ServerMessage::Pong { nonce: n } if n == nonce => Ok(()),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The next event, waiting at most `timeout` (`None`: the socket's own
    /// timeout). Returns `Ok(None)` when the wait timed out.
    pub fn next_event(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<EventMessage>, ClientError> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(Some(e));
        }
        let old = self.stream.read_timeout().map_err(FrameError::from)?;
        if timeout.is_some() {
            self.stream
                .set_read_timeout(timeout)
                .map_err(FrameError::from)?;
        }
        let res = self.recv();
        if timeout.is_some() {
            self.stream
                .set_read_timeout(old)
                .map_err(FrameError::from)?;
        }
        match res {
            Ok(ServerMessage::Event(e)) => Ok(Some(e)),
            Ok(ServerMessage::Error { reason, code }) => Err(ClientError::closed(reason, code)),
            Ok(other) => Err(ClientError::Unexpected(Box::new(other))),
            Err(ClientError::Frame(FrameError::Io(e)))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_sent_before_the_hello_is_read_not_a_broken_pipe() {
        let (client_end, mut agent_end) = UnixStream::pair().expect("socket pair");
        let reason = "the agent is at its most clients for uid 1000 (32); close idle connections";
        write_message(
            &mut agent_end,
            &ServerMessage::Error {
                reason: reason.into(),
                code: Some(Denial::TooManyClients),
            },
        )
        .expect("the refusal");
        // the agent closes before the client writes its hello
        drop(agent_end);
        match Client::handshake(client_end, "test") {
            Err(ClientError::Busy(r)) => assert_eq!(r, reason),
            other => panic!("expected the agent's refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_agent_that_closes_without_a_word_is_a_transient_error() {
        let (client_end, agent_end) = UnixStream::pair().expect("socket pair");
        drop(agent_end);
        let err = Client::handshake(client_end, "test").expect_err("closed");
        assert!(err.is_transient(), "{err}");
    }
}
