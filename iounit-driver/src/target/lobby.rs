//! The lobby: channels that completed the transport's hello and have not
//! sent their NVMe Connect yet. They cost no thread: one lobby thread
//! holds them all, each under its deadline (`CONNECT_TIMEOUT`); the
//! fabric's progress engine receives a channel's first capsule and the
//! channel's waker tells the lobby. The lobby checks the Connect
//! ([`queue::admit_first`]); only an admitted queue goes to a worker
//! (`worker.rs`), which answers it. A refused channel is closed once its
//! answer went out, or after `REPLY_GRACE`.
//!
//! ```text
//!  accept ──▶ lobby ── first capsule (waker) ──▶ Connect admitted ──▶ a worker
//!               │                            └─▶ refused ──▶ answer, then close
//!               └── no capsule by the deadline, closed by the peer, lobby full ──▶ close
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use messaging::{Endpoint, Error as MsgError};
use parking_lot::Mutex;

use super::queue::{self, Admission, CONNECT_TIMEOUT};
use super::Shared;

/// How long a refused channel waits for its answer to be acknowledged
/// before it is closed anyway.
const REPLY_GRACE: Duration = Duration::from_secs(1);
/// The lobby's longest sleep: how late it sees a shutdown at worst.
const LOBBY_TICK: Duration = Duration::from_millis(250);
/// The most channels waiting for their Connect; a new one beyond it ends
/// the one that has waited longest (a peer cannot fill the lobby and keep
/// hosts out: each transport limits connections per source address, and
/// this bounds all of them together).
pub(crate) const LOBBY_MAX: usize = 4096;

/// What the lobby is told from other threads.
#[derive(Default)]
struct Inbox {
    arrived: Vec<Endpoint>,
    ready: Vec<u64>,
    stop: bool,
}

/// The handle that accept loops and wakers use.
pub(crate) struct Lobby {
    inbox: Mutex<Inbox>,
    thread: OnceLock<Thread>,
    /// The lobby thread ended: nothing is handed to the workers any more.
    stopped: AtomicBool,
}

/// A channel in the lobby.
struct Waiting {
    ep: Endpoint,
    deadline: Instant,
    phase: Phase,
}

type Acknowledged = Pin<Box<dyn Future<Output = Result<(), MsgError>> + Send>>;

enum Phase {
    /// Waits for its first capsule.
    Connect,
    /// Refused: waits for its answer to be acknowledged.
    Answered(Acknowledged),
}

/// Wakes the lobby for one channel.
struct EntryWake {
    lobby: Weak<Lobby>,
    id: u64,
}

impl Wake for EntryWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(lobby) = self.lobby.upgrade() {
            lobby.inbox.lock().ready.push(self.id);
            lobby.unpark();
        }
    }
}

impl Lobby {
    pub(crate) fn new() -> Arc<Lobby> {
        Arc::new(Lobby {
            inbox: Mutex::new(Inbox::default()),
            thread: OnceLock::new(),
            stopped: AtomicBool::new(false),
        })
    }

    /// A channel whose hello was accepted enters the lobby.
    pub(crate) fn enter(&self, ep: Endpoint) {
        self.inbox.lock().arrived.push(ep);
        self.unpark();
    }

    /// Ends the lobby: every waiting channel is closed.
    pub(crate) fn stop(&self) {
        self.inbox.lock().stop = true;
        self.unpark();
    }

    /// Whether the lobby thread ended (after a stop).
    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    fn unpark(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// The lobby thread.
pub(crate) fn run(shared: &Arc<Shared>, lobby: &Arc<Lobby>) {
    let _ = lobby.thread.set(std::thread::current());
    // Ordered by arrival: the first is the one that waited longest.
    let mut waiting: BTreeMap<u64, Waiting> = BTreeMap::new();
    let mut next_id = 0u64;
    loop {
        let (arrived, mut ready, stop) = {
            let mut inbox = lobby.inbox.lock();
            (
                std::mem::take(&mut inbox.arrived),
                std::mem::take(&mut inbox.ready),
                inbox.stop,
            )
        };
        if stop {
            for (_, w) in std::mem::take(&mut waiting) {
                w.ep.close();
            }
            for ep in arrived {
                ep.close();
            }
            lobby.stopped.store(true, Ordering::Release);
            return;
        }
        for ep in arrived {
            if waiting.len() >= LOBBY_MAX {
                if let Some((_, oldest)) = waiting.pop_first() {
                    tracing::warn!(
                        peer = %oldest.ep.peer_addr(),
                        "{LOBBY_MAX} channels wait for their Connect: closing the one that waited longest"
                    );
                    oldest.ep.close();
                }
            }
            waiting.insert(
                next_id,
                Waiting {
                    ep,
                    deadline: Instant::now() + CONNECT_TIMEOUT,
                    phase: Phase::Connect,
                },
            );
            ready.push(next_id);
            next_id += 1;
        }
        ready.sort_unstable();
        ready.dedup();
        for id in ready {
            if let Some(w) = waiting.remove(&id) {
                if let Some(w) = step(shared, lobby, id, w) {
                    waiting.insert(id, w);
                }
            }
        }
        let now = Instant::now();
        waiting.retain(|_, w| {
            if w.deadline > now {
                return true;
            }
            if matches!(w.phase, Phase::Connect) {
                tracing::warn!(peer = %w.ep.peer_addr(), "no Connect command within {CONNECT_TIMEOUT:?}");
            }
            w.ep.close();
            false
        });
        let next = waiting.values().map(|w| w.deadline).min();
        let sleep = next.map_or(LOBBY_TICK, |d| d.saturating_duration_since(now).min(LOBBY_TICK));
        std::thread::park_timeout(sleep);
    }
}

/// Moves one channel on; `None` once it left the lobby.
fn step(shared: &Arc<Shared>, lobby: &Arc<Lobby>, id: u64, mut w: Waiting) -> Option<Waiting> {
    let waker = Waker::from(Arc::new(EntryWake {
        lobby: Arc::downgrade(lobby),
        id,
    }));
    let mut cx = Context::from_waker(&waker);
    loop {
        match &mut w.phase {
            Phase::Connect => {
                let polled = std::pin::pin!(w.ep.recv_async()).poll(&mut cx);
                let d = match polled {
                    Poll::Pending => {
                        // Nobody drives the channel until the capsule comes:
                        // the fabric's fallback takes over now, not after
                        // the lease of the poll above.
                        w.ep.step_away();
                        return Some(w);
                    }
                    Poll::Ready(Ok(d)) => d,
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(peer = %w.ep.peer_addr(), "channel closed before its Connect: {e}");
                        w.ep.close();
                        return None;
                    }
                };
                match queue::admit_first(shared, &w.ep, d) {
                    Admission::Admitted(admitted) => {
                        match shared.workers.get() {
                            Some(workers) => workers.assign(w.ep, admitted),
                            None => w.ep.close(),
                        }
                        return None;
                    }
                    Admission::Refused(Some(ticket)) => {
                        w.phase = Phase::Answered(Box::pin(ticket.completion()));
                        w.deadline = Instant::now() + REPLY_GRACE;
                    }
                    Admission::Refused(None) => {
                        w.ep.close();
                        return None;
                    }
                }
            }
            Phase::Answered(acknowledged) => {
                if acknowledged.as_mut().poll(&mut cx).is_pending() {
                    return Some(w);
                }
                w.ep.close();
                return None;
            }
        }
    }
}
