//! Run to completion for the software providers (tcp, shm): the thread that
//! waits for a completion makes the progress itself, so the completion
//! reaches it without a thread hop.
//!
//! Each queue pair keeps its receive-side state (`S`) behind one lock. A
//! caller in [`QueuePair::wait`](super::QueuePair::wait) takes the lock and
//! drives: it pumps (reads the transport, executes, publishes completions)
//! and, when nothing is there, sleeps in `poll(2)` on the transport's
//! descriptors itself. The fallback for when no caller drives (an
//! asynchronous application, a peer's traffic nobody waits for) is the
//! progress engine (`engine.rs`) on tcp and shm, the queue pair's own
//! thread on verbs: callers hold a short *lease* that keeps it aside, and
//! when it does pump it holds the lock only for a non-blocking round.
//!
//! ```text
//!  caller ── try_lock(state) ─▶ pump ─▶ completions? ── yes ─▶ return
//!                 │                          │ no
//!                 │ (another caller drives)  └─▶ poll(transport fds + kick)
//!                 └─▶ sleep on the completion queue
//!  fallback: aside while the lease lasts; otherwise pump, then sleep on
//!            the transport without holding the lock
//! ```
//!
//! [`Drive::interrupt`] makes a driving caller return early (the kick is a
//! byte on a socket pair that its `poll` includes; an interrupt just before
//! the caller starts driving is remembered).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::cq::CompletionQueue;
use super::engine::{EngineWaker, Next};
pub(crate) use crate::lease::Aside;
use crate::lease::Lease;

/// How long the fallback stays away after a caller drove.
pub(crate) const LEASE: Duration = Duration::from_millis(1);

/// The coordination state of a driven queue pair.
#[derive(Debug)]
pub(crate) struct Drive {
    /// Renewed by every caller drive: the fallback stays aside for
    /// as long as it moves within each `LEASE` (no clock read on the
    /// callers' path).
    lease: Lease,
    /// The fallback (engine or thread) holds the state lock (only for a
    /// non-blocking pump): a caller that wants to drive waits for it.
    thread_holds: AtomicBool,
    /// A caller holds the state lock and may sleep in `poll`.
    caller_drives: AtomicBool,
    /// An interrupt not yet seen by a driving caller.
    kick_pending: AtomicBool,
    kick: UnixStream,
    kicked: UnixStream,
    /// The progress engine's waker, when the engine is the fallback.
    engine: OnceLock<EngineWaker>,
    /// The engine found the state held by a caller, or went to sleep: the
    /// next caller to let go of the state wakes it.
    engine_waiting: AtomicBool,
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
            lease: Lease::new(LEASE, 5),
            thread_holds: AtomicBool::new(false),
            caller_drives: AtomicBool::new(false),
            kick_pending: AtomicBool::new(false),
            kick,
            kicked,
            engine: OnceLock::new(),
            engine_waiting: AtomicBool::new(false),
        })
    }

    /// Makes the progress engine the fallback: a caller that steps away,
    /// or lets go of the state the engine waits for, wakes it.
    pub(crate) fn attach_engine(&self, waker: EngineWaker) {
        let for_lease = waker.clone();
        self.lease.register_fallback_wake(Box::new(move || for_lease.wake()));
        let _ = self.engine.set(waker);
    }

    /// Wakes the engine if it waits for the state a caller just let go of.
    fn hand_back(&self) {
        if self.engine_waiting.swap(false, Ordering::SeqCst) {
            if let Some(w) = self.engine.get() {
                w.wake();
            }
        }
    }

    /// For the provider thread, once at its start: names the thread that
    /// [`Drive::step_away`] unparks.
    #[cfg(feature = "verbs")]
    pub(crate) fn register_thread(&self) {
        self.lease.register_fallback();
    }

    /// A caller stops driving and sleeps elsewhere: the fallback takes
    /// over now (see `QueuePair::step_away`).
    pub(crate) fn step_away(&self) {
        self.lease.step_away();
    }

    /// Counts the caller as driving: the fallback stays aside. For
    /// a provider whose `poll` reaps the transport itself (verbs), a
    /// polling caller counts too.
    pub(crate) fn renew_lease(&self) {
        self.lease.renew();
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
    /// given time. A zero timeout is one non-blocking round: on both
    /// providers a pump that finds nothing costs no more than a look would
    /// (one `readv` on tcp, one slot's first word on shm), so there is no
    /// separate look first.
    pub(crate) fn drive<S>(
        &self,
        state: &Mutex<S>,
        cq: &CompletionQueue,
        timeout: Option<Duration>,
        mut pump: impl FnMut(&mut S) -> bool,
        mut sleep: impl FnMut(&mut S, Option<Duration>) -> Woke,
    ) -> bool {
        if timeout == Some(Duration::ZERO) {
            // One non-blocking round (a spinning waiter): no clock reads.
            // The spinner counts as driving (the fallback stays
            // aside).
            self.renew_lease();
            let held = state.try_lock().map(|mut guard| pump(&mut guard)).is_some();
            if held {
                self.hand_back();
            }
            return cq.has_completions();
        }
        let deadline = timeout.map(|t| Instant::now() + t);
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
        drop(guard);
        self.hand_back();
        ready
    }

    /// For the provider thread: parks and returns true while callers drove
    /// since the thread last looked. The park grows from `LEASE` to
    /// 32 x `LEASE` while callers keep driving, so a busy channel's thread
    /// wakes rarely (each wake-up may preempt a spinning caller). A caller
    /// that stepped away since ends the park and the standing aside.
    #[cfg(feature = "verbs")]
    pub(crate) fn thread_stands_aside(&self, failed: &AtomicBool, aside: &mut Aside) -> bool {
        self.lease.stands_aside(aside, failed.load(Ordering::Acquire), || {})
    }
}

impl Drive {
    /// For the progress engine: one non-blocking round under the state
    /// lock, unless callers drive (then what the engine does instead). A
    /// failed queue pair is never left to callers: its round flushes it.
    pub(crate) fn engine_round<S, T>(
        &self,
        state: &Mutex<S>,
        failed: &AtomicBool,
        aside: &mut Aside,
        round: impl FnOnce(&mut S) -> T,
    ) -> Result<T, Next> {
        let stop = failed.load(Ordering::Acquire);
        if let Some(park) = self.lease.park_for(aside, stop) {
            return Err(Next::Park(park));
        }
        // Announced before the attempt, so that a caller letting go just
        // after it failed sees the announcement.
        self.engine_waiting.store(true, Ordering::SeqCst);
        let Some(mut guard) = state.try_lock() else {
            return Err(Next::CallerHolds);
        };
        self.engine_waiting.store(false, Ordering::SeqCst);
        if self.lease.callers_active(aside.seen()) && !failed.load(Ordering::Acquire) {
            return Err(Next::Again);
        }
        self.thread_holds.store(true, Ordering::Release);
        let out = round(&mut guard);
        self.thread_holds.store(false, Ordering::Release);
        // The engine may go to sleep on the descriptors now: a caller that
        // drives after this takes what they announce, and may leave work
        // that waits for a quiet moment (an acknowledgement due), so the
        // first caller to let go wakes the engine for one more look.
        self.engine_waiting.store(true, Ordering::SeqCst);
        Ok(out)
    }

    /// For the progress engine: runs `f` under the state lock if nobody
    /// holds it (a caller that comes meanwhile waits for the engine, not
    /// for another caller).
    pub(crate) fn engine_try<S, T>(&self, state: &Mutex<S>, f: impl FnOnce(&mut S) -> T) -> Option<T> {
        let mut guard = state.try_lock()?;
        self.thread_holds.store(true, Ordering::Release);
        let out = f(&mut guard);
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
