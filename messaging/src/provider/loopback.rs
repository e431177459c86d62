//! The loopback provider: in-process, deterministic, with fault injection.
//!
//! A [`LoopbackFabric`] is one node of a *world*; [`LoopbackFabric::node`]
//! adds another node (its own protection domain) to the same world, and
//! listeners are named world-wide. No thread drives the data path: a posted
//! work request executes against the peer inside `post_send`, under the
//! world's lock, and both completions are queued before `post_send`
//! returns. That makes protocol tests deterministic and free of sleeps.
//!
//! Faults ([`Faults`]) make the world hold operations instead:
//! - `break_at = Some(n)`: the `n`th send-queue operation in the world
//!   (counting from 1) fails its connection: it and everything outstanding
//!   on both queue pairs completes with `Flushed`;
//! - `delay = d`: an operation executes only once the world's virtual clock
//!   has advanced `d` ticks ([`LoopbackFabric::advance`]);
//! - `reorder_seed = Some(s)`: held operations of different queue pairs
//!   execute in a pseudo-random (seeded, so reproducible) interleaving;
//!   each queue pair's own order is kept, as RC requires.
//!
//! Held operations run when the clock advances: [`LoopbackFabric::advance`]
//! moves it by some ticks, [`LoopbackFabric::run_until_idle`] until nothing
//! is held.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::cq::CompletionQueue;
use super::responder::{self, Refusal, WriteTarget};
use super::{flushed_recv, flushed_send};
use super::{
    Capabilities, Completion, Fabric, FabricError, Incoming, Listener, Notify, QueuePair, RecvWr, RemoteAddr, SendOp,
    SendWr, WcStatus,
};
use crate::mr::{Access, Buf, ProtectionDomain};

/// Fault injection settings of a loopback world.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail the connection at this send-queue operation (1-based, world-wide).
    pub break_at: Option<u64>,
    /// Hold each operation this many clock ticks.
    pub delay: u64,
    /// Interleave held operations of different queue pairs pseudo-randomly.
    pub reorder_seed: Option<u64>,
}

/// One node of a loopback world.
#[derive(Clone)]
pub struct LoopbackFabric {
    world: Arc<World>,
    pd: ProtectionDomain,
}

struct World {
    state: Mutex<WorldState>,
    changed: Condvar,
}

#[derive(Default)]
struct WorldState {
    listeners: HashMap<String, VecDeque<PendingConnect>>,
    held: VecDeque<Held>,
    clock: u64,
    ops: u64,
    faults: Faults,
    rng: u64,
    next_qp: u64,
}

struct Held {
    due: u64,
    from: Arc<QpCore>,
    wr: SendWr,
}

/// Where the listener's answer to a pending connect lands.
type AnswerSlot = (Mutex<Option<Result<(), String>>>, Condvar);

struct PendingConnect {
    client: Arc<QpCore>,
    params: Vec<u8>,
    answer: Arc<AnswerSlot>,
}

const MAX_WR: u32 = 1 << 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl LoopbackFabric {
    /// A new world with one node.
    pub fn new() -> LoopbackFabric {
        LoopbackFabric {
            world: Arc::new(World {
                state: Mutex::new(WorldState::default()),
                changed: Condvar::new(),
            }),
            pd: ProtectionDomain::new(),
        }
    }

    /// Another node in the same world, with its own protection domain.
    pub fn node(&self) -> LoopbackFabric {
        LoopbackFabric {
            world: self.world.clone(),
            pd: ProtectionDomain::new(),
        }
    }

    /// Sets the world's faults (see the module docs).
    pub fn set_faults(&self, faults: Faults) {
        let mut st = self.world.state.lock();
        st.rng = faults.reorder_seed.unwrap_or(0) | 1;
        st.faults = faults;
    }

    /// Number of send-queue operations posted in the world so far.
    pub fn operations(&self) -> u64 {
        self.world.state.lock().ops
    }

    /// Number of operations held by faults.
    pub fn held(&self) -> usize {
        self.world.state.lock().held.len()
    }

    /// Advances the virtual clock by `ticks`, executing what became due.
    /// Returns how many operations executed.
    pub fn advance(&self, ticks: u64) -> usize {
        let mut st = self.world.state.lock();
        st.clock += ticks;
        let clock = st.clock;
        let mut executed = 0;
        while let Some(i) = pick_due(&mut st, clock) {
            let held = st.held.remove(i).expect("index from pick_due");
            execute(&mut st, &held.from, held.wr);
            executed += 1;
        }
        executed
    }

    /// Advances the clock until no operation is held; returns how many executed.
    pub fn run_until_idle(&self) -> usize {
        let mut executed = 0;
        loop {
            let next = {
                let st = self.world.state.lock();
                st.held
                    .iter()
                    .map(|h| h.due)
                    .min()
                    .map(|due| due.saturating_sub(st.clock))
            };
            match next {
                Some(ticks) => executed += self.advance(ticks.max(1)),
                None => return executed,
            }
        }
    }

    /// Connects two queue pairs directly, without a listener: `a` on this
    /// node, `b` on `other` (single-threaded set-up for deterministic tests).
    pub fn connect_pair(
        &self,
        other: &LoopbackFabric,
        a: (&[u8], Vec<RecvWr>),
        b: (&[u8], Vec<RecvWr>),
    ) -> (LoopbackQp, LoopbackQp) {
        let mut st = self.world.state.lock();
        let qa = QpCore::new(&mut st, self, &self.pd, a.1);
        let qb = QpCore::new(&mut st, other, &other.pd, b.1);
        let _ = qa.peer_params.set(b.0.to_vec());
        let _ = qb.peer_params.set(a.0.to_vec());
        *qa.peer.lock() = Arc::downgrade(&qb);
        *qb.peer.lock() = Arc::downgrade(&qa);
        (LoopbackQp { core: qa }, LoopbackQp { core: qb })
    }
}

impl Default for LoopbackFabric {
    fn default() -> Self {
        LoopbackFabric::new()
    }
}

impl std::fmt::Debug for LoopbackFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackFabric").field("pd", &self.pd).finish()
    }
}

/// Picks the held operation to run next among those due: the oldest, or
/// with reordering a random queue pair's oldest.
fn pick_due(st: &mut WorldState, clock: u64) -> Option<usize> {
    let due: Vec<usize> = st
        .held
        .iter()
        .enumerate()
        .filter(|(i, h)| {
            h.due <= clock
                && !st
                    .held
                    .iter()
                    .take(*i)
                    .any(|earlier| Arc::ptr_eq(&earlier.from, &h.from))
        })
        .map(|(i, _)| i)
        .collect();
    if due.is_empty() {
        return None;
    }
    if st.faults.reorder_seed.is_none() {
        return Some(due[0]);
    }
    // xorshift64: tiny, seeded and reproducible.
    let mut x = st.rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    st.rng = x;
    Some(due[(x % due.len() as u64) as usize])
}

impl Fabric for LoopbackFabric {
    fn name(&self) -> &'static str {
        "loopback"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            immediate_data: true,
            max_message: 1 << 30,
            max_send_wr: MAX_WR,
            max_recv_wr: MAX_WR,
        }
    }

    fn domain(&self) -> &ProtectionDomain {
        &self.pd
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, FabricError> {
        let mut st = self.world.state.lock();
        let name = if addr.is_empty() || addr.ends_with(":0") {
            st.next_qp += 1;
            format!("loopback-{}", st.next_qp)
        } else {
            addr.to_string()
        };
        if st.listeners.contains_key(&name) {
            return Err(FabricError::Listen {
                addr: name,
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        st.listeners.insert(name.clone(), VecDeque::new());
        Ok(Box::new(LoopbackListener {
            fabric: self.clone(),
            name,
            closed: AtomicBool::new(false),
        }))
    }

    fn connect(
        &self,
        addr: &str,
        domain: &ProtectionDomain,
        params: &[u8],
        recvs: Vec<RecvWr>,
    ) -> Result<Box<dyn QueuePair>, FabricError> {
        super::check_domain(domain, &self.pd, "loopback")?;
        let answer = Arc::new((Mutex::new(None), Condvar::new()));
        let client = {
            let mut st = self.world.state.lock();
            if !st.listeners.contains_key(addr) {
                return Err(FabricError::Connect {
                    addr: addr.to_string(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                });
            }
            let client = QpCore::new(&mut st, self, domain, recvs);
            st.listeners
                .get_mut(addr)
                .expect("checked above")
                .push_back(PendingConnect {
                    client: client.clone(),
                    params: params.to_vec(),
                    answer: answer.clone(),
                });
            client
        };
        self.world.changed.notify_all();
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut slot = answer.0.lock();
        while slot.is_none() {
            if answer.1.wait_until(&mut slot, deadline).timed_out() {
                client.fail(None);
                return Err(FabricError::Timeout(CONNECT_TIMEOUT));
            }
        }
        match slot.take().expect("loop ends on Some") {
            Ok(()) => Ok(Box::new(LoopbackQp { core: client })),
            Err(reason) => {
                client.fail(None);
                Err(FabricError::Rejected {
                    peer: addr.to_string(),
                    reason,
                })
            }
        }
    }
}

/// A named loopback listener.
pub struct LoopbackListener {
    fabric: LoopbackFabric,
    name: String,
    closed: AtomicBool,
}

impl std::fmt::Debug for LoopbackListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackListener").field("name", &self.name).finish()
    }
}

impl Listener for LoopbackListener {
    fn local_addr(&self) -> String {
        self.name.clone()
    }

    fn accept(&self, timeout: Option<Duration>) -> Result<Box<dyn Incoming>, FabricError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let world = &self.fabric.world;
        let mut st = world.state.lock();
        loop {
            let Some(queue) = st.listeners.get_mut(&self.name) else {
                return Err(FabricError::Shutdown);
            };
            if let Some(pending) = queue.pop_front() {
                return Ok(Box::new(LoopbackIncoming {
                    fabric: self.fabric.clone(),
                    pending: Some(pending),
                }));
            }
            match deadline {
                Some(d) => {
                    if world.changed.wait_until(&mut st, d).timed_out() {
                        return Err(FabricError::Timeout(timeout.unwrap_or_default()));
                    }
                }
                None => world.changed.wait(&mut st),
            }
        }
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let pending = self.fabric.world.state.lock().listeners.remove(&self.name);
        for p in pending.into_iter().flatten() {
            answer(&p.answer, Err("listener shut down".into()));
        }
        self.fabric.world.changed.notify_all();
    }
}

impl Drop for LoopbackListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn answer(slot: &AnswerSlot, value: Result<(), String>) {
    *slot.0.lock() = Some(value);
    slot.1.notify_all();
}

/// A loopback connection request.
pub struct LoopbackIncoming {
    fabric: LoopbackFabric,
    pending: Option<PendingConnect>,
}

impl std::fmt::Debug for LoopbackIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackIncoming").finish_non_exhaustive()
    }
}

impl Incoming for LoopbackIncoming {
    fn peer_params(&self) -> &[u8] {
        self.pending.as_ref().map_or(&[], |p| &p.params)
    }

    fn fabric(&self) -> &dyn Fabric {
        &self.fabric
    }

    fn peer_addr(&self) -> String {
        self.pending
            .as_ref()
            .map_or_else(String::new, |p| format!("loopback-qp-{}", p.client.id))
    }

    fn accept(
        mut self: Box<Self>,
        domain: &ProtectionDomain,
        params: &[u8],
        recvs: Vec<RecvWr>,
    ) -> Result<Box<dyn QueuePair>, FabricError> {
        super::check_domain(domain, &self.fabric.pd, "loopback")?;
        let pending = self.pending.take().ok_or(FabricError::Shutdown)?;
        let server = {
            let mut st = self.fabric.world.state.lock();
            let server = QpCore::new(&mut st, &self.fabric, domain, recvs);
            let _ = server.peer_params.set(pending.params.clone());
            let _ = pending.client.peer_params.set(params.to_vec());
            *server.peer.lock() = Arc::downgrade(&pending.client);
            *pending.client.peer.lock() = Arc::downgrade(&server);
            server
        };
        answer(&pending.answer, Ok(()));
        Ok(Box::new(LoopbackQp { core: server }))
    }

    fn reject(mut self: Box<Self>, reason: &str) {
        if let Some(p) = self.pending.take() {
            answer(&p.answer, Err(reason.to_string()));
        }
    }
}

impl Drop for LoopbackIncoming {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            answer(&p.answer, Err("connection dropped by the listener".into()));
        }
    }
}

struct QpCore {
    id: u64,
    world: Weak<World>,
    pd: ProtectionDomain,
    cq: CompletionQueue,
    recvs: Mutex<VecDeque<RecvWr>>,
    peer: Mutex<Weak<QpCore>>,
    peer_params: OnceLock<Vec<u8>>,
    failed: AtomicBool,
    held: AtomicU64,
}

impl QpCore {
    fn new(st: &mut WorldState, fabric: &LoopbackFabric, domain: &ProtectionDomain, recvs: Vec<RecvWr>) -> Arc<QpCore> {
        st.next_qp += 1;
        Arc::new(QpCore {
            id: st.next_qp,
            world: Arc::downgrade(&fabric.world),
            pd: domain.clone(),
            cq: CompletionQueue::default(),
            recvs: Mutex::new(recvs.into()),
            peer: Mutex::new(Weak::new()),
            peer_params: OnceLock::new(),
            failed: AtomicBool::new(false),
            held: AtomicU64::new(0),
        })
    }

    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Error state: flush posted receives and, with the world's state at
    /// hand, this queue pair's held operations.
    fn fail(&self, st: Option<&mut WorldState>) {
        self.failed.store(true, Ordering::Release);
        let mut flushed = Vec::new();
        if let Some(st) = st {
            let mut keep = VecDeque::with_capacity(st.held.len());
            for h in st.held.drain(..) {
                if h.from.id == self.id {
                    flushed.push(flushed_send(h.wr));
                } else {
                    keep.push_back(h);
                }
            }
            st.held = keep;
            self.held.store(0, Ordering::Release);
        }
        flushed.extend(self.recvs.lock().drain(..).map(flushed_recv));
        self.cq.push_all(flushed);
    }
}

fn completion(wr: SendWr, status: WcStatus, byte_len: u32) -> Completion {
    let opcode = wr.opcode();
    Completion {
        id: wr.id,
        status,
        opcode,
        byte_len,
        imm: None,
        buf: wr.into_buf(),
    }
}

/// Fails both ends of a connection.
fn break_connection(st: &mut WorldState, qp: &Arc<QpCore>) {
    let peer = qp.peer.lock().upgrade();
    qp.fail(Some(st));
    if let Some(peer) = peer {
        peer.fail(Some(st));
    }
}

/// Executes one send-queue operation of `from` against its peer: the
/// peer's responder decides where it lands, and the copy is made here.
fn execute(st: &mut WorldState, from: &Arc<QpCore>, wr: SendWr) {
    from.held.fetch_sub(1, Ordering::AcqRel);
    let peer = from.peer.lock().upgrade();
    let peer = match peer {
        Some(p) if !from.is_failed() && !p.is_failed() => p,
        _ => {
            from.cq.push(flushed_send(wr));
            if !from.is_failed() {
                break_connection(st, from);
            }
            return;
        }
    };
    // A gathered Send is copied as one message, as the responder would.
    let mut wr = wr.flattened();
    let outcome = match wr.op {
        SendOp::Send { ref buf, imm } => execute_send(&peer, buf, imm),
        SendOp::SendGather(_) => unreachable!("flattened above"),
        SendOp::Write { ref buf, remote, imm } => execute_write(&peer, buf, remote, imm),
        SendOp::Read { ref mut buf, remote } => execute_read(&peer, buf, remote),
    };
    match outcome {
        Ok(len) => from.cq.push(completion(wr, WcStatus::Success, len)),
        Err(refusal) => {
            // The peer's responder refused: the receive it failed completes there.
            if let Some(receive) = refusal.receive {
                peer.cq.push(receive);
            }
            tracing::debug!(qp = from.id, status = %refusal.status, "loopback operation failed: {}", refusal.reason);
            from.cq.push(completion(wr, refusal.status, 0));
            break_connection(st, from);
        }
    }
}

/// A Send into the peer's next posted receive; the bytes sent.
fn execute_send(peer: &QpCore, buf: &Buf, imm: Option<u32>) -> Result<u32, Refusal> {
    let len = buf.len() as u32;
    // The receive queue's lock is released before a refusal fails the
    // connection (which flushes that queue).
    let accepted = responder::accept_send(&mut peer.recvs.lock(), len);
    let mut recv = accepted?;
    recv.buf.spare_capacity()[..buf.len()].copy_from_slice(buf);
    peer.cq.push(responder::send_received(recv, len, imm));
    Ok(len)
}

/// A Write into the peer's registered memory (with immediate: into a
/// posted receive's completion too); the bytes written.
fn execute_write(peer: &QpCore, buf: &Buf, remote: RemoteAddr, imm: Option<u32>) -> Result<u32, Refusal> {
    let len = buf.len() as u32;
    let accepted = responder::accept_write(
        &peer.pd,
        &mut peer.recvs.lock(),
        remote.rkey,
        remote.addr,
        len.into(),
        imm.is_some(),
    );
    let WriteTarget { mut target, receive } = accepted?;
    target.as_mut_slice().copy_from_slice(buf);
    if let (Some(recv), Some(imm)) = (receive, imm) {
        peer.cq.push(responder::write_received(recv, len, imm));
    }
    Ok(len)
}

/// A Read of the peer's registered memory into `buf`; the bytes read.
fn execute_read(peer: &QpCore, buf: &mut Buf, remote: RemoteAddr) -> Result<u32, Refusal> {
    if !buf.access().contains(Access::LOCAL_WRITE) {
        return Err(Refusal {
            status: WcStatus::LocalProtectionError,
            reason: "read into memory without local write".into(),
            receive: None,
        });
    }
    let target = responder::accept_read(&peer.pd, remote.rkey, remote.addr, buf.len() as u64)?;
    buf.copy_from_slice(target.as_slice());
    Ok(buf.len() as u32)
}

/// A loopback queue pair.
pub struct LoopbackQp {
    core: Arc<QpCore>,
}

impl std::fmt::Debug for LoopbackQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackQp")
            .field("id", &self.core.id)
            .field("failed", &self.core.is_failed())
            .finish()
    }
}

impl QueuePair for LoopbackQp {
    fn post_send(&self, wrs: &mut Vec<SendWr>) -> Result<(), FabricError> {
        let Some(world) = self.core.world.upgrade() else {
            self.core.cq.push_all(wrs.drain(..).map(flushed_send));
            return Ok(());
        };
        let mut st = world.state.lock();
        if self.core.held.load(Ordering::Acquire) as usize + wrs.len() > MAX_WR as usize {
            return Err(FabricError::QueueFull {
                queue: "send",
                depth: MAX_WR,
            });
        }
        for wr in wrs.drain(..) {
            st.ops += 1;
            if self.core.is_failed() {
                self.core.cq.push(flushed_send(wr));
                continue;
            }
            if st.faults.break_at == Some(st.ops) {
                tracing::debug!(
                    qp = self.core.id,
                    op = st.ops,
                    "loopback fault: breaking the connection"
                );
                self.core.cq.push(flushed_send(wr));
                break_connection(&mut st, &self.core);
                continue;
            }
            self.core.held.fetch_add(1, Ordering::AcqRel);
            let faults = st.faults;
            if faults.delay > 0 || faults.reorder_seed.is_some() || !st.held.is_empty() {
                let due = st.clock + faults.delay;
                st.held.push_back(Held {
                    due,
                    from: self.core.clone(),
                    wr,
                });
            } else {
                execute(&mut st, &self.core, wr);
            }
        }
        Ok(())
    }

    fn post_recv(&self, wr: RecvWr) -> Result<(), (FabricError, RecvWr)> {
        let mut recvs = self.core.recvs.lock();
        if self.core.is_failed() {
            drop(recvs);
            self.core.cq.push(flushed_recv(wr));
            return Ok(());
        }
        if recvs.len() >= MAX_WR as usize {
            return Err((
                FabricError::QueueFull {
                    queue: "receive",
                    depth: MAX_WR,
                },
                wr,
            ));
        }
        recvs.push_back(wr);
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        self.core.cq.poll(out, max)
    }

    fn wait(&self, timeout: Option<Duration>) -> bool {
        self.core.cq.wait(timeout)
    }

    fn set_notify(&self, notify: Option<Notify>) {
        self.core.cq.set_notify(notify);
    }

    fn peer_params(&self) -> &[u8] {
        self.core.peer_params.get().map_or(&[], Vec::as_slice)
    }

    fn peer_addr(&self) -> String {
        let peer = self.core.peer.lock().upgrade();
        peer.map_or_else(|| "loopback-qp-gone".into(), |p| format!("loopback-qp-{}", p.id))
    }

    fn is_failed(&self) -> bool {
        self.core.is_failed()
    }

    fn disconnect(&self) {
        if self.core.is_failed() {
            return;
        }
        match self.core.world.upgrade() {
            Some(world) => {
                let mut st = world.state.lock();
                break_connection(&mut st, &self.core);
            }
            None => self.core.fail(None),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            immediate_data: true,
            max_message: 1 << 30,
            max_send_wr: MAX_WR,
            max_recv_wr: MAX_WR,
        }
    }
}

impl Drop for LoopbackQp {
    fn drop(&mut self) {
        self.disconnect();
    }
}
