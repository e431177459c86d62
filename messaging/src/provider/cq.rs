//! The completion queue shared by the software providers: a locked deque, a
//! condvar for blocking waits and an optional notification callback.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{Completion, Notify};

#[derive(Default)]
pub(crate) struct CompletionQueue {
    queue: Mutex<VecDeque<Completion>>,
    ready: Condvar,
    notify: Mutex<Option<Notify>>,
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

    pub(crate) fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut queue = self.queue.lock();
        while queue.is_empty() {
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
