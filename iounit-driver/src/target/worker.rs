//! The workers: a fixed set of threads (by default one per CPU), each
//! serving many queues, as SPDK's poll groups do. A queue belongs to one
//! worker from its Connect to its end.
//!
//! A worker runs its queues to completion: it takes what a queue's host
//! sent by driving the queue's channel itself (`Queue::run`), so a
//! capsule reaches it without a thread hop. After a turn that did work it
//! keeps polling its busy queues for `SPIN` (a host at queue depth 1
//! sends its next command within it), then sleeps: each busy queue
//! registers its waker with its channel and hands the channel's progress
//! to the fabric's fallback (the progress engine), and the worker waits
//! in one `epoll` for its eventfd (which those wakers and new queues
//! write) and its queues' io_urings (readable when storage requests
//! completed).
//!
//! ```text
//!  new queue / waker ─▶ eventfd ─┐
//!  io_uring completions ─────────┼─▶ epoll_wait ─▶ run the queues that are ready
//!  TICK (keep-alive, shutdown) ──┘        ▲              │ worked: poll busy ones for SPIN
//!                                         └── register wakers, step away ◀─┘
//! ```

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use messaging::Endpoint;
use parking_lot::Mutex;
use slab::Slab;

use super::queue::{Admitted, Queue, Stop, TICK};
use super::Shared;
use crate::backend::ring::EventFd;

/// The longest a worker keeps polling its busy queues after the last work.
const SPIN: Duration = Duration::from_micros(50);
/// The shortest: a worker whose spins keep finding nothing polls this long,
/// enough to notice when the traffic becomes dense again.
const MIN_SPIN: Duration = Duration::from_micros(2);
/// The `epoll` data of the worker's eventfd.
const WAKE_TOKEN: u64 = u64::MAX;

/// What other threads tell a worker.
#[derive(Default)]
struct Inbox {
    arrived: Vec<(Endpoint, Admitted)>,
    /// Keys of queues whose waker fired.
    ready: Vec<usize>,
    /// The channel the worker sleeps in, when it sleeps in one (its only
    /// busy queue's): whoever wakes the worker wakes that wait too.
    sleeping_in: Option<Endpoint>,
}

/// A worker as other threads see it.
struct Handle {
    inbox: Mutex<Inbox>,
    /// Set with every write to the inbox, cleared when the worker takes
    /// it: the worker polling its queues looks here, not at the lock.
    news: AtomicBool,
    wake: EventFd,
}

impl Handle {
    /// Writes the inbox and wakes the worker, wherever it sleeps: one
    /// hold of the lock for both.
    fn tell(&self, write: impl FnOnce(&mut Inbox)) {
        let sleeping_in = {
            let mut inbox = self.inbox.lock();
            write(&mut inbox);
            self.news.store(true, Ordering::Release);
            inbox.sleeping_in.clone()
        };
        self.wake.ring();
        if let Some(ep) = sleeping_in {
            ep.wake_waiters();
        }
    }
}

/// A queue's waker: marks it ready and wakes its worker.
struct QueueWake {
    handle: Arc<Handle>,
    key: usize,
}

impl Wake for QueueWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.handle.tell(|inbox| inbox.ready.push(self.key));
    }
}

/// The target's workers.
pub(crate) struct Workers {
    handles: Vec<Arc<Handle>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` workers (at least one).
    pub(crate) fn start(shared: &Arc<Shared>, n: usize) -> io::Result<(Workers, Vec<JoinHandle<()>>)> {
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let handle = Arc::new(Handle {
                inbox: Mutex::new(Inbox::default()),
                news: AtomicBool::new(false),
                wake: EventFd::new()?,
            });
            let mut worker = Worker::new(shared.clone(), handle.clone())?;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("iounit-worker-{i}"))
                    .spawn(move || worker.run())?,
            );
            handles.push(handle);
        }
        Ok((
            Workers {
                handles,
                next: AtomicUsize::new(0),
            },
            threads,
        ))
    }

    /// Hands an admitted queue to the next worker (round robin).
    pub(crate) fn assign(&self, ep: Endpoint, admitted: Admitted) {
        let h = &self.handles[self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()];
        h.tell(|inbox| inbox.arrived.push((ep, admitted)));
    }

    /// Wakes every worker (to see a shutdown at once).
    pub(crate) fn wake_all(&self) {
        for h in &self.handles {
            h.tell(|_| {});
        }
    }
}

/// One served queue.
struct Served {
    queue: Queue,
    waker: Waker,
    /// The queue's io_uring descriptor, once it is in the worker's epoll.
    ring_fd: Option<RawFd>,
}

/// A worker thread's own state.
struct Worker {
    shared: Arc<Shared>,
    handle: Arc<Handle>,
    epoll: OwnedFd,
    queues: Slab<Served>,
    /// Queues that did work lately: polled while the worker spins.
    busy: HashSet<usize>,
    /// Queues with storage requests on their io_uring.
    ringing: HashSet<usize>,
    /// Queues run since the worker last slept, whose wakers are not
    /// registered: registered (and their channels handed to the fallback)
    /// before it sleeps.
    unarmed: HashSet<usize>,
    run: Vec<usize>,
    /// Reused lists, so that serving a command allocates nothing.
    keys: Vec<usize>,
    arrived: Vec<(Endpoint, Admitted)>,
    ready: Vec<usize>,
    /// How long the next spin polls after the last work: doubled (up to
    /// [`SPIN`]) by a spin that caught new work after going idle, halved
    /// (down to [`MIN_SPIN`]) by one that caught none. Hosts that answer
    /// within microseconds keep the whole spin; sparse traffic gives the
    /// CPU back to other processes instead of polling for nothing.
    spin_budget: Duration,
}

impl Worker {
    fn new(shared: Arc<Shared>, handle: Arc<Handle>) -> io::Result<Worker> {
        // SAFETY: a plain system call; the descriptor is checked and then
        // owned by one `OwnedFd`.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epoll` is a new descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let w = Worker {
            shared,
            handle,
            epoll,
            queues: Slab::new(),
            busy: HashSet::new(),
            ringing: HashSet::new(),
            unarmed: HashSet::new(),
            run: Vec::new(),
            keys: Vec::new(),
            arrived: Vec::new(),
            ready: Vec::new(),
            spin_budget: SPIN,
        };
        w.watch(libc::EPOLL_CTL_ADD, w.handle.wake.raw(), WAKE_TOKEN)?;
        Ok(w)
    }

    fn watch(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is valid for the call; both descriptors are open
        // (a queue's ring lives until it is unwatched).
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn run(&mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut next_tick = Instant::now() + TICK;
        loop {
            self.take_inbox();
            self.turn();
            if !self.busy.is_empty() {
                self.spin();
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                self.tick();
                // After the lobby stopped no queue can arrive any more.
                if self.shared.shutdown.load(Ordering::Acquire) && self.queues.is_empty() && self.shared.lobby.stopped()
                {
                    self.refuse_arrivals();
                    return;
                }
            }
            // One busy queue and no storage in flight: the worker sleeps in
            // that queue's channel, which it drives itself (a capsule then
            // reaches it with one wake-up, not through the fallback).
            let hot = match (self.busy.len(), self.ringing.is_empty()) {
                (1, true) => self.busy.iter().next().copied(),
                _ => None,
            };
            if self.prepare_sleep(hot) {
                continue;
            }
            let left = next_tick.saturating_duration_since(Instant::now());
            let slept = Instant::now();
            if let Some(key) = hot {
                self.sleep_in(key, left);
                self.woke_after(slept.elapsed());
                continue;
            }
            let ms = libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
            // SAFETY: `events` is a live buffer of `events.len()` entries
            // that the kernel fills; the epoll descriptor is open.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    ms,
                )
            };
            self.woke_after(slept.elapsed());
            for ev in &events[..usize::try_from(n).unwrap_or(0)] {
                match ev.u64 {
                    WAKE_TOKEN => self.handle.wake.reset(),
                    key => self.run.push(key as usize),
                }
            }
        }
    }

    /// Takes the new queues and the woken ones.
    fn take_inbox(&mut self) {
        {
            // Swapped with the worker's own lists: both keep their capacity.
            let mut inbox = self.handle.inbox.lock();
            self.handle.news.store(false, Ordering::Release);
            std::mem::swap(&mut inbox.arrived, &mut self.arrived);
            std::mem::swap(&mut inbox.ready, &mut self.ready);
        }
        self.run.append(&mut self.ready);
        let mut arrived = std::mem::take(&mut self.arrived);
        for (ep, admitted) in arrived.drain(..) {
            let Some(mut queue) = Queue::open(&self.shared, ep, admitted) else {
                continue;
            };
            let entry = self.queues.vacant_entry();
            let key = entry.key();
            let waker = Waker::from(Arc::new(QueueWake {
                handle: self.handle.clone(),
                key,
            }));
            queue.set_waker(waker.clone());
            entry.insert(Served {
                queue,
                waker,
                ring_fd: None,
            });
            self.run.push(key);
        }
        self.arrived = arrived;
    }

    /// Runs every queue on the run list once.
    fn turn(&mut self) {
        let mut run = std::mem::take(&mut self.run);
        run.sort_unstable();
        run.dedup();
        for key in run.drain(..) {
            self.run_one(key);
        }
        self.run = run;
    }

    /// One turn of the queue at `key`; returns whether it did work.
    fn run_one(&mut self, key: usize) -> bool {
        let Some(s) = self.queues.get_mut(key) else {
            return false;
        };
        self.unarmed.insert(key);
        match s.queue.run() {
            Ok(worked) => {
                let ring_busy = s.queue.ring_busy();
                if worked || ring_busy {
                    self.busy.insert(key);
                }
                if ring_busy {
                    self.ringing.insert(key);
                } else {
                    self.ringing.remove(&key);
                }
                self.watch_ring(key);
                worked
            }
            Err(stop) => {
                self.end(key, &stop);
                false
            }
        }
    }

    /// Puts a queue's new io_uring into the epoll.
    fn watch_ring(&mut self, key: usize) {
        let Some(s) = self.queues.get(key) else {
            return;
        };
        if s.ring_fd.is_some() {
            return;
        }
        if let Some(fd) = s.queue.ring_fd() {
            match self.watch(libc::EPOLL_CTL_ADD, fd, key as u64) {
                Ok(()) => {
                    if let Some(s) = self.queues.get_mut(key) {
                        s.ring_fd = Some(fd);
                    }
                }
                Err(e) => tracing::warn!("cannot watch a queue's io_uring: {e}"),
            }
        }
    }

    /// Polls the busy queues until none did work for the spin budget, and
    /// adapts the budget to what the spin caught.
    fn spin(&mut self) {
        let mut last_work = Instant::now();
        let mut keys = std::mem::take(&mut self.keys);
        let (mut idle, mut caught, mut ended) = (false, false, false);
        while last_work.elapsed() < self.spin_budget {
            keys.clear();
            keys.extend(self.busy.iter().copied());
            let mut any = false;
            for &key in &keys {
                any |= self.run_one(key);
            }
            // New queues and woken ones are served within the spin too.
            if self.has_inbox() {
                self.take_inbox();
                self.turn();
                any = true;
            }
            if any {
                caught |= idle;
                idle = false;
                last_work = Instant::now();
            } else {
                idle = true;
                std::hint::spin_loop();
            }
            if self.busy.is_empty() {
                ended = true;
                break;
            }
        }
        self.keys = keys;
        // A spin cut short by its queues going quiet says nothing either way.
        if caught {
            self.spin_budget = (self.spin_budget * 2).min(SPIN);
        } else if !ended {
            self.spin_budget = (self.spin_budget / 2).max(MIN_SPIN);
        }
    }

    /// A sleep that ended within a spin's length: a longer spin would have
    /// caught what woke the worker, so the budget grows back.
    fn woke_after(&mut self, slept: Duration) {
        if slept < SPIN {
            self.spin_budget = (self.spin_budget * 2).min(SPIN);
        }
    }

    fn has_inbox(&self) -> bool {
        self.handle.news.load(Ordering::Acquire)
    }

    /// Before the worker sleeps: every queue run since the last sleep
    /// registers its waker and steps away from its channel, except `hot`,
    /// the one it sleeps in (which stays listed, to be registered before a
    /// later sleep that is not in it). Returns true when one of them had
    /// something meanwhile, or the inbox has news: no sleep then.
    fn prepare_sleep(&mut self, hot: Option<usize>) -> bool {
        let mut again = false;
        let mut keys = std::mem::take(&mut self.keys);
        keys.clear();
        keys.extend(self.unarmed.iter().copied().filter(|&k| Some(k) != hot));
        for &key in &keys {
            self.unarmed.remove(&key);
            self.busy.remove(&key);
            let Some(s) = self.queues.get_mut(key) else {
                continue;
            };
            let waker = s.waker.clone();
            match s.queue.prepare_sleep(&waker) {
                Ok(true) => {
                    // It handled something: another turn, and another
                    // registration after it.
                    self.busy.insert(key);
                    again = true;
                }
                Ok(false) => {}
                Err(stop) => self.end(key, &stop),
            }
        }
        self.keys = keys;
        let again = again || self.has_inbox();
        if !again {
            self.busy.clear();
        }
        again
    }

    /// Sleeps up to `left` in the channel of queue `key`, driving it; a
    /// waker of another queue, a new queue or a shutdown ends the sleep.
    fn sleep_in(&mut self, key: usize, left: Duration) {
        let Some(s) = self.queues.get(key) else {
            return;
        };
        let ep = s.queue.endpoint().clone();
        {
            let mut inbox = self.handle.inbox.lock();
            if !inbox.ready.is_empty() || !inbox.arrived.is_empty() {
                self.run.push(key);
                return;
            }
            inbox.sleeping_in = Some(ep.clone());
        }
        // Whatever it returns (something moved, the time passed, the
        // channel closed), the queue's next turn finds out.
        let _ = ep.wait_progress(left);
        self.handle.inbox.lock().sleeping_in = None;
        self.handle.wake.reset();
        self.run.push(key);
    }

    /// Ends the queues whose service is over (keep-alive, a dead
    /// controller, a shutdown that drained them).
    fn tick(&mut self) {
        let over: Vec<usize> = self
            .queues
            .iter_mut()
            .filter_map(|(key, s)| s.queue.must_stop().then_some(key))
            .collect();
        for key in over {
            self.end(key, &Stop::Done);
        }
    }

    fn end(&mut self, key: usize, why: &Stop) {
        self.busy.remove(&key);
        self.ringing.remove(&key);
        self.unarmed.remove(&key);
        let Some(s) = self.queues.try_remove(key) else {
            return;
        };
        if let Some(fd) = s.ring_fd {
            // SAFETY: deleting from an epoll set reads no memory; the ring
            // (and its descriptor) is still open here.
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        }
        s.queue.close(why);
    }
}

impl Worker {
    /// Closes the queues handed over after the worker stopped taking any
    /// (a shutdown), so that none waits for an answer that never comes.
    fn refuse_arrivals(&mut self) {
        let arrived = std::mem::take(&mut self.handle.inbox.lock().arrived);
        for (ep, admitted) in arrived {
            ep.close();
            if let Some(cntlid) = admitted.created_controller() {
                self.shared.remove_controller(cntlid);
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.refuse_arrivals();
        let keys: Vec<usize> = self.queues.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.end(key, &Stop::Done);
        }
    }
}

/// How many workers by default: one per CPU.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}
