//! The progress engine: a few threads, shared by every tcp and shm queue
//! pair of the process, that stand in for the caller when nobody drives a
//! queue pair (an asynchronous application, a peer's traffic nobody waits
//! for, a write the socket did not take at once).
//!
//! Callers still make the progress they wait for themselves (run to
//! completion, `drive.rs`); the engine is only the fallback, so a queue
//! pair costs no thread of its own. Each queue pair belongs to one engine
//! thread (round robin at registration), which waits in one `epoll` for
//! the descriptors of all its queue pairs. A descriptor is armed one shot
//! at a time: it wakes the engine once, and is armed again only when the
//! queue pair goes back to sleep on it. So a queue pair its callers drive
//! (they sleep in `poll` on the same descriptors) never wakes the engine
//! for the traffic they take.
//!
//! ```text
//!   descriptor fires ─▶ Sleeping ──▶ round ─▶ Next::Sleep ──▶ Sleeping (re-armed)
//!   park ends, wake() ─▶ Parked ───┘   │ └──▶ Next::Park(d) ─▶ Parked (d)
//!   caller hands back ─▶ Caller ───┘   ├────▶ Next::CallerHolds ─▶ Caller
//!                                      ├────▶ Next::Again ──▶ round again
//!                                      └────▶ Next::Done ───▶ no more rounds
//! ```
//!
//! A round never blocks: a queue pair whose state lock a caller holds
//! (it sleeps in `poll` on the same descriptors) answers
//! [`Next::CallerHolds`], and that caller wakes the engine for it when it
//! lets go ([`Drive::drive`](super::drive::Drive::drive)). While callers
//! keep driving, the queue pair answers [`Next::Park`] with the lease's
//! period, so a busy queue pair costs the engine a look every few
//! milliseconds, not a thread.
//!
//! The number of engine threads is `CHANIO_PROGRESS_THREADS`, by default
//! the number of CPUs up to 4. They start with the first queue pair and
//! live as long as the process.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use slab::Slab;

use crate::lease::Aside;

/// How long a queue pair whose caller holds its state waits for the caller
/// to hand it back before the engine looks again anyway.
const CALLER_SAFETY_NET: Duration = Duration::from_secs(1);

/// How soon a queue pair whose descriptor could not be re-armed is looked
/// at again.
const REARM_RETRY: Duration = Duration::from_millis(10);

/// The most engine threads chosen by default.
const DEFAULT_THREADS_MAX: usize = 4;

/// The `epoll` data of the engine's own wake-up eventfd.
const WAKE_TOKEN: u64 = u64::MAX;

/// The most descriptors one queue pair registers.
pub(crate) const MAX_FDS: usize = 8;

/// A queue pair the engine drives.
pub(crate) trait Driven: Send + Sync {
    /// One round, without blocking: unless callers drive, read and execute
    /// what arrived, write what is queued, publish completions. `aside` is
    /// the engine's view of the queue pair's lease; `fired` has bit `i` set
    /// for each registered descriptor `i` that fired since the bits were
    /// last cleared (the round clears those it consumed).
    fn round(&self, aside: &mut Aside, fired: &mut u32) -> Next;
}

/// What the engine does with a queue pair after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Wait for a descriptor to become readable (and the first one
    /// writable too, when `writable`: output is queued).
    Sleep { writable: bool },
    /// Callers drive: look again after this long, or when one steps away.
    Park(Duration),
    /// A caller holds the state: it wakes the engine when it lets go.
    CallerHolds,
    /// More work is there: another round after the other ready ones.
    Again,
    /// The queue pair failed and flushed everything: no more rounds.
    Done,
}

thread_local! {
    static IN_ENGINE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is an engine thread inside a round (a
/// completion callback that drops the last handle of a queue pair runs
/// there, and must not wait for a lock the round holds).
pub(crate) fn in_round() -> bool {
    IN_ENGINE.with(Cell::get)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Waiting for a descriptor.
    Sleeping,
    /// Aside until then.
    Parked(Instant),
    /// A caller holds the state (looked at again after the safety net).
    Caller(Instant),
    /// In this thread's run list.
    Ready,
    /// Its round runs now.
    Running,
    /// No more rounds.
    Done,
}

struct Entry {
    /// Unique for the life of the process: a slot the slab reuses holds
    /// another queue pair, which a round or a waker of the one before must
    /// not touch.
    id: u64,
    driven: Option<Weak<dyn Driven>>,
    /// The descriptors and the events each is armed for.
    fds: Vec<(RawFd, u32)>,
    aside: Aside,
    fired: u32,
    /// Descriptors that fired since they were last armed (one shot).
    disarmed: u32,
    /// The first descriptor is armed for output as well.
    out_armed: bool,
    wait: Wait,
    /// Woken while its round ran: another round follows.
    rewake: bool,
}

impl Entry {
    /// A place for a queue pair not started yet: no rounds until then.
    fn reserved(id: u64) -> Entry {
        Entry {
            id,
            driven: None,
            fds: Vec::new(),
            aside: Aside::default(),
            fired: 0,
            disarmed: 0,
            out_armed: false,
            wait: Wait::Done,
            rewake: false,
        }
    }
}

#[derive(Default)]
struct ShardState {
    entries: Slab<Entry>,
    /// The next entry's id.
    next_id: u64,
    /// Woken from outside since the engine thread last looked.
    ready: Vec<usize>,
    /// When parked entries are due (stale items, whose entry moved on, are
    /// skipped when they come up).
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl ShardState {
    /// The entry at `token` if it is still the one with `id`.
    fn entry(&mut self, token: usize, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(token).filter(|e| e.id == id)
    }

    /// Moves the entries whose park ended by `now` to `run`.
    fn due(&mut self, now: Instant, run: &mut Vec<usize>) {
        while let Some(&Reverse((t, token))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(e) = self.entries.get_mut(token) {
                if matches!(e.wait, Wait::Parked(p) | Wait::Caller(p) if p == t) {
                    e.wait = Wait::Ready;
                    run.push(token);
                }
            }
        }
    }

    /// The earliest park still standing.
    fn earliest(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, token))) = self.timers.peek() {
            let live = self
                .entries
                .get(token)
                .is_some_and(|e| matches!(e.wait, Wait::Parked(p) | Wait::Caller(p) if p == t));
            if live {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }
}

/// One engine thread and its `epoll`.
struct Shard {
    epoll: OwnedFd,
    wake: OwnedFd,
    state: Mutex<ShardState>,
}

/// The engine: its threads, started with the first registration.
struct Engine {
    shards: Vec<Arc<Shard>>,
    next: AtomicUsize,
}

static ENGINE: Mutex<Option<Arc<Engine>>> = Mutex::new(None);

fn engine() -> io::Result<Arc<Engine>> {
    let mut slot = ENGINE.lock();
    if let Some(e) = &*slot {
        return Ok(e.clone());
    }
    let threads = std::env::var("CHANIO_PROGRESS_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(DEFAULT_THREADS_MAX)));
    let mut shards = Vec::with_capacity(threads);
    for i in 0..threads {
        let shard = Arc::new(Shard::new()?);
        let for_thread = shard.clone();
        std::thread::Builder::new()
            .name(format!("chanio-progress-{i}"))
            .spawn(move || for_thread.run())?;
        shards.push(shard);
    }
    let e = Arc::new(Engine {
        shards,
        next: AtomicUsize::new(0),
    });
    *slot = Some(e.clone());
    Ok(e)
}

/// A queue pair's place in the engine: dropping it forgets the queue pair
/// and removes its descriptors from the engine's `epoll`, so it must be
/// dropped before they close.
pub(crate) struct Registration {
    shard: Arc<Shard>,
    token: usize,
    id: u64,
}

/// Schedules a round of one queue pair from any thread.
#[derive(Clone)]
pub(crate) struct EngineWaker {
    shard: Arc<Shard>,
    token: usize,
    id: u64,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("token", &self.token).finish()
    }
}

impl std::fmt::Debug for EngineWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineWaker").field("token", &self.token).finish()
    }
}

/// Reserves a place in the engine, before the queue pair exists (it needs
/// its waker); [`Registration::start`] hands it the queue pair.
pub(crate) fn reserve() -> io::Result<Registration> {
    let e = engine()?;
    let shard = e.shards[e.next.fetch_add(1, Ordering::Relaxed) % e.shards.len()].clone();
    let mut st = shard.state.lock();
    let id = st.next_id;
    st.next_id += 1;
    let token = st.entries.insert(Entry::reserved(id));
    drop(st);
    Ok(Registration { shard, token, id })
}

impl Registration {
    /// The waker of this queue pair.
    pub(crate) fn waker(&self) -> EngineWaker {
        EngineWaker {
            shard: self.shard.clone(),
            token: self.token,
            id: self.id,
        }
    }

    /// Starts driving `driven`: `fds` are its descriptors with the `epoll`
    /// input events to wait for (armed one shot); the first round runs at
    /// once.
    pub(crate) fn start(&self, driven: Weak<dyn Driven>, fds: &[(RawFd, u32)]) -> io::Result<()> {
        assert!(fds.len() <= MAX_FDS, "too many descriptors for one queue pair");
        {
            // Under the lock: an event cannot be taken (nor a round end and
            // re-arm) before the entry lists the descriptor it is about.
            let mut st = self.shard.state.lock();
            let Some(entry) = st.entry(self.token, self.id) else {
                return Err(io::Error::other("engine registration vanished"));
            };
            entry.driven = Some(driven);
            entry.wait = Wait::Sleeping;
            for (i, &(fd, events)) in fds.iter().enumerate() {
                if let Err(e) = self.shard.arm(libc::EPOLL_CTL_ADD, self.token, i, fd, events) {
                    // Nothing stays in the epoll for the caller's error path
                    // to remove after the descriptors closed.
                    for (fd, _) in entry.fds.drain(..) {
                        self.shard.disarm(fd);
                    }
                    entry.wait = Wait::Done;
                    return Err(e);
                }
                entry.fds.push((fd, events));
            }
        }
        self.shard.schedule(self.token, self.id);
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let entry = {
            let mut st = self.shard.state.lock();
            let ours = st.entry(self.token, self.id).is_some();
            ours.then(|| st.entries.remove(self.token))
        };
        for (fd, _) in entry.map(|e| e.fds).unwrap_or_default() {
            self.shard.disarm(fd);
        }
    }
}

impl EngineWaker {
    /// Schedules a round of the queue pair now (a caller stepped away or
    /// handed the state back, or the queue pair failed from outside).
    pub(crate) fn wake(&self) {
        self.shard.schedule(self.token, self.id);
    }
}

impl Shard {
    fn new() -> io::Result<Shard> {
        // SAFETY: plain system calls; each returned descriptor is checked
        // and then owned by exactly one `OwnedFd`.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        // SAFETY: as above.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: WAKE_TOKEN,
        };
        // SAFETY: both descriptors are open; `ev` is valid for the call.
        if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, wake.as_raw_fd(), &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Shard {
            epoll,
            wake,
            state: Mutex::new(ShardState::default()),
        })
    }

    /// Arms descriptor `i` of the queue pair at `token` for one event.
    fn arm(&self, op: libc::c_int, token: usize, i: usize, fd: RawFd, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: events | libc::EPOLLONESHOT as u32,
            u64: ((token as u64) << 8) | i as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the call's duration; the
        // epoll descriptor is owned by the shard and open, and the queue
        // pair keeps `fd` open while it is registered.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes `fd` from the epoll; its owner keeps it open until then.
    fn disarm(&self, fd: RawFd) {
        // SAFETY: deleting a descriptor from an epoll set reads no memory
        // (the event argument may be null since Linux 2.6.9).
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    fn schedule(&self, token: usize, id: u64) {
        let mut st = self.state.lock();
        let ready = match st.entry(token, id) {
            Some(e) => match e.wait {
                Wait::Running => {
                    e.rewake = true;
                    false
                }
                // Already due, not started yet, or finished.
                Wait::Ready | Wait::Done => false,
                Wait::Sleeping | Wait::Parked(_) | Wait::Caller(_) => {
                    e.wait = Wait::Ready;
                    true
                }
            },
            None => false,
        };
        if ready {
            st.ready.push(token);
            drop(st);
            self.ring();
        }
    }

    fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the shard's eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn drain(&self) {
        let mut sink = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer; the eventfd is
        // non-blocking.
        unsafe { libc::read(self.wake.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) };
    }

    /// The engine thread.
    fn run(&self) {
        IN_ENGINE.with(|f| f.set(true));
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut run: Vec<usize> = Vec::new();
        let mut again: Vec<usize> = Vec::new();
        loop {
            let timeout = self.timeout(!again.is_empty());
            // SAFETY: `events` is a live buffer of `events.len()` entries
            // that the kernel fills; the epoll descriptor is open.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout,
                )
            };
            let n = usize::try_from(n).unwrap_or(0);
            {
                let mut st = self.state.lock();
                for ev in &events[..n] {
                    if ev.u64 == WAKE_TOKEN {
                        self.drain();
                        continue;
                    }
                    let token = (ev.u64 >> 8) as usize;
                    let bit = 1u32 << (ev.u64 & 0xff);
                    if let Some(e) = st.entries.get_mut(token) {
                        e.fired |= bit;
                        e.disarmed |= bit;
                        if e.wait == Wait::Sleeping {
                            e.wait = Wait::Ready;
                            run.push(token);
                        }
                    }
                }
                // Drained, not taken: the list keeps its capacity, so a
                // wake-up allocates nothing.
                run.append(&mut st.ready);
                run.append(&mut again);
                st.due(Instant::now(), &mut run);
            }
            run.sort_unstable();
            run.dedup();
            for token in run.drain(..) {
                if self.round(token) == Some(Wait::Ready) {
                    again.push(token);
                }
            }
        }
    }

    /// The `epoll_wait` timeout: none while rounds are due, else until the
    /// earliest park ends.
    fn timeout(&self, busy: bool) -> libc::c_int {
        if busy {
            return 0;
        }
        let mut st = self.state.lock();
        if !st.ready.is_empty() {
            return 0;
        }
        st.earliest().map_or(-1, |t| {
            let left = t.saturating_duration_since(Instant::now());
            libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
        })
    }

    /// One round of the queue pair at `token`; returns its new wait.
    fn round(&self, token: usize) -> Option<Wait> {
        let (id, driven, mut aside, mut fired) = {
            let mut st = self.state.lock();
            let e = st.entries.get_mut(token)?;
            if e.wait != Wait::Ready {
                return None;
            }
            e.wait = Wait::Running;
            e.rewake = false;
            (e.id, e.driven.clone()?, std::mem::take(&mut e.aside), e.fired)
        };
        let next = match driven.upgrade() {
            Some(d) => d.round(&mut aside, &mut fired),
            None => Next::Done,
        };
        let now = Instant::now();
        let mut st = self.state.lock();
        // The queue pair may have gone meanwhile, its slot taken by another.
        let e = st.entry(token, id)?;
        e.aside = aside;
        // No event is taken while the round runs (this thread takes them):
        // what is left is what the round did not consume.
        e.fired = fired;
        let wait = match next {
            Next::Done => Wait::Done,
            _ if e.rewake => Wait::Ready,
            Next::Sleep { .. } => Wait::Sleeping,
            Next::Park(d) => Wait::Parked(now + d),
            Next::CallerHolds => Wait::Caller(now + CALLER_SAFETY_NET),
            Next::Again => Wait::Ready,
        };
        e.wait = wait;
        let mut rearm_failed = false;
        if let (Next::Sleep { writable }, Wait::Sleeping) = (next, wait) {
            // What fired (or needs output now) is armed again, under the
            // lock: the entry's descriptors stay open while it exists.
            for (i, &(fd, events)) in e.fds.iter().enumerate() {
                let out_changes = i == 0 && writable != e.out_armed;
                if e.disarmed & (1 << i) != 0 || out_changes {
                    let out = if i == 0 && writable { libc::EPOLLOUT as u32 } else { 0 };
                    if let Err(err) = self.arm(libc::EPOLL_CTL_MOD, token, i, fd, events | out) {
                        // Not left asleep on a descriptor that cannot wake
                        // it: looked at again shortly.
                        tracing::debug!(fd, error = %err, "cannot re-arm a queue pair's descriptor");
                        rearm_failed = true;
                    }
                }
            }
            e.disarmed = 0;
            e.out_armed = writable;
        }
        let wait = if rearm_failed {
            e.disarmed = u32::MAX >> (32 - MAX_FDS);
            Wait::Parked(now + REARM_RETRY)
        } else {
            wait
        };
        e.wait = wait;
        if let Wait::Parked(t) | Wait::Caller(t) = wait {
            st.timers.push(Reverse((t, token)));
        }
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;

    /// Counts its rounds and answers what `next` says.
    struct Probe {
        rounds: AtomicU32,
        next: Mutex<Next>,
        /// Rounds report here.
        tx: Mutex<mpsc::Sender<u32>>,
        /// Held by a round until the test lets go (when set).
        hold: Option<Mutex<mpsc::Receiver<()>>>,
    }

    impl Driven for Probe {
        fn round(&self, _aside: &mut Aside, fired: &mut u32) -> Next {
            *fired = 0;
            if let Some(hold) = &self.hold {
                let _ = hold.lock().recv_timeout(Duration::from_secs(5));
            }
            // What to answer is read before the round reports, so that a
            // test that changes it after a report changes the next round.
            let next = *self.next.lock();
            let n = self.rounds.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = self.tx.lock().send(n);
            next
        }
    }

    fn probe(next: Next, hold: Option<mpsc::Receiver<()>>) -> (Arc<Probe>, mpsc::Receiver<u32>) {
        let (tx, rx) = mpsc::channel();
        let p = Arc::new(Probe {
            rounds: AtomicU32::new(0),
            next: Mutex::new(next),
            tx: Mutex::new(tx),
            hold: hold.map(Mutex::new),
        });
        (p, rx)
    }

    fn start(p: &Arc<Probe>, fds: &[(RawFd, u32)]) -> Registration {
        let reg = reserve().expect("engine");
        let driven: Arc<dyn Driven> = p.clone();
        reg.start(Arc::downgrade(&driven), fds).expect("start");
        reg
    }

    const SOON: Duration = Duration::from_secs(5);

    #[test]
    fn a_descriptor_that_becomes_readable_gets_a_round() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (p, rounds) = probe(Next::Sleep { writable: false }, None);
        let _reg = start(&p, &[(b.as_raw_fd(), libc::EPOLLIN as u32)]);
        assert_eq!(rounds.recv_timeout(SOON), Ok(1), "the first round runs at once");
        assert!(
            rounds.recv_timeout(Duration::from_millis(50)).is_err(),
            "asleep: no round"
        );
        std::io::Write::write_all(&mut &a, b"x").expect("write");
        assert_eq!(rounds.recv_timeout(SOON), Ok(2), "readable: a round");
        // Nobody read the byte: the descriptor, armed again, fires again.
        assert_eq!(rounds.recv_timeout(SOON), Ok(3));
    }

    #[test]
    fn a_descriptor_ready_at_registration_keeps_firing() {
        // Readable from the start, and never read: every round ends in a
        // sleep, and the descriptor, armed again, fires again. An event
        // taken before the entry listed its descriptor was once consumed
        // without re-arming it, and the queue pair went deaf.
        for _ in 0..100 {
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
            std::io::Write::write_all(&mut &a, b"x").expect("write");
            let (p, rounds) = probe(Next::Sleep { writable: false }, None);
            let reg = start(&p, &[(b.as_raw_fd(), libc::EPOLLIN as u32)]);
            for n in 1..=3 {
                assert_eq!(rounds.recv_timeout(SOON), Ok(n), "round {n} never came");
            }
            drop(reg);
        }
    }

    #[test]
    fn a_parked_queue_pair_is_looked_at_again_and_a_waker_schedules_it() {
        let (p, rounds) = probe(Next::Park(Duration::from_millis(5)), None);
        let reg = start(&p, &[]);
        assert_eq!(rounds.recv_timeout(SOON), Ok(1));
        assert_eq!(rounds.recv_timeout(SOON), Ok(2), "the park ended");
        *p.next.lock() = Next::Sleep { writable: false };
        assert_eq!(rounds.recv_timeout(SOON), Ok(3));
        assert!(
            rounds.recv_timeout(Duration::from_millis(50)).is_err(),
            "asleep: no round"
        );
        reg.waker().wake();
        assert_eq!(rounds.recv_timeout(SOON), Ok(4), "woken");
    }

    #[test]
    fn a_slot_reused_during_a_round_belongs_to_its_new_queue_pair() {
        // Alone on its engine thread's shard or not, the first queue pair's
        // round is held while its registration goes and another takes the
        // slot; the old round's Done must not stop the new one.
        let (let_go, hold) = mpsc::channel();
        let (old, old_rounds) = probe(Next::Done, Some(hold));
        let old_reg = start(&old, &[]);
        std::thread::sleep(Duration::from_millis(20));
        let shard = old_reg.shard.clone();
        let token = old_reg.token;
        // What dropping the registration does (it has no descriptors),
        // and the next registration, under one hold of the lock, so that
        // no other test's queue pair takes the slot in between.
        std::mem::forget(old_reg);
        let (new, new_rounds) = probe(Next::Sleep { writable: false }, None);
        let (id, t) = {
            let mut st = shard.state.lock();
            st.entries.remove(token);
            let id = st.next_id;
            st.next_id += 1;
            let t = st.entries.insert(Entry::reserved(id));
            (id, t)
        };
        assert_eq!(t, token, "the slab reuses the slot");
        let new_reg = Registration { shard, token, id };
        let driven: Arc<dyn Driven> = new.clone();
        new_reg.start(Arc::downgrade(&driven), &[]).expect("start");
        let_go.send(()).expect("let go");
        assert_eq!(old_rounds.recv_timeout(SOON), Ok(1));
        assert_eq!(new_rounds.recv_timeout(SOON), Ok(1), "the new queue pair's first round");
        new_reg.waker().wake();
        assert_eq!(new_rounds.recv_timeout(SOON), Ok(2), "still driven");
    }
}
