//! `cargo xtask build-ebpf`: clang → target/bpf/amm.bpf.o.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

const INSTALL_HINT: &str = "install the build dependencies with: \
     apt-get update && apt-get install -y clang libbpf-dev linux-libc-dev";

/// Target triple of the host, for the `asm/` headers Debian keeps under
/// /usr/include/<triple>.
fn host_triple() -> String {
    for cc in ["gcc", "cc", "clang"] {
        if let Ok(out) = Command::new(cc).arg("-dumpmachine").output()
            && out.status.success()
        {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !t.is_empty() {
                return t;
            }
        }
    }
    format!("{}-linux-gnu", std::env::consts::ARCH)
}

/// The objects built: the agent's probe, and the benchmark-only programs
/// the overhead benchmark compares it with (bench.bpf.o).
const OBJECTS: [(&str, &str); 2] = [("amm.bpf.c", "amm.bpf.o"), ("bench.bpf.c", "bench.bpf.o")];

/// Checks the tools and headers, compiles every object, and returns the
/// probe's path (target/bpf/amm.bpf.o).
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    let out_dir = root.join("target/bpf");

    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => bail!("`{clang}` was not found or does not run; {INSTALL_HINT}"),
    }
    let triple = host_triple();
    let arch_inc = PathBuf::from(format!("/usr/include/{triple}"));
    let needed = [
        (
            Path::new("/usr/include/bpf/bpf_helpers.h").to_path_buf(),
            "libbpf-dev",
        ),
        (
            Path::new("/usr/include/linux/bpf.h").to_path_buf(),
            "linux-libc-dev",
        ),
        (arch_inc.join("asm/types.h"), "linux-libc-dev"),
    ];
    for (header, package) in &needed {
        if !header.exists() {
            bail!(
                "{} is missing (Debian package {package}); {INSTALL_HINT}",
                header.display()
            );
        }
    }
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    for (src, obj) in OBJECTS {
        compile(
            &clang,
            &arch_inc,
            &root,
            &root.join("ebpf/c").join(src),
            &out_dir.join(obj),
        )?;
    }
    Ok(out_dir.join(OBJECTS[0].1))
}

fn compile(clang: &str, arch_inc: &Path, root: &Path, src: &Path, out: &Path) -> Result<()> {
    let status = Command::new(clang)
        .args([
            "-target", "bpf", "-O2", "-g", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!("-I{}", arch_inc.display()))
        .arg(format!("-I{}", root.join("ebpf/c").display()))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(out)
        .status()
        .with_context(|| format!("cannot run {clang}"))?;
    if !status.success() {
        bail!("clang failed to compile {} ({status})", src.display());
    }
    Ok(())
}
