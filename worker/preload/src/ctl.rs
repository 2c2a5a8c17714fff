//! jemalloc's control interface, exported under its usual names
//! (`mallctl`, `mallctlnametomib`, `mallctlbymib`) so that code in the
//! program that looks for a jemalloc — `dlsym(RTLD_DEFAULT, "mallctl")`, as
//! amm_dask's in-process statistics and jemalloc-aware tools do — finds the
//! one that serves its allocations, as it would under Debian's libjemalloc.

use std::ffi::{c_char, c_int, c_void};

use crate::conf::ensure;

/// `mallctl(3)` of the jemalloc serving this process.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mallctl(
    name: *const c_char,
    oldp: *mut c_void,
    oldlenp: *mut usize,
    newp: *mut c_void,
    newlen: usize,
) -> c_int {
    ensure();
    // SAFETY: forwards mallctl's contract (the caller's pointers and sizes).
    unsafe { tikv_jemalloc_sys::mallctl(name, oldp, oldlenp, newp, newlen) }
}

/// `mallctlnametomib(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mallctlnametomib(
    name: *const c_char,
    mibp: *mut usize,
    miblenp: *mut usize,
) -> c_int {
    ensure();
    // SAFETY: forwards the contract.
    unsafe { tikv_jemalloc_sys::mallctlnametomib(name, mibp, miblenp) }
}

/// `mallctlbymib(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mallctlbymib(
    mib: *const usize,
    miblen: usize,
    oldp: *mut c_void,
    oldlenp: *mut usize,
    newp: *mut c_void,
    newlen: usize,
) -> c_int {
    ensure();
    // SAFETY: forwards the contract.
    unsafe { tikv_jemalloc_sys::mallctlbymib(mib, miblen, oldp, oldlenp, newp, newlen) }
}
