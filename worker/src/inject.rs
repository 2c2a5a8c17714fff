//! What `amm-worker -- CMD` puts into the program's environment to put it
//! on amm's allocator: `LD_PRELOAD` of the preload library
//! for the chosen allocator ([`preload_file`]: `libamm_preload.so`, jemalloc
//! as the process's malloc, or `libamm_preload_glibc.so`, which only observes
//! glibc), `MALLOC_TRIM_THRESHOLD_`, on glibc `MALLOC_MMAP_THRESHOLD_`
//! ([`amm_alloc::glibc::MMAP_THRESHOLD_MAX`]: the trim threshold pins glibc's
//! at 128 KiB, and amm's observer trims the hoard itself), and for a Python
//! program the allocator choice of [`python_malloc`].
//!
//! The library is looked for in `--preload PATH` / `$AMM_PRELOAD_LIB`, next
//! to the amm-worker binary (the cargo target directory in a checkout), in
//! `target/{debug,release}` of the checkout the binary was built from, then
//! `/usr/lib/amm/`. As root, a path another user could change is refused
//! ([`crate::trusted_path`]).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::alloc::Allocator;

/// The library for `allocator`: jemalloc becomes the program's malloc
/// (`libamm_preload.so`), or glibc stays and is only observed
/// (`libamm_preload_glibc.so`, `--allocator system`).
pub fn preload_file(allocator: Allocator) -> &'static str {
    match allocator {
        Allocator::Jemalloc => "libamm_preload.so",
        Allocator::System => "libamm_preload_glibc.so",
    }
}
/// Overrides where the library is looked for.
pub const PRELOAD_PATH_ENV: &str = "AMM_PRELOAD_LIB";
/// What `PYTHONMALLOC` is set to for a Python program, unless the user set
/// it: nothing. Measured (benches/RESULTS.md, "Preload libraries"): pymalloc
/// kept less after release than `PYTHONMALLOC=malloc` on glibc (numpy churn
/// 210 vs 337 MiB, dicts 2 vs 294 MiB) and on the preload (after release 68
/// vs 119 and 2 vs 80 MiB), and was faster; its arenas count as non-heap.
pub fn python_malloc() -> Option<&'static str> {
    None
}

/// The environment changes for the program, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Injection {
    /// Variables to set.
    pub set: Vec<(OsString, OsString)>,
    /// The library loaded, if any.
    pub library: Option<PathBuf>,
}

/// Where the library is looked for, in order (`explicit` first).
pub fn candidates(explicit: Option<&Path>, allocator: Allocator) -> Vec<PathBuf> {
    let file = preload_file(allocator);
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
        return out;
    }
    if let Some(p) = std::env::var_os(PRELOAD_PATH_ENV) {
        out.push(PathBuf::from(p));
        return out;
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        out.push(dir.join(file));
        // a test or bench binary in target/debug/deps
        if dir.ends_with("deps")
            && let Some(up) = dir.parent()
        {
            out.push(up.join(file));
        }
        if let Some(target) = dir.ancestors().find(|d| d.ends_with("target")) {
            for profile in ["debug", "release"] {
                out.push(target.join(profile).join(file));
            }
        }
    }
    out.push(Path::new("/usr/lib/amm").join(file));
    out
}

/// Finds the library and checks it is safe to load for `euid`.
pub fn find_library(
    explicit: Option<&Path>,
    allocator: Allocator,
    euid: u32,
) -> anyhow::Result<PathBuf> {
    let looked = candidates(explicit, allocator);
    let Some(found) = looked.iter().find(|p| p.exists()) else {
        let list: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
        anyhow::bail!(
            "{} not found (looked in: {}). Build it with `cargo xtask build`, \
             give its path with --preload PATH (or ${PRELOAD_PATH_ENV}), or run the program \
             on plain glibc (no allocator statistics) with --allocator system",
            preload_file(allocator),
            list.join(", ")
        );
    };
    let resolved = crate::trusted_path::check(found, euid)
        .map_err(|e| anyhow::anyhow!("will not preload {}: {e}", found.display()))?;
    let text = resolved.to_string_lossy();
    if text.contains([':', ' ']) {
        anyhow::bail!(
            "will not preload {}: LD_PRELOAD splits paths at ':' and spaces; move the library \
             to a path without them",
            resolved.display()
        );
    }
    Ok(resolved)
}

/// True when `argv[0]` is a Python interpreter, or a script whose `#!` line
/// names one (`dask`, `pytest` and other console scripts).
pub fn is_python(argv0: &OsStr) -> bool {
    let named = |p: &Path| {
        p.file_name()
            .and_then(OsStr::to_str)
            .is_some_and(|n| n.starts_with("python"))
    };
    let path = Path::new(argv0);
    if named(path) {
        return true;
    }
    let Some(file) = which(argv0) else {
        return false;
    };
    let mut head = [0u8; 256];
    let n = std::fs::File::open(&file)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    let first = head[..n].split(|b| *b == b'\n').next().unwrap_or(&[]);
    let Some(line) = first.strip_prefix(b"#!") else {
        return false;
    };
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match words.next() {
        Some(interp) if interp.ends_with("/env") => {
            words.next().is_some_and(|w| named(Path::new(w)))
        }
        Some(interp) => named(Path::new(interp)),
        None => false,
    }
}

/// `argv0` as the kernel would find it: itself if it has a `/`, else the
/// first match in `$PATH`.
pub fn which(argv0: &OsStr) -> Option<PathBuf> {
    let p = Path::new(argv0);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

/// The environment for a program on `allocator` loading `library` (the
/// allocator's, from [`find_library`]; none: plain glibc without statistics,
/// nothing trims it, so glibc's mmap threshold is left alone). `current` is
/// the nanny's own environment: a variable the user set there is left as it
/// is.
pub fn injection(
    allocator: Allocator,
    library: Option<&Path>,
    trim_threshold: Option<u64>,
    python: bool,
    current: &dyn Fn(&str) -> Option<OsString>,
) -> Injection {
    let mut inj = Injection::default();
    let mut set = |k: &str, v: OsString| inj.set.push((k.into(), v));
    if let Some(lib) = library {
        let mut v = lib.as_os_str().to_os_string();
        if let Some(old) = current("LD_PRELOAD").filter(|o| !o.is_empty()) {
            v.push(":");
            v.push(old);
        }
        set("LD_PRELOAD", v);
        inj.library = Some(lib.to_path_buf());
    }
    let users_trim = current("MALLOC_TRIM_THRESHOLD_");
    if let Some(t) = trim_threshold
        && users_trim.is_none()
    {
        set("MALLOC_TRIM_THRESHOLD_", t.to_string().into());
    }
    // the observer trims past the trim threshold: only then may glibc keep
    // large freed blocks
    let trimmed = library.is_some() && (trim_threshold.is_some() || users_trim.is_some());
    if allocator == Allocator::System && trimmed && current("MALLOC_MMAP_THRESHOLD_").is_none() {
        let max = amm_alloc::glibc::MMAP_THRESHOLD_MAX;
        set("MALLOC_MMAP_THRESHOLD_", max.to_string().into());
    }
    if let Some(choice) = python_malloc().filter(|_| python)
        && current("PYTHONMALLOC").is_none()
    {
        set("PYTHONMALLOC", choice.into());
    }
    inj
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        move |k| v.iter().find(|(a, _)| a == k).map(|(_, b)| b.into())
    }

    #[test]
    fn jemalloc_python_gets_the_library_first_and_keeps_the_users_choices() {
        let lib = Path::new("/usr/lib/amm/libamm_preload.so");
        let env = env_of(&[("LD_PRELOAD", "/x/libfoo.so"), ("PYTHONMALLOC", "pymalloc")]);
        let inj = injection(Allocator::Jemalloc, Some(lib), Some(65536), true, &env);
        let get = |k: &str| inj.set.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone());
        assert_eq!(
            get("LD_PRELOAD"),
            Some("/usr/lib/amm/libamm_preload.so:/x/libfoo.so".into())
        );
        assert_eq!(get("MALLOC_TRIM_THRESHOLD_"), Some("65536".into()));
        assert_eq!(get("PYTHONMALLOC"), None, "the user's PYTHONMALLOC stays");
        assert_eq!(get("MALLOC_MMAP_THRESHOLD_"), None, "not glibc");
        // pymalloc stays (measured: see python_malloc)
        let inj = injection(Allocator::System, None, None, true, &env_of(&[]));
        assert!(inj.set.is_empty(), "{:?}", inj.set);
    }

    #[test]
    fn a_trimmed_glibc_program_gets_its_large_block_reuse_back_unless_it_chose() {
        let lib = Path::new("/usr/lib/amm/libamm_preload_glibc.so");
        let get =
            |inj: &Injection, k: &str| inj.set.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone());
        let inj = injection(
            Allocator::System,
            Some(lib),
            Some(65536),
            false,
            &env_of(&[]),
        );
        assert_eq!(get(&inj, "MALLOC_TRIM_THRESHOLD_"), Some("65536".into()));
        assert_eq!(
            get(&inj, "MALLOC_MMAP_THRESHOLD_"),
            Some((32u64 << 20).to_string().into())
        );
        // the user's own threshold stays
        let env = env_of(&[("MALLOC_MMAP_THRESHOLD_", "131072")]);
        let inj = injection(Allocator::System, Some(lib), Some(65536), false, &env);
        assert_eq!(get(&inj, "MALLOC_MMAP_THRESHOLD_"), None);
        // without the observer, or without a trim threshold, nothing trims
        // the heap: glibc's is left alone
        let inj = injection(Allocator::System, None, Some(65536), false, &env_of(&[]));
        assert_eq!(get(&inj, "MALLOC_MMAP_THRESHOLD_"), None);
        let inj = injection(Allocator::System, Some(lib), None, false, &env_of(&[]));
        assert_eq!(get(&inj, "MALLOC_MMAP_THRESHOLD_"), None);
    }

    #[test]
    fn each_allocator_looks_for_its_own_library() {
        let jemalloc = candidates(None, Allocator::Jemalloc);
        let glibc = candidates(None, Allocator::System);
        assert!(jemalloc.iter().all(|p| p.ends_with("libamm_preload.so")));
        assert!(glibc.iter().all(|p| p.ends_with("libamm_preload_glibc.so")));
    }

    #[test]
    fn python_is_recognised_by_name_and_by_shebang() {
        assert!(is_python(OsStr::new("python3")));
        assert!(is_python(OsStr::new("/usr/bin/python3.11")));
        assert!(!is_python(OsStr::new("/bin/true")));
        let d = tempfile::tempdir().expect("tmp");
        let s = d.path().join("dask");
        std::fs::write(&s, "#!/usr/bin/env python3\nprint(1)\n").expect("write");
        assert!(is_python(s.as_os_str()));
        std::fs::write(&s, "#!/opt/venv/bin/python -u\n").expect("write");
        assert!(is_python(s.as_os_str()));
        std::fs::write(&s, "#!/bin/sh\n").expect("write");
        assert!(!is_python(s.as_os_str()));
    }

    #[test]
    fn a_missing_library_says_how_to_get_one() {
        let e = find_library(
            Some(Path::new("/nonexistent/libamm_preload.so")),
            Allocator::Jemalloc,
            1000,
        )
        .expect_err("missing");
        let e = e.to_string();
        assert!(
            e.contains("cargo xtask build") && e.contains("--preload"),
            "{e}"
        );
    }
}
