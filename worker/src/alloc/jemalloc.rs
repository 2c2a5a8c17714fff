//! jemalloc statistics and purge through `mallctl`.
//!
//! Statistics are a snapshot refreshed by writing `epoch`; every read below
//! follows one epoch advance. Calling any of this initialises jemalloc, so
//! the rest of the crate only calls it when jemalloc is the active allocator
//! (and in [`super::verify_serving`]).

use std::ffi::{CStr, CString, c_void};
use std::io;
use std::ptr;

use serde::Serialize;

use super::Detail;

/// `MALLCTL_ARENAS_ALL`: the pseudo arena index meaning "all arenas merged".
pub const MALLCTL_ARENAS_ALL: usize = 4096;

/// jemalloc's view of the heap after an `epoch` advance.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JemallocStats {
    /// `stats.allocated`: bytes in live allocations.
    pub allocated: u64,
    /// `stats.active`: bytes in active pages (allocated + slab slack).
    pub active: u64,
    /// `stats.resident`: bytes in physically resident pages the allocator maps
    /// (active + dirty + metadata).
    pub resident: u64,
    /// `stats.mapped`: bytes in active extents mapped by the allocator.
    pub mapped: u64,
    /// `stats.retained`: virtual memory kept mapped but returned to the OS.
    pub retained: u64,
    /// `stats.metadata`: bytes of allocator metadata.
    pub metadata: u64,
    /// Dirty pages of all arenas, in bytes (freed, still resident, purgeable).
    pub dirty_bytes: u64,
    /// Muzzy pages of all arenas, in bytes (`MADV_FREE`d, may still be resident).
    pub muzzy_bytes: u64,
    /// Per-arena dirty/muzzy pages (only with [`Detail::Full`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub arenas: Vec<ArenaPages>,
    /// Small size classes holding live regions (only with [`Detail::Full`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bins: Vec<SizeClass>,
    /// Large size classes holding live extents (only with [`Detail::Full`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub large: Vec<SizeClass>,
}

/// Unused pages of one arena.
#[derive(Debug, Clone, Serialize)]
pub struct ArenaPages {
    /// Arena index.
    pub arena: u32,
    /// Dirty bytes (`stats.arenas.<i>.pdirty` pages).
    pub dirty_bytes: u64,
    /// Muzzy bytes (`stats.arenas.<i>.pmuzzy` pages).
    pub muzzy_bytes: u64,
}

/// Live allocations of one size class, merged over all arenas.
#[derive(Debug, Clone, Serialize)]
pub struct SizeClass {
    /// The class's allocation size in bytes.
    pub size: u64,
    /// Live regions (bins: `curregs`) or extents (large: `curlextents`).
    pub count: u64,
    /// Slabs currently holding regions (bins only; 0 for large classes).
    pub slabs: u64,
    /// Bytes of one slab of this class (`arenas.bin.<i>.slab_size`; bins
    /// only, 0 for large classes): with `slabs` and `count`, how thinly the
    /// live regions are spread.
    pub slab_bytes: u64,
}

fn err(name: &str, rc: i32) -> io::Error {
    io::Error::other(format!(
        "mallctl {name} failed: {}",
        io::Error::from_raw_os_error(rc)
    ))
}

/// Reads a plain value by name.
fn read<T: Copy + Default>(name: &CStr) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>();
    // SAFETY: value is a valid T-sized buffer and len says so; jemalloc
    // writes at most len bytes. No new value is passed.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            (&mut value as *mut T).cast::<c_void>(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(err(&name.to_string_lossy(), rc));
    }
    Ok(value)
}

fn read_named<T: Copy + Default>(name: &str) -> io::Result<T> {
    let c = CString::new(name).map_err(|_| io::Error::other("NUL in mallctl name"))?;
    read(&c)
}

/// A name translated to a MIB once, so that the per-size-class loop only
/// patches indices.
struct Mib {
    mib: Vec<usize>,
    name: &'static str,
}

impl Mib {
    fn new(name: &'static CStr, depth: usize) -> io::Result<Mib> {
        let mut mib = vec![0usize; depth];
        let mut len = depth;
        // SAFETY: mib has room for `len` entries.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctlnametomib(name.as_ptr(), mib.as_mut_ptr(), &mut len)
        };
        if rc != 0 {
            return Err(err(&name.to_string_lossy(), rc));
        }
        mib.truncate(len);
        Ok(Mib {
            mib,
            name: name.to_str().unwrap_or("mib"),
        })
    }

    fn read<T: Copy + Default>(&mut self, patches: &[(usize, usize)]) -> io::Result<T> {
        for &(pos, value) in patches {
            if let Some(slot) = self.mib.get_mut(pos) {
                *slot = value;
            }
        }
        let mut value = T::default();
        let mut len = size_of::<T>();
        // SAFETY: mib is a MIB jemalloc produced; value/len describe a T.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctlbymib(
                self.mib.as_ptr(),
                self.mib.len(),
                (&mut value as *mut T).cast::<c_void>(),
                &mut len,
                ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            return Err(err(self.name, rc));
        }
        Ok(value)
    }
}

/// Advances `epoch` so that the `stats.*` values are refreshed.
pub fn advance_epoch() -> io::Result<()> {
    let mut epoch: u64 = 1;
    let mut len = size_of::<u64>();
    let mut new: u64 = 1;
    // SAFETY: old and new point to u64s of the stated length.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"epoch".as_ptr(),
            (&mut epoch as *mut u64).cast::<c_void>(),
            &mut len,
            (&mut new as *mut u64).cast::<c_void>(),
            size_of::<u64>(),
        )
    };
    if rc != 0 {
        return Err(err("epoch", rc));
    }
    Ok(())
}

/// `stats.allocated` right now (advances the epoch).
pub fn allocated_now() -> io::Result<u64> {
    advance_epoch()?;
    Ok(read::<usize>(c"stats.allocated")? as u64)
}

/// Reads the statistics (advancing the epoch first).
pub fn stats(detail: Detail) -> io::Result<JemallocStats> {
    advance_epoch()?;
    let page = read::<usize>(c"arenas.page")? as u64;
    let mut s = JemallocStats {
        allocated: read::<usize>(c"stats.allocated")? as u64,
        active: read::<usize>(c"stats.active")? as u64,
        resident: read::<usize>(c"stats.resident")? as u64,
        mapped: read::<usize>(c"stats.mapped")? as u64,
        retained: read::<usize>(c"stats.retained")? as u64,
        metadata: read::<usize>(c"stats.metadata")? as u64,
        dirty_bytes: read_named::<usize>(&format!("stats.arenas.{MALLCTL_ARENAS_ALL}.pdirty"))?
            as u64
            * page,
        muzzy_bytes: read_named::<usize>(&format!("stats.arenas.{MALLCTL_ARENAS_ALL}.pmuzzy"))?
            as u64
            * page,
        ..JemallocStats::default()
    };
    if detail == Detail::Full {
        s.arenas = arenas(page)?;
        s.bins = bins()?;
        s.large = large()?;
    }
    Ok(s)
}

fn arenas(page: u64) -> io::Result<Vec<ArenaPages>> {
    let narenas = read::<u32>(c"arenas.narenas")?;
    let mut initialized = Mib::new(c"arena.0.initialized", 3)?;
    let mut pdirty = Mib::new(c"stats.arenas.0.pdirty", 4)?;
    let mut pmuzzy = Mib::new(c"stats.arenas.0.pmuzzy", 4)?;
    let mut out = Vec::new();
    for i in 0..narenas as usize {
        if !initialized.read::<bool>(&[(1, i)])? {
            continue;
        }
        let dirty = pdirty.read::<usize>(&[(2, i)])? as u64 * page;
        let muzzy = pmuzzy.read::<usize>(&[(2, i)])? as u64 * page;
        out.push(ArenaPages {
            arena: i as u32,
            dirty_bytes: dirty,
            muzzy_bytes: muzzy,
        });
    }
    Ok(out)
}

/// `arenas.bin.<i>.slab_size` of every bin, read once (they never change).
fn slab_sizes() -> io::Result<&'static [u64]> {
    static SLABS: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    if let Some(v) = SLABS.get() {
        return Ok(v);
    }
    let nbins = read::<u32>(c"arenas.nbins")?;
    let mut slab = Mib::new(c"arenas.bin.0.slab_size", 4)?;
    let v = (0..nbins as usize)
        .map(|j| slab.read::<usize>(&[(2, j)]).map(|b| b as u64))
        .collect::<io::Result<Vec<u64>>>()?;
    Ok(SLABS.get_or_init(|| v))
}

fn bins() -> io::Result<Vec<SizeClass>> {
    let nbins = read::<u32>(c"arenas.nbins")?;
    let slabs = slab_sizes()?;
    let mut size = Mib::new(c"arenas.bin.0.size", 4)?;
    let mut curregs = Mib::new(c"stats.arenas.0.bins.0.curregs", 6)?;
    let mut curslabs = Mib::new(c"stats.arenas.0.bins.0.curslabs", 6)?;
    let mut out = Vec::new();
    for j in 0..nbins as usize {
        let count = curregs.read::<usize>(&[(2, MALLCTL_ARENAS_ALL), (4, j)])? as u64;
        if count == 0 {
            continue;
        }
        out.push(SizeClass {
            size: size.read::<usize>(&[(2, j)])? as u64,
            count,
            slabs: curslabs.read::<usize>(&[(2, MALLCTL_ARENAS_ALL), (4, j)])? as u64,
            slab_bytes: slabs.get(j).copied().unwrap_or(0),
        });
    }
    Ok(out)
}

fn large() -> io::Result<Vec<SizeClass>> {
    let n = read::<u32>(c"arenas.nlextents")?;
    let mut size = Mib::new(c"arenas.lextent.0.size", 4)?;
    let mut cur = Mib::new(c"stats.arenas.0.lextents.0.curlextents", 6)?;
    let mut out = Vec::new();
    for j in 0..n as usize {
        let count = cur.read::<usize>(&[(2, MALLCTL_ARENAS_ALL), (4, j)])? as u64;
        if count == 0 {
            continue;
        }
        out.push(SizeClass {
            size: size.read::<usize>(&[(2, j)])? as u64,
            count,
            slabs: 0,
            slab_bytes: 0,
        });
    }
    Ok(out)
}

/// `arena.<MALLCTL_ARENAS_ALL>.purge`: returns every arena's unused dirty
/// (and muzzy) pages to the kernel. This mallctl takes no value: old and new
/// pointers are null.
pub fn purge_all() -> io::Result<()> {
    let name = CString::new(format!("arena.{MALLCTL_ARENAS_ALL}.purge"))
        .map_err(|_| io::Error::other("NUL in mallctl name"))?;
    // SAFETY: a void mallctl: no old value, no new value.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(err("arena.4096.purge", rc));
    }
    Ok(())
}

/// A jemalloc option read for the log (`opt.dirty_decay_ms`, ...).
pub fn opt_isize(name: &str) -> io::Result<isize> {
    read_named::<isize>(name)
}

/// A boolean jemalloc option (`opt.cache_oblivious`, ...).
pub fn opt_bool(name: &str) -> io::Result<bool> {
    read_named::<bool>(name)
}
