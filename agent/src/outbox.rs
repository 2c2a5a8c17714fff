//! What the agent sends one client: written straight to the socket when
//! nothing is waiting (an event leaves in the same turn the ring buffer
//! produced it), queued otherwise and flushed by the client's writer task.
//! A client whose queue outgrows its cap, or whose socket stays full past
//! the write timeout, is not reading: the caller drops it.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

#[derive(Default)]
struct State {
    queue: VecDeque<Vec<u8>>,
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

    /// Sends a frame now if the socket takes it, else queues it. `Err` says
    /// why the client must be dropped.
    pub fn push(&self, frame: Vec<u8>) -> Result<(), String> {
        let mut st = self.state();
        if st.finished {
            return Ok(());
        }
        let mut written = 0;
        if st.queue.is_empty() {
            while written < frame.len() {
                match self.wr.try_write(&frame[written..]) {
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
        st.queue.push_back(frame);
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
            while let Some(front) = st.queue.front() {
                let len = front.len();
                match self.wr.try_write(&front[st.offset..]) {
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
