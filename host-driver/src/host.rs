//! [`Host`]: one controller on a remote I/O unit, its queues and its
//! background threads (reconnect supervisor, keep alive, asynchronous
//! events, timer).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use messaging::intmap::IntMap;
use messaging::mr::Buf;
use messaging::mr::ProtectionDomain;
use messaging::provider::tcp::TcpOptions;
use messaging::{Fabrics, TransportUri};
use nvme::transport;
use nvme::{
    AsyncEvent, AsyncEventType, ChangedNamespaceList, Cns, ConnectData, IdentifyController, IdentifyNamespace,
    LogPageId, NamespaceList, Nqn, Nsid, NumberOfQueues, Status,
};
use parking_lot::{Condvar, Mutex};

use crate::buf::{BufCache, IoBuf};
use crate::command::{self, Op, OpData, QueueKind};
use crate::exec::{self, Timer};
use crate::options::{host_id, HostOptions, TargetUri, Transport};
use crate::queue::{ExecError, Queue, QueueParams, Reply};
use crate::HostError;

/// Entries of the admin queue.
pub const ADMIN_QUEUE_DEPTH: u16 = 32;
/// Commands issued at once when a request splits into many.
const BATCH: usize = 32;
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const STOP: u64 = u64::MAX;

/// A namespace as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NamespaceInfo {
    /// Namespace ID.
    pub nsid: Nsid,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
}

impl NamespaceInfo {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    fn from_identify(nsid: Nsid, id: &IdentifyNamespace) -> Result<NamespaceInfo, HostError> {
        Ok(NamespaceInfo {
            nsid,
            block_size: id.block_size()?,
            blocks: id.nsze,
        })
    }
}

/// Something that happened to the connection or the I/O unit's namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostEvent {
    /// Namespaces were attached, detached or changed (an asynchronous event
    /// and the Changed Namespace List log page).
    NamespacesChanged {
        /// The namespaces that changed.
        nsids: Vec<Nsid>,
        /// More than 1024 changed: check every namespace.
        all: bool,
    },
    /// Another asynchronous event.
    AsyncEvent(AsyncEvent),
    /// The connection was lost; the host is reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The host reconnected (a new controller).
    Reconnected {
        /// The new controller's ID.
        controller_id: u16,
    },
}

impl fmt::Display for HostEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostEvent::NamespacesChanged { all: true, .. } => {
                write!(f, "namespace attribute changed: more than 1024 namespaces")
            }
            HostEvent::NamespacesChanged { nsids, .. } => {
                let list: Vec<String> = nsids.iter().map(|n| n.0.to_string()).collect();
                write!(f, "namespace attribute changed: nsids [{}]", list.join(", "))
            }
            HostEvent::AsyncEvent(e) => write!(
                f,
                "asynchronous event: type {:#x}, info {:#04x}, log page {:#04x}",
                e.event_type, e.info, e.log_page
            ),
            HostEvent::Disconnected { reason } => write!(f, "disconnected: {reason}"),
            HostEvent::Reconnected { controller_id } => write!(f, "reconnected: controller {controller_id}"),
        }
    }
}

/// A connection to one NVMe subsystem on an I/O unit: a controller with an
/// admin queue and one or more I/O queues. See the [crate docs](crate).
///
/// `Host` is `Clone + Send + Sync`; clones share the connection. It closes
/// when [`Host::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Host {
    handle: Arc<Handle>,
}

struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close();
    }
}

struct Inner {
    uri: TargetUri,
    /// The concrete transport address in use (auto resolved).
    resolved: TransportUri,
    opts: HostOptions,
    hostnqn: Nqn,
    subnqn: Nqn,
    fabrics: Arc<Fabrics>,
    /// The host's own protection domain (a child of the fabric's), shared
    /// by its queues: its I/O unit reaches these buffers and nothing else.
    domain: ProtectionDomain,
    cache: BufCache,
    timer: Timer,
    state: Mutex<ConnState>,
    state_cv: Condvar,
    waiters: Mutex<Vec<Waker>>,
    lost_tx: Mutex<Option<mpsc::Sender<u64>>>,
    namespaces: Mutex<IntMap<u32, NamespaceInfo>>,
    subscribers: Mutex<Vec<mpsc::Sender<HostEvent>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    generation: AtomicU64,
    next_queue: AtomicUsize,
    last_cntlid: AtomicU64,
}

enum ConnState {
    Connected(Arc<Session>),
    Reconnecting { since: Instant },
    Closed,
}

/// One controller incarnation: its queues. A reconnect builds a new one.
struct Session {
    generation: u64,
    cntlid: u16,
    admin: Arc<Queue>,
    io: Vec<Arc<Queue>>,
    max_transfer: usize,
}

impl Session {
    fn close(&self) {
        self.admin.close();
        self.io.iter().for_each(|q| q.close());
    }

    fn pick(&self, counter: &AtomicUsize) -> &Arc<Queue> {
        if let [only] = self.io.as_slice() {
            return only;
        }
        let i = counter.fetch_add(1, Ordering::Relaxed);
        &self.io[i % self.io.len()]
    }
}

impl Host {
    /// Connects to the subsystem `opts.subnqn` at `uri` (`tcp://HOST:PORT`
    /// or `HOST:PORT`): admin queue, Number of Queues negotiation, Identify
    /// Controller, I/O queues; then starts the background threads.
    ///
    /// # Errors
    /// [`HostError::InvalidUri`], [`HostError::InvalidArgument`] for bad
    /// options, [`HostError::Connect`] (with the cause) when the I/O unit
    /// cannot be reached or refuses.
    pub fn connect(uri: &str, opts: HostOptions) -> Result<Host, HostError> {
        let uri = TargetUri::parse(uri)?;
        opts.validate()?;
        let fabrics = Arc::new(Fabrics::with_tcp_options(TcpOptions {
            connect_timeout: opts.connect_timeout,
            ..TcpOptions::default()
        }));
        let candidates = match uri.transport() {
            Transport::Auto => fabrics.auto_candidates(uri.addr()),
            _ => vec![uri.to_transport_uri()],
        };
        let mut last = None;
        for resolved in candidates {
            match Host::connect_via(&uri, resolved.clone(), &fabrics, &opts) {
                Ok(host) => {
                    if uri.transport() == Transport::Auto {
                        tracing::info!(%uri, chosen = %resolved, "auto transport selection");
                    }
                    return Ok(host);
                }
                Err(e) => {
                    tracing::debug!(%resolved, "connect failed: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| HostError::InvalidUri {
            uri: uri.to_string(),
            reason: "no usable transport".into(),
        }))
    }

    fn connect_via(
        uri: &TargetUri,
        resolved: TransportUri,
        fabrics: &Arc<Fabrics>,
        opts: &HostOptions,
    ) -> Result<Host, HostError> {
        let opts = opts.clone();
        let hostnqn = Nqn::new(opts.hostnqn.clone())?;
        let subnqn = Nqn::new(opts.subnqn.clone())?;
        let domain = fabrics
            .fabric(resolved.scheme)
            .map_err(|e| HostError::InvalidUri {
                uri: resolved.to_string(),
                reason: e.to_string(),
            })?
            .domain()
            .child()?;
        let timer = Timer::start().map_err(|source| HostError::Thread {
            name: "chanio-host-timer".into(),
            source,
        })?;
        let (lost_tx, lost_rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            uri: uri.clone(),
            resolved,
            cache: BufCache::new(domain.clone()),
            fabrics: fabrics.clone(),
            domain,
            timer,
            hostnqn,
            subnqn,
            opts,
            state: Mutex::new(ConnState::Reconnecting { since: Instant::now() }),
            state_cv: Condvar::new(),
            waiters: Mutex::new(Vec::new()),
            lost_tx: Mutex::new(Some(lost_tx)),
            namespaces: Mutex::new(IntMap::default()),
            subscribers: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            next_queue: AtomicUsize::new(0),
            last_cntlid: AtomicU64::new(0),
        });
        let host = Host {
            handle: Arc::new(Handle { inner: inner.clone() }),
        };
        let session = inner.connect_session()?;
        inner.last_cntlid.store(u64::from(session.cntlid), Ordering::Relaxed);
        *inner.state.lock() = ConnState::Connected(session);
        inner.spawn("chanio-host-supervisor", {
            let inner = inner.clone();
            move || inner.supervise(lost_rx)
        })?;
        if !inner.opts.keep_alive.is_zero() {
            inner.spawn("chanio-host-keepalive", {
                let inner = inner.clone();
                move || inner.keep_alive_loop()
            })?;
        }
        inner.spawn("chanio-host-events", {
            let inner = inner.clone();
            move || inner.event_loop()
        })?;
        Ok(host)
    }

    /// The controller ID of the current (or last) controller.
    pub fn controller_id(&self) -> u16 {
        self.handle.inner.last_cntlid.load(Ordering::Relaxed) as u16
    }

    /// The transport in use (`"tcp"`).
    pub fn transport(&self) -> &'static str {
        self.handle.inner.resolved.scheme.as_str()
    }

    /// The target URI.
    pub fn uri(&self) -> String {
        self.handle.inner.uri.to_string()
    }

    /// The I/O queues in use (what the I/O unit granted); 0 while
    /// disconnected.
    pub fn io_queues(&self) -> usize {
        match &*self.handle.inner.state.lock() {
            ConnState::Connected(s) => s.io.len(),
            _ => 0,
        }
    }

    /// Identify Controller.
    ///
    /// # Errors
    /// See [`HostError`].
    pub fn identify_controller(&self) -> Result<IdentifyController, HostError> {
        exec::block_on(self.handle.inner.identify_controller())
    }

    /// The active namespaces.
    ///
    /// # Errors
    /// See [`HostError`].
    pub fn namespaces(&self) -> Result<Vec<NamespaceInfo>, HostError> {
        exec::block_on(self.handle.inner.namespaces())
    }

    /// Identify Namespace of `nsid` (also refreshes the host's cached block
    /// size and capacity).
    ///
    /// # Errors
    /// See [`HostError`].
    pub fn identify_namespace(&self, nsid: Nsid) -> Result<IdentifyNamespace, HostError> {
        exec::block_on(self.handle.inner.identify_namespace(nsid))
    }

    /// Reads `blocks` blocks from `slba`. Requests above the transfer limit
    /// are split into several commands, run concurrently.
    ///
    /// # Errors
    /// [`HostError::InvalidArgument`] (no blocks, LBA overflow),
    /// [`HostError::Nvme`] (e.g. LBA Out of Range, Invalid Namespace),
    /// [`HostError::Timeout`], [`HostError::ConnectionLost`].
    pub fn read(&self, nsid: Nsid, slba: u64, blocks: u32) -> Result<Vec<u8>, HostError> {
        exec::block_on(self.read_async(nsid, slba, blocks))
    }

    /// Async form of [`Host::read`]; needs no particular runtime.
    ///
    /// # Errors
    /// As [`Host::read`].
    pub async fn read_async(&self, nsid: Nsid, slba: u64, blocks: u32) -> Result<Vec<u8>, HostError> {
        self.handle.inner.read(nsid, slba, blocks).await
    }

    /// Reads `buf.len()` bytes (whole blocks) from `slba` into `buf`. Up to
    /// the transfer limit the data lands in place, with no copy.
    ///
    /// # Errors
    /// As [`Host::read`]; on error `buf`'s contents are unspecified.
    pub fn read_into(&self, nsid: Nsid, slba: u64, buf: &mut IoBuf) -> Result<(), HostError> {
        exec::block_on(self.read_into_async(nsid, slba, buf))
    }

    /// Async form of [`Host::read_into`].
    ///
    /// # Errors
    /// As [`Host::read_into`].
    pub async fn read_into_async(&self, nsid: Nsid, slba: u64, buf: &mut IoBuf) -> Result<(), HostError> {
        self.handle.inner.read_into(nsid, slba, buf).await
    }

    /// Writes `data` (whole blocks) at `slba`; with `fua`, the I/O unit makes
    /// it durable before completing.
    ///
    /// # Errors
    /// [`HostError::InvalidArgument`] (empty, not whole blocks), and as
    /// [`Host::read`].
    pub fn write(&self, nsid: Nsid, slba: u64, data: &[u8], fua: bool) -> Result<(), HostError> {
        exec::block_on(self.write_async(nsid, slba, data, fua))
    }

    /// Async form of [`Host::write`].
    ///
    /// # Errors
    /// As [`Host::write`].
    pub async fn write_async(&self, nsid: Nsid, slba: u64, data: &[u8], fua: bool) -> Result<(), HostError> {
        self.handle.inner.write(nsid, slba, data, fua).await
    }

    /// Writes the contents of `buf`, as [`Host::write`], sending them
    /// straight from its registered memory when they fit one push (up to
    /// the I/O unit's slot size, 128 KiB by default) and are more than a
    /// capsule carries (4 KiB): no copy on the host. `buf` is lent to the
    /// fabric meanwhile and comes back with its contents; if the write
    /// times out while the fabric still sends from it, `buf` gets fresh
    /// memory (see [`IoBuf`]). Other sizes are copied, as by [`Host::write`].
    ///
    /// # Errors
    /// As [`Host::write`].
    pub fn write_from(&self, nsid: Nsid, slba: u64, buf: &mut IoBuf, fua: bool) -> Result<(), HostError> {
        exec::block_on(self.write_from_async(nsid, slba, buf, fua))
    }

    /// Async form of [`Host::write_from`].
    ///
    /// # Errors
    /// As [`Host::write`].
    pub async fn write_from_async(&self, nsid: Nsid, slba: u64, buf: &mut IoBuf, fua: bool) -> Result<(), HostError> {
        self.handle.inner.write_from(nsid, slba, buf, fua).await
    }

    /// Flushes the namespace's volatile write cache.
    ///
    /// # Errors
    /// As [`Host::read`].
    pub fn flush(&self, nsid: Nsid) -> Result<(), HostError> {
        exec::block_on(self.flush_async(nsid))
    }

    /// Async form of [`Host::flush`].
    ///
    /// # Errors
    /// As [`Host::flush`].
    pub async fn flush_async(&self, nsid: Nsid) -> Result<(), HostError> {
        let inner = &self.handle.inner;
        inner.run(&Op::flush(nsid)?, None).await.map(drop)
    }

    /// Writes zeroes to `blocks` blocks from `slba` (split into commands of
    /// at most 65536 blocks).
    ///
    /// # Errors
    /// As [`Host::read`].
    pub fn write_zeroes(&self, nsid: Nsid, slba: u64, blocks: u64) -> Result<(), HostError> {
        exec::block_on(self.write_zeroes_async(nsid, slba, blocks))
    }

    /// Async form of [`Host::write_zeroes`].
    ///
    /// # Errors
    /// As [`Host::write_zeroes`].
    pub async fn write_zeroes_async(&self, nsid: Nsid, slba: u64, blocks: u64) -> Result<(), HostError> {
        let inner = &self.handle.inner;
        check_request("Write Zeroes", nsid, slba, blocks)?;
        let ops = command::split_blocks(slba, blocks, nvme::command::MAX_BLOCKS_PER_COMMAND)
            .map(|(lba, n, _)| Op::write_zeroes(nsid, lba, n));
        inner.run_all(ops).await
    }

    /// Deallocates (trims) `blocks` blocks from `slba` with Dataset
    /// Management.
    ///
    /// # Errors
    /// As [`Host::read`].
    pub fn trim(&self, nsid: Nsid, slba: u64, blocks: u64) -> Result<(), HostError> {
        exec::block_on(self.trim_async(nsid, slba, blocks))
    }

    /// Async form of [`Host::trim`].
    ///
    /// # Errors
    /// As [`Host::trim`].
    pub async fn trim_async(&self, nsid: Nsid, slba: u64, blocks: u64) -> Result<(), HostError> {
        let inner = &self.handle.inner;
        check_request("Dataset Management", nsid, slba, blocks)?;
        let ops = command::dsm_commands(slba, blocks)
            .into_iter()
            .map(move |ranges| Op::deallocate(nsid, &ranges));
        inner.run_all(ops).await
    }

    /// A registered buffer of `len` bytes for [`Host::read_into`] and
    /// [`Host::write_from`].
    ///
    /// # Errors
    /// [`HostError::InvalidArgument`] for 0 bytes, [`HostError::Memory`].
    pub fn alloc(&self, len: usize) -> Result<IoBuf, HostError> {
        IoBuf::new(&self.handle.inner.domain, len)
    }

    /// A new receiver of [`HostEvent`]s (namespace changes, disconnects and
    /// reconnects). Each call makes a new subscription; dropping the
    /// receiver ends it.
    pub fn events(&self) -> mpsc::Receiver<HostEvent> {
        let (tx, rx) = mpsc::channel();
        self.handle.inner.subscribers.lock().push(tx);
        rx
    }

    /// Closes every queue and stops the background threads. Calls in
    /// progress and later calls fail with [`HostError::Closed`].
    pub fn close(&self) {
        self.handle.inner.close();
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.handle.inner;
        f.debug_struct("Host")
            .field("uri", &inner.uri.to_string())
            .field("hostnqn", &inner.hostnqn.as_str())
            .field("controller_id", &self.controller_id())
            .finish()
    }
}

impl Inner {
    fn spawn(&self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), HostError> {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|source| HostError::Thread {
                name: name.into(),
                source,
            })?;
        let mut threads = self.threads.lock();
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(())
    }

    /// Builds a controller: admin queue, Number of Queues, Identify
    /// Controller, I/O queues.
    fn connect_session(self: &Arc<Self>) -> Result<Arc<Session>, HostError> {
        let uri = self.uri.to_string();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let weak: Weak<Inner> = Arc::downgrade(self);
        let on_lost: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |g| {
            if let Some(inner) = weak.upgrade() {
                inner.report_lost(g, "a queue's channel closed");
            }
        });
        let data = ConnectData {
            host_id: host_id(self.hostnqn.as_str()),
            cntlid: ConnectData::CNTLID_DYNAMIC,
            subnqn: self.subnqn.clone(),
            hostnqn: self.hostnqn.clone(),
        };
        let fabric = self
            .fabrics
            .fabric(self.resolved.scheme)
            .map_err(|e| HostError::InvalidUri {
                uri: self.resolved.to_string(),
                reason: e.to_string(),
            })?;
        let mut params = QueueParams {
            fabric,
            domain: &self.domain,
            addr: &self.resolved.addr,
            depth: ADMIN_QUEUE_DEPTH,
            kato_ms: self.opts.kato_ms(),
            data: &data,
            timeout: self.opts.connect_timeout,
            generation,
        };
        let (admin, cntlid) = Queue::connect(&params, 0).map_err(|e| HostError::connect(&uri, "admin queue", e))?;
        if !self.timer.watch(admin.deadlines()) {
            // The host is closing (its timer stopped): no command could time out.
            admin.close();
            return Err(HostError::Closed);
        }
        let mut io = Vec::new();
        let result = (|| {
            let receiver = admin.spawn_receiver(on_lost.clone())?;
            self.threads.lock().push(receiver);
            let deadline = Instant::now() + self.opts.connect_timeout;
            let op = Op::set_number_of_queues(self.opts.io_queues)?;
            let reply = self.run_on(&admin, &op, deadline)?;
            let granted = NumberOfQueues::from_dword(reply.cqe.dw0)?;
            let queues = self.opts.io_queues.min(granted.submission()).min(granted.completion());
            let reply = self.run_on(&admin, &Op::identify(Cns::Controller, Nsid(0)), deadline)?;
            let id = IdentifyController::decode(reply.data.as_deref().unwrap_or(&[]))?;
            let max_transfer = match id.mdts {
                0 => transport::MAX_TRANSFER,
                m => transport::MAX_TRANSFER.min(4096usize.checked_shl(u32::from(m)).unwrap_or(usize::MAX)),
            };
            Ok::<_, HostError>((queues, max_transfer))
        })();
        let (queues, max_transfer) = match result {
            Ok(v) => v,
            Err(e) => {
                admin.close();
                return Err(HostError::connect(&uri, "admin commands", e));
            }
        };
        let io_data = ConnectData { cntlid, ..data.clone() };
        params.data = &io_data;
        params.depth = self.opts.queue_depth;
        params.kato_ms = 0;
        for qid in 1..=queues {
            let opened = Queue::connect(&params, qid).and_then(|(q, _)| {
                if !self.timer.watch(q.deadlines()) {
                    q.close();
                    return Err(HostError::Closed);
                }
                let receiver = q.spawn_receiver(on_lost.clone())?;
                self.threads.lock().push(receiver);
                Ok(q)
            });
            match opened {
                Ok(q) => io.push(q),
                Err(e) => {
                    admin.close();
                    io.iter().for_each(|q: &Arc<Queue>| q.close());
                    return Err(HostError::connect(&uri, format!("I/O queue {qid}"), e));
                }
            }
        }
        tracing::info!(%uri, cntlid, io_queues = io.len(), "connected");
        Ok(Arc::new(Session {
            generation,
            cntlid,
            admin,
            io,
            max_transfer,
        }))
    }

    /// Runs an admin command during set-up (no reconnects).
    fn run_on(&self, queue: &Queue, op: &Op<'_>, deadline: Instant) -> Result<Reply, HostError> {
        let reply = exec::block_on(queue.execute(op, None, &self.cache, Some(deadline), &self.timer));
        match reply {
            Ok(r) => check_reply(op, r),
            Err(ExecError::Timeout { .. }) => Err(HostError::Timeout {
                command: op.name,
                after: self.opts.connect_timeout,
            }),
            Err(ExecError::Lost) => Err(HostError::Protocol(format!(
                "the I/O unit closed the admin queue during {}",
                op.name
            ))),
            Err(ExecError::Host(e)) => Err(e),
        }
    }

    /// Runs one command, re-issuing it after a reconnect.
    async fn run(&self, op: &Op<'_>, mut read_buf: Option<Buf>) -> Result<Reply, HostError> {
        loop {
            // Without `once`, `run_with` re-issues by itself and never
            // returns `None`.
            if let Some(reply) = self.run_with(op, read_buf.take(), false).await? {
                return Ok(reply);
            }
        }
    }

    /// Runs one command (with `lent`, the buffer it reads into or writes
    /// from), re-issuing it after a reconnect; with `once`, a command lost
    /// with its channel comes back as `Ok(None)` instead, for a caller that
    /// must take its lent buffer back before re-issuing.
    async fn run_with(&self, op: &Op<'_>, mut lent: Option<Buf>, once: bool) -> Result<Option<Reply>, HostError> {
        let deadline = Instant::now() + self.opts.command_timeout;
        loop {
            let session = self.session(deadline).await?;
            let queue = match op.queue {
                QueueKind::Admin => &session.admin,
                QueueKind::Io => session.pick(&self.next_queue),
            };
            match queue
                .execute(op, lent.take(), &self.cache, Some(deadline), &self.timer)
                .await
            {
                Ok(reply) => return check_reply(op, reply).map(Some),
                Err(ExecError::Lost) => {
                    tracing::debug!(command = op.name, "channel lost; re-issuing after reconnect");
                    self.report_lost(session.generation, "a queue's channel closed");
                    if once {
                        return Ok(None);
                    }
                }
                Err(ExecError::Timeout { in_flight }) => {
                    if in_flight {
                        // The command keeps its CID (and read buffer) until
                        // the I/O unit answers, which a hung queue never
                        // does: reset the connection, as a controller reset
                        // would, so the queue does not fill up for good.
                        self.report_lost(
                            session.generation,
                            &format!("{} timed out on queue {}", op.name, queue.qid),
                        );
                    }
                    return Err(HostError::Timeout {
                        command: op.name,
                        after: self.opts.command_timeout,
                    });
                }
                Err(ExecError::Host(e)) => return Err(e),
            }
        }
    }

    /// Runs commands, [`BATCH`] at a time; the first error wins.
    async fn run_all<'a>(&self, ops: impl Iterator<Item = Result<Op<'a>, HostError>>) -> Result<(), HostError> {
        let ops: Vec<Op<'a>> = ops.collect::<Result<_, _>>()?;
        for batch in ops.chunks(BATCH) {
            let results = exec::join_all(batch.iter().map(|op| self.run(op, None)).collect()).await;
            for r in results {
                r?;
            }
        }
        Ok(())
    }

    /// The current session, waiting while reconnecting (until the reconnect
    /// deadline or `deadline`).
    fn session(&self, deadline: Instant) -> impl Future<Output = Result<Arc<Session>, HostError>> + '_ {
        // Dropped with the future: the timer forgets the wake-up.
        let mut entry = None;
        std::future::poll_fn(move |cx| {
            let st = self.state.lock();
            match &*st {
                ConnState::Connected(s) => Poll::Ready(Ok(s.clone())),
                ConnState::Closed => Poll::Ready(Err(HostError::Closed)),
                ConnState::Reconnecting { since } => {
                    let limit = (*since + self.opts.reconnect_deadline).min(deadline);
                    let now = Instant::now();
                    if now >= limit {
                        return Poll::Ready(Err(HostError::ConnectionLost {
                            uri: self.uri.to_string(),
                            waited: now.saturating_duration_since(*since),
                        }));
                    }
                    let mut waiters = self.waiters.lock();
                    if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                        waiters.push(cx.waker().clone());
                    }
                    drop(waiters);
                    if entry.is_none() {
                        match self.timer.wake_at(limit, cx.waker()) {
                            Some(e) => entry = Some(e),
                            None => return Poll::Ready(Err(HostError::Closed)),
                        }
                    }
                    Poll::Pending
                }
            }
        })
    }

    fn max_transfer(&self) -> usize {
        match &*self.state.lock() {
            ConnState::Connected(s) => s.max_transfer,
            _ => transport::MAX_TRANSFER,
        }
    }

    async fn identify_controller(&self) -> Result<IdentifyController, HostError> {
        let reply = self.run(&Op::identify(Cns::Controller, Nsid(0)), None).await?;
        Ok(IdentifyController::decode(reply_data(&reply))?)
    }

    async fn identify_namespace(&self, nsid: Nsid) -> Result<IdentifyNamespace, HostError> {
        command::check_nsid(nsid, false)?;
        let reply = self.run(&Op::identify(Cns::Namespace, nsid), None).await?;
        let id = IdentifyNamespace::decode(reply_data(&reply))?;
        if id.nsze > 0 {
            if let Ok(info) = NamespaceInfo::from_identify(nsid, &id) {
                self.namespaces.lock().insert(nsid.0, info);
            }
        }
        Ok(id)
    }

    async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, HostError> {
        let mut nsids = Vec::new();
        let mut after = Nsid(0);
        loop {
            let reply = self.run(&Op::identify(Cns::ActiveNamespaceList, after), None).await?;
            let list = NamespaceList::decode(reply_data(&reply))?;
            nsids.extend_from_slice(list.nsids());
            match list.nsids().last() {
                Some(&last) if list.nsids().len() == NamespaceList::MAX_ENTRIES => after = last,
                _ => break,
            }
        }
        let mut out = Vec::with_capacity(nsids.len());
        for nsid in nsids {
            let id = self.identify_namespace(nsid).await?;
            out.push(NamespaceInfo::from_identify(nsid, &id)?);
        }
        Ok(out)
    }

    /// Block size and capacity of `nsid`, from the cache or Identify. An
    /// error identifying it is reported as the failure of `command`.
    async fn namespace_info(&self, nsid: Nsid, command: &'static str) -> Result<NamespaceInfo, HostError> {
        command::check_nsid(nsid, false)?;
        if let Some(info) = self.namespaces.lock().get(&nsid.0) {
            return Ok(*info);
        }
        let id = match self.identify_namespace(nsid).await {
            Ok(id) => id,
            Err(HostError::Nvme { status, .. }) => return Err(HostError::Nvme { command, status }),
            Err(e) => return Err(e),
        };
        if id.nsze == 0 {
            // Inactive namespaces identify as zeroes.
            return Err(HostError::Nvme {
                command,
                status: Status::INVALID_NAMESPACE.with_dnr(),
            });
        }
        NamespaceInfo::from_identify(nsid, &id)
    }

    async fn read(&self, nsid: Nsid, slba: u64, blocks: u32) -> Result<Vec<u8>, HostError> {
        let ns = self.namespace_info(nsid, "Read").await?;
        check_request("Read", nsid, slba, u64::from(blocks))?;
        let bs = ns.block_size as usize;
        let total = (blocks as usize)
            .checked_mul(bs)
            .ok_or_else(|| HostError::InvalidArgument(format!("{blocks} blocks do not fit in memory")))?;
        let max = command::max_blocks(self.max_transfer(), ns.block_size);
        let mut out = vec![0u8; total];
        let parts: Vec<(u64, u32, u64)> = command::split_blocks(slba, u64::from(blocks), max).collect();
        for batch in parts.chunks(BATCH) {
            let futs = batch
                .iter()
                .map(|&(lba, n, done)| async move {
                    let op = Op::read(nsid, lba, n, ns.block_size)?;
                    let reply = self.run(&op, None).await?;
                    Ok::<_, HostError>((done, reply))
                })
                .collect();
            for r in exec::join_all(futs).await {
                let (done, reply) = r?;
                let data = reply_data(&reply);
                let off = done as usize * bs;
                out[off..off + data.len()].copy_from_slice(data);
            }
        }
        Ok(out)
    }

    async fn read_into(&self, nsid: Nsid, slba: u64, buf: &mut IoBuf) -> Result<(), HostError> {
        let ns = self.namespace_info(nsid, "Read").await?;
        let blocks = command::blocks_in(buf.len(), ns.block_size)?;
        check_request("Read", nsid, slba, u64::from(blocks))?;
        if blocks > command::max_blocks(self.max_transfer(), ns.block_size) {
            let data = self.read(nsid, slba, blocks).await?;
            return buf.copy_in(&data);
        }
        let op = Op::read(nsid, slba, blocks, ns.block_size)?;
        // `lent` refills `buf` if this future is dropped mid-read.
        let (raw, lent) = buf.lend()?;
        match self.run(&op, Some(raw)).await {
            Ok(reply) => match reply.data {
                Some(data) => lent.restore(data),
                None => Err(HostError::Protocol("Read completed without its data".into())),
            },
            Err(e) => {
                lent.refresh()?;
                Err(e)
            }
        }
    }

    async fn write_from(&self, nsid: Nsid, slba: u64, buf: &mut IoBuf, fua: bool) -> Result<(), HostError> {
        let ns = self.namespace_info(nsid, "Write").await?;
        let blocks = command::blocks_in(buf.len(), ns.block_size)?;
        check_request("Write", nsid, slba, u64::from(blocks))?;
        let max = command::max_blocks(self.max_transfer(), ns.block_size);
        if buf.len() <= transport::INLINE_DATA_MAX || blocks > max {
            // Carried in the capsule, or split into several commands: copied.
            return self.write(nsid, slba, buf, fua).await;
        }
        let op = Op::write_lent(nsid, slba, buf.len(), ns.block_size, fua)?;
        let (raw, lent) = buf.lend_out()?;
        let outcome = self.run_with(&op, Some(raw), true).await;
        let intact = lent.reclaim()?;
        match outcome? {
            Some(_) => Ok(()),
            // Lost with its channel, which flushed the push and so gave the
            // buffer back: re-issued from a copy once reconnected.
            None if intact => self.write(nsid, slba, buf, fua).await,
            None => Err(HostError::Protocol(
                "a write's buffer stayed with the failed channel; the write was not re-issued".into(),
            )),
        }
    }

    async fn write(&self, nsid: Nsid, slba: u64, data: &[u8], fua: bool) -> Result<(), HostError> {
        let ns = self.namespace_info(nsid, "Write").await?;
        let blocks = command::blocks_in(data.len(), ns.block_size)?;
        check_request("Write", nsid, slba, u64::from(blocks))?;
        let bs = ns.block_size as usize;
        let max = command::max_blocks(self.max_transfer(), ns.block_size);
        if blocks <= max {
            // One command: no batch to gather, nothing allocated.
            let op = Op::write(nsid, slba, data, ns.block_size, fua)?;
            return self.run(&op, None).await.map(drop);
        }
        let ops = command::split_blocks(slba, u64::from(blocks), max).map(|(lba, n, done)| {
            let off = done as usize * bs;
            Op::write(nsid, lba, &data[off..off + n as usize * bs], ns.block_size, fua)
        });
        self.run_all(ops).await
    }

    /// Marks generation `generation` lost (once): closes its queues, and has
    /// the supervisor reconnect.
    fn report_lost(&self, generation: u64, reason: &str) {
        let session = {
            let mut st = self.state.lock();
            match &*st {
                ConnState::Connected(s) if s.generation == generation => {
                    let s = s.clone();
                    *st = ConnState::Reconnecting { since: Instant::now() };
                    s
                }
                _ => return,
            }
        };
        tracing::warn!(uri = %self.uri, "connection lost: {reason}; reconnecting");
        session.close();
        self.namespaces.lock().clear();
        self.notify_state();
        self.emit(HostEvent::Disconnected {
            reason: reason.to_string(),
        });
        if let Some(tx) = &*self.lost_tx.lock() {
            let _ = tx.send(generation);
        }
    }

    fn notify_state(&self) {
        self.state_cv.notify_all();
        let waiters = std::mem::take(&mut *self.waiters.lock());
        waiters.into_iter().for_each(Waker::wake);
    }

    fn emit(&self, event: HostEvent) {
        self.subscribers.lock().retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Reconnects after each loss, with backoff, until closed.
    fn supervise(self: Arc<Self>, lost: mpsc::Receiver<u64>) {
        while let Ok(generation) = lost.recv() {
            if generation == STOP {
                return;
            }
            let mut backoff = Duration::from_millis(50);
            let mut attempt = 0u32;
            loop {
                if !matches!(*self.state.lock(), ConnState::Reconnecting { .. }) {
                    break;
                }
                attempt += 1;
                match self.connect_session() {
                    Ok(session) => {
                        let mut st = self.state.lock();
                        if matches!(*st, ConnState::Closed) {
                            drop(st);
                            session.close();
                            return;
                        }
                        let cntlid = session.cntlid;
                        self.last_cntlid.store(u64::from(cntlid), Ordering::Relaxed);
                        *st = ConnState::Connected(session);
                        drop(st);
                        tracing::info!(uri = %self.uri, attempt, cntlid, "reconnected");
                        self.notify_state();
                        self.emit(HostEvent::Reconnected { controller_id: cntlid });
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(uri = %self.uri, attempt, "reconnect failed: {e}");
                        let until = Instant::now() + backoff;
                        let mut st = self.state.lock();
                        while !matches!(*st, ConnState::Closed) && Instant::now() < until {
                            self.state_cv.wait_until(&mut st, until);
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    /// Sends Keep Alive every half KATO; a keep alive that times out means
    /// the I/O unit is gone.
    fn keep_alive_loop(self: Arc<Self>) {
        let period = self.opts.keep_alive / 2;
        loop {
            let session = {
                let until = Instant::now() + period;
                let mut st = self.state.lock();
                while !matches!(*st, ConnState::Closed) && Instant::now() < until {
                    self.state_cv.wait_until(&mut st, until);
                }
                match &*st {
                    ConnState::Closed => return,
                    ConnState::Connected(s) => s.clone(),
                    ConnState::Reconnecting { .. } => continue,
                }
            };
            let deadline = Instant::now() + self.opts.keep_alive.min(self.opts.command_timeout);
            let op = Op::keep_alive();
            let r = exec::block_on(
                session
                    .admin
                    .execute(&op, None, &self.cache, Some(deadline), &self.timer),
            );
            match r {
                Ok(reply) if reply.cqe.status().is_success() => {}
                Ok(reply) => self.report_lost(
                    session.generation,
                    &format!("Keep Alive failed: {}", reply.cqe.status()),
                ),
                Err(ExecError::Timeout { .. }) => self.report_lost(session.generation, "Keep Alive timed out"),
                Err(ExecError::Lost) => self.report_lost(session.generation, "a queue's channel closed"),
                Err(ExecError::Host(e)) => tracing::warn!("Keep Alive not sent: {e}"),
            }
        }
    }

    /// Keeps an Asynchronous Event Request outstanding on every controller
    /// and turns its completions into [`HostEvent`]s.
    fn event_loop(self: Arc<Self>) {
        let mut failed_generation = 0;
        loop {
            let session = {
                let mut st = self.state.lock();
                loop {
                    match &*st {
                        ConnState::Closed => return,
                        ConnState::Connected(s) if s.generation != failed_generation => break s.clone(),
                        _ => self.state_cv.wait(&mut st),
                    }
                }
            };
            let op = Op::async_event_request();
            let r = exec::block_on(session.admin.execute(&op, None, &self.cache, None, &self.timer));
            match r {
                Ok(reply) if reply.cqe.status().is_success() => {
                    let event = AsyncEvent::from_dw0(reply.cqe.dw0);
                    exec::block_on(self.handle_async_event(event));
                }
                Ok(reply) => {
                    tracing::warn!("Asynchronous Event Request refused: {}", reply.cqe.status());
                    failed_generation = session.generation;
                }
                Err(ExecError::Lost) => self.report_lost(session.generation, "a queue's channel closed"),
                Err(ExecError::Timeout { .. }) => {}
                Err(ExecError::Host(e)) => {
                    tracing::warn!("Asynchronous Event Request not sent: {e}");
                    failed_generation = session.generation;
                }
            }
        }
    }

    async fn handle_async_event(&self, event: AsyncEvent) {
        let namespace_notice = event.kind() == Some(AsyncEventType::Notice)
            && event.info == AsyncEvent::NOTICE_NAMESPACE_ATTRIBUTE_CHANGED;
        if !namespace_notice {
            self.emit(HostEvent::AsyncEvent(event));
            return;
        }
        let changed = async {
            let op = Op::get_log_page(LogPageId::ChangedNamespaceList, nvme::log::CHANGED_NAMESPACE_LIST_LEN)?;
            let reply = self.run(&op, None).await?;
            Ok::<_, HostError>(ChangedNamespaceList::decode(reply_data(&reply))?)
        }
        .await;
        match changed {
            Ok(list) => {
                {
                    let mut cache = self.namespaces.lock();
                    if list.overflowed() {
                        cache.clear();
                    }
                    for n in list.nsids() {
                        cache.remove(&n.0);
                    }
                }
                self.emit(HostEvent::NamespacesChanged {
                    nsids: list.nsids().to_vec(),
                    all: list.overflowed(),
                });
            }
            Err(e) => {
                tracing::warn!("reading the Changed Namespace List failed: {e}");
                self.namespaces.lock().clear();
                self.emit(HostEvent::NamespacesChanged {
                    nsids: Vec::new(),
                    all: true,
                });
            }
        }
    }

    fn close(&self) {
        let old = std::mem::replace(&mut *self.state.lock(), ConnState::Closed);
        if let ConnState::Connected(s) = &old {
            s.close();
        }
        self.notify_state();
        if let Some(tx) = self.lost_tx.lock().take() {
            let _ = tx.send(STOP);
        }
        self.subscribers.lock().clear();
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            // The supervisor may be inside a connect attempt (bounded by the
            // connect timeout); it notices the close on its own.
            let supervisor = t.thread().name() == Some("chanio-host-supervisor");
            if t.thread().id() != me && !supervisor {
                let _ = t.join();
            }
        }
        self.timer.stop();
        drop(old);
    }
}

/// Checks a completion: status, and the data a command expects.
fn check_reply(op: &Op<'_>, reply: Reply) -> Result<Reply, HostError> {
    let status = reply.cqe.status();
    if !status.is_success() {
        return Err(HostError::Nvme {
            command: op.name,
            status,
        });
    }
    if let OpData::In(len) = op.data {
        match &reply.data {
            None => return Err(HostError::Protocol(format!("{} completed without its data", op.name))),
            Some(d) if d.len() != len && op.queue == QueueKind::Io => {
                return Err(HostError::Protocol(format!(
                    "{} returned {} bytes instead of {len}",
                    op.name,
                    d.len()
                )))
            }
            Some(_) => {}
        }
    }
    Ok(reply)
}

fn reply_data(reply: &Reply) -> &[u8] {
    reply.data.as_deref().unwrap_or(&[])
}

fn check_request(what: &str, nsid: Nsid, slba: u64, blocks: u64) -> Result<(), HostError> {
    command::check_nsid(nsid, false)?;
    command::check_range(what, slba, blocks, u64::MAX)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use iounit::target::{Target, TargetConfig, DEFAULT_NQN};

    use super::*;

    #[test]
    fn push_tickets_stay_bounded() {
        let target = Target::start(TargetConfig {
            nqn: DEFAULT_NQN.into(),
            listen: vec!["tcp://127.0.0.1:0".into()],
            namespaces: vec!["ram:8MiB".parse().unwrap()],
            allowed_hosts: vec![],
            max_io_queues: 1,
            max_queue_depth: 32,
            workers: 4,
            ..TargetConfig::default()
        })
        .unwrap();
        let host = Host::connect(&target.local_uris()[0], HostOptions::default()).unwrap();
        let data = vec![0x5a; 512 * 1024];
        for _ in 0..16 {
            host.write(Nsid(1), 0, &data, false).unwrap();
        }
        let held = match &*host.handle.inner.state.lock() {
            ConnState::Connected(s) => s.io[0].held_push_tickets(),
            _ => panic!("not connected"),
        };
        assert!(held <= crate::queue::PUSH_BUFFERS, "{held} push tickets held");
        assert_eq!(host.read(Nsid(1), 0, 1024).unwrap(), data);
        host.close();
        target.shutdown();
    }
}
