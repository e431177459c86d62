//! A queue's own io_uring: many reads, writes and flushes in flight against
//! file namespaces at once, each completed when the device finishes it, in
//! whatever order that is.
//!
//! ```text
//! start(files, req) ─▶ SQE queued ─ submit() ─▶ kernel ─▶ CQE ─ reap() ─▶ (req, result)
//!                                        short transfer: resumed ─┘
//! ```
//!
//! - **Memory.** A request owns the memory it transfers ([`Transfer`]) from
//!   [`Ring::start`] until [`Ring::reap`] hands it back. In between it lives
//!   in a slab created at its full capacity and never grown, so it does not
//!   move while the kernel uses it; dropping the ring waits for every
//!   request still in flight. The [`Files`] stay open with each request.
//! - **FUA** is the write's `RWF_DSYNC`; **Flush** an `fdatasync`, which
//!   covers every write that completed before it was started (what NVMe
//!   asks of Flush: the writes a host saw complete).
//! - **Waiting** on two things at once: [`Ring::wait`] also ends when the
//!   [`Ring::waker`] fires (an eventfd the ring polls), which the queue hands
//!   to its channel, so one sleep serves storage and network.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use slab::Slab;

use super::uring::Files;
use super::{BlockError, ErrorKind};

/// `user_data` of the waker's poll (request keys are slab indices).
const WAKE: u64 = u64::MAX;

/// What a request does.
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination.
        buf: &'a mut [u8],
    },
    /// Write `data` at `offset`; with `fua`, durable when it completes.
    Write {
        /// Byte offset.
        offset: u64,
        /// Source.
        data: &'a [u8],
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
}

/// A request: it owns the memory it transfers, and names it each time the
/// ring asks.
///
/// # Safety
/// Every call of [`Transfer::op`] on one value names the same memory (same
/// address and length) as long as the value lives, and `op` changes
/// nothing but that memory's contents: the kernel holds the address from
/// the first call until the request completes. (`'static`: a request
/// borrows nothing, so a ring leaked with its requests leaks valid memory.)
pub unsafe trait Transfer: 'static {
    /// The operation and its memory.
    fn op(&mut self) -> IoOp<'_>;
}

struct InFlight<T> {
    req: T,
    files: Arc<Files>,
    /// Bytes transferred so far (a short read or write is resumed).
    done: usize,
    /// Why it could not be queued; reported by the next reap.
    refused: Option<std::io::Error>,
}

/// A queue's ring. See the module documentation.
pub struct Ring<T: Transfer> {
    ring: IoUring,
    requests: Slab<InFlight<T>>,
    capacity: usize,
    /// Requests that could not be queued, reported by the next reap.
    refused: Vec<usize>,
    wake: Arc<EventFd>,
    wake_armed: bool,
}

impl<T: Transfer> Ring<T> {
    /// A ring for at most `capacity` requests in flight.
    ///
    /// # Errors
    /// The kernel refused the ring or the eventfd.
    pub fn new(capacity: usize) -> std::io::Result<Ring<T>> {
        let capacity = capacity.max(1);
        // One entry per request (each has at most one queued) and the waker's.
        let entries = u32::try_from(capacity + 1)
            .map_err(|_| std::io::Error::other("ring capacity too large"))?
            .next_power_of_two();
        let ring = IoUring::new(entries)?;
        if !ring.params().is_feature_ext_arg() {
            // `wait` needs a timeout on the wait itself (Linux 5.11).
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this kernel's io_uring cannot time a wait (IORING_FEAT_EXT_ARG, Linux 5.11)",
            ));
        }
        Ok(Ring {
            ring,
            requests: Slab::with_capacity(capacity),
            capacity,
            refused: Vec::with_capacity(capacity),
            wake: Arc::new(EventFd::new()?),
            wake_armed: false,
        })
    }

    /// Requests in flight (started and not yet reaped).
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Whether another request would be refused.
    pub fn is_full(&self) -> bool {
        self.requests.len() >= self.capacity
    }

    /// Whether a reap would hand something back now (no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.refused.is_empty() || !self.ring.completion().is_empty()
    }

    /// The ring's descriptor: readable while completions wait to be
    /// reaped, so one `epoll` can watch many rings.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }

    /// A waker that ends the current or next [`Ring::wait`].
    pub fn waker(&self) -> Waker {
        Waker::from(self.wake.clone())
    }

    /// Queues `req` against `files`; it reaches the kernel with the next
    /// [`Ring::submit`] or [`Ring::wait`].
    ///
    /// # Errors
    /// `req` back when the ring is full.
    pub fn start(&mut self, files: &Arc<Files>, req: T) -> Result<(), T> {
        if self.is_full() {
            return Err(req);
        }
        // Below capacity: the slab takes it without growing.
        let key = self.requests.insert(InFlight {
            req,
            files: files.clone(),
            done: 0,
            refused: None,
        });
        self.queue(key);
        Ok(())
    }

    /// Hands every queued request to the kernel without waiting.
    ///
    /// # Errors
    /// The kernel refused the submission (requests stay queued).
    pub fn submit(&mut self) -> std::io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued and sleeps until a request completes, the
    /// waker fires, or `timeout` passes.
    ///
    /// # Errors
    /// The kernel refused the wait.
    pub fn wait(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.wait_for(timeout, true)
    }

    /// As [`Ring::wait`], but the waker's poll is not armed for it: a
    /// completion or the timeout end it (and a wake-up only if a poll armed
    /// by an earlier [`Ring::wait`] is still pending).
    ///
    /// # Errors
    /// The kernel refused the wait.
    pub fn wait_storage(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.wait_for(timeout, false)
    }

    fn wait_for(&mut self, timeout: Duration, wakeable: bool) -> std::io::Result<()> {
        if wakeable && !self.wake_armed {
            let poll = opcode::PollAdd::new(types::Fd(self.wake.0.as_raw_fd()), libc::POLLIN as u32)
                .build()
                .user_data(WAKE);
            // SAFETY: a poll entry refers to no memory; the eventfd lives as
            // long as the ring (`self.wake`).
            if unsafe { self.ring.submission().push(&poll) }.is_ok() {
                self.wake_armed = true;
            }
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Hands back every finished request with its result, in the order
    /// they finished; short transfers are resumed instead.
    pub fn reap(&mut self, mut done: impl FnMut(T, Result<(), BlockError>)) {
        while let Some(key) = self.refused.pop() {
            let f = self.requests.remove(key);
            let e = f.refused.unwrap_or_else(|| std::io::Error::other("not queued"));
            let mut req = f.req;
            let err = error_of(&mut req, &f.files, f.done, e);
            done(req, Err(err));
        }
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            if cqe.user_data() == WAKE {
                self.wake_armed = false;
                self.wake.reset();
                continue;
            }
            let key = cqe.user_data() as usize;
            let Some(f) = self.requests.get_mut(key) else {
                continue;
            };
            match advance(f, cqe.result()) {
                Step::Again => self.queue(key),
                Step::Done(r) => {
                    let f = self.requests.remove(key);
                    done(f.req, r);
                }
            }
        }
    }

    /// Queues the (rest of the) request in slot `key`.
    fn queue(&mut self, key: usize) {
        let InFlight { req, files, done, .. } = &mut self.requests[key];
        let entry = match req.op() {
            IoOp::Read { offset, buf } => {
                let from = (*done).min(buf.len());
                let rest = &mut buf[from..];
                let at = offset + *done as u64;
                let file = files.pick(at, rest.as_ptr(), rest.len());
                opcode::Read::new(types::Fd(file.as_raw_fd()), rest.as_mut_ptr(), len32(rest.len()))
                    .offset(at)
                    .build()
            }
            IoOp::Write { offset, data, fua } => {
                let rest = &data[(*done).min(data.len())..];
                let at = offset + *done as u64;
                let file = files.pick(at, rest.as_ptr(), rest.len());
                opcode::Write::new(types::Fd(file.as_raw_fd()), rest.as_ptr(), len32(rest.len()))
                    .offset(at)
                    .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            IoOp::Flush => opcode::Fsync::new(types::Fd(files.sync_file().as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(key as u64);
        // SAFETY: the entry points at memory the request in slot `key` owns
        // and names the same way every time (`Transfer`'s contract). The slab was
        // created at full capacity and `start` never inserts beyond it, so
        // the request does not move; it leaves the slab only in `reap`,
        // after the kernel completed this entry, and `Drop` waits for every
        // entry in flight. The files stay open through `InFlight::files`.
        let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // Full of entries not yet submitted: hand them in and retry.
            let _ = self.ring.submit();
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
        if !pushed {
            self.requests[key].refused = Some(std::io::Error::other("io_uring submission queue full"));
            self.refused.push(key);
        }
    }
}

impl<T: Transfer> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.requests.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl<T: Transfer> Drop for Ring<T> {
    fn drop(&mut self) {
        // The kernel may still write into the requests' memory: wait for
        // every entry; should waiting fail, leak them rather than free
        // memory in use.
        let mut queued = std::mem::take(&mut self.refused);
        for key in queued.drain(..) {
            self.requests.remove(key);
        }
        while !self.requests.is_empty() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(e) => {
                    tracing::error!("io_uring wait failed with requests in flight ({e}); leaking their memory");
                    std::mem::forget(std::mem::take(&mut self.requests));
                    return;
                }
            }
            while let Some(cqe) = self.ring.completion().next() {
                if cqe.user_data() != WAKE {
                    self.requests.try_remove(cqe.user_data() as usize);
                }
            }
        }
    }
}

enum Step {
    Again,
    Done(Result<(), BlockError>),
}

/// What a completion with result `res` means for request `f`.
fn advance<T: Transfer>(f: &mut InFlight<T>, res: i32) -> Step {
    if res < 0 {
        let e = std::io::Error::from_raw_os_error(-res);
        return Step::Done(Err(error_of(&mut f.req, &f.files, f.done, e)));
    }
    let n = res as usize;
    match f.req.op() {
        IoOp::Read { buf, .. } => {
            if n == 0 {
                // Past the end of a file that shrank underneath: zeros.
                let from = f.done.min(buf.len());
                buf[from..].fill(0);
                return Step::Done(Ok(()));
            }
            f.done += n;
            if f.done < buf.len() {
                Step::Again
            } else {
                Step::Done(Ok(()))
            }
        }
        IoOp::Write { data, .. } => {
            let len = data.len();
            if n == 0 {
                let e = std::io::ErrorKind::WriteZero.into();
                return Step::Done(Err(error_of(&mut f.req, &f.files, f.done, e)));
            }
            f.done += n;
            if f.done < len {
                Step::Again
            } else {
                Step::Done(Ok(()))
            }
        }
        IoOp::Flush => Step::Done(Ok(())),
    }
}

/// The block error of a request that failed after `done` bytes.
fn error_of<T: Transfer>(req: &mut T, files: &Files, done: usize, e: std::io::Error) -> BlockError {
    match req.op() {
        IoOp::Read { offset, .. } => files.error(ErrorKind::ReadFailed, "read", offset + done as u64, e),
        IoOp::Write { offset, .. } => files.error(ErrorKind::WriteFailed, "write", offset + done as u64, e),
        IoOp::Flush => files.error(ErrorKind::WriteFailed, "fdatasync", 0, e),
    }
}

fn len32(len: usize) -> u32 {
    // Requests are at most the largest transfer (512 KiB).
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn transient(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY))
}

/// An eventfd: written by wakers, polled by a ring or a worker's epoll.
pub(crate) struct EventFd(File);

impl EventFd {
    pub(crate) fn new() -> std::io::Result<EventFd> {
        // SAFETY: `eventfd` takes no pointers; the descriptor it returns is
        // new and owned by nothing else, so `OwnedFd` may take it.
        let fd = unsafe {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        Ok(EventFd(File::from(fd)))
    }

    /// Makes it readable.
    pub(crate) fn ring(&self) {
        // A full counter (never, at 2^64 - 2) is readable already.
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }

    /// Makes it unreadable again.
    pub(crate) fn reset(&self) {
        let mut count = [0u8; 8];
        // Nonblocking: nothing to read means nothing to reset.
        let _ = (&self.0).read(&mut count);
    }

    /// The descriptor, for `epoll`.
    pub(crate) fn raw(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Wake for EventFd {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ring();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::uring::FileBackend;
    use crate::backend::BlockIo;
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    struct Req {
        id: usize,
        offset: u64,
        buf: Vec<u8>,
        write: bool,
        flush: bool,
    }

    // SAFETY: `op` names `buf`'s heap memory, which nothing resizes while
    // the request lives.
    unsafe impl Transfer for Req {
        fn op(&mut self) -> IoOp<'_> {
            if self.flush {
                IoOp::Flush
            } else if self.write {
                IoOp::Write {
                    offset: self.offset,
                    data: &self.buf,
                    fua: false,
                }
            } else {
                IoOp::Read {
                    offset: self.offset,
                    buf: &mut self.buf,
                }
            }
        }
    }

    impl Req {
        fn write(id: usize, offset: u64, buf: Vec<u8>) -> Req {
            Req {
                id,
                offset,
                buf,
                write: true,
                flush: false,
            }
        }

        fn read(id: usize, offset: u64, len: usize) -> Req {
            Req {
                id,
                offset,
                buf: vec![0; len],
                write: false,
                flush: false,
            }
        }
    }

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("chanio-ring-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn drain(ring: &mut Ring<Req>, want: usize) -> Vec<(Req, Result<(), BlockError>)> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < want {
            assert!(Instant::now() < deadline, "requests never completed");
            ring.wait(Duration::from_millis(100)).unwrap();
            ring.reap(|r, res| out.push((r, res)));
        }
        out
    }

    #[test]
    fn many_requests_in_flight_each_with_its_own_result() {
        let path = temp("many");
        let backend = FileBackend::open(&path, Some(1 << 20), 512).unwrap();
        let files = backend.files().unwrap().clone();
        let mut ring = Ring::new(64).unwrap();
        for i in 0..64usize {
            assert!(ring
                .start(&files, Req::write(i, i as u64 * 4096, vec![i as u8; 4096]))
                .is_ok());
        }
        assert!(ring.is_full());
        let extra = Req {
            id: 99,
            offset: 0,
            buf: vec![],
            write: false,
            flush: true,
        };
        assert_eq!(
            ring.start(&files, extra).err().map(|r| r.id),
            Some(99),
            "full rings refuse"
        );
        assert_eq!(ring.in_flight(), 64);
        let done = drain(&mut ring, 64);
        assert!(done.iter().all(|(_, r)| r.is_ok()));
        for i in 0..64usize {
            assert!(ring.start(&files, Req::read(i, i as u64 * 4096, 4096)).is_ok());
        }
        for (req, res) in drain(&mut ring, 64) {
            res.unwrap();
            assert!(
                req.buf.iter().all(|&b| b == req.id as u8),
                "request {} read back",
                req.id
            );
        }
        drop(ring);
        drop(backend);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_failing_request_in_the_middle_of_a_batch_fails_alone() {
        let path = temp("mid");
        let backend = FileBackend::open(&path, Some(1 << 20), 512).unwrap();
        let good = backend.files().unwrap().clone();
        // The same file through a descriptor that cannot write.
        let read_only = Arc::new(Files::from_parts(&path, File::open(&path).unwrap(), None));
        let mut ring = Ring::new(8).unwrap();
        for i in 0..5usize {
            let req = Req::write(i, i as u64 * 512, vec![0xab; 512]);
            let files = if i == 2 { &read_only } else { &good };
            assert!(ring.start(files, req).is_ok());
        }
        let mut done = drain(&mut ring, 5);
        done.sort_by_key(|(r, _)| r.id);
        for (req, res) in &done {
            if req.id == 2 {
                let e = res.as_ref().expect_err("a read-only descriptor refuses the write");
                assert_eq!(e.kind(), ErrorKind::WriteFailed);
                assert_eq!(e.raw_os_error(), Some(libc::EBADF));
                assert!(e.to_string().contains("write at byte 1024"), "{e}");
            } else {
                assert!(res.is_ok(), "request {} kept its own result: {res:?}", req.id);
            }
        }
        let mut back = vec![0u8; 5 * 512];
        backend.read(0, &mut back).unwrap();
        assert!(back[..1024].iter().all(|&b| b == 0xab));
        assert!(
            back[1024..1536].iter().all(|&b| b == 0),
            "the failed write left nothing"
        );
        assert!(back[1536..].iter().all(|&b| b == 0xab));
        drop(ring);
        drop(backend);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn requests_complete_in_the_order_their_data_arrives() {
        // Two pipes stand in for a slow and a fast device: a read of the
        // first, started first, completes after a read of the second.
        let pipe = || {
            let mut fds = [0; 2];
            // SAFETY: `pipe` writes two new descriptors into `fds`, which
            // the files below then own alone.
            let (r, w) = unsafe {
                assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
                (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
            };
            (Arc::new(Files::from_parts(Path::new("pipe"), r, None)), w)
        };
        let (slow, mut slow_in) = pipe();
        let (fast, mut fast_in) = pipe();
        let mut ring = Ring::new(4).unwrap();
        let read = |id| Req::read(id, 0, 8);
        assert!(ring.start(&slow, read(1)).is_ok());
        assert!(ring.start(&fast, read(2)).is_ok());
        ring.submit().unwrap();
        fast_in.write_all(b"second!!").unwrap();
        let first = drain(&mut ring, 1);
        assert_eq!(first[0].0.id, 2, "the request whose data came first completed first");
        assert_eq!(&first[0].0.buf, b"second!!");
        // Half now, half later: a short read is resumed, not completed.
        slow_in.write_all(b"firs").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        ring.reap(|r, _| panic!("request {} completed short", r.id));
        slow_in.write_all(b"t!!!").unwrap();
        let second = drain(&mut ring, 1);
        assert_eq!(&second[0].0.buf, b"first!!!");
    }

    #[test]
    fn the_waker_ends_a_wait() {
        let mut ring: Ring<Req> = Ring::new(4).unwrap();
        let waker = ring.waker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.wake();
        });
        let start = Instant::now();
        ring.wait(Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5), "the wake ended the wait");
        t.join().unwrap();
        ring.reap(|_, _| panic!("no requests"));
        // The wake was consumed: the next wait runs to its timeout.
        let start = Instant::now();
        ring.wait(Duration::from_millis(100)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(90));
    }
}
