//! Is a file safe for a root nanny to load into a program (`LD_PRELOAD`) or
//! to run (a hook)? As root, a path another user can change is a way to run
//! their code as root, so it is refused when:
//!
//! - the path as given is a symlink in a directory others may write to
//!   (world-writable, sticky or not: whoever planted the link chose where
//!   it points);
//! - the file it resolves to is not a regular file, is not owned by root,
//!   or is writable by group or others;
//! - a directory on the resolved path is writable by a group or others
//!   (without the sticky bit), or is owned by a user other than root.
//!
//! For an unprivileged nanny nothing is refused: the user may load or run
//! any file they could load or run themselves.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const S_IWGRP: u32 = 0o020;
const S_IWOTH: u32 = 0o002;
const S_ISVTX: u32 = 0o1000;

/// Checks `path` for a process running as `euid`; returns the resolved
/// path, or why it is refused.
pub fn check(path: &Path, euid: u32) -> Result<PathBuf, String> {
    let shown = path.display();
    let link = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    let resolved = std::fs::canonicalize(path).map_err(|e| format!("{shown}: {e}"))?;
    if euid != 0 {
        return Ok(resolved);
    }
    if link.file_type().is_symlink() {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if m.mode() & S_IWOTH != 0 {
            return Err(format!(
                "{shown} is a symlink in {}, a directory any user can write to: refused as root \
                 (give the library's real path, in a directory only root can write)",
                dir.display()
            ));
        }
    }
    let m = std::fs::metadata(&resolved).map_err(|e| format!("{}: {e}", resolved.display()))?;
    if !m.is_file() {
        return Err(format!("{} is not a regular file", resolved.display()));
    }
    if m.uid() != 0 || m.mode() & (S_IWGRP | S_IWOTH) != 0 {
        return Err(format!(
            "{} is owned by uid {} with mode {:o}: as root only a file owned by root and \
             writable by nobody else is used",
            resolved.display(),
            m.uid(),
            m.mode() & 0o7777
        ));
    }
    for dir in resolved.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // in a sticky directory (/tmp) nobody may replace root's entries
        let others_write = m.mode() & (S_IWGRP | S_IWOTH) != 0 && m.mode() & S_ISVTX == 0;
        if m.uid() != 0 || others_write {
            return Err(format!(
                "{} is in {} (owner uid {}, mode {:o}), which another user can change: \
                 refused as root",
                resolved.display(),
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_user_may_use_any_file() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("lib.so");
        std::fs::write(&f, b"x").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(check(&f, 1000).is_ok());
    }

    /// The abuse case: as root, a symlink planted in a world-writable
    /// directory (/tmp) is refused, even when it points at a good file.
    #[test]
    fn as_root_a_symlink_in_a_world_writable_directory_is_refused() {
        let d = tempfile::Builder::new()
            .prefix("amm-trust-")
            .tempdir_in("/tmp")
            .expect("tmp");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let link = d.path().join("libamm_preload.so");
        std::os::unix::fs::symlink("/bin/true", &link).expect("symlink");
        let e = check(&link, 0).expect_err("refused");
        assert!(e.contains("symlink"), "{e}");
        // a file writable by others, as root
        let f = d.path().join("other.so");
        std::fs::write(&f, b"x").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let e = check(&f, 0).expect_err("refused");
        assert!(e.contains("writable by nobody else"), "{e}");
        if root() {
            // root's own file in a sticky world-writable directory is fine
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(check(&f, 0).is_ok(), "{:?}", check(&f, 0));
        }
        // a directory that is not a file
        assert!(check(d.path(), 0).is_err());
    }
}
