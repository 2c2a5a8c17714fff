//! glibc malloc statistics (`mallinfo2`, `malloc_info`) and `malloc_trim`.
//!
//! `mallinfo2` says how many bytes are live and free but not which free bytes
//! still occupy RAM: after `malloc_trim(0)` the pages inside free chunks are
//! gone (`MADV_DONTNEED`) while `fordblks` is unchanged. So the resident size
//! of the arenas is measured directly: the main arena is the `[heap]` mapping
//! and every other arena lives in a heap that glibc maps at a 64 MiB
//! (`HEAP_MAX_SIZE`) boundary, readable up to its current size and
//! `PROT_NONE` after it; `mincore` counts their resident pages. Chunks glibc
//! served with `mmap` (`hblkhd`) are live and counted as resident.

use std::ffi::c_char;
use std::io;

use serde::Serialize;

use super::Detail;

/// glibc's `HEAP_MAX_SIZE` on 64-bit: non-main arenas live in heaps of this
/// size, aligned to it.
const HEAP_MAX_SIZE: u64 = 64 << 20;

/// glibc malloc's view of the heap.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GlibcStats {
    /// `arena`: bytes obtained with brk/heap mappings (all arenas).
    pub arena: u64,
    /// `ordblks`: number of free chunks.
    pub ordblks: u64,
    /// `hblks`: number of chunks served by `mmap`.
    pub hblks: u64,
    /// `hblkhd`: bytes in chunks served by `mmap`.
    pub hblkhd: u64,
    /// `uordblks`: bytes in live chunks of the arenas.
    pub uordblks: u64,
    /// `fordblks`: bytes in free chunks of the arenas (resident or not).
    pub fordblks: u64,
    /// `keepcost`: releasable bytes at the top of the main arena.
    pub keepcost: u64,
    /// Resident bytes of the arenas' heaps, counted with `mincore`.
    pub arena_resident: u64,
    /// How many arena heaps were found (main `[heap]` plus 64 MiB heaps).
    pub arena_heaps: u32,
    /// Per-arena detail from `malloc_info` (only with [`Detail::Full`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub arenas: Vec<GlibcArena>,
}

impl GlibcStats {
    /// Live bytes: `uordblks + hblkhd`.
    pub fn live(&self) -> u64 {
        self.uordblks + self.hblkhd
    }

    /// Allocator-resident bytes: resident arena pages plus mmapped chunks
    /// (never less than what is live).
    pub fn resident(&self) -> u64 {
        (self.arena_resident + self.hblkhd).max(self.live())
    }
}

/// One arena as `malloc_info` describes it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GlibcArena {
    /// Arena number (0 is the main arena).
    pub nr: u32,
    /// Bytes in fastbin chunks.
    pub fast_bytes: u64,
    /// Bytes in the other free chunks.
    pub rest_bytes: u64,
    /// Bytes the arena currently has from the system.
    pub system_bytes: u64,
}

/// `uordblks + hblkhd` right now.
pub fn live_now() -> u64 {
    // SAFETY: mallinfo2 has no preconditions.
    let mi = unsafe { libc::mallinfo2() };
    (mi.uordblks + mi.hblkhd) as u64
}

/// Reads `mallinfo2`, measures arena residency and, with [`Detail::Full`],
/// parses `malloc_info`.
pub fn stats(detail: Detail) -> io::Result<GlibcStats> {
    // SAFETY: mallinfo2 has no preconditions.
    let mi = unsafe { libc::mallinfo2() };
    let (arena_resident, arena_heaps) = arena_residency()?;
    let mut s = GlibcStats {
        arena: mi.arena as u64,
        ordblks: mi.ordblks as u64,
        hblks: mi.hblks as u64,
        hblkhd: mi.hblkhd as u64,
        uordblks: mi.uordblks as u64,
        fordblks: mi.fordblks as u64,
        keepcost: mi.keepcost as u64,
        arena_resident,
        arena_heaps,
        arenas: Vec::new(),
    };
    if detail == Detail::Full {
        s.arenas = parse_malloc_info(&malloc_info_xml()?);
    }
    Ok(s)
}

/// `malloc_trim(0)`: releases the top of every arena and, in modern glibc,
/// every whole free page inside the arenas.
pub fn trim() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One line of `/proc/self/maps`, as much as we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Permission string, e.g. `rw-p`.
    pub perms: String,
    /// Inode (0 for anonymous memory).
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`), empty when anonymous.
    pub path: String,
}

/// Parses `/proc/<pid>/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path = it.collect::<Vec<_>>().join(" ");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(inode)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        out.push(Mapping {
            start,
            end,
            perms: perms.to_string(),
            inode,
            path,
        });
    }
    out
}

/// Picks the mappings that are glibc arena heaps: `[heap]`, and anonymous
/// read-write mappings starting at a `HEAP_MAX_SIZE` boundary that are either
/// a whole `HEAP_MAX_SIZE` or followed by the `PROT_NONE` rest of one.
pub fn arena_mappings(maps: &[Mapping]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        if m.path == "[heap]" {
            out.push((m.start, m.end));
            continue;
        }
        let anon = m.inode == 0 && m.path.is_empty();
        if !anon || !m.perms.starts_with("rw") || m.start % HEAP_MAX_SIZE != 0 {
            continue;
        }
        let heap_end = m.start + HEAP_MAX_SIZE;
        let whole = m.end == heap_end;
        let tail = maps.get(i + 1).is_some_and(|n| {
            n.start == m.end
                && n.end == heap_end
                && n.perms.starts_with("---")
                && n.inode == 0
                && n.path.is_empty()
        });
        if whole || tail {
            out.push((m.start, m.end));
        }
    }
    out
}

fn arena_residency() -> io::Result<(u64, u32)> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    let heaps = arena_mappings(&parse_maps(&text));
    let page = crate::proc::page_size();
    let mut resident = 0u64;
    let mut vec: Vec<u8> = Vec::new();
    for &(start, end) in &heaps {
        let pages = ((end - start) / page) as usize;
        vec.clear();
        vec.resize(pages, 0);
        // SAFETY: [start, end) is a mapping of this process (it may have been
        // unmapped since /proc was read, which mincore reports as ENOMEM);
        // vec holds one byte per page.
        let rc = unsafe {
            libc::mincore(
                start as *mut libc::c_void,
                (end - start) as usize,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            // Unmapped or shrunk meanwhile: skip this heap this time.
            continue;
        }
        resident += vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * page;
    }
    Ok((resident, heaps.len() as u32))
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
    // SAFETY: buf was allocated by open_memstream with glibc malloc.
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
        let m = parse_maps(maps);
        assert_eq!(m.len(), 8);
        let heaps = arena_mappings(&m);
        assert_eq!(
            heaps,
            vec![
                (0x55d0c0000000, 0x55d0c0021000),
                (0x7f1c04000000, 0x7f1c04a00000),
                (0x7f1c08000000, 0x7f1c0c000000),
            ],
            "a 64 MiB-aligned mapping followed by PROT_NONE to the 64 MiB end, or a whole \
             64 MiB one, is an arena heap; a stack-like mapping with a short guard is not"
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
}
