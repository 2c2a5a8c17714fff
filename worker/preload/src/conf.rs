//! jemalloc's options: amm's defaults, then the user's `MALLOC_CONF`.
//!
//! jemalloc reads its options string, the `_rjem_malloc_conf` symbol, when
//! it initialises: at the process's first allocation, which may come from
//! the dynamic linker or the C library before any constructor runs. So the
//! string is composed on that first call ([`ensure`], called by every entry
//! point before it reaches jemalloc), into a static buffer, without
//! allocating: amm's [`DEFAULTS`], a comma, and `MALLOC_CONF` (jemalloc
//! applies the keys in order, so the user's win). The prefixed build reads
//! `_RJEM_MALLOC_CONF` from the environment itself, after both.

use std::ffi::{CStr, c_char};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// amm's jemalloc options (see benches/RESULTS.md for the measurements
/// behind them):
/// - `cache_oblivious:false`: no random page in front of every large
///   allocation (it counts as active and, once freed, as dirty; jemalloc's
///   `resident` then misses the kernel's RSS), as in amm-worker;
/// - `dirty_decay_ms:1000`, `muzzy_decay_ms:0`: freed pages go back to the
///   kernel within about a second, straight (no `MADV_FREE` stage, whose
///   pages still count in RSS until the kernel needs them); the publisher
///   runs jemalloc's decay every interval, so this happens while the
///   program sleeps too, without jemalloc's background threads.
pub const DEFAULTS: &str = "cache_oblivious:false,dirty_decay_ms:1000,muzzy_decay_ms:0";

const CAP: usize = 1024;

const UNSET: u8 = 0;
const COMPOSING: u8 = 1;
const READY: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNSET);
static TOO_LONG: AtomicBool = AtomicBool::new(false);

/// The composed string (written once, before jemalloc reads it).
struct Buf(std::cell::UnsafeCell<[u8; CAP]>);
// SAFETY: written only by the one thread that moved STATE from UNSET to
// COMPOSING, read (by jemalloc) only after STATE is READY.
unsafe impl Sync for Buf {}
static BUF: Buf = Buf(std::cell::UnsafeCell::new([0; CAP]));

/// jemalloc's `malloc_conf`: points at the defaults until [`ensure`]
/// composes the full string.
#[used]
#[unsafe(export_name = "_rjem_malloc_conf")]
static mut MALLOC_CONF: *const c_char = c"cache_oblivious:false".as_ptr();

/// Composes the options string if nobody has yet. Cheap after the first
/// call (one relaxed load).
#[inline(always)]
pub fn ensure() {
    if STATE.load(Ordering::Acquire) != READY {
        compose_once();
    }
}

/// Whether `MALLOC_CONF` was too long to add and was ignored.
pub fn user_conf_ignored() -> bool {
    TOO_LONG.load(Ordering::Relaxed)
}

#[cold]
fn compose_once() {
    match STATE.compare_exchange(UNSET, COMPOSING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            compose();
            STATE.store(READY, Ordering::Release);
        }
        Err(_) => {
            while STATE.load(Ordering::Acquire) != READY {
                std::hint::spin_loop();
            }
        }
    }
}

fn compose() {
    // SAFETY: only the thread that won the UNSET -> COMPOSING exchange gets
    // here, once; nothing reads BUF before STATE is READY.
    let buf = unsafe { &mut *BUF.0.get() };
    let mut n = put(buf, 0, DEFAULTS.as_bytes());
    // SAFETY: getenv does not allocate; the name is NUL-terminated.
    let env = unsafe { libc::getenv(c"MALLOC_CONF".as_ptr()) };
    if !env.is_null() {
        // SAFETY: getenv returned a NUL-terminated string.
        let user = unsafe { CStr::from_ptr(env) }.to_bytes();
        if !user.is_empty() {
            if n + 1 + user.len() < CAP {
                n = put(buf, n, b",");
                n = put(buf, n, user);
            } else {
                TOO_LONG.store(true, Ordering::Relaxed);
            }
        }
    }
    buf[n] = 0;
    // SAFETY: jemalloc has not read MALLOC_CONF yet (it is initialised only
    // through the entry points, which all call `ensure` first), and BUF is
    // 'static and NUL-terminated.
    unsafe { MALLOC_CONF = buf.as_ptr().cast() };
}

fn put(buf: &mut [u8; CAP], at: usize, bytes: &[u8]) -> usize {
    let end = at + bytes.len();
    buf[at..end].copy_from_slice(bytes);
    end
}
