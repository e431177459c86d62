//! Runtime-free async plumbing: a `block_on` whose thread does the work its
//! future waits for (run to completion), one timer thread per host that
//! wakes futures at deadlines, an async lock and `join_all`. The blocking
//! API is `block_on` over the async one.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{JoinHandle, Thread};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use slab::Slab;

/// Work a thread blocked in [`block_on`] can do for the future it waits on:
/// reaping the queue whose completion the future awaits, so that the
/// completion reaches the waiting thread without a hop through another.
pub(crate) trait Helper: Send + Sync {
    /// Does that work until `woken` is set (or gives up and sleeps briefly).
    fn help(&self, woken: &AtomicBool);

    /// Runs `f` with this helper's posting held back, so that what `f`
    /// submits goes out as one batch.
    fn corked(&self, f: &mut dyn FnMut());
}

thread_local! {
    /// Whether this thread is inside `block_on` (only then is help taken).
    static IN_BLOCK_ON: Cell<bool> = const { Cell::new(false) };
    /// The help offered by the future `block_on` polled last.
    static OFFERED: RefCell<Option<Arc<dyn Helper>>> = const { RefCell::new(None) };
    /// This thread's waker for `block_on`, kept for the next call (a
    /// blocking I/O allocates nothing).
    static UNPARK: RefCell<Option<Arc<Unpark>>> = const { RefCell::new(None) };
}

/// Wakes the thread blocked in [`block_on`].
struct Unpark {
    thread: Thread,
    woken: AtomicBool,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Called by a future about to return `Pending`: if it runs under
/// [`block_on`], the blocked thread will do `helper`'s work instead of
/// sleeping. Many futures of one `join_all` offer the same helper in a
/// round: a repeat offer costs a pointer comparison.
pub(crate) fn offer_help<H: Helper + 'static>(helper: &Weak<H>) {
    if !IN_BLOCK_ON.get() {
        return;
    }
    let repeat = OFFERED.with_borrow(|offered| {
        offered
            .as_ref()
            .is_some_and(|h| std::ptr::addr_eq(Arc::as_ptr(h), helper.as_ptr()))
    });
    if !repeat {
        if let Some(h) = helper.upgrade() {
            OFFERED.set(Some(h));
        }
    }
}

/// Runs a future to completion on the calling thread. Between polls the
/// thread does the work the future offered (see [`offer_help`]) or parks.
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    // The last call's waker, unless a clone of it is still registered
    // somewhere (it would set `woken` for the wrong wait).
    let unpark = UNPARK.take().filter(|u| Arc::strong_count(u) == 1).unwrap_or_else(|| {
        Arc::new(Unpark {
            thread: std::thread::current(),
            woken: AtomicBool::new(false),
        })
    });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let outer = IN_BLOCK_ON.replace(true);
    let mut helper: Option<Arc<dyn Helper>> = None;
    let result = loop {
        unpark.woken.store(false, Ordering::Release);
        let mut ready = None;
        let mut poll = || {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                ready = Some(v);
            }
        };
        match &helper {
            Some(h) => h.corked(&mut poll),
            None => poll(),
        }
        if let Some(v) = ready {
            break v;
        }
        if unpark.woken.load(Ordering::Acquire) {
            continue;
        }
        helper = OFFERED.take();
        match &helper {
            Some(h) => h.help(&unpark.woken),
            None => std::thread::park(),
        }
    };
    IN_BLOCK_ON.set(outer);
    OFFERED.set(None);
    drop(waker);
    UNPARK.set(Some(unpark));
    result
}

/// Wakes registered wakers at their deadlines, from one thread.
#[derive(Debug)]
pub(crate) struct Timer {
    shared: Arc<TimerShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct TimerShared {
    state: Mutex<TimerState>,
    cv: Condvar,
    /// Set by [`Timer::stop`], under `state`'s lock (so a registration made
    /// under it sees it, or is taken by `stop`), before the final sweep; a
    /// command's wait looks at it on every poll, without the lock.
    stopped: AtomicBool,
}

#[derive(Debug, Default)]
struct TimerState {
    /// Pending deadlines. An entry leaves when its deadline passes or when
    /// its [`TimerEntry`] is dropped, so a finished wait neither piles up
    /// here nor keeps its task alive through the waker. A slab, not an
    /// ordered map: registering and cancelling a command's deadline (the
    /// common case: it finishes long before) allocates nothing, and the
    /// thread scans the few entries when it wakes (at most every
    /// `TIMER_PERIOD`, or at the earliest deadline).
    entries: Slab<Pending>,
    seq: u64,
    /// When the timer thread wakes next on its own (it never sleeps longer
    /// than `TIMER_PERIOD`): a deadline after that needs no wake-up call,
    /// so registering a command's far-off deadline costs no thread switch.
    wakes_at: Option<Instant>,
    /// Wake-up calls made (for tests).
    notifies: u64,
    /// Looked at on every wake of the thread (see [`Sweep`]); dead ones
    /// are dropped there.
    sweepers: Vec<Weak<dyn Sweep>>,
}

/// Deadlines kept by their owner instead of one timer entry each: the
/// timer thread calls `sweep` whenever it wakes (at least every
/// `TIMER_PERIOD`, 100 ms), and the owner wakes whatever is due. A queue
/// keeps its commands' deadlines this way, so that no command registers or
/// cancels a timer entry (two locks and a waker, on the path of every
/// capsule) for a deadline that almost never passes; the price is that a
/// command times out up to one period late. (The cost it saves is in
/// `docs/performance.md`.)
pub(crate) trait Sweep: Send + Sync {
    /// Wakes everything due at `now`; `None`: everything with a deadline
    /// (the timer stopped, and its waiters treat that as their deadline,
    /// as [`deadline`] does).
    fn sweep(&self, now: Option<Instant>);
}

/// Longest sleep of the timer thread.
const TIMER_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// One registered wake-up; `seq` tells it from a later entry that reuses
/// its slab key.
#[derive(Debug)]
struct Pending {
    at: Instant,
    seq: u64,
    waker: Waker,
}

/// A registered wake-up; dropping it cancels the wake-up.
#[derive(Debug)]
#[must_use = "dropping the entry cancels the wake-up"]
pub(crate) struct TimerEntry<'a> {
    timer: &'a Timer,
    key: usize,
    seq: u64,
}

impl Drop for TimerEntry<'_> {
    fn drop(&mut self) {
        let pending = {
            let mut st = self.timer.shared.state.lock();
            match st.entries.get(self.key) {
                Some(p) if p.seq == self.seq => Some(st.entries.remove(self.key)),
                // Already due and woken; the key may be someone else's now.
                _ => None,
            }
        };
        // Dropped outside the lock: a waker's drop may run arbitrary code.
        drop(pending);
    }
}

impl Timer {
    /// Starts the timer thread.
    pub(crate) fn start() -> std::io::Result<Timer> {
        let shared = Arc::new(TimerShared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("chanio-host-timer".into())
                .spawn(move || shared.run())?
        };
        Ok(Timer {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Wakes `waker` once `at` has passed, unless the returned entry is
    /// dropped first. Returns `None`, registering nothing, once the timer is
    /// stopped: callers then treat the deadline as reached rather than wait
    /// for a wake that never comes.
    pub(crate) fn wake_at(&self, at: Instant, waker: &Waker) -> Option<TimerEntry<'_>> {
        let mut st = self.shared.state.lock();
        if self.is_stopped() {
            return None;
        }
        st.seq += 1;
        let seq = st.seq;
        let sooner = st.wakes_at.is_none_or(|w| at < w);
        let key = st.entries.insert(Pending {
            at,
            seq,
            waker: waker.clone(),
        });
        if sooner {
            st.notifies += 1;
            self.shared.cv.notify_one();
        }
        Some(TimerEntry { timer: self, key, seq })
    }

    /// Calls `sweeper` on every wake of the timer thread until it is
    /// dropped, and once more when the timer stops. False, registering
    /// nothing, once the timer is stopped.
    #[must_use = "a sweeper the stopped timer refused is never called"]
    pub(crate) fn watch(&self, sweeper: Weak<dyn Sweep>) -> bool {
        let mut st = self.shared.state.lock();
        if self.is_stopped() {
            return false;
        }
        st.sweepers.push(sweeper);
        true
    }

    /// Whether [`Timer::stop`] ran: it woke every registered wake-up, and
    /// no later one will come.
    pub(crate) fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// Wake-ups registered and not yet due or cancelled.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.shared.state.lock().entries.len()
    }

    /// A future that is ready once `at` has passed.
    pub(crate) fn sleep_until(&self, at: Instant) -> Sleep<'_> {
        Sleep {
            timer: self,
            at,
            entry: None,
        }
    }

    /// Stops the thread, waking everything still registered.
    pub(crate) fn stop(&self) {
        let (entries, sweepers) = {
            let mut st = self.shared.state.lock();
            self.shared.stopped.store(true, Ordering::SeqCst);
            self.shared.cv.notify_one();
            (std::mem::take(&mut st.entries), std::mem::take(&mut st.sweepers))
        };
        for (_, pending) in entries {
            pending.waker.wake();
        }
        for sweeper in sweepers.iter().filter_map(Weak::upgrade) {
            sweeper.sweep(None);
        }
        if let Some(t) = self.thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl TimerShared {
    fn run(&self) {
        let mut st = self.state.lock();
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            st.sweepers.retain(|s| s.strong_count() > 0);
            let sweepers: Vec<Arc<dyn Sweep>> = st.sweepers.iter().filter_map(Weak::upgrade).collect();
            if !sweepers.is_empty() {
                // Outside the lock: a sweep takes its owner's locks and wakes tasks.
                drop(st);
                sweepers.iter().for_each(|s| s.sweep(Some(now)));
                drop(sweepers);
                st = self.state.lock();
                if self.stopped.load(Ordering::SeqCst) {
                    return;
                }
            }
            let mut until = now + TIMER_PERIOD;
            let mut due = Vec::new();
            for (key, p) in &st.entries {
                if p.at <= now {
                    due.push(key);
                } else {
                    until = until.min(p.at);
                }
            }
            if !due.is_empty() {
                let wakers: Vec<Waker> = due.into_iter().map(|k| st.entries.remove(k).waker).collect();
                drop(st);
                wakers.into_iter().for_each(Waker::wake);
                st = self.state.lock();
                continue;
            }
            st.wakes_at = Some(until);
            self.cv.wait_until(&mut st, until);
            st.wakes_at = None;
        }
    }
}

/// See [`Timer::sleep_until`].
#[derive(Debug)]
pub(crate) struct Sleep<'a> {
    timer: &'a Timer,
    at: Instant,
    entry: Option<TimerEntry<'a>>,
}

impl Future for Sleep<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            self.entry = None;
            return Poll::Ready(());
        }
        if self.entry.is_none() {
            match self.timer.wake_at(self.at, cx.waker()) {
                Some(e) => self.entry = Some(e),
                None => return Poll::Ready(()),
            }
        } else if self.timer.is_stopped() {
            // Woken by `stop`: no later wake-up will come.
            self.entry = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Polls `fut` until it finishes or `at` passes (`None`): the timer wakes
/// the task at the deadline.
pub(crate) async fn deadline<F: Future>(timer: &Timer, at: Option<Instant>, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    // Dropped when the wait ends, however it ends: the timer forgets it.
    let mut entry: Option<TimerEntry<'_>> = None;
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            entry = None;
            return Poll::Ready(Some(v));
        }
        let Some(at) = at else {
            return Poll::Pending;
        };
        if entry.is_none() {
            // The first wait only registers: the timer wakes this future
            // at `at` (at once if that has passed), and the clock is read
            // when it does, not on every command that waits.
            match timer.wake_at(at, cx.waker()) {
                Some(e) => entry = Some(e),
                None => return Poll::Ready(None),
            }
            return Poll::Pending;
        }
        // Due, or woken by a timer that stopped (no later wake-up comes).
        if Instant::now() >= at || timer.is_stopped() {
            entry = None;
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// A lock held across await points (the per-queue submit lock: a capsule
/// and its data pushes must not interleave with another command's).
#[derive(Debug, Default)]
pub(crate) struct AsyncLock {
    state: Mutex<LockState>,
}

#[derive(Debug, Default)]
struct LockState {
    locked: bool,
    waiters: Vec<Waker>,
}

impl AsyncLock {
    /// Waits for the lock.
    pub(crate) fn lock(&self) -> impl Future<Output = AsyncLockGuard<'_>> {
        std::future::poll_fn(move |cx| {
            let mut st = self.state.lock();
            if st.locked {
                if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    st.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            } else {
                st.locked = true;
                Poll::Ready(AsyncLockGuard { lock: self })
            }
        })
    }
}

/// Holds an [`AsyncLock`]; dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct AsyncLockGuard<'a> {
    lock: &'a AsyncLock,
}

impl Drop for AsyncLockGuard<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut st = self.lock.state.lock();
            st.locked = false;
            std::mem::take(&mut st.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }
}

/// Runs futures concurrently; outputs in input order. Each future gets its
/// own waker, so a wake-up polls only the future it concerns (a bench with
/// hundreds of commands in flight costs the same per completion as one).
pub(crate) async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    struct Shared {
        woken: Vec<AtomicBool>,
        /// Whether the parent was woken since its last poll began: the
        /// completions of one reap wake it once, not once each.
        notified: AtomicBool,
        parent: Mutex<Option<Waker>>,
    }
    struct Child {
        shared: Arc<Shared>,
        index: usize,
    }
    impl Wake for Child {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            // Set before `notified` is read: a poll that cleared `notified`
            // then scans `woken`, so either that scan sees this flag or this
            // wake sees `notified` clear and wakes the parent.
            self.shared.woken[self.index].store(true, Ordering::SeqCst);
            if self.shared.notified.swap(true, Ordering::SeqCst) {
                return;
            }
            let parent = self.shared.parent.lock().clone();
            if let Some(w) = parent {
                w.wake();
            }
        }
    }
    let shared = Arc::new(Shared {
        // Everything is polled once at first.
        woken: futs.iter().map(|_| AtomicBool::new(true)).collect(),
        notified: AtomicBool::new(false),
        parent: Mutex::new(None),
    });
    let wakers: Vec<Waker> = (0..futs.len())
        .map(|index| {
            Waker::from(Arc::new(Child {
                shared: shared.clone(),
                index,
            }))
        })
        .collect();
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    let mut left = futs.len();
    std::future::poll_fn(move |cx| {
        {
            let mut parent = shared.parent.lock();
            if !parent.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *parent = Some(cx.waker().clone());
            }
        }
        shared.notified.store(false, Ordering::SeqCst);
        for (i, (f, o)) in futs.iter_mut().zip(out.iter_mut()).enumerate() {
            if o.is_none() && shared.woken[i].swap(false, Ordering::SeqCst) {
                if let Poll::Ready(v) = f.as_mut().poll(&mut Context::from_waker(&wakers[i])) {
                    *o = Some(v);
                    left -= 1;
                }
            }
        }
        if left > 0 {
            Poll::Pending
        } else {
            Poll::Ready(out.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}

#[cfg(feature = "nbd")]
mod tasks;
#[cfg(feature = "nbd")]
pub(crate) use tasks::{task_set, Spawner};

#[cfg(test)]
mod tests;
