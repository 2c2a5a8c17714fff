//! jemalloc's control interface through `libamm_preload.so`: a program that
//! looks for `mallctl` by name (amm_dask's in-process statistics do,
//! `dlsym(RTLD_DEFAULT, "mallctl")`) finds the jemalloc that serves its own
//! allocations; under the glibc observer there is none to find.

use amm_integration_tests::preload::Preload;

/// Python through ctypes, as a program that knows nothing of amm: reads
/// jemalloc's version, then `stats.allocated` by name and by MIB around a
/// 64 MiB allocation, and prints `version before after by_mib`; prints
/// `none` when the process exports no `mallctl`.
const PROGRAM: &str = r#"
import ctypes
c = ctypes.CDLL(None)
try:
    mallctl = c.mallctl
except AttributeError:
    print("none")
    raise SystemExit(0)
size = ctypes.c_size_t
def epoch():
    one = ctypes.c_uint64(1)
    assert mallctl(b"epoch", None, None, ctypes.byref(one), size(8)) == 0
def allocated():
    v, n = ctypes.c_uint64(), size(8)
    assert mallctl(b"stats.allocated", ctypes.byref(v), ctypes.byref(n), None, size(0)) == 0
    return v.value
version, n = ctypes.c_char_p(), size(8)
assert mallctl(b"version", ctypes.byref(version), ctypes.byref(n), None, size(0)) == 0
epoch()
before = allocated()
block = bytearray(64 << 20)
epoch()
after = allocated()
mib, miblen = (size * 4)(), size(4)
assert c.mallctlnametomib(b"stats.allocated", mib, ctypes.byref(miblen)) == 0
v, n = ctypes.c_uint64(), size(8)
assert c.mallctlbymib(mib, miblen, ctypes.byref(v), ctypes.byref(n), None, size(0)) == 0
print(version.value.decode(), before, after, v.value)
"#;

fn run(preload: Preload) -> String {
    let out = preload
        .command(std::path::Path::new("python3"))
        .args(["-c", PROGRAM])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "python3 on {preload:?} failed ({}): {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn mallctl_is_the_jemalloc_that_serves_the_program() {
    let line = run(Preload::Jemalloc);
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 4, "unexpected output: {line}");
    let n = |i: usize| -> u64 { f[i].parse().unwrap_or_else(|e| panic!("{line}: {e}")) };
    let (before, after, by_mib) = (n(1), n(2), n(3));
    assert!(f[0].starts_with('5'), "not jemalloc 5: {line}");
    // the program's own 64 MiB went through the jemalloc mallctl reports on
    assert!(after >= before + (64 << 20), "{line}");
    assert!(by_mib >= after, "{line}");
}

#[test]
fn the_glibc_observer_exports_no_mallctl() {
    assert_eq!(run(Preload::Glibc), "none");
}
