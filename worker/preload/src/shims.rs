//! The C allocation functions, exported so that they are the process's,
//! each forwarding to jemalloc (after [`crate::conf::ensure`]).
//!
//! glibc documents which functions a replacement malloc must provide
//! ("Replacing malloc"): `malloc`, `free`, `calloc`, `realloc`, and, for
//! programs that use them, `aligned_alloc`, `malloc_usable_size`,
//! `memalign`, `posix_memalign`, `pvalloc`, `valloc`. `reallocarray` is
//! here too so that glibc's own (which calls its internal realloc) is never
//! reached. `mallinfo2`, `malloc_trim`, `malloc_stats` stay glibc's and
//! describe glibc's unused heap.

use std::ffi::{c_int, c_void};

use crate::conf::ensure;

unsafe extern "C" {
    #[link_name = "_rjem_memalign"]
    fn je_memalign(alignment: usize, size: usize) -> *mut c_void;
    #[link_name = "_rjem_valloc"]
    fn je_valloc(size: usize) -> *mut c_void;
    #[link_name = "_rjem_pvalloc"]
    fn je_pvalloc(size: usize) -> *mut c_void;
}

/// `malloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    ensure();
    // SAFETY: forwards malloc's contract.
    unsafe { tikv_jemalloc_sys::malloc(size) }
}

/// `free(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    // SAFETY: every pointer this process's allocator returned is jemalloc's.
    unsafe { tikv_jemalloc_sys::free(ptr) }
}

/// `calloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    ensure();
    // SAFETY: forwards calloc's contract (jemalloc checks the overflow).
    unsafe { tikv_jemalloc_sys::calloc(n, size) }
}

/// `realloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    ensure();
    // SAFETY: ptr is null or jemalloc's.
    unsafe { tikv_jemalloc_sys::realloc(ptr, size) }
}

/// `reallocarray(3)`: `realloc(ptr, n * size)` with the overflow checked.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(ptr: *mut c_void, n: usize, size: usize) -> *mut c_void {
    let Some(bytes) = n.checked_mul(size) else {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
        return std::ptr::null_mut();
    };
    // SAFETY: as realloc.
    unsafe { realloc(ptr, bytes) }
}

/// `posix_memalign(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    ensure();
    // SAFETY: forwards the contract; jemalloc validates the alignment.
    unsafe { tikv_jemalloc_sys::posix_memalign(out, align, size) }
}

/// `aligned_alloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    ensure();
    // SAFETY: forwards the contract.
    unsafe { tikv_jemalloc_sys::aligned_alloc(align, size) }
}

/// `memalign(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    ensure();
    // SAFETY: forwards the contract.
    unsafe { je_memalign(align, size) }
}

/// `valloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    ensure();
    // SAFETY: forwards the contract.
    unsafe { je_valloc(size) }
}

/// `pvalloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    ensure();
    // SAFETY: forwards the contract.
    unsafe { je_pvalloc(size) }
}

/// `malloc_usable_size(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    if ptr.is_null() {
        return 0;
    }
    // SAFETY: ptr is a live jemalloc allocation (the caller's contract).
    unsafe { tikv_jemalloc_sys::malloc_usable_size(ptr) }
}
