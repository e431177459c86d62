//! A task set: futures handed in from other threads, run on the thread
//! that polls the set (the NBD bridge's dispatcher runs one per client).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;
use slab::Slab;

/// A boxed task of a [`TaskSet`].
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Hands tasks to a [`TaskSet`] from any thread; dropping it (or
/// [`Spawner::close`]) tells the set that no more will come.
#[derive(Debug)]
pub(crate) struct Spawner {
    inbox: Arc<Inbox>,
}

#[derive(Debug, Default)]
struct Inbox {
    state: Mutex<InboxState>,
}

#[derive(Default)]
struct InboxState {
    new: Vec<Task>,
    /// Tasks of the set that a wake-up marked to poll.
    woken: Vec<usize>,
    closed: bool,
    /// The waker of whoever polls the set.
    parent: Option<Waker>,
}

impl std::fmt::Debug for InboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxState")
            .field("new", &self.new.len())
            .field("woken", &self.woken.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl Inbox {
    /// Runs `f` on the state, then wakes the parent.
    fn update(&self, f: impl FnOnce(&mut InboxState)) {
        let parent = {
            let mut st = self.state.lock();
            f(&mut st);
            st.parent.clone()
        };
        if let Some(w) = parent {
            w.wake();
        }
    }
}

impl Spawner {
    /// Adds a task; it is first polled by the set's next poll.
    #[cfg(test)]
    pub(crate) fn spawn(&self, task: Task) {
        self.inbox.update(|st| st.new.push(task));
    }

    /// Adds a task without waking the set: [`Spawner::notify`] does, once
    /// for a batch.
    pub(crate) fn spawn_quietly(&self, task: Task) {
        self.inbox.state.lock().new.push(task);
    }

    /// Wakes the set if tasks wait for their first poll.
    pub(crate) fn notify(&self) {
        let parent = {
            let st = self.inbox.state.lock();
            if st.new.is_empty() {
                return;
            }
            st.parent.clone()
        };
        if let Some(w) = parent {
            w.wake();
        }
    }

    /// No more tasks: the set completes once those it has are done.
    pub(crate) fn close(&self) {
        self.inbox.update(|st| st.closed = true);
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.close();
    }
}

/// One task's waker: marks the task and wakes the set's poller.
struct TaskWaker {
    inbox: Arc<Inbox>,
    key: usize,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let key = self.key;
        self.inbox.update(|st| st.woken.push(key));
    }
}

/// A future that runs a changing set of tasks, each polled only when its
/// own waker fired, and completes when its [`Spawner`] is closed and every
/// task has finished. Run it with [`block_on`](super::block_on) on a thread of its own.
pub(crate) struct TaskSet {
    inbox: Arc<Inbox>,
    tasks: Slab<(Task, Waker)>,
}

impl std::fmt::Debug for TaskSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskSet").field("tasks", &self.tasks.len()).finish()
    }
}

/// A new set and the spawner that feeds it.
pub(crate) fn task_set() -> (Spawner, TaskSet) {
    let inbox = Arc::new(Inbox::default());
    (
        Spawner { inbox: inbox.clone() },
        TaskSet {
            inbox,
            tasks: Slab::new(),
        },
    )
}

impl Future for TaskSet {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let (new, woken, closed) = {
                let mut st = this.inbox.state.lock();
                if !st.parent.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.parent = Some(cx.waker().clone());
                }
                (std::mem::take(&mut st.new), std::mem::take(&mut st.woken), st.closed)
            };
            if new.is_empty() && woken.is_empty() {
                return if closed && this.tasks.is_empty() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                };
            }
            // A woken key may name a task that finished since and whose
            // slot a new task took: that task is polled once more than
            // needed, which futures allow.
            let mut keys = woken;
            for task in new {
                let entry = this.tasks.vacant_entry();
                let key = entry.key();
                let waker = Waker::from(Arc::new(TaskWaker {
                    inbox: this.inbox.clone(),
                    key,
                }));
                entry.insert((task, waker));
                keys.push(key);
            }
            for key in keys {
                let Some((task, waker)) = this.tasks.get_mut(key) else {
                    continue;
                };
                let waker = waker.clone();
                if task.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
                    drop(this.tasks.remove(key));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A future that is pending until its flag is set from elsewhere.
    struct Gate(Arc<Mutex<(bool, Option<Waker>)>>);

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let mut g = self.0.lock();
            if g.0 {
                return Poll::Ready(());
            }
            g.1 = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn tasks_from_another_thread_run_and_the_set_ends_when_closed_and_empty() {
        let (spawner, set) = task_set();
        let done = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new((false, None::<Waker>)));
        let runner = std::thread::spawn(move || super::super::block_on(set));
        for _ in 0..10 {
            let done = done.clone();
            spawner.spawn(Box::pin(async move {
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        let (d, g) = (done.clone(), gate.clone());
        spawner.spawn(Box::pin(async move {
            Gate(g).await;
            d.fetch_add(100, Ordering::SeqCst);
        }));
        drop(spawner);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!runner.is_finished(), "the set ended with a task pending");
        assert_eq!(done.load(Ordering::SeqCst), 10);
        let waker = {
            let mut g = gate.lock();
            g.0 = true;
            g.1.take()
        };
        waker.expect("the gated task registered its waker").wake();
        runner.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 110);
    }
}
