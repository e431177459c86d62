//! Pieces every connection-oriented provider's listener shares: the queue
//! of connections whose hello passed, and deadline-bounded reads for the
//! hello itself.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::FabricError;

/// Connections whose hello was checked, waiting for `Listener::accept`.
pub(crate) struct AcceptQueue<T> {
    queue: Mutex<VecDeque<T>>,
    ready: Condvar,
    closed: AtomicBool,
    capacity: usize,
}

/// Why [`AcceptQueue::offer`] refused an item.
pub(crate) enum Refused<T> {
    /// The queue holds `capacity` items: answer the peer "busy".
    Full(T),
    /// The listener shut down.
    Closed,
}

impl<T> AcceptQueue<T> {
    pub(crate) fn new(capacity: usize) -> AcceptQueue<T> {
        AcceptQueue {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            closed: AtomicBool::new(false),
            capacity,
        }
    }

    /// Queues a checked connection for `take`.
    pub(crate) fn offer(&self, item: T) -> Result<(), Refused<T>> {
        let mut queue = self.queue.lock();
        if self.is_closed() {
            return Err(Refused::Closed);
        }
        if queue.len() >= self.capacity {
            return Err(Refused::Full(item));
        }
        queue.push_back(item);
        self.ready.notify_one();
        Ok(())
    }

    /// The next connection, waiting up to `timeout` (forever with `None`).
    pub(crate) fn take(&self, timeout: Option<Duration>) -> Result<T, FabricError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut queue = self.queue.lock();
        loop {
            if self.is_closed() {
                return Err(FabricError::Shutdown);
            }
            if let Some(item) = queue.pop_front() {
                return Ok(item);
            }
            match deadline {
                Some(d) => {
                    if self.ready.wait_until(&mut queue, d).timed_out() && queue.is_empty() {
                        return Err(FabricError::Timeout(timeout.unwrap_or_default()));
                    }
                }
                None => self.ready.wait(&mut queue),
            }
        }
    }

    /// Refuses everything from now on, wakes waiting `take`s and drops the
    /// queued connections.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let dropped: Vec<T> = self.queue.lock().drain(..).collect();
        self.ready.notify_all();
        drop(dropped);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Reads exactly `buf.len()` bytes before `deadline` (a deadline for the
/// whole read, not per `read()` call); the error is a reason for logs.
pub(crate) fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    what: &str,
    deadline: Instant,
) -> Result<(), String> {
    let mut have = 0;
    while have < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("timed out reading {what} ({have} of {} bytes)", buf.len()));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("reading {what}: {e}"))?;
        match stream.read(&mut buf[have..]) {
            Ok(0) => {
                return Err(format!(
                    "truncated {what}: connection closed after {have} of {} bytes",
                    buf.len()
                ))
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(format!("timed out reading {what} ({have} of {} bytes)", buf.len()))
            }
            Err(e) => return Err(format!("reading {what}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_offers_takes_and_closes() {
        let q = AcceptQueue::new(1);
        assert!(q.offer(1).is_ok());
        assert!(matches!(q.offer(2), Err(Refused::Full(2))));
        assert_eq!(q.take(None).ok(), Some(1));
        assert!(matches!(
            q.take(Some(Duration::from_millis(10))),
            Err(FabricError::Timeout(_))
        ));
        q.close();
        assert!(matches!(q.offer(3), Err(Refused::Closed)));
        assert!(matches!(q.take(None), Err(FabricError::Shutdown)));
    }
}
