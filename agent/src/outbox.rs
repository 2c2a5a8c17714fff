//! What the agent sends one client: written straight to the socket when
//! nothing is waiting (an event leaves in the same turn the ring buffer
//! produced it), queued otherwise and flushed by the client's writer task.
//! A client whose queue outgrows its cap, or whose socket stays full past
//! the write timeout, is not reading: the caller drops it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

/// A frame, and the fd to attach to its first byte if it carries one (until
/// that byte is sent).
type Frame = (Vec<u8>, Option<OwnedFd>);

#[derive(Default)]
struct State {
    queue: VecDeque<Frame>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Bytes queued.
    bytes: usize,
    /// No more frames will come; the writer stops once the queue is empty.
    finished: bool,
}

/// The output side of one client connection.
pub struct Outbox {
    wr: OwnedWriteHalf,
    state: Mutex<State>,
    wake: Notify,
    cap: usize,
}

impl Outbox {
    /// An outbox over the socket's write half, queueing at most `cap` bytes.
    pub fn new(wr: OwnedWriteHalf, cap: usize) -> Self {
        Self {
            wr,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            cap,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what the socket takes now; the fd goes with the first byte.
    fn write_some(&self, buf: &[u8], fd: &mut Option<OwnedFd>) -> io::Result<usize> {
        let n = match fd.as_ref() {
            None => self.wr.try_write(buf)?,
            Some(f) => {
                let sock = self.wr.as_ref();
                sock.try_io(Interest::WRITABLE, || {
                    amm_protocol::fdpass::send_with_fd(
                        sock.as_raw_fd(),
                        buf,
                        f.as_fd(),
                        MsgFlags::MSG_DONTWAIT,
                    )
                })?
            }
        };
        if n > 0 {
            *fd = None; // delivered with the first byte
        }
        Ok(n)
    }

    /// Sends a frame now if the socket takes it, else queues it. `Err` says
    /// why the client must be dropped.
    pub fn push(&self, frame: Vec<u8>, mut fd: Option<OwnedFd>) -> Result<(), String> {
        let mut st = self.state();
        if st.finished {
            return Ok(());
        }
        let mut written = 0;
        if st.queue.is_empty() {
            while written < frame.len() {
                match self.write_some(&frame[written..], &mut fd) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("write failed: {e}")),
                }
            }
            if written == frame.len() {
                return Ok(());
            }
        } else if st.bytes + frame.len() > self.cap {
            return Err(format!(
                "not reading its events ({} bytes waiting)",
                st.bytes
            ));
        }
        st.bytes += frame.len();
        if st.queue.is_empty() {
            st.offset = written;
        }
        st.queue.push_back((frame, fd));
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Nothing more will be pushed; [`Self::run`] returns once the queue is
    /// flushed.
    pub fn finish(&self) {
        self.state().finished = true;
        self.wake.notify_one();
    }

    /// The writer task: flushes the queue whenever the socket can take more.
    pub async fn run(&self, timeout: Duration) -> Result<(), String> {
        loop {
            let (empty, finished) = {
                let st = self.state();
                (st.queue.is_empty(), st.finished)
            };
            if empty {
                if finished {
                    return Ok(());
                }
                self.wake.notified().await;
                continue;
            }
            match tokio::time::timeout(timeout, self.wr.writable()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => {
                    return Err(format!(
                        "not reading: its socket stayed full for {timeout:?}"
                    ));
                }
            }
            let mut st = self.state();
            let st = &mut *st;
            while let Some((front, fd)) = st.queue.front_mut() {
                let len = front.len();
                match self.write_some(&front[st.offset..], fd) {
                    Ok(n) => {
                        st.offset += n;
                        if st.offset == len {
                            st.queue.pop_front();
                            st.bytes -= len;
                            st.offset = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("write failed: {e}")),
                }
            }
        }
    }
}
