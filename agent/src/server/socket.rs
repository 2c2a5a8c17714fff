//! The listening socket. It is created with its final mode (through the
//! umask, so no other mode is ever visible), handed to its group with
//! `lchown` (never following a link), and takes the place only of a stale
//! socket of the agent's own: a regular file, directory, symlink or a
//! socket something listens on is left alone with an error that says what
//! to do.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;

use super::ServerConfig;

/// Binds the socket: refuses to steal one another process serves or to
/// remove anything but a stale socket, sets mode and group.
pub(super) fn bind(config: &ServerConfig) -> Result<UnixListener> {
    let path = &config.socket;
    make_parent(path)?;
    clear_stale(path)?;
    let listener = bind_with_mode(path, config.socket_mode)?;
    if let Some(gid) = config.socket_group {
        std::os::unix::fs::lchown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
    }
    Ok(listener)
}

fn make_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
    }
    Ok(())
}

/// What a file type is, in words.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

/// Removes a stale socket at `path`: one this agent's user owns and nothing
/// listens on. Anything else is an error naming what is there.
fn clear_stale(path: &Path) -> Result<()> {
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("cannot inspect {shown}: {e}"),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        bail!(
            "{shown} exists and is {}, not a socket; amm-agent only replaces a stale socket of its own: move it away or choose another --socket",
            kind_of(ft)
        );
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "{shown} is a socket owned by uid {}, not by this agent (uid {me}); remove it yourself if it is stale, or choose another --socket",
            meta.uid()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another process already listens on {shown}; stop it (another amm-agent?) or choose another --socket"
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(e) => bail!(
            "cannot tell whether {shown} is in use ({e}); remove it yourself if it is stale, or choose another --socket"
        ),
    }
    std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {shown}"))
}

/// Binds with the umask set so the socket is born with `mode`.
fn bind_with_mode(path: &Path, mode: u32) -> Result<UnixListener> {
    let mask = Mode::from_bits_truncate(!mode & 0o777);
    // the agent has no other thread creating files while it binds
    let old = umask(mask);
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot inspect {} after binding", path.display()))?;
    if !meta.file_type().is_socket() || meta.mode() & 0o777 != mode {
        bail!(
            "{} changed under the agent while it bound it (now {} with mode {:o}); is someone else writing that directory?",
            path.display(),
            kind_of(meta.file_type()),
            meta.mode() & 0o777
        );
    }
    Ok(listener)
}

/// Resolves a group name or number.
pub fn group_id(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => bail!("no group named {group:?}; create it (groupadd {group}) or give a gid"),
        Err(e) => bail!("cannot look up group {group:?}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(socket: &Path) -> ServerConfig {
        ServerConfig {
            socket: socket.to_path_buf(),
            ..ServerConfig::default()
        }
    }

    /// Waits (bounded) until nothing listens on `sock`. Other tests of this
    /// binary spawn children, and a child holds a copy of every open
    /// descriptor from its fork to its exec, so a listener dropped here
    /// can accept for a moment more (the test failed 36 times in 600 runs
    /// of the whole binary that way, never alone).
    fn refused(sock: &Path) {
        for _ in 0..1000 {
            match std::os::unix::net::UnixStream::connect(sock) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
                _ => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        panic!(
            "{} still accepts 5 s after its listener was dropped",
            sock.display()
        );
    }

    #[tokio::test]
    async fn only_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"precious").expect("write");
        let e = bind(&config(&file)).expect_err("a regular file is refused");
        assert!(e.to_string().contains("a regular file"), "{e}");
        assert_eq!(std::fs::read(&file).expect("kept"), b"precious");

        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        let e = bind(&config(&sub)).expect_err("a directory is refused");
        assert!(e.to_string().contains("a directory"), "{e}");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        let e = bind(&config(&link)).expect_err("a symlink is refused");
        assert!(e.to_string().contains("a symbolic link"), "{e}");
        assert!(file.exists());

        let sock = dir.path().join("agent.sock");
        let live = bind(&config(&sock)).expect("first bind");
        let e = bind(&config(&sock)).expect_err("a live socket is refused");
        assert!(e.to_string().contains("already listens"), "{e}");
        drop(live);
        refused(&sock);
        // the listener is gone, its file stays: stale, replaced
        let again = bind(&config(&sock)).expect("a stale socket is replaced");
        let mode = std::fs::metadata(&sock).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(again);
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(group_id("0").expect("gid"), 0);
        assert_eq!(group_id("root").expect("root group"), 0);
        let e = group_id("no-such-group-amm").expect_err("missing");
        assert!(e.to_string().contains("groupadd"), "{e}");
    }
}
