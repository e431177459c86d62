//! The verbs queue pair: in-flight tables that own every posted buffer,
//! the completion thread, and failure handling.
//!
//! Each posted request gets a sequence number as its `wr_id` (receives have
//! the top bit set) and its [`Buf`] moves into the send or receive table,
//! in posting order. A completion takes the entry out and hands the buffer
//! back, so a buffer is never reachable from safe code while the NIC owns
//! it. Everything that touches the tables or the hardware queue pair (post,
//! poll, move to error, destroy) runs under one lock, and completions are
//! queued under it too, so they keep posting order; the notify callback runs
//! only after that lock is released, so it may post or poll.
//!
//! Run to completion (ADR 3, `provider/drive.rs`): a caller in
//! [`QueuePair::wait`] polls the device CQ itself and, when nothing is
//! there, sleeps on the completion channel itself, so a completion reaches
//! the thread that waits for it with one wake-up, or none while it spins.
//! The completion thread stands aside while callers drive or poll; it covers for
//! absent callers (an asynchronous application, traffic nobody waits for),
//! watches the side channel and runs the flush grace. Completions that
//! reach the queue other than through the driving caller's own poll kick
//! that caller out of its sleep.
//!
//! Failure: an error completion, a local error found at posting,
//! [`QueuePair::disconnect`] or the peer's DISCONNECT (or EOF) on the side
//! channel moves the queue pair to ERR; the device then flushes everything
//! outstanding. Requests posted after that, and local errors, complete in
//! software, queued behind the hardware completions still due. Should the
//! device not flush within [`FLUSH_GRACE`], the queue pair is destroyed
//! (after which the NIC no longer touches the buffers) and what is left is
//! flushed in software, so every buffer always comes back. The one
//! exception: if `ibv_destroy_qp` itself fails, the NIC may still reach the
//! buffers, so they are leaked (never handed back or freed) and an error is
//! logged.
//!
//! A peer's DISCONNECT can overtake the acknowledgement of a Send it has
//! already received; sends still in flight then get [`DISCONNECT_DRAIN`] to
//! complete before the queue pair moves to ERR and flushes them.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::device::{self, Cq, DeviceInfo, Endpoint, Pd, RawQp, SendDesc, SendKind, Sge, WakeFd, Wc};
use super::oob;
use super::Inner;
use crate::mr::{Access, Buf, ProtectionDomain};
use crate::provider::cq::CompletionQueue;
use crate::provider::drive::{Aside, Drive, Woke};
use crate::provider::{flushed_recv, flushed_send};
use crate::provider::{
    Capabilities, Completion, FabricError, Notify, QueuePair, RecvWr, SendOp, SendWr, WcOpcode, WcStatus, WrId,
};

mod progress;

use progress::*;

/// How long the device gets to flush a failed queue pair before it is
/// destroyed and the rest is flushed in software.
pub const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// How long a DISCONNECT from the peer waits for sends in flight to
/// complete before the queue pair moves to ERR: long enough for an
/// acknowledgement already on the wire, far below the 67 ms ACK timeout
/// (timeout 14), so a Send the peer executed is not reported as flushed.
pub const DISCONNECT_DRAIN: Duration = Duration::from_millis(20);

/// How often the completion thread polls the device when completion events
/// cannot be relied on (`ibv_req_notify_cq` or `poll` failed).
const POLL_INTERVAL: Duration = Duration::from_millis(1);

const RECV_BIT: u64 = 1 << 63;
/// Device completions taken per `ibv_poll_cq` call.
const REAP_BATCH: usize = 32;

struct SendSlot {
    seq: u64,
    id: WrId,
    opcode: WcOpcode,
    buf: Buf,
    /// A gathered Send's second buffer, held until the completion too.
    _tail: Option<Buf>,
}

struct RecvSlot {
    seq: u64,
    id: WrId,
    buf: Buf,
}

/// A queue pair created, in INIT, with its first receives posted: not yet
/// connected, so nothing can be sent on it.
///
/// Dropping it (a set-up that fails) destroys `qp` before `recvs` gives the
/// buffers back, and leaks them if the destroy fails, so it never frees
/// memory the NIC may still write.
pub(super) struct PreparedQp {
    cq: Arc<Cq>,
    /// `None` only once `start` moved it into the live queue pair.
    qp: Option<RawQp>,
    recvs: VecDeque<RecvSlot>,
    next_seq: u64,
    local: Endpoint,
    /// RDMA Reads this side may have outstanding (`max_rd_atomic`), known
    /// once connected; 0 when Reads cannot be posted.
    read_depth: u8,
    info: DeviceInfo,
    caps: Capabilities,
    domain: ProtectionDomain,
}

impl PreparedQp {
    /// Creates the CQ and QP, moves the QP to INIT and posts `recvs`, which
    /// `domain` (the connection's) must own. The QP is created in
    /// `domain`'s device protection domain (a child of the fabric's domain
    /// has one of its own), so the NIC refuses the peer any key of another
    /// domain.
    pub(super) fn new(
        fabric: &Inner,
        domain: &ProtectionDomain,
        recvs: Vec<RecvWr>,
    ) -> Result<PreparedQp, FabricError> {
        let device_pd = domain
            .registrar()
            .and_then(|r| r.clone().into_any().downcast::<Pd>().ok())
            .filter(|_| domain.is_within(&fabric.domain))
            .ok_or(FabricError::ForeignDomain { provider: "verbs" })?;
        let caps = fabric.caps;
        if recvs.len() > caps.max_recv_wr as usize {
            return Err(FabricError::QueueFull {
                queue: "receive",
                depth: caps.max_recv_wr,
            });
        }
        let info = fabric.ctx.info().clone();
        let cq = Cq::new(&fabric.ctx, caps.max_send_wr + caps.max_recv_wr)?;
        let qp = RawQp::new(&device_pd, &cq, caps.max_send_wr, caps.max_recv_wr)?;
        let io = |op| move |source| FabricError::Io { op, source };
        qp.to_init(info.port).map_err(io("ibv_modify_qp(INIT)"))?;
        let psn = (RandomState::new().build_hasher().finish() as u32) & 0xff_ffff;
        let local = Endpoint {
            qpn: qp.qpn(),
            psn,
            lid: info.lid,
            mtu: info.active_mtu,
            // The device's own limit, 0 included: the peer then posts no Reads.
            read_depth: info.max_qp_rd_atom,
            gid: info.gid,
            gid_type: info.gid_type,
        };
        let mut prepared = PreparedQp {
            cq,
            qp: Some(qp),
            recvs: VecDeque::with_capacity(recvs.len()),
            next_seq: 0,
            local,
            read_depth: 0,
            info,
            caps,
            domain: domain.clone(),
        };
        for wr in recvs {
            if !prepared.domain.owns(&wr.buf) {
                return Err(FabricError::Io {
                    op: "ibv_post_recv",
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "receive buffer is not registered in this fabric's domain",
                    ),
                });
            }
            let seq = prepared.next_seq;
            prepared.next_seq += 1;
            let sge = recv_sge(&wr.buf);
            prepared.recvs.push_back(RecvSlot {
                seq,
                id: wr.id,
                buf: wr.buf,
            });
            let Some(qp) = prepared.qp.as_ref() else {
                unreachable!("a queue pair being prepared holds its QP");
            };
            // SAFETY: the buffer is registered in this QP's domain (checked
            // above) and now owned by `recvs`, which keeps it until its
            // completion is polled or the QP is destroyed, also when the
            // post fails (the driver may have queued it): `recvs` moves into
            // the live queue pair's `State` with the QP, or, if set-up
            // fails, `PreparedQp`'s `Drop` destroys the QP first and leaks
            // `recvs` should that fail.
            unsafe { qp.post_recv(seq | RECV_BIT, sge) }.map_err(|(_, source)| FabricError::Io {
                op: "ibv_post_recv",
                source,
            })?;
        }
        Ok(prepared)
    }

    /// What the peer needs to reach this queue pair.
    pub(super) fn endpoint(&self) -> Endpoint {
        self.local
    }

    /// INIT → RTR → RTS towards `remote`.
    pub(super) fn ready_to_send(&mut self, remote: &Endpoint) -> Result<(), FabricError> {
        let Some(qp) = self.qp.as_ref() else {
            unreachable!("a queue pair being prepared holds its QP");
        };
        qp.to_rts(&self.info, &self.local, remote)
            .map_err(|source| FabricError::Io {
                op: "ibv_modify_qp(RTR/RTS)",
                source,
            })?;
        self.read_depth = device::read_depth_towards(&self.info, remote);
        if self.read_depth == 0 {
            tracing::warn!(
                device = %self.info.name,
                local_initiator_depth = self.info.max_qp_init_rd_atom,
                peer_read_depth = remote.read_depth,
                "this device or the peer supports no outstanding RDMA Reads: Reads on this queue pair will fail"
            );
        }
        Ok(())
    }

    /// Starts the completion thread and hands out the live queue pair.
    /// `socket` is the exchange connection, kept as the side channel.
    pub(super) fn start(
        mut self,
        socket: TcpStream,
        peer: String,
        peer_params: Vec<u8>,
    ) -> Result<VerbsQp, FabricError> {
        let io = |op| move |source| FabricError::Io { op, source };
        socket.set_nonblocking(true).map_err(io("set_nonblocking"))?;
        let wake = WakeFd::new().map_err(io("eventfd"))?;
        let drive = Drive::new().map_err(io("socketpair"))?;
        // From here the QP and its receives move together into `State`,
        // whose `Drop` destroys them in the same careful way.
        let qp = self.qp.take();
        let recvs = std::mem::take(&mut self.recvs);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                qp,
                sends: VecDeque::new(),
                recvs,
                next_seq: self.next_seq,
                failed_at: None,
                deferred: Vec::new(),
                descs: Vec::new(),
                wcs: Vec::with_capacity(REAP_BATCH),
                done: Vec::with_capacity(REAP_BATCH),
            }),
            cq: self.cq.clone(),
            queue: CompletionQueue::default(),
            notify: Mutex::new(None),
            failed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            told_peer: AtomicBool::new(false),
            socket,
            wake,
            drive,
            events: Mutex::new(()),
            peer,
            peer_params,
            caps: self.caps,
            read_depth: self.read_depth,
            domain: self.domain.clone(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("chanio-verbs-cq".into())
                .spawn(move || completion_thread(shared))
                .map_err(io("spawn completion thread"))?
        };
        Ok(VerbsQp {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl Drop for PreparedQp {
    fn drop(&mut self) {
        if let Some(qp) = self.qp.take() {
            destroy_or_leak(qp, &mut VecDeque::new(), &mut self.recvs);
        }
    }
}

/// Destroys `qp`. Should that fail, the NIC may still reach the buffers
/// posted to it, so the tables are leaked (emptied without dropping their
/// `Buf`s, so the memory is never freed nor handed back) and an error is
/// logged. Returns whether the queue pair was destroyed.
fn destroy_or_leak(qp: RawQp, sends: &mut VecDeque<SendSlot>, recvs: &mut VecDeque<RecvSlot>) -> bool {
    match qp.destroy() {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(
                %error,
                sends = sends.len(),
                receives = recvs.len(),
                "ibv_destroy_qp failed: the device may still access the buffers posted to it, so they are leaked"
            );
            std::mem::forget(std::mem::take(sends));
            std::mem::forget(std::mem::take(recvs));
            false
        }
    }
}

/// A connected verbs RC queue pair.
pub struct VerbsQp {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for VerbsQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsQp")
            .field("peer", &self.shared.peer)
            .field("failed", &self.is_failed())
            .finish()
    }
}

impl QueuePair for VerbsQp {
    // Long: the checks, the descriptors and the post of one batch, and what
    // a refused post leaves, all under the one state lock.
    fn post_send(&self, wrs: &mut Vec<SendWr>) -> Result<(), FabricError> {
        let shared = &self.shared;
        let mut st = shared.state.lock();
        if shared.failed.load(Ordering::Acquire) {
            let pushed = shared.complete_later(&mut st, wrs.drain(..).map(flushed_send));
            drop(st);
            if pushed {
                shared.run_notify();
            }
            return Ok(());
        }
        let depth = shared.caps.max_send_wr;
        if st.sends.len() + wrs.len() > depth as usize {
            return Err(FabricError::QueueFull { queue: "send", depth });
        }
        let mut descs = std::mem::take(&mut st.descs);
        descs.clear();
        let mut later = Vec::new();
        for wr in wrs.drain(..) {
            if !later.is_empty() {
                later.push(flushed_send(wr));
                continue;
            }
            if let Err(status) = check_local(&shared.domain, &wr, shared.caps.max_message, shared.read_depth) {
                // Checked before posting, as the NIC would, so that every
                // device reports it alike: the request fails after the ones
                // before it, those after it are flushed.
                let mut c = flushed_send(wr);
                c.status = status;
                later.push(c);
                continue;
            }
            let opcode = wr.opcode();
            let id = wr.id;
            let (kind, buf, tail) = send_kind(wr.op);
            let seq = st.next_seq;
            st.next_seq += 1;
            let sge = |b: &Buf| Sge {
                addr: b.addr(),
                len: b.len() as u32,
                lkey: b.lkey(),
            };
            descs.push(SendDesc {
                wr_id: seq,
                kind,
                sge: sge(&buf),
                tail: tail.as_ref().map(sge),
            });
            st.sends.push_back(SendSlot {
                seq,
                id,
                opcode,
                buf,
                _tail: tail,
            });
        }
        let posted = match st.qp.as_ref() {
            // SAFETY: every descriptor names a buffer registered in this QP's
            // domain (`check_local`) that is now owned by `st.sends`, which
            // keeps it until its completion is polled or the QP is destroyed.
            Some(qp) => unsafe { qp.post_send(&descs) },
            None => Err((0, std::io::Error::other("queue pair destroyed"))),
        };
        let mut failing = !later.is_empty();
        if let Err((posted, error)) = posted {
            failing = true;
            let unposted = descs.len() - posted;
            later = shared.unposted(&mut st, unposted, &error, later);
        }
        descs.clear();
        st.descs = descs;
        if failing {
            shared.fail_locked(&mut st);
            let pushed = shared.complete_later(&mut st, later);
            drop(st);
            shared.after_failure(pushed);
        }
        Ok(())
    }

    fn post_recv(&self, wr: RecvWr) -> Result<(), (FabricError, RecvWr)> {
        let shared = &self.shared;
        let mut st = shared.state.lock();
        if shared.failed.load(Ordering::Acquire) {
            let pushed = shared.complete_later(&mut st, [flushed_recv(wr)]);
            drop(st);
            if pushed {
                shared.run_notify();
            }
            return Ok(());
        }
        let depth = shared.caps.max_recv_wr;
        if st.recvs.len() >= depth as usize {
            return Err((
                FabricError::QueueFull {
                    queue: "receive",
                    depth,
                },
                wr,
            ));
        }
        if !shared.domain.owns(&wr.buf) {
            let mut c = flushed_recv(wr);
            c.status = WcStatus::LocalProtectionError;
            shared.fail_locked(&mut st);
            let pushed = shared.complete_later(&mut st, [c]);
            drop(st);
            shared.after_failure(pushed);
            return Ok(());
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let sge = recv_sge(&wr.buf);
        st.recvs.push_back(RecvSlot {
            seq,
            id: wr.id,
            buf: wr.buf,
        });
        let posted = match st.qp.as_ref() {
            // SAFETY: the buffer is registered in this QP's domain (checked
            // above) and owned by `st.recvs` until its completion is polled
            // or the QP is destroyed; on a failure that may have posted it
            // anyway, it stays there (below).
            Some(qp) => unsafe { qp.post_recv(seq | RECV_BIT, sge) },
            None => Err((false, std::io::Error::other("queue pair destroyed"))),
        };
        if let Err((maybe_posted, error)) = posted {
            let pushed = if maybe_posted {
                // The driver named no bad request: it may have queued it,
                // so it stays in flight and comes back with the flush.
                tracing::warn!(
                    peer = %shared.peer,
                    %error,
                    "ibv_post_recv failed without naming the request; treating it as posted and failing the queue pair"
                );
                shared.fail_locked(&mut st);
                false
            } else {
                tracing::warn!(peer = %shared.peer, %error, "ibv_post_recv failed; failing the queue pair");
                // Local invariant: the slot was pushed just above, under the
                // same lock, so it is the last one.
                let slot = st.recvs.pop_back().expect("pushed above");
                shared.fail_locked(&mut st);
                shared.complete_later(
                    &mut st,
                    [flushed_recv(RecvWr {
                        id: slot.id,
                        buf: slot.buf,
                    })],
                )
            };
            drop(st);
            shared.after_failure(pushed);
        }
        Ok(())
    }

    /// Reaps the device CQ from the calling thread. A caller that polls
    /// counts as driving (the completion thread stays aside while it keeps
    /// coming): a busy server thread that always finds work never waits,
    /// and would otherwise leave every reap to the completion thread, one
    /// wake-up per completion. A caller that drives is kicked when the
    /// poll took completions: they may be what it waits for.
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        self.shared.drive.renew_lease();
        self.shared.reap();
        self.shared.queue.poll(out, max)
    }

    /// Polls the device CQ from the calling thread (run to completion)
    /// until a completion is ready, `timeout` passes or
    /// [`QueuePair::interrupt`] is called; sleeps on the completion channel
    /// itself, or on the queue when another caller drives already.
    fn wait(&self, timeout: Option<Duration>) -> bool {
        let shared = &*self.shared;
        shared.drive.drive(
            &shared.events,
            &shared.queue,
            timeout,
            |_| {
                shared.reap_for(true);
                !shared.spent()
            },
            |_, timeout| shared.sleep_on_cq(timeout),
        )
    }

    fn step_away(&self) {
        self.shared.drive.step_away();
    }

    fn interrupt(&self) {
        self.shared.drive.interrupt();
        self.shared.queue.interrupt();
    }

    fn drives_on_wait(&self) -> bool {
        true
    }

    fn set_notify(&self, notify: Option<Notify>) {
        *self.shared.notify.lock() = notify;
    }

    fn peer_params(&self) -> &[u8] {
        &self.shared.peer_params
    }

    fn peer_addr(&self) -> String {
        self.shared.peer.clone()
    }

    fn is_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    fn disconnect(&self) {
        self.shared.fail();
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.caps
    }
}

impl Drop for VerbsQp {
    fn drop(&mut self) {
        self.disconnect();
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.wake();
        if let Some(thread) = self.thread.lock().take() {
            // It may be parked, standing aside for callers.
            thread.thread().unpark();
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// The work request kind and buffers a send becomes: the first scatter
/// entry's, and a gathered Send's second.
fn send_kind(op: SendOp) -> (SendKind, Buf, Option<Buf>) {
    match op {
        SendOp::Send { buf, imm } => (SendKind::Send { imm }, buf, None),
        SendOp::SendGather(g) => {
            let (head, tail) = g.into_parts();
            (SendKind::Send { imm: None }, head, Some(tail))
        }
        SendOp::Write { buf, remote, imm } => (
            SendKind::Write {
                addr: remote.addr,
                rkey: remote.rkey,
                imm,
            },
            buf,
            None,
        ),
        SendOp::Read { buf, remote } => (
            SendKind::Read {
                addr: remote.addr,
                rkey: remote.rkey,
            },
            buf,
            None,
        ),
    }
}

/// Whether `buf` belongs to a registration of `domain` (so its lkey is one
/// the NIC gave this protection domain). Looking the range up by remote key
/// proves it: live allocations never overlap, so a region of the domain
/// that contains the buffer is the buffer's own region.
fn check_local(domain: &ProtectionDomain, wr: &SendWr, max_message: u32, read_depth: u8) -> Result<(), WcStatus> {
    let (buf, tail) = match &wr.op {
        SendOp::Send { buf, .. } | SendOp::Write { buf, .. } | SendOp::Read { buf, .. } => (buf, None),
        SendOp::SendGather(g) => (g.head(), Some(g.tail())),
    };
    if wr.len() > max_message as usize {
        return Err(WcStatus::LocalLengthError);
    }
    if !domain.owns(buf) || tail.is_some_and(|t| !domain.owns(t)) {
        return Err(WcStatus::LocalProtectionError);
    }
    if matches!(wr.op, SendOp::Read { .. }) {
        // Registrations always carry local write for the NIC, so this
        // right is enforced here.
        if !buf.access().contains(Access::LOCAL_WRITE) {
            return Err(WcStatus::LocalProtectionError);
        }
        if read_depth == 0 {
            tracing::warn!(
                "RDMA Read refused: this device or the peer supports no outstanding Reads (max_rd_atomic 0)"
            );
            return Err(WcStatus::LocalProtectionError);
        }
    }
    Ok(())
}

fn recv_sge(buf: &Buf) -> Sge {
    Sge {
        addr: buf.addr(),
        len: u32::try_from(buf.capacity()).unwrap_or(u32::MAX),
        lkey: buf.lkey(),
    }
}

fn flushed_slot(slot: SendSlot) -> Completion {
    Completion {
        id: slot.id,
        status: WcStatus::Flushed,
        opcode: slot.opcode,
        byte_len: 0,
        imm: None,
        buf: slot.buf,
    }
}
