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

struct Shared {
    state: Mutex<State>,
    cq: Arc<Cq>,
    /// Its own callback is never set: ours is in `notify`, run only once
    /// the state lock is released.
    queue: CompletionQueue,
    notify: Mutex<Option<Notify>>,
    failed: AtomicBool,
    closing: AtomicBool,
    told_peer: AtomicBool,
    socket: TcpStream,
    wake: WakeFd,
    /// Callers that drive the queue pair (run to completion) and the
    /// completion thread's lease.
    drive: Drive,
    /// Held by the caller that drives: the one that may sleep on the
    /// completion channel (other callers sleep on `queue`).
    events: Mutex<()>,
    peer: String,
    peer_params: Vec<u8>,
    caps: Capabilities,
    /// Outstanding RDMA Reads allowed (`max_rd_atomic`); 0: none at all.
    read_depth: u8,
    domain: ProtectionDomain,
}

/// As in [`PreparedQp`], its `Drop` destroys `qp` before the tables give
/// their buffers back, and leaks them if that fails.
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
    /// Reused by every post and reap (nothing allocated per request): the
    /// descriptors of a post, the device completions and the provider's
    /// of a reap.
    descs: Vec<SendDesc>,
    wcs: Vec<Wc>,
    done: Vec<Completion>,
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(qp) = self.qp.take() {
            destroy_or_leak(qp, &mut self.sends, &mut self.recvs);
        }
    }
}

impl State {
    fn outstanding(&self) -> usize {
        self.sends.len() + self.recvs.len()
    }

    /// Turns a device completion into the provider's, handing the buffer back.
    fn complete(&mut self, wc: &Wc) -> Option<Completion> {
        if wc.wr_id & RECV_BIT != 0 {
            // rxe reports a receive too small for the Send as
            // REM_INV_REQ_ERR, mlx5 as LOC_LEN_ERR: both are the receiver's
            // local length error (see `device::map_recv_status`).
            let status = device::map_recv_status(wc.raw_status);
            let success = status == WcStatus::Success;
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
                status,
                opcode,
                byte_len: if success { wc.byte_len } else { 0 },
                imm: if success { wc.imm } else { None },
                buf,
            })
        } else {
            let success = wc.status == WcStatus::Success;
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
        self.reap_for(false);
    }

    /// [`Shared::reap`]; `driver` when the caller is the thread that drives
    /// (it sees what it queued, so it is not kicked).
    fn reap_for(&self, driver: bool) {
        let mut newly_failed = false;
        let mut pushed = false;
        let mut st = self.state.lock();
        let mut wcs = std::mem::take(&mut st.wcs);
        let mut done = std::mem::take(&mut st.done);
        loop {
            wcs.clear();
            let n = self.cq.poll(&mut wcs, REAP_BATCH);
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
            pushed |= !done.is_empty();
            self.queue.push_all(done.drain(..));
            if n < REAP_BATCH {
                break;
            }
        }
        st.wcs = wcs;
        st.done = done;
        drop(st);
        if newly_failed {
            self.tell_peer();
            self.wake.wake();
        }
        if pushed {
            if !driver {
                self.drive.interrupt();
            }
            self.notify_callback();
        }
    }

    /// After completions were queued other than by the driving caller's own
    /// reap: kicks that caller, then runs the notify callback.
    fn run_notify(&self) {
        self.drive.interrupt();
        self.notify_callback();
    }

    /// Runs the notify callback; never with the state lock held (it is not
    /// re-entrant, and the callback may well poll or post).
    fn notify_callback(&self) {
        let notify = self.notify.lock().clone();
        if let Some(notify) = notify {
            notify();
        }
    }

    /// Whether the queue pair failed and the device owes nothing more:
    /// driving it can bring no further completion.
    fn spent(&self) -> bool {
        self.failed.load(Ordering::Acquire) && self.state.lock().outstanding() == 0
    }

    /// Takes the pending events off the channel and, if there were any,
    /// arms the CQ again; the caller reaps next. Rule for both the driving
    /// caller and the completion thread: whoever takes an event arms
    /// again, so the CQ is armed (or an event is pending) whenever a thread
    /// sleeps on the channel. Left unarmed, a thread asleep on the channel
    /// would sleep through every later completion until someone polled.
    /// Returns false if arming failed: the queue pair was failed.
    fn take_events_and_rearm(&self) -> bool {
        self.cq.take_events() == 0 || self.arm()
    }

    /// The driving caller's sleep: arms the CQ, looks once more (a
    /// completion that arrived before arming raised no event), then sleeps
    /// on the completion channel and the kick.
    fn sleep_on_cq(&self, timeout: Option<Duration>) -> Woke {
        if !self.arm() {
            // The queue pair was failed: the pump sees the flush.
            return Woke::Ready;
        }
        self.reap_for(true);
        if self.queue.has_completions() {
            return Woke::Ready;
        }
        match device::wait_readable([self.cq.fd(), self.drive.kick_fd()], timeout) {
            Ok([events, kicked]) => {
                if events {
                    // Arming fails only by failing the queue pair: the
                    // pump then sees the flush.
                    self.take_events_and_rearm();
                }
                if kicked {
                    Woke::Kicked
                } else if events {
                    Woke::Ready
                } else {
                    Woke::TimedOut
                }
            }
            Err(error) => {
                tracing::error!(peer = %self.peer, %error, "poll on the completion channel failed; failing the queue pair");
                self.fail();
                // Never spin: a failing `poll` returns at once.
                std::thread::sleep(POLL_INTERVAL);
                Woke::Ready
            }
        }
    }

    /// After a failure found outside the completion thread (state lock
    /// released): tells the peer, wakes the thread so it starts the flush
    /// grace, and runs the callback if completions were queued.
    fn after_failure(&self, pushed: bool) {
        self.tell_peer();
        self.wake.wake();
        if pushed {
            self.run_notify();
        }
    }

    /// Fails the queue pair and tells the peer (state lock not held).
    fn fail(&self) {
        self.fail_locked(&mut self.state.lock());
        self.after_failure(false);
    }

    /// Asks for a completion event; returns whether events can be relied
    /// on. If not, the queue pair is failed, so the device flushes what it
    /// holds, and the caller must poll for that flush instead of waiting.
    fn arm(&self) -> bool {
        match self.cq.arm() {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(
                    peer = %self.peer,
                    %error,
                    "ibv_req_notify_cq failed; failing the queue pair and polling for its flush"
                );
                self.fail();
                false
            }
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
    /// Returns whether any were queued now: the caller then runs the notify
    /// callback once it has released the lock.
    #[must_use]
    fn complete_later(
        &self,
        st: &mut MutexGuard<'_, State>,
        completions: impl IntoIterator<Item = Completion>,
    ) -> bool {
        st.deferred.extend(completions);
        if st.outstanding() == 0 && !st.deferred.is_empty() {
            let due = std::mem::take(&mut st.deferred);
            self.queue.push_all(due);
            return true;
        }
        false
    }

    /// Sends DISCONNECT on the side channel, once.
    fn tell_peer(&self) {
        if !self.told_peer.swap(true, Ordering::AcqRel) {
            let _ = (&self.socket).write(&oob::message(oob::KIND_DISCONNECT, &[]));
        }
    }

    /// The device did not flush in time: destroy the queue pair (ending
    /// the NIC's access to the buffers) and flush the rest in software. If
    /// the destroy fails, the buffers still posted are leaked instead
    /// (`destroy_or_leak`); only the software completions are delivered.
    fn abandon_hardware(&self) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if st.outstanding() == 0 {
            return;
        }
        tracing::warn!(
            peer = %self.peer,
            outstanding = st.outstanding(),
            "device did not flush the failed queue pair in {FLUSH_GRACE:?}; destroying it and flushing in software"
        );
        if let Some(qp) = st.qp.take() {
            destroy_or_leak(qp, &mut st.sends, &mut st.recvs);
        }
        let mut done: Vec<Completion> = st.sends.drain(..).map(flushed_slot).collect();
        done.extend(
            st.recvs
                .drain(..)
                .map(|s| flushed_recv(RecvWr { id: s.id, buf: s.buf })),
        );
        done.append(&mut st.deferred);
        let pushed = !done.is_empty();
        self.queue.push_all(done);
        drop(guard);
        if pushed {
            self.run_notify();
        }
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
    shared.drive.register_thread();
    // Whether completion events can be relied on (arming worked) and
    // whether `poll` works; without either, the device is polled every
    // POLL_INTERVAL while it still owes completions.
    let mut events_ok = shared.arm();
    let mut poll_ok = true;
    shared.reap();
    let mut peer_open = true;
    let mut aside = Aside::default();
    let mut stood_aside = false;
    loop {
        if shared.closing.load(Ordering::Acquire) && shared.state.lock().outstanding() == 0 {
            break;
        }
        let grace = shared.grace_left();
        if grace.is_some_and(|g| g.is_zero()) {
            shared.abandon_hardware();
            continue;
        }
        // While callers drive, they poll the CQ themselves (a failed queue
        // pair never parks the thread: it runs the flush grace).
        if !shared.closing.load(Ordering::Acquire) && shared.drive.thread_stands_aside(&shared.failed, &mut aside) {
            stood_aside = true;
            continue;
        }
        if std::mem::take(&mut stood_aside) {
            // Callers reaped while the thread stood aside: take what they
            // left, arming first so that what comes after raises an event.
            if events_ok {
                events_ok = shared.arm();
            }
            shared.reap();
        }
        let owed = shared.state.lock().outstanding() > 0;
        let timeout = if events_ok && poll_ok {
            grace
        } else if owed {
            Some(grace.map_or(POLL_INTERVAL, |g| g.min(POLL_INTERVAL)))
        } else {
            // Nothing left to poll for: only the wake fd and the side
            // channel matter, and without `poll` they are checked this often.
            Some(grace.map_or(POLL_INTERVAL * 10, |g| g.min(POLL_INTERVAL * 10)))
        };
        let socket_fd = if peer_open { shared.socket.as_raw_fd() } else { -1 };
        let ready = if poll_ok {
            device::wait_readable([shared.cq.fd(), socket_fd, shared.wake.fd()], timeout)
        } else {
            Err(std::io::Error::other("poll failed before"))
        };
        let (events, socket) = match ready {
            Ok([events, socket, wake]) => {
                if wake {
                    shared.wake.drain();
                }
                (events, socket)
            }
            Err(error) => {
                if poll_ok {
                    tracing::error!(
                        peer = %shared.peer,
                        %error,
                        "poll on the completion channel failed; polling the queue pair instead"
                    );
                    poll_ok = false;
                }
                // Never spin: a failing `poll` returns at once.
                std::thread::sleep(timeout.unwrap_or(POLL_INTERVAL));
                shared.wake.drain();
                // The events fd cannot be watched: take whatever is pending.
                (true, peer_open)
            }
        };
        // Callers that drive take the event and the completions themselves
        // (the event stays pending on the channel for them).
        if !socket
            && !shared.closing.load(Ordering::Acquire)
            && shared.drive.thread_stands_aside(&shared.failed, &mut aside)
        {
            stood_aside = true;
            continue;
        }
        if events && events_ok {
            events_ok = shared.take_events_and_rearm();
        } else if events {
            shared.cq.take_events();
        }
        shared.reap();
        if socket && peer_gone(&shared.socket) {
            peer_open = false;
            // The peer disconnected or failed: it needs no answer.
            shared.told_peer.store(true, Ordering::Release);
            drain_sends(&shared);
            shared.fail_locked(&mut shared.state.lock());
            tracing::debug!(peer = %shared.peer, "verbs peer disconnected");
        }
    }
}

/// Gives sends still in flight up to [`DISCONNECT_DRAIN`] to complete, so
/// a Send the peer executed before disconnecting completes successfully
/// instead of being flushed by the move to ERR. Events that arrive
/// meanwhile stay pending on the channel for the completion thread.
fn drain_sends(shared: &Shared) {
    let deadline = Instant::now() + DISCONNECT_DRAIN;
    loop {
        shared.reap();
        if shared.failed.load(Ordering::Acquire) || shared.state.lock().sends.is_empty() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(POLL_INTERVAL));
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
            let (kind, buf) = match wr.op {
                // Refused by `check_local` above.
                SendOp::Placed { token, .. } => {
                    later.push(Completion {
                        id: wr.id,
                        status: WcStatus::LocalProtectionError,
                        opcode,
                        byte_len: 0,
                        imm: None,
                        buf: token,
                    });
                    continue;
                }
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
            let seq = st.next_seq;
            st.next_seq += 1;
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
        let mut failing = !later.is_empty();
        if let Err((posted, error)) = posted {
            failing = true;
            let unposted = descs.len() - posted;
            if unposted == 0 {
                // The driver named no bad request: it may have queued them
                // all (rxe does), so they stay in flight and come back with
                // the flush after the move to ERR (or `abandon_hardware`).
                tracing::warn!(
                    peer = %shared.peer,
                    %error,
                    "ibv_post_send failed without naming a request; treating the batch as posted and failing the queue pair"
                );
            } else {
                tracing::warn!(peer = %shared.peer, %error, "ibv_post_send refused a request; failing the queue pair");
            }
            let keep = st.sends.len() - unposted;
            let unposted = st.sends.split_off(keep);
            let mut flushed: Vec<Completion> = unposted.into_iter().map(flushed_slot).collect();
            flushed.append(&mut later);
            later = flushed;
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

/// Whether `buf` belongs to a registration of `domain` (so its lkey is one
/// the NIC gave this protection domain). Looking the range up by remote key
/// proves it: live allocations never overlap, so a region of the domain
/// that contains the buffer is the buffer's own region.
fn check_local(domain: &ProtectionDomain, wr: &SendWr, max_message: u32, read_depth: u8) -> Result<(), WcStatus> {
    let buf = match &wr.op {
        SendOp::Send { buf, .. } | SendOp::Write { buf, .. } | SendOp::Read { buf, .. } => buf,
        // The NIC moves the data: nothing is ever placed by the initiator.
        SendOp::Placed { .. } => return Err(WcStatus::LocalProtectionError),
    };
    if buf.len() > max_message as usize {
        return Err(WcStatus::LocalLengthError);
    }
    if !domain.owns(buf) {
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
