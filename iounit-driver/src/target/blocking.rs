//! The blocking threads: storage calls that may wait (a backend whose
//! `may_block` is true and that has no files for a queue's io_uring) run
//! here, so that a worker thread, which serves many queues, never waits
//! for one device. Threads start as jobs need them, up to `MAX_THREADS`,
//! and end after `IDLE` without work; jobs queue beyond that.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// The most blocking threads at once.
const MAX_THREADS: usize = 64;
/// How long an idle blocking thread waits for work before it ends.
const IDLE: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

/// The target's blocking threads. Clones share them.
#[derive(Clone, Default)]
pub(crate) struct Blocking {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl Blocking {
    /// Runs `job` on a blocking thread.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let (lock, ready) = &*self.inner;
        let mut st = lock.lock();
        st.jobs.push_back(Box::new(job));
        // An idle thread takes a job once it runs again; jobs beyond the
        // idle threads (a burst) start threads of their own.
        if st.idle > 0 {
            ready.notify_one();
        }
        if st.jobs.len() <= st.idle || st.threads >= MAX_THREADS {
            return;
        }
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("iounit-blocking".into())
            .spawn(move || run(&inner));
        match spawned {
            Ok(_) => st.threads += 1,
            // The job waits for a thread that frees up; with none at all it
            // waits for the next spawn to succeed.
            Err(e) => tracing::error!("cannot start a blocking thread: {e}"),
        }
    }
}

fn run(inner: &(Mutex<State>, Condvar)) {
    let (lock, ready) = inner;
    let mut st = lock.lock();
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            // A job that panics ends itself, not the thread.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                tracing::error!("a blocking storage call panicked");
            }
            st = lock.lock();
            continue;
        }
        st.idle += 1;
        let timed_out = ready.wait_for(&mut st, IDLE).timed_out();
        st.idle -= 1;
        if timed_out && st.jobs.is_empty() {
            st.threads -= 1;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn jobs_that_wait_do_not_hold_up_the_others() {
        let pool = Blocking::default();
        let (let_go, held) = mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        // Three jobs that wait until released.
        for _ in 0..3 {
            let held = held.clone();
            pool.spawn(move || {
                let _ = held.lock().recv_timeout(Duration::from_secs(5));
            });
        }
        // One more still runs at once.
        let (done, finished) = mpsc::channel();
        pool.spawn(move || done.send(()).unwrap());
        assert!(finished.recv_timeout(Duration::from_secs(5)).is_ok());
        for _ in 0..3 {
            let_go.send(()).unwrap();
        }
    }
}
