//! The worker's own spill directory `<local-directory>/amm-spill-<name>`.
//!
//! A live worker holds an exclusive `flock` on `<dir>/lock`. Opening the
//! directory empties it (leftovers of an earlier run of the same worker, e.g.
//! one the kernel OOM-killed) and removes sibling `amm-spill-*` directories
//! whose lock nobody holds (workers that died without cleaning up), as
//! Dask's `diskutils` does. Dropping it (or [`SpillDir::cleanup`]) removes the
//! directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

const PREFIX: &str = "amm-spill-";
const LOCK: &str = "lock";

/// An open, locked spill directory.
#[derive(Debug)]
pub struct SpillDir {
    path: PathBuf,
    lock: Option<File>,
}

/// Keeps a worker name usable as a file name.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The directory a worker named `name` uses below `local_directory`.
pub fn path_for(local_directory: &Path, name: &str) -> PathBuf {
    local_directory.join(format!("{PREFIX}{}", sanitize(name)))
}

fn empty_dir(dir: &Path, keep: Option<&str>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if keep.is_some_and(|k| entry.file_name() == k) {
            continue;
        }
        let p = entry.path();
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Removes sibling spill directories of dead workers (lock not held).
fn sweep_stale(local_directory: &Path, own: &Path) {
    let Ok(entries) = fs::read_dir(local_directory) else {
        return;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        let is_ours = entry.file_name().to_string_lossy().starts_with(PREFIX);
        if !is_ours || p == own || !p.is_dir() {
            continue;
        }
        let Ok(lock) = OpenOptions::new().write(true).open(p.join(LOCK)) else {
            continue;
        };
        if lock.try_lock().is_ok() {
            tracing::info!(dir = %p.display(), "removing the spill directory of a dead worker");
            if let Err(e) = fs::remove_dir_all(&p) {
                tracing::warn!(dir = %p.display(), "cannot remove stale spill directory: {e}");
            }
        }
    }
}

impl SpillDir {
    /// Creates (or takes over and empties) the directory of worker `name`.
    /// Fails if a live worker of the same name holds it.
    pub fn open(local_directory: &Path, name: &str) -> io::Result<SpillDir> {
        fs::create_dir_all(local_directory).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", local_directory.display()),
            )
        })?;
        let path = path_for(local_directory, name);
        sweep_stale(local_directory, &path);
        fs::create_dir_all(&path)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "spill directory {} is in use by another live worker named {name:?}",
                        path.display()
                    ),
                ));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        empty_dir(&path, Some(LOCK))?;
        Ok(SpillDir {
            path,
            lock: Some(lock),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes every file and the directory itself (idempotent).
    pub fn cleanup(&mut self) {
        if self.lock.is_none() {
            return;
        }
        if let Err(e) = empty_dir(&self.path, Some(LOCK)) {
            tracing::warn!(dir = %self.path.display(), "cannot empty the spill directory: {e}");
        }
        let _ = fs::remove_file(self.path.join(LOCK));
        self.lock = None;
        let _ = fs::remove_dir(&self.path);
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_of_a_live_name_fails_and_leftovers_go() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = SpillDir::open(tmp.path(), "w/1").expect("open");
        assert!(first.path().ends_with("amm-spill-w_1"));
        fs::write(first.path().join("0001.spill"), b"x").expect("write");
        let e = SpillDir::open(tmp.path(), "w/1").expect_err("must fail");
        assert!(e.to_string().contains("in use"), "{e}");
        // Simulate a crash: forget the handle (lock released, files left).
        let path = first.path().to_path_buf();
        let mut first = first;
        first.lock = None; // drop the flock without cleaning
        assert!(path.join("0001.spill").exists());
        let again = SpillDir::open(tmp.path(), "w/1").expect("reopen");
        assert!(!again.path().join("0001.spill").exists(), "leftover kept");
        // A dead worker of another name is swept.
        let dead = tmp.path().join("amm-spill-dead");
        fs::create_dir_all(&dead).expect("mkdir");
        fs::write(dead.join(LOCK), b"").expect("lock");
        fs::write(dead.join("0002.spill"), b"x").expect("write");
        let other = SpillDir::open(tmp.path(), "other").expect("open other");
        assert!(!dead.exists(), "stale dir not swept");
        drop(other);
        drop(again);
        assert!(!path.exists(), "dir not removed on drop");
    }
}
