//! System facts and calls the agent and its clients share.

use std::io;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollTimeout};
use nix::unistd::{SysconfVar, sysconf};

/// The page size assumed when the C library cannot say (it always can on
/// Linux; this keeps a broken `sysconf` from becoming a division by zero).
const FALLBACK_PAGE_SIZE: usize = 4096;

/// This machine's page size in bytes (`sysconf(_SC_PAGESIZE)`).
pub fn page_size() -> usize {
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as usize,
        _ => FALLBACK_PAGE_SIZE,
    }
}

/// poll(2) on `fds`, again when a signal interrupts it, for at most
/// `timeout` (`None`: no limit; past `i32::MAX` ms, that many). Returns how
/// many fds are ready.
pub(crate) fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let timeout = timeout.map_or(PollTimeout::NONE, |t| {
        PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX)
    });
    loop {
        match nix::poll::poll(fds, timeout) {
            Ok(n) => return Ok(usize::try_from(n).unwrap_or(0)),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use nix::poll::{PollFd, PollFlags};

    #[test]
    fn the_page_size_is_a_power_of_two_of_at_least_4_kib() {
        let page = super::page_size();
        assert!(page.is_power_of_two() && page >= 4096, "{page}");
    }

    #[test]
    fn poll_tells_a_readable_socket_from_a_quiet_one() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let mut fds = [PollFd::new(b.as_fd(), PollFlags::POLLIN)];
        assert_eq!(
            super::poll(&mut fds, Some(Duration::ZERO)).expect("poll"),
            0
        );
        std::io::Write::write_all(&mut &a, b"x").expect("write");
        let mut fds = [PollFd::new(b.as_fd(), PollFlags::POLLIN)];
        assert_eq!(super::poll(&mut fds, None).expect("poll"), 1);
    }
}
