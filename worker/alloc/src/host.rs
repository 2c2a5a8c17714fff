//! Hosting the [`Publisher`] inside a program that knows nothing of it (the
//! preload libraries).
//!
//! - [`start`] runs from the library's constructor: after the C library is
//!   initialised, before `main`, never inside `malloc`. It reads the
//!   configuration from the environment, registers a `pthread_atfork`
//!   child handler, and starts the publishing thread with every signal
//!   blocked (signals stay the program's business).
//! - **fork**: threads do not survive a fork, and the child inherits its
//!   parent's record (descriptor and shared mapping). The child handler
//!   lets go of both ([`InheritedSlot::abandon`], async-signal-safe) and
//!   starts a new thread, which waits one interval before creating the
//!   child's own record, so a child that `exec`s at once costs no more than
//!   a thread creation.
//! - **exec**: the record's memfd is `MFD_CLOEXEC`; the new program starts
//!   its own publisher if it runs on the preload too.
//! - **exit**: the thread holds no lock another thread could need to exit
//!   (no global mutex anywhere here; only atomics), so `exit` from any
//!   thread at any moment simply ends it.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use amm_record::InheritedSlot;

use crate::Allocator;
use crate::publisher::{self, Config};

/// The publication interval in milliseconds (`0`: no publisher at all).
pub const INTERVAL_ENV: &str = "AMM_PRELOAD_INTERVAL_MS";
/// Least time between two threshold purges, milliseconds.
pub const PURGE_INTERVAL_ENV: &str = "AMM_PRELOAD_PURGE_INTERVAL_MS";
/// jemalloc: `1` (default) to decay dirty pages every interval, `0` not to.
pub const DECAY_ENV: &str = "AMM_PRELOAD_DECAY";
/// The threshold purges follow (glibc's own variable, as Dask's nanny sets it).
pub const TRIM_THRESHOLD_ENV: &str = "MALLOC_TRIM_THRESHOLD_";

/// The publishing thread's stack: it parses a few /proc files at most.
const STACK_BYTES: usize = 256 << 10;

static CONFIG: OnceLock<Config> = OnceLock::new();
static SLOT: InheritedSlot = InheritedSlot::new();
static NEVER: AtomicBool = AtomicBool::new(false);
static ATFORK: AtomicBool = AtomicBool::new(false);

/// Reads the configuration for `allocator` from the environment; returns
/// it with a warning for every variable that could not be understood.
pub fn config_from_env(allocator: Option<Allocator>) -> (Config, Vec<String>) {
    let mut cfg = Config::new(allocator);
    let mut warnings = Vec::new();
    let mut num = |name: &str| -> Option<u64> {
        let raw = std::env::var(name).ok()?;
        match raw.trim().parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                warnings.push(format!("{name}={raw:?} is not a whole number; ignored"));
                None
            }
        }
    };
    if let Some(ms) = num(INTERVAL_ENV) {
        cfg.interval = Duration::from_millis(ms);
    }
    if let Some(ms) = num(PURGE_INTERVAL_ENV) {
        cfg.purge_interval = Duration::from_millis(ms);
    }
    cfg.trim_threshold = num(TRIM_THRESHOLD_ENV);
    if let Some(d) = num(DECAY_ENV) {
        cfg.decay = d != 0;
    }
    (cfg, warnings)
}

/// Starts the publisher for `allocator` (from a library constructor; once
/// per process image). Returns what it could not do, for the caller to say.
pub fn start(allocator: Option<Allocator>) -> Result<(), String> {
    let (cfg, warnings) = config_from_env(allocator);
    for w in &warnings {
        eprintln!("amm-preload: {w}");
    }
    if cfg.interval.is_zero() {
        return Ok(()); // publishing switched off
    }
    let _ = CONFIG.set(cfg);
    if !ATFORK.swap(true, Ordering::AcqRel) {
        // SAFETY: registering a handler with no preconditions; the handler
        // is an extern "C" fn that lives as long as the process (the
        // library is never unloaded: linked with -z nodelete).
        let rc = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        if rc != 0 {
            return Err(format!(
                "pthread_atfork failed ({}): fork children will not publish",
                io::Error::from_raw_os_error(rc)
            ));
        }
    }
    spawn(Duration::ZERO).map_err(|e| format!("cannot start the publishing thread: {e}"))
}

/// The preload libraries' `amm_preload_threshold_purges(int)`: `1` turns
/// the publisher's own threshold purges on, `0` off, anything else only
/// asks; returns whether they were on (`1`) or not (`0`). A program that
/// drives its purges itself (amm_dask's worker plugin) turns them off while
/// it does, so one owner purges ([`publisher::set_threshold_purges`]).
pub fn threshold_purges_ctl(on: i32) -> i32 {
    let was = match on {
        0 | 1 => publisher::set_threshold_purges(on == 1),
        _ => publisher::threshold_purges(),
    };
    i32::from(was)
}

/// The `pthread_atfork` child handler.
extern "C" fn after_fork_in_child() {
    SLOT.abandon();
    if let Some(cfg) = CONFIG.get() {
        // a child that execs at once never gets to create its record
        let _ = spawn(cfg.interval);
    }
}

/// Starts the thread (see [`publisher::spawn`]); it waits `delay`, creates
/// the record and publishes until the process ends.
fn spawn(delay: Duration) -> io::Result<()> {
    let Some(cfg) = CONFIG.get().cloned() else {
        return Ok(());
    };
    publisher::spawn(cfg, Some(&SLOT), delay, &NEVER, STACK_BYTES).map(drop)
}

/// The base address of the loaded object that defines the global `symbol`
/// (the one the dynamic linker binds calls to), if any.
pub fn object_defining(symbol: &std::ffi::CStr) -> Option<usize> {
    // SAFETY: symbol is NUL-terminated; RTLD_DEFAULT searches the global scope.
    let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, symbol.as_ptr()) };
    if addr.is_null() {
        return None;
    }
    object_of(addr as usize)
}

/// The base address of the loaded object containing address `addr`.
pub fn object_of(addr: usize) -> Option<usize> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::uninit();
    // SAFETY: dladdr looks the address up without dereferencing it, and
    // fills info on success.
    if unsafe { libc::dladdr(addr as *const libc::c_void, info.as_mut_ptr()) } == 0 {
        return None;
    }
    // SAFETY: dladdr returned non-zero, so info is filled.
    Some(unsafe { info.assume_init() }.dli_fbase as usize)
}

/// Whether the process's `malloc` is glibc's own: the object that defines
/// it also defines `mallinfo2`, which only glibc has.
pub fn glibc_serves_malloc() -> bool {
    match (object_defining(c"malloc"), object_defining(c"mallinfo2")) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_named_and_ignored() {
        // SAFETY: this test binary's other tests read none of these.
        unsafe {
            std::env::set_var(INTERVAL_ENV, "fast");
            std::env::set_var(TRIM_THRESHOLD_ENV, "65536");
            std::env::set_var(DECAY_ENV, "0");
        }
        let (cfg, warnings) = config_from_env(Some(Allocator::Jemalloc));
        assert_eq!(cfg.interval, crate::publisher::DEFAULT_INTERVAL);
        assert_eq!(cfg.trim_threshold, Some(65536));
        assert!(!cfg.decay);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("AMM_PRELOAD_INTERVAL_MS"),
            "{warnings:?}"
        );
    }

    #[test]
    fn this_test_runs_on_glibc_malloc() {
        assert!(glibc_serves_malloc());
    }
}
