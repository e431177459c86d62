//! The lease that keeps a fallback aside while callers do its work
//! themselves (run to completion). Two fallbacks use it: a provider's
//! fallback (the progress engine for tcp and shm, the queue pair's thread
//! for verbs), which drives the transport when no caller waits in
//! [`QueuePair::wait`](crate::provider::QueuePair::wait), and the host's
//! per-queue receiver thread, which reaps completions when no blocked
//! caller does.
//!
//! Callers renew the lease as they work ([`Lease::renew`]: one atomic add,
//! no clock read). The fallback looks at the count: while it moves, it
//! parks, for a base period that doubles (up to a limit) while callers
//! keep working, so that a busy channel's fallback wakes rarely; once the
//! count stands still, it takes over. A caller about to sleep elsewhere
//! calls [`Lease::step_away`]: the fallback takes over at once instead of
//! after the lease.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// See the module docs.
pub struct Lease {
    /// Bumped by every caller that works.
    activity: AtomicU64,
    /// The `activity` at which a caller last stepped away: while
    /// `activity` still reads it, callers do not work, lease or not.
    away: AtomicU64,
    /// Ends the fallback's park early: unparks its thread, or hands the
    /// queue pair to the progress engine's ready list.
    fallback: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The first park; it doubles up to `max_doublings` times.
    base: Duration,
    max_doublings: u32,
}

/// The fallback thread's view of the lease.
#[derive(Debug, Default)]
pub struct Aside {
    seen: u64,
    streak: u32,
}

impl Aside {
    /// Records what the fallback saw after it looked for callers: `now`
    /// (read first), and whether it stands aside.
    fn look(&mut self, now: u64, aside: bool) {
        self.seen = now;
        if aside {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
    }

    /// The activity count the fallback last saw.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

impl Lease {
    /// A lease whose fallback parks for `base`, doubling up to
    /// `max_doublings` times while callers keep working.
    pub fn new(base: Duration, max_doublings: u32) -> Lease {
        Lease {
            activity: AtomicU64::new(0),
            away: AtomicU64::new(u64::MAX),
            fallback: OnceLock::new(),
            base,
            max_doublings,
        }
    }

    /// A caller works: the fallback stays aside.
    pub fn renew(&self) {
        self.activity.fetch_add(1, Ordering::Release);
    }

    /// A caller stops working and sleeps elsewhere: the fallback takes over
    /// now.
    pub fn step_away(&self) {
        self.away
            .store(self.activity.load(Ordering::Acquire), Ordering::Release);
        if let Some(wake) = self.fallback.get() {
            wake();
        }
    }

    /// For the fallback thread, once at its start: names the thread that
    /// [`Lease::step_away`] unparks.
    pub fn register_fallback(&self) {
        let thread = std::thread::current();
        self.register_fallback_wake(Box::new(move || thread.unpark()));
    }

    /// For a fallback that is not a thread of its own (the progress
    /// engine): what [`Lease::step_away`] calls to end its park.
    pub fn register_fallback_wake(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.fallback.set(wake);
    }

    /// Whether callers worked since `seen` and none of them stepped away
    /// after.
    pub fn callers_active(&self, seen: u64) -> bool {
        let now = self.activity.load(Ordering::Acquire);
        now != seen && now != self.away.load(Ordering::Acquire)
    }

    /// For the fallback thread: while callers worked since it last looked
    /// (and `stop` is not set), runs `before_park` and parks, and returns
    /// true; otherwise returns false, and the fallback does the work.
    pub fn stands_aside(&self, aside: &mut Aside, stop: bool, before_park: impl FnOnce()) -> bool {
        match self.park_for(aside, stop) {
            None => false,
            Some(park) => {
                before_park();
                std::thread::park_timeout(park);
                true
            }
        }
    }

    /// The non-blocking form of [`Lease::stands_aside`]: how long the
    /// fallback stays aside (it looks again after that long, or when a
    /// caller steps away), or `None` when it does the work now.
    pub fn park_for(&self, aside: &mut Aside, stop: bool) -> Option<Duration> {
        let now = self.activity.load(Ordering::Acquire);
        if stop || !self.callers_active(aside.seen) {
            aside.look(now, false);
            return None;
        }
        let park = self.base * (1 << aside.streak.min(self.max_doublings));
        aside.look(now, true);
        Some(park)
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("activity", &self.activity)
            .field("away", &self.away)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_stands_aside_while_callers_work() {
        let lease = Lease::new(Duration::from_micros(10), 2);
        let mut aside = Aside::default();
        // Nobody worked: the fallback works.
        assert!(!lease.stands_aside(&mut aside, false, || panic!("no park")));
        lease.renew();
        let mut parked = false;
        assert!(lease.stands_aside(&mut aside, false, || parked = true));
        assert!(parked);
        // The count stood still since: the fallback takes over.
        assert!(!lease.stands_aside(&mut aside, false, || panic!("no park")));
        // A stop (the queue pair failed) overrides the lease.
        lease.renew();
        assert!(!lease.stands_aside(&mut aside, true, || panic!("no park")));
        // A caller that stepped away leaves the work to the fallback at once.
        lease.renew();
        lease.step_away();
        assert!(!lease.callers_active(aside.seen()));
        assert!(!lease.stands_aside(&mut aside, false, || panic!("no park")));
        lease.renew();
        assert!(lease.callers_active(aside.seen()));
    }

    #[test]
    fn the_park_doubles_while_callers_keep_working_up_to_its_limit() {
        let lease = Lease::new(Duration::from_millis(1), 2);
        let mut aside = Aside::default();
        let mut parks = Vec::new();
        for _ in 0..4 {
            lease.renew();
            parks.push(lease.park_for(&mut aside, false));
        }
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(parks, vec![ms(1), ms(2), ms(4), ms(4)]);
        // Once they stop, the fallback works and the next park starts over.
        assert_eq!(lease.park_for(&mut aside, false), None);
        lease.renew();
        assert_eq!(lease.park_for(&mut aside, false), ms(1));
        // A caller stepping away wakes the registered fallback.
        let woken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = woken.clone();
        lease.register_fallback_wake(Box::new(move || flag.store(true, Ordering::SeqCst)));
        lease.step_away();
        assert!(woken.load(Ordering::SeqCst));
    }
}
