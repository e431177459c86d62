//! The lease that keeps a fallback thread aside while callers do its work
//! themselves (run to completion). Two fallbacks use it: a software
//! provider's thread, which drives the transport when no caller waits in
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
use std::thread::Thread;
use std::time::Duration;

/// See the module docs.
#[derive(Debug)]
pub struct Lease {
    /// Bumped by every caller that works.
    activity: AtomicU64,
    /// The `activity` at which a caller last stepped away: while
    /// `activity` still reads it, callers do not work, lease or not.
    away: AtomicU64,
    /// The fallback thread, to end its park early.
    fallback: OnceLock<Thread>,
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
        if let Some(t) = self.fallback.get() {
            t.unpark();
        }
    }

    /// For the fallback thread, once at its start: names the thread that
    /// [`Lease::step_away`] unparks.
    pub fn register_fallback(&self) {
        let _ = self.fallback.set(std::thread::current());
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
        let now = self.activity.load(Ordering::Acquire);
        if stop || !self.callers_active(aside.seen) {
            aside.seen = now;
            aside.streak = 0;
            return false;
        }
        aside.seen = now;
        before_park();
        std::thread::park_timeout(self.base * (1 << aside.streak.min(self.max_doublings)));
        aside.streak += 1;
        true
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
}
