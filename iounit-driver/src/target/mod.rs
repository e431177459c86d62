//! The I/O-unit target: an NVMe subsystem served over push-push channels.
//!
//! A [`Target`] owns the namespace [`Registry`], one fabric and its
//! listeners. Every accepted channel is one NVMe queue ([`queue`]). It
//! waits in the lobby (no thread of its own) for its first capsule, which
//! must be a Fabrics Connect: that creates a controller (admin queue) or
//! joins one (I/O queue), and the queue goes to one of a fixed set of
//! worker threads (one per CPU by default), each serving many queues.
//! Commands are checked (namespace, range, length, alignment, descriptor)
//! before they touch storage; memory runs on the worker, files on the
//! queue's io_uring, and a backend that may wait on the blocking threads.
//!
//! Controllers keep an admin-queue keep-alive timer: a host silent for
//! longer than its KATO loses its controller, and every channel of it is
//! closed, which frees its buffers and slots. Namespace changes in the
//! registry complete outstanding Asynchronous Event Requests on every
//! controller.
//!
//! Shutdown drains: listeners stop, every queue finishes the command it is
//! running (including the pushes of a write in progress, for a grace
//! period), then its channel closes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use messaging::provider::{FabricError, Listener};
use messaging::{Endpoint, Fabrics, TransportUri};
use parking_lot::Mutex;

use crate::backend::{self, BackendSpec, BlockError, Registry, RegistryEvent};
use crate::nvme::{AsyncEvent, CommandId, Cqe, ErrorLogEntry, Nqn, Status};
use crate::transport;

mod blocking;
mod lobby;
pub mod queue;
mod windows;
mod worker;

pub use crate::transport::DEFAULT_NQN;
/// Most Asynchronous Event Requests a controller holds (AERL + 1).
pub const MAX_AERS: usize = 4;
/// Error log entries kept per controller.
pub const ERROR_LOG_LEN: usize = 64;

/// How a target is set up.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Subsystem NQN hosts must name.
    pub nqn: String,
    /// Listen addresses: `tcp://HOST:PORT` (port 0 picks one).
    pub listen: Vec<String>,
    /// Namespaces, attached as NSID 1, 2, ... in order.
    pub namespaces: Vec<BackendSpec>,
    /// Host NQNs allowed to connect; empty allows any.
    pub allowed_hosts: Vec<String>,
    /// Most I/O queues per controller.
    pub max_io_queues: u16,
    /// Most entries per queue.
    pub max_queue_depth: u16,
    /// Queues served at once. A Connect beyond the limit is refused with
    /// Connect Controller Busy.
    pub workers: usize,
    /// Threads that serve the queues, each many of them; 0 (the default)
    /// is one per CPU.
    pub threads: usize,
    /// Controllers one host NQN may hold at once; an admin Connect beyond
    /// it is refused with Connect Controller Busy, so one host cannot take
    /// every worker.
    pub max_controllers_per_host: usize,
    /// Local users allowed on `shm://` listeners (checked with
    /// `SO_PEERCRED`); by default only the daemon's own user.
    pub shm_access: messaging::provider::shm::ShmAccess,
    /// Connections a `tcp://` listener holds from one source address at
    /// once (queues of every host behind it, and hellos still awaited).
    pub max_connections_per_address: usize,
    /// The serial number controllers report (Identify Controller SN, 1 to
    /// 20 printable ASCII characters); `None` makes a new one at start
    /// ([`crate::identity`] keeps one across restarts).
    pub serial: Option<String>,
    /// Storage windows one host NQN may hold open at once (Window Open
    /// beyond it fails with Window Limit Exceeded).
    pub max_windows_per_host: usize,
    /// Make every file namespace's window a cached extent (a copy of its
    /// blocks, written back at Commit) instead of the file's mapping; it
    /// is one anyway where the device refuses the mapping.
    pub window_file_cache: bool,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            nqn: DEFAULT_NQN.into(),
            listen: vec!["tcp://127.0.0.1:4520".into()],
            namespaces: Vec::new(),
            allowed_hosts: Vec::new(),
            max_io_queues: 8,
            max_queue_depth: 128,
            workers: 256,
            threads: 0,
            max_controllers_per_host: 8,
            shm_access: messaging::provider::shm::ShmAccess::default(),
            max_connections_per_address: 256,
            serial: None,
            max_windows_per_host: 64,
            window_file_cache: false,
        }
    }
}

impl TargetConfig {
    /// Checks the settings; the subsystem NQN, parsed.
    fn check(&self) -> Result<Nqn, TargetError> {
        let cfg = self;
        let nqn = Nqn::new(cfg.nqn.clone()).map_err(|e| TargetError::Config(format!("subsystem NQN: {e}")))?;
        for host in &cfg.allowed_hosts {
            Nqn::new(host.clone()).map_err(|e| TargetError::Config(format!("allowed host {host:?}: {e}")))?;
        }
        if cfg.listen.is_empty() {
            return Err(TargetError::Config("no listen address".into()));
        }
        if cfg.max_queue_depth < 2 || cfg.max_queue_depth > transport::MAX_QUEUE_DEPTH {
            return Err(TargetError::Config(format!(
                "queue depth {} outside 2..={}",
                cfg.max_queue_depth,
                transport::MAX_QUEUE_DEPTH
            )));
        }
        if cfg.workers == 0 {
            return Err(TargetError::Config("workers must be at least 1".into()));
        }
        if cfg.max_io_queues == 0 {
            return Err(TargetError::Config("max I/O queues must be at least 1".into()));
        }
        if cfg.max_connections_per_address == 0 {
            return Err(TargetError::Config("connections per address must be at least 1".into()));
        }
        if cfg.max_controllers_per_host == 0 {
            return Err(TargetError::Config("controllers per host must be at least 1".into()));
        }
        if let Some(sn) = &cfg.serial {
            crate::identity::check_serial(sn).map_err(TargetError::Config)?;
        }
        Ok(nqn)
    }
}

/// Errors starting a target.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A namespace could not be opened.
    #[error("namespace {spec}")]
    Namespace {
        /// The spec.
        spec: String,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// A listener could not start.
    #[error("listener {uri}")]
    Listen {
        /// The address.
        uri: String,
        /// Why.
        #[source]
        source: FabricError,
    },
}

/// Parses a listen or connect URI: `tcp://HOST:PORT`, `rdma://HOST:PORT`,
/// `shm://NAME`, `auto://HOST:PORT` (or `HOST:PORT`).
///
/// # Errors
/// [`FabricError::BadAddress`] for unknown schemes or a missing address.
pub fn parse_uri(uri: &str) -> Result<TransportUri, FabricError> {
    TransportUri::parse(uri)
}

/// Text for a status log page, made when a host reads it.
pub type StatusSource = Arc<dyn Fn() -> String + Send + Sync>;

/// Who sees one namespace: the hosts allowed (all when empty), less the
/// hosts refused.
#[derive(Debug, Default)]
struct Mask {
    allow: Vec<String>,
    deny: Vec<String>,
}

impl Mask {
    fn shows(&self, hostnqn: &str) -> bool {
        !self.deny.iter().any(|h| h == hostnqn) && (self.allow.is_empty() || self.allow.iter().any(|h| h == hostnqn))
    }
}

/// A running I/O-unit target. Clones share it.
#[derive(Clone)]
pub struct Target {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    /// What the SMART / Health log page reports.
    pub(crate) stats: Stats,
    pub(crate) cfg: TargetConfig,
    pub(crate) nqn: Nqn,
    pub(crate) registry: Arc<Registry>,
    /// Owns the fabrics (and their protection domains) for the target's lifetime.
    _fabrics: Fabrics,
    pub(crate) shutdown: AtomicBool,
    /// Queues being served (each holds one of the `workers` slots).
    pub(crate) active_queues: std::sync::atomic::AtomicUsize,
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: AtomicU16,
    threads: Mutex<Vec<JoinHandle<()>>>,
    uris: Vec<String>,
    listeners: Mutex<Vec<Arc<dyn Listener>>>,
    /// Channels waiting for their Connect.
    lobby: Arc<lobby::Lobby>,
    /// The threads that serve the admitted queues.
    workers: std::sync::OnceLock<worker::Workers>,
    /// Where storage calls that may wait run.
    pub(crate) blocking: blocking::Blocking,
    /// Namespace masking: the host NQNs each masked namespace is visible
    /// to (a namespace not named here is visible to every allowed host).
    masks: parking_lot::RwLock<HashMap<u32, Mask>>,
    /// What the vendor log page C0h reports (the daemon's replication).
    pub(crate) replication_status: parking_lot::RwLock<Option<StatusSource>>,
    /// Bumped on every change of `masks`, so that queues can cache what
    /// they looked up.
    pub(crate) mask_generation: std::sync::atomic::AtomicU64,
    /// The serial number controllers report.
    pub(crate) serial: String,
    /// Each namespace's NGUID and UUID (zero, so not reported, when unset).
    namespace_ids: parking_lot::RwLock<HashMap<u32, nvme::NamespaceIds>>,
    /// Every open storage window.
    pub(crate) windows: windows::Windows,
}

impl Target {
    /// Opens the namespaces, starts the listeners and serves.
    ///
    /// # Errors
    /// Bad configuration, a namespace that cannot be opened, a listener that
    /// cannot bind.
    pub fn start(cfg: TargetConfig) -> Result<Target, TargetError> {
        let nqn = cfg.check()?;
        let registry = Registry::new();
        for spec in &cfg.namespaces {
            let backend = backend::open(spec).map_err(|source| TargetError::Namespace {
                spec: spec.to_string(),
                source,
            })?;
            registry
                .attach(None, backend)
                .map_err(|e| TargetError::Config(format!("namespace {spec}: {e}")))?;
        }
        let fabrics = Fabrics::with_tcp_options(messaging::provider::tcp::TcpOptions {
            max_connections_per_address: cfg.max_connections_per_address,
            ..Default::default()
        })
        .with_shm_options(messaging::provider::shm::ShmOptions {
            access: cfg.shm_access.clone(),
            ..Default::default()
        });
        let mut listeners: Vec<Arc<dyn Listener>> = Vec::new();
        let mut uris = Vec::new();
        for uri in &cfg.listen {
            let parsed = parse_uri(uri).map_err(|e| TargetError::Config(e.to_string()))?;
            let listener: Arc<dyn Listener> =
                Arc::from(fabrics.listen(&parsed).map_err(|source| TargetError::Listen {
                    uri: uri.clone(),
                    source,
                })?);
            uris.push(format!("{}://{}", parsed.scheme.as_str(), listener.local_addr()));
            listeners.push(listener);
        }
        let serial = cfg.serial.clone().unwrap_or_else(crate::identity::new_serial);
        let cfg_windows = cfg.max_windows_per_host;
        let shared = Arc::new(Shared {
            cfg,
            nqn,
            registry,
            _fabrics: fabrics,
            shutdown: AtomicBool::new(false),
            active_queues: std::sync::atomic::AtomicUsize::new(0),
            controllers: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
            threads: Mutex::new(Vec::new()),
            uris,
            listeners: Mutex::new(listeners.clone()),
            lobby: lobby::Lobby::new(),
            workers: std::sync::OnceLock::new(),
            blocking: blocking::Blocking::default(),
            masks: parking_lot::RwLock::new(HashMap::new()),
            replication_status: parking_lot::RwLock::new(None),
            mask_generation: std::sync::atomic::AtomicU64::new(0),
            serial,
            namespace_ids: parking_lot::RwLock::new(HashMap::new()),
            stats: Stats::new(),
            windows: windows::Windows::new(cfg_windows),
        });
        let weak = Arc::downgrade(&shared);
        shared.registry.subscribe(move |event| {
            if let Some(shared) = weak.upgrade() {
                shared.namespace_changed(event);
            }
        });
        // The lobby first: the workers end only after it did, so a start
        // that fails half way is undone by a shutdown.
        {
            let s = shared.clone();
            let handle = std::thread::Builder::new()
                .name("iounit-lobby".into())
                .spawn(move || lobby::run(&s, &s.lobby.clone()))
                .map_err(|e| TargetError::Config(format!("cannot start a thread: {e}")))?;
            shared.threads.lock().push(handle);
        }
        let target = Target { shared };
        if let Err(e) = target.start_threads(listeners) {
            target.shutdown();
            return Err(e);
        }
        Ok(target)
    }

    /// Starts the workers and an accept thread per listener.
    fn start_threads(&self, listeners: Vec<Arc<dyn Listener>>) -> Result<(), TargetError> {
        let shared = &self.shared;
        let threads = match shared.cfg.threads {
            0 => worker::default_count(),
            n => n,
        };
        let (workers, handles) = worker::Workers::start(shared, threads)
            .map_err(|e| TargetError::Config(format!("cannot start the workers: {e}")))?;
        let _ = shared.workers.set(workers);
        shared.threads.lock().extend(handles);
        for listener in listeners {
            let s = shared.clone();
            let handle = std::thread::Builder::new()
                .name("iounit-accept".into())
                .spawn(move || accept_loop(s, listener))
                .map_err(|e| TargetError::Config(format!("cannot start a thread: {e}")))?;
            shared.threads.lock().push(handle);
        }
        Ok(())
    }

    /// The addresses hosts connect to, e.g. `tcp://127.0.0.1:4520`.
    pub fn local_uris(&self) -> Vec<String> {
        self.shared.uris.clone()
    }

    /// Masks namespace `nsid`: only the hosts named in `hosts` see it (in
    /// the active namespace list, in Identify, and for I/O, which others
    /// get Invalid Namespace for, as for a namespace that does not exist).
    /// An empty list shows it to every allowed host again. It may be set
    /// before the namespace is attached, so that it never shows unmasked.
    ///
    /// # Errors
    /// [`TargetError::Config`] when a host NQN is malformed.
    pub fn set_namespace_hosts(&self, nsid: u32, hosts: &[String]) -> Result<(), TargetError> {
        self.change_mask(nsid, hosts, |m| m.allow = hosts.to_vec())
    }

    /// Makes the vendor log page C0h (`nvme::ReplicationStatus`) report
    /// what `source` says when a host reads it; without one, hosts get
    /// Invalid Log Page.
    pub fn set_replication_status(&self, source: StatusSource) {
        *self.shared.replication_status.write() = Some(source);
    }

    /// Hides namespace `nsid` from the hosts in `hosts` whatever
    /// [`Target::set_namespace_hosts`] allows (a replicated namespace's
    /// primary refuses the other members' replication connections); an
    /// empty list refuses none.
    ///
    /// # Errors
    /// [`TargetError::Config`] when a host NQN is malformed.
    pub fn set_namespace_refused(&self, nsid: u32, hosts: &[String]) -> Result<(), TargetError> {
        self.change_mask(nsid, hosts, |m| m.deny = hosts.to_vec())
    }

    fn change_mask(&self, nsid: u32, hosts: &[String], change: impl FnOnce(&mut Mask)) -> Result<(), TargetError> {
        for host in hosts {
            Nqn::new(host.clone()).map_err(|e| TargetError::Config(format!("namespace {nsid}: host {host:?}: {e}")))?;
        }
        let mut masks = self.shared.masks.write();
        let mask = masks.entry(nsid).or_default();
        change(mask);
        if mask.allow.is_empty() && mask.deny.is_empty() {
            masks.remove(&nsid);
        }
        self.shared.mask_generation.fetch_add(1, Ordering::AcqRel);
        drop(masks);
        self.shared
            .windows
            .revoke_namespace(nsid, "its namespace's hosts changed");
        Ok(())
    }

    /// Sets the NGUID and UUID namespace `nsid` reports (Identify
    /// Namespace, and the Namespace Identification Descriptor list); it may
    /// be set before the namespace is attached.
    pub fn set_namespace_ids(&self, nsid: u32, ids: nvme::NamespaceIds) {
        self.shared.namespace_ids.write().insert(nsid, ids);
    }

    /// The namespace registry (attach and detach at run time here).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.shared.registry
    }

    /// Number of live controllers (connected hosts).
    pub fn controllers(&self) -> usize {
        self.shared.controllers.lock().len()
    }

    /// Stops accepting, lets every queue finish its in-flight command,
    /// closes every channel and waits for the threads.
    pub fn shutdown(&self) {
        if self.shared.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!("shutting down: draining in-flight commands");
        for l in self.shared.listeners.lock().drain(..) {
            l.shutdown();
        }
        self.shared.lobby.stop();
        if let Some(w) = self.shared.workers.get() {
            w.wake_all();
        }
        loop {
            let handle = self.shared.threads.lock().pop();
            match handle {
                Some(h) => {
                    let _ = h.join();
                }
                None => break,
            }
        }
        self.shared.windows.revoke_all();
        tracing::info!("shut down");
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("uris", &self.shared.uris)
            .field("namespaces", &self.shared.registry.nsids())
            .finish()
    }
}

/// How long an accept waits before it looks at the shutdown flag again. A
/// listener's shutdown wakes it at once; this is only a safety net, kept
/// long so that an idle daemon does not wake up for nothing.
const ACCEPT_WAIT: Duration = Duration::from_secs(1);

fn accept_loop(shared: Arc<Shared>, listener: Arc<dyn Listener>) {
    while !shared.shutdown.load(Ordering::Acquire) {
        let accepted = listener
            .accept(Some(ACCEPT_WAIT))
            .map_err(messaging::Error::from)
            .and_then(|incoming| Endpoint::accept_incoming(incoming, transport::lobby_channel()));
        match accepted {
            Ok(ep) => shared.lobby.enter(ep),
            Err(messaging::Error::Fabric(FabricError::Timeout(_))) => {}
            Err(messaging::Error::Fabric(FabricError::Shutdown)) => break,
            Err(e) => tracing::warn!("refused a connection: {e}"),
        }
    }
}

/// Asynchronous Event Requests held by a controller.
#[derive(Default)]
struct Aers {
    held: VecDeque<CommandId>,
    event_pending: bool,
}

/// One host's controller: its queues, keep-alive timer, events and error log.
/// The subsystem's I/O counters since the daemon started, for the SMART /
/// Health log page: commands accepted for execution (their range checked)
/// and their bytes, and completions with a media error.
#[derive(Debug)]
pub(crate) struct Stats {
    started: Instant,
    read_commands: AtomicU64,
    write_commands: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    media_errors: AtomicU64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            started: Instant::now(),
            read_commands: AtomicU64::new(0),
            write_commands: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            media_errors: AtomicU64::new(0),
        }
    }

    /// A Read or Write of `bytes` taken for execution.
    pub(crate) fn count_io(&self, write: bool, bytes: u64) {
        let (commands, total) = match write {
            true => (&self.write_commands, &self.write_bytes),
            false => (&self.read_commands, &self.read_bytes),
        };
        commands.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A command completed with a media or data integrity error.
    pub(crate) fn count_media_error(&self) {
        self.media_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The page, with `error_entries` for the asking controller's error log.
    pub(crate) fn smart_log(&self, error_entries: u64) -> crate::nvme::SmartLog {
        let load = |c: &AtomicU64| u128::from(c.load(Ordering::Relaxed));
        crate::nvme::SmartLog {
            available_spare: 100,
            spare_threshold: 10,
            data_units_read: crate::nvme::SmartLog::data_units(load(&self.read_bytes)),
            data_units_written: crate::nvme::SmartLog::data_units(load(&self.write_bytes)),
            host_read_commands: load(&self.read_commands),
            host_write_commands: load(&self.write_commands),
            power_on_hours: u128::from(self.started.elapsed().as_secs() / 3600),
            media_errors: load(&self.media_errors),
            error_log_entries: u128::from(error_entries),
            ..crate::nvme::SmartLog::default()
        }
    }
}

pub(crate) struct Controller {
    pub(crate) cntlid: u16,
    pub(crate) hostnqn: String,
    pub(crate) kato: Mutex<Duration>,
    pub(crate) last_seen: Mutex<Instant>,
    pub(crate) io_queues: AtomicU16,
    pub(crate) dead: AtomicBool,
    admin: Mutex<Option<Endpoint>>,
    queues: Mutex<Vec<Endpoint>>,
    /// Held AERs and whether an event waits for one; one lock for both so
    /// an event can never slip between the check and the hold.
    aers: Mutex<Aers>,
    changed: Mutex<Vec<u32>>,
    /// I/O queues of this controller being served (shutdown waits for them).
    pub(crate) io_active: std::sync::atomic::AtomicUsize,
    errors: Mutex<VecDeque<ErrorLogEntry>>,
    error_count: AtomicU64,
}

impl Controller {
    pub(crate) fn touch(&self) {
        *self.last_seen.lock() = Instant::now();
    }

    /// Whether the keep-alive timer expired.
    pub(crate) fn expired(&self) -> Option<Duration> {
        let kato = *self.kato.lock();
        let silent = self.last_seen.lock().elapsed();
        (!kato.is_zero() && silent > kato).then_some(silent)
    }

    pub(crate) fn add_queue(&self, ep: &Endpoint, admin: bool) {
        if admin {
            *self.admin.lock() = Some(ep.clone());
        }
        let mut queues = self.queues.lock();
        // Channels that closed since (a host re-creating an I/O queue) go.
        queues.retain(|q| q.close_reason().is_none());
        queues.push(ep.clone());
    }

    /// Holds an AER, or completes it at once if an event is waiting.
    /// Returns the status to complete with now, if any.
    pub(crate) fn hold_aer(&self, cid: CommandId) -> Option<(Status, u32)> {
        let mut aers = self.aers.lock();
        if std::mem::take(&mut aers.event_pending) {
            return Some((Status::SUCCESS, AsyncEvent::namespace_attribute_changed().to_dw0()));
        }
        if aers.held.len() >= MAX_AERS {
            return Some((Status::ASYNC_EVENT_LIMIT_EXCEEDED, 0));
        }
        aers.held.push_back(cid);
        None
    }

    pub(crate) fn take_changed(&self) -> Vec<u32> {
        std::mem::take(&mut *self.changed.lock())
    }

    pub(crate) fn log_error(&self, qid: u16, cid: CommandId, status: Status) {
        let count = self.error_count.fetch_add(1, Ordering::AcqRel) + 1;
        let mut errors = self.errors.lock();
        if errors.len() >= ERROR_LOG_LEN {
            errors.pop_back();
        }
        errors.push_front(ErrorLogEntry::new(count, qid, cid, status));
    }

    /// Errors logged over the controller's life.
    pub(crate) fn error_count(&self) -> u64 {
        self.error_count.load(Ordering::Acquire)
    }

    pub(crate) fn error_log(&self) -> Vec<ErrorLogEntry> {
        self.errors.lock().iter().cloned().collect()
    }

    fn namespace_changed(&self, nsid: u32) {
        {
            let mut changed = self.changed.lock();
            if !changed.contains(&nsid) {
                changed.push(nsid);
            }
        }
        let admin = self.admin.lock().clone();
        let mut aers = self.aers.lock();
        let Some(cid) = aers.held.pop_front() else {
            aers.event_pending = true;
            return;
        };
        let Some(ep) = admin else {
            aers.held.push_front(cid);
            aers.event_pending = true;
            return;
        };
        let mut cqe = Cqe::new(cid, Status::SUCCESS);
        cqe.dw0 = AsyncEvent::namespace_attribute_changed().to_dw0();
        // Never block the thread that attached or detached the namespace on
        // a host that stopped returning credits: keep the event pending.
        match ep.try_send(&transport::encode_response(&cqe)) {
            Ok(_) => {}
            Err(messaging::Error::WouldBlock) => {
                aers.held.push_front(cid);
                aers.event_pending = true;
            }
            Err(e) => tracing::debug!(cntlid = self.cntlid, "cannot deliver an event: {e}"),
        }
    }

    /// Closes every channel of this controller.
    pub(crate) fn teardown(&self) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        for ep in self.queues.lock().drain(..) {
            ep.close();
        }
        self.admin.lock().take();
    }
}

impl Shared {
    /// Namespace `nsid`'s NGUID and UUID (zero when unset).
    pub(crate) fn namespace_ids(&self, nsid: u32) -> nvme::NamespaceIds {
        self.namespace_ids.read().get(&nsid).copied().unwrap_or_default()
    }

    /// A new controller for `hostnqn`, or `Err(held)` when that host
    /// already holds its `max_controllers_per_host`.
    pub(crate) fn new_controller(&self, hostnqn: &str, kato: Duration) -> Result<Arc<Controller>, usize> {
        let mut ctrls = self.controllers.lock();
        let held = ctrls.values().filter(|c| c.hostnqn == hostnqn).count();
        if held >= self.cfg.max_controllers_per_host {
            return Err(held);
        }
        let cntlid = loop {
            let id = self.next_cntlid.fetch_add(1, Ordering::AcqRel);
            if (1..0xffef).contains(&id) && !ctrls.contains_key(&id) {
                break id;
            }
            if id >= 0xffef {
                self.next_cntlid.store(1, Ordering::Release);
            }
        };
        let ctrl = Arc::new(Controller {
            cntlid,
            hostnqn: hostnqn.to_string(),
            kato: Mutex::new(kato),
            last_seen: Mutex::new(Instant::now()),
            io_queues: AtomicU16::new(self.cfg.max_io_queues),
            dead: AtomicBool::new(false),
            admin: Mutex::new(None),
            queues: Mutex::new(Vec::new()),
            aers: Mutex::new(Aers::default()),
            changed: Mutex::new(Vec::new()),
            io_active: std::sync::atomic::AtomicUsize::new(0),
            errors: Mutex::new(VecDeque::new()),
            error_count: AtomicU64::new(0),
        });
        ctrls.insert(cntlid, ctrl.clone());
        Ok(ctrl)
    }

    pub(crate) fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.controllers.lock().get(&cntlid).cloned()
    }

    pub(crate) fn remove_controller(&self, cntlid: u16) {
        if let Some(c) = self.controllers.lock().remove(&cntlid) {
            c.teardown();
            tracing::info!(cntlid, host = %c.hostnqn, "controller freed");
        }
    }

    pub(crate) fn host_allowed(&self, hostnqn: &str) -> bool {
        self.cfg.allowed_hosts.is_empty() || self.cfg.allowed_hosts.iter().any(|h| h == hostnqn)
    }

    /// Whether namespace `nsid` is visible to `hostnqn` (masking).
    pub(crate) fn visible(&self, nsid: u32, hostnqn: &str) -> bool {
        self.masks.read().get(&nsid).is_none_or(|m| m.shows(hostnqn))
    }

    /// The attached namespaces `hostnqn` sees, in order.
    pub(crate) fn visible_nsids(&self, hostnqn: &str) -> Vec<u32> {
        let masks = self.masks.read();
        let mut nsids = self.registry.nsids();
        nsids.retain(|n| masks.get(n).is_none_or(|m| m.shows(hostnqn)));
        nsids
    }

    fn namespace_changed(&self, event: &RegistryEvent) {
        let nsid = match event {
            RegistryEvent::Detaching(n) => {
                self.windows.revoke_namespace(*n, "its namespace is being detached");
                return;
            }
            RegistryEvent::Attached(n) | RegistryEvent::Detached(n) => *n,
        };
        self.windows.revoke_namespace(nsid, "its namespace changed");
        let ctrls: Vec<Arc<Controller>> = self.controllers.lock().values().cloned().collect();
        for c in ctrls {
            c.namespace_changed(nsid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        assert_eq!(
            parse_uri("tcp://127.0.0.1:4520").unwrap().to_string(),
            "tcp://127.0.0.1:4520"
        );
        assert_eq!(parse_uri("127.0.0.1:1").unwrap().to_string(), "auto://127.0.0.1:1");
        assert!(parse_uri("ftp://x:1").is_err());
        assert!(parse_uri("tcp://").is_err());
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad = |cfg: TargetConfig| Target::start(cfg).unwrap_err().to_string();
        assert!(bad(TargetConfig {
            nqn: "not-an-nqn".into(),
            ..TargetConfig::default()
        })
        .contains("NQN"));
        assert!(bad(TargetConfig {
            listen: vec![],
            ..TargetConfig::default()
        })
        .contains("listen"));
        assert!(bad(TargetConfig {
            listen: vec!["tcp://127.0.0.1:0".into()],
            namespaces: vec![BackendSpec::Ram {
                size: 1000,
                block_size: 512
            }],
            ..TargetConfig::default()
        })
        .contains("namespace"));
    }
}
