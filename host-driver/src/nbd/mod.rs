//! An NBD server in front of a [`Host`]: every tool that speaks the Network
//! Block Device protocol (`nbdinfo`, `nbdcopy`, `qemu-img`, QEMU, fio's nbd
//! engine, the kernel's NBD client) reaches chanio namespaces through it.
//!
//! # What it serves
//! - **Exports** are the controller's active namespaces, named by their
//!   namespace ID in decimal (`"1"`, `"2"`, ...); the empty name selects
//!   [`NbdConfig::default_ns`] (default: the first). `NBD_OPT_LIST` lists
//!   them with a description; `NBD_OPT_INFO`/`GO` give the size and the
//!   block sizes: the namespace's block size is the minimum, requests must
//!   be whole blocks, and at most [`NbdConfig::max_payload`] bytes.
//! - **Negotiation**: fixed newstyle, `NBD_OPT_GO`, `INFO`, `LIST`,
//!   `EXPORT_NAME`, `ABORT`, and structured replies (errors then carry the
//!   NVMe status in words). TLS is refused (`NBD_REP_ERR_POLICY`); bind a
//!   unix socket or a trusted address.
//! - **Commands**: read, write (with FUA), flush, trim, write zeroes (FUA
//!   adds a flush) and disconnect, translated one for one into the host's
//!   calls. With [`NbdConfig::windows`], reads go through a read-only
//!   storage window per namespace instead (one-sided RDMA under a steering
//!   tag, as the seed's boot path does), falling back to Read commands
//!   where a namespace cannot be windowed or its window was lost. Replies go out of order as commands complete. A flush covers
//!   every write completed before it on any connection of the bridge (they
//!   share one controller), so multi-conn is advertised.
//!
//! # Threads and memory
//! Each client connection has a reader thread (it parses requests and
//! reads write payloads straight into registered buffers) and a dispatcher
//! thread that runs the commands as tasks of the host's async API, so up to
//! [`NbdConfig::max_in_flight`] of them are in flight per connection. Read
//! data lands in registered buffers and goes to the socket from there:
//! besides the socket copies, nothing is copied. The buffers are reused.
//!
//! # Faults
//! A request the host cannot complete gets an NBD error: NVMe statuses
//! map to `EINVAL`, `ENOSPC`, `EPERM` or `EIO`, and the log names them.
//! When the I/O unit is lost, the host reconnects; requests in flight are
//! re-issued after the reconnect, or fail with `EIO` once
//! [`HostOptions::reconnect_deadline`](crate::HostOptions::reconnect_deadline)
//! has passed: none hangs. A client that breaks the protocol loses its own
//! connection only. A connection must finish its negotiation within
//! [`NbdConfig::handshake_timeout`], a client that stops reading its
//! replies loses its connection after [`NbdConfig::reply_timeout`], and at
//! most [`NbdConfig::max_connections`] are served at once.

mod proto;

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use slab::Slab;

use crate::exec::{self, Spawner};
use crate::{Host, HostError, IoBuf, Nsid};
use proto::{Action, Export, Negotiation, Request, Step};

/// The fuzzing entry point (`fuzz/`, target `nbd`): a client's bytes
/// through the negotiation, then as requests against the export it chose.
/// Never panics, whatever the input.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    proto::fuzz(data);
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address, e.g. `127.0.0.1:10809` (port 0: any free port).
    Tcp(SocketAddr),
    /// A Unix socket path (created with mode 0600; a stale socket there is
    /// replaced).
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = NbdError;

    /// `HOST:PORT` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Listen, NbdError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(NbdError::Listen(format!("{s:?}: unix: needs a path")));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        s.parse().map(Listen::Tcp).map_err(|_| {
            NbdError::Listen(format!(
                "{s:?} is neither HOST:PORT (e.g. 127.0.0.1:10809) nor unix:PATH"
            ))
        })
    }
}

/// How the server serves.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// The namespace the empty export name selects; `None`: the first.
    pub default_ns: Option<Nsid>,
    /// Refuse writes, trims and write zeroes (and say so in the flags).
    pub read_only: bool,
    /// Client connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Requests in flight per connection; the next waits (the socket is
    /// not read meanwhile).
    pub max_in_flight: usize,
    /// The largest read or write, in bytes (the advertised maximum block
    /// size).
    pub max_payload: u32,
    /// The time a connection has to finish its negotiation.
    pub handshake_timeout: Duration,
    /// How long a reply may wait for a client that does not read: past it
    /// the connection closes (a client cannot hold a thread by not reading).
    pub reply_timeout: Duration,
    /// Serve reads through a read-only storage window over each namespace
    /// ([`Host::open_window`], opened at the first read) instead of Read
    /// commands. Writes stay commands; the window sees them once they
    /// completed. A namespace that cannot be windowed, or whose window is
    /// revoked or lost with its connection, is read with commands, and a
    /// new window is tried again after a while.
    pub windows: bool,
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            default_ns: None,
            read_only: false,
            max_connections: 16,
            max_in_flight: 64,
            max_payload: 32 << 20,
            handshake_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(30),
            windows: false,
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// A listen address that cannot be used.
    #[error("listen address {0}")]
    Listen(String),
    /// Binding or accepting failed.
    #[error("{what} {address}")]
    Io {
        /// The step.
        what: &'static str,
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A configuration value out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The default namespace is not active on the controller.
    #[error("namespace {0} is not active on the I/O unit")]
    NoNamespace(u32),
    /// A host call failed while starting.
    #[error(transparent)]
    Host(#[from] HostError),
}

/// An NBD server bound to its address; [`NbdServer::run`] serves.
#[derive(Debug)]
pub struct NbdServer {
    listener: Listener,
    shared: Arc<Shared>,
    uri: String,
}

/// Stops a running [`NbdServer`] from another thread.
#[derive(Debug, Clone)]
pub struct NbdStopper {
    shared: Arc<Shared>,
    wake: Listen,
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

#[derive(Debug)]
struct Shared {
    host: Host,
    config: NbdConfig,
    stopping: AtomicBool,
    /// Live connections (a clone of each socket, to shut it down on stop).
    conns: Mutex<Slab<Stream>>,
    /// With [`NbdConfig::windows`]: each namespace's read window.
    windows: Mutex<HashMap<u32, ReadWindow>>,
}

/// A namespace's read window, for [`NbdConfig::windows`].
#[derive(Debug)]
enum ReadWindow {
    /// A task is opening it; reads meanwhile use commands.
    Opening,
    Open(Arc<crate::Window>),
    /// None could be opened (or the last was lost): commands until then.
    NotBefore(Instant),
}

/// How long reads use commands after a window could not be opened or was
/// lost, before another is tried.
const WINDOW_RETRY: Duration = Duration::from_secs(5);

impl NbdServer {
    /// Binds `listen` for `host`'s namespaces.
    ///
    /// # Errors
    /// [`NbdError::Config`] for zero limits, [`NbdError::NoNamespace`] when
    /// `config.default_ns` is not active, [`NbdError::Io`] when the address
    /// cannot be bound (a Unix socket path in use by a live server
    /// included).
    pub fn bind(host: Host, listen: &Listen, config: NbdConfig) -> Result<NbdServer, NbdError> {
        if config.max_connections == 0 || config.max_in_flight == 0 {
            return Err(NbdError::Config(
                "max_connections and max_in_flight must be at least 1".into(),
            ));
        }
        if config.max_payload < 4096 {
            return Err(NbdError::Config(format!(
                "max_payload {} is below 4096 bytes",
                config.max_payload
            )));
        }
        if let Some(ns) = config.default_ns {
            if !host.namespaces()?.iter().any(|n| n.nsid == ns) {
                return Err(NbdError::NoNamespace(ns.0));
            }
        }
        let (listener, uri) = match listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).map_err(|source| NbdError::Io {
                    what: "binding",
                    address: addr.to_string(),
                    source,
                })?;
                let local = l.local_addr().map_err(|source| NbdError::Io {
                    what: "reading the address of",
                    address: addr.to_string(),
                    source,
                })?;
                if !local.ip().is_loopback() {
                    tracing::warn!("NBD on {local} is open to anyone who reaches it: NBD has no authentication here");
                }
                (Listener::Tcp(l), format!("nbd://{local}"))
            }
            Listen::Unix(path) => {
                let l = bind_unix(path)?;
                (
                    Listener::Unix(l, path.clone()),
                    format!("nbd+unix:///?socket={}", path.display()),
                )
            }
        };
        Ok(NbdServer {
            listener,
            shared: Arc::new(Shared {
                host,
                config,
                stopping: AtomicBool::new(false),
                conns: Mutex::new(Slab::new()),
                windows: Mutex::new(HashMap::new()),
            }),
            uri,
        })
    }

    /// The NBD URI of the default export (`nbd://127.0.0.1:PORT` or
    /// `nbd+unix:///?socket=PATH`); add `/NSID` (or `/NSID?socket=...`) for
    /// another namespace.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A handle that stops [`NbdServer::run`].
    pub fn stopper(&self) -> Result<NbdStopper, NbdError> {
        let wake = match &self.listener {
            Listener::Tcp(l) => Listen::Tcp(l.local_addr().map_err(|source| NbdError::Io {
                what: "reading the address of",
                address: self.uri.clone(),
                source,
            })?),
            Listener::Unix(_, path) => Listen::Unix(path.clone()),
        };
        Ok(NbdStopper {
            shared: self.shared.clone(),
            wake,
        })
    }

    /// Accepts and serves connections until stopped; then closes every
    /// connection and returns once their threads have finished.
    ///
    /// # Errors
    /// [`NbdError::Io`] when accepting fails for a reason other than a
    /// client's (descriptor exhaustion is waited out).
    pub fn run(&self) -> Result<(), NbdError> {
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let result = loop {
            let accepted = match &self.listener {
                Listener::Tcp(l) => l.accept().map(|(s, peer)| {
                    let _ = s.set_nodelay(true);
                    (Stream::Tcp(s), peer.to_string())
                }),
                Listener::Unix(l, path) => l
                    .accept()
                    .map(|(s, _)| (Stream::Unix(s), format!("unix:{}", path.display()))),
            };
            if self.shared.stopping.load(Ordering::Acquire) {
                break Ok(());
            }
            threads.retain(|t| !t.is_finished());
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) if is_transient(&e) => {
                    tracing::warn!("accepting an NBD connection: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(source) => {
                    break Err(NbdError::Io {
                        what: "accepting on",
                        address: self.uri.clone(),
                        source,
                    })
                }
            };
            if threads.len() >= self.shared.config.max_connections {
                tracing::warn!(
                    %peer,
                    "NBD connection refused: {} connections are served already",
                    threads.len()
                );
                continue;
            }
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("chanio-nbd-conn".into())
                .spawn(move || shared.serve(stream, &peer));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::warn!("NBD connection refused: starting its thread: {e}"),
            }
        };
        self.shared.stopping.store(true, Ordering::Release);
        for (_, s) in self.shared.conns.lock().iter() {
            let _ = s.shutdown();
        }
        for t in threads {
            let _ = t.join();
        }
        result
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl NbdStopper {
    /// Makes [`NbdServer::run`] return: it stops accepting and closes every
    /// connection (their requests in flight finish first).
    pub fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        // Wakes the blocked accept.
        match &self.wake {
            Listen::Tcp(addr) => {
                let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
            }
            Listen::Unix(path) => {
                let _ = UnixStream::connect(path);
            }
        }
    }
}

/// Binds a Unix socket at `path`, replacing a stale one, mode 0600.
fn bind_unix(path: &Path) -> Result<UnixListener, NbdError> {
    let io_err = |what, source| NbdError::Io {
        what,
        address: format!("unix:{}", path.display()),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(NbdError::Listen(format!(
                "unix:{}: the path exists and is not a socket",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(NbdError::Listen(format!(
                "unix:{}: another server is listening there",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| io_err("removing the stale socket", e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| io_err("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err("setting the mode of", e))?;
    Ok(l)
}

/// Accept errors that say nothing about the listener itself.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12)) // ENFILE, EMFILE, ENOBUFS, ENOMEM
}

/// A client's socket.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_by(stream: &mut Stream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the negotiation took too long"));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the negotiation took too long"))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes every slice, with as few system calls as the socket allows.
fn write_all(stream: &mut Stream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Shared {
    /// Namespace `ns`'s read window, opened here the first time (with
    /// [`NbdConfig::windows`]); `None`: read with commands.
    async fn read_window(&self, export: &Export) -> Option<Arc<crate::Window>> {
        if !self.config.windows {
            return None;
        }
        let ns = export.nsid;
        {
            let mut windows = self.windows.lock();
            match windows.get(&ns.0) {
                Some(ReadWindow::Open(w)) => return Some(w.clone()),
                Some(ReadWindow::Opening) => return None,
                Some(ReadWindow::NotBefore(t)) if Instant::now() < *t => return None,
                _ => {
                    windows.insert(ns.0, ReadWindow::Opening);
                }
            }
        }
        let blocks = export.size / u64::from(export.block_size.max(1));
        let blocks = u32::try_from(blocks).unwrap_or(u32::MAX);
        let opened = self.host.open_window_async(ns, 0, blocks, false).await;
        let mut windows = self.windows.lock();
        match opened {
            Ok(w) => {
                tracing::info!(
                    nsid = ns.0,
                    stag = format_args!("{:#010x}", w.stag().0),
                    "reads go through a window"
                );
                let w = Arc::new(w);
                windows.insert(ns.0, ReadWindow::Open(w.clone()));
                Some(w)
            }
            Err(e) => {
                tracing::info!(nsid = ns.0, "no window, reading by command: {e}");
                windows.insert(ns.0, ReadWindow::NotBefore(Instant::now() + WINDOW_RETRY));
                None
            }
        }
    }

    /// A read through `lost` failed: reads go by command for a while.
    fn window_lost(&self, ns: Nsid, lost: &Arc<crate::Window>) {
        let mut windows = self.windows.lock();
        let gone = match windows.get(&ns.0) {
            Some(ReadWindow::Open(w)) if Arc::ptr_eq(w, lost) => {
                windows.insert(ns.0, ReadWindow::NotBefore(Instant::now() + WINDOW_RETRY))
            }
            _ => None,
        };
        // Closed (a round trip) outside the lock.
        drop(windows);
        drop(gone);
    }

    /// Serves one client connection to its end.
    fn serve(self: Arc<Self>, stream: Stream, peer: &str) {
        // Shared by the writer's clone: every write to this client is bounded.
        let timeout = Some(self.config.reply_timeout).filter(|t| !t.is_zero());
        if let Err(e) = stream.set_write_timeout(timeout) {
            tracing::warn!(%peer, "NBD connection dropped: {e}");
            return;
        }
        let key = match stream.try_clone() {
            Ok(s) => self.conns.lock().insert(s),
            Err(e) => {
                tracing::warn!(%peer, "NBD connection dropped: {e}");
                return;
            }
        };
        // A stop that came before the insert has already swept the list.
        if !self.stopping.load(Ordering::Acquire) {
            self.negotiate_and_serve(stream, peer);
        }
        if let Some(s) = self.conns.lock().try_remove(key) {
            let _ = s.shutdown();
        }
    }

    fn negotiate_and_serve(self: &Arc<Self>, mut stream: Stream, peer: &str) {
        let mut neg = Negotiation::new(self.config.read_only, self.config.max_payload, self.config.default_ns);
        let export = match self.negotiate(&mut stream, &mut neg) {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::info!(%peer, "NBD negotiation ended: {e}");
                return;
            }
        };
        tracing::info!(
            %peer,
            export = %export.name,
            structured = neg.structured(),
            "NBD client connected"
        );
        if let Err(e) = stream.set_read_timeout(None) {
            tracing::warn!(%peer, "NBD connection dropped: {e}");
            return;
        }
        match Connection::start(self.clone(), &stream, export, neg.structured()) {
            Ok(conn) => conn.run(stream, peer),
            Err(e) => tracing::warn!(%peer, "NBD connection dropped: {e}"),
        }
    }

    /// The negotiation phase; `Some(export)` to serve it.
    fn negotiate(
        &self,
        stream: &mut Stream,
        neg: &mut Negotiation,
    ) -> Result<Option<Export>, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + self.config.handshake_timeout;
        stream.write_all(&proto::greeting())?;
        let mut flags = [0u8; 4];
        read_by(stream, &mut flags, deadline)?;
        neg.handle_client_flags(u32::from_be_bytes(flags))?;
        loop {
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            read_by(stream, &mut header, deadline)?;
            let (option, len) = neg.handle_option_header(&header)?;
            let mut data = vec![0u8; len as usize];
            read_by(stream, &mut data, deadline)?;
            let exports = match option {
                proto::OPT_EXPORT_NAME | proto::OPT_LIST | proto::OPT_INFO | proto::OPT_GO => self.exports(),
                _ => Vec::new(),
            };
            match neg.handle_option(option, &data, &exports) {
                Step::Continue(out) => stream.write_all(&out)?,
                Step::Serve(out, export) => {
                    stream.write_all(&out)?;
                    return Ok(Some(export));
                }
                Step::Close(out) => {
                    stream.write_all(&out)?;
                    return Ok(None);
                }
            }
        }
    }

    /// The controller's active namespaces as exports.
    fn exports(&self) -> Vec<Export> {
        match self.host.namespaces() {
            Ok(list) => list
                .into_iter()
                .map(|n| Export {
                    name: n.nsid.0.to_string(),
                    nsid: n.nsid,
                    size: n.bytes(),
                    block_size: n.block_size,
                })
                .collect(),
            Err(e) => {
                tracing::warn!("listing namespaces for an NBD client: {e}");
                Vec::new()
            }
        }
    }
}

/// Registered buffers kept for reuse, at most this many bytes of them.
const POOL_BYTES: usize = 64 << 20;
/// Bytes a connection's reader takes from its socket at once.
const READ_AHEAD: usize = 64 << 10;

/// One client in the transmission phase.
struct Connection {
    shared: Arc<Shared>,
    export: Export,
    structured: bool,
    writer: Mutex<Stream>,
    /// Replies not yet written: a header, and a read's data. The
    /// dispatcher writes them after each round of completions, in one
    /// system call when the socket takes them.
    replies: Mutex<Vec<(Vec<u8>, Option<IoBuf>)>>,
    /// Requests in flight and their data bytes.
    flight: Mutex<(usize, usize)>,
    flight_cv: Condvar,
    /// Free registered buffers, by capacity (powers of two).
    pool: Mutex<Pool>,
}

/// Free registered buffers and the bytes they hold.
#[derive(Default)]
struct Pool {
    free: Vec<IoBuf>,
    bytes: usize,
}

impl Connection {
    fn start(shared: Arc<Shared>, stream: &Stream, export: Export, structured: bool) -> io::Result<Arc<Connection>> {
        let writer = stream.try_clone()?;
        Ok(Arc::new(Connection {
            shared,
            export,
            structured,
            writer: Mutex::new(writer),
            replies: Mutex::new(Vec::new()),
            flight: Mutex::new((0, 0)),
            flight_cv: Condvar::new(),
            pool: Mutex::new(Pool::default()),
        }))
    }

    /// Reads requests until the client disconnects (or breaks the
    /// protocol), with a dispatcher thread running them; returns once every
    /// request has been answered.
    fn run(self: Arc<Self>, mut stream: Stream, peer: &str) {
        let (spawner, mut set) = exec::task_set();
        let conn = self.clone();
        let dispatcher = std::thread::Builder::new().name("chanio-nbd-io".into()).spawn(move || {
            // Each poll runs the requests whose completions came in;
            // their replies then go out together.
            exec::block_on(std::future::poll_fn(|cx| {
                let done = std::future::Future::poll(std::pin::Pin::new(&mut set), cx);
                conn.flush_replies();
                done
            }))
        });
        let dispatcher = match dispatcher {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%peer, "NBD connection dropped: starting its dispatcher: {e}");
                return;
            }
        };
        match self.read_requests(&mut stream, &spawner) {
            Ok(()) => tracing::info!(%peer, "NBD client disconnected"),
            Err(e) => tracing::info!(%peer, "NBD connection closed: {e}"),
        }
        drop(spawner);
        let _ = dispatcher.join();
        let _ = stream.shutdown();
    }

    /// Reads requests through a buffer: the requests a client pipelines
    /// arrive in one read and go to the dispatcher with one wake-up, which
    /// is given before anything that may block (a read from an empty
    /// buffer, waiting for room in flight).
    fn read_requests(self: &Arc<Self>, stream: &mut Stream, spawner: &Spawner) -> io::Result<()> {
        let cfg = &self.shared.config;
        let mut input = io::BufReader::with_capacity(READ_AHEAD, stream);
        loop {
            if input.buffer().len() < proto::REQUEST_LEN {
                spawner.notify();
            }
            let mut header = [0u8; proto::REQUEST_LEN];
            if let Err(e) = input.read_exact(&mut header) {
                return match e.kind() {
                    io::ErrorKind::UnexpectedEof => Ok(()),
                    _ => Err(e),
                };
            }
            let Some(req) = Request::parse(&header) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a request without the request magic",
                ));
            };
            let action = match proto::check(&req, &self.export, cfg.read_only, cfg.max_payload) {
                Ok(Action::Disconnect) => return Ok(()),
                Ok(a) => a,
                Err(refusal) => {
                    discard(&mut input, u64::from(req.payload()))?;
                    tracing::warn!("NBD request refused: {}", refusal.message);
                    let reply = proto::error_reply(self.structured, req.cookie, refusal.errno, &refusal.message);
                    self.send(&reply, &[]);
                    continue;
                }
            };
            if !self.try_admit(action.data_len()) {
                spawner.notify();
                self.admit(action.data_len());
            }
            let buf = match action {
                Action::Write { len, .. } => match self.take_buf(len as usize) {
                    Ok(mut b) => {
                        if input.buffer().len() < len as usize {
                            spawner.notify();
                        }
                        input.read_exact(&mut b)?;
                        Some(b)
                    }
                    Err(e) => {
                        discard(&mut input, u64::from(len))?;
                        self.finish(&req, &action, Err(e));
                        self.flush_replies();
                        continue;
                    }
                },
                _ => None,
            };
            let conn = self.clone();
            spawner.spawn_quietly(Box::pin(async move {
                let outcome = conn.execute(&action, buf).await;
                conn.finish(&req, &action, outcome);
            }));
        }
    }

    /// Runs one request; `Some(buffer)` holds a read's data.
    async fn execute(&self, action: &Action, buf: Option<IoBuf>) -> Result<Option<IoBuf>, HostError> {
        let host = &self.shared.host;
        let ns = self.export.nsid;
        match *action {
            Action::Read { lba, len } => {
                let mut b = self.take_buf(len as usize)?;
                let at = lba * u64::from(self.export.block_size);
                if let Some(w) = self.shared.read_window(&self.export).await {
                    // A window covers at most 2^32 - 1 blocks: reads past
                    // it go by command.
                    if at + u64::from(len) <= w.len() {
                        match w.read_at_async(at, &mut b).await {
                            Ok(()) => return Ok(Some(b)),
                            Err(e) => {
                                // Lost or revoked: this read and the next
                                // ones go by command for a while.
                                tracing::debug!(nsid = ns.0, "window read failed, reading by command: {e}");
                                self.shared.window_lost(ns, &w);
                            }
                        }
                    }
                }
                match host.read_into_async(ns, lba, &mut b).await {
                    Ok(()) => Ok(Some(b)),
                    Err(e) => {
                        self.put_buf(b);
                        Err(e)
                    }
                }
            }
            Action::Write { lba, fua, .. } => {
                let Some(mut b) = buf else {
                    return Err(HostError::Protocol("a write without its data".into()));
                };
                let r = host.write_from_async(ns, lba, &mut b, fua).await;
                self.put_buf(b);
                r.map(|()| None)
            }
            Action::Flush => host.flush_async(ns).await.map(|()| None),
            Action::Trim { blocks: 0, .. }
            | Action::WriteZeroes {
                blocks: 0, fua: false, ..
            } => Ok(None),
            Action::Trim { lba, blocks } => host.trim_async(ns, lba, blocks).await.map(|()| None),
            Action::WriteZeroes { lba, blocks, fua } => {
                if blocks > 0 {
                    host.write_zeroes_async(ns, lba, blocks).await?;
                }
                if fua {
                    host.flush_async(ns).await?;
                }
                Ok(None)
            }
            Action::Disconnect => Ok(None),
        }
    }

    /// Answers a request (the reply is queued for [`Connection::flush_replies`])
    /// and releases what it held.
    fn finish(&self, req: &Request, action: &Action, outcome: Result<Option<IoBuf>, HostError>) {
        match outcome {
            Ok(Some(data)) => {
                let head = proto::ok_reply(self.structured, req.cookie, Some((req.offset, data.len())));
                self.replies.lock().push((head, Some(data)));
            }
            Ok(None) => self
                .replies
                .lock()
                .push((proto::ok_reply(self.structured, req.cookie, None), None)),
            Err(e) => {
                tracing::warn!(
                    export = %self.export.name,
                    "NBD {} of {} bytes at offset {} failed: {e}",
                    action.name(),
                    req.len,
                    req.offset
                );
                let errno = proto::errno(&e, action);
                let reply = proto::error_reply(self.structured, req.cookie, errno, &e.to_string());
                self.replies.lock().push((reply, None));
            }
        }
        let mut f = self.flight.lock();
        f.0 -= 1;
        f.1 -= action.data_len();
        self.flight_cv.notify_one();
    }

    /// Whether one more request of `bytes` fits the connection's limits
    /// (one request always fits).
    fn fits(&self, f: &(usize, usize), bytes: usize) -> bool {
        let max_bytes = POOL_BYTES.max(self.shared.config.max_payload as usize);
        f.0 < self.shared.config.max_in_flight && (f.0 == 0 || f.1 + bytes <= max_bytes)
    }

    /// Counts a request of `bytes` in flight if it fits now.
    fn try_admit(&self, bytes: usize) -> bool {
        let mut f = self.flight.lock();
        if !self.fits(&f, bytes) {
            return false;
        }
        f.0 += 1;
        f.1 += bytes;
        true
    }

    /// Waits until a request of `bytes` fits, and counts it in flight.
    fn admit(&self, bytes: usize) {
        let mut f = self.flight.lock();
        while !self.fits(&f, bytes) {
            self.flight_cv.wait(&mut f);
        }
        f.0 += 1;
        f.1 += bytes;
    }

    /// Sends a reply at once; a client that stopped reading loses its
    /// connection.
    fn send(&self, head: &[u8], data: &[u8]) {
        let mut w = self.writer.lock();
        if let Err(e) = write_all(&mut w, &mut [IoSlice::new(head), IoSlice::new(data)]) {
            tracing::debug!("NBD reply not sent: {e}");
            let _ = w.shutdown();
        }
    }

    /// Writes the queued replies, many per system call, and gives their
    /// buffers back.
    fn flush_replies(&self) {
        let replies = std::mem::take(&mut *self.replies.lock());
        if replies.is_empty() {
            return;
        }
        {
            let mut w = self.writer.lock();
            // Linux takes at most 1024 slices per call.
            for batch in replies.chunks(512) {
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
                for (head, data) in batch {
                    slices.push(IoSlice::new(head));
                    if let Some(d) = data {
                        slices.push(IoSlice::new(d));
                    }
                }
                if let Err(e) = write_all(&mut w, &mut slices) {
                    tracing::debug!("NBD replies not sent: {e}");
                    let _ = w.shutdown();
                    break;
                }
            }
        }
        for (_, data) in replies {
            if let Some(d) = data {
                self.put_buf(d);
            }
        }
    }

    /// A registered buffer of `len` bytes, reused when one is free.
    fn take_buf(&self, len: usize) -> Result<IoBuf, HostError> {
        let cap = len.next_power_of_two().max(4096);
        let found = {
            let mut pool = self.pool.lock();
            let i = pool.free.iter().position(|b| b.capacity() == cap);
            i.map(|i| {
                pool.bytes -= cap;
                pool.free.swap_remove(i)
            })
        };
        let mut b = match found {
            Some(b) => b,
            None => self.shared.host.alloc(cap)?,
        };
        b.set_len(len)?;
        Ok(b)
    }

    fn put_buf(&self, b: IoBuf) {
        let mut pool = self.pool.lock();
        if pool.bytes + b.capacity() <= POOL_BYTES {
            pool.bytes += b.capacity();
            pool.free.push(b);
        }
    }
}

/// Reads and drops `len` bytes (a refused write's payload).
fn discard(input: &mut impl Read, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut input.by_ref().take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
