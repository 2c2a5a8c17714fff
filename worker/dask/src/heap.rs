//! This process's allocator, read in-process: jemalloc (the amm preload or
//! any jemalloc exporting `mallctl`) through its `mallctl`, otherwise glibc
//! through `mallinfo2`. One narrow unsafe function per call into C.
//!
//! Split (DESIGN.md): `live` = bytes handed out and not returned
//! (jemalloc `stats.allocated`; glibc `uordblks + hblkhd`), `resident` =
//! what the allocator holds in RAM (jemalloc `stats.resident`; glibc
//! `arena + hblkhd`, the bytes it got from the system), `hoarded` =
//! resident − live (glibc: `fordblks` less what trims gave back since,
//! an upper bound: free chunks never touched are not resident).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// glibc: bytes of free chunks a trim gave back to the kernel (their pages
/// are no longer resident, though `fordblks` still counts them), until the
/// heap reuses them.
static TRIMMED: AtomicU64 = AtomicU64::new(0);

use pyo3::prelude::*;
use pyo3::types::PyDict;

type Mallctl =
    unsafe extern "C" fn(*const c_char, *mut c_void, *mut usize, *mut c_void, usize) -> c_int;

/// `mallctl` of the jemalloc serving this process, if one does.
fn mallctl() -> Option<Mallctl> {
    static M: OnceLock<Option<usize>> = OnceLock::new();
    let addr = *M.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mallctl".as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    });
    // SAFETY: the symbol is jemalloc's mallctl, of this signature.
    addr.map(|a| unsafe { std::mem::transmute::<usize, Mallctl>(a) })
}

/// Reads one numeric `mallctl` value (`u64` or `size_t`).
fn read_u64(f: Mallctl, name: &CStr) -> Option<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>();
    // SAFETY: v is a writable u64 and len says so; no new value is given.
    let rc = unsafe {
        f(
            name.as_ptr(),
            (&mut v as *mut u64).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0).then_some(v)
}

/// Writes a `u64` (refreshes `epoch`) or nothing (`arena.N.purge`).
fn write_ctl(f: Mallctl, name: &CStr, value: Option<u64>) -> bool {
    let mut v = value.unwrap_or(0);
    let (p, len) = match value {
        Some(_) => ((&mut v as *mut u64).cast(), std::mem::size_of::<u64>()),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: p points at v (len bytes) or is null with len 0.
    unsafe {
        f(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            p,
            len,
        ) == 0
    }
}

/// The allocator's statistics now.
#[derive(Debug, Clone, Default)]
pub struct Heap {
    /// `jemalloc` or `glibc`.
    pub allocator: &'static str,
    /// Live bytes.
    pub live: u64,
    /// Bytes the allocator holds in RAM.
    pub resident: u64,
    /// Named detail (`active`, `dirty`, `muzzy`, `fordblks`, ...).
    pub detail: Vec<(&'static str, u64)>,
}

impl Heap {
    /// resident − live.
    pub fn hoarded(&self) -> u64 {
        self.resident.saturating_sub(self.live)
    }
}

fn jemalloc(f: Mallctl) -> Option<Heap> {
    write_ctl(f, c"epoch", Some(1));
    let page = read_u64(f, c"arenas.page").unwrap_or(4096);
    let allocated = read_u64(f, c"stats.allocated")?;
    let resident = read_u64(f, c"stats.resident")?;
    let mut detail = vec![("allocated", allocated), ("resident", resident)];
    for (name, key) in [
        ("active", c"stats.active"),
        ("metadata", c"stats.metadata"),
        ("mapped", c"stats.mapped"),
        ("retained", c"stats.retained"),
    ] {
        detail.extend(read_u64(f, key).map(|v| (name, v)));
    }
    for (name, key) in [
        ("dirty", c"stats.arenas.4096.pdirty"),
        ("muzzy", c"stats.arenas.4096.pmuzzy"),
    ] {
        detail.extend(read_u64(f, key).map(|v| (name, v * page)));
    }
    Some(Heap {
        allocator: "jemalloc",
        live: allocated,
        resident,
        detail,
    })
}

fn glibc() -> Heap {
    // SAFETY: mallinfo2 has no preconditions and returns a struct by value.
    let m = unsafe { libc::mallinfo2() };
    let live = (m.uordblks + m.hblkhd) as u64;
    // trimmed free chunks are not resident; what the heap reused since is
    let trimmed = TRIMMED
        .fetch_min(m.fordblks as u64, Ordering::Relaxed)
        .min(m.fordblks as u64);
    let resident = ((m.arena + m.hblkhd) as u64).saturating_sub(trimmed);
    Heap {
        allocator: "glibc",
        live,
        resident,
        detail: vec![
            ("arena", m.arena as u64),
            ("uordblks", m.uordblks as u64),
            ("fordblks", m.fordblks as u64),
            ("hblkhd", m.hblkhd as u64),
            ("keepcost", m.keepcost as u64),
        ],
    }
}

/// Reads the allocator serving this process.
pub fn read() -> Heap {
    mallctl().and_then(jemalloc).unwrap_or_else(glibc)
}

/// Gives hoarded memory back: jemalloc purges every arena, glibc trims.
pub fn release() -> &'static str {
    match mallctl() {
        Some(f) => {
            write_ctl(f, c"arena.4096.purge", None);
            "jemalloc"
        }
        None => {
            let before = crate::gate::rss_now();
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
            let returned = before.saturating_sub(crate::gate::rss_now());
            TRIMMED.fetch_add(returned, Ordering::Relaxed);
            "glibc"
        }
    }
}

type PurgeCtl = unsafe extern "C" fn(c_int) -> c_int;

/// The amm preload's `amm_preload_threshold_purges`, if one is loaded.
fn preload_purge_ctl() -> Option<PurgeCtl> {
    static F: OnceLock<Option<usize>> = OnceLock::new();
    let addr = *F.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
        let p =
            unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"amm_preload_threshold_purges".as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    });
    // SAFETY: the symbol is the preload's function of this signature.
    addr.map(|a| unsafe { std::mem::transmute::<usize, PurgeCtl>(a) })
}

/// The amm preload's own purges past `MALLOC_TRIM_THRESHOLD_`: turns them
/// on or off (`None`: only asks) and returns whether they were on, or
/// `None` when this process does not run on the preload. The worker plugin
/// turns them off while it purges under the same threshold: one owner.
#[pyfunction]
#[pyo3(signature = (on=None))]
pub fn preload_threshold_purges(on: Option<bool>) -> Option<bool> {
    let f = preload_purge_ctl()?;
    let arg = on.map_or(-1, c_int::from);
    // SAFETY: the preload's function takes any int and has no preconditions.
    Some(unsafe { f(arg) } == 1)
}

/// The allocator's statistics as a dict: `allocator`, `live`, `resident`,
/// `hoarded` and the detail.
#[pyfunction]
pub fn heap_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let h = py.detach(read);
    let d = PyDict::new(py);
    d.set_item("allocator", h.allocator)?;
    d.set_item("live", h.live)?;
    d.set_item("resident", h.resident)?;
    d.set_item("hoarded", h.hoarded())?;
    for (k, v) in &h.detail {
        d.set_item(*k, *v)?;
    }
    Ok(d)
}

/// Purges (jemalloc) or trims (glibc) without the GIL; returns
/// `(allocator, rss_before, rss_after, hoarded_before, hoarded_after,
/// seconds)`.
#[pyfunction]
pub fn release_hoard(py: Python<'_>) -> (&'static str, u64, u64, u64, u64, f64) {
    py.detach(|| {
        let start = std::time::Instant::now();
        let (rss0, h0) = (crate::gate::rss_now(), read().hoarded());
        let which = release();
        let rss1 = crate::gate::rss_now();
        let h1 = read().hoarded();
        (which, rss0, rss1, h0, h1, start.elapsed().as_secs_f64())
    })
}
