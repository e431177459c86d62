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

mod background;
mod commands;
mod session;
mod window;

use session::*;
pub use window::Window;

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
    /// Every address of the subsystem, `resolved.addr` first: alternates
    /// given after it in the URI (`tcp://A:P,B:P`), tried in turn when a
    /// reconnect to the current one fails.
    addrs: Vec<String>,
    /// The index in `addrs` the current (or last) controller came from.
    current: AtomicUsize,
    /// The namespaces this host has used (known when a connection was
    /// lost): an alternate must show them to be taken.
    used_nsids: Mutex<Vec<u32>>,
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
        let (uri, alternates) = TargetUri::parse_with_alternates(uri)?;
        opts.validate()?;
        let fabrics = Arc::new(Fabrics::new().with_connect_timeout(opts.connect_timeout));
        let candidates = match uri.transport() {
            Transport::Auto => fabrics.auto_candidates(uri.addr()),
            _ => vec![uri.to_transport_uri()],
        };
        let mut last = None;
        for resolved in candidates {
            match Host::connect_via(&uri, resolved.clone(), &alternates, &fabrics, &opts) {
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
        alternates: &[String],
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
        let mut addrs = vec![resolved.addr.clone()];
        addrs.extend(alternates.iter().cloned());
        let inner = Arc::new(Inner {
            uri: uri.clone(),
            resolved,
            addrs,
            current: AtomicUsize::new(0),
            used_nsids: Mutex::new(Vec::new()),
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
        // The first address that answers (the others are alternates).
        let mut first = Err(HostError::Closed);
        for i in 0..inner.addrs.len() {
            inner.current.store(i, Ordering::Relaxed);
            first = inner.connect_session();
            match &first {
                Ok(_) => break,
                Err(e) => tracing::debug!(addr = %inner.addrs[i], "connect failed: {e}"),
            }
        }
        let session = first?;
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

    /// How many controllers this host has connected: 1 after
    /// [`Host::connect`], one more at each reconnect. A caller that must
    /// know its commands all reached one controller incarnation (an I/O
    /// unit that restarted may have lost what the last one stored)
    /// compares it before and after them.
    pub fn connections(&self) -> u64 {
        self.handle.inner.generation.load(Ordering::Acquire)
    }

    /// The transport in use (`"tcp"`).
    pub fn transport(&self) -> &'static str {
        self.handle.inner.resolved.scheme.as_str()
    }

    /// The target URI (with its alternates, if any).
    pub fn uri(&self) -> String {
        let inner = &self.handle.inner;
        let mut uri = inner.uri.to_string();
        for alt in &inner.addrs[1..] {
            uri.push(',');
            uri.push_str(alt);
        }
        uri
    }

    /// The address the current (or last) controller was reached at: the
    /// URI's first, or one of its alternates after a failover.
    pub fn address(&self) -> String {
        let inner = &self.handle.inner;
        inner.addrs[inner.current.load(Ordering::Relaxed) % inner.addrs.len()].clone()
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

    /// The SMART / Health Information log page: the I/O unit's read and
    /// write counters, errors and time powered on.
    ///
    /// # Errors
    /// See [`HostError`].
    pub fn smart_log(&self) -> Result<nvme::SmartLog, HostError> {
        exec::block_on(self.handle.inner.smart_log())
    }

    /// The active namespaces.
    ///
    /// # Errors
    /// See [`HostError`].
    pub fn namespaces(&self) -> Result<Vec<NamespaceInfo>, HostError> {
        exec::block_on(self.handle.inner.namespaces())
    }

    /// The I/O unit's replication status (the vendor log page C0h): each
    /// replicated namespace's role, in-sync set and replicas, as text;
    /// `None` where the I/O unit replicates nothing.
    ///
    /// # Errors
    /// See [`HostError`].
    pub fn replication_status(&self) -> Result<Option<String>, HostError> {
        exec::block_on(self.handle.inner.replication_status())
    }

    /// Identify Namespace of `nsid` (also refreshes the host's cached block
    /// size and capacity).
    ///
    /// # Errors
    /// See [`HostError`].
    pub fn identify_namespace(&self, nsid: Nsid) -> Result<IdentifyNamespace, HostError> {
        exec::block_on(self.handle.inner.identify_namespace(nsid))
    }

    /// The NGUID and UUID of `nsid` (Identify, Namespace Identification
    /// Descriptor list): what stays the same across the I/O unit's
    /// restarts while the same storage backs the namespace.
    ///
    /// # Errors
    /// See [`HostError`].
    pub fn namespace_ids(&self, nsid: Nsid) -> Result<nvme::NamespaceIds, HostError> {
        exec::block_on(self.handle.inner.namespace_ids(nsid))
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
    /// straight from its registered memory: up to what a capsule carries
    /// (4 KiB) in the capsule, gathered after the command by the NIC (over
    /// rdma; tcp and shm copy it as they copy any message), and beyond that
    /// as pushes from the buffer itself, each a slot's size (128 KiB by
    /// default) or less. `buf` is lent to the fabric meanwhile and comes
    /// back with its contents; if the write times out while the fabric
    /// still sends from it, `buf` gets fresh memory (see [`IoBuf`]). Writes
    /// beyond one command's transfer limit are split into several commands
    /// and copied, as by [`Host::write`].
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

#[cfg(test)]
mod tests;
