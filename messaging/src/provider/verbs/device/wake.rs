//! The fd helpers of the completion thread: an eventfd that wakes it, and a
//! poll over several fds.

use super::*;

/// A non-blocking eventfd that wakes the completion thread.
#[derive(Debug)]
pub(crate) struct WakeFd {
    file: File,
}

impl WakeFd {
    /// Creates the eventfd.
    ///
    /// # Errors
    /// The errno.
    pub(crate) fn new() -> io::Result<WakeFd> {
        // SAFETY: plain syscall with valid flags.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(WakeFd {
            file: File::from(owned),
        })
    }

    /// Makes the fd readable.
    pub(crate) fn wake(&self) {
        let _ = (&self.file).write(&1u64.to_ne_bytes());
    }

    /// Clears it.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = (&self.file).read(&mut buf);
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable (or hung up) or `timeout` passes;
/// returns which are (none after a timeout or a signal). Negative fds are
/// ignored.
///
/// # Errors
/// A `poll` failure other than `EINTR`, or a closed fd (`POLLNVAL`): these
/// persist, so the caller must not simply call again at once.
pub(crate) fn wait_readable<const N: usize>(fds: [RawFd; N], timeout: Option<Duration>) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX));
    // SAFETY: `pfds` is a valid array of N pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(err);
    }
    if pfds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(pfds.map(|p| p.revents != 0))
}

pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with valid commands.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
