//! The completion queue shared by the software providers: a locked deque, a
//! condvar for blocking waits and an optional notification callback.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{Completion, Notify};

#[derive(Default)]
pub(crate) struct CompletionQueue {
    queue: Mutex<VecDeque<Completion>>,
    ready: Condvar,
    notify: Mutex<Option<Notify>>,
    /// Bumped by `interrupt`: blocked waiters return early.
    interrupts: AtomicU64,
}

impl CompletionQueue {
    /// Queues completions, wakes blocked waiters, then runs the callback.
    pub(crate) fn push_all(&self, completions: impl IntoIterator<Item = Completion>) {
        let added = {
            let mut queue = self.queue.lock();
            let before = queue.len();
            queue.extend(completions);
            queue.len() - before
        };
        if added > 0 {
            self.ready.notify_all();
            let notify = self.notify.lock().clone();
            if let Some(notify) = notify {
                notify();
            }
        }
    }

    pub(crate) fn push(&self, completion: Completion) {
        self.push_all(std::iter::once(completion));
    }

    pub(crate) fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        let mut queue = self.queue.lock();
        let n = max.min(queue.len());
        out.extend(queue.drain(..n));
        n
    }

    pub(crate) fn has_completions(&self) -> bool {
        !self.queue.lock().is_empty()
    }

    /// Makes every blocked `wait` return (reporting whether completions are ready).
    pub(crate) fn interrupt(&self) {
        let _queue = self.queue.lock();
        self.interrupts.fetch_add(1, Ordering::SeqCst);
        self.ready.notify_all();
    }

    pub(crate) fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut queue = self.queue.lock();
        let seen = self.interrupts.load(Ordering::SeqCst);
        while queue.is_empty() {
            if self.interrupts.load(Ordering::SeqCst) != seen {
                return false;
            }
            match deadline {
                Some(d) => {
                    if self.ready.wait_until(&mut queue, d).timed_out() {
                        return !queue.is_empty();
                    }
                }
                None => self.ready.wait(&mut queue),
            }
        }
        true
    }

    pub(crate) fn set_notify(&self, notify: Option<Notify>) {
        *self.notify.lock() = notify;
    }
}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("ready", &self.queue.lock().len())
            .finish()
    }
}
