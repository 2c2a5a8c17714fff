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

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Part, SpillError, Value};

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

fn sync_range(f: &File, off: u64, len: u64, wait: bool) {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: fd is open; sync_file_range only schedules/waits on write-back.
    // Its result is advisory here (tmpfs, for one, does nothing).
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off as i64, len as i64, flags);
    }
}

fn drop_range(f: &File, off: u64, len: u64) {
    // SAFETY: fd is open; DONTNEED only drops clean cached pages.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            off as i64,
            len as i64,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// Writes `value` under `key` to a new file at `path`; returns the file's
/// size. On error the caller removes the file.
pub fn write_value(path: &Path, key: &str, value: &Value, opts: WriteOptions) -> io::Result<u64> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
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
                sync_range(&f, off, len, false);
                if let Some((poff, plen)) = pending.take() {
                    sync_range(&f, poff, plen, true);
                    drop_range(&f, poff, plen);
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
        sync_range(&f, 0, 0, true);
        drop_range(&f, 0, 0);
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

/// Reads the value stored for `key` at `path`, checking everything the
/// header promises. `drop_cache` drops the file's pages from the page cache
/// as they are consumed.
pub fn read_value(path: &Path, key: &str, drop_cache: bool) -> Result<Value, SpillError> {
    let p = path.display().to_string();
    let corrupt = |reason: String| SpillError::Corrupt {
        key: key.to_string(),
        path: p.clone(),
        reason,
    };
    let truncated = |reason: String| SpillError::Truncated {
        key: key.to_string(),
        path: p.clone(),
        reason,
    };
    let io_err = |source: io::Error| SpillError::Io {
        key: key.to_string(),
        path: p.clone(),
        source,
    };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SpillError::Missing {
                key: key.to_string(),
                path: p.clone(),
            });
        }
        Err(e) => return Err(io_err(e)),
    };
    // SAFETY: fd is open; the advice only tunes read-ahead.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
    let file_len = f.metadata().map_err(io_err)?.len();
    let mut fixed = [0u8; FIXED];
    if file_len < FIXED as u64 {
        return Err(truncated(format!(
            "{file_len} bytes, shorter than the {FIXED}-byte header"
        )));
    }
    f.read_exact(&mut fixed).map_err(io_err)?;
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
    let payload_len = u64_at(&fixed, 24);
    let payload_crc = u32_at(&fixed, 32);
    let header_crc = u32_at(&fixed, 36);
    let hlen = FIXED + PART_ENTRY * nparts as usize + key_len as usize;
    if file_len < hlen as u64 {
        return Err(truncated(format!(
            "{file_len} bytes, shorter than its {hlen}-byte header"
        )));
    }
    let mut h = vec![0u8; hlen];
    h[..FIXED].copy_from_slice(&fixed);
    f.read_exact(&mut h[FIXED..]).map_err(io_err)?;
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
    let expected_len = hlen as u64 + payload_len;
    if file_len < expected_len {
        return Err(truncated(format!(
            "{file_len} bytes on disk, header promises {expected_len}"
        )));
    }
    if file_len > expected_len {
        return Err(corrupt(format!(
            "{file_len} bytes on disk, header promises {expected_len}"
        )));
    }
    let mut meta = [0u64; 4];
    for (i, m) in meta.iter_mut().enumerate() {
        *m = u64_at(&h, 40 + 8 * i);
    }
    let mut parts = Vec::with_capacity(nparts as usize);
    let mut total = 0u64;
    let mut specs = Vec::with_capacity(nparts as usize);
    for i in 0..nparts as usize {
        let at = FIXED + PART_ENTRY * i;
        let dtype = u32_at(&h, at);
        let elems = u64_at(&h, at + 8);
        let size =
            Part::elem_size(dtype).ok_or_else(|| corrupt(format!("unknown part type {dtype}")))?;
        let bytes = elems
            .checked_mul(size)
            .ok_or_else(|| corrupt("part size overflows".into()))?;
        total = total
            .checked_add(bytes)
            .ok_or_else(|| corrupt("payload size overflows".into()))?;
        specs.push((dtype, elems as usize));
    }
    if total != payload_len {
        return Err(corrupt(format!(
            "parts add up to {total} bytes, header says {payload_len}"
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut off = hlen as u64;
    for (dtype, elems) in specs {
        let mut part = Part::zeroed(dtype, elems)
            .ok_or_else(|| corrupt(format!("unknown part type {dtype}")))?;
        for chunk in part.as_bytes_mut().chunks_mut(CHUNK) {
            f.read_exact(chunk).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    truncated("file ended inside the payload".into())
                } else {
                    io_err(e)
                }
            })?;
            crc.update(chunk);
            if drop_cache {
                drop_range(&f, off, chunk.len() as u64);
            }
            off += chunk.len() as u64;
        }
        parts.push(part);
    }
    if drop_cache {
        // Folios across chunk boundaries were skipped above.
        drop_range(&f, 0, 0);
    }
    if crc.finalize() != payload_crc {
        return Err(corrupt("payload checksum mismatch".into()));
    }
    Ok(Value { meta, parts })
}
