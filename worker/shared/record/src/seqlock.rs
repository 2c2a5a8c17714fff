//! The seqlock over [`Stats`]: one writer, any number of readers in any
//! process, no reader ever blocks the writer.
//!
//! The orderings are those of Boehm, "Can seqlocks get along with
//! programming language memory models?" (2012): the writer makes the
//! sequence odd, issues a release fence, stores the data (relaxed atomics),
//! and publishes the next even sequence with release; a reader loads the
//! sequence with acquire, loads the data (relaxed), issues an acquire fence
//! and loads the sequence again. Equal and even: the copy is one whole
//! publication. All data are atomics, so a torn read is a retry, never
//! undefined behaviour.

use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use crate::layout::{STATS_WORDS, Stats};

/// How long a reader keeps retrying before it says the writer seems stuck
/// inside a write (it died there, or is stopped).
pub const READ_PATIENCE: Duration = Duration::from_millis(100);

/// Writes one publication. `seq` is the writer's own copy of the sequence
/// (even); it is advanced by two.
pub fn write(
    shared_seq: &AtomicU64,
    data: &[AtomicU64; STATS_WORDS],
    seq: &mut u64,
    stats: &Stats,
) {
    let words: &[u64; STATS_WORDS] = bytemuck::cast_ref(stats);
    shared_seq.store(seq.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    for (slot, w) in data.iter().zip(words.iter()) {
        slot.store(*w, Ordering::Relaxed);
    }
    *seq = seq.wrapping_add(2);
    shared_seq.store(*seq, Ordering::Release);
}

/// A read attempt's result.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A whole publication and how many attempts it took.
    Read(u32),
    /// The sequence stayed odd or kept moving for [`READ_PATIENCE`].
    Stuck,
}

/// Copies one whole publication into `out`, retrying while the writer is
/// inside a write or has not published yet (spinning first, then yielding,
/// then sleeping briefly).
pub fn read(
    shared_seq: &AtomicU64,
    data: &[AtomicU64; STATS_WORDS],
    out: &mut Stats,
) -> ReadOutcome {
    let words: &mut [u64; STATS_WORDS] = bytemuck::cast_mut(out);
    let start = Instant::now();
    let mut attempt: u32 = 0;
    loop {
        attempt = attempt.saturating_add(1);
        let before = shared_seq.load(Ordering::Acquire);
        // 0: created, nothing published yet (the first publication follows
        // at once); odd: a write is under way
        if before & 1 == 0 && before != 0 {
            for (w, slot) in words.iter_mut().zip(data.iter()) {
                *w = slot.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if shared_seq.load(Ordering::Relaxed) == before {
                return ReadOutcome::Read(attempt);
            }
        }
        if start.elapsed() >= READ_PATIENCE {
            return ReadOutcome::Stuck;
        }
        match attempt {
            0..64 => std::hint::spin_loop(),
            64..256 => std::thread::yield_now(),
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    struct Shared {
        seq: AtomicU64,
        data: [AtomicU64; STATS_WORDS],
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            seq: AtomicU64::new(0),
            data: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    /// A writer fills every word with the same counter; a reader that ever
    /// sees two different values in one copy has read a torn publication.
    #[test]
    fn a_torn_read_is_retried_never_returned() {
        let s = shared();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seq = 0u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let stats: Stats = bytemuck::cast([n; STATS_WORDS]);
                    write(&s.seq, &s.data, &mut seq, &stats);
                    // a writer that never pauses starves every reader (the
                    // reader then says Stuck, as it must); pause a little,
                    // irregularly, so reads both overlap writes and finish,
                    // and now and then for a whole millisecond
                    pause_micros(if n.is_multiple_of(64) {
                        1000
                    } else {
                        (n % 16) * 5
                    });
                }
                n
            })
        };
        let mut out = Stats::default();
        let (mut retried, mut stuck, mut last) = (0u64, 0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut reads = 0;
        while reads < 100_000 {
            // On a loaded machine the reader can lose its CPU for longer
            // than its patience while the writer keeps writing: Stuck is
            // then the right answer, and reading again must still succeed.
            match read(&s.seq, &s.data, &mut out) {
                ReadOutcome::Read(attempts) => retried += u64::from(attempts > 1),
                ReadOutcome::Stuck => {
                    stuck += 1;
                    assert!(
                        Instant::now() < deadline,
                        "no progress in 120 s: {stuck} stuck reads"
                    );
                    continue;
                }
            }
            reads += 1;
            let words: &[u64; STATS_WORDS] = bytemuck::cast_ref(&out);
            assert!(
                words.iter().all(|w| *w == words[0]),
                "torn read: words {} and {:?}",
                words[0],
                words.iter().find(|w| **w != words[0])
            );
            assert!(
                words[0] >= last,
                "went back in time: {} after {last}",
                words[0]
            );
            last = words[0];
        }
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().expect("writer thread");
        // Not a timing assertion: with a writer this busy some reads must
        // have overlapped a write, or the test proved nothing.
        eprintln!(
            "{written} publications, {retried} reads retried, {stuck} gave up and were repeated"
        );
    }

    fn pause_micros(us: u64) {
        let until = Instant::now() + Duration::from_micros(us);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_record_never_published_is_not_read_as_zeros() {
        let s = shared();
        let mut out = Stats::default();
        assert_eq!(read(&s.seq, &s.data, &mut out), ReadOutcome::Stuck);
    }

    #[test]
    fn a_writer_that_died_inside_a_write_does_not_hang_the_reader() {
        let s = shared();
        s.seq.store(7, Ordering::Release); // odd forever
        let mut out = Stats::default();
        assert_eq!(read(&s.seq, &s.data, &mut out), ReadOutcome::Stuck);
    }
}
