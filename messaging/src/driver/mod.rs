//! The thin driver: an [`Endpoint`] runs a protocol [`Connection`] over a
//! fabric [`QueuePair`], with blocking and async forms of every call.
//!
//! # Threading model
//! An `Endpoint` is `Clone + Send + Sync`; clones share one channel. There
//! is no driver thread: whichever thread calls into the endpoint reaps the
//! queue pair's completions, feeds them to the protocol core, posts the
//! work it asks for and routes its events (deliveries to the inbox, send
//! results to their [`Ticket`]s). A caller that must wait first polls
//! briefly (`CHANIO_SPIN_US`, 50 µs by default); then, on a provider that
//! makes progress in [`QueuePair::wait`] (tcp, shm), one waiting thread
//! drives the transport itself (run to completion: no thread hop between
//! the transport and the waiter) while the others sleep on a condvar that
//! the provider's completion notification wakes. Async futures register
//! their `Waker` with the same notification, so they need no particular
//! runtime (tokio is not required). Providers may have their own threads
//! (tcp and shm keep one per queue pair as the fallback for when no caller
//! drives), the driver none. [`Endpoint::cork`] batches posting.
//!
//! # Resource cleanup
//! Dropping a [`Delivery`] gives its buffer or slot back to the peer.
//! Dropping a [`Ticket`] forgets the send's result, not the send. The
//! channel disconnects when the last `Endpoint` clone, `Ticket` and
//! `Delivery` of it are gone; requests in flight are then flushed.

use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use slab::Slab;

use crate::mr::{Access, Buf, BufPool};
use crate::proto::{
    CloseReason, Config, Connection, DirectPush, DirectTarget, Event, ProtoError, PushError, Received, ReceivedKind,
    SendError, Work,
};
use crate::provider::{Completion, Fabric, FabricError, Incoming, Listener, QueuePair, WcStatus};

mod handles;
mod parts;
mod progress;
mod recv;
mod send;

pub use handles::{Cork, Delivery, Ticket};
pub use parts::{FillError, Parts};
use progress::*;
use recv::*;

/// Errors of the endpoint API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Setting up the fabric connection failed.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// Setting up the protocol failed (configuration, registration, or the
    /// peer's parameters).
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The connection closed.
    #[error("connection closed: {0}")]
    Closed(CloseReason),
    /// A send or push failed on the fabric.
    #[error("transfer failed: {0}")]
    Transfer(WcStatus),
    /// The payload exceeds what the peer accepts.
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The operation would have to wait (non-blocking calls only).
    #[error("would block")]
    WouldBlock,
    /// A timed wait expired.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The buffer cannot be used for this operation.
    #[error("unusable buffer: {0}")]
    BadBuffer(&'static str),
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Error {
        match e {
            SendError::Full => Error::WouldBlock,
            SendError::TooLarge { len, max } => Error::TooLarge { len, max },
            SendError::BadBuffer(what) => Error::BadBuffer(what),
            SendError::NotConnected => Error::Closed(CloseReason::LocalError("not connected".into())),
            SendError::Closed(r) => Error::Closed(r),
        }
    }
}

/// One side of a push-push channel over a fabric.
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
}

struct Shared {
    qp: Box<dyn QueuePair>,
    inner: Mutex<Inner>,
    /// Wake-ups. The provider's notification holds only this (never the
    /// `Shared`), so a completion can never drop the last endpoint handle
    /// from inside the provider.
    signal: Arc<Signal>,
    /// Buffers for copy-in pushes, registered at the first such push (the
    /// peer may grant its slots only after the hello).
    staging: std::sync::OnceLock<BufPool>,
    pub(super) domain: crate::mr::ProtectionDomain,
    pub(super) fabric: &'static str,
    peer: String,
    /// The provider makes progress in [`QueuePair::wait`]: one waiting
    /// thread at a time drives it there (run to completion).
    driven: bool,
}

struct Inner {
    conn: Connection,
    inbox: std::collections::VecDeque<Received>,
    tickets: Slab<TicketState>,
    closed: Option<CloseReason>,
    scratch: Vec<Completion>,
    /// Open [`Cork`]s: while any, sends wait in `held` to go out as one batch.
    corks: usize,
    held: Vec<crate::provider::SendWr>,
    /// The placements of `held`'s requests, one each, while any of them
    /// is a placed Write ([`Work::SendPlaced`]); empty otherwise.
    held_placements: Vec<Option<u64>>,
}

struct TicketState {
    result: Option<Result<(), WcStatus>>,
    /// A one-sided transfer's buffer, handed back with its result.
    buf: Option<crate::mr::Buf>,
    detached: bool,
}

/// What an endpoint keeps of the fabric it runs on.
struct FabricRef {
    name: &'static str,
    domain: crate::mr::ProtectionDomain,
}

/// How long a waiting thread polls before it sleeps (adaptive polling: a
/// reply already on its way costs no sleep and wake-up, a quiet channel
/// costs one short spin per wait), unless the environment variable
/// `CHANIO_SPIN_US` says otherwise (0 disables spinning). On a driven
/// provider (tcp) the spin reads the transport itself, so it never starves
/// the provider's fallback.
const DEFAULT_SPIN: Duration = Duration::from_micros(50);

fn spin_budget() -> Duration {
    std::env::var("CHANIO_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_SPIN, Duration::from_micros)
}

/// How many staging buffers an endpoint keeps for copy-in pushes.
const STAGING_BUFFERS: usize = 8;
const POLL_BATCH: usize = 64;

impl Endpoint {
    /// Connects to `addr` on `fabric` with `cfg`, in a protection domain
    /// of the channel's own (a [`child`](crate::mr::ProtectionDomain::child)
    /// of the fabric's): the peer reaches only what is registered in
    /// [`Endpoint::domain`].
    ///
    /// # Errors
    /// Fabric errors (address, refused, handshake), protocol set-up errors.
    pub fn connect(fabric: &dyn Fabric, addr: &str, cfg: Config) -> Result<Endpoint, Error> {
        let domain = fabric.domain().child().map_err(ProtoError::Register)?;
        Endpoint::connect_in(fabric, &domain, addr, cfg)
    }

    /// As [`Endpoint::connect`], in `domain`: the fabric's domain or a
    /// child of it that several channels share (a host's queues to one
    /// I/O unit, which all reach the same buffers).
    ///
    /// # Errors
    /// As [`Endpoint::connect`]; `ForeignDomain` for a domain not made
    /// from the fabric's.
    pub fn connect_in(
        fabric: &dyn Fabric,
        domain: &crate::mr::ProtectionDomain,
        addr: &str,
        cfg: Config,
    ) -> Result<Endpoint, Error> {
        let mut conn = Connection::new(domain, cfg)?;
        let params = conn.local_params();
        let qp = fabric.connect(addr, domain, &params, conn.initial_recvs())?;
        let fabric = FabricRef {
            name: fabric.name(),
            domain: domain.clone(),
        };
        Endpoint::start_on(&fabric, conn, qp)
    }

    /// Accepts the next connection on `listener` (created by `fabric`). A
    /// peer whose parameters are refused is rejected with the reason and
    /// this call returns the error; the listener keeps serving.
    ///
    /// # Errors
    /// `Timeout`, `Shutdown`, protocol set-up errors.
    pub fn accept(
        fabric: &dyn Fabric,
        listener: &dyn Listener,
        cfg: Config,
        timeout: Option<Duration>,
    ) -> Result<Endpoint, Error> {
        let incoming = listener.accept(timeout)?;
        debug_assert_eq!(incoming.fabric().name(), fabric.name());
        Endpoint::accept_incoming(incoming, cfg)
    }

    /// Accepts a connection request already taken from a listener, on the
    /// fabric it arrived on (what a listener over several fabrics needs),
    /// in a protection domain of the channel's own, as
    /// [`Endpoint::connect`] does. A peer whose parameters are refused is
    /// rejected with the reason.
    ///
    /// # Errors
    /// Protocol set-up errors, transport errors while answering.
    pub fn accept_incoming(incoming: Box<dyn Incoming>, cfg: Config) -> Result<Endpoint, Error> {
        if let Err(e) = crate::proto::wire::Params::decode(incoming.peer_params()) {
            tracing::warn!(peer = %incoming.peer_addr(), "refusing connection: {e}");
            incoming.reject(&e.to_string());
            return Err(Error::Proto(ProtoError::BadParams(e)));
        }
        let domain = match incoming.fabric().domain().child() {
            Ok(domain) => domain,
            Err(e) => {
                tracing::error!(peer = %incoming.peer_addr(), "refusing connection: no protection domain: {e}");
                incoming.reject(&format!("the server cannot set up a connection: {e}"));
                return Err(ProtoError::Register(e).into());
            }
        };
        let mut conn = match Connection::new(&domain, cfg) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(peer = %incoming.peer_addr(), "refusing connection: {e}");
                incoming.reject(&format!("the server cannot set up a connection: {e}"));
                return Err(e.into());
            }
        };
        if let Err(e) = conn.check_peer(incoming.peer_params(), incoming.fabric().capabilities()) {
            tracing::warn!(peer = %incoming.peer_addr(), "refusing connection: {e}");
            incoming.reject(&e.to_string());
            return Err(e.into());
        }
        let params = conn.local_params();
        let fabric = FabricRef {
            name: incoming.fabric().name(),
            domain: domain.clone(),
        };
        let qp = incoming.accept(&domain, &params, conn.initial_recvs())?;
        Endpoint::start_on(&fabric, conn, qp)
    }

    fn start_on(fabric: &FabricRef, mut conn: Connection, qp: Box<dyn QueuePair>) -> Result<Endpoint, Error> {
        if let Err(e) = conn.handle_connected(qp.peer_params(), qp.capabilities()) {
            qp.disconnect();
            return Err(e.into());
        }
        let peer = qp.peer_addr();
        tracing::debug!(fabric = fabric.name, %peer, separate = conn.separate_indication(), "channel open");
        let driven = qp.drives_on_wait();
        let shared = Arc::new(Shared {
            qp,
            inner: Mutex::new(Inner {
                conn,
                inbox: Default::default(),
                tickets: Slab::new(),
                closed: None,
                scratch: Vec::with_capacity(POLL_BATCH),
                corks: 0,
                held: Vec::new(),
                held_placements: Vec::new(),
            }),
            signal: Arc::new(Signal {
                generation: AtomicU64::new(0),
                driving: AtomicBool::new(false),
                quiet: AtomicBool::new(false),
                sleepers: AtomicUsize::new(0),
                blocked_senders: AtomicUsize::new(0),
                sleep_lock: Mutex::new(()),
                spin: spin_budget(),
                wake: Condvar::new(),
                wakers: Mutex::new(Vec::new()),
            }),
            staging: std::sync::OnceLock::new(),
            domain: fabric.domain.clone(),
            fabric: fabric.name,
            peer,
            driven,
        });
        let signal = shared.signal.clone();
        shared.qp.set_notify(Some(Arc::new(move || signal.signal())));
        Ok(Endpoint { shared })
    }

    /// Grows the channel to `cfg` (see [`Connection::grow`]): more
    /// receives for the peer, more send buffers, and push slots where the
    /// hello granted none. What a server does once the peer identified
    /// itself, having accepted it with a small configuration.
    ///
    /// # Errors
    /// `Closed`; `Proto` when `cfg` shrinks or changes what cannot change,
    /// or registering fails (the channel is unchanged then).
    pub fn grow(&self, cfg: Config) -> Result<(), Error> {
        let mut inner = self.shared.inner.lock();
        if let Some(reason) = &inner.closed {
            return Err(Error::Closed(reason.clone()));
        }
        inner.conn.grow(&self.shared.domain, cfg)?;
        self.shared.flush(&mut inner);
        Ok(())
    }

    /// Credits held now for the peer's receives (diagnostics and tests).
    pub fn credits(&self) -> u32 {
        self.shared.inner.lock().conn.credits()
    }

    /// Name of the fabric provider carrying this channel.
    pub fn fabric(&self) -> &'static str {
        self.shared.fabric
    }

    /// Shares memory owned elsewhere with the peer process, where the
    /// fabric moves data between processes through shared memory (shm) and
    /// the peer runs as this process's user: the peer maps it with
    /// [`Endpoint::peer_memory`] under the returned token and reads and
    /// writes all of it itself, beyond any key's bounds or revocation
    /// (`QueuePair::share_memory`). `Ok(None)` where the fabric does not
    /// share (tcp, verbs, loopback; memory without a memfd).
    ///
    /// # Errors
    /// The fabric's error when the memory cannot be sent.
    pub fn share_memory(&self, memory: &dyn crate::mr::ExternalMemory) -> Result<Option<u64>, Error> {
        Ok(self.shared.qp.share_memory(memory)?)
    }

    /// The memory the peer shared under `token` ([`Endpoint::share_memory`]
    /// on its side), mapped here; `Ok(None)` where the fabric does not
    /// share memory.
    ///
    /// # Errors
    /// The fabric's error when the peer never sent it or it cannot be
    /// mapped safely.
    pub fn peer_memory(&self, token: u64) -> Result<Option<crate::provider::PeerMemory>, Error> {
        Ok(self.shared.qp.peer_memory(token)?)
    }

    /// The channel's protection domain: register buffers to expose on this
    /// channel here (the peer reaches nothing else). Buffers to send or
    /// push from may also come from the fabric's domain.
    pub fn domain(&self) -> &crate::mr::ProtectionDomain {
        &self.shared.domain
    }

    /// The peer's address, for logs.
    pub fn peer_addr(&self) -> &str {
        &self.shared.peer
    }

    /// Largest message [`Endpoint::send`] accepts.
    pub fn max_message(&self) -> usize {
        self.shared.inner.lock().conn.max_message()
    }

    /// Largest push [`Endpoint::push`] accepts.
    pub fn max_push(&self) -> usize {
        self.shared.inner.lock().conn.max_push()
    }

    /// Whether transfer indications travel as separate messages.
    pub fn separate_indication(&self) -> bool {
        self.shared.inner.lock().conn.separate_indication()
    }

    /// Why the channel closed, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.inner.lock().closed.clone()
    }

    /// Whether the channel's queue pair failed or was disconnected (by
    /// either side): one atomic load and no lock, for a path that does not
    /// otherwise touch the channel (copies into memory the peer shared).
    /// [`Endpoint::close_reason`] says why, once the channel saw it.
    pub fn is_failed(&self) -> bool {
        self.shared.qp.is_failed()
    }

    /// Hands the channel's progress to the provider's fallback until a
    /// caller drives again: for a thread about to sleep elsewhere (an
    /// io_uring, an event loop) after registering a waker through
    /// [`Endpoint::recv_async`], so that what arrives meanwhile is read
    /// and wakes it at once rather than after the last caller's lease.
    /// Held sends are posted first.
    pub fn step_away(&self) {
        self.shared.post_held();
        self.shared.qp.step_away();
    }

    /// Makes a thread that waits in this endpoint (`wait_progress`, a
    /// blocking receive or send) look again now, as if something moved:
    /// for an event loop that sleeps in one channel while other sources
    /// may need it. A wait that finds nothing new goes back to sleep,
    /// except `wait_progress`, which returns.
    pub fn wake_waiters(&self) {
        self.shared.signal.wake_sleepers();
        self.shared.qp.interrupt();
    }

    /// Holds back posting until the returned guard drops, so that the sends
    /// and pushes made meanwhile reach the fabric as one batch (one system
    /// call on tcp): what a server answering several requests at once wants.
    /// A call that must wait (or a future that returns pending) posts what
    /// was held first, so a cork never blocks its own progress.
    ///
    /// A cork batches behind traffic, not behind nothing: while none of
    /// this side's sends is in flight (everything posted before completed
    /// and was reaped), what is sent goes out at once, and only what
    /// follows while it travels is held (as TCP's autocork). An idle
    /// channel thus pays no batching delay, a busy one gets its batches.
    pub fn cork(&self) -> Cork<'_> {
        self.shared.inner.lock().corks += 1;
        Cork { shared: &self.shared }
    }

    /// Closes the channel; requests in flight complete with errors.
    pub fn close(&self) {
        let mut inner = self.shared.inner.lock();
        inner.conn.close();
        self.shared.progress(&mut inner);
    }
}
