//! `libamm_preload_glibc.so`: observe a program's glibc malloc.
//!
//! ```text
//! LD_PRELOAD=/path/to/libamm_preload_glibc.so program args...
//! ```
//!
//! Replaces nothing: the program keeps glibc's malloc. The constructor
//! starts the publisher (`amm_alloc::host`), which refreshes the process's
//! allocator record with `mallinfo2` (as often as its cost allows) and the
//! residency of glibc's arenas every `AMM_PRELOAD_INTERVAL_MS` (100), and
//! trims (`malloc_trim(0)`) on request and past `MALLOC_TRIM_THRESHOLD_`.

use amm_alloc::Allocator;

/// Runs when the library is loaded (after the C library's own constructor,
/// before `main`).
extern "C" fn on_load() {
    let serving = amm_alloc::host::glibc_serves_malloc();
    if !serving {
        eprintln!(
            "amm-preload-glibc: this process's malloc is not glibc's (another allocator is \
             preloaded or linked in): publishing its RSS only"
        );
    }
    if let Err(e) = amm_alloc::host::start(serving.then_some(Allocator::System)) {
        eprintln!("amm-preload-glibc: {e}");
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
