//! The worker's own spill directory `<local-directory>/amm-spill-<name>`.
//!
//! A live worker holds an exclusive `flock` on `<dir>/lock`. Opening the
//! directory empties it (leftovers of an earlier run of the same worker, e.g.
//! one the kernel OOM-killed) and removes sibling `amm-spill-*` directories
//! of this user whose lock nobody holds (workers that died without cleaning
//! up), as Dask's `diskutils` does. Dropping it (or [`SpillDir::cleanup`])
//! removes the directory.
//!
//! **Hostile neighbours.** The local directory is often `/tmp`, which every
//! user can write, and the worker often runs as root. So nothing here is
//! reached through a path twice: the local directory is opened once, the
//! spill directory is made (mode 0700) and opened relative to it with
//! `O_NOFOLLOW | O_DIRECTORY`, and every file (the lock, each value, each
//! removal) is created, opened or unlinked relative to that directory's fd
//! with `O_NOFOLLOW`. A spill directory that is a symbolic link, not a
//! directory, owned by another uid, or not mode 0700 is refused with an
//! error that says what to do; a lock or value that is not a regular file
//! (a FIFO, a device, a link) is never opened for I/O: files are opened
//! `O_NONBLOCK` and checked with `fstat` first. Names are single path
//! components, so `O_NOFOLLOW` already refuses every link (`openat2`'s
//! `RESOLVE_BENEATH` would add nothing).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, Flock, FlockArg, OFlag, open, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, geteuid, unlinkat};

const PREFIX: &str = "amm-spill-";
const LOCK: &str = "lock";
/// Deepest tree [`empty`] removes (a spill directory is flat; anything
/// deeper was planted).
const MAX_DEPTH: usize = 8;

/// An open, locked spill directory.
#[derive(Debug)]
pub struct SpillDir {
    path: PathBuf,
    parent: OwnedFd,
    name: String,
    fd: OwnedFd,
    lock: Mutex<Option<Flock<File>>>,
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
    local_directory.join(dir_name(name))
}

fn dir_name(name: &str) -> String {
    format!("{PREFIX}{}", sanitize(name))
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A refusal: what is wrong with `path` and what to do about it.
fn refuse(path: &Path, what: &str, todo: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing the spill directory {}: {what}; {todo}",
            path.display()
        ),
    )
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Opens the directory `name` below `parent` without following a link.
fn open_subdir(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the regular file `name` below `dir` (never a link, FIFO or device:
/// it is opened non-blocking and checked before any I/O). `create` makes it
/// (mode 0600) and fails if it exists.
pub(crate) fn open_regular(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    write: bool,
    create: bool,
) -> io::Result<File> {
    let mut flags = OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    flags |= if write {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    if create {
        flags |= OFlag::O_CREAT | OFlag::O_EXCL;
    }
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o600)).map_err(|e| match e {
        Errno::ELOOP => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is a symbolic link", name.to_string_lossy()),
        ),
        e => io_err(e),
    })?;
    let st = fstat(&fd).map_err(io_err)?;
    if file_type(&st) != SFlag::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", name.to_string_lossy()),
        ));
    }
    // Back to blocking I/O for the data (a regular file never blocks on
    // open, but read/write semantics stay the ordinary ones).
    let file = File::from(fd);
    let fl = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).map_err(io_err)?;
    let fl = OFlag::from_bits_truncate(fl) & !OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(io_err)?;
    Ok(file)
}

/// Names in `dir` other than `.` and `..`, with their type when the file
/// system says it.
fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<(CString, Option<Type>)>> {
    let mut d = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e.map_err(io_err)?;
        let name = e.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        out.push((name.to_owned(), e.file_type()));
    }
    Ok(out)
}

/// Removes everything in `dir` except `keep`, without following a link.
fn empty(dir: BorrowedFd<'_>, keep: Option<&str>, depth: usize) -> io::Result<()> {
    for (name, kind) in entries(dir)? {
        if keep.is_some_and(|k| name.to_bytes() == k.as_bytes()) {
            continue;
        }
        let is_dir = match kind {
            Some(t) => t == Type::Directory,
            None => fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|st| file_type(&st) == SFlag::S_IFDIR),
        };
        if is_dir {
            if depth >= MAX_DEPTH {
                return Err(io::Error::other(format!(
                    "directories nested more than {MAX_DEPTH} deep"
                )));
            }
            let sub = open_subdir(dir, OsStr::from_bytes(name.to_bytes())).map_err(io_err)?;
            empty(sub.as_fd(), None, depth + 1)?;
            unlinkat(dir, name.as_c_str(), UnlinkatFlags::RemoveDir).map_err(io_err)?;
        } else {
            unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir).map_err(io_err)?;
        }
    }
    Ok(())
}

/// Whether a directory may be removed by this worker: it is this uid's and
/// nobody else could have written into it.
fn ours(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR && st.st_uid == geteuid().as_raw() && st.st_mode & 0o022 == 0
}

/// Removes sibling spill directories of this uid's dead workers (lock not
/// held). Links, other users' directories and locks that are not regular
/// files are left alone (and never opened for I/O).
fn sweep_stale(parent: BorrowedFd<'_>, own: &str) {
    let Ok(list) = entries(parent) else {
        return;
    };
    for (name, _) in list {
        let name = OsStr::from_bytes(name.to_bytes());
        let text = name.to_string_lossy();
        if !text.starts_with(PREFIX) || text == own {
            continue;
        }
        let Ok(dir) = open_subdir(parent, name) else {
            continue;
        };
        if !fstat(&dir).is_ok_and(|st| ours(&st)) {
            continue;
        }
        let lock = match open_regular(dir.as_fd(), OsStr::new(LOCK), true, false) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(dir = %text, "not sweeping a spill directory: lock: {e}");
                continue;
            }
        };
        let Ok(_held) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        tracing::info!(dir = %text, "removing the spill directory of a dead worker");
        let removed = empty(dir.as_fd(), None, 0)
            .and_then(|()| unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(io_err));
        if let Err(e) = removed {
            tracing::warn!(dir = %text, "cannot remove stale spill directory: {e}");
        }
    }
}

/// Makes (mode 0700) or opens the spill directory `name` below `parent`
/// and checks it is a real directory of this uid with mode 0700.
fn make_checked(parent: BorrowedFd<'_>, name: &str, path: &Path) -> io::Result<OwnedFd> {
    let created = match mkdirat(parent, name, Mode::S_IRWXU) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(e) => {
            return Err(io::Error::new(
                io_err(e).kind(),
                format!("cannot create {}: {}", path.display(), io_err(e)),
            ));
        }
    };
    let is_link = || {
        fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| file_type(&st) == SFlag::S_IFLNK)
    };
    let fd = open_subdir(parent, OsStr::new(name)).map_err(|e| match e {
        // O_DIRECTORY | O_NOFOLLOW on a link fails with ENOTDIR
        Errno::ELOOP | Errno::ENOTDIR if is_link() => refuse(
            path,
            "it is a symbolic link (a spill directory is never followed through a link)",
            "remove the link, or choose another --local-directory or --name",
        ),
        Errno::ENOTDIR => refuse(
            path,
            "it is not a directory",
            "remove it, or choose another --local-directory or --name",
        ),
        e => io_err(e),
    })?;
    if created {
        // The umask may have narrowed 0700; nothing can have widened it.
        fchmod(&fd, Mode::S_IRWXU).map_err(io_err)?;
    }
    let st = fstat(&fd).map_err(io_err)?;
    let uid = geteuid().as_raw();
    if st.st_uid != uid {
        return Err(refuse(
            path,
            &format!(
                "it belongs to uid {}, not to this worker's uid {uid}, so that user could \
                 read, replace or delete what the worker spills",
                st.st_uid
            ),
            "remove it (after checking what it holds), or choose another --local-directory or --name",
        ));
    }
    if st.st_mode & 0o7777 != 0o700 {
        return Err(refuse(
            path,
            &format!(
                "its mode is {:04o}, not 0700, so other users may have read or planted files in it",
                st.st_mode & 0o7777
            ),
            "remove it (or `chmod 700` it if you trust what it holds)",
        ));
    }
    Ok(fd)
}

impl SpillDir {
    /// Creates (or takes over and empties) the directory of worker `name`.
    /// Fails if a live worker of the same name holds it, or if the
    /// directory is not safe to use (see the module docs).
    pub fn open(local_directory: &Path, name: &str) -> io::Result<SpillDir> {
        std::fs::create_dir_all(local_directory).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", local_directory.display()),
            )
        })?;
        // The local directory is the operator's choice: a link there is
        // followed, once; everything below it is reached through this fd.
        let parent = open(
            local_directory,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(
                io_err(e).kind(),
                format!("cannot open {}: {}", local_directory.display(), io_err(e)),
            )
        })?;
        let dname = dir_name(name);
        let path = local_directory.join(&dname);
        sweep_stale(parent.as_fd(), &dname);
        let fd = make_checked(parent.as_fd(), &dname, &path)?;
        let lock = open_regular(fd.as_fd(), OsStr::new(LOCK), true, false)
            .or_else(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => open_regular(fd.as_fd(), OsStr::new(LOCK), true, true),
                _ => Err(e),
            })
            .map_err(|e| {
                refuse(
                    &path,
                    &format!("its lock file: {e}"),
                    "remove the directory, or choose another --name",
                )
            })?;
        let lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "spill directory {} is in use by another live worker named {name:?}; \
                         give this one another --name",
                        path.display()
                    ),
                ));
            }
            Err((_, e)) => return Err(io_err(e)),
        };
        empty(fd.as_fd(), Some(LOCK), 0).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot empty the spill directory {}: {e}", path.display()),
            )
        })?;
        Ok(SpillDir {
            path,
            parent,
            name: dname,
            fd,
            lock: Mutex::new(Some(lock)),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the spill file `name` (mode 0600; it must not exist). Refused
    /// once the directory is cleaned up: the lock is held across the create,
    /// so a [`cleanup`](Self::cleanup) (the worker leaving while a task
    /// thread spills) is wholly before it or after it and never leaves a
    /// file, and so the directory, behind.
    pub fn create(&self, name: &str) -> io::Result<File> {
        let lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if lock.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "spill directory {} is closed: the worker is leaving",
                    self.path.display()
                ),
            ));
        }
        open_regular(self.fd.as_fd(), OsStr::new(name), true, true)
    }

    /// Opens the spill file `name` for reading (a regular file, not a link).
    pub fn open_file(&self, name: &str) -> io::Result<File> {
        open_regular(self.fd.as_fd(), OsStr::new(name), false, false)
    }

    /// Bytes an unprivileged writer may still put on the directory's file
    /// system (`fstatvfs`: available blocks times fragment size).
    pub fn free_bytes(&self) -> io::Result<u64> {
        let st = nix::sys::statvfs::fstatvfs(&self.fd).map_err(io_err)?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// The memory-backed file system the directory is on (`"tmpfs"`,
    /// `"ramfs"`), if it is one: see [`amm_cgroup::memory_backed_fs`].
    pub fn in_memory(&self) -> Option<&'static str> {
        amm_cgroup::memory_backed_fs(&self.fd)
    }

    /// Removes the spill file `name` (not following a link).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir).map_err(io_err)
    }

    /// Removes every file and the directory itself (idempotent).
    pub fn cleanup(&self) {
        let mut lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if lock.is_none() {
            return;
        }
        if let Err(e) = empty(self.fd.as_fd(), Some(LOCK), 0) {
            tracing::warn!(dir = %self.path.display(), "cannot empty the spill directory: {e}");
        }
        let _ = unlinkat(self.fd.as_fd(), LOCK, UnlinkatFlags::NoRemoveDir);
        *lock = None;
        // Only ever removes an empty directory: if the name now points at
        // another one, that one is left alone unless it is empty.
        let _ = unlinkat(
            self.parent.as_fd(),
            self.name.as_str(),
            UnlinkatFlags::RemoveDir,
        );
    }

    /// Drops the lock without cleaning (what a crash leaves), for tests.
    #[doc(hidden)]
    pub fn forget_for_test(&self) {
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
    use std::fs;

    #[test]
    fn second_open_of_a_live_name_fails_and_leftovers_go() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = SpillDir::open(tmp.path(), "w/1").expect("open");
        assert!(first.path().ends_with("amm-spill-w_1"));
        fs::write(first.path().join("0001.spill"), b"x").expect("write");
        let e = SpillDir::open(tmp.path(), "w/1").expect_err("must fail");
        assert!(e.to_string().contains("in use"), "{e}");
        // Simulate a crash: drop the flock without cleaning.
        let path = first.path().to_path_buf();
        first.forget_for_test();
        drop(first);
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

    /// A value spilled while the worker leaves (a task thread's create
    /// racing the signal thread's cleanup) left its file, and so the
    /// directory, behind (nanny.rs `a_killed_nanny_leaves_no_orphan_worker`,
    /// 6 of 20 times with the CPUs busy). Each round: a thread creates files
    /// without pause while the directory is cleaned up.
    #[test]
    fn a_cleanup_racing_creates_leaves_no_directory() {
        use std::io::Write;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let tmp = tempfile::tempdir().expect("tempdir");
        for round in 0..50 {
            let dir = Arc::new(SpillDir::open(tmp.path(), "race").expect("open"));
            let path = dir.path().to_path_buf();
            let stop = Arc::new(AtomicBool::new(false));
            let writer = {
                let (dir, stop) = (dir.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut made = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(mut f) = dir.create(&format!("{made:016x}.spill")) {
                            let _ = f.write_all(b"x");
                            made += 1;
                        }
                    }
                })
            };
            while fs::read_dir(&path).map_or(0, |d| d.count()) < 4 {
                std::thread::yield_now();
            }
            dir.cleanup();
            let left = fs::read_dir(&path).map(|d| d.count()).ok();
            stop.store(true, Ordering::Relaxed);
            writer.join().expect("writer");
            assert_eq!(
                left, None,
                "round {round}: {left:?} files outlived the cleanup"
            );
            let e = dir
                .create("late.spill")
                .expect_err("a create after the cleanup");
            assert!(e.to_string().contains("is closed"), "{e}");
        }
    }
}
