//! jemalloc statistics (through `tikv-jemalloc-ctl`), purge and decay.
//!
//! Statistics are a snapshot refreshed by advancing `epoch`; every read
//! below follows one advance. The totals are read through MIBs translated
//! once; the per-arena and per-size-class loops patch indices into raw
//! MIBs. Calling any of this initialises jemalloc, so callers only do it
//! when jemalloc is the process's allocator (or on purpose).
//!
//! `arena.<i>.purge` and `arena.<i>.decay` take no value at all (jemalloc
//! refuses a non-null value pointer), which `tikv-jemalloc-ctl`'s writers
//! always pass; those two go through `tikv-jemalloc-sys` directly.

use std::ffi::{CStr, c_void};
use std::io;
use std::ptr;
use std::sync::OnceLock;

pub use amm_timeline::{ArenaPages, JemallocStats, SizeClass};

use tikv_jemalloc_ctl::{epoch, epoch_mib, raw, stats};

use crate::Detail;

/// `MALLCTL_ARENAS_ALL`: the pseudo arena index meaning "all arenas merged".
pub const MALLCTL_ARENAS_ALL: usize = 4096;

fn err(name: &str, e: tikv_jemalloc_ctl::Error) -> io::Error {
    io::Error::other(format!("mallctl {name} failed: {e}"))
}

/// The MIBs of the totals, translated once per process.
struct Totals {
    epoch: epoch_mib,
    allocated: stats::allocated_mib,
    active: stats::active_mib,
    resident: stats::resident_mib,
    mapped: stats::mapped_mib,
    retained: stats::retained_mib,
    metadata: stats::metadata_mib,
    pdirty_all: [usize; 4],
    pmuzzy_all: [usize; 4],
    page: u64,
}

fn mib<const N: usize>(name: &CStr) -> io::Result<[usize; N]> {
    let mut mib = [0usize; N];
    raw::name_to_mib(name.to_bytes_with_nul(), &mut mib)
        .map_err(|e| err(&name.to_string_lossy(), e))?;
    Ok(mib)
}

/// Reads `T` at a raw MIB.
///
/// Callers pass only MIBs of statistics whose C type is `T` (size_t as
/// usize, unsigned as u32, bool as bool).
fn read_mib<T: Copy>(mib: &[usize], name: &str) -> io::Result<T> {
    // SAFETY: every caller names a mallctl whose value has type T.
    unsafe { raw::read_mib::<T>(mib) }.map_err(|e| err(name, e))
}

fn totals() -> io::Result<&'static Totals> {
    static TOTALS: OnceLock<Totals> = OnceLock::new();
    if let Some(t) = TOTALS.get() {
        return Ok(t);
    }
    let e = |n: &'static str| move |x| err(n, x);
    let t = Totals {
        epoch: epoch::mib().map_err(e("epoch"))?,
        allocated: stats::allocated::mib().map_err(e("stats.allocated"))?,
        active: stats::active::mib().map_err(e("stats.active"))?,
        resident: stats::resident::mib().map_err(e("stats.resident"))?,
        mapped: stats::mapped::mib().map_err(e("stats.mapped"))?,
        retained: stats::retained::mib().map_err(e("stats.retained"))?,
        metadata: stats::metadata::mib().map_err(e("stats.metadata"))?,
        pdirty_all: mib(c"stats.arenas.4096.pdirty")?,
        pmuzzy_all: mib(c"stats.arenas.4096.pmuzzy")?,
        // SAFETY: arenas.page is a size_t.
        page: unsafe { raw::read::<usize>(b"arenas.page\0") }.map_err(e("arenas.page"))? as u64,
    };
    Ok(TOTALS.get_or_init(|| t))
}

/// Advances `epoch` so that the `stats.*` values are refreshed.
pub fn advance_epoch() -> io::Result<()> {
    totals()?
        .epoch
        .advance()
        .map(drop)
        .map_err(|e| err("epoch", e))
}

/// `stats.allocated` right now (advances the epoch).
pub fn allocated_now() -> io::Result<u64> {
    let t = totals()?;
    t.epoch.advance().map_err(|e| err("epoch", e))?;
    t.allocated
        .read()
        .map(|v| v as u64)
        .map_err(|e| err("stats.allocated", e))
}

/// Reads the statistics (advancing the epoch first).
pub fn stats(detail: Detail) -> io::Result<JemallocStats> {
    let t = totals()?;
    t.epoch.advance().map_err(|e| err("epoch", e))?;
    let r = |v: Result<usize, tikv_jemalloc_ctl::Error>, n: &str| {
        v.map(|v| v as u64).map_err(|e| err(n, e))
    };
    let mut s = JemallocStats {
        allocated: r(t.allocated.read(), "stats.allocated")?,
        active: r(t.active.read(), "stats.active")?,
        resident: r(t.resident.read(), "stats.resident")?,
        mapped: r(t.mapped.read(), "stats.mapped")?,
        retained: r(t.retained.read(), "stats.retained")?,
        metadata: r(t.metadata.read(), "stats.metadata")?,
        dirty_bytes: read_mib::<usize>(&t.pdirty_all, "stats.arenas.4096.pdirty")? as u64 * t.page,
        muzzy_bytes: read_mib::<usize>(&t.pmuzzy_all, "stats.arenas.4096.pmuzzy")? as u64 * t.page,
        ..JemallocStats::default()
    };
    if detail == Detail::Full {
        s.arenas = arenas()?;
        s.bins = bins()?;
        s.large = large()?;
    }
    Ok(s)
}

/// `arenas.narenas`: how many arenas exist.
pub fn narenas() -> io::Result<u32> {
    tikv_jemalloc_ctl::arenas::narenas::read().map_err(|e| err("arenas.narenas", e))
}

/// Dirty and muzzy pages of every initialised arena (after an epoch
/// advance: call after [`stats`] or [`advance_epoch`]).
pub fn arenas() -> io::Result<Vec<ArenaPages>> {
    let page = totals()?.page;
    let narenas = narenas()?;
    let mut initialized = mib::<3>(c"arena.0.initialized")?;
    let mut pdirty = mib::<4>(c"stats.arenas.0.pdirty")?;
    let mut pmuzzy = mib::<4>(c"stats.arenas.0.pmuzzy")?;
    let mut out = Vec::new();
    for i in 0..narenas as usize {
        initialized[1] = i;
        if !read_mib::<bool>(&initialized, "arena.<i>.initialized")? {
            continue;
        }
        pdirty[2] = i;
        pmuzzy[2] = i;
        out.push(ArenaPages {
            arena: i as u32,
            dirty_bytes: read_mib::<usize>(&pdirty, "stats.arenas.<i>.pdirty")? as u64 * page,
            muzzy_bytes: read_mib::<usize>(&pmuzzy, "stats.arenas.<i>.pmuzzy")? as u64 * page,
        });
    }
    Ok(out)
}

/// `arenas.nbins`: how many small size classes there are.
fn nbins() -> io::Result<u32> {
    // SAFETY: arenas.nbins is an unsigned.
    unsafe { raw::read::<u32>(b"arenas.nbins\0") }.map_err(|e| err("arenas.nbins", e))
}

/// `arenas.bin.<i>.slab_size` of every bin, read once (they never change).
fn slab_sizes() -> io::Result<&'static [u64]> {
    static SLABS: OnceLock<Vec<u64>> = OnceLock::new();
    if let Some(v) = SLABS.get() {
        return Ok(v);
    }
    let nbins = nbins()?;
    let mut slab = mib::<4>(c"arenas.bin.0.slab_size")?;
    let v = (0..nbins as usize)
        .map(|j| {
            slab[2] = j;
            read_mib::<usize>(&slab, "arenas.bin.<i>.slab_size").map(|b| b as u64)
        })
        .collect::<io::Result<Vec<u64>>>()?;
    Ok(SLABS.get_or_init(|| v))
}

fn bins() -> io::Result<Vec<SizeClass>> {
    let nbins = nbins()?;
    let slabs = slab_sizes()?;
    let mut size = mib::<4>(c"arenas.bin.0.size")?;
    let mut curregs = mib::<6>(c"stats.arenas.0.bins.0.curregs")?;
    let mut curslabs = mib::<6>(c"stats.arenas.0.bins.0.curslabs")?;
    curregs[2] = MALLCTL_ARENAS_ALL;
    curslabs[2] = MALLCTL_ARENAS_ALL;
    let mut out = Vec::new();
    for j in 0..nbins as usize {
        curregs[4] = j;
        let count = read_mib::<usize>(&curregs, "stats.arenas.<i>.bins.<j>.curregs")? as u64;
        if count == 0 {
            continue;
        }
        size[2] = j;
        curslabs[4] = j;
        out.push(SizeClass {
            size: read_mib::<usize>(&size, "arenas.bin.<j>.size")? as u64,
            count,
            slabs: read_mib::<usize>(&curslabs, "stats.arenas.<i>.bins.<j>.curslabs")? as u64,
            slab_bytes: slabs.get(j).copied().unwrap_or(0),
        });
    }
    Ok(out)
}

fn large() -> io::Result<Vec<SizeClass>> {
    // SAFETY: arenas.nlextents is an unsigned.
    let n = unsafe { raw::read::<u32>(b"arenas.nlextents\0") }
        .map_err(|e| err("arenas.nlextents", e))?;
    let mut size = mib::<4>(c"arenas.lextent.0.size")?;
    let mut cur = mib::<6>(c"stats.arenas.0.lextents.0.curlextents")?;
    cur[2] = MALLCTL_ARENAS_ALL;
    let mut out = Vec::new();
    for j in 0..n as usize {
        cur[4] = j;
        let count = read_mib::<usize>(&cur, "stats.arenas.<i>.lextents.<j>.curlextents")? as u64;
        if count == 0 {
            continue;
        }
        size[2] = j;
        out.push(SizeClass {
            size: read_mib::<usize>(&size, "arenas.lextent.<j>.size")? as u64,
            count,
            slabs: 0,
            slab_bytes: 0,
        });
    }
    Ok(out)
}

/// Runs a mallctl that takes no value (`arena.<i>.purge`, `.decay`).
fn void_ctl(name: &CStr) -> io::Result<()> {
    // SAFETY: a void mallctl: no old value, no new value.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            ptr::null_mut::<c_void>(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::other(format!(
            "mallctl {} failed: {}",
            name.to_string_lossy(),
            io::Error::from_raw_os_error(rc)
        )));
    }
    Ok(())
}

/// `arena.<MALLCTL_ARENAS_ALL>.purge`: returns every arena's unused dirty
/// (and muzzy) pages to the kernel.
pub fn purge_all() -> io::Result<()> {
    void_ctl(c"arena.4096.purge")
}

/// `arena.<MALLCTL_ARENAS_ALL>.decay`: purges the unused pages whose decay
/// time has passed (what jemalloc's background threads do, on demand).
pub fn decay_all() -> io::Result<()> {
    void_ctl(c"arena.4096.decay")
}

/// Whether jemalloc's background threads run (`background_thread`).
pub fn background_thread() -> io::Result<bool> {
    tikv_jemalloc_ctl::background_thread::read().map_err(|e| err("background_thread", e))
}

/// A signed jemalloc option, e.g. `opt.dirty_decay_ms`.
pub fn opt_isize(name: &str) -> io::Result<isize> {
    let key = format!("{name}\0");
    // SAFETY: callers name options of C type ssize_t.
    unsafe { raw::read::<isize>(key.as_bytes()) }.map_err(|e| err(name, e))
}

/// An unsigned jemalloc option, e.g. `opt.narenas`.
pub fn opt_u32(name: &str) -> io::Result<u32> {
    let key = format!("{name}\0");
    // SAFETY: callers name options of C type unsigned.
    unsafe { raw::read::<u32>(key.as_bytes()) }.map_err(|e| err(name, e))
}
