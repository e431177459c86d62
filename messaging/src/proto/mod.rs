//! The push-push protocol core: every rule, no I/O.
//!
//! A [`Connection`] holds one side of a channel: its pre-posted receive
//! buffers, its pool of push slots granted to the peer, the credits it holds
//! for the peer's receives, the peer's slots it may write, and every work
//! request in flight. It opens no socket, starts no thread and reads no
//! clock: the driver feeds it completions and drains the work it asks for.
//!
//! Method kinds, as in quinn-proto:
//! - getters (`&self`): [`Connection::credits`], [`Connection::is_open`], ...;
//! - input: [`Connection::handle_connected`], [`Connection::handle_completion`];
//! - application commands: [`Connection::grow`], [`Connection::send`], [`Connection::push`],
//!   [`Connection::push_direct`], [`Connection::expose`],
//!   [`Connection::release`], [`Connection::close`];
//! - output, drained in this order after any input or command:
//!   [`Connection::poll_work`] (receives to post, send-queue batches, a
//!   disconnect) and then [`Connection::poll_event`] (deliveries, send
//!   results, closure).
//!
//! ```text
//! conn.handle_completion(completion);
//! while let Some(work) = conn.poll_work() { post(work) }
//! while let Some(event) = conn.poll_event() { deliver(event) }
//! ```
//!
//! # Rules
//! - **Credits.** A side may Send (or Write with immediate, which also
//!   consumes a receive) only while it holds a credit for a receive the peer
//!   posted; it starts with the peer's `recv_depth`. Data and pushes keep
//!   the last credit in reserve; only a control message may spend it, so
//!   credits can always be returned. Every message header returns the
//!   credits owed for receives reposted since the last message; when no
//!   traffic flows back, an explicit control message returns them once half
//!   the window is owed. So one-way traffic never deadlocks.
//! - **Grants.** A side may open small (what a server gives a peer it does
//!   not know yet) and [`Connection::grow`] later: more receives, whose
//!   credits the Grant message's header returns, and push slots where the
//!   hello granted none. A grant never shrinks anything.
//! - **Slots.** Each side registers `slot_count` slots of `slot_size` bytes
//!   for the peer to push into (in the hello, or once in a grant). The pusher takes a free slot, writes into it
//!   and names it in the transfer indication; the receiver hands the slot to
//!   the application and, when the application releases it, returns it in a
//!   header's release list (or a control message once a quarter of the
//!   slots wait).
//! - **Transfer indication.** By default the immediate data of the write
//!   itself ([`wire::encode_imm`]); with `separate_indication` (asked by
//!   either side, or forced by a fabric without immediate data) a small
//!   indication message Sent right after the write, which RC ordering
//!   delivers after the data.
//! - **Direct placement.** [`Connection::expose`] turns a registered buffer
//!   into a [`DirectTarget`] (tag + keyed descriptor) for the peer; the peer
//!   pushes into it with [`Connection::push_direct`] and the indication
//!   names the tag.
//! - **Order.** Data messages and pushes carry one delivery sequence
//!   (32 bits in headers, the low 16 in immediates); the receiver checks
//!   that each is the next one, so delivery is exactly once and in order.
//! - **Errors.** Any failed completion or protocol violation closes the
//!   connection: a [`Event::Closed`] with the reason, a [`Work::Disconnect`]
//!   for the driver, and every request still in flight resolves with an
//!   error when its flushed completion returns.

use std::collections::VecDeque;

use slab::Slab;

use crate::intmap::IntMap;

use crate::mr::{Access, Buf, BufPool, MrError, ProtectionDomain, RemoteBuf};
use crate::provider::{Capabilities, Completion, Gather, RecvWr, RemoteAddr, SendOp, SendWr, WcOpcode, WcStatus, WrId};

pub mod wire;

use wire::{Grant, Header, Kind, Params, Target, DIRECT_FLAG, HEADER_LEN, MAX_INDEX, MAX_RELEASES, MAX_TAG};

mod inbound;
mod outbound;
mod types;

use types::*;
pub use types::{
    CloseReason, Config, DirectPush, DirectTarget, Event, ProtoError, PushError, Received, ReceivedKind, SendError,
    Work,
};

/// Smallest receive depth a side may advertise.
pub const MIN_RECV_DEPTH: u16 = 4;
/// Largest message payload a side may advertise.
pub const MAX_MSG_SIZE: u32 = 1 << 20;

const RECV_TAG: u64 = 1 << 63;

enum Slot {
    /// The peer may write it.
    Granted(Buf),
    /// Delivered to the application.
    Delivered,
}

struct Peer {
    params: Params,
    free_slots: VecDeque<u16>,
    slot_busy: Vec<bool>,
}

struct Inflight {
    token: Option<u64>,
    /// A one-sided Read or Write: its buffer goes back to the application
    /// ([`Event::OneSided`]).
    one_sided: bool,
}

enum State {
    Setup,
    Open,
    Closed(CloseReason),
}

/// One side of a push-push channel (see the module docs).
pub struct Connection {
    cfg: Config,
    state: State,
    recv_pool: BufPool,
    send_pool: BufPool,
    slot_pool: Option<BufPool>,
    slots: Vec<Slot>,
    released: Vec<u16>,
    peer: Option<Peer>,
    separate: bool,
    max_send: usize,
    credits: u32,
    owed: u32,
    inflight: Slab<Inflight>,
    work: VecDeque<Work>,
    events: VecDeque<Event>,
    tx_seq: u32,
    rx_seq: u32,
    direct: IntMap<u16, Buf>,
    next_tag: u16,
    recvs_posted: u32,
    held: u32,
    /// The fabric's limits, once connected (what a grant is checked against).
    caps: Option<Capabilities>,
    /// A grant is waiting for a credit to go out.
    grant_due: bool,
    /// ... and names the slots (granted after the hello, not yet told).
    grant_slots: bool,
}

impl Connection {
    /// Prepares one side: validates `cfg` and registers its receive
    /// buffers, send buffers and push slots in `pd`.
    ///
    /// # Errors
    /// [`ProtoError::InvalidConfig`] or [`ProtoError::Register`].
    pub fn new(pd: &ProtectionDomain, cfg: Config) -> Result<Connection, ProtoError> {
        let bad = |m: String| Err(ProtoError::InvalidConfig(m));
        if cfg.recv_depth < MIN_RECV_DEPTH {
            return bad(format!("recv_depth {} below {MIN_RECV_DEPTH}", cfg.recv_depth));
        }
        if cfg.send_depth < 2 {
            return bad(format!("send_depth {} below 2", cfg.send_depth));
        }
        if cfg.msg_size == 0 || cfg.msg_size > MAX_MSG_SIZE {
            return bad(format!("msg_size {} outside 1..={MAX_MSG_SIZE}", cfg.msg_size));
        }
        if cfg.slot_count > MAX_INDEX + 1 {
            return bad(format!("slot_count {} above {}", cfg.slot_count, MAX_INDEX as u32 + 1));
        }
        if cfg.slot_count > 0 && cfg.slot_size == 0 {
            return bad("slot_size 0 with slots".into());
        }
        let buf_size = buffer_size(&cfg);
        let recv_pool = pd
            .register(buf_size, cfg.recv_depth.into(), Access::LOCAL_WRITE)
            .map_err(ProtoError::Register)?;
        let send_pool = pd
            .register(buf_size, cfg.send_depth.into(), Access::NONE)
            .map_err(ProtoError::Register)?;
        let (slot_pool, slots) = match cfg.slot_count {
            0 => (None, Vec::new()),
            _ => {
                let (pool, slots) = register_slots(pd, &cfg)?;
                (Some(pool), slots)
            }
        };
        Ok(Connection {
            cfg,
            state: State::Setup,
            recv_pool,
            send_pool,
            slot_pool,
            slots,
            released: Vec::new(),
            peer: None,
            separate: false,
            max_send: 0,
            credits: 0,
            owed: 0,
            inflight: Slab::new(),
            work: VecDeque::new(),
            events: VecDeque::new(),
            tx_seq: 0,
            rx_seq: 0,
            direct: IntMap::default(),
            next_tag: 0,
            recvs_posted: 0,
            held: 0,
            caps: None,
            grant_due: false,
            grant_slots: false,
        })
    }

    /// The parameter block to send in the hello.
    pub fn local_params(&self) -> Vec<u8> {
        let (slot_addr, slot_rkey) = match &self.slot_pool {
            Some(p) => (p.remote().addr, p.rkey()),
            None => (0, crate::mr::RKey(0)),
        };
        Params {
            recv_depth: self.cfg.recv_depth,
            msg_size: self.cfg.msg_size,
            slot_count: self.cfg.slot_count,
            slot_size: self.cfg.slot_size,
            slot_addr,
            slot_rkey,
            separate_indication: self.cfg.separate_indication,
        }
        .encode()
        .to_vec()
    }

    /// The receives to post before the connection goes live (all of them,
    /// once; later calls return nothing).
    pub fn initial_recvs(&mut self) -> Vec<RecvWr> {
        let mut out = Vec::new();
        while let Some(buf) = self.recv_pool.checkout() {
            out.push(RecvWr {
                id: WrId(RECV_TAG | u64::from(buf.index())),
                buf,
            });
        }
        self.recvs_posted += out.len() as u32;
        out
    }

    /// Checks a peer's parameters against this side and the fabric without
    /// changing anything: what a listener calls before it accepts, so that
    /// it can refuse with the reason.
    ///
    /// # Errors
    /// [`ProtoError::BadParams`].
    pub fn check_peer(&self, peer_params: &[u8], caps: Capabilities) -> Result<Params, ProtoError> {
        let params = Params::decode(peer_params).map_err(ProtoError::BadParams)?;
        let bad = |m: String| Err(ProtoError::BadParams(wire::WireError(m)));
        if u32::from(self.cfg.send_depth) > caps.max_send_wr || u32::from(self.cfg.recv_depth) > caps.max_recv_wr {
            return bad(format!(
                "queue depths {}/{} exceed the fabric's {}/{}",
                self.cfg.send_depth, self.cfg.recv_depth, caps.max_send_wr, caps.max_recv_wr
            ));
        }
        let own_buf = (HEADER_LEN + 2 * MAX_RELEASES) as u32 + self.cfg.msg_size;
        if own_buf > caps.max_message || self.cfg.slot_size > caps.max_message {
            return bad(format!(
                "message buffers of {own_buf} bytes or slots of {} bytes exceed the fabric's {}-byte limit",
                self.cfg.slot_size, caps.max_message
            ));
        }
        if params.slot_size > caps.max_message {
            return bad(format!(
                "peer slot size {} above the fabric's message limit",
                params.slot_size
            ));
        }
        Ok(params)
    }

    /// The connection is live: takes the peer's parameters and the fabric's
    /// capabilities and opens.
    ///
    /// # Errors
    /// [`ProtoError::BadParams`] for parameters that fail validation or do
    /// not fit the fabric; the caller should refuse the connection.
    pub fn handle_connected(&mut self, peer_params: &[u8], caps: Capabilities) -> Result<(), ProtoError> {
        if !matches!(self.state, State::Setup) {
            return Err(ProtoError::AlreadyConnected);
        }
        let params = self.check_peer(peer_params, caps)?;
        self.separate = self.cfg.separate_indication || params.separate_indication || !caps.immediate_data;
        self.max_send = params.msg_size.min(self.cfg.msg_size) as usize;
        self.credits = params.recv_depth.into();
        self.caps = Some(caps);
        self.peer = Some(Peer {
            free_slots: (0..params.slot_count).rev().collect(),
            slot_busy: vec![false; params.slot_count.into()],
            params,
        });
        self.state = State::Open;
        Ok(())
    }

    // ----- getters -----

    /// Whether the connection is open.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// Why the connection closed, if it did.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.state {
            State::Closed(r) => Some(r),
            _ => None,
        }
    }

    /// Whether the connection closed and every request it posted came back:
    /// nothing of it is left with the fabric.
    pub fn is_drained(&self) -> bool {
        matches!(self.state, State::Closed(_)) && self.inflight.is_empty() && self.recvs_posted == 0
    }

    /// Credits held for the peer's receives.
    pub fn credits(&self) -> u32 {
        self.credits
    }

    /// Credits owed to the peer (reposted receives not yet advertised).
    pub fn owed(&self) -> u32 {
        self.owed
    }

    /// Receives currently posted to the fabric.
    pub fn recvs_posted(&self) -> u32 {
        self.recvs_posted
    }

    /// Messages and slot pushes handed out and not yet released.
    pub fn held(&self) -> u32 {
        self.held
    }

    /// Send-queue requests in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The peer's slots this side may push into now.
    pub fn free_peer_slots(&self) -> usize {
        self.peer.as_ref().map_or(0, |p| p.free_slots.len())
    }

    /// Our slots released by the application but not yet returned to the peer.
    pub fn released_pending(&self) -> usize {
        self.released.len()
    }

    /// This side's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The peer's parameters, once connected.
    pub fn peer_params(&self) -> Option<&Params> {
        self.peer.as_ref().map(|p| &p.params)
    }

    /// Whether transfer indications go as separate messages.
    pub fn separate_indication(&self) -> bool {
        self.separate
    }

    /// Largest message [`Connection::send`] accepts.
    pub fn max_message(&self) -> usize {
        self.max_send
    }

    /// Largest push [`Connection::push`] accepts.
    pub fn max_push(&self) -> usize {
        self.peer
            .as_ref()
            .filter(|p| p.params.slot_count > 0)
            .map_or(0, |p| p.params.slot_size as usize)
    }

    /// Whether a `send` would be accepted now.
    pub fn can_send(&self) -> bool {
        self.is_open() && self.credits >= 2 && self.has_send_room(1)
    }

    /// Whether a `push` would be accepted now.
    pub fn can_push(&self) -> bool {
        self.can_send() && self.free_peer_slots() > 0 && self.has_send_room(if self.separate { 2 } else { 1 })
    }

    // ----- application commands -----

    /// Grows an open connection to `cfg`: the receives beyond the current
    /// depth are registered and posted (their credits go to the peer), the
    /// send buffers are registered anew at the new depth, and push slots
    /// are granted where none were. A Grant message tells the peer (see the
    /// module docs); it leaves before any later message. What a server
    /// calls once a peer has identified itself, having opened small.
    ///
    /// Nothing changes on an error.
    ///
    /// # Errors
    /// [`ProtoError::NotOpen`]; [`ProtoError::InvalidConfig`] when `cfg`
    /// would shrink a depth, change the message size, the indication mode
    /// or slots already granted, or exceed the fabric's limits;
    /// [`ProtoError::Register`] when registering fails.
    pub fn grow(&mut self, pd: &ProtectionDomain, cfg: Config) -> Result<(), ProtoError> {
        let caps = match (&self.state, self.caps) {
            (State::Open, Some(caps)) => caps,
            _ => return Err(ProtoError::NotOpen),
        };
        let bad = |m: String| Err(ProtoError::InvalidConfig(m));
        let old = &self.cfg;
        if cfg.msg_size != old.msg_size || cfg.separate_indication != old.separate_indication {
            return bad("a grant cannot change the message size or the indication mode".into());
        }
        if cfg.recv_depth < old.recv_depth || cfg.send_depth < old.send_depth {
            return bad(format!(
                "a grant cannot shrink the depths {}/{} to {}/{}",
                old.send_depth, old.recv_depth, cfg.send_depth, cfg.recv_depth
            ));
        }
        if u32::from(cfg.send_depth) > caps.max_send_wr || u32::from(cfg.recv_depth) > caps.max_recv_wr {
            return bad(format!(
                "queue depths {}/{} exceed the fabric's {}/{}",
                cfg.send_depth, cfg.recv_depth, caps.max_send_wr, caps.max_recv_wr
            ));
        }
        let new_slots = old.slot_count == 0 && cfg.slot_count > 0;
        if old.slot_count > 0 && (cfg.slot_count, cfg.slot_size) != (old.slot_count, old.slot_size) {
            return bad("slots granted once cannot change".into());
        }
        if new_slots && (cfg.slot_count > MAX_INDEX + 1 || cfg.slot_size == 0 || cfg.slot_size > caps.max_message) {
            return bad(format!(
                "{} slots of {} bytes (at most {} slots of 1..={} bytes)",
                cfg.slot_count,
                cfg.slot_size,
                MAX_INDEX as u32 + 1,
                caps.max_message
            ));
        }
        let buf_size = buffer_size(&cfg);
        let added = usize::from(cfg.recv_depth - old.recv_depth);
        let recvs = match added {
            0 => None,
            n => Some(
                pd.register(buf_size, n, Access::LOCAL_WRITE)
                    .map_err(ProtoError::Register)?,
            ),
        };
        let sends = match cfg.send_depth > old.send_depth {
            true => Some(
                pd.register(buf_size, cfg.send_depth.into(), Access::NONE)
                    .map_err(ProtoError::Register)?,
            ),
            false => None,
        };
        let slots = match new_slots {
            true => Some(register_slots(pd, &cfg)?),
            false => None,
        };
        if let Some(pool) = recvs {
            while let Some(buf) = pool.checkout() {
                self.repost(buf);
            }
        }
        if let Some(pool) = sends {
            // Buffers of the old pool still in flight go back to it.
            self.send_pool = pool;
        }
        if let Some((pool, granted)) = slots {
            self.slot_pool = Some(pool);
            self.slots = granted;
        }
        self.grant_due |= added > 0 || new_slots;
        self.grant_slots |= new_slots;
        self.cfg = cfg;
        self.maybe_control();
        Ok(())
    }

    /// Sends one message, gathered from `parts` in order, into a receive
    /// the peer pre-posted (one copy into a registered send buffer, none
    /// before it: a header and a payload go out without first being
    /// joined). `token` comes back in [`Event::Sent`].
    ///
    /// # Errors
    /// [`SendError::Full`] while out of credits or send room (retry after
    /// progress), `TooLarge` (the parts' total length), `NotConnected`,
    /// `Closed`.
    pub fn send(&mut self, token: u64, parts: &[&[u8]]) -> Result<(), SendError> {
        self.check_open()?;
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        if len > self.max_send {
            return Err(SendError::TooLarge {
                len,
                max: self.max_send,
            });
        }
        if !self.can_send() {
            return Err(SendError::Full);
        }
        self.send_message(Kind::Data, Some(token), parts)
    }

    /// Sends one message of `parts` (copied into a send buffer, as
    /// [`Connection::send`] does) followed by `tail`, a buffer registered
    /// in this side's domain that the fabric gathers after them without a
    /// copy where it can (two scatter entries on verbs; the other providers
    /// copy). `tail` goes back to its pool once the Send completes.
    ///
    /// # Errors
    /// As [`Connection::send`], with `tail` handed back.
    pub fn send_gather(&mut self, token: u64, parts: &[&[u8]], tail: Buf) -> Result<(), PushError> {
        if let Err(error) = self.check_open() {
            return Err(PushError { error, buf: tail });
        }
        let len = parts.iter().map(|p| p.len()).sum::<usize>() + tail.len();
        if len > self.max_send {
            return Err(PushError {
                error: SendError::TooLarge {
                    len,
                    max: self.max_send,
                },
                buf: tail,
            });
        }
        if !self.can_send() {
            return Err(PushError {
                error: SendError::Full,
                buf: tail,
            });
        }
        self.send_gathered(token, parts, tail)
    }

    /// Pushes `src` into a slot the peer granted, with the transfer
    /// indication in the write's immediate data (or a separate message).
    /// `src` must be registered in the same protection domain; it is
    /// dropped (back to its pool) once the push completes.
    ///
    /// # Errors
    /// As [`Connection::send`], with the buffer handed back.
    pub fn push(&mut self, token: u64, src: Buf) -> Result<(), PushError> {
        if let Err(error) = self.check_open() {
            return Err(PushError { error, buf: src });
        }
        let max = self.max_push();
        if max == 0 {
            return Err(PushError {
                error: SendError::BadBuffer("the peer granted no push slots"),
                buf: src,
            });
        }
        if src.len() > max {
            return Err(PushError {
                error: SendError::TooLarge { len: src.len(), max },
                buf: src,
            });
        }
        if !self.can_push() {
            return Err(PushError {
                error: SendError::Full,
                buf: src,
            });
        }
        let peer = self.peer.as_mut().expect("open implies peer");
        // The most recently released slot first: its lines are likeliest
        // still in the receiver's cache (a stream then cycles through as
        // few slots as it keeps in flight, not through all of them).
        let slot = peer.free_slots.pop_back().expect("can_push checked a free slot");
        peer.slot_busy[slot as usize] = true;
        let remote = RemoteAddr {
            addr: peer.params.slot_addr + u64::from(slot) * u64::from(peer.params.slot_size),
            rkey: peer.params.slot_rkey,
        };
        self.post_push(token, src, remote, Target::Slot(slot), None);
        Ok(())
    }

    /// Pushes `src` straight into a buffer the peer exposed (see
    /// [`Connection::expose`]).
    ///
    /// # Errors
    /// As [`Connection::push`]; `TooLarge` when `src` exceeds the target.
    pub fn push_direct(&mut self, token: u64, src: Buf, push: DirectPush) -> Result<(), PushError> {
        self.post_direct(token, src, push, None)
    }

    /// Tells the peer about data the application already placed at
    /// `push.target` through the provider ([`Placement::place`], which
    /// returned `placement`): `stand_in`'s length is the placed length, its
    /// bytes are not sent, and it comes back as a pushed buffer does.
    ///
    /// # Errors
    /// As [`Connection::push_direct`].
    ///
    /// [`Placement::place`]: crate::provider::Placement::place
    pub fn push_placed(
        &mut self,
        token: u64,
        stand_in: Buf,
        push: DirectPush,
        placement: u64,
    ) -> Result<(), PushError> {
        self.post_direct(token, stand_in, push, Some(placement))
    }

    fn post_direct(&mut self, token: u64, src: Buf, push: DirectPush, placed: Option<u64>) -> Result<(), PushError> {
        let target = push.target;
        if let Err(error) = self.check_open() {
            return Err(PushError { error, buf: src });
        }
        if target.tag > MAX_TAG {
            return Err(PushError {
                error: SendError::BadBuffer("direct target tag out of range"),
                buf: src,
            });
        }
        if src.len() > target.remote.len as usize {
            return Err(PushError {
                error: SendError::TooLarge {
                    len: src.len(),
                    max: target.remote.len as usize,
                },
                buf: src,
            });
        }
        if !self.can_send() || !self.has_send_room(if self.separate { 2 } else { 1 }) {
            return Err(PushError {
                error: SendError::Full,
                buf: src,
            });
        }
        let remote = RemoteAddr {
            addr: target.remote.addr,
            rkey: target.remote.rkey,
        };
        let index = if push.completes_request {
            target.tag | DIRECT_FLAG
        } else {
            target.tag
        };
        self.post_push(token, src, remote, Target::Direct(index), placed);
        Ok(())
    }

    /// Reads `dst.len()` bytes of the peer's memory at `remote` into `dst`
    /// with a one-sided RDMA Read: the peer's application is not involved,
    /// and no credit is spent. `remote` names memory the peer registered
    /// with remote read access and told us about; a wrong key, an address
    /// outside its region or missing access fails the transfer and closes
    /// the connection, as a remote access error does on RDMA hardware.
    /// `dst` comes back in [`Event::OneSided`] under `token`.
    ///
    /// # Errors
    /// The buffer back with `Closed`, `Full` (the send queue has no
    /// room), `BadBuffer` (`dst` lacks local write access) or `TooLarge`
    /// (empty).
    pub fn read_remote(&mut self, token: u64, dst: Buf, remote: RemoteAddr) -> Result<(), PushError> {
        if !dst.access().contains(Access::LOCAL_WRITE) {
            return Err(PushError {
                error: SendError::BadBuffer("a Read's destination needs local write access"),
                buf: dst,
            });
        }
        self.post_one_sided(token, dst, |buf| SendOp::Read { buf, remote })
    }

    /// Writes `src` into the peer's memory at `remote` with a one-sided
    /// RDMA Write (no immediate: the peer's application is not told).
    /// Access rules as [`Connection::read_remote`]; `src` comes back in
    /// [`Event::OneSided`].
    ///
    /// # Errors
    /// As [`Connection::read_remote`].
    pub fn write_remote(&mut self, token: u64, src: Buf, remote: RemoteAddr) -> Result<(), PushError> {
        self.post_one_sided(token, src, |buf| SendOp::Write { buf, remote, imm: None })
    }

    fn post_one_sided(&mut self, token: u64, buf: Buf, op: impl FnOnce(Buf) -> SendOp) -> Result<(), PushError> {
        if let Err(error) = self.check_open() {
            return Err(PushError { error, buf });
        }
        if buf.is_empty() {
            return Err(PushError {
                error: SendError::TooLarge { len: 0, max: 0 },
                buf,
            });
        }
        if !self.has_send_room(1) {
            return Err(PushError {
                error: SendError::Full,
                buf,
            });
        }
        let key = self.inflight.insert(Inflight {
            token: Some(token),
            one_sided: true,
        });
        self.work.push_back(Work::Send(SendWr {
            id: WrId(key as u64),
            op: op(buf),
        }));
        Ok(())
    }

    /// Exposes `buf` (registered with remote write) for the peer to push
    /// into directly. The buffer comes back in the [`Received`] of that
    /// push, or through [`Connection::unexpose`].
    ///
    /// Tags rotate through all 16384 values (0..=[`wire::MAX_TAG`]; bit 14
    /// of a direct push's index is the pusher's flag): a tag freed by a
    /// delivery (or an unexpose) is handed out again only after every other
    /// free tag, so an application that matches deliveries to requests by
    /// tag is not confused by a quick reuse.
    ///
    /// # Errors
    /// The buffer back when it lacks remote write access or 16384
    /// buffers are already exposed.
    pub fn expose(&mut self, buf: Buf) -> Result<DirectTarget, Buf> {
        if !buf.access().contains(Access::REMOTE_WRITE | Access::LOCAL_WRITE) || self.direct.len() > MAX_TAG as usize {
            return Err(buf);
        }
        let remote = buf.remote();
        let tag = loop {
            let t = self.next_tag;
            self.next_tag = if t >= MAX_TAG { 0 } else { t + 1 };
            if !self.direct.contains_key(&t) {
                break t;
            }
        };
        self.direct.insert(tag, buf);
        Ok(DirectTarget { tag, remote })
    }

    /// Withdraws an exposure that was not pushed to.
    pub fn unexpose(&mut self, tag: u16) -> Option<Buf> {
        self.direct.remove(&tag)
    }

    /// Gives a delivery back: a message's receive buffer is reposted (and
    /// its credit owed to the peer), a slot is returned to the peer.
    pub fn release(&mut self, received: Received) {
        if !matches!(received.origin, Origin::Direct { .. }) {
            self.held = self.held.saturating_sub(1);
        }
        if !self.is_open() {
            return;
        }
        match received.origin {
            Origin::Message => self.repost(received.buf),
            Origin::Slot(i) => {
                self.slots[i as usize] = Slot::Granted(received.buf);
                self.released.push(i);
            }
            Origin::Direct { .. } => {}
        }
        self.maybe_control();
    }

    /// Closes the connection locally.
    pub fn close(&mut self) {
        self.close_with(CloseReason::Local);
    }

    /// Closes because posting to the fabric failed; `wrs` are the requests
    /// the fabric handed back (their tokens resolve as flushed).
    pub fn handle_post_failure(&mut self, reason: String, wrs: Vec<SendWr>) {
        for wr in wrs {
            let buf = match wr.op {
                SendOp::Read { buf, .. } | SendOp::Write { buf, .. } => Some(buf),
                _ => None,
            };
            self.complete_send(wr.id, WcStatus::Flushed, buf);
        }
        self.close_with(CloseReason::LocalError(reason));
    }

    /// A receive the fabric refused to take back (queue full): counts it
    /// as returned and closes.
    pub fn handle_recv_post_failure(&mut self, reason: String, _wr: RecvWr) {
        self.recvs_posted = self.recvs_posted.saturating_sub(1);
        self.close_with(CloseReason::LocalError(reason));
    }

    // ----- input -----

    /// Takes one completion from the fabric.
    pub fn handle_completion(&mut self, c: Completion) {
        if c.id.0 & RECV_TAG != 0 {
            self.handle_recv(c);
        } else {
            self.complete_send(c.id, c.status, Some(c.buf));
        }
        self.maybe_control();
    }

    // ----- output -----

    /// Next piece of work for the driver.
    pub fn poll_work(&mut self) -> Option<Work> {
        self.work.pop_front()
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// Size of a message buffer (receive or send) for `cfg`.
fn buffer_size(cfg: &Config) -> usize {
    HEADER_LEN + 2 * MAX_RELEASES + cfg.msg_size as usize
}

/// Registers `cfg`'s push slots for the peer to write: the pool and every
/// slot granted, in index order.
fn register_slots(pd: &ProtectionDomain, cfg: &Config) -> Result<(BufPool, Vec<Slot>), ProtoError> {
    let pool = pd
        .register(
            cfg.slot_size as usize,
            cfg.slot_count.into(),
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
        )
        .map_err(ProtoError::Register)?;
    let mut bufs: Vec<Buf> = std::iter::from_fn(|| pool.checkout()).collect();
    bufs.sort_by_key(Buf::index);
    Ok((pool, bufs.into_iter().map(Slot::Granted).collect()))
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("open", &self.is_open())
            .field("credits", &self.credits)
            .field("owed", &self.owed)
            .field("inflight", &self.inflight.len())
            .field("free_peer_slots", &self.free_peer_slots())
            .field("held", &self.held)
            .finish()
    }
}

#[cfg(test)]
mod tests;
