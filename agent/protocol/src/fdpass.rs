//! Passing a file descriptor with a frame (`SCM_RIGHTS`), for the ring
//! buffer the agent hands a client.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const FD_SPACE: usize = 64;

/// Sends `buf` on a Unix stream socket with `fd` attached to its first byte.
/// `flags` are sendmsg(2) flags (e.g. `MSG_DONTWAIT`); `MSG_NOSIGNAL` is
/// always added.
pub fn send_with_fd(sock: RawFd, buf: &[u8], fd: BorrowedFd<'_>, flags: i32) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; FD_SPACE / 8];
    // SAFETY: msghdr is plain data; every pointer set below stays valid for
    // the call; CMSG_* only compute offsets inside `control`, which is large
    // enough for one fd (CMSG_SPACE(4) is far below 64 bytes).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        let n = libc::sendmsg(sock, &msg, flags | libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Receives into `buf` from a Unix stream socket; any fds that come with
/// the bytes are appended to `fds` (close-on-exec).
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; FD_SPACE / 8];
    // SAFETY: as in send_with_fd; the kernel fills at most msg_controllen
    // bytes of `control`, and the CMSG_* walk stays inside what it filled.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = FD_SPACE as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let count = ((*cmsg).cmsg_len as usize - (data as usize - cmsg as usize))
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok(n as usize)
    }
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
        let n = send_with_fd(a.as_raw_fd(), b"hi", file.as_fd(), 0).expect("send");
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
