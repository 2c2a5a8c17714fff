//! `libamm_preload.so`: any program on amm's jemalloc.
//!
//! ```text
//! LD_PRELOAD=/path/to/libamm_preload.so program args...
//! ```
//!
//! The library *is* the process's allocator: it exports `malloc`, `free`,
//! `calloc`, `realloc`, `reallocarray`, `posix_memalign`, `aligned_alloc`,
//! `memalign`, `valloc`, `pvalloc` and `malloc_usable_size`, served by the
//! same jemalloc as amm-worker (`tikv-jemalloc-sys`, whose symbols carry the
//! `_rjem_` prefix, so this crate and amm-worker can share one build), and
//! jemalloc's `mallctl`, `mallctlnametomib` and `mallctlbymib` ([`ctl`]). Its
//! constructor starts the publisher (`amm_alloc::host`), which refreshes
//! the process's allocator record every `AMM_PRELOAD_INTERVAL_MS` (100) and
//! purges on request and past `MALLOC_TRIM_THRESHOLD_`.
//!
//! Configuration: amm's defaults ([`conf::DEFAULTS`]) followed by
//! `MALLOC_CONF`, jemalloc's own syntax (later keys win); `_RJEM_MALLOC_CONF`
//! is read by jemalloc after both.
//!
//! Never does: allocate before jemalloc is configured, or let a pointer from
//! one allocator reach the other (every entry point goes to jemalloc).

mod conf;
mod ctl;
mod shims;

use amm_alloc::Allocator;

/// Runs when the library is loaded (after the C library's own constructor,
/// before `main`).
extern "C" fn on_load() {
    conf::ensure();
    // Initialise jemalloc now. It registers its fork handlers with
    // pthread_atfork while initialising, which would deadlock if its first
    // allocation came from inside glibc's pthread_atfork (ours, below).
    // SAFETY: a plain allocation and its free.
    unsafe { tikv_jemalloc_sys::free(tikv_jemalloc_sys::malloc(1)) };
    if conf::user_conf_ignored() {
        eprintln!("amm-preload: MALLOC_CONF is longer than 1000 bytes and was ignored");
    }
    let ours = amm_alloc::host::object_of(on_load as *const () as usize);
    let serving = ours.is_some() && amm_alloc::host::object_defining(c"malloc") == ours;
    if !serving {
        eprintln!(
            "amm-preload: this process's malloc is not the preload's (the program brings its \
             own, or was linked statically): publishing its RSS only"
        );
    }
    if let Err(e) = amm_alloc::host::start(serving.then_some(Allocator::Jemalloc)) {
        eprintln!("amm-preload: {e}");
    }
}

/// Turns the publisher's own purges past `MALLOC_TRIM_THRESHOLD_` on (`1`)
/// or off (`0`), or only asks (any other value); returns whether they were
/// on. For a program that purges by itself (amm_dask): one owner.
#[unsafe(no_mangle)]
pub extern "C" fn amm_preload_threshold_purges(on: std::ffi::c_int) -> std::ffi::c_int {
    amm_alloc::host::threshold_purges_ctl(on)
}

#[used]
#[unsafe(link_section = ".init_array")]
static ON_LOAD: extern "C" fn() = on_load;
