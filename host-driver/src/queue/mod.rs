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
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use messaging::intmap::IntMap;
use messaging::lease::{Aside, Lease};
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

mod receive;
mod submit;

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
    /// Renewed whenever a blocked caller reaps: the receiver thread stays
    /// aside for as long as it moves within each `REAP_LEASE`.
    lease: Lease,
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

impl Queue {
    /// The queue's channel (storage windows do one-sided RDMA on it).
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

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
                    lease: Lease::new(REAP_LEASE, 4),
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

    /// Whether this queue registered staging buffers for pushed data (a
    /// write was copied).
    #[cfg(test)]
    pub(crate) fn staged_pushes(&self) -> bool {
        self.push_pool.lock().is_some()
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
