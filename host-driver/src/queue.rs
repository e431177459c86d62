//! One NVMe queue: a messaging channel, the table of commands in flight on
//! it, and the reaping that completes them.
//!
//! Reaping (taking deliveries off the channel and completing commands) is
//! done by one thread at a time, the holder of `reaper`: preferably a
//! thread blocked in `block_on` on one of this queue's commands (run to
//! completion: its completion reaches it without a thread hop, and one
//! submitting thread can keep many commands in flight), otherwise the
//! queue's receiver thread, which stands aside while such callers come by
//! (a short lease) and serves async users and quiet periods.
//!
//! ```text
//!  caller future                       reaper (blocked caller or receiver thread)
//!  ─────────────                       ───────────────────────────────────────────
//!  acquire slot (CID) ──▶ slots ◀───── Direct{tag}: data into the slot
//!  expose read buffer      │    ◀───── CQE: slot removed, cell completed
//!  send capsule (+ pushes) │    ◀───── channel closed: every slot fails (Lost)
//!  wait on the cell ◀──────┘
//! ```
//!
//! A command's slot, and with it its CID, lives until its CQE arrives or the
//! channel closes, even when the caller gave up (timeout or a dropped
//! future): the slot is then marked ignored, so its CID is not reused and a
//! buffer the I/O unit may still write to stays out of reach. Buffers that
//! stay exposed because a command failed are kept as spares and reused by
//! later reads on the same queue.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use messaging::intmap::IntMap;
use messaging::mr::{Access, Buf, BufPool, ProtectionDomain};
use messaging::provider::Fabric;
use messaging::{DirectTarget, Endpoint, ReceivedKind, Ticket};
use nvme::fabrics::CONNECT_DATA_LEN;
use nvme::transport;
use nvme::{CommandId, Connect, ConnectData, ConnectResponse, Cqe, Sgl, Sqe, Status};
use parking_lot::Mutex;
use slab::Slab;

use crate::buf::BufCache;
use crate::command::{Op, OpData};
use crate::exec::{self, AsyncLock, Timer};
use crate::HostError;

/// Staging buffers per queue for pushed write data.
pub(crate) const PUSH_BUFFERS: usize = 8;
/// How long a blocked caller's reaping keeps the receiver thread aside.
const REAP_LEASE: Duration = Duration::from_millis(2);
/// How long a blocked caller waits for a delivery before it re-checks
/// whether its future was woken otherwise (a timer).
const REAP_SLICE: Duration = Duration::from_millis(10);
/// Most deliveries a blocked caller handles in one go.
const REAP_BATCH: usize = 64;
/// How long a caller parked behind another reaper sleeps before it
/// re-checks (a safety net: it is normally woken well before).
const PARKED_RECHECK: Duration = Duration::from_millis(5);

/// A completed command: its CQE and, for reads, the buffer holding the data
/// (its length is the bytes the I/O unit pushed).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) cqe: Cqe,
    pub(crate) data: Option<Buf>,
}

/// Why a command did not complete.
#[derive(Debug)]
pub(crate) enum ExecError {
    /// The channel closed: the command may be re-issued on a new connection.
    Lost,
    /// The deadline passed. With `in_flight`, the command reached the I/O
    /// unit and still holds its CID and any read buffer until the queue is
    /// reset: callers treat the queue as lost, else enough such commands
    /// leave it full for good.
    Timeout { in_flight: bool },
    /// A local failure that retrying will not fix.
    Host(HostError),
}

/// What opening a queue needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueParams<'a> {
    pub(crate) fabric: &'a dyn Fabric,
    /// The host's protection domain on that fabric, shared by its queues.
    pub(crate) domain: &'a ProtectionDomain,
    pub(crate) addr: &'a str,
    pub(crate) depth: u16,
    pub(crate) kato_ms: u32,
    pub(crate) data: &'a ConnectData,
    pub(crate) timeout: Duration,
    pub(crate) generation: u64,
}

/// One queue of a controller.
pub(crate) struct Queue {
    pub(crate) qid: u16,
    pub(crate) generation: u64,
    ep: Endpoint,
    depth: usize,
    domain: ProtectionDomain,
    submit: AsyncLock,
    pushes: Mutex<VecDeque<Ticket>>,
    push_pool: Mutex<Option<BufPool>>,
    /// Also the timer's sweeper of this queue's command deadlines (see
    /// `Sweep for Mutex<State>`): the timer holds only this, so a queue is
    /// never dropped on the timer thread.
    state: Arc<Mutex<State>>,
    /// This queue, for offering its reaping to a blocked caller.
    me: Weak<Queue>,
    /// Held by the thread that reaps.
    reaper: Mutex<()>,
    /// Bumped whenever a blocked caller reaps: the receiver thread stays
    /// aside for as long as it moves within each `REAP_LEASE`.
    activity: AtomicU64,
    /// Blocked callers parked because another thread reaps: the reaper
    /// wakes one when it stops, so that someone keeps reaping for them.
    parked: Mutex<Vec<std::thread::Thread>>,
}

#[derive(Default)]
struct State {
    slots: Slab<Slot>,
    /// Exposure tag → commands using it, oldest first. The channel frees a
    /// tag when its data lands, possibly before this queue's receiver saw
    /// that data, so a new exposure may reuse the tag while the old command
    /// still waits for its data: deliveries go to the oldest user.
    tags: IntMap<u16, TagUsers>,
    spare: Vec<Exposure>,
    /// Cells of completed commands, oldest first, for reuse once their
    /// waiters let go (at most `depth`): a command allocates no cell.
    cells: VecDeque<Arc<Cell>>,
    closed: bool,
    waiters: Vec<Waker>,
}

struct Slot {
    cell: Arc<Cell>,
    /// When the command times out: the timer's sweep ([`exec::Sweep`])
    /// wakes its waiter then.
    deadline: Option<Instant>,
    exposure: Option<Exposure>,
    data: Option<Buf>,
    ignored: bool,
}

/// The commands using one exposure tag, oldest first: almost always one,
/// kept inline so that exposing a buffer allocates nothing.
struct TagUsers {
    oldest: usize,
    later: VecDeque<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Exposure {
    target: DirectTarget,
    capacity: usize,
}

/// Where a command's completion lands for its waiter.
#[derive(Default)]
struct Cell {
    inner: Mutex<CellInner>,
}

#[derive(Default)]
struct CellInner {
    result: Option<Result<Reply, ()>>,
    waker: Option<Waker>,
}

impl Cell {
    fn complete(&self, result: Result<Reply, ()>) {
        let waker = {
            let mut inner = self.inner.lock();
            inner.result = Some(result);
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn try_take(&self) -> Option<Result<Reply, ()>> {
        self.inner.lock().result.take()
    }
}

/// Submission progress, to know what a cancelled submission left behind.
const NOT_SENT: u8 = 0;
const CAPSULE_SENT: u8 = 1;
const ALL_SENT: u8 = 2;

impl Queue {
    /// Opens the channel of queue `qid` and runs the Fabrics Connect
    /// exchange. Returns the queue and the controller ID.
    ///
    /// # Errors
    /// Messaging errors, [`HostError::Timeout`] when no answer comes within
    /// `timeout`, [`HostError::Nvme`] when the I/O unit refuses.
    pub(crate) fn connect(p: &QueueParams<'_>, qid: u16) -> Result<(Arc<Queue>, u16), HostError> {
        let QueueParams {
            fabric,
            domain,
            addr,
            depth,
            kato_ms,
            data,
            timeout,
            generation,
        } = *p;
        let ep = Endpoint::connect_in(fabric, domain, addr, transport::host_channel(depth))?;
        let result = connect_exchange(&ep, qid, depth, kato_ms, data, timeout);
        match result {
            Ok(cntlid) => Ok((
                Arc::new_cyclic(|me| Queue {
                    qid,
                    generation,
                    ep,
                    depth: usize::from(depth),
                    domain: domain.clone(),
                    submit: AsyncLock::default(),
                    pushes: Mutex::new(VecDeque::new()),
                    push_pool: Mutex::new(None),
                    state: Arc::new(Mutex::new(State::default())),
                    me: me.clone(),
                    reaper: Mutex::new(()),
                    activity: AtomicU64::new(0),
                    parked: Mutex::new(Vec::new()),
                }),
                cntlid,
            )),
            Err(e) => {
                ep.close();
                Err(e)
            }
        }
    }

    /// Starts the receiver thread; `on_lost` runs once the channel closed
    /// and every command in flight failed.
    pub(crate) fn spawn_receiver(
        self: &Arc<Self>,
        on_lost: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<std::thread::JoinHandle<()>, HostError> {
        let queue = self.clone();
        let name = format!("chanio-host-q{}", self.qid);
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                queue.receive_loop();
                on_lost(queue.generation);
            })
            .map_err(|source| HostError::Thread { name, source })
    }

    /// Closes the channel: every command in flight fails with `Lost`.
    pub(crate) fn close(&self) {
        self.ep.close();
    }

    /// Push tickets this queue still holds.
    #[cfg(test)]
    pub(crate) fn held_push_tickets(&self) -> usize {
        self.pushes.lock().len()
    }

    /// Whether the channel is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed || self.ep.close_reason().is_some()
    }

    /// Runs one command: takes a CID, exposes the read destination
    /// (`lent`, a spare exposure or one from `cache`), sends the capsule
    /// and any pushed data (for [`OpData::OutLent`], `lent` itself), and
    /// waits for the completion until `deadline`. A lent write buffer has
    /// left the fabric (back in its pool) when this returns, unless it
    /// returns a timeout.
    pub(crate) async fn execute(
        &self,
        op: &Op<'_>,
        lent: Option<Buf>,
        cache: &BufCache,
        deadline: Option<Instant>,
        timer: &Timer,
    ) -> Result<Reply, ExecError> {
        // Whatever the command waits for (a CID, send credits, a staging
        // buffer, its completion) comes from this queue's channel: a thread
        // blocked on it reaps the queue meanwhile. Not on the admin queue:
        // its commands are few and some wait for minutes (asynchronous
        // event requests), which its receiver thread does without waking.
        let mut run = std::pin::pin!(self.run_command(op, lent, cache, deadline, timer));
        std::future::poll_fn(|cx| {
            let r = run.as_mut().poll(cx);
            if r.is_pending() && self.qid != 0 {
                exec::offer_help(&self.me);
            }
            r
        })
        .await
    }

    async fn run_command(
        &self,
        op: &Op<'_>,
        mut lent: Option<Buf>,
        cache: &BufCache,
        deadline: Option<Instant>,
        timer: &Timer,
    ) -> Result<Reply, ExecError> {
        let (cid, cell) = match exec::deadline(timer, deadline, self.acquire(deadline)).await {
            None => return Err(ExecError::Timeout { in_flight: false }),
            Some(Err(())) => return Err(ExecError::Lost),
            Some(Ok(acquired)) => acquired,
        };
        let stage = AtomicU8::new(NOT_SENT);
        let mut guard = SlotGuard {
            queue: self,
            cid,
            cell: &cell,
            stage: &stage,
            done: false,
        };
        let mut sqe = op.sqe;
        sqe.command_id = CommandId(cid as u16);
        let sgl = match &op.data {
            OpData::None => Sgl::KeyedDataBlock {
                addr: 0,
                len: 0,
                key: 0,
            },
            OpData::Out(d) if d.len() <= transport::INLINE_DATA_MAX => Sgl::DataBlockOffset {
                offset: 0,
                len: d.len() as u32,
            },
            OpData::Out(d) => Sgl::TransportDataBlock {
                len: u32::try_from(d.len()).map_err(|_| too_long(d.len()))?,
            },
            OpData::OutLent(len) => Sgl::TransportDataBlock {
                len: u32::try_from(*len).map_err(|_| too_long(*len))?,
            },
            OpData::In(len) => {
                // A channel that closed under us (the I/O unit restarted, say)
                // loses the command like a failed send does: it is re-issued
                // on the next connection, not failed.
                let exposure = self.expose(cid, *len, lent.take(), cache).map_err(|e| match e {
                    HostError::Messaging(messaging::Error::Closed(_)) => ExecError::Lost,
                    e => ExecError::Host(e),
                })?;
                transport::set_transfer_tag(&mut sqe, exposure.target.tag);
                transport::set_completes_by_data(&mut sqe);
                Sgl::KeyedDataBlock {
                    addr: exposure.target.remote.addr,
                    len: u32::try_from(*len).map_err(|_| too_long(*len))?,
                    key: exposure.target.remote.rkey.0,
                }
            }
        };
        sqe.set_sgl(&sgl).map_err(|e| ExecError::Host(e.into()))?;
        let lent_push = match exec::deadline(timer, deadline, self.submit(&sqe, &op.data, lent, &stage, timer)).await {
            Some(Ok(ticket)) => ticket,
            Some(Err(e)) => return Err(e),
            // A half-sent command closes the channel (the guard), an unsent
            // one frees its slot: either way nothing is left holding a CID.
            None => return Err(ExecError::Timeout { in_flight: false }),
        };
        // No timer entry for this wait: the queue's sweep wakes it once the
        // deadline passed (see `Sweep for Mutex<State>`).
        let reply = match self.wait_reply(&cell, deadline, timer).await {
            Some(r) => {
                guard.done = true;
                r.map_err(|()| ExecError::Lost)
            }
            None => match cell.try_take() {
                Some(r) => {
                    guard.done = true;
                    r.map_err(|()| ExecError::Lost)
                }
                None => return Err(ExecError::Timeout { in_flight: true }),
            },
        };
        if let Some(ticket) = lent_push {
            // The I/O unit answered, so it has the data; the lent buffer
            // returns to its owner once the fabric completed the push:
            // acknowledged (the acknowledgement travels ahead of, or with,
            // the answer), or flushed if the channel fails. No deadline
            // here: cut short, a write that succeeded would hand its caller
            // fresh memory in place of the data it wrote.
            let _ = ticket.completion().await;
        }
        reply
    }

    /// A free CID and the cell its completion will land in.
    fn acquire(&self, deadline: Option<Instant>) -> impl Future<Output = Result<(usize, Arc<Cell>), ()>> + '_ {
        std::future::poll_fn(move |cx| {
            let mut st = self.state.lock();
            if st.closed {
                return Poll::Ready(Err(()));
            }
            if st.slots.len() < self.depth {
                let cell = st.reusable_cell().unwrap_or_default();
                let cid = st.slots.insert(Slot {
                    cell: cell.clone(),
                    deadline,
                    exposure: None,
                    data: None,
                    ignored: false,
                });
                return Poll::Ready(Ok((cid, cell)));
            }
            if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                st.waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    fn expose(&self, cid: usize, len: usize, read_buf: Option<Buf>, cache: &BufCache) -> Result<Exposure, HostError> {
        let spare = if read_buf.is_none() {
            let mut st = self.state.lock();
            let best = st
                .spare
                .iter()
                .enumerate()
                .filter(|(_, e)| e.capacity >= len)
                .min_by_key(|(_, e)| e.capacity)
                .map(|(i, _)| i);
            best.map(|i| st.spare.swap_remove(i))
        } else {
            None
        };
        let exposure = match spare {
            Some(e) => e,
            None => {
                let buf = match read_buf {
                    Some(b) => b,
                    None => cache.checkout(len)?,
                };
                let capacity = buf.capacity();
                Exposure {
                    target: self.ep.expose(buf)?,
                    capacity,
                }
            }
        };
        let mut st = self.state.lock();
        if st.closed {
            return Err(HostError::Messaging(messaging::Error::Closed(
                messaging::CloseReason::Disconnected,
            )));
        }
        match st.tags.entry(exposure.target.tag) {
            Entry::Occupied(mut users) => users.get_mut().later.push_back(cid),
            Entry::Vacant(v) => {
                v.insert(TagUsers {
                    oldest: cid,
                    later: VecDeque::new(),
                });
            }
        }
        if let Some(slot) = st.slots.get_mut(cid) {
            slot.exposure = Some(exposure);
        }
        Ok(exposure)
    }

    /// Sends the capsule, then the data it does not carry: copied into
    /// staging buffers, or (`OpData::OutLent` fitting one push) the lent
    /// buffer itself, whose push ticket is returned.
    async fn submit(
        &self,
        sqe: &Sqe,
        data: &OpData<'_>,
        lent: Option<Buf>,
        stage: &AtomicU8,
        timer: &Timer,
    ) -> Result<Option<Ticket>, ExecError> {
        let inline: &[u8] = match data {
            OpData::Out(d) if d.len() <= transport::INLINE_DATA_MAX => d,
            _ => &[],
        };
        // What is pushed after the capsule, checked before anything goes out
        // (half a command on the wire would cost the channel).
        let pushed: Option<&[u8]> = match (data, &lent) {
            (OpData::Out(d), _) if d.len() > transport::INLINE_DATA_MAX => Some(d),
            (OpData::OutLent(len), Some(b)) if b.len() == *len => Some(b),
            (OpData::OutLent(_), _) => {
                return Err(ExecError::Host(HostError::Protocol(
                    "a lent write buffer is missing or of the wrong length".into(),
                )));
            }
            _ => None,
        };
        // Only a pushed write asks (it takes the endpoint's lock).
        let chunk = if pushed.is_some() { self.ep.max_push() } else { 0 };
        if pushed.is_some() && chunk == 0 {
            return Err(ExecError::Host(HostError::Protocol(
                "the I/O unit granted no slots for write data".into(),
            )));
        }
        // Zero copy: a lent buffer that fits one push goes out itself.
        let whole = matches!(data, OpData::OutLent(_)) && pushed.is_some_and(|d| d.len() <= chunk);
        // The capsule (SQE, then in-capsule data) is gathered straight into
        // the channel's send buffer.
        let sqe_bytes = sqe.encode();
        let capsule: [&[u8]; 2] = [&sqe_bytes, inline];
        let _lock = self.submit.lock().await;
        self.ep
            .send_async(&capsule)
            .await
            .map_err(|e| self.send_failed(e))?
            .detach();
        stage.store(CAPSULE_SENT, Ordering::Release);
        let mut lent_push = None;
        if whole {
            if let Some(buf) = lent {
                let t = self.ep.push_buf_async(buf).await.map_err(|e| self.send_failed(e))?;
                lent_push = Some(t);
            }
        } else if let Some(d) = pushed {
            for (off, len) in transport::push_chunks(d.len(), chunk) {
                let mut buf = self.push_buf(timer).await?;
                buf.fill(&d[off..off + len])
                    .map_err(|cap| ExecError::Host(HostError::Protocol(format!("push chunk above {cap} bytes"))))?;
                let t = self.ep.push_buf_async(buf).await.map_err(|e| self.send_failed(e))?;
                let mut pushes = self.pushes.lock();
                pushes.push_back(t);
                // Each push in flight holds one of PUSH_BUFFERS staging
                // buffers, so a ticket older than the newest PUSH_BUFFERS
                // is done: keeping it would only grow the deque and the
                // endpoint's ticket table.
                while pushes.len() > PUSH_BUFFERS {
                    pushes.pop_front();
                }
            }
        }
        stage.store(ALL_SENT, Ordering::Release);
        Ok(lent_push)
    }

    fn send_failed(&self, e: messaging::Error) -> ExecError {
        match e {
            messaging::Error::Closed(_) | messaging::Error::Transfer(_) => ExecError::Lost,
            e => {
                // The stream may hold half a command: start over on a new channel.
                self.ep.close();
                ExecError::Host(e.into())
            }
        }
    }

    /// A staging buffer for pushed data, waiting for earlier pushes of this
    /// queue to complete when all are in use.
    async fn push_buf(&self, timer: &Timer) -> Result<Buf, ExecError> {
        let pool = {
            let mut slot = self.push_pool.lock();
            match &*slot {
                Some(p) => p.clone(),
                None => {
                    let p = self
                        .domain
                        .register(self.ep.max_push(), PUSH_BUFFERS, Access::LOCAL_WRITE)
                        .map_err(|e| ExecError::Host(e.into()))?;
                    *slot = Some(p.clone());
                    p
                }
            }
        };
        loop {
            if let Some(b) = pool.checkout() {
                return Ok(b);
            }
            let oldest = self.pushes.lock().pop_front();
            match oldest {
                Some(t) => {
                    let _ = t.completion().await;
                }
                None => timer.sleep_until(Instant::now() + Duration::from_millis(1)).await,
            }
            if self.is_closed() {
                return Err(ExecError::Lost);
            }
        }
    }

    /// The command's completion, or `None` once `deadline` passed or the
    /// timer stopped (the queue's sweep wakes the waiter then).
    fn wait_reply<'a>(
        &'a self,
        cell: &'a Cell,
        deadline: Option<Instant>,
        timer: &'a Timer,
    ) -> impl Future<Output = Option<Result<Reply, ()>>> + 'a {
        let mut first = true;
        std::future::poll_fn(move |cx| {
            let mut inner = cell.inner.lock();
            if let Some(r) = inner.result.take() {
                return Poll::Ready(Some(r));
            }
            // A stopped timer sweeps no more: that is the deadline (looked
            // at under the cell's lock, which its final sweep takes too, so
            // a wait registered just before that sweep is woken by it). The
            // first look reads no clock: a command just sent has not timed
            // out (and one that was late already is woken by the next sweep).
            if let Some(d) = deadline {
                if timer.is_stopped() || (!first && Instant::now() >= d) {
                    return Poll::Ready(None);
                }
            }
            first = false;
            inner.waker = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    fn renew_lease(&self) {
        self.activity.fetch_add(1, Ordering::Release);
    }

    /// The receiver thread: reaps whenever no blocked caller does, until
    /// the channel closes; then fails every command in flight.
    fn receive_loop(&self) {
        let mut seen = 0;
        // Consecutive stand-asides: the park grows to 16 x REAP_LEASE while
        // callers keep reaping (each wake-up may preempt a spinning caller).
        let mut streak = 0u32;
        loop {
            let now = self.activity.load(Ordering::Acquire);
            if now != seen {
                seen = now;
                self.wake_parked();
                std::thread::park_timeout(REAP_LEASE * (1 << streak.min(4)));
                streak += 1;
                continue;
            }
            streak = 0;
            // Blocks (without spinning) while a caller reaps.
            let reaper = self.reaper.lock();
            if self.activity.load(Ordering::Acquire) != seen {
                // A caller came by meanwhile, and may have parked because
                // this thread held the lock: hand the reaping back.
                drop(reaper);
                self.wake_parked();
                continue;
            }
            match self.ep.recv() {
                Ok(d) => self.handle_ready(d),
                Err(e) => {
                    tracing::debug!(qid = self.qid, "queue channel closed: {e}");
                    break;
                }
            }
        }
        self.fail_all();
    }

    /// Takes deliveries off the channel for a blocked caller until `woken`.
    fn reap_for_caller(&self, woken: &AtomicBool) {
        self.renew_lease();
        let Some(reaper) = self.reaper.try_lock() else {
            // Another thread reaps: it completes our command, or wakes us
            // when it stops.
            self.parked.lock().push(std::thread::current());
            if !woken.load(Ordering::Acquire) {
                std::thread::park_timeout(PARKED_RECHECK);
            }
            let me = std::thread::current().id();
            self.parked.lock().retain(|t| t.id() != me);
            return;
        };
        while !woken.load(Ordering::Acquire) {
            match self.ep.recv_timeout(REAP_SLICE) {
                Ok(d) => self.handle_ready(d),
                Err(messaging::Error::Timeout(_)) => {}
                Err(_) => {
                    // Closed: the receiver thread fails what is in flight.
                    drop(reaper);
                    std::thread::park_timeout(PARKED_RECHECK);
                    return;
                }
            }
            self.renew_lease();
        }
        drop(reaper);
        self.renew_lease();
        self.wake_parked();
    }

    /// Wakes the callers parked behind the reaper, so that one takes over.
    fn wake_parked(&self) {
        let parked = std::mem::take(&mut *self.parked.lock());
        parked.iter().for_each(std::thread::Thread::unpark);
    }

    /// Handles `first` and every delivery already taken off the fabric
    /// with it (no poll of the fabric that would delay the waiters these
    /// completions wake).
    fn handle_ready(&self, first: messaging::Delivery) {
        self.handle(first);
        for _ in 1..REAP_BATCH {
            match self.ep.try_recv_taken() {
                Ok(d) => self.handle(d),
                Err(_) => break,
            }
        }
    }

    fn handle(&self, delivery: messaging::Delivery) {
        match delivery.kind() {
            ReceivedKind::Direct { tag, completes_request } => {
                if let Ok(buf) = delivery.into_buf() {
                    self.handle_data(tag, buf, completes_request);
                }
            }
            ReceivedKind::Message => {
                let cqe = transport::decode_response(&delivery);
                drop(delivery);
                match cqe {
                    Ok(cqe) => self.handle_cqe(cqe),
                    Err(e) => {
                        tracing::warn!(qid = self.qid, "closing queue: bad response capsule: {e}");
                        self.ep.close();
                    }
                }
            }
            ReceivedKind::Push => {
                tracing::warn!(
                    qid = self.qid,
                    "closing queue: the I/O unit pushed into a slot we never granted"
                );
                self.ep.close();
            }
        }
    }

    /// Data pushed under `tag`; `completes` when the push was flagged: the
    /// command succeeded and no response capsule follows
    /// ([`transport::CDW3_COMPLETE_BY_DATA`]).
    fn handle_data(&self, tag: u16, buf: Buf, completes: bool) {
        let mut st = self.state.lock();
        let Some(cid) = take_tag(&mut st.tags, tag, None) else {
            tracing::warn!(qid = self.qid, tag, "data for a transfer tag no command uses");
            return;
        };
        if let Some(slot) = st.slots.get_mut(cid) {
            slot.exposure = None;
            if !slot.ignored {
                slot.data = Some(buf);
            }
        }
        if completes {
            let mut cqe = Cqe::new(CommandId(cid as u16), Status::SUCCESS);
            cqe.sq_id = self.qid;
            self.complete(st, cqe);
        }
    }

    fn handle_cqe(&self, cqe: Cqe) {
        self.complete(self.state.lock(), cqe);
    }

    /// Completes the command `cqe` names; `st` is the queue's locked state.
    fn complete(&self, mut st: parking_lot::MutexGuard<'_, State>, cqe: Cqe) {
        let cid = usize::from(cqe.command_id.0);
        let Some(slot) = st.slots.try_remove(cid) else {
            tracing::warn!(qid = self.qid, cid, "completion for a command not in flight");
            return;
        };
        if let Some(exposure) = slot.exposure {
            // Not pushed to: the buffer is still exposed, keep it for reuse.
            take_tag(&mut st.tags, exposure.target.tag, Some(cid));
            st.spare.push(exposure);
        }
        if !slot.ignored && st.cells.len() < self.depth {
            st.cells.push_back(slot.cell.clone());
        }
        let waiters = std::mem::take(&mut st.waiters);
        // The caller's wake-ups run outside the lock.
        drop(st);
        if !slot.ignored {
            slot.cell.complete(Ok(Reply { cqe, data: slot.data }));
        }
        waiters.into_iter().for_each(Waker::wake);
    }

    fn fail_all(&self) {
        let (slots, waiters) = {
            let mut st = self.state.lock();
            st.closed = true;
            st.tags.clear();
            st.spare.clear();
            let slots: Vec<Slot> = st.slots.drain().collect();
            (slots, std::mem::take(&mut st.waiters))
        };
        for slot in slots {
            slot.cell.complete(Err(()));
        }
        waiters.into_iter().for_each(Waker::wake);
    }
}

impl exec::Sweep for Mutex<State> {
    fn sweep(&self, now: Option<Instant>) {
        let mut due = Vec::new();
        {
            let st = self.lock();
            for (_, slot) in st.slots.iter() {
                if slot.deadline.is_some_and(|d| now.is_none_or(|now| d <= now)) {
                    if let Some(w) = slot.cell.inner.lock().waker.take() {
                        due.push(w);
                    }
                }
            }
        }
        // Woken outside the lock; each checks its deadline itself.
        due.into_iter().for_each(Waker::wake);
    }
}

impl Queue {
    /// What the timer sweeps for this queue's command deadlines.
    pub(crate) fn deadlines(&self) -> Weak<dyn exec::Sweep> {
        Arc::downgrade(&self.state) as Weak<dyn exec::Sweep>
    }
}

impl exec::Helper for Queue {
    fn help(&self, woken: &AtomicBool) {
        self.reap_for_caller(woken);
    }

    fn corked(&self, f: &mut dyn FnMut()) {
        let _cork = self.ep.cork();
        f();
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("qid", &self.qid)
            .field("generation", &self.generation)
            .field("depth", &self.depth)
            .finish()
    }
}

/// Cleans up a command's slot when its caller stops waiting early.
struct SlotGuard<'a> {
    queue: &'a Queue,
    cid: usize,
    cell: &'a Arc<Cell>,
    stage: &'a AtomicU8,
    done: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let stage = self.stage.load(Ordering::Acquire);
        if stage == CAPSULE_SENT {
            // Half a command is on the wire: the channel's stream is unusable.
            tracing::warn!(qid = self.queue.qid, "closing queue: a write's data push was abandoned");
            self.queue.ep.close();
            return;
        }
        let waiters = {
            let mut st = self.queue.state.lock();
            let ours = st.slots.get(self.cid).is_some_and(|s| Arc::ptr_eq(&s.cell, self.cell));
            if !ours {
                return;
            }
            if stage == ALL_SENT {
                // The I/O unit may still answer, and write into the buffer:
                // keep the CID and the buffer out of use until it does.
                if let Some(slot) = st.slots.get_mut(self.cid) {
                    slot.ignored = true;
                    slot.data = None;
                }
                return;
            }
            let slot = st.slots.remove(self.cid);
            if let Some(exposure) = slot.exposure {
                take_tag(&mut st.tags, exposure.target.tag, Some(self.cid));
                st.spare.push(exposure);
            }
            std::mem::take(&mut st.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }
}

/// Removes `cid` (or, with `None`, the oldest user) from `tag`'s users.
fn take_tag(tags: &mut IntMap<u16, TagUsers>, tag: u16, cid: Option<usize>) -> Option<usize> {
    let users = tags.get_mut(&tag)?;
    if let Some(c) = cid.filter(|&c| c != users.oldest) {
        let at = users.later.iter().position(|&u| u == c)?;
        return users.later.remove(at);
    }
    let taken = users.oldest;
    match users.later.pop_front() {
        Some(next) => users.oldest = next,
        None => {
            tags.remove(&tag);
        }
    }
    Some(taken)
}

impl State {
    /// The oldest pooled cell whose command's waiter has let go of it (the
    /// pool holds the only reference, and nobody can take another while
    /// the state is locked), reset for a new command. Waiters finish in any
    /// order, so this looks past cells still held.
    fn reusable_cell(&mut self) -> Option<Arc<Cell>> {
        let at = self.cells.iter().position(|c| Arc::strong_count(c) == 1)?;
        let cell = self.cells.remove(at)?;
        *cell.inner.lock() = CellInner::default();
        Some(cell)
    }
}

fn too_long(len: usize) -> ExecError {
    ExecError::Host(HostError::InvalidArgument(format!(
        "{len} bytes do not fit one command"
    )))
}

fn connect_exchange(
    ep: &Endpoint,
    qid: u16,
    depth: u16,
    kato_ms: u32,
    data: &ConnectData,
    timeout: Duration,
) -> Result<u16, HostError> {
    let sqe = Connect::new(qid, u32::from(depth), kato_ms)?.to_sqe(
        CommandId(0),
        &Sgl::DataBlockOffset {
            offset: 0,
            len: CONNECT_DATA_LEN as u32,
        },
    )?;
    let mut capsule = Vec::new();
    transport::encode_capsule(&sqe, &data.encode(), &mut capsule)?;
    drop(ep.send(&capsule)?);
    let delivery = ep.recv_timeout(timeout).map_err(|e| match e {
        messaging::Error::Timeout(_) => HostError::Timeout {
            command: "Connect",
            after: timeout,
        },
        e => e.into(),
    })?;
    if delivery.kind() != ReceivedKind::Message {
        return Err(HostError::Protocol(format!(
            "expected the Connect response, got {:?}",
            delivery.kind()
        )));
    }
    let cqe = transport::decode_response(&delivery)?;
    drop(delivery);
    if cqe.command_id != CommandId(0) {
        return Err(HostError::Protocol(format!(
            "Connect response names {}, expected cid 0",
            cqe.command_id
        )));
    }
    if !cqe.status().is_success() {
        return Err(HostError::Nvme {
            command: "Connect",
            status: cqe.status(),
        });
    }
    Ok(ConnectResponse::from_dw0(cqe.dw0).cntlid)
}
