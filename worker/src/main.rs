//! The `amm-worker` binary: the dispatching global allocator (jemalloc or
//! glibc malloc, chosen from `AMM_ALLOCATOR` at the first allocation), the
//! jemalloc configuration, and a call into the library's command line.

#[global_allocator]
static GLOBAL: amm_worker::alloc::Dispatch = amm_worker::alloc::Dispatch;

/// A `&'static u8` seen as the `const char *` jemalloc expects.
union ConfPtr {
    bytes: &'static u8,
    chars: &'static std::ffi::c_char,
}

/// jemalloc's compile-time options string (`malloc_conf`, prefixed
/// `_rjem_` like every symbol of tikv-jemalloc-sys), read at its first
/// allocation; `_RJEM_MALLOC_CONF` in the environment still overrides it.
///
/// `cache_oblivious:false`: no extra page of random padding in front of
/// every large (>= 16 KiB) allocation. That page is never touched, yet
/// jemalloc counts it as active and, once freed, as dirty: up to 25% of a
/// 16 KiB object, and a gap between jemalloc's `resident` and the kernel's
/// RSS that the accounting identity would have to absorb.
#[used]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: Option<&'static std::ffi::c_char> = Some(
    // SAFETY: both fields are references to one byte; reading the other
    // field reinterprets a valid, 'static, NUL-terminated string's start.
    unsafe {
        ConfPtr {
            bytes: &b"cache_oblivious:false\0"[0],
        }
        .chars
    },
);

fn main() -> std::process::ExitCode {
    amm_worker::cli::main()
}
