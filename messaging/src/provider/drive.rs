//! Run to completion for the software providers (tcp, shm): the thread that
//! waits for a completion makes the progress itself, so the completion
//! reaches it without a thread hop.
//!
//! Each queue pair keeps its receive-side state (`S`) behind one lock. A
//! caller in [`QueuePair::wait`](super::QueuePair::wait) takes the lock and
//! drives: it pumps (reads the transport, executes, publishes completions)
//! and, when nothing is there, sleeps in `poll(2)` on the transport's
//! descriptors itself. The provider's own thread is only the fallback for
//! when no caller drives (an asynchronous application, a peer's traffic
//! nobody waits for): callers hold a short *lease* that keeps it parked, and
//! when it does pump it holds the lock only for a non-blocking round.
//!
//! ```text
//!  caller ── try_lock(state) ─▶ pump ─▶ completions? ── yes ─▶ return
//!                 │                          │ no
//!                 │ (another caller drives)  └─▶ poll(transport fds + kick)
//!                 └─▶ sleep on the completion queue
//!  provider thread: parked while the lease lasts; otherwise pump, then
//!                   sleep on the transport without holding the lock
//! ```
//!
//! [`Drive::interrupt`] makes a driving caller return early (the kick is a
//! byte on a socket pair that its `poll` includes; an interrupt just before
//! the caller starts driving is remembered).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::cq::CompletionQueue;

/// How long a caller's drive keeps the provider thread away.
pub(crate) const LEASE: Duration = Duration::from_millis(1);

/// The coordination state of a driven queue pair.
#[derive(Debug)]
pub(crate) struct Drive {
    /// Callers drive until this instant (ns since `epoch`).
    lease: AtomicU64,
    epoch: Instant,
    /// The provider thread holds the state lock (only for a non-blocking
    /// pump): a caller that wants to drive waits for it.
    thread_holds: AtomicBool,
    /// A caller holds the state lock and may sleep in `poll`.
    caller_drives: AtomicBool,
    /// An interrupt not yet seen by a driving caller.
    kick_pending: AtomicBool,
    kick: UnixStream,
    kicked: UnixStream,
}

/// What a caller's blocking sleep reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woke {
    /// A transport descriptor is ready (or the wait was cut short).
    Ready,
    /// [`Drive::interrupt`] was called.
    Kicked,
    /// The timeout passed.
    TimedOut,
}

impl Drive {
    pub(crate) fn new() -> io::Result<Drive> {
        let (kick, kicked) = UnixStream::pair()?;
        kick.set_nonblocking(true)?;
        kicked.set_nonblocking(true)?;
        Ok(Drive {
            lease: AtomicU64::new(0),
            epoch: Instant::now(),
            thread_holds: AtomicBool::new(false),
            caller_drives: AtomicBool::new(false),
            kick_pending: AtomicBool::new(false),
            kick,
            kicked,
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn renew_lease(&self) {
        let until = self.now_ns().saturating_add(LEASE.as_nanos() as u64);
        self.lease.store(until, Ordering::Release);
    }

    /// Time left on the callers' lease.
    pub(crate) fn lease_left(&self) -> Option<Duration> {
        let (until, now) = (self.lease.load(Ordering::Acquire), self.now_ns());
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Makes a driving caller return (or the next one, if it comes just after).
    pub(crate) fn interrupt(&self) {
        self.kick_pending.store(true, Ordering::SeqCst);
        if self.caller_drives.load(Ordering::SeqCst) {
            let _ = (&self.kick).write(&[1]);
        }
    }

    /// The descriptor a driving caller's `poll` includes.
    pub(crate) fn kick_fd(&self) -> RawFd {
        self.kicked.as_raw_fd()
    }

    fn drain_kick(&self) {
        let mut sink = [0u8; 64];
        while matches!((&self.kicked).read(&mut sink), Ok(n) if n > 0) {}
        self.kick_pending.store(false, Ordering::SeqCst);
    }

    /// The caller side of `QueuePair::wait`: drives until a completion is
    /// ready, `deadline` passes or an interrupt; returns whether a
    /// completion is ready. `pump` does one non-blocking round (false once
    /// the queue pair failed and everything was flushed); `sleep` blocks in
    /// `poll` on the transport and the kick descriptor for at most the
    /// given time.
    pub(crate) fn drive<S>(
        &self,
        state: &Mutex<S>,
        cq: &CompletionQueue,
        deadline: Option<Instant>,
        mut pump: impl FnMut(&mut S) -> bool,
        mut sleep: impl FnMut(&mut S, Option<Duration>) -> Woke,
    ) -> bool {
        let mut guard: MutexGuard<'_, S> = match state.try_lock() {
            Some(g) => g,
            None if self.thread_holds.load(Ordering::Acquire) => state.lock(),
            // Another caller drives: its completions wake us.
            None => return cq.wait(deadline.map(|d| d.saturating_duration_since(Instant::now()))),
        };
        self.renew_lease();
        self.caller_drives.store(true, Ordering::SeqCst);
        let ready = loop {
            let alive = pump(&mut guard);
            if !alive || cq.has_completions() || self.kick_pending.swap(false, Ordering::SeqCst) {
                break cq.has_completions();
            }
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if timeout == Some(Duration::ZERO) {
                break false;
            }
            let woke = sleep(&mut guard, timeout);
            self.renew_lease();
            match woke {
                Woke::Ready => {}
                Woke::Kicked => {
                    self.drain_kick();
                    pump(&mut guard);
                    break cq.has_completions();
                }
                Woke::TimedOut => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        pump(&mut guard);
                        break cq.has_completions();
                    }
                }
            }
        };
        self.caller_drives.store(false, Ordering::SeqCst);
        self.renew_lease();
        ready
    }

    /// For the provider thread: whether it should stay parked (and for how
    /// long) because callers drive.
    pub(crate) fn thread_should_wait(&self, failed: bool) -> Option<Duration> {
        if failed {
            None
        } else {
            self.lease_left()
        }
    }

    /// For the provider thread: one non-blocking round under the state
    /// lock, unless callers took over meanwhile (then `None`).
    pub(crate) fn thread_round<S, T>(
        &self,
        state: &Mutex<S>,
        failed: &AtomicBool,
        round: impl FnOnce(&mut S) -> T,
    ) -> Option<T> {
        // Blocks (without spinning) while a caller drives.
        let mut guard = state.lock();
        if self.thread_should_wait(failed.load(Ordering::Acquire)).is_some() {
            return None;
        }
        self.thread_holds.store(true, Ordering::Release);
        let out = round(&mut guard);
        self.thread_holds.store(false, Ordering::Release);
        Some(out)
    }
}

/// `poll(2)` over `fds` for at most `timeout` (rounded up to whole
/// milliseconds, so a short timeout never becomes a busy loop); `Ok(false)`
/// when it timed out.
pub(crate) fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<bool> {
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `fds` is a valid, initialised slice of pollfd structures that
    // lives across the call; poll writes only their `revents` fields.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(true)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// A `pollfd` waiting for `events` on `fd`.
pub(crate) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}
