//! One NVMe queue, served by a worker thread (`worker.rs`) once the lobby
//! admitted its Connect ([`connect`]). It answers the Connect, then takes
//! capsules and pushed data in channel order, a turn at a time
//! (`Queue::run`, never waiting), and moves each command through its
//! states to its completion.
//!
//! # A command's states
//!
//! Every command is in one [`State`], and every change of state goes
//! through [`Queue::advance`] (as SPDK's `nvmf_tcp_req_process` drives
//! `spdk_nvmf_tcp_req_state`):
//!
//! ```text
//!  capsule ──execute──┬──────────────────────────────────────────────▶ Complete ──▶ CQE sent
//!                     │                                                   ▲
//!                     ├──▶ AwaitingData ──each pushed chunk──▶ Storage ───┤ (the last chunk)
//!                     │          │        (RAM: written at once) ─────────┤
//!                     ├──▶ Storage ──ring completion──▶ done ─────────────┤
//!                     │                                  └──▶ ToHost ─────┘
//!                     │                                         └──▶ Settled (completed by its push)
//!                     └──▶ Settled (completed by its data push, or held for an event)
//! ```
//!
//! - **execute** ([`Queue::execute`]): decode and check the capsule; an
//!   admin command, a RAM namespace's I/O, Write Zeroes and Dataset
//!   Management run at once and complete (a read's data is pushed first).
//! - **AwaitingData**: a write whose data the host pushes after its
//!   capsule ([`io`]); each chunk goes to storage as it lands.
//! - **Storage**: a read, write chunk, FUA in-capsule write or flush of a
//!   namespace with files ([`BlockIo::files`](crate::backend::BlockIo::files))
//!   runs on the queue's own io_uring ([`Ring`]), as many at once as the
//!   host sends; they complete out of order, as the device finishes them
//!   ([`storage`]). Where no ring can be made, it runs at once. A backend
//!   that may wait (`BlockIo::may_block`) and has no files gets its
//!   requests run on the target's blocking threads, which complete them
//!   back to the queue the same way.
//! - **ToHost**: a read's data, in a staging buffer, is pushed to the host.
//! - **Complete**: the response capsule goes out.
//!
//! While storage requests are in flight, the worker watches the ring's
//! descriptor (readable on completions) or is called by the blocking
//! thread that finished one.
//!
//! A malformed capsule, a push nobody waits for, or a direct placement
//! (an I/O unit never exposes memory) is a protocol violation
//! ([`QueueError`]): the channel closes and only it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use messaging::mr::{Access, Buf, BufPool, RKey, RemoteBuf};
use messaging::{CloseReason, DirectPush, DirectTarget, Endpoint, Error as MsgError, FillError, ReceivedKind};
use slab::Slab;

use super::{Controller, Shared};
use crate::backend::ring::{IoOp, Ring, Transfer};
use crate::backend::{BlockError, ErrorKind, NamespaceCache, NamespaceRef};
use crate::nvme::{
    AdminOpcode, ChangedNamespaceList, Cns, CommandId, Connect, ConnectData, ConnectResponse, Cqe, DsmRange,
    ErrorLogEntry, FabricsCommandType, FeatureId, GetLogPage, IdentifyController, IdentifyNamespace, IoOpcode,
    KeepAliveTimer, LogPageId, NamespaceList, Nsid, NumberOfQueues, NvmeError, Sgl, Sqe, Status, SQE_LEN,
};
use crate::transport;

mod admin;
mod connect;
mod io;
mod storage;
#[cfg(test)]
mod tests;
mod window;

pub(crate) use connect::{admit_first, Admission, Admitted};
use io::{block_status, PendingWrite};
use storage::{Io, Staging};

/// How long a channel may take to send its Connect.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a worker looks at its queues' keep-alive and the shutdown.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// Most deliveries one turn of a queue takes before its worker serves the
/// others.
const RUN_BUDGET: usize = 64;
/// Most deliveries handled before the answers they produced are posted.
/// Small on purpose: with a whole queue's worth handled before the first
/// completion leaves, host and I/O unit take turns, each idle while the
/// other works through the batch (`docs/performance.md`, "iounitd posts
/// what a batch produced every 8 deliveries").
const BATCH: usize = 8;
const DRAIN_GRACE: Duration = Duration::from_secs(5);
const STAGING_BUFFERS: usize = 4;
/// Size and number of the small staging buffers (reads up to that size).
const SMALL_STAGING: usize = 16 * 1024;
const SMALL_STAGING_BUFFERS: usize = 64;
/// Small staging buffers registered at a time.
const SMALL_STAGING_CHUNK: usize = 16;
/// How long a read waits for a staging buffer to come back from the host.
const STAGING_WAIT: Duration = Duration::from_secs(30);

/// Why a queue closes its channel: the host broke the protocol, or the
/// channel or the ring failed under it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    /// A capsule that does not decode.
    #[error("malformed capsule: {0}")]
    Capsule(#[source] NvmeError),
    /// Pushed data while no write waits for any.
    #[error("pushed data for no write command")]
    PushWithoutWrite,
    /// More pushed data than the write announced.
    #[error("pushed {got} bytes for a {len}-byte write")]
    PushBeyondWrite {
        /// Bytes pushed for the write so far.
        got: u64,
        /// The write's length.
        len: u64,
    },
    /// The host pushed into memory it thinks the I/O unit exposed.
    #[error("a direct placement into an I/O unit")]
    DirectPlacement,
    /// The response capsule could not be sent.
    #[error("cannot send a completion: {0}")]
    Complete(#[source] MsgError),
    /// Read data could not be pushed to the host.
    #[error("cannot push data to the host: {0}")]
    Push(#[source] MsgError),
    /// No staging buffer could be registered.
    #[error("cannot register staging buffers")]
    Staging(#[source] messaging::mr::MrError),
    /// The host kept every staging buffer (it acknowledges no pushes).
    #[error("no staging buffer came back within {0:?}")]
    NoStaging(Duration),
    /// The queue's io_uring failed.
    #[error("io_uring {what} failed: {source}")]
    Ring {
        /// "submission" or "wait".
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The channel failed while the queue waited on it.
    #[error("channel error: {0}")]
    Channel(#[source] MsgError),
}

impl QueueError {
    fn ring(what: &'static str) -> impl FnOnce(std::io::Error) -> QueueError {
        move |source| QueueError::Ring { what, source }
    }
}

/// Why a queue's service ends.
pub(crate) enum Stop {
    /// The channel closed (the host went, or the fabric failed).
    Closed(CloseReason),
    /// This side gives up on the channel.
    Failed(QueueError),
    /// The service ends: the controller died, its keep-alive expired, or
    /// the target shut down (`Queue::must_stop`).
    Done,
}

/// Where a command stands (see the module docs); [`Queue::advance`] moves
/// it on.
enum State {
    /// Send the response capsule.
    Complete { cid: CommandId, status: Status, dw0: u32 },
    /// A write waiting for the data the host pushes after its capsule.
    AwaitingData(PendingWrite),
    /// A transfer to run on the queue's ring; the ring hands it to
    /// [`Queue::done`] when the device finished it.
    Storage(Io),
    /// A read's data, staged: push it into the host's buffer.
    ToHost {
        cid: CommandId,
        buf: Buf,
        target: DirectTarget,
        /// The push completes the command: no response capsule follows.
        by_data: bool,
    },
    /// Nothing left to do here: completed by its data push, parked on the
    /// ring or for pushed data, or held until an event completes it.
    Settled,
}

impl State {
    fn complete(cid: CommandId, status: Status) -> State {
        State::Complete { cid, status, dw0: 0 }
    }
}

/// What executing a command's capsule decided ([`admin`], [`io`]); the
/// command's next [`State`] follows from it ([`Queue::execute`]).
enum Outcome {
    /// Complete now with this status and DW0.
    Done(Status, u32),
    /// The completion comes later: an event completes it, or its data push
    /// did ([`transport::CDW3_COMPLETE_BY_DATA`]).
    Settled,
    /// A write waiting for its pushed data.
    AwaitData(PendingWrite),
    /// To run on the ring.
    Start(Start),
}

impl Outcome {
    fn status(s: Status) -> Outcome {
        Outcome::Done(s, 0)
    }
}

/// What an I/O command needs started on the ring once its capsule is
/// decoded (the capsule itself may go with it).
enum Start {
    Read {
        ns: NamespaceRef,
        offset: u64,
        len: usize,
    },
    InlineWrite {
        ns: NamespaceRef,
        offset: u64,
        fua: bool,
    },
    Flush {
        ns: NamespaceRef,
    },
    /// A cached extent's Commit: these bytes to `offset`, with FUA.
    Writeback {
        ns: NamespaceRef,
        offset: u64,
        data: Vec<u8>,
    },
}

pub(crate) struct Queue {
    shared: Arc<Shared>,
    ctrl: Arc<Controller>,
    ep: Endpoint,
    /// The host's address, for logs.
    peer: String,
    qid: u16,
    depth: u16,
    sq_head: u16,
    /// Writes not yet completed: waiting for pushed data, or for their
    /// chunks on the ring.
    writes: Slab<PendingWrite>,
    /// Keys of the writes still waiting for data, oldest first: pushed
    /// data belongs to the first.
    awaiting: VecDeque<usize>,
    staging: Staging,
    /// The namespace this queue's commands addressed last.
    namespaces: NamespaceCache,
    /// Whether the host sees the namespace it addressed last: (NSID, the
    /// masks' generation, visible).
    visible: Option<(u32, u64, bool)>,
    /// The queue's io_uring and the waker that ends its sleep, made at the
    /// first request for a namespace with files.
    ring: Option<(Ring<Io>, Waker)>,
    /// Storage requests on the target's blocking threads.
    offload: storage::Offloaded,
    /// Since when the queue drains for a shutdown.
    draining_since: Option<Instant>,
    /// Names this queue's storage windows (`super::windows`).
    serial: u64,
    /// The queue's place among the `workers` served at once.
    _worker: connect::WorkerSlot,
}

impl Queue {
    /// Opens an admitted queue for service: answers its Connect and
    /// registers its staging buffers. `None` when that failed (the channel
    /// is closed, and an admin queue's controller freed).
    pub(crate) fn open(shared: &Arc<Shared>, ep: Endpoint, admitted: Admitted) -> Option<Queue> {
        let peer = ep.peer_addr().to_string();
        // The channel was accepted small (`lobby_channel`): it grows to the
        // queue's depth before the answer, so the host holds the credits
        // and slots when it sees the Connect succeed.
        let depth = admitted.size as u16;
        let grown = match admitted.qid {
            0 => transport::iounit_admin_channel(depth),
            _ => transport::iounit_channel(depth),
        };
        if let Err(e) = ep.grow(grown) {
            tracing::error!(%peer, "cannot grow the channel to the queue's depth {depth}: {e}");
            ep.close();
            if admitted.qid == 0 {
                shared.remove_controller(admitted.ctrl.cntlid);
            }
            return None;
        }
        if let Err(e) = connect::answer(&ep, &admitted) {
            tracing::warn!(%peer, "cannot answer the Connect: {e}");
        }
        let Admitted { worker, ctrl, qid, .. } = admitted;
        tracing::debug!(%peer, cntlid = ctrl.cntlid, qid, depth, "queue serving");
        if qid > 0 {
            ctrl.io_active.fetch_add(1, Ordering::AcqRel);
        }
        Some(Queue {
            shared: shared.clone(),
            ctrl,
            ep,
            peer,
            qid,
            depth,
            sq_head: 0,
            writes: Slab::new(),
            awaiting: VecDeque::new(),
            staging: Staging::new(),
            namespaces: NamespaceCache::default(),
            visible: None,
            ring: None,
            offload: storage::Offloaded::default(),
            draining_since: None,
            serial: shared.windows.queue_serial(),
            _worker: worker,
        })
    }

    /// Ends the queue's service: what is on its ring finishes first (its
    /// writes must land while their namespace is still held, and before
    /// the controller, and with it the queue, is declared gone), then the
    /// channel closes.
    pub(crate) fn close(mut self, why: &Stop) {
        match why {
            Stop::Closed(reason) => tracing::debug!(peer = %self.peer, qid = self.qid, "channel closed: {reason}"),
            Stop::Failed(reason) => tracing::warn!(peer = %self.peer, qid = self.qid, "closing the channel: {reason}"),
            Stop::Done => {}
        }
        drop(self.ring.take());
        // Commands waiting for data that will never come release their
        // namespaces.
        self.writes.clear();
        self.awaiting.clear();
        // Its windows' keys live in the channel's domain: revoked with it.
        self.shared.windows.revoke_queue(self.serial);
        self.ep.close();
        if self.qid == 0 {
            self.shared.remove_controller(self.ctrl.cntlid);
        } else {
            self.ctrl.io_active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// One turn of service, without sleeping: takes what the ring finished
    /// and what the host sent (driving the channel's transport once), up
    /// to `RUN_BUDGET` deliveries, in batches whose pushes and completions
    /// leave together. Returns whether anything was done.
    pub(crate) fn run(&mut self) -> Result<bool, Stop> {
        let mut worked = self.reap_offloaded().map_err(Stop::Failed)?;
        if self.ring.as_mut().is_some_and(|(r, _)| r.has_completions()) {
            self.reap_ring().map_err(Stop::Failed)?;
            worked = true;
        }
        let ep = self.ep.clone();
        let mut taken = 0;
        while taken < RUN_BUDGET {
            // The first of a batch drives the transport; the rest of the
            // batch is what that brought.
            let first = match ep.try_recv() {
                Ok(d) => d,
                Err(MsgError::WouldBlock) => break,
                Err(MsgError::Closed(reason)) => return Err(Stop::Closed(reason)),
                Err(e) => return Err(Stop::Failed(QueueError::Channel(e))),
            };
            worked = true;
            let cork = ep.cork();
            self.handle(first).map_err(Stop::Failed)?;
            taken += 1;
            for _ in 1..BATCH {
                match ep.try_recv_taken() {
                    Ok(d) => {
                        self.handle(d).map_err(Stop::Failed)?;
                        taken += 1;
                    }
                    Err(_) => break,
                }
            }
            drop(cork);
            self.submit_ring().map_err(Stop::Failed)?;
        }
        Ok(worked)
    }

    /// Before its worker sleeps: `waker` is registered with the channel
    /// (it fires when something arrives) and the channel's progress goes
    /// to the fabric's fallback. Returns whether something had arrived
    /// meanwhile (then the queue wants another turn, not a sleep).
    pub(crate) fn prepare_sleep(&mut self, waker: &Waker) -> Result<bool, Stop> {
        let mut cx = Context::from_waker(waker);
        let polled = std::pin::pin!(self.ep.recv_async()).poll(&mut cx);
        match polled {
            Poll::Ready(Ok(d)) => {
                let ep = self.ep.clone();
                let cork = ep.cork();
                self.handle(d).map_err(Stop::Failed)?;
                drop(cork);
                self.submit_ring().map_err(Stop::Failed)?;
                Ok(true)
            }
            Poll::Ready(Err(MsgError::Closed(reason))) => Err(Stop::Closed(reason)),
            Poll::Ready(Err(e)) => Err(Stop::Failed(QueueError::Channel(e))),
            Poll::Pending => {
                self.ep.step_away();
                Ok(false)
            }
        }
    }

    /// The descriptor of the queue's io_uring, once it has one (readable
    /// when requests completed).
    pub(crate) fn ring_fd(&self) -> Option<std::os::fd::RawFd> {
        self.ring.as_ref().map(|(r, _)| r.fd())
    }

    /// The waker that calls the queue's worker when a request on a
    /// blocking thread finishes.
    pub(crate) fn set_waker(&mut self, waker: Waker) {
        self.offload.waker = Some(waker);
    }

    /// The queue's channel.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    /// Whether requests are on the queue's ring.
    pub(crate) fn ring_busy(&self) -> bool {
        !self.ring_idle()
    }
    /// Whether the queue ends its service: its controller died, its
    /// keep-alive expired (admin queue), or the target shuts down and the
    /// queue drained (or had `DRAIN_GRACE` to).
    pub(crate) fn must_stop(&mut self) -> bool {
        if self.ctrl.dead.load(Ordering::Acquire) {
            return true;
        }
        if self.shared.shutdown.load(Ordering::Acquire) {
            let since = *self.draining_since.get_or_insert_with(Instant::now);
            // The admin queue stays until the controller's I/O queues have
            // drained: tearing the controller down closes them.
            let drained = if self.qid == 0 {
                self.ctrl.io_active.load(Ordering::Acquire) == 0
            } else {
                self.writes.is_empty() && self.ring_idle()
            };
            if drained || since.elapsed() > DRAIN_GRACE {
                return true;
            }
        }
        if self.qid == 0 {
            if let Some(silent) = self.ctrl.expired() {
                tracing::warn!(
                    cntlid = self.ctrl.cntlid,
                    host = %self.ctrl.hostnqn,
                    "keep-alive expired: no command for {silent:?}; freeing the controller"
                );
                return true;
            }
        }
        false
    }

    /// One delivery: a command capsule, or a chunk of pushed write data.
    fn handle(&mut self, d: messaging::Delivery) -> Result<(), QueueError> {
        let state = match d.kind() {
            ReceivedKind::Message => self.execute(d)?,
            ReceivedKind::Push => self.pushed(d)?,
            ReceivedKind::Direct { .. } => return Err(QueueError::DirectPlacement),
        };
        self.advance(state)
    }

    /// Moves a command from `state` until it settles: completed, or
    /// waiting on the ring, for pushed data or for an event.
    fn advance(&mut self, mut state: State) -> Result<(), QueueError> {
        loop {
            state = match state {
                State::Settled => return Ok(()),
                State::Complete { cid, status, dw0 } => return self.complete(cid, status, dw0),
                State::AwaitingData(w) => {
                    let key = self.writes.insert(w);
                    self.awaiting.push_back(key);
                    return Ok(());
                }
                State::Storage(io) => match self.start(io) {
                    None => return Ok(()),
                    Some(io) => self.run_now(io),
                },
                State::ToHost {
                    cid,
                    buf,
                    target,
                    by_data,
                } => {
                    self.ep
                        .push_direct(buf, DirectPush::to(target).completing(by_data))
                        .map_err(QueueError::Push)?
                        .detach();
                    if by_data {
                        State::Settled
                    } else {
                        State::complete(cid, Status::SUCCESS)
                    }
                }
            };
        }
    }

    /// A command capsule: decoded, checked and executed as far as it can
    /// be at once. Its next state is returned.
    fn execute(&mut self, msg: messaging::Delivery) -> Result<State, QueueError> {
        let (sqe, inline) = transport::decode_capsule(&msg).map_err(QueueError::Capsule)?;
        self.sq_head = (self.sq_head + 1) % self.depth.max(1);
        if self.qid == 0 {
            self.ctrl.touch();
        }
        let outcome = if self.qid == 0 {
            self.admin(&sqe, inline)
        } else {
            self.io(&sqe, inline)
        }?;
        let cid = sqe.command_id;
        Ok(match outcome {
            Outcome::Done(status, dw0) => State::Complete { cid, status, dw0 },
            Outcome::Settled => State::Settled,
            Outcome::AwaitData(w) => State::AwaitingData(w),
            Outcome::Start(Start::Read { ns, offset, len }) => self.read_io(&sqe, ns, offset, len)?,
            Outcome::Start(Start::InlineWrite { ns, offset, fua }) => State::Storage(Io::Inline {
                cid,
                _ns: ns,
                offset,
                capsule: msg,
                fua,
            }),
            Outcome::Start(Start::Flush { ns }) => State::Storage(Io::Flush { cid, _ns: ns }),
            Outcome::Start(Start::Writeback { ns, offset, data }) => State::Storage(Io::Writeback {
                cid,
                _ns: ns,
                offset,
                data,
            }),
        })
    }

    /// Whether this queue's host sees namespace `nsid` (masking), cached
    /// until the masks change.
    fn visible(&mut self, nsid: u32) -> bool {
        let generation = self.shared.mask_generation.load(Ordering::Acquire);
        match self.visible {
            Some((n, g, v)) if n == nsid && g == generation => v,
            _ => {
                let v = self.shared.visible(nsid, &self.ctrl.hostnqn);
                self.visible = Some((nsid, generation, v));
                v
            }
        }
    }

    /// Sends the command's response capsule.
    fn complete(&mut self, cid: CommandId, status: Status, dw0: u32) -> Result<(), QueueError> {
        if !status.is_success() {
            if status.sct() == crate::nvme::StatusCodeType::MEDIA_DATA_INTEGRITY {
                self.shared.stats.count_media_error();
            }
            self.ctrl.log_error(self.qid, cid, status);
            tracing::debug!(qid = self.qid, cid = cid.0, %status, "command failed");
        }
        let mut cqe = Cqe::new(cid, status);
        cqe.dw0 = dw0;
        cqe.sq_head = self.sq_head;
        cqe.sq_id = self.qid;
        self.ep
            .send(&transport::encode_response(&cqe))
            .map(drop)
            .map_err(QueueError::Complete)
    }
}
