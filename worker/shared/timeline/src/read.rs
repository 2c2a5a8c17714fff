//! Reading a timeline: one line at a time, never more than [`MAX_LINE`]
//! bytes of it in memory, every problem named by its line number.
//!
//! What is fatal and what is skipped:
//!
//! * a line newer than this reader ([`ReadError::Newer`]): fatal, upgrade;
//! * the first line too long, or the first [`GIVE_UP_AFTER`] lines all
//!   unreadable ([`ReadError::NotATimeline`]): fatal, this is not a
//!   timeline (`/dev/zero`, a binary, a 300 MiB line);
//! * a later line too long (skipped without holding it; fatal past
//!   [`MAX_DISCARD`] bytes), not UTF-8, not JSON, or JSON that is not a
//!   timeline line: skipped, and returned as [`Skipped`] with its number and
//!   why, so the caller can use the rest and say what it left out;
//! * an I/O error: fatal, with the line it happened in.

use std::io::{self, BufRead};

use serde::Deserialize;

use crate::line::{Line, VERSION};

/// Longest line read, bytes. A tick with every jemalloc size class and
/// arena is under 32 KiB.
pub const MAX_LINE: usize = 1 << 20;

/// Most bytes of over-long lines skipped in one file before giving up.
pub const MAX_DISCARD: u64 = 64 << 20;

/// Unreadable lines at the start of a file after which it is not a timeline.
pub const GIVE_UP_AFTER: u64 = 1000;

/// Why a timeline cannot be read on.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading failed.
    #[error("cannot read the timeline (line {line}): {source}")]
    Io {
        /// The line being read.
        line: u64,
        /// What the system said.
        source: io::Error,
    },
    /// Written by a newer amm.
    #[error(
        "line {line} was written with timeline version {version}, newer than this amm reads \
         (version {VERSION}): upgrade amm to read it"
    )]
    Newer {
        /// The line.
        line: u64,
        /// Its version.
        version: u32,
    },
    /// Not a timeline at all.
    #[error("this is not an amm timeline: {why}")]
    NotATimeline {
        /// What gave it away.
        why: String,
    },
}

/// A line left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its number (from 1).
    pub line: u64,
    /// Why, in a few words.
    pub why: String,
}

/// What [`Reader`] yields: a line, or a line it skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A timeline line and its number.
    Line(u64, Box<Line>),
    /// A line that could not be used.
    Skipped(Skipped),
}

/// Reads timeline lines from `R`; an iterator of [`Item`]s that ends at the
/// end of the input or at the first fatal [`ReadError`].
#[derive(Debug)]
pub struct Reader<R> {
    inner: R,
    line: u64,
    buf: Vec<u8>,
    good: u64,
    bad_before_good: u64,
    discarded: u64,
    done: bool,
}

/// How far reading one raw line got.
enum Raw {
    /// A whole line (or the last, unterminated one) is in the buffer.
    Line { terminated: bool },
    /// The line was longer than [`MAX_LINE`]; this many bytes were dropped.
    TooLong(u64),
    /// Nothing left.
    Eof,
}

#[derive(Deserialize)]
struct VersionOnly {
    #[serde(default)]
    v: u32,
}

impl<R: BufRead> Reader<R> {
    /// A reader over `inner` (wrap a file in a `BufReader`).
    pub fn new(inner: R) -> Reader<R> {
        Reader {
            inner,
            line: 0,
            buf: Vec::new(),
            good: 0,
            bad_before_good: 0,
            discarded: 0,
            done: false,
        }
    }

    /// Reads one raw line into `buf`, holding at most [`MAX_LINE`] bytes.
    fn raw(&mut self) -> io::Result<Raw> {
        self.buf.clear();
        let mut dropped: u64 = 0;
        loop {
            let chunk = match self.inner.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(match (dropped, self.buf.is_empty()) {
                    (0, true) => Raw::Eof,
                    (0, false) => Raw::Line { terminated: false },
                    (d, _) => Raw::TooLong(d),
                });
            }
            let (take, newline) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if dropped == 0 && self.buf.len() + take <= MAX_LINE {
                self.buf.extend_from_slice(&chunk[..take]);
            } else {
                dropped += (self.buf.len() + take) as u64;
                self.buf.clear();
                if self.good == 0 || self.discarded + dropped > MAX_DISCARD {
                    // not worth reading through: /dev/zero never ends
                    self.inner.consume(take);
                    return Ok(Raw::TooLong(dropped));
                }
            }
            self.inner.consume(take + usize::from(newline));
            if newline {
                return Ok(if dropped > 0 {
                    Raw::TooLong(dropped)
                } else {
                    Raw::Line { terminated: true }
                });
            }
        }
    }

    fn skipped(&mut self, why: String) -> Result<Item, ReadError> {
        if self.good == 0 {
            self.bad_before_good += 1;
            if self.bad_before_good >= GIVE_UP_AFTER {
                return Err(ReadError::NotATimeline {
                    why: format!(
                        "none of its first {GIVE_UP_AFTER} lines is a timeline line ({why})"
                    ),
                });
            }
        }
        Ok(Item::Skipped(Skipped {
            line: self.line,
            why,
        }))
    }

    /// Parses the line in `buf`.
    fn parse(&mut self, terminated: bool) -> Option<Result<Item, ReadError>> {
        let text = match std::str::from_utf8(&self.buf) {
            Ok(t) => t.trim(),
            Err(e) => {
                let why = format!("not UTF-8 (invalid byte at column {})", e.valid_up_to() + 1);
                return Some(self.skipped(why));
            }
        };
        if text.is_empty() {
            return None;
        }
        match serde_json::from_str::<Line>(text) {
            Ok(l) if l.v > VERSION => Some(Err(ReadError::Newer {
                line: self.line,
                version: l.v,
            })),
            Ok(l) => {
                self.good += 1;
                Some(Ok(Item::Line(self.line, Box::new(l))))
            }
            Err(e) => {
                if let Ok(VersionOnly { v }) = serde_json::from_str::<VersionOnly>(text)
                    && v > VERSION
                {
                    return Some(Err(ReadError::Newer {
                        line: self.line,
                        version: v,
                    }));
                }
                let why = if !terminated {
                    format!("incomplete last line (a writer still writing it?): {e}")
                } else if e.is_data() {
                    format!("not a timeline line: {e}")
                } else {
                    format!("not JSON: {e}")
                };
                Some(self.skipped(why))
            }
        }
    }
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = Result<Item, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.line += 1;
            let raw = match self.raw() {
                Ok(r) => r,
                Err(source) => {
                    self.done = true;
                    return Some(Err(ReadError::Io {
                        line: self.line,
                        source,
                    }));
                }
            };
            let out = match raw {
                Raw::Eof => {
                    self.done = true;
                    return None;
                }
                Raw::TooLong(n) => {
                    self.discarded += n;
                    if self.good == 0 {
                        Some(Err(ReadError::NotATimeline {
                            why: format!(
                                "line {} is longer than {} KiB (a timeline line is a few KiB)",
                                self.line,
                                MAX_LINE >> 10
                            ),
                        }))
                    } else if self.discarded > MAX_DISCARD {
                        Some(Err(ReadError::NotATimeline {
                            why: format!(
                                "more than {} MiB of over-long lines by line {}",
                                MAX_DISCARD >> 20,
                                self.line
                            ),
                        }))
                    } else {
                        Some(self.skipped(format!(
                            "longer than {} KiB ({n} bytes), left unread",
                            MAX_LINE >> 10
                        )))
                    }
                }
                Raw::Line { terminated } => self.parse(terminated),
            };
            if let Some(item) = out {
                if item.is_err() {
                    self.done = true;
                }
                return Some(item);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::Entry;

    fn read_all(bytes: &[u8]) -> (Vec<Item>, Option<ReadError>) {
        let mut items = Vec::new();
        for r in Reader::new(bytes) {
            match r {
                Ok(i) => items.push(i),
                Err(e) => return (items, Some(e)),
            }
        }
        (items, None)
    }

    const TICK: &str = r#"{"v":1,"t_ms":0,"kind":"tick","process":5}"#;

    #[test]
    fn bad_lines_are_skipped_with_their_numbers_and_the_rest_is_read() {
        let mut text = Vec::new();
        text.extend_from_slice(TICK.as_bytes());
        text.extend_from_slice(b"\n\n{\"t_ms\":1,\"kind\":\"ti\n");
        text.extend_from_slice(b"\xff\xfe not utf-8\n");
        text.extend_from_slice(b"[1,2]\n");
        text.extend_from_slice(TICK.as_bytes());
        text.extend_from_slice(b"\n{\"t_ms\":9,\"kind\":\"ti");
        let (items, err) = read_all(&text);
        assert!(err.is_none(), "{err:?}");
        let skipped: Vec<(u64, String)> = items
            .iter()
            .filter_map(|i| match i {
                Item::Skipped(s) => Some((s.line, s.why.clone())),
                Item::Line(..) => None,
            })
            .collect();
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert_eq!(skipped[0].0, 3);
        assert!(skipped[0].1.contains("not JSON"), "{}", skipped[0].1);
        assert_eq!(skipped[1].0, 4);
        assert!(
            skipped[1]
                .1
                .contains("not UTF-8 (invalid byte at column 1)")
        );
        assert_eq!(skipped[2].0, 5);
        assert!(
            skipped[2].1.contains("not a timeline line"),
            "{}",
            skipped[2].1
        );
        assert_eq!(skipped[3].0, 7);
        assert!(skipped[3].1.contains("incomplete last line"));
        let lines: Vec<u64> = items
            .iter()
            .filter_map(|i| match i {
                Item::Line(n, l) if matches!(l.entry, Entry::Tick(_)) => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(lines, vec![1, 6]);
    }

    #[test]
    fn a_newer_version_is_an_error_that_says_upgrade() {
        let text = format!("{TICK}\n{{\"v\":2,\"t_ms\":1,\"kind\":\"tick\",\"rss\":\"new\"}}\n");
        let (items, err) = read_all(text.as_bytes());
        assert_eq!(items.len(), 1);
        let e = err.expect("newer");
        assert!(
            matches!(
                e,
                ReadError::Newer {
                    line: 2,
                    version: 2
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("upgrade"), "{e}");
    }

    /// An endless source of one byte.
    struct Endless(u8, Vec<u8>);
    impl io::Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(self.0);
            Ok(buf.len())
        }
    }
    impl BufRead for Endless {
        fn fill_buf(&mut self) -> io::Result<&[u8]> {
            self.1.resize(64 << 10, self.0);
            Ok(&self.1)
        }
        fn consume(&mut self, _: usize) {}
    }

    #[test]
    fn dev_zero_is_not_read_forever() {
        let mut r = Reader::new(Endless(0, Vec::new()));
        match r.next() {
            Some(Err(ReadError::NotATimeline { why })) => {
                assert!(why.contains("line 1 is longer than 1024 KiB"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(r.next().is_none());
        assert!(r.buf.capacity() <= 2 * MAX_LINE, "{}", r.buf.capacity());
    }

    #[test]
    fn an_overlong_line_after_good_ones_is_skipped_without_holding_it() {
        let mut text = Vec::new();
        text.extend_from_slice(TICK.as_bytes());
        text.push(b'\n');
        text.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
        text.push(b'\n');
        text.extend_from_slice(TICK.as_bytes());
        let mut r = Reader::new(&text[..]);
        let items: Vec<Item> = r.by_ref().map(|i| i.expect("no fatal error")).collect();
        assert_eq!(items.len(), 3);
        match &items[1] {
            Item::Skipped(s) => {
                assert_eq!(s.line, 2);
                assert!(s.why.contains("longer than"), "{}", s.why);
            }
            other => panic!("{other:?}"),
        }
        assert!(r.buf.capacity() <= 2 * MAX_LINE, "{}", r.buf.capacity());
    }

    proptest::proptest! {
        /// Whatever the bytes, the reader ends, never panics, numbers lines
        /// in order and never holds more than a line's cap.
        #[test]
        fn any_bytes_are_read_safely(bytes in proptest::collection::vec(
            proptest::prop_oneof![proptest::num::u8::ANY, proptest::strategy::Just(b'\n')],
            0..1024,
        )) {
            let mut last = 0;
            let mut r = Reader::new(&bytes[..]);
            for item in r.by_ref() {
                let n = match item {
                    Ok(Item::Line(n, _)) => n,
                    Ok(Item::Skipped(s)) => s.line,
                    Err(_) => break,
                };
                proptest::prop_assert!(n > last);
                last = n;
            }
            proptest::prop_assert!(r.buf.capacity() <= 2 * MAX_LINE);
        }
    }

    #[test]
    fn a_binary_file_is_not_a_timeline() {
        let text: Vec<u8> = (0..5000u32)
            .flat_map(|i| [0x80 | (i % 50) as u8, b'\n'])
            .collect();
        let (items, err) = read_all(&text);
        assert_eq!(items.len() as u64, GIVE_UP_AFTER - 1);
        assert!(
            matches!(err, Some(ReadError::NotATimeline { .. })),
            "{err:?}"
        );
    }
}
