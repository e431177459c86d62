//! Fabric providers: one small trait with verbs reliable-connected semantics.
//!
//! ```text
//!  Fabric ──listen──▶ Listener ──accept──▶ Incoming ──accept(params, recvs)──┐
//!     │                                                                      ▼
//!     └──────────────connect(addr, params, recvs)─────────────────────▶ QueuePair
//!                                                   post_send / post_recv / poll / wait
//! ```
//!
//! The model is verbs RC, kept small and explicit:
//! - memory is registered in the fabric's [`ProtectionDomain`] and moves
//!   through work requests as owned [`Buf`]s: posting moves a buffer in,
//!   its [`Completion`] hands it back;
//! - a [`QueuePair`] takes receives ([`RecvWr`]) and sends ([`SendWr`]:
//!   Send, Send with immediate, RDMA Write, Write with immediate, RDMA Read),
//!   each carrying a [`WrId`];
//! - each queue pair has one completion queue: [`QueuePair::poll`] drains a
//!   batch without blocking, [`QueuePair::wait`] sleeps until one is ready,
//!   and [`QueuePair::set_notify`] installs a callback run after new
//!   completions arrive (how async wakers and condvars are fed);
//! - completions carry verbs status codes ([`WcStatus`]);
//! - RC guarantees: per queue pair, operations are executed by the peer in
//!   posting order and complete in that order; once a queue pair fails,
//!   every outstanding and every later work request completes with
//!   [`WcStatus::Flushed`]. Nothing is dropped silently;
//! - connection set-up exchanges opaque protocol parameters in a versioned
//!   hello. Initial receives are posted before the connection goes live, so
//!   the peer's first Send always finds a buffer (as verbs requires them to
//!   be posted before the queue pair reaches ready-to-receive).
//!
//! Providers: [`loopback`] (in-process, deterministic, with fault injection),
//! [`tcp`] (verbs semantics emulated over TCP), `shm` (separate processes on
//! one Linux host, shared memory, one copy) and, with the cargo feature
//! `verbs`, `verbs` (RDMA NICs and soft-RoCE through libibverbs).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::mr::{Buf, ProtectionDomain, RKey};

pub mod conformance;
mod cq;
#[cfg(unix)]
mod drive;
mod engine;
pub(crate) mod handshake;
pub mod loopback;
mod responder;
#[cfg(target_os = "linux")]
pub mod shm;
pub mod tcp;
#[cfg(feature = "verbs")]
pub mod verbs;

/// Identifier the poster gives a work request; its completion carries it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WrId(pub u64);

/// Where a one-sided operation goes on the peer: an address under a remote key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteAddr {
    /// Peer virtual address.
    pub addr: u64,
    /// Peer remote key.
    pub rkey: RKey,
}

/// A receive work request: a buffer for one incoming Send or Write with immediate.
#[derive(Debug)]
pub struct RecvWr {
    /// Identifier returned in the completion.
    pub id: WrId,
    /// The buffer; incoming data fills it from the start, up to its capacity.
    pub buf: Buf,
}

/// The operation of a send-queue work request.
#[derive(Debug)]
pub enum SendOp {
    /// Two-sided Send of `buf[..len]` into the peer's next posted receive.
    Send {
        /// Payload.
        buf: Buf,
        /// Immediate data delivered with the receive completion, if any.
        imm: Option<u32>,
    },
    /// One-sided RDMA Write of `buf[..len]` to `remote`.
    Write {
        /// Payload.
        buf: Buf,
        /// Destination on the peer.
        remote: RemoteAddr,
        /// With immediate data: the write also consumes a posted receive on
        /// the peer, whose completion carries `imm` and the length.
        imm: Option<u32>,
    },
    /// One-sided RDMA Read of `buf.len()` bytes from `remote` into `buf`.
    Read {
        /// Destination; its length says how many bytes to read.
        buf: Buf,
        /// Source on the peer.
        remote: RemoteAddr,
    },
    /// Two-sided Send of one message gathered from two buffers: the
    /// head, then the tail (an application's registered buffer). The
    /// verbs provider hands the NIC both as scatter entries (no copy);
    /// the others copy the tail after the head ([`flatten_gathers`]).
    SendGather(Gather),
}

/// The two buffers of a [`SendOp::SendGather`]. The tail always fits in the
/// head's spare capacity, so a provider may copy it there.
#[derive(Debug)]
pub struct Gather {
    head: Buf,
    tail: Buf,
}

impl Gather {
    /// Joins `head` and `tail`; both back when the tail does not fit in the
    /// head's spare capacity.
    ///
    /// # Errors
    /// `(head, tail)` when `head.len() + tail.len() > head.capacity()`.
    pub fn new(head: Buf, tail: Buf) -> Result<Gather, (Buf, Buf)> {
        if head.len() + tail.len() > head.capacity() {
            return Err((head, tail));
        }
        Ok(Gather { head, tail })
    }

    /// The first part.
    pub fn head(&self) -> &Buf {
        &self.head
    }

    /// The second part.
    pub fn tail(&self) -> &Buf {
        &self.tail
    }

    /// Both lengths together: the message's.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether the message is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Both buffers.
    pub fn into_parts(self) -> (Buf, Buf) {
        (self.head, self.tail)
    }

    /// The head with the tail's bytes copied after its own (the tail goes
    /// back to its pool).
    pub fn into_flat(self) -> Buf {
        let Gather { mut head, tail } = self;
        let at = head.len();
        let n = tail.len();
        head.spare_capacity()[at..at + n].copy_from_slice(&tail);
        head.set_len(at + n);
        head
    }
}

/// Turns every gathered Send of `wrs` into a plain one, in place and in
/// order (the tail copied into the head): what a provider that copies a
/// Send's bytes anyway does first. Allocates nothing.
pub fn flatten_gathers(wrs: &mut Vec<SendWr>) {
    for i in 0..wrs.len() {
        if matches!(wrs[i].op, SendOp::SendGather(_)) {
            let wr = wrs.swap_remove(i).flattened();
            wrs.push(wr);
            let last = wrs.len() - 1;
            wrs.swap(i, last);
        }
    }
}

/// A send-queue work request.
#[derive(Debug)]
pub struct SendWr {
    /// Identifier returned in the completion.
    pub id: WrId,
    /// What to do.
    pub op: SendOp,
}

impl SendWr {
    /// Opcode the completion of this request will carry.
    pub fn opcode(&self) -> WcOpcode {
        match self.op {
            SendOp::Send { .. } | SendOp::SendGather(_) => WcOpcode::Send,
            SendOp::Write { .. } => WcOpcode::RdmaWrite,
            SendOp::Read { .. } => WcOpcode::RdmaRead,
        }
    }

    /// This request with a gathered Send made a plain one (the tail copied
    /// after the head); any other request as it is.
    pub fn flattened(self) -> SendWr {
        match self.op {
            SendOp::SendGather(g) => SendWr {
                id: self.id,
                op: SendOp::Send {
                    buf: g.into_flat(),
                    imm: None,
                },
            },
            op => SendWr { id: self.id, op },
        }
    }

    /// The bytes the request moves (a gathered Send's two parts together).
    pub fn len(&self) -> usize {
        match &self.op {
            SendOp::Send { buf, .. } | SendOp::Write { buf, .. } | SendOp::Read { buf, .. } => buf.len(),
            SendOp::SendGather(g) => g.len(),
        }
    }

    /// Whether the request moves no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the buffer out (to hand back in a completion; a gathered
    /// Send's head, its tail going back to its pool).
    pub fn into_buf(self) -> Buf {
        match self.op {
            SendOp::Send { buf, .. } | SendOp::Write { buf, .. } | SendOp::Read { buf, .. } => buf,
            SendOp::SendGather(g) => g.head,
        }
    }
}

/// Completion status, as verbs' `ibv_wc_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// The operation completed.
    Success,
    /// The peer refused a one-sided access: unknown key, out of bounds, or
    /// no permission (`IBV_WC_REM_ACCESS_ERR`).
    RemoteAccessError,
    /// A Send (or Write with immediate) found no posted receive on the peer
    /// (`IBV_WC_RNR_RETRY_EXC_ERR`; chanio runs with no RNR retries since
    /// credits make it impossible for a correct sender).
    ReceiverNotReady,
    /// The peer's posted receive was too small for the message
    /// (`IBV_WC_REM_INV_REQ_ERR` for the sender).
    RemoteInvalidRequest,
    /// An incoming message did not fit the posted receive
    /// (`IBV_WC_LOC_LEN_ERR` for the receiver).
    LocalLengthError,
    /// A local buffer could not be used for the operation, e.g. an RDMA Read
    /// into memory registered without local write (`IBV_WC_LOC_PROT_ERR`).
    LocalProtectionError,
    /// The peer broke a protocol rule of the transport itself.
    RemoteOperationError,
    /// The queue pair failed or was disconnected before the request
    /// executed (`IBV_WC_WR_FLUSH_ERR`).
    Flushed,
}

impl WcStatus {
    /// Whether the status is [`WcStatus::Success`].
    pub fn is_success(self) -> bool {
        self == WcStatus::Success
    }

    /// Wire code (stable).
    pub fn code(self) -> u8 {
        match self {
            WcStatus::Success => 0,
            WcStatus::RemoteAccessError => 1,
            WcStatus::ReceiverNotReady => 2,
            WcStatus::RemoteInvalidRequest => 3,
            WcStatus::LocalLengthError => 4,
            WcStatus::LocalProtectionError => 5,
            WcStatus::RemoteOperationError => 6,
            WcStatus::Flushed => 7,
        }
    }

    /// Inverse of [`WcStatus::code`].
    pub fn from_code(code: u8) -> Option<WcStatus> {
        Some(match code {
            0 => WcStatus::Success,
            1 => WcStatus::RemoteAccessError,
            2 => WcStatus::ReceiverNotReady,
            3 => WcStatus::RemoteInvalidRequest,
            4 => WcStatus::LocalLengthError,
            5 => WcStatus::LocalProtectionError,
            6 => WcStatus::RemoteOperationError,
            7 => WcStatus::Flushed,
            _ => return None,
        })
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WcStatus::Success => "success",
            WcStatus::RemoteAccessError => "remote access error",
            WcStatus::ReceiverNotReady => "receiver not ready",
            WcStatus::RemoteInvalidRequest => "remote invalid request",
            WcStatus::LocalLengthError => "local length error",
            WcStatus::LocalProtectionError => "local protection error",
            WcStatus::RemoteOperationError => "remote operation error",
            WcStatus::Flushed => "flushed (queue pair in error state)",
        })
    }
}

/// What a completion completes, as verbs' `ibv_wc_opcode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    /// A Send (with or without immediate).
    Send,
    /// An RDMA Write (with or without immediate).
    RdmaWrite,
    /// An RDMA Read.
    RdmaRead,
    /// A receive consumed by a Send.
    Recv,
    /// A receive consumed by an RDMA Write with immediate.
    RecvRdmaWithImm,
}

/// A work completion. The buffer that was posted comes back in it.
#[derive(Debug)]
pub struct Completion {
    /// The work request's identifier.
    pub id: WrId,
    /// Outcome.
    pub status: WcStatus,
    /// What completed. For flushed receives this is [`WcOpcode::Recv`].
    pub opcode: WcOpcode,
    /// For receives: bytes received (for Write with immediate: bytes written).
    pub byte_len: u32,
    /// Immediate data, for receives that carried it.
    pub imm: Option<u32>,
    /// The posted buffer, handed back. For receives its length is set to
    /// the bytes received (zero for a Write with immediate).
    pub buf: Buf,
}

/// The completion of a send-queue request that the queue pair failed
/// before executing (every provider flushes this way).
pub(crate) fn flushed_send(wr: SendWr) -> Completion {
    Completion {
        id: wr.id,
        status: WcStatus::Flushed,
        opcode: wr.opcode(),
        byte_len: 0,
        imm: None,
        buf: wr.into_buf(),
    }
}

/// The completion of a posted receive that the queue pair failed before
/// anything arrived in it.
pub(crate) fn flushed_recv(wr: RecvWr) -> Completion {
    Completion {
        id: wr.id,
        status: WcStatus::Flushed,
        opcode: WcOpcode::Recv,
        byte_len: 0,
        imm: None,
        buf: wr.buf,
    }
}

/// What a provider can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Whether Writes may carry immediate data (false on iWARP/siw).
    pub immediate_data: bool,
    /// Largest message in bytes.
    pub max_message: u32,
    /// Most outstanding send work requests per queue pair.
    pub max_send_wr: u32,
    /// Most posted receives per queue pair.
    pub max_recv_wr: u32,
}

/// Errors of fabric providers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FabricError {
    /// The send or receive queue has no room; retry after reaping completions.
    #[error("{queue} queue full ({depth} outstanding)")]
    QueueFull {
        /// "send" or "receive".
        queue: &'static str,
        /// The queue's depth.
        depth: u32,
    },
    /// The address could not be parsed or resolved.
    #[error("bad address {addr:?}: {reason}")]
    BadAddress {
        /// What was given.
        addr: String,
        /// Why it is bad.
        reason: String,
    },
    /// Listening failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed at the transport level.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hello exchange failed (bad magic, version, truncated, timeout).
    #[error("handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer address.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer refused the connection.
    #[error("{peer} rejected the connection: {reason}")]
    Rejected {
        /// The peer address.
        peer: String,
        /// The reason it gave.
        reason: String,
    },
    /// Waiting for a connection timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The listener or fabric was shut down.
    #[error("shut down")]
    Shutdown,
    /// The provider is unusable on this machine.
    #[error("{provider} provider unavailable: {reason}")]
    Unavailable {
        /// Provider name.
        provider: &'static str,
        /// Why, and how to fix it.
        reason: String,
    },
    /// A connection's protection domain is neither the fabric's nor made
    /// from it by [`ProtectionDomain::child`].
    #[error("the connection's protection domain does not belong to the {provider} fabric")]
    ForeignDomain {
        /// Provider name.
        provider: &'static str,
    },
    /// An operating-system call failed.
    #[error("{op} failed")]
    Io {
        /// The call.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that a connection's `domain` is the fabric's own domain or was
/// made from it ([`ProtectionDomain::child`]).
pub(crate) fn check_domain(
    domain: &ProtectionDomain,
    fabric_domain: &ProtectionDomain,
    provider: &'static str,
) -> Result<(), FabricError> {
    if domain.is_within(fabric_domain) {
        Ok(())
    } else {
        Err(FabricError::ForeignDomain { provider })
    }
}

/// Callback run by a provider after it queued new completions. It must be
/// cheap and must not call back into the queue pair.
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// A fabric provider instance: one protection domain plus connection management.
pub trait Fabric: Send + Sync + fmt::Debug {
    /// Provider name (`"loopback"`, `"tcp"`, ...).
    fn name(&self) -> &'static str;

    /// What this provider supports.
    fn capabilities(&self) -> Capabilities;

    /// The protection domain where memory for this fabric's queue pairs is
    /// registered. Buffers posted to its queue pairs must come from it.
    fn domain(&self) -> &ProtectionDomain;

    /// Starts listening on `addr` (provider-specific syntax, e.g.
    /// `127.0.0.1:0` for tcp).
    ///
    /// # Errors
    /// [`FabricError::BadAddress`] or [`FabricError::Listen`].
    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, FabricError>;

    /// Connects to a listener, sending `params` in the hello. `recvs` are
    /// posted before the connection goes live. `domain` is the
    /// connection's: this fabric's domain or a child of it. The peer's
    /// remote keys are looked up there only, and posted buffers must be
    /// owned by it. Returns the queue pair; the peer's parameters are in
    /// [`QueuePair::peer_params`].
    ///
    /// # Errors
    /// [`FabricError::ForeignDomain`]; address, transport, handshake or
    /// rejection errors.
    fn connect(
        &self,
        addr: &str,
        domain: &ProtectionDomain,
        params: &[u8],
        recvs: Vec<RecvWr>,
    ) -> Result<Box<dyn QueuePair>, FabricError>;
}

/// A listening endpoint.
pub trait Listener: Send + Sync + fmt::Debug {
    /// The address peers connect to (with the real port if 0 was asked for).
    fn local_addr(&self) -> String;

    /// Waits for the next connection whose hello was valid. Connections with
    /// a bad hello are refused and logged without disturbing the listener.
    ///
    /// # Errors
    /// [`FabricError::Timeout`] or [`FabricError::Shutdown`].
    fn accept(&self, timeout: Option<Duration>) -> Result<Box<dyn Incoming>, FabricError>;

    /// Stops accepting; pending and later `accept` calls return `Shutdown`.
    fn shutdown(&self);
}

/// A connection request whose hello was received and checked.
pub trait Incoming: Send + fmt::Debug {
    /// The parameters the peer sent in its hello.
    fn peer_params(&self) -> &[u8];

    /// The peer's address, for logs.
    fn peer_addr(&self) -> String;

    /// The fabric the connection arrived on: the connection's protection
    /// domain is its domain or a child of it.
    fn fabric(&self) -> &dyn Fabric;

    /// Accepts: posts `recvs`, answers with `params` and returns the live
    /// queue pair, whose protection domain is `domain` (as in
    /// [`Fabric::connect`]).
    ///
    /// # Errors
    /// [`FabricError::ForeignDomain`]; transport errors while answering.
    fn accept(
        self: Box<Self>,
        domain: &ProtectionDomain,
        params: &[u8],
        recvs: Vec<RecvWr>,
    ) -> Result<Box<dyn QueuePair>, FabricError>;

    /// Refuses the connection with a reason the peer will see.
    fn reject(self: Box<Self>, reason: &str);
}

/// A connected reliable queue pair with its completion queue.
pub trait QueuePair: Send + Sync + fmt::Debug {
    /// Posts a batch of send-queue work requests, executed in order. The
    /// whole batch is accepted, leaving `wrs` empty (with its capacity, so
    /// a caller reuses one vector and allocates nothing per batch), or, when
    /// the send queue lacks room for all of it, left untouched in `wrs` with
    /// [`FabricError::QueueFull`]. On a failed queue pair the requests are
    /// accepted and complete with `Flushed`.
    ///
    /// # Errors
    /// `QueueFull`, with the batch still in `wrs`.
    fn post_send(&self, wrs: &mut Vec<SendWr>) -> Result<(), FabricError>;

    /// Posts a receive.
    ///
    /// # Errors
    /// `QueueFull`, with the request.
    fn post_recv(&self, wr: RecvWr) -> Result<(), (FabricError, RecvWr)>;

    /// Moves up to `max` completions into `out` without blocking; returns
    /// how many.
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize;

    /// Blocks until a completion is ready or `timeout` passes; returns
    /// whether one is ready.
    fn wait(&self, timeout: Option<Duration>) -> bool;

    /// Makes a thread blocked in [`QueuePair::wait`] return now (reporting
    /// whether a completion is ready): how a driver tells the thread that
    /// drives the queue pair that something it waits for happened elsewhere.
    fn interrupt(&self) {}

    /// Hands progress to the provider's fallback now, instead of after
    /// the lease of the last caller that drove: for a caller about to sleep
    /// somewhere else (an io_uring, an event loop) with a waker registered,
    /// which would otherwise sleep while nobody reads the transport.
    fn step_away(&self) {}

    /// Whether [`QueuePair::wait`] makes progress on the calling thread (run
    /// to completion: the waiting thread reads the transport itself), so that
    /// a driver should wait in it rather than on the completion notification.
    fn drives_on_wait(&self) -> bool {
        false
    }

    /// Installs (or removes) the callback run after completions arrive.
    fn set_notify(&self, notify: Option<Notify>);

    /// The parameters the peer sent in its hello.
    fn peer_params(&self) -> &[u8];

    /// A description of the peer, for logs.
    fn peer_addr(&self) -> String;

    /// Whether the queue pair failed or was disconnected.
    fn is_failed(&self) -> bool;

    /// Disconnects: the queue pair moves to the error state and every
    /// outstanding request completes with `Flushed`, here and on the peer.
    fn disconnect(&self);

    /// Capabilities of the provider this queue pair runs on.
    fn capabilities(&self) -> Capabilities;

    /// Initiator-side placement, where this provider has it (shm);
    /// `None` (the default) elsewhere.
    fn placement(&self) -> Option<&dyn Placement> {
        None
    }

    /// Shares `memory` with the peer process, where this provider moves
    /// data between processes through shared memory (shm) and the memory
    /// has a memfd ([`ExternalMemory::memfd`](crate::mr::ExternalMemory::memfd)):
    /// its descriptor goes to the peer once, ahead of anything posted
    /// later, and the peer maps it with [`QueuePair::peer_memory`] under
    /// the returned token. The peer can then read and write **all** of it,
    /// for as long as it keeps the mapping: no key, bound or revocation
    /// applies there, so a provider shares only with a peer that runs as
    /// this process's own user. `Ok(None)` (the default) where it does not
    /// share.
    ///
    /// # Errors
    /// `Io` on a failed queue pair or when the descriptor cannot be sent.
    fn share_memory(&self, memory: &dyn crate::mr::ExternalMemory) -> Result<Option<u64>, FabricError> {
        let _ = memory;
        Ok(None)
    }

    /// The memory the peer shared under `token` ([`QueuePair::share_memory`]),
    /// mapped here; `Ok(None)` where this provider does not share memory.
    ///
    /// # Errors
    /// `Io` when the peer never sent it (within the handshake timeout) or
    /// sent a descriptor that cannot be mapped safely (not sealed).
    fn peer_memory(&self, token: u64) -> Result<Option<PeerMemory>, FabricError> {
        let _ = token;
        Ok(None)
    }
}

/// Memory a peer process shared ([`QueuePair::share_memory`]), mapped here:
/// copies in and out are checked against its length. The peer may change
/// the bytes at any time; a copy sees each byte as it was at some moment.
#[derive(Clone)]
pub struct PeerMemory {
    map: Arc<dyn PeerMap>,
}

/// A mapping of a peer's memory, as a provider keeps it.
pub(crate) trait PeerMap: Send + Sync {
    fn len(&self) -> usize;
    fn read_into(&self, offset: usize, dest: &mut [u8]) -> bool;
    fn write_from(&self, offset: usize, src: &[u8]) -> bool;
}

impl PeerMemory {
    pub(crate) fn new(map: Arc<dyn PeerMap>) -> PeerMemory {
        PeerMemory { map }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Copies `dest.len()` bytes from `offset`; `false` (nothing copied)
    /// when the range leaves the memory.
    pub fn read(&self, offset: u64, dest: &mut [u8]) -> bool {
        usize::try_from(offset).is_ok_and(|o| self.map.read_into(o, dest))
    }

    /// Copies `src` to `offset`; `false` (nothing copied) when the range
    /// leaves the memory.
    pub fn write(&self, offset: u64, src: &[u8]) -> bool {
        usize::try_from(offset).is_ok_and(|o| self.map.write_from(o, src))
    }
}

impl fmt::Debug for PeerMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerMemory").field("len", &self.map.len()).finish()
    }
}

/// Initiator-side placement (ADR 5), a capability of some providers only,
/// reached through [`QueuePair::placement`]: the initiator of a Write copies
/// the data into the peer's memory itself ([`Placement::place`]), then
/// posts the Write with a buffer that only stands for the data
/// ([`Placement::post_send_placed`]): the peer learns of it, with the
/// immediate, as of any Write.
pub trait Placement: Send + Sync {
    /// Runs `fill` on `len` bytes of the peer's memory at `remote` when the
    /// peer granted that region and is still there; `Some(placement)`
    /// exactly when it did, to pass to [`Placement::post_send_placed`].
    /// `None` (an unknown key, bounds outside the grant, a closing peer)
    /// leaves the Write to the usual path. `fill` runs under the provider's
    /// locks: it must not post or poll.
    fn place(&self, remote: RemoteAddr, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Option<u64>;

    /// As [`QueuePair::post_send`], for a batch of which some Writes were
    /// placed: `placements[i]` belongs to `wrs[i]`, `Some` for a
    /// [`SendOp::Write`] whose data [`Placement::place`] put at its remote
    /// address (its buffer's length is the placed length, its bytes are not
    /// sent; it comes back in the completion as a Write's does). Both
    /// vectors are emptied when the batch is accepted.
    ///
    /// # Errors
    /// As [`QueuePair::post_send`]; `QueueFull` leaves both untouched.
    fn post_send_placed(&self, wrs: &mut Vec<SendWr>, placements: &mut Vec<Option<u64>>) -> Result<(), FabricError>;
}
