//! The values of the protocol core: configuration, errors, work for the
//! driver, events for the application, targets and deliveries.

use super::*;

/// Per-connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Receives pre-posted for the peer (the peer's credits), at least 4.
    pub recv_depth: u16,
    /// Send-queue work requests in flight at most (and send buffers).
    pub send_depth: u16,
    /// Largest message payload, for both directions' buffers.
    pub msg_size: u32,
    /// Size of each push slot granted to the peer.
    pub slot_size: u32,
    /// Number of push slots granted to the peer (0 disables pushes to us).
    pub slot_count: u16,
    /// Ask for transfer indications as separate messages instead of
    /// immediate data.
    pub separate_indication: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            recv_depth: 64,
            send_depth: 128,
            msg_size: 4096,
            slot_size: 128 * 1024,
            slot_count: 16,
            separate_indication: false,
        }
    }
}

/// Errors setting a connection up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The configuration is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Registering the connection's buffers failed.
    #[error("registering connection buffers")]
    Register(#[source] MrError),
    /// The peer's parameters were refused.
    #[error("peer parameters refused: {0}")]
    BadParams(#[source] wire::WireError),
    /// The connection was already set up.
    #[error("connection already set up")]
    AlreadyConnected,
    /// The connection is not open (a grant needs an open connection).
    #[error("connection not open")]
    NotOpen,
}

/// Why a connection closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// This side closed it.
    #[error("closed locally")]
    Local,
    /// The queue pair failed or the peer went away (flushed completions).
    #[error("connection lost (peer disconnected or fabric failed)")]
    Disconnected,
    /// A work request failed on the fabric.
    #[error("fabric error: {0}")]
    Fabric(WcStatus),
    /// The peer broke the protocol.
    #[error("protocol violation by the peer: {0}")]
    Violation(String),
    /// Posting to the fabric failed locally.
    #[error("local fabric error: {0}")]
    LocalError(String),
}

/// Why a send or push was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No credit, slot, send buffer or send-queue room right now: retry
    /// after the connection makes progress (back-pressure, not failure).
    #[error("would block: no credit, slot or send-queue room")]
    Full,
    /// The payload exceeds what the peer accepts.
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The buffer cannot be used (wrong access rights).
    #[error("unusable buffer: {0}")]
    BadBuffer(&'static str),
    /// The connection is not set up yet.
    #[error("not connected")]
    NotConnected,
    /// The connection closed.
    #[error("connection closed: {0}")]
    Closed(CloseReason),
}

/// A push that was not accepted, with its buffer handed back.
#[derive(Debug)]
pub struct PushError {
    /// Why.
    pub error: SendError,
    /// The source buffer, untouched.
    pub buf: Buf,
}

/// A buffer exposed for direct placement: the tag and keyed descriptor the
/// peer needs to push into it. Send it to the peer in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectTarget {
    /// Tag that the transfer indication names.
    pub tag: u16,
    /// Where to write.
    pub remote: RemoteBuf,
}

impl DirectTarget {
    /// Encoded size.
    pub const ENCODED_LEN: usize = 20;

    /// Encodes as `tag u16 | pad u16 | RemoteBuf`.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..2].copy_from_slice(&self.tag.to_le_bytes());
        b[4..20].copy_from_slice(&self.remote.encode());
        b
    }

    /// Decodes [`DirectTarget::encode`]'s output; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<DirectTarget> {
        if b.len() < Self::ENCODED_LEN || b[2] != 0 || b[3] != 0 {
            return None;
        }
        let tag = u16::from_le_bytes([b[0], b[1]]);
        (tag <= MAX_TAG).then_some(())?;
        Some(DirectTarget {
            tag,
            remote: RemoteBuf::decode(&b[4..20])?,
        })
    }
}

/// A push straight into a buffer the peer exposed: where it goes, and what
/// it tells the peer besides the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectPush {
    /// The exposed buffer.
    pub target: DirectTarget,
    /// This push completes the request it answers, so no other message
    /// follows: the peer's delivery reads [`ReceivedKind::Direct`] with
    /// `completes_request` set (bit 14 of the transfer indication's index;
    /// what it means is the application's).
    pub completes_request: bool,
}

impl DirectPush {
    /// A plain push into `target`.
    pub fn to(target: DirectTarget) -> DirectPush {
        DirectPush {
            target,
            completes_request: false,
        }
    }

    /// The same push, saying whether it completes the request.
    #[must_use]
    pub fn completing(self, completes_request: bool) -> DirectPush {
        DirectPush {
            completes_request,
            ..self
        }
    }
}

/// Work for the driver, in order.
#[derive(Debug)]
pub enum Work {
    /// Post this receive.
    Recv(RecvWr),
    /// Post this send-queue request (consecutive ones may be batched).
    Send(SendWr),
    /// Post this Write, whose data the application placed at its remote
    /// address already ([`Placement::place`] returned the placement), with
    /// the sends around it in order ([`Placement::post_send_placed`]).
    ///
    /// [`Placement::place`]: crate::provider::Placement::place
    /// [`Placement::post_send_placed`]: crate::provider::Placement::post_send_placed
    SendPlaced(SendWr, u64),
    /// Disconnect the queue pair (the connection closed).
    Disconnect,
}

/// Output for the application.
#[derive(Debug)]
pub enum Event {
    /// A message or push arrived.
    Received(Received),
    /// A send or push finished: `Ok` once the peer's fabric executed it.
    Sent {
        /// The token given to `send`/`push`.
        token: u64,
        /// Outcome.
        result: Result<(), WcStatus>,
    },
    /// A one-sided Read or Write ([`Connection::read_remote`],
    /// [`Connection::write_remote`]) finished: its buffer comes back (for
    /// a Read, holding the bytes read when `result` is `Ok`).
    ///
    /// [`Connection::read_remote`]: crate::proto::Connection::read_remote
    /// [`Connection::write_remote`]: crate::proto::Connection::write_remote
    OneSided {
        /// The token given to `read_remote`/`write_remote`.
        token: u64,
        /// Outcome.
        result: Result<(), WcStatus>,
        /// The buffer.
        buf: Buf,
    },
    /// The connection closed; in-flight requests resolve with errors.
    Closed(CloseReason),
}

/// What kind of delivery a [`Received`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceivedKind {
    /// A message that was Sent into a pre-posted receive.
    Message,
    /// A push into one of our slots.
    Push,
    /// A push into a buffer we exposed under `tag`.
    Direct {
        /// The exposure's tag.
        tag: u16,
        /// The pusher said this push completes the request it answers
        /// ([`DirectPush::completes_request`]).
        completes_request: bool,
    },
}

/// A delivery: a zero-copy view of the receive buffer or slot where the
/// data landed. Give it back with [`Connection::release`] so that the
/// buffer (and its credit) or the slot returns to the peer; a direct
/// placement's buffer can instead be kept with [`Received::into_buf`].
#[derive(Debug)]
pub struct Received {
    pub(super) buf: Buf,
    pub(super) offset: usize,
    pub(super) len: usize,
    pub(super) origin: Origin,
    pub(super) seq: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Message,
    Slot(u16),
    Direct { tag: u16, completes_request: bool },
}

impl Received {
    /// The delivered bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.offset..self.offset + self.len]
    }

    /// Delivery kind.
    pub fn kind(&self) -> ReceivedKind {
        match self.origin {
            Origin::Message => ReceivedKind::Message,
            Origin::Slot(_) => ReceivedKind::Push,
            Origin::Direct { tag, completes_request } => ReceivedKind::Direct { tag, completes_request },
        }
    }

    /// Delivery sequence number (per connection and direction, from 0).
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// For a direct placement: the application's buffer, with its length
    /// set to the bytes pushed. Other deliveries are handed back unchanged.
    ///
    /// # Errors
    /// `Err(self)` when this is not a direct placement.
    pub fn into_buf(self) -> Result<Buf, Received> {
        match self.origin {
            Origin::Direct { .. } => Ok(self.buf),
            _ => Err(self),
        }
    }
}
