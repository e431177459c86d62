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

/// Why [`Endpoint::push_direct_fill`] pushed nothing.
#[derive(Debug, thiserror::Error)]
pub enum FillError<E> {
    /// The fill function failed, with its error.
    #[error("filling the push failed: {0}")]
    Fill(E),
    /// The push itself failed.
    #[error(transparent)]
    Push(Error),
}

/// The bytes of one message: one slice, or several parts sent in order as
/// one message. Made from `&[u8]`, `&[u8; N]`, `&Vec<u8>` and slices or
/// arrays of `&[u8]`.
#[derive(Debug, Clone, Copy)]
pub enum Parts<'a> {
    /// The whole message.
    One(&'a [u8]),
    /// The message's parts, in order.
    Many(&'a [&'a [u8]]),
}

impl<'a> Parts<'a> {
    /// The parts as slices.
    pub fn as_slices(&self) -> &[&'a [u8]] {
        match self {
            Parts::One(one) => std::slice::from_ref(one),
            Parts::Many(many) => many,
        }
    }
}

impl<'a> From<&'a [u8]> for Parts<'a> {
    fn from(one: &'a [u8]) -> Self {
        Parts::One(one)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Parts<'a> {
    fn from(one: &'a [u8; N]) -> Self {
        Parts::One(one)
    }
}

impl<'a> From<&'a Vec<u8>> for Parts<'a> {
    fn from(one: &'a Vec<u8>) -> Self {
        Parts::One(one)
    }
}

impl<'a> From<&'a [&'a [u8]]> for Parts<'a> {
    fn from(many: &'a [&'a [u8]]) -> Self {
        Parts::Many(many)
    }
}

impl<'a, const N: usize> From<&'a [&'a [u8]; N]> for Parts<'a> {
    fn from(many: &'a [&'a [u8]; N]) -> Self {
        Parts::Many(many)
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
    staging: Option<BufPool>,
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
}

struct TicketState {
    result: Option<Result<(), WcStatus>>,
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
/// a provider thread.
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
        let staging = if conn.max_push() > 0 {
            Some(
                fabric
                    .domain
                    .register(conn.max_push(), STAGING_BUFFERS, Access::LOCAL_WRITE)
                    .map_err(ProtoError::Register)?,
            )
        } else {
            None
        };
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
            staging,
            domain: fabric.domain.clone(),
            fabric: fabric.name,
            peer,
            driven,
        });
        let signal = shared.signal.clone();
        shared.qp.set_notify(Some(Arc::new(move || signal.signal())));
        Ok(Endpoint { shared })
    }

    /// Name of the fabric provider carrying this channel.
    pub fn fabric(&self) -> &'static str {
        self.shared.fabric
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

    /// Sends one message, gathered from its parts (one slice, or several
    /// sent in order as one message: a header and a payload go out without
    /// first being joined), copied into a registered send buffer. Waits
    /// while the peer has no receive credit for us.
    ///
    /// ```no_run
    /// # fn f(ep: &messaging::Endpoint) -> Result<(), messaging::Error> {
    /// ep.send(b"hello")?.wait()?;
    /// let header = [1u8, 2];
    /// ep.send(&[&header[..], b"payload"])?.detach();
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `TooLarge`, `Closed`.
    pub fn send<'a>(&self, message: impl Into<Parts<'a>>) -> Result<Ticket, Error> {
        let parts = message.into();
        self.blocking(None, |inner, token| inner.conn.send(token, parts.as_slices()))
    }

    /// As [`Endpoint::send`], but fails with `WouldBlock` instead of waiting.
    ///
    /// # Errors
    /// `WouldBlock`, `TooLarge`, `Closed`.
    pub fn try_send<'a>(&self, message: impl Into<Parts<'a>>) -> Result<Ticket, Error> {
        let parts = message.into();
        self.attempt(|inner, token| inner.conn.send(token, parts.as_slices()))?
            .map(|key| self.ticket(key))
            .ok_or(Error::WouldBlock)
    }

    /// Async form of [`Endpoint::send`].
    pub fn send_async<'a>(&'a self, message: impl Into<Parts<'a>>) -> impl Future<Output = Result<Ticket, Error>> + 'a {
        let parts = message.into();
        self.async_op(move |inner, token| inner.conn.send(token, parts.as_slices()))
    }

    /// Pushes `data` into a slot the peer granted (copied once into a
    /// registered staging buffer), waiting for a slot and a credit.
    ///
    /// # Errors
    /// `TooLarge`, `Closed`.
    pub fn push(&self, data: &[u8]) -> Result<Ticket, Error> {
        let buf = self.staging_buf(data, None)?;
        self.push_buf(buf)
    }

    /// Pushes a registered buffer without copying, waiting for a slot and a
    /// credit. The buffer returns to its pool when the push completes.
    ///
    /// # Errors
    /// `TooLarge`, `Closed`.
    pub fn push_buf(&self, buf: Buf) -> Result<Ticket, Error> {
        let mut slot = Some(buf);
        self.blocking(None, |inner, token| push_with(&mut slot, |b| inner.conn.push(token, b)))
    }

    /// Async form of [`Endpoint::push_buf`].
    pub fn push_buf_async(&self, buf: Buf) -> impl Future<Output = Result<Ticket, Error>> + '_ {
        let mut slot = Some(buf);
        self.async_op(move |inner, token| push_with(&mut slot, |b| inner.conn.push(token, b)))
    }

    /// Pushes a registered buffer straight into a buffer the peer exposed.
    ///
    /// # Errors
    /// `TooLarge`, `Closed`.
    pub fn push_direct(&self, buf: Buf, push: DirectPush) -> Result<Ticket, Error> {
        let mut slot = Some(buf);
        self.blocking(None, |inner, token| {
            push_with(&mut slot, |b| inner.conn.push_direct(token, b, push))
        })
    }

    /// Fills `len` bytes for the peer's exposed target and pushes them, as
    /// [`Endpoint::push_direct`] of a `buf` that `fill` wrote. Where the
    /// provider lets the initiator copy into the peer's memory (shm, once
    /// the peer granted the target's region: after a first push into it),
    /// `fill` writes straight into the target and `buf` only stands for the
    /// push (its bytes are not sent): one copy fewer. Elsewhere `fill`
    /// writes `buf`, which is pushed.
    ///
    /// `fill` runs while the provider holds its locks: it must only write
    /// its slice (all `len` bytes), never call into this endpoint.
    ///
    /// # Errors
    /// [`FillError::Fill`]: `fill`'s error; nothing was pushed (the target
    /// may hold part of the data, as after a failed transfer).
    /// [`FillError::Push`]: as [`Endpoint::push_direct`], `TooLarge` also
    /// when `len` exceeds `buf`.
    pub fn push_direct_fill<E>(
        &self,
        mut buf: Buf,
        push: DirectPush,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Ticket, FillError<E>> {
        let target = push.target;
        let max = buf.capacity().min(target.remote.len as usize);
        if len > max {
            return Err(FillError::Push(Error::TooLarge { len, max }));
        }
        buf.set_len(len);
        let remote = crate::provider::RemoteAddr {
            addr: target.remote.addr,
            rkey: target.remote.rkey,
        };
        let mut fill = Some(fill);
        let mut filled = Ok(());
        let placement = self.shared.qp.place(remote, len, &mut |dest| {
            if let Some(f) = fill.take() {
                filled = f(dest);
            }
        });
        let placement = match (placement, fill) {
            (Some(p), None) => Some(p),
            // Not placed: the data goes the usual way, from `buf`.
            (_, Some(f)) => {
                f(&mut buf).map_err(FillError::Fill)?;
                None
            }
            (None, None) => {
                return Err(FillError::Push(Error::BadBuffer(
                    "the fabric filled a placement it then refused",
                )))
            }
        };
        filled.map_err(FillError::Fill)?;
        let mut slot = Some(buf);
        self.blocking(None, |inner, token| {
            push_with(&mut slot, |b| match placement {
                Some(placement) => inner.conn.push_placed(token, b, push, placement),
                None => inner.conn.push_direct(token, b, push),
            })
        })
        .map_err(FillError::Push)
    }

    /// Runs the channel's progress and, unless that moved anything (a
    /// completion reaped, a message or event routed), waits up to
    /// `timeout` for something to move: how a caller waits for resources
    /// that completions give back (the buffers of detached pushes).
    ///
    /// # Errors
    /// `Closed` once the channel is closed; `Timeout` when nothing moved.
    pub fn wait_progress(&self, timeout: Duration) -> Result<(), Error> {
        let generation = self.shared.signal.generation.load(Ordering::SeqCst);
        {
            let mut inner = self.shared.inner.lock();
            self.shared.progress(&mut inner);
            if let Some(reason) = inner.closed.clone() {
                return Err(Error::Closed(reason));
            }
        }
        if self.shared.signal.generation.load(Ordering::SeqCst) != generation {
            return Ok(());
        }
        self.shared.sleep(generation, Some(Instant::now() + timeout))
    }

    /// A staging buffer of [`Endpoint::max_push`] bytes to fill and hand to
    /// [`Endpoint::push_buf`] (zero-copy pushes), waiting while all are in use.
    ///
    /// # Errors
    /// `Closed`; `BadBuffer` when the peer granted no slots.
    pub fn alloc_push_buf(&self) -> Result<Buf, Error> {
        self.staging_buf(&[], None)
    }

    /// Exposes a buffer (registered with local and remote write in
    /// [`Endpoint::domain`]) for the peer to push into directly; send the
    /// returned target to the peer.
    ///
    /// # Errors
    /// `BadBuffer` (with the buffer dropped) if it lacks remote write or
    /// was registered in another domain (the peer could not reach it).
    pub fn expose(&self, buf: Buf) -> Result<DirectTarget, Error> {
        if !self.shared.domain.holds(&buf) {
            return Err(Error::BadBuffer(
                "an exposed buffer must be registered in the channel's domain (Endpoint::domain)",
            ));
        }
        self.shared
            .inner
            .lock()
            .conn
            .expose(buf)
            .map_err(|_| Error::BadBuffer("direct placement needs local and remote write access"))
    }

    /// Withdraws an exposure the peer did not push to (for example after
    /// the request that advertised it failed), handing the buffer back.
    /// `None` if the tag is not exposed (already pushed to, or unknown).
    pub fn unexpose(&self, tag: u16) -> Option<Buf> {
        self.shared.inner.lock().conn.unexpose(tag)
    }

    /// Waits for the next delivery.
    ///
    /// # Errors
    /// `Closed` once the channel closed and every earlier delivery was taken.
    pub fn recv(&self) -> Result<Delivery, Error> {
        self.recv_deadline(None)
    }

    /// As [`Endpoint::recv`] with a timeout.
    ///
    /// # Errors
    /// `Timeout`, `Closed`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Delivery, Error> {
        self.recv_deadline(Some(Instant::now() + timeout)).map_err(|e| match e {
            Error::Timeout(_) => Error::Timeout(timeout),
            e => e,
        })
    }

    /// The next delivery if one is ready.
    ///
    /// # Errors
    /// `WouldBlock`, `Closed`.
    pub fn try_recv(&self) -> Result<Delivery, Error> {
        match self.shared.take_ready() {
            Some(r) => r.map(|r| self.delivery(r)),
            None => Err(Error::WouldBlock),
        }
    }

    /// The next delivery already received (by an earlier wait, or by the
    /// provider's own thread), without driving the fabric for more: for a
    /// thread draining a batch, whose next step (posting answers, waking the
    /// callers whose completions it handled) should not wait for a poll of
    /// the transport that most often finds nothing.
    ///
    /// # Errors
    /// `WouldBlock`, `Closed`.
    pub fn try_recv_taken(&self) -> Result<Delivery, Error> {
        match self.shared.take_received() {
            Some(r) => r.map(|r| self.delivery(r)),
            None => Err(Error::WouldBlock),
        }
    }

    /// Async form of [`Endpoint::recv`].
    pub fn recv_async(&self) -> impl Future<Output = Result<Delivery, Error>> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered only to wait, as in `async_op`.
            if let Some(r) = self.shared.take_ready() {
                return Poll::Ready(r.map(|r| self.delivery(r)));
            }
            self.shared.signal.register(cx.waker());
            match self.shared.take_received() {
                Some(r) => Poll::Ready(r.map(|r| self.delivery(r))),
                None => {
                    self.shared.post_held();
                    Poll::Pending
                }
            }
        })
    }

    /// Hands the channel's progress to the provider's own thread until a
    /// caller drives again: for a thread about to sleep elsewhere (an
    /// io_uring, an event loop) after registering a waker through
    /// [`Endpoint::recv_async`], so that what arrives meanwhile is read
    /// and wakes it at once rather than after the last caller's lease.
    /// Held sends are posted first.
    pub fn step_away(&self) {
        self.shared.post_held();
        self.shared.qp.step_away();
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

    fn recv_deadline(&self, deadline: Option<Instant>) -> Result<Delivery, Error> {
        let r = self.shared.wait(deadline, take_delivery)?;
        r.map(|r| self.delivery(r))
    }

    fn delivery(&self, received: Received) -> Delivery {
        Delivery {
            received: Some(received),
            shared: self.shared.clone(),
        }
    }

    /// The handle of the transfer whose ticket is `key`.
    fn ticket(&self, key: usize) -> Ticket {
        Ticket {
            shared: self.shared.clone(),
            key,
            done: false,
        }
    }

    /// One attempt of a send-like operation: the key of its ticket, or
    /// `Ok(None)` when it must wait.
    fn attempt(&self, mut op: impl FnMut(&mut Inner, u64) -> Result<(), SendError>) -> Result<Option<usize>, Error> {
        let mut inner = self.shared.inner.lock();
        let key = inner.tickets.insert(TicketState {
            result: None,
            detached: false,
        });
        // Optimistic: the operation first, on what the last progress left;
        // only when it finds no credit or room does a round of progress
        // (which may free some) come first, then the one retry. A message
        // that fits leaves with one round of progress instead of two.
        let mut outcome = op(&mut inner, key as u64);
        if matches!(outcome, Err(SendError::Full)) {
            self.shared.progress(&mut inner);
            outcome = op(&mut inner, key as u64);
        }
        match outcome {
            Ok(()) => {
                // Hands the queued work to the provider (or to the cork's
                // batch). Not a whole round of progress: reaping completions
                // is for whoever waits, and posting a send frees nothing a
                // waiter could want, so it signals no one. Events, should
                // the operation have routed any, are signalled as usual.
                let (_, routed) = self.shared.flush(&mut inner);
                if routed {
                    self.shared.signal.signal();
                    self.shared.routed();
                }
                Ok(Some(key))
            }
            Err(e) => {
                inner.tickets.remove(key);
                match e {
                    SendError::Full => Ok(None),
                    e => Err(e.into()),
                }
            }
        }
    }

    /// Runs a send-like operation, waiting (until `deadline`) while it
    /// finds no credit or room.
    fn blocking(
        &self,
        deadline: Option<Instant>,
        mut op: impl FnMut(&mut Inner, u64) -> Result<(), SendError>,
    ) -> Result<Ticket, Error> {
        loop {
            let generation = self.shared.signal.generation.load(Ordering::SeqCst);
            if let Some(key) = self.attempt(&mut op)? {
                return Ok(self.ticket(key));
            }
            // Counted while asleep: credits or room that another thread's
            // progress frees move no event, so that progress must interrupt
            // a driver (which may be this thread) by itself.
            let signal = &self.shared.signal;
            signal.blocked_senders.fetch_add(1, Ordering::SeqCst);
            let slept = self.shared.sleep(generation, deadline);
            signal.blocked_senders.fetch_sub(1, Ordering::SeqCst);
            slept?;
        }
    }

    /// Async form of [`Endpoint::blocking`].
    fn async_op<'a>(
        &'a self,
        mut op: impl FnMut(&mut Inner, u64) -> Result<(), SendError> + 'a,
    ) -> impl Future<Output = Result<Ticket, Error>> + 'a {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            // The waker is registered only when the operation must wait (and
            // then the operation is tried once more, in case what it waits
            // for came before the registration): one registered on every
            // call would be woken by the next signal, this call's own
            // progress included, and its task polled again for nothing.
            match self.attempt(&mut op) {
                Ok(Some(key)) => return Poll::Ready(Ok(self.ticket(key))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            self.shared.signal.register(cx.waker());
            match self.attempt(&mut op) {
                Ok(Some(key)) => Poll::Ready(Ok(self.ticket(key))),
                Ok(None) => {
                    self.shared.post_held();
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(e)),
            }
        })
    }

    fn staging_buf(&self, data: &[u8], deadline: Option<Instant>) -> Result<Buf, Error> {
        let pool = self
            .shared
            .staging
            .as_ref()
            .filter(|_| self.max_push() > 0)
            .ok_or(Error::BadBuffer("the peer granted no push slots"))?;
        if data.len() > pool.chunk_size() {
            return Err(Error::TooLarge {
                len: data.len(),
                max: pool.chunk_size(),
            });
        }
        let mut buf = self.shared.wait(deadline, |inner| match &inner.closed {
            Some(reason) => Some(Err(Error::Closed(reason.clone()))),
            None => pool.checkout().map(Ok),
        })??;
        buf.fill(data).map_err(|max| Error::TooLarge { len: data.len(), max })?;
        Ok(buf)
    }
}

fn push_with(slot: &mut Option<Buf>, op: impl FnOnce(Buf) -> Result<(), PushError>) -> Result<(), SendError> {
    let buf = slot.take().ok_or(SendError::BadBuffer("buffer already pushed"))?;
    op(buf).map_err(|e| {
        *slot = Some(e.buf);
        e.error
    })
}

fn take_delivery(inner: &mut Inner) -> Option<Result<Received, Error>> {
    if let Some(r) = inner.inbox.pop_front() {
        return Some(Ok(r));
    }
    inner.closed.clone().map(|r| Err(Error::Closed(r)))
}

impl Shared {
    /// Waits until the generation moves past `seen` or `deadline` passes.
    /// On a provider that makes progress in `wait`, one waiting thread
    /// drives it (reading the transport itself, so its completion reaches it
    /// without a thread hop); the others sleep on the signal.
    fn sleep(&self, seen: u64, deadline: Option<Instant>) -> Result<(), Error> {
        self.post_held();
        if !self.driven || self.signal.driving.swap(true, Ordering::SeqCst) {
            return self.signal.sleep(seen, deadline);
        }
        let result = self.drive(seen, deadline);
        self.signal.driving.store(false, Ordering::SeqCst);
        // A thread that slept while this one drove takes over if it still waits.
        self.signal.wake_sleepers();
        result
    }

    fn drive(&self, seen: u64, deadline: Option<Instant>) -> Result<(), Error> {
        let moved = || self.signal.generation.load(Ordering::SeqCst) != seen;
        if self.signal.should_spin() {
            // Adaptive polling: a reply already on its way costs no sleep.
            let until = Instant::now() + self.signal.spin;
            loop {
                // The clock is read once per 16 rounds: on shm a round is
                // only a look at the ring.
                for _ in 0..16 {
                    if moved() || self.qp.wait(Some(Duration::ZERO)) {
                        return Ok(());
                    }
                }
                if Instant::now() >= until {
                    break;
                }
            }
        }
        if moved() {
            return Ok(());
        }
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ready = timeout != Some(Duration::ZERO) && self.qp.wait(timeout);
        let timed_out = deadline.is_some_and(|d| !ready && !moved() && Instant::now() >= d);
        self.signal.note_outcome(timed_out);
        if timed_out {
            Err(Error::Timeout(Duration::ZERO))
        } else {
            Ok(())
        }
    }

    /// A delivery that is ready, without waiting: what earlier progress
    /// queued, else what one non-blocking round of provider progress brings.
    fn take_ready(&self) -> Option<Result<Received, Error>> {
        if let Some(r) = self.take_received() {
            return Some(r);
        }
        self.drive_once();
        self.take_received()
    }

    /// A delivery the provider already completed, after reaping its
    /// completion queue; the transport itself is not driven.
    fn take_received(&self) -> Option<Result<Received, Error>> {
        let mut inner = self.inner.lock();
        self.progress(&mut inner);
        take_delivery(&mut inner)
    }

    /// One non-blocking round of provider progress, when no thread drives.
    fn drive_once(&self) {
        if self.driven && !self.signal.driving.swap(true, Ordering::SeqCst) {
            self.qp.wait(Some(Duration::ZERO));
            self.signal.driving.store(false, Ordering::SeqCst);
            self.signal.wake_sleepers();
        }
    }

    /// Tells a thread driving the provider that events it may wait for were
    /// routed by another thread.
    fn routed(&self) {
        if self.signal.driving.load(Ordering::SeqCst) {
            self.qp.interrupt();
        }
    }

    /// Reaps completions, runs the core, posts its work and routes its events.
    fn progress(&self, inner: &mut Inner) {
        let mut changed = false;
        let mut routed = false;
        loop {
            let mut batch = std::mem::take(&mut inner.scratch);
            let n = self.qp.poll(&mut batch, POLL_BATCH);
            for c in batch.drain(..) {
                inner.conn.handle_completion(c);
            }
            inner.scratch = batch;
            let (m, r) = self.flush(inner);
            changed |= m;
            routed |= r;
            if n < POLL_BATCH {
                break;
            }
        }
        if changed {
            self.signal.signal();
        }
        // A driver blocked in the provider sees only its transport and the
        // kick: interrupt it for routed events, and for any change while a
        // blocking send waits for capacity (a credit update routes nothing;
        // missed, the sender would sleep in `poll` until the next frame,
        // forever if the peer waits for it in turn).
        if routed || (changed && self.signal.blocked_senders.load(Ordering::SeqCst) > 0) {
            self.routed();
        }
    }

    /// Posts the core's work and routes its events: whether anything moved,
    /// and whether events were routed.
    fn flush(&self, inner: &mut Inner) -> (bool, bool) {
        let mut moved = false;
        let mut routed = false;
        while let Some(work) = inner.conn.poll_work() {
            moved = true;
            match work {
                Work::Recv(wr) => {
                    if let Err((e, wr)) = self.qp.post_recv(wr) {
                        inner.conn.handle_recv_post_failure(e.to_string(), wr);
                    }
                }
                // Sends gather in `held` and leave as one batch below,
                // or when the last cork drops.
                Work::Send(wr) => inner.held.push(wr),
                Work::Disconnect => {
                    self.post_held_locked(inner);
                    self.qp.disconnect();
                }
            }
        }
        // Nothing of ours on the wire (everything posted before was
        // executed and reaped): a cork's batch would wait behind nothing,
        // so what is held goes out at once and later sends batch behind
        // it (see `Endpoint::cork`).
        let idle = !inner.held.is_empty() && inner.conn.inflight() == inner.held.len();
        if inner.corks == 0 || idle {
            self.post_held_locked(inner);
        }
        while let Some(event) = inner.conn.poll_event() {
            moved = true;
            routed = true;
            match event {
                Event::Received(r) => inner.inbox.push_back(r),
                Event::Sent { token, result } => {
                    let key = token as usize;
                    if let Some(t) = inner.tickets.get_mut(key) {
                        if t.detached {
                            inner.tickets.remove(key);
                        } else {
                            t.result = Some(result);
                        }
                    }
                }
                Event::Closed(reason) => inner.closed = Some(reason),
            }
        }
        (moved, routed)
    }

    /// Posts the sends a cork held back.
    fn post_held(&self) {
        self.post_held_locked(&mut self.inner.lock());
    }

    /// Posts the sends waiting in `held`, as one batch.
    fn post_held_locked(&self, inner: &mut Inner) {
        if !inner.held.is_empty() {
            if let Err(e) = self.qp.post_send(&mut inner.held) {
                let wrs = std::mem::take(&mut inner.held);
                inner.conn.handle_post_failure(e.to_string(), wrs);
            }
        }
    }

    /// Runs `check` after each bit of progress until it yields a value.
    fn wait<T>(&self, deadline: Option<Instant>, mut check: impl FnMut(&mut Inner) -> Option<T>) -> Result<T, Error> {
        loop {
            let seen = self.signal.generation.load(Ordering::SeqCst);
            {
                let mut inner = self.inner.lock();
                self.progress(&mut inner);
                if let Some(v) = check(&mut inner) {
                    return Ok(v);
                }
            }
            self.sleep(seen, deadline)?;
        }
    }
}

/// Wake-up state shared by an endpoint's waiters and its provider
/// notification.
struct Signal {
    /// Bumped whenever something may have changed.
    generation: AtomicU64,
    /// A thread drives the provider in `QueuePair::wait`.
    driving: AtomicBool,
    /// Threads in a blocking send-like call waiting for credits or room.
    blocked_senders: AtomicUsize,
    /// The last wait timed out with nothing (no spin next time).
    quiet: AtomicBool,
    /// Threads sleeping in `sleep`; `signal` takes the lock only if any.
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    wakers: Mutex<Vec<Waker>>,
    spin: Duration,
}

impl Signal {
    /// Wakes blocked threads and async tasks: something may have changed.
    fn signal(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        // A sleeper registers (under the lock) before it re-checks the
        // generation, so either it sees the new value or we see it here.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep_lock.lock();
            self.wake.notify_all();
        }
        let mut wakers = {
            let mut slot = self.wakers.lock();
            if slot.is_empty() {
                return;
            }
            std::mem::take(&mut *slot)
        };
        // Woken outside the lock (a waker may register again at once);
        // the emptied vector goes back for the next registrations, so that
        // an async caller's wait allocates nothing.
        for w in wakers.drain(..) {
            w.wake();
        }
        let mut slot = self.wakers.lock();
        if slot.is_empty() {
            *slot = wakers;
        }
    }

    /// Called after a thread stopped driving: moves the generation and
    /// wakes the threads sleeping in `sleep` (they re-check, and one of
    /// them may take over driving the provider). The generation moves even
    /// with no sleeper yet: a thread that found the provider driven and is
    /// on its way to `sleep` (spinning first) then returns at once instead
    /// of sleeping while nobody drives.
    fn wake_sleepers(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep_lock.lock();
            self.wake.notify_all();
        }
    }

    fn register(&self, waker: &Waker) {
        let mut wakers = self.wakers.lock();
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    /// Waits until the generation moves past `seen` or `deadline` passes:
    /// first spinning briefly (adaptive polling: a reply that is already on
    /// its way costs no sleep and wake-up), then sleeping on the condvar.
    fn sleep(&self, seen: u64, deadline: Option<Instant>) -> Result<(), Error> {
        if self.should_spin() {
            let until = Instant::now() + self.spin;
            loop {
                for _ in 0..64 {
                    if self.generation.load(Ordering::SeqCst) != seen {
                        return Ok(());
                    }
                    std::hint::spin_loop();
                }
                if Instant::now() >= until {
                    break;
                }
            }
        }
        let mut guard = self.sleep_lock.lock();
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            if self.generation.load(Ordering::SeqCst) != seen {
                break Ok(());
            }
            match deadline {
                Some(d) => {
                    if self.wake.wait_until(&mut guard, d).timed_out() && self.generation.load(Ordering::SeqCst) == seen
                    {
                        break Err(Error::Timeout(d.saturating_duration_since(Instant::now())));
                    }
                }
                None => self.wake.wait(&mut guard),
            }
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        self.note_outcome(result.is_err());
        result
    }

    /// Whether a waiter should poll before it sleeps: not when spinning is
    /// off, nor on a channel whose last wait timed out with nothing (an
    /// idle queue waiting in slices then costs no CPU).
    fn should_spin(&self) -> bool {
        !self.spin.is_zero() && !self.quiet.load(Ordering::Relaxed)
    }

    /// Records how a wait ended, for `should_spin`.
    fn note_outcome(&self, timed_out: bool) {
        self.quiet.store(timed_out, Ordering::Relaxed);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.qp.set_notify(None);
        self.qp.disconnect();
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("fabric", &self.shared.fabric)
            .field("peer", &self.shared.peer)
            .field("conn", &self.shared.inner.lock().conn)
            .finish()
    }
}

/// Holds an endpoint's posting back while it lives: see [`Endpoint::cork`].
pub struct Cork<'a> {
    shared: &'a Arc<Shared>,
}

impl Drop for Cork<'_> {
    fn drop(&mut self) {
        let mut inner = self.shared.inner.lock();
        inner.corks -= 1;
        if inner.corks == 0 {
            self.shared.post_held_locked(&mut inner);
        }
    }
}

impl std::fmt::Debug for Cork<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cork").finish_non_exhaustive()
    }
}

/// The pending result of a send or push. Wait on it to learn that the
/// peer's fabric executed the transfer; drop it to not care.
pub struct Ticket {
    shared: Arc<Shared>,
    key: usize,
    done: bool,
}

impl Ticket {
    /// Waits for the transfer's completion.
    ///
    /// # Errors
    /// `Transfer(status)` when it failed (`Flushed` if the channel closed first).
    pub fn wait(self) -> Result<(), Error> {
        self.wait_deadline(None)
    }

    /// As [`Ticket::wait`] with a timeout.
    ///
    /// # Errors
    /// `Timeout` or the transfer's failure.
    pub fn wait_timeout(self, timeout: Duration) -> Result<(), Error> {
        self.wait_deadline(Some(Instant::now() + timeout))
    }

    /// Lets the transfer go on without anyone waiting for it: it is
    /// forgotten once it completes, and a failure fails the channel (as any
    /// failed transfer does, which is what the sender sees next). The same
    /// as dropping the ticket, said out loud.
    pub fn detach(self) {}

    /// Async form of [`Ticket::wait`].
    pub fn completion(mut self) -> impl Future<Output = Result<(), Error>> {
        std::future::poll_fn(move |cx| {
            let shared = self.shared.clone();
            let mut inner = shared.inner.lock();
            shared.progress(&mut inner);
            if let Some(r) = self.take(&mut inner) {
                return Poll::Ready(r);
            }
            drop(inner);
            // Registered only to wait, as in `Endpoint::async_op`; the
            // completion may have come meanwhile, and its signal found no
            // waker: reap again before giving up.
            shared.signal.register(cx.waker());
            let mut inner = shared.inner.lock();
            shared.progress(&mut inner);
            match self.take(&mut inner) {
                Some(r) => Poll::Ready(r),
                None => {
                    drop(inner);
                    shared.post_held();
                    Poll::Pending
                }
            }
        })
    }

    fn wait_deadline(mut self, deadline: Option<Instant>) -> Result<(), Error> {
        let shared = self.shared.clone();
        shared.wait(deadline, |inner| self.take(inner))?
    }

    fn take(&mut self, inner: &mut Inner) -> Option<Result<(), Error>> {
        let result = inner.tickets.get_mut(self.key)?.result.take()?;
        inner.tickets.remove(self.key);
        self.done = true;
        Some(result.map_err(Error::Transfer))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = self.shared.inner.lock();
        if let Some(t) = inner.tickets.get_mut(self.key) {
            if t.result.is_some() {
                inner.tickets.remove(self.key);
            } else {
                t.detached = true;
            }
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("key", &self.key).finish()
    }
}

/// A received message or push: a zero-copy view of the receive buffer or
/// slot it landed in. Dropping it returns the buffer or slot to the peer.
pub struct Delivery {
    received: Option<Received>,
    shared: Arc<Shared>,
}

impl Delivery {
    /// Kind of delivery.
    pub fn kind(&self) -> ReceivedKind {
        self.received.as_ref().map_or(ReceivedKind::Message, Received::kind)
    }

    /// Delivery sequence number on this channel.
    pub fn seq(&self) -> u32 {
        self.received.as_ref().map_or(0, Received::seq)
    }

    /// For a direct placement: keeps the application's buffer (length set to
    /// the bytes pushed). Other deliveries come back unchanged.
    ///
    /// # Errors
    /// `Err(self)` when this is not a direct placement.
    pub fn into_buf(mut self) -> Result<Buf, Delivery> {
        match self.received.take().map(Received::into_buf) {
            Some(Ok(buf)) => Ok(buf),
            Some(Err(r)) => {
                self.received = Some(r);
                Err(self)
            }
            None => Err(self),
        }
    }
}

impl Deref for Delivery {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.received.as_ref().map_or(&[], Received::data)
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(r) = self.received.take() {
            let mut inner = self.shared.inner.lock();
            inner.conn.release(r);
            let (_, routed) = self.shared.flush(&mut inner);
            drop(inner);
            if routed {
                self.shared.signal.signal();
                self.shared.routed();
            }
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("kind", &self.kind())
            .field("len", &self.len())
            .field("seq", &self.seq())
            .finish()
    }
}
