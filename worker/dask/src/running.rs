//! The running-tasks file's write (the nanny reads it when the worker dies):
//! a whole new file put in place of the old one in one step, without the
//! GIL.
//!
//! A plain `rename` over the old file is what ext4 makes expensive: with
//! `auto_da_alloc` (its default) a rename that replaces a file starts the
//! writeback of the new one in the caller, ~125 µs of CPU per write here,
//! twice per task (benches/RESULTS.md, sparse). `renameat2(RENAME_EXCHANGE)`
//! swaps the two names instead (still atomic: a reader opens the old file
//! or the new one, never half of one), and the old snapshot, now at the
//! temporary name, is unlinked. Where the filesystem cannot exchange, or
//! there is no old file yet, it falls back to `rename`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

/// Where a new snapshot of `path` is written before it takes its place.
fn temporary(path: &Path) -> PathBuf {
    let mut t = path.as_os_str().to_owned();
    t.push(".tmp");
    PathBuf::from(t)
}

/// Removes what is at `path` (a planted link is removed, not followed).
fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `data` as the new content of `path`: a fresh owner-only file at
/// `path.tmp` (whatever was there is removed first, and `O_EXCL |
/// O_NOFOLLOW` refuse a link planted in between: the worker often runs as
/// root), then swapped in whole.
pub fn replace(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    remove(&tmp)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(data)?;
    drop(f);
    match renameat2(AT_FDCWD, &tmp, AT_FDCWD, path, RenameFlags::RENAME_EXCHANGE) {
        // the old snapshot is at the temporary name now
        Ok(()) => remove(&tmp),
        // no old file yet, or a filesystem that cannot exchange
        Err(Errno::ENOENT | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            std::fs::rename(&tmp, path)
        }
        Err(e) => Err(e.into()),
    }
}

/// Replaces the content of the file at `path` with `data` in one step
/// (see the module's doc), without the GIL.
#[pyfunction]
pub fn replace_file(py: Python<'_>, path: PathBuf, data: Vec<u8>) -> PyResult<()> {
    py.detach(|| replace(&path, &data))
        .map_err(|e| PyOSError::new_err(format!("cannot write {}: {e}", path.display())))
}
