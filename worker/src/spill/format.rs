//! The on-disk form of one spilled value, and the code that writes it
//! without leaving it in the page cache.
//!
//! One file per value, all integers little-endian:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `AMMSPILL` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | number of parts `n` |
//! | 16 | 4 | key length `k` |
//! | 20 | 4 | reserved (0) |
//! | 24 | 8 | payload length in bytes |
//! | 32 | 4 | CRC-32 (IEEE) of the payload |
//! | 36 | 4 | CRC-32 of the header with this field zeroed |
//! | 40 | 32 | `meta`: four u64 the value's owner uses (shapes) |
//! | 72 | 16·n | part table: dtype u32 (1 u8, 2 u32, 3 u64, 4 f64), reserved u32, element count u64 |
//! | 72+16n | k | the key, UTF-8 |
//! | header end | payload | the parts' elements back to back, native (little-endian) layout |
//!
//! Reading checks magic, version, header CRC, that the file holds the key
//! asked for, that the file is exactly header + payload long (shorter:
//! truncated; longer: corrupt) and the payload CRC; each failure is an
//! error naming the key. The payload is written first and the header last,
//! so a write cut short leaves no valid magic.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

use super::{Part, Value};

const MAGIC: &[u8; 8] = b"AMMSPILL";
const VERSION: u32 = 1;
const FIXED: usize = 72;
const PART_ENTRY: usize = 16;
const MAX_PARTS: u32 = 64;
const MAX_KEY: u32 = 1 << 20;
/// Writes and write-back go in steps of this size.
pub const CHUNK: usize = 8 << 20;

/// How a value is written.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// `fdatasync` before returning.
    pub fsync: bool,
    /// Write back each chunk and drop it from the page cache, so that the
    /// spilled bytes leave memory (and the cgroup's charge) for real.
    pub drop_cache: bool,
}

/// The header's size for a value and key.
pub fn header_len(nparts: usize, key: &str) -> usize {
    FIXED + PART_ENTRY * nparts + key.len()
}

fn header(key: &str, value: &Value, payload_len: u64, payload_crc: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(header_len(value.parts.len(), key));
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(value.parts.len() as u32).to_le_bytes());
    h.extend_from_slice(&(key.len() as u32).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&payload_len.to_le_bytes());
    h.extend_from_slice(&payload_crc.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // header CRC, filled below
    for m in value.meta {
        h.extend_from_slice(&m.to_le_bytes());
    }
    for p in &value.parts {
        h.extend_from_slice(&p.dtype().to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&(p.len() as u64).to_le_bytes());
    }
    h.extend_from_slice(key.as_bytes());
    let crc = crc32fast::hash(&h);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

/// `sync_file_range(2)`, which nix does not wrap: starts (and with `wait`
/// waits for) write-back of a range. Advisory here: tmpfs, for one, does
/// nothing, and a failure only leaves pages for the kernel to write later.
fn sync_range(f: &File, off: u64, len: u64, wait: bool) {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the fd is open for the call; sync_file_range touches no
    // memory of ours.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off, len, flags);
    }
}

/// Drops a range of the file from the page cache (clean pages only);
/// advisory, so a failure is ignored.
fn advise(f: &File, off: u64, len: u64, advice: PosixFadviseAdvice) {
    if let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) {
        let _ = posix_fadvise(f.as_fd(), off, len, advice);
    }
}

fn drop_range(f: &File, off: u64, len: u64) {
    advise(f, off, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// Writes `value` under `key` to `f`, a new empty file; returns the file's
/// size. On error the caller removes the file.
pub fn write_value(f: &mut File, key: &str, value: &Value, opts: WriteOptions) -> io::Result<u64> {
    let hlen = header_len(value.parts.len(), key) as u64;
    f.seek(SeekFrom::Start(hlen))?;
    let mut crc = crc32fast::Hasher::new();
    let mut off = hlen;
    // The chunk written before the current one: waited for and dropped
    // while the current one is being written back (a two-deep pipeline).
    let mut pending: Option<(u64, u64)> = None;
    for part in &value.parts {
        for chunk in part.as_bytes().chunks(CHUNK) {
            crc.update(chunk);
            f.write_all(chunk)?;
            let len = chunk.len() as u64;
            if opts.drop_cache {
                sync_range(f, off, len, false);
                if let Some((poff, plen)) = pending.take() {
                    sync_range(f, poff, plen, true);
                    drop_range(f, poff, plen);
                }
                pending = Some((off, len));
            }
            off += len;
        }
    }
    let payload_len = off - hlen;
    let h = header(key, value, payload_len, crc.finalize());
    f.write_all_at(&h, 0)?;
    if opts.fsync {
        f.sync_data()?;
    }
    if opts.drop_cache {
        // The whole file, not just the last chunk and the header: the page
        // cache uses large folios, and DONTNEED skips a folio that is only
        // partly inside the range (the header's, or one across a chunk
        // boundary). Length 0 means "to the end of the file".
        sync_range(f, 0, 0, true);
        drop_range(f, 0, 0);
    }
    Ok(off)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// What is wrong with a spill file (the caller names the key and path).
#[derive(Debug)]
pub enum Defect {
    /// The bytes are not what the header promises.
    Corrupt(String),
    /// The file ends before what the header promises.
    Truncated(String),
    /// Reading failed.
    Io(io::Error),
}

impl From<io::Error> for Defect {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Defect::Truncated("file ended before what its header promises".into())
        } else {
            Defect::Io(e)
        }
    }
}

/// The checked header of a spill file.
#[derive(Debug)]
struct Header {
    len: usize,
    payload_crc: u32,
    meta: [u64; 4],
    /// Each part's dtype and element count.
    parts: Vec<(u32, usize)>,
}

/// Reads the value stored for `key` from `f` (opened by the spill
/// directory), checking everything the header promises. `drop_cache` drops
/// the file's pages from the page cache as they are consumed.
pub fn read_value(f: &mut File, key: &str, drop_cache: bool) -> Result<Value, Defect> {
    advise(f, 0, 0, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
    let file_len = f.metadata()?.len();
    let file: &File = f;
    let value = decode(&mut &*file, file_len, key, |off, len| {
        if drop_cache {
            drop_range(file, off, len);
        }
    })?;
    if drop_cache {
        // Folios across chunk boundaries were skipped above.
        drop_range(file, 0, 0);
    }
    Ok(value)
}

/// Decodes the value stored for `key` from `r`, which holds `file_len`
/// bytes (a file, or a slice for the fuzz target); `consumed(offset, len)`
/// is called after each chunk of payload is read.
pub fn decode<R: Read>(
    r: &mut R,
    file_len: u64,
    key: &str,
    mut consumed: impl FnMut(u64, u64),
) -> Result<Value, Defect> {
    let h = read_header(r, file_len, key)?;
    let mut crc = crc32fast::Hasher::new();
    let mut off = h.len as u64;
    let mut parts = Vec::with_capacity(h.parts.len());
    for &(dtype, elems) in &h.parts {
        let mut part = Part::zeroed(dtype, elems)
            .ok_or_else(|| Defect::Corrupt(format!("unknown part type {dtype}")))?;
        for chunk in part.as_bytes_mut().chunks_mut(CHUNK) {
            r.read_exact(chunk).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    Defect::Truncated("file ended inside the payload".into())
                }
                _ => Defect::Io(e),
            })?;
            crc.update(chunk);
            consumed(off, chunk.len() as u64);
            off += chunk.len() as u64;
        }
        parts.push(part);
    }
    if crc.finalize() != h.payload_crc {
        return Err(Defect::Corrupt("payload checksum mismatch".into()));
    }
    Ok(Value {
        meta: h.meta,
        parts,
    })
}

/// Reads and checks the header: magic, version, plausible sizes, header
/// CRC, the key, the file's length and the part table.
fn read_header<R: Read>(r: &mut R, file_len: u64, key: &str) -> Result<Header, Defect> {
    let corrupt = |s: String| Defect::Corrupt(s);
    if file_len < FIXED as u64 {
        return Err(Defect::Truncated(format!(
            "{file_len} bytes, shorter than the {FIXED}-byte header"
        )));
    }
    let mut fixed = [0u8; FIXED];
    r.read_exact(&mut fixed)?;
    if &fixed[0..8] != MAGIC {
        return Err(corrupt(
            "bad magic (not a spill file, or its write never finished)".into(),
        ));
    }
    let version = u32_at(&fixed, 8);
    if version != VERSION {
        return Err(corrupt(format!("unknown format version {version}")));
    }
    let nparts = u32_at(&fixed, 12);
    let key_len = u32_at(&fixed, 16);
    if nparts > MAX_PARTS || key_len > MAX_KEY {
        return Err(corrupt(format!(
            "implausible header ({nparts} parts, key of {key_len} bytes)"
        )));
    }
    let hlen = FIXED + PART_ENTRY * nparts as usize + key_len as usize;
    if file_len < hlen as u64 {
        return Err(Defect::Truncated(format!(
            "{file_len} bytes, shorter than its {hlen}-byte header"
        )));
    }
    let mut h = vec![0u8; hlen];
    h[..FIXED].copy_from_slice(&fixed);
    r.read_exact(&mut h[FIXED..])?;
    let header_crc = u32_at(&h, 36);
    h[36..40].copy_from_slice(&[0; 4]);
    if crc32fast::hash(&h) != header_crc {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let stored_key = &h[FIXED + PART_ENTRY * nparts as usize..];
    if stored_key != key.as_bytes() {
        return Err(corrupt(format!(
            "file holds key {:?}",
            String::from_utf8_lossy(stored_key)
        )));
    }
    let payload_len = u64_at(&h, 24);
    let expected_len = (hlen as u64)
        .checked_add(payload_len)
        .ok_or_else(|| corrupt("payload size overflows".into()))?;
    if file_len != expected_len {
        let msg = format!("{file_len} bytes on disk, header promises {expected_len}");
        return Err(if file_len < expected_len {
            Defect::Truncated(msg)
        } else {
            corrupt(msg)
        });
    }
    let mut meta = [0u64; 4];
    for (i, m) in meta.iter_mut().enumerate() {
        *m = u64_at(&h, 40 + 8 * i);
    }
    Ok(Header {
        len: hlen,
        payload_crc: u32_at(&h, 32),
        meta,
        parts: part_table(&h, nparts as usize, payload_len)?,
    })
}

/// The part table: each part's dtype and element count, adding up to the
/// payload's length.
fn part_table(h: &[u8], nparts: usize, payload_len: u64) -> Result<Vec<(u32, usize)>, Defect> {
    let corrupt = |s: &str| Defect::Corrupt(s.to_string());
    let mut total = 0u64;
    let mut parts = Vec::with_capacity(nparts);
    for i in 0..nparts {
        let at = FIXED + PART_ENTRY * i;
        let dtype = u32_at(h, at);
        let elems = u64_at(h, at + 8);
        let size = Part::elem_size(dtype)
            .ok_or_else(|| Defect::Corrupt(format!("unknown part type {dtype}")))?;
        let bytes = elems
            .checked_mul(size)
            .ok_or_else(|| corrupt("part size overflows"))?;
        total = total
            .checked_add(bytes)
            .ok_or_else(|| corrupt("payload size overflows"))?;
        let elems = usize::try_from(elems).map_err(|_| corrupt("part size overflows"))?;
        parts.push((dtype, elems));
    }
    if total != payload_len {
        return Err(Defect::Corrupt(format!(
            "parts add up to {total} bytes, header says {payload_len}"
        )));
    }
    Ok(parts)
}
