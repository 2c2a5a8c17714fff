//! Passing a file descriptor with a frame (`SCM_RIGHTS`), for the ring
//! buffer the agent hands a client. Through nix's `sendmsg`/`recvmsg`.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Most fds one receive keeps (the agent sends one per frame).
const MAX_FDS: usize = 4;

/// Sends `buf` on a Unix stream socket with `fd` attached to its first byte.
/// `flags` are sendmsg(2) flags (e.g. `MsgFlags::MSG_DONTWAIT`);
/// `MSG_NOSIGNAL` is always added.
pub fn send_with_fd(
    sock: RawFd,
    buf: &[u8],
    fd: BorrowedFd<'_>,
    flags: MsgFlags,
) -> io::Result<usize> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let flags = flags | MsgFlags::MSG_NOSIGNAL;
    Ok(sendmsg::<()>(
        sock,
        &[IoSlice::new(buf)],
        &cmsg,
        flags,
        None,
    )?)
}

/// Receives into `buf` from a Unix stream socket; any fds that come with
/// the bytes are appended to `fds` (close-on-exec).
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: the kernel just installed these fds in this process
            // for us; nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(msg.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_fd_travels_with_its_bytes() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let file = tempfile_fd();
        let n = send_with_fd(a.as_raw_fd(), b"hi", file.as_fd(), MsgFlags::empty()).expect("send");
        assert_eq!(n, 2);
        let mut fds = Vec::new();
        let mut buf = [0u8; 2];
        let got = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).expect("recv");
        assert_eq!((&buf[..got], fds.len()), (&b"hi"[..], 1));
        // nothing else is waiting
        b.set_nonblocking(true).expect("nonblocking");
        assert!(b.read(&mut buf).is_err());
    }

    fn tempfile_fd() -> OwnedFd {
        let f = std::fs::File::open("/proc/self/status").expect("open");
        OwnedFd::from(f)
    }
}
