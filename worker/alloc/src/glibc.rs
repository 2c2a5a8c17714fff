//! glibc malloc statistics (`mallinfo2`, `malloc_info`), the residency of
//! its arenas, and `malloc_trim`.
//!
//! `mallinfo2` says how many bytes are live and free but not which free bytes
//! still occupy RAM: after `malloc_trim(0)` the pages inside free chunks are
//! gone (`MADV_DONTNEED`) while `fordblks` is unchanged. So the resident size
//! of the arenas is measured directly with `mincore`: the main arena is the
//! `[heap]` (up to the current break), every other arena lives in heaps that
//! glibc reserves as `HEAP_MAX_SIZE` (64 MiB) blocks aligned to 64 MiB,
//! read-write up to their current size and `PROT_NONE` after it. The kernel
//! merges adjacent mappings with the same protection, so two full heaps can
//! show as one 128 MiB mapping, and a heap's `PROT_NONE` tail can absorb the
//! guard page of a thread stack after it: [`arena_mappings`] accepts both.
//! Chunks glibc served with `mmap` (`hblkhd`) are live and counted as
//! resident.
//!
//! `mallinfo2` walks every free chunk of every arena under that arena's
//! lock: on a fragmented heap it is expensive and stalls the program's own
//! `malloc` calls meanwhile. Callers that poll keep a [`Sampler`], which
//! reads it (and the other expensive parts) only as often as a CPU budget
//! allows, and takes the live bytes from [`counted`] when this process's
//! global allocator counts them.

use std::ffi::c_char;
use std::io;
use std::time::Instant;

use procfs::FromBufRead;
use procfs::process::{MMPermissions, MMapPath, MemoryMap};

use crate::Detail;

pub use amm_timeline::{GlibcArena, GlibcStats};

pub mod counted;
mod sampler;

pub use sampler::{DEFAULT_BUDGET, HEAP_RESCAN, Sampler, Uncounted, budgeted};

/// glibc's `HEAP_MAX_SIZE` on 64-bit: non-main arenas live in heaps of this
/// size, aligned to it.
pub const HEAP_MAX_SIZE: u64 = 64 << 20;

/// The largest mmap threshold glibc takes on 64-bit (half a heap): the
/// `MALLOC_MMAP_THRESHOLD_` amm gives a glibc program whose hoard it trims.
/// Setting `MALLOC_TRIM_THRESHOLD_` turns glibc's dynamic mmap threshold
/// off (mallopt(3)) and pins it at 128 KiB, so every larger block would be
/// mapped, faulted page by page and unmapped at its free; with amm trimming
/// the hoard, freed blocks up to this size are kept for reuse instead, as
/// glibc would without the trim threshold (benches/RESULTS.md, "Sparse on
/// glibc": 640 k page faults per run → ~200 k).
pub const MMAP_THRESHOLD_MAX: u64 = HEAP_MAX_SIZE / 2;

/// `mallinfo2`'s numbers, and what reading them cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mallinfo {
    /// `arena`.
    pub arena: u64,
    /// `ordblks`.
    pub ordblks: u64,
    /// `hblks`.
    pub hblks: u64,
    /// `hblkhd`.
    pub hblkhd: u64,
    /// `uordblks`.
    pub uordblks: u64,
    /// `fordblks`.
    pub fordblks: u64,
    /// `fsmblks`.
    pub fsmblks: u64,
    /// `keepcost`.
    pub keepcost: u64,
    /// CPU time of the call, nanoseconds.
    pub cpu_ns: u64,
}

/// Calls `mallinfo2` and measures its CPU time.
pub fn mallinfo() -> Mallinfo {
    let cpu = amm_record::sys::thread_cpu_ns();
    // SAFETY: mallinfo2 has no preconditions.
    let mi = unsafe { libc::mallinfo2() };
    Mallinfo {
        arena: mi.arena as u64,
        ordblks: mi.ordblks as u64,
        hblks: mi.hblks as u64,
        hblkhd: mi.hblkhd as u64,
        uordblks: mi.uordblks as u64,
        fordblks: mi.fordblks as u64,
        fsmblks: mi.fsmblks as u64,
        keepcost: mi.keepcost as u64,
        cpu_ns: amm_record::sys::thread_cpu_ns().saturating_sub(cpu),
    }
}

/// `uordblks + hblkhd` right now.
pub fn live_now() -> u64 {
    let mi = mallinfo();
    mi.uordblks + mi.hblkhd
}

/// Reads everything once: `mallinfo2` (or the counts), the arenas'
/// residency and, with [`Detail::Full`], `malloc_info`. A caller that reads
/// again and again keeps a [`Sampler`] instead.
pub fn stats(detail: Detail) -> io::Result<GlibcStats> {
    Sampler::every_time().stats(detail)
}

/// `malloc_trim(0)`: releases the top of every arena and, in modern glibc,
/// every whole free page inside the arenas.
pub fn trim() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One arena heap region: the main `[heap]`, or one or more adjacent
/// 64 MiB heap reservations of the other arenas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapRegion {
    /// Start address.
    pub start: u64,
    /// End of the reservation (for `[heap]`: of the mapping when scanned;
    /// residency reads up to the current break instead).
    pub end: u64,
    /// Whether this is the main arena's `[heap]`.
    pub main: bool,
}

/// The residency of one [`HeapRegion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionResidency {
    /// Start address.
    pub start: u64,
    /// Bytes measured.
    pub size: u64,
    /// Resident bytes.
    pub resident: u64,
}

/// The arena heaps found in `/proc/self/maps`, kept so that residency can
/// be measured again without reading the maps (which costs far more than
/// `mincore` in a process with many mappings). Rescan when the arenas may
/// have changed ([`ArenaHeaps::is_stale`]).
#[derive(Debug, Default)]
pub struct ArenaHeaps {
    regions: Vec<HeapRegion>,
    scanned: Option<Instant>,
    vanished: bool,
    buf: Vec<u8>,
}

impl ArenaHeaps {
    /// Reads `/proc/self/maps` and keeps the arena heaps.
    pub fn scan() -> io::Result<ArenaHeaps> {
        // never through a `File`: see `amm_record::sys::read_proc_self`
        let text = amm_record::sys::read_proc_self("maps")?;
        let maps = procfs::process::MemoryMaps::from_buf_read(text.as_slice())
            .map_err(|e| io::Error::other(format!("reading /proc/self/maps: {e}")))?;
        Ok(ArenaHeaps {
            regions: arena_mappings(&maps.0),
            scanned: Some(Instant::now()),
            vanished: false,
            buf: Vec::new(),
        })
    }

    /// How many heaps: the main one plus one per 64 MiB reservation.
    pub fn heap_count(&self) -> u32 {
        self.regions
            .iter()
            .map(|r| {
                if r.main {
                    1
                } else {
                    ((r.end - r.start) / HEAP_MAX_SIZE) as u32
                }
            })
            .sum()
    }

    /// Whether to scan again: a region vanished since (its `mincore`
    /// failed), or the scan is older than `max_age`.
    pub fn is_stale(&self, max_age: std::time::Duration) -> bool {
        self.vanished || self.scanned.is_none_or(|t| t.elapsed() >= max_age)
    }

    /// Measures each region's resident bytes with `mincore`. A region that
    /// is gone is skipped and marks the scan stale.
    pub fn residency(&mut self) -> Vec<RegionResidency> {
        let page = procfs::page_size();
        let mut out = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let end = if r.main {
                current_break().unwrap_or(r.end)
            } else {
                r.end
            };
            if end <= r.start {
                continue;
            }
            match resident_bytes(r.start, end - r.start, page, &mut self.buf) {
                Some(resident) => out.push(RegionResidency {
                    start: r.start,
                    size: end - r.start,
                    resident,
                }),
                None => self.vanished = true,
            }
        }
        out
    }
}

/// The current program break (`sbrk(0)`), the end of the main arena.
fn current_break() -> Option<u64> {
    // SAFETY: sbrk(0) only returns the current break; it changes nothing.
    let p = unsafe { libc::sbrk(0) };
    (p as isize != -1).then_some(p as u64)
}

/// Resident bytes of `[start, start + len)`, or `None` if part of it is not
/// mapped (any more).
fn resident_bytes(start: u64, len: u64, page: u64, buf: &mut Vec<u8>) -> Option<u64> {
    let pages = len.div_ceil(page) as usize;
    buf.clear();
    buf.resize(pages, 0);
    // SAFETY: buf holds one byte per page of the range; mincore only writes
    // there and fails with ENOMEM if the range is (partly) unmapped.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len as usize, buf.as_mut_ptr()) };
    (rc == 0).then(|| buf.iter().filter(|&&b| b & 1 == 1).count() as u64 * page)
}

fn is_anonymous(m: &MemoryMap) -> bool {
    m.inode == 0 && matches!(m.pathname, MMapPath::Anonymous)
}

fn is_read_write(m: &MemoryMap) -> bool {
    m.perms.contains(MMPermissions::READ | MMPermissions::WRITE)
        && !m.perms.contains(MMPermissions::SHARED)
}

fn is_prot_none(m: &MemoryMap) -> bool {
    !m.perms
        .intersects(MMPermissions::READ | MMPermissions::WRITE | MMPermissions::EXECUTE)
        && !m.perms.contains(MMPermissions::SHARED)
}

/// Picks the arena heaps among `maps` (in address order): `[heap]`, and
/// anonymous read-write mappings that start on a `HEAP_MAX_SIZE` boundary
/// and either are whole heaps (a multiple of 64 MiB: adjacent full heaps
/// merged) or are followed by an adjacent `PROT_NONE` anonymous mapping
/// that reaches at least the next 64 MiB boundary (the unused rest of the
/// last heap, perhaps merged with a stack guard page after it).
pub fn arena_mappings(maps: &[MemoryMap]) -> Vec<HeapRegion> {
    let mut out = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let (start, end) = m.address;
        if matches!(m.pathname, MMapPath::Heap) {
            out.push(HeapRegion {
                start,
                end,
                main: true,
            });
            continue;
        }
        if !is_anonymous(m) || !is_read_write(m) || start % HEAP_MAX_SIZE != 0 {
            continue;
        }
        let len = end - start;
        if len % HEAP_MAX_SIZE == 0 {
            out.push(HeapRegion {
                start,
                end,
                main: false,
            });
            continue;
        }
        let reserved_end = end.next_multiple_of(HEAP_MAX_SIZE);
        let tail = maps.get(i + 1).is_some_and(|n| {
            n.address.0 == end && n.address.1 >= reserved_end && is_prot_none(n) && is_anonymous(n)
        });
        if tail {
            out.push(HeapRegion {
                start,
                end: reserved_end,
                main: false,
            });
        }
    }
    out
}

/// Runs `malloc_info(0, ...)` into memory and returns the XML.
fn malloc_info_xml() -> io::Result<String> {
    let mut buf: *mut c_char = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: open_memstream stores a malloc'd buffer pointer in buf, updated
    // on fflush/fclose; we free it with libc::free after fclose.
    let f = unsafe { libc::open_memstream(&mut buf, &mut size) };
    if f.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: f is a valid FILE*.
    let rc = unsafe { libc::malloc_info(0, f) };
    // SAFETY: f is valid and closed once.
    unsafe { libc::fclose(f) };
    if buf.is_null() {
        return Err(io::Error::other("malloc_info produced no output"));
    }
    // SAFETY: after fclose, buf points to `size` bytes (plus a NUL).
    let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size) };
    let text = String::from_utf8_lossy(bytes).into_owned();
    // SAFETY: buf was allocated by open_memstream with the process's malloc.
    unsafe { libc::free(buf.cast()) };
    if rc != 0 {
        return Err(io::Error::other("malloc_info failed"));
    }
    Ok(text)
}

fn attr(tag: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=\"");
    let start = tag.find(&key)? + key.len();
    let end = tag[start..].find('"')? + start;
    tag[start..end].parse().ok()
}

/// Parses the per-heap part of `malloc_info` XML.
pub fn parse_malloc_info(xml: &str) -> Vec<GlibcArena> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(pos) = rest.find("<heap nr=") {
        let body_start = pos;
        let Some(end_rel) = rest[body_start..].find("</heap>") else {
            break;
        };
        let body = &rest[body_start..body_start + end_rel];
        let mut arena = GlibcArena {
            nr: attr(body, "nr").unwrap_or(0) as u32,
            ..GlibcArena::default()
        };
        for tag in body.split('<') {
            if tag.starts_with("total type=\"fast\"") {
                arena.fast_bytes = attr(tag, "size").unwrap_or(0);
            } else if tag.starts_with("total type=\"rest\"") {
                arena.rest_bytes = attr(tag, "size").unwrap_or(0);
            } else if tag.starts_with("system type=\"current\"") {
                arena.system_bytes = attr(tag, "size").unwrap_or(0);
            }
        }
        out.push(arena);
        rest = &rest[body_start + end_rel + "</heap>".len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use procfs::FromBufRead;
    use procfs::process::MemoryMaps;

    fn regions(text: &str) -> Vec<(u64, u64)> {
        let maps = MemoryMaps::from_buf_read(text.as_bytes()).expect("parse maps");
        arena_mappings(&maps.0)
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect()
    }

    #[test]
    fn finds_main_and_secondary_arena_heaps() {
        let maps = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
7f1c04000000-7f1c04a00000 rw-p 00000000 00:00 0 
7f1c04a00000-7f1c08000000 ---p 00000000 00:00 0 
7f1c08000000-7f1c0c000000 rw-p 00000000 00:00 0 
7f1c0d000000-7f1c0d200000 rw-p 00000000 00:00 0 
7f1c0d200000-7f1c0d201000 ---p 00000000 00:00 0 
7f1c10000000-7f1c10200000 rw-p 00000000 00:00 0 
7f1c10200000-7f1c10300000 r--p 00000000 08:01 42   /usr/lib/libc.so.6
";
        assert_eq!(
            regions(maps),
            vec![
                (0x55d0c0000000, 0x55d0c0021000),
                (0x7f1c04000000, 0x7f1c08000000),
                (0x7f1c08000000, 0x7f1c0c000000),
            ],
            "a 64 MiB-aligned mapping followed by PROT_NONE to the 64 MiB end, or a whole \
             64 MiB one, is an arena heap; a stack-like mapping with a short guard is not"
        );
    }

    #[test]
    fn finds_heaps_the_kernel_merged() {
        let maps = "\
7f1c00000000-7f1c08000000 rw-p 00000000 00:00 0 
7f1c08000000-7f1c0d000000 rw-p 00000000 00:00 0 
7f1c0d000000-7f1c10001000 ---p 00000000 00:00 0 
7f1c10001000-7f1c10801000 rw-p 00000000 00:00 0 
7f1c14000000-7f1c1c001000 rw-p 00000000 00:00 0 
";
        assert_eq!(
            regions(maps),
            vec![
                // two full heaps merged into one 128 MiB mapping
                (0x7f1c00000000, 0x7f1c08000000),
                // a full heap + 16 MiB of the next, its PROT_NONE tail merged
                // with a stack's guard page beyond the 64 MiB boundary
                (0x7f1c08000000, 0x7f1c10000000),
            ],
            "a 128 MiB + 4 KiB mapping (a large mmapped chunk) is no heap"
        );
    }

    #[test]
    fn parses_malloc_info_heaps() {
        let xml = r#"<malloc version="1">
<heap nr="0">
<sizes>
  <size from="33" to="48" total="48" count="1"/>
</sizes>
<total type="fast" count="1" size="48"/>
<total type="rest" count="3" size="70000"/>
<system type="current" size="135168"/>
<system type="max" size="200000"/>
</heap>
<heap nr="1">
<sizes>
</sizes>
<total type="fast" count="0" size="0"/>
<total type="rest" count="1" size="1024"/>
<system type="current" size="4096"/>
</heap>
<total type="fast" count="1" size="48"/>
</malloc>"#;
        let a = parse_malloc_info(xml);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].nr, 0);
        assert_eq!(a[0].fast_bytes, 48);
        assert_eq!(a[0].rest_bytes, 70000);
        assert_eq!(a[0].system_bytes, 135168);
        assert_eq!(a[1].nr, 1);
        assert_eq!(a[1].rest_bytes, 1024);
    }

    #[test]
    fn reads_this_process_heap() {
        // The library's test binary runs on glibc malloc.
        let s = stats(Detail::Full).expect("glibc stats");
        assert!(s.arena_heaps >= 1, "no [heap] found");
        assert!(s.arena_resident > 0);
        assert!(!s.arenas.is_empty(), "malloc_info gave no heap");
    }

    #[test]
    fn a_thread_arena_is_found_and_measured() {
        // a second thread allocating gets its own arena, in a 64 MiB heap
        let h = std::thread::spawn(|| {
            let v: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 16 << 10]).collect();
            let mut heaps = ArenaHeaps::scan().expect("scan");
            let res = heaps.residency();
            std::hint::black_box(&v);
            (heaps.heap_count(), res)
        });
        let (count, res) = h.join().expect("thread");
        assert!(
            count >= 2,
            "only {count} heap(s): the thread's arena was missed"
        );
        assert!(
            res.iter()
                .filter(|r| r.size >= HEAP_MAX_SIZE)
                .any(|r| r.resident >= 1 << 20)
        );
    }
}
