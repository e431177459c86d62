//! The verbs queue pair: in-flight tables that own every posted buffer,
//! the completion thread, and failure handling.
//!
//! Each posted request gets a sequence number as its `wr_id` (receives have
//! the top bit set) and its [`Buf`] moves into the send or receive table,
//! in posting order. A completion takes the entry out and hands the buffer
//! back, so a buffer is never reachable from safe code while the NIC owns
//! it. Everything that touches the tables or the hardware queue pair (post,
//! poll, move to error, destroy) runs under one lock, and completions are
//! queued under it too, so they keep posting order.
//!
//! Failure: an error completion, a local error found at posting,
//! [`QueuePair::disconnect`] or the peer's DISCONNECT (or EOF) on the side
//! channel moves the queue pair to ERR; the device then flushes everything
//! outstanding. Requests posted after that, and local errors, complete in
//! software, queued behind the hardware completions still due. Should the
//! device not flush within [`FLUSH_GRACE`], the queue pair is destroyed
//! (after which the NIC no longer touches the buffers) and what is left is
//! flushed in software, so every buffer always comes back.

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

use super::device::{self, Cq, DeviceInfo, Endpoint, RawQp, SendDesc, SendKind, Sge, WakeFd, Wc};
use super::oob;
use super::Inner;
use crate::mr::{Access, Buf, ProtectionDomain};
use crate::provider::cq::CompletionQueue;
use crate::provider::{
    Capabilities, Completion, FabricError, Notify, QueuePair, RecvWr, SendOp, SendWr, WcOpcode, WcStatus, WrId,
};

/// How long the device gets to flush a failed queue pair before it is
/// destroyed and the rest is flushed in software.
pub const FLUSH_GRACE: Duration = Duration::from_secs(2);

const RECV_BIT: u64 = 1 << 63;

struct SendSlot {
    seq: u64,
    id: WrId,
    opcode: WcOpcode,
    buf: Buf,
}

struct RecvSlot {
    seq: u64,
    id: WrId,
    buf: Buf,
}

/// A queue pair created, in INIT, with its first receives posted: not yet
/// connected, so nothing can be sent on it.
///
/// Field order matters: `qp` drops (is destroyed) before `recvs` gives the
/// buffers back, so a set-up that fails never frees memory the NIC may
/// still write.
pub(super) struct PreparedQp {
    cq: Arc<Cq>,
    qp: RawQp,
    recvs: VecDeque<RecvSlot>,
    next_seq: u64,
    local: Endpoint,
    info: DeviceInfo,
    caps: Capabilities,
    domain: ProtectionDomain,
}

impl PreparedQp {
    /// Creates the CQ and QP, moves the QP to INIT and posts `recvs`.
    pub(super) fn new(fabric: &Inner, recvs: Vec<RecvWr>) -> Result<PreparedQp, FabricError> {
        let caps = fabric.caps;
        if recvs.len() > caps.max_recv_wr as usize {
            return Err(FabricError::QueueFull {
                queue: "receive",
                depth: caps.max_recv_wr,
            });
        }
        let info = fabric.ctx.info().clone();
        let cq = Cq::new(&fabric.ctx, caps.max_send_wr + caps.max_recv_wr)?;
        let qp = RawQp::new(&fabric.pd, &cq, caps.max_send_wr, caps.max_recv_wr)?;
        let io = |op| move |source| FabricError::Io { op, source };
        qp.to_init(info.port).map_err(io("ibv_modify_qp(INIT)"))?;
        let psn = (RandomState::new().build_hasher().finish() as u32) & 0xff_ffff;
        let local = Endpoint {
            qpn: qp.qpn(),
            psn,
            lid: info.lid,
            mtu: info.active_mtu,
            read_depth: info.max_qp_rd_atom.max(1),
            gid: info.gid,
        };
        let mut prepared = PreparedQp {
            cq,
            qp,
            recvs: VecDeque::with_capacity(recvs.len()),
            next_seq: 0,
            local,
            info,
            caps,
            domain: fabric.domain.clone(),
        };
        for wr in recvs {
            if !owned_by(&prepared.domain, &wr.buf) {
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
            // SAFETY: the buffer is registered in this QP's domain (checked
            // above) and now owned by `recvs`, which keeps it until its
            // completion is polled or the QP is destroyed: `recvs` moves
            // into the live queue pair's `State` with the QP, or, if set-up
            // fails, is dropped after it (`qp` is declared before `recvs`).
            unsafe { prepared.qp.post_recv(seq | RECV_BIT, sge) }.map_err(io("ibv_post_recv"))?;
        }
        Ok(prepared)
    }

    /// What the peer needs to reach this queue pair.
    pub(super) fn endpoint(&self) -> Endpoint {
        self.local
    }

    /// INIT → RTR → RTS towards `remote`.
    pub(super) fn ready_to_send(&self, remote: &Endpoint) -> Result<(), FabricError> {
        self.qp
            .to_rts(&self.info, &self.local, remote)
            .map_err(|source| FabricError::Io {
                op: "ibv_modify_qp(RTR/RTS)",
                source,
            })
    }

    /// Starts the completion thread and hands out the live queue pair.
    /// `socket` is the exchange connection, kept as the side channel.
    pub(super) fn start(self, socket: TcpStream, peer: String, peer_params: Vec<u8>) -> Result<VerbsQp, FabricError> {
        let io = |op| move |source| FabricError::Io { op, source };
        socket.set_nonblocking(true).map_err(io("set_nonblocking"))?;
        let wake = WakeFd::new().map_err(io("eventfd"))?;
        let PreparedQp {
            cq,
            qp,
            recvs,
            next_seq,
            caps,
            domain,
            ..
        } = self;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                qp: Some(qp),
                sends: VecDeque::new(),
                recvs,
                next_seq,
                failed_at: None,
                deferred: Vec::new(),
            }),
            cq,
            queue: CompletionQueue::default(),
            failed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            told_peer: AtomicBool::new(false),
            socket,
            wake,
            peer,
            peer_params,
            caps,
            domain,
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

/// A connected verbs RC queue pair.
pub struct VerbsQp {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    state: Mutex<State>,
    cq: Arc<Cq>,
    queue: CompletionQueue,
    failed: AtomicBool,
    closing: AtomicBool,
    told_peer: AtomicBool,
    socket: TcpStream,
    wake: WakeFd,
    peer: String,
    peer_params: Vec<u8>,
    caps: Capabilities,
    domain: ProtectionDomain,
}

/// As in [`PreparedQp`], `qp` is declared first so that it is destroyed
/// before the tables give their buffers back.
struct State {
    /// `None` once destroyed after a failed flush.
    qp: Option<RawQp>,
    /// Posted to the device, in posting order.
    sends: VecDeque<SendSlot>,
    recvs: VecDeque<RecvSlot>,
    next_seq: u64,
    failed_at: Option<Instant>,
    /// Software completions due after every posted request came back.
    deferred: Vec<Completion>,
}

impl State {
    fn outstanding(&self) -> usize {
        self.sends.len() + self.recvs.len()
    }

    /// Turns a device completion into the provider's, handing the buffer back.
    fn complete(&mut self, wc: &Wc) -> Option<Completion> {
        let success = wc.status == WcStatus::Success;
        if wc.wr_id & RECV_BIT != 0 {
            let seq = wc.wr_id & !RECV_BIT;
            let pos = self.recvs.iter().position(|s| s.seq == seq)?;
            let RecvSlot { id, mut buf, .. } = self.recvs.remove(pos)?;
            let with_imm_write = success && wc.opcode == rdma_mummy_sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
            let opcode = if with_imm_write {
                WcOpcode::RecvRdmaWithImm
            } else {
                WcOpcode::Recv
            };
            if success && !with_imm_write {
                buf.set_len((wc.byte_len as usize).min(buf.capacity()));
            } else {
                buf.set_len(0);
            }
            Some(Completion {
                id,
                status: wc.status,
                opcode,
                byte_len: if success { wc.byte_len } else { 0 },
                imm: if success { wc.imm } else { None },
                buf,
            })
        } else {
            let pos = self.sends.iter().position(|s| s.seq == wc.wr_id)?;
            let SendSlot { id, opcode, buf, .. } = self.sends.remove(pos)?;
            Some(Completion {
                id,
                status: wc.status,
                opcode,
                byte_len: if success { buf.len() as u32 } else { 0 },
                imm: None,
                buf,
            })
        }
    }
}

impl Shared {
    /// Polls the device CQ dry and queues the completions (in order, under
    /// the state lock), then whatever software completions became due.
    fn reap(&self) {
        let mut wcs = Vec::with_capacity(32);
        let mut newly_failed = false;
        let mut st = self.state.lock();
        loop {
            wcs.clear();
            let n = self.cq.poll(&mut wcs, 32);
            let mut done = Vec::with_capacity(n);
            for wc in &wcs {
                if !matches!(wc.status, WcStatus::Success | WcStatus::Flushed) {
                    tracing::debug!(
                        peer = %self.peer,
                        status = %device::status_name(wc.raw_status),
                        vendor_err = wc.vendor_err,
                        "verbs work request failed"
                    );
                }
                if wc.status != WcStatus::Success && !self.failed.load(Ordering::Acquire) {
                    newly_failed = true;
                    self.fail_locked(&mut st);
                }
                match st.complete(wc) {
                    Some(c) => done.push(c),
                    None => tracing::debug!(wr_id = wc.wr_id, "completion of an unknown request ignored"),
                }
            }
            if st.outstanding() == 0 {
                done.append(&mut st.deferred);
            }
            self.queue.push_all(done);
            if n < 32 {
                break;
            }
        }
        drop(st);
        if newly_failed {
            self.tell_peer();
            self.wake.wake();
        }
    }

    /// Marks the queue pair failed and moves it to ERR (idempotent).
    fn fail_locked(&self, st: &mut State) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        st.failed_at = Some(Instant::now());
        if let Some(qp) = &st.qp {
            qp.to_error();
        }
    }

    /// Queues software completions behind everything the device still owes.
    fn complete_later(&self, st: &mut MutexGuard<'_, State>, completions: impl IntoIterator<Item = Completion>) {
        st.deferred.extend(completions);
        if st.outstanding() == 0 {
            let due = std::mem::take(&mut st.deferred);
            self.queue.push_all(due);
        }
    }

    /// Sends DISCONNECT on the side channel, once.
    fn tell_peer(&self) {
        if !self.told_peer.swap(true, Ordering::AcqRel) {
            let _ = (&self.socket).write(&oob::message(oob::KIND_DISCONNECT, &[]));
        }
    }

    /// The device did not flush in time: destroy the queue pair (ending
    /// the NIC's access to the buffers) and flush the rest in software.
    fn abandon_hardware(&self) {
        let mut st = self.state.lock();
        if st.outstanding() == 0 {
            return;
        }
        tracing::warn!(
            peer = %self.peer,
            outstanding = st.outstanding(),
            "device did not flush the failed queue pair in {FLUSH_GRACE:?}; destroying it and flushing in software"
        );
        drop(st.qp.take());
        let mut done: Vec<Completion> = st.sends.drain(..).map(flushed_slot).collect();
        done.extend(
            st.recvs
                .drain(..)
                .map(|s| flushed_recv(RecvWr { id: s.id, buf: s.buf })),
        );
        done.append(&mut st.deferred);
        self.queue.push_all(done);
    }

    fn grace_left(&self) -> Option<Duration> {
        let st = self.state.lock();
        let failed_at = st.failed_at?;
        if st.outstanding() == 0 {
            return None;
        }
        Some(FLUSH_GRACE.saturating_sub(failed_at.elapsed()))
    }
}

fn completion_thread(shared: Arc<Shared>) {
    if let Err(e) = shared.cq.arm() {
        tracing::error!(error = %e, "ibv_req_notify_cq failed; failing the queue pair");
        shared.fail_locked(&mut shared.state.lock());
    }
    shared.reap();
    let mut peer_open = true;
    loop {
        if shared.closing.load(Ordering::Acquire) && shared.state.lock().outstanding() == 0 {
            break;
        }
        let grace = shared.grace_left();
        if grace.is_some_and(|g| g.is_zero()) {
            shared.abandon_hardware();
            continue;
        }
        let socket_fd = if peer_open { shared.socket.as_raw_fd() } else { -1 };
        let [events, socket, wake] = device::wait_readable([shared.cq.fd(), socket_fd, shared.wake.fd()], grace);
        if wake {
            shared.wake.drain();
        }
        if events {
            shared.cq.take_events();
            if let Err(e) = shared.cq.arm() {
                tracing::warn!(error = %e, "ibv_req_notify_cq failed");
            }
        }
        shared.reap();
        if socket && peer_gone(&shared.socket) {
            peer_open = false;
            // The peer disconnected or failed: it needs no answer.
            shared.told_peer.store(true, Ordering::Release);
            shared.fail_locked(&mut shared.state.lock());
            tracing::debug!(peer = %shared.peer, "verbs peer disconnected");
        }
    }
}

/// Reads the side channel; true when the peer sent DISCONNECT, closed it or it failed.
fn peer_gone(socket: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match (&*socket).read(&mut buf) {
        Ok(_) => true, // EOF, or a DISCONNECT (nothing else is ever sent)
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            false
        }
        Err(_) => true,
    }
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
    fn post_send(&self, wrs: Vec<SendWr>) -> Result<(), (FabricError, Vec<SendWr>)> {
        let shared = &self.shared;
        let mut st = shared.state.lock();
        if shared.failed.load(Ordering::Acquire) {
            shared.complete_later(&mut st, wrs.into_iter().map(flushed_send));
            return Ok(());
        }
        let depth = shared.caps.max_send_wr;
        if st.sends.len() + wrs.len() > depth as usize {
            return Err((FabricError::QueueFull { queue: "send", depth }, wrs));
        }
        let mut descs = Vec::with_capacity(wrs.len());
        let mut later = Vec::new();
        for wr in wrs {
            if !later.is_empty() {
                later.push(flushed_send(wr));
                continue;
            }
            if let Err(status) = check_local(&shared.domain, &wr, shared.caps.max_message) {
                // Checked before posting, as the NIC would, so that every
                // device reports it alike: the request fails after the ones
                // before it, those after it are flushed.
                let mut c = flushed_send(wr);
                c.status = status;
                later.push(c);
                continue;
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let opcode = wr.opcode();
            let (kind, buf) = match wr.op {
                SendOp::Send { buf, imm } => (SendKind::Send { imm }, buf),
                SendOp::Write { buf, remote, imm } => (
                    SendKind::Write {
                        addr: remote.addr,
                        rkey: remote.rkey,
                        imm,
                    },
                    buf,
                ),
                SendOp::Read { buf, remote } => (
                    SendKind::Read {
                        addr: remote.addr,
                        rkey: remote.rkey,
                    },
                    buf,
                ),
            };
            descs.push(SendDesc {
                wr_id: seq,
                kind,
                sge: Sge {
                    addr: buf.addr(),
                    len: buf.len() as u32,
                    lkey: buf.lkey(),
                },
            });
            st.sends.push_back(SendSlot {
                seq,
                id: wr.id,
                opcode,
                buf,
            });
        }
        let posted = match st.qp.as_ref() {
            // SAFETY: every descriptor names a buffer registered in this QP's
            // domain (`check_local`) that is now owned by `st.sends`, which
            // keeps it until its completion is polled or the QP is destroyed.
            Some(qp) => unsafe { qp.post_send(&descs) },
            None => Err((0, std::io::Error::other("queue pair destroyed"))),
        };
        if let Err((index, error)) = posted {
            tracing::warn!(peer = %shared.peer, %error, "ibv_post_send refused a request; failing the queue pair");
            let keep = st.sends.len() - (descs.len() - index);
            let unposted = st.sends.split_off(keep);
            let mut flushed: Vec<Completion> = unposted.into_iter().map(flushed_slot).collect();
            flushed.append(&mut later);
            later = flushed;
        }
        if !later.is_empty() {
            shared.fail_locked(&mut st);
            shared.complete_later(&mut st, later);
            drop(st);
            shared.tell_peer();
            shared.wake.wake();
        }
        Ok(())
    }

    fn post_recv(&self, wr: RecvWr) -> Result<(), (FabricError, RecvWr)> {
        let shared = &self.shared;
        let mut st = shared.state.lock();
        if shared.failed.load(Ordering::Acquire) {
            shared.complete_later(&mut st, [flushed_recv(wr)]);
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
        if !owned_by(&shared.domain, &wr.buf) {
            let mut c = flushed_recv(wr);
            c.status = WcStatus::LocalProtectionError;
            shared.fail_locked(&mut st);
            shared.complete_later(&mut st, [c]);
            drop(st);
            shared.tell_peer();
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
            // or the QP is destroyed.
            Some(qp) => unsafe { qp.post_recv(seq | RECV_BIT, sge) },
            None => Err(std::io::Error::other("queue pair destroyed")),
        };
        if let Err(error) = posted {
            tracing::warn!(peer = %shared.peer, %error, "ibv_post_recv failed; failing the queue pair");
            let slot = st.recvs.pop_back().expect("pushed above");
            shared.fail_locked(&mut st);
            shared.complete_later(
                &mut st,
                [flushed_recv(RecvWr {
                    id: slot.id,
                    buf: slot.buf,
                })],
            );
            drop(st);
            shared.tell_peer();
        }
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        self.shared.reap();
        self.shared.queue.poll(out, max)
    }

    fn wait(&self, timeout: Option<Duration>) -> bool {
        self.shared.reap();
        self.shared.queue.wait(timeout)
    }

    fn set_notify(&self, notify: Option<Notify>) {
        self.shared.queue.set_notify(notify);
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
        let shared = &self.shared;
        shared.fail_locked(&mut shared.state.lock());
        shared.tell_peer();
        shared.wake.wake();
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
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// Whether `buf` belongs to a registration of `domain` (so its lkey is one
/// the NIC gave this protection domain). Looking the range up by remote key
/// proves it: live allocations never overlap, so a region of the domain
/// that contains the buffer is the buffer's own region.
fn owned_by(domain: &ProtectionDomain, buf: &Buf) -> bool {
    domain
        .remote_target(buf.remote().rkey, buf.addr(), buf.capacity() as u64, Access::NONE)
        .is_ok()
}

fn check_local(domain: &ProtectionDomain, wr: &SendWr, max_message: u32) -> Result<(), WcStatus> {
    let buf = match &wr.op {
        SendOp::Send { buf, .. } | SendOp::Write { buf, .. } | SendOp::Read { buf, .. } => buf,
    };
    if buf.len() > max_message as usize {
        return Err(WcStatus::LocalLengthError);
    }
    if !owned_by(domain, buf) {
        return Err(WcStatus::LocalProtectionError);
    }
    if matches!(wr.op, SendOp::Read { .. }) && !buf.access().contains(Access::LOCAL_WRITE) {
        return Err(WcStatus::LocalProtectionError);
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

fn flushed_send(wr: SendWr) -> Completion {
    Completion {
        id: wr.id,
        status: WcStatus::Flushed,
        opcode: wr.opcode(),
        byte_len: 0,
        imm: None,
        buf: wr.into_buf(),
    }
}

fn flushed_recv(wr: RecvWr) -> Completion {
    Completion {
        id: wr.id,
        status: WcStatus::Flushed,
        opcode: WcOpcode::Recv,
        byte_len: 0,
        imm: None,
        buf: wr.buf,
    }
}
