//! The operating-system layer of the shm provider: memfds, shared mappings,
//! eventfds and `SOCK_SEQPACKET` Unix sockets that carry file descriptors.
//! Every `unsafe` call of the provider lives here, wrapped in types that
//! close their descriptors and unmap their memory on drop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

/// Most descriptors one message carries.
pub(crate) const MAX_FDS: usize = 4;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by a successful system call that created
    // it, so it is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a sealed memfd of `len` bytes (zero-filled): its size can never
/// change, so a peer mapping it can never be hit by `SIGBUS` from a shrink.
pub(crate) fn sealed_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the call's duration.
    let fd = owned(unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
    let len_off = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain call on a descriptor we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len_off) })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain call on a descriptor we own.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(fd)
}

/// Size of a memfd a peer sent, after checking that it is sealed against
/// shrinking (otherwise touching a mapping of it could raise `SIGBUS`).
pub(crate) fn sealed_size(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: plain call on a descriptor we own.
    let seals = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "memfd is not sealed against shrinking",
        ));
    }
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat` for the call's duration.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    usize::try_from(st.st_size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// A shared, read-write mapping of a whole memfd, unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; it is only reached through raw
// pointers whose users synchronise (atomics in the rings, the RC protocol's
// ownership rules for data), never through references that alias.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and read-write.
    pub(crate) fn new(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping chosen by the kernel (null hint) aliases no
        // Rust object; the result is checked for MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Mapping { ptr, len })
    }

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies `len` bytes from `offset` of this mapping to `dest`, after a
    /// bounds check; `false` if the range leaves the mapping.
    pub(crate) fn read_into(&self, offset: usize, dest: &mut [u8]) -> bool {
        if !in_bounds(offset, dest.len(), self.len) {
            return false;
        }
        // SAFETY: the range lies inside the live mapping (checked above);
        // `dest` is a distinct local borrow. Concurrent writes by the peer
        // can only change the bytes copied (memory it owns and lent us).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), dest.as_mut_ptr(), dest.len()) };
        true
    }

    /// `len` bytes at `offset` of this mapping as a slice, after a bounds
    /// check; `None` if the range leaves the mapping.
    ///
    /// # Safety
    /// For as long as the slice lives, nothing else in this process may
    /// read or write that range (no other slice from this mapping or another
    /// mapping of the same memfd, no `read_into`/`write_from` over it).
    // A mapping is shared memory reached through `&self`; the exclusive
    // borrow is the caller's promise (see Safety), not the receiver's.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self, offset: usize, len: usize) -> Option<&mut [u8]> {
        if !in_bounds(offset, len, self.len) {
            return None;
        }
        // SAFETY: the range lies inside the live, writable mapping (checked
        // above), bytes have no invalid values, and the caller promises the
        // borrow is the only access from this process; the peer's own
        // accesses are outside Rust's model and can only change the bytes.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) })
    }

    /// Copies `src` to `offset` of this mapping, after a bounds check;
    /// `false` if the range leaves the mapping.
    pub(crate) fn write_from(&self, offset: usize, src: &[u8]) -> bool {
        if !in_bounds(offset, src.len(), self.len) {
            return false;
        }
        // SAFETY: the range lies inside the live, writable mapping (checked
        // above); no Rust reference points into a peer's mapping, so no
        // aliasing rule is broken; `src` is a distinct local borrow.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len()) };
        true
    }
}

/// Whether `offset..offset + len` lies within `total` bytes (no overflow).
fn in_bounds(offset: usize, len: usize, total: usize) -> bool {
    match offset.checked_add(len) {
        Some(end) => end <= total,
        None => false,
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping made in `new` and unmapped
        // only here; nothing uses it after the owner dropped it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("len", &self.len).finish()
    }
}

/// A non-blocking eventfd.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain call creating a new descriptor.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Adds one to an eventfd counter (never blocks on a non-blocking eventfd).
pub(crate) fn ring_eventfd(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local `u64`.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd counter (non-blocking).
pub(crate) fn drain_eventfd(fd: &OwnedFd) {
    let mut value: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local `u64`.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
}

/// Sets `O_NONBLOCK` on a descriptor.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain calls on a descriptor we own.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Which of the descriptors given to [`poll`] are ready (readable, hung up
/// or in error).
pub(crate) fn poll(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    loop {
        // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(pfds.iter().map(|p| p.revents != 0).collect());
    }
}

/// A connected or listening `SOCK_SEQPACKET` Unix socket: message
/// boundaries are kept, each message can carry descriptors, and a peer's
/// death reads as end of file.
#[derive(Debug)]
pub(crate) struct Socket {
    fd: OwnedFd,
}

/// Who is at the other end of a connected socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerCred {
    pub(crate) pid: i32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// This process's effective user ID.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: `geteuid` takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// One received message.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) bytes: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
    /// The message or its descriptors did not fit and were cut.
    pub(crate) truncated: bool,
}

fn sockaddr(name: &str) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: `sockaddr_un` is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, abstract_ns): (Vec<u8>, bool) = if name.starts_with('/') {
        (name.as_bytes().to_vec(), false)
    } else {
        (format!("chanio-{name}").into_bytes(), true)
    };
    let start = usize::from(abstract_ns);
    if bytes.len() + start >= sa.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket name too long or has NUL",
        ));
    }
    for (i, b) in bytes.iter().enumerate() {
        sa.sun_path[start + i] = *b as libc::c_char;
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = if abstract_ns {
        base + start + bytes.len()
    } else {
        base + bytes.len() + 1
    };
    Ok((sa, len as libc::socklen_t))
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain call creating a new descriptor.
    owned(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })
}

impl Socket {
    /// Binds and listens on `name` (abstract `\0chanio-NAME`, or a path).
    pub(crate) fn listen(name: &str) -> io::Result<Socket> {
        let (sa, len) = sockaddr(name)?;
        let fd = seqpacket()?;
        // SAFETY: `sa` is a valid sockaddr_un of at least `len` bytes.
        cvt(unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_un).cast(), len) })?;
        // SAFETY: plain call on a descriptor we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        let sock = Socket { fd };
        set_nonblocking(&sock.fd)?;
        Ok(sock)
    }

    /// Connects to `name`.
    pub(crate) fn connect(name: &str) -> io::Result<Socket> {
        let (sa, len) = sockaddr(name)?;
        let fd = seqpacket()?;
        loop {
            // SAFETY: `sa` is a valid sockaddr_un of at least `len` bytes.
            let ret = unsafe { libc::connect(fd.as_raw_fd(), (&sa as *const libc::sockaddr_un).cast(), len) };
            match cvt(ret) {
                Ok(_) => return Ok(Socket { fd }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts one connection without blocking (`WouldBlock` if none).
    pub(crate) fn accept(&self) -> io::Result<Socket> {
        // SAFETY: null address arguments are allowed; creates a new descriptor.
        let fd = owned(unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        Ok(Socket { fd })
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The credentials the kernel recorded for the process at the other
    /// end when it connected (`SO_PEERCRED`): they cannot be forged.
    pub(crate) fn peer_cred(&self) -> io::Result<PeerCred> {
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is a writable `ucred` of `len` bytes, which is what
        // SO_PEERCRED writes (at most `len` bytes); the descriptor is ours.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        })?;
        Ok(PeerCred {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        })
    }

    /// Sends one message with descriptors (blocking).
    pub(crate) fn send(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        assert!(fds.len() <= MAX_FDS, "internal: too many descriptors in one message");
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: `msghdr` is plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_len = std::mem::size_of_val(fds) as libc::c_uint;
            // SAFETY: pure size computation.
            let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: `msg_control` points at `control` (64 bytes, 8-aligned),
            // which holds `CMSG_SPACE` of 4 descriptors; the header and data
            // written stay inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
            }
        }
        loop {
            // SAFETY: `msg` points at live buffers (iov, control) for the call.
            let ret = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if ret >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives one message of at most `max` bytes without blocking:
    /// `Ok(None)` if none is queued, `Err(UnexpectedEof)` at end of file.
    pub(crate) fn try_recv(&self, max: usize) -> io::Result<Option<Message>> {
        let mut bytes = vec![0u8; max];
        let mut iov = libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: `msghdr` is plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = loop {
            // SAFETY: `msg` points at live, writable buffers for the call.
            let ret = unsafe {
                libc::recvmsg(
                    self.fd.as_raw_fd(),
                    &mut msg,
                    libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                )
            };
            if ret >= 0 {
                break ret as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        };
        let mut fds = Vec::new();
        // SAFETY: the kernel filled `control` up to `msg_controllen`; the
        // CMSG_* macros walk only that range, and every SCM_RIGHTS payload is
        // an array of descriptors now owned by this process.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if n == 0 && fds.is_empty() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        bytes.truncate(n);
        let truncated = msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
        Ok(Some(Message { bytes, fds, truncated }))
    }

    /// Receives one message, waiting until `deadline`.
    pub(crate) fn recv_until(&self, max: usize, deadline: Instant) -> io::Result<Message> {
        loop {
            if let Some(m) = self.try_recv(max)? {
                return Ok(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            poll(&[self.raw()], Some(left.max(Duration::from_millis(1))))?;
        }
    }

    /// Shuts both directions down: the peer reads end of file.
    pub(crate) fn shutdown(&self) {
        // SAFETY: plain call on a descriptor we own.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}
