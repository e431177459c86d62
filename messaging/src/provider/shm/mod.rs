//! The shm provider: verbs RC semantics between processes on one host,
//! with data moved by a single memory copy.
//!
//! ```text
//!  client process                                   server process
//!  ──────────────                                   ──────────────
//!  SOCK_SEQPACKET "\0chanio-NAME" ── hello + fds ──▶ listener
//!    (rings memfd, 2 eventfds)     ◀── accept ────
//!  ring 0 (client → server): requests, responses ──▶ progress thread
//!  progress thread ◀── ring 1 (server → client): requests, responses
//!  registrations: memfds, exported over the socket when first used
//! ```
//!
//! # Memory
//! The fabric's [`ProtectionDomain`] takes every registration from a sealed
//! memfd ([`RegionAllocator`]). When a work request first uses a
//! registration on a queue pair, the poster sends its memfd over the socket
//! (`SCM_RIGHTS`, before the request is published), and the peer maps it.
//!
//! # Execution
//! Every request is executed by the responder's progress thread, which makes
//! the one copy: a Send copies from the initiator's mapped buffer (or, for
//! a Send of at most 208 bytes, from the ring, where the initiator put it
//! inline) into the posted receive; an RDMA Write copies from the initiator's buffer into the
//! responder's registration; an RDMA Read copies from the registration into
//! the initiator's buffer. The remote key, bounds and access are checked in
//! the responder's own domain ([`ProtectionDomain::remote_target`]), the
//! same check as tcp's, so a stale or forged key can never reach memory.
//!
//! The responder answers with a cumulative `ACK psn` (which also completes
//! Reads: their data is in place before the ACK is published) or a
//! `NAK psn status` followed by closing the socket.
//!
//! # Placement
//! After a first Write into a registration, the responder grants it to the
//! initiator (`OP_GRANT`: its memfd, exported first, and its range). The
//! initiator may then copy a Write's data there itself ([`QueuePair::place`],
//! checked against the grant) and post a [`SendOp::Placed`]: the responder
//! checks it as any Write, minus the copy, and also that the key still
//! names the memfd the data went into. A gate in the rings' header keeps a
//! closing side's memory its own (`docs/protocol.md` §7b, ADR 5).
//!
//! # Rings and wake-ups
//! One ring per direction in a memfd the client creates (`docs/protocol.md`
//! §7b); an entry is published by the lap in its first word, so the
//! consumer reads one cache line per entry. Each side's progress thread
//! consumes its incoming ring and sleeps
//! in `poll` on its eventfd and the socket after setting the ring's
//! `sleeping` flag; producers ring the eventfd only when that flag is set.
//!
//! # Failure
//! The socket's end of file is the disconnect signal: a process that dies
//! or disconnects closes it, and the peer flushes everything outstanding
//! after executing what was already in its ring.
//!
//! # Addresses
//! `shm://NAME` (or `NAME`) is the abstract Unix socket `\0chanio-NAME`; a
//! name starting with `/` is a filesystem path. `listen("")` picks a unique
//! name. Linux only.

mod ring;
mod sys;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::ring::{Entry, Gate, Ring, MAX_INLINE, RING_BYTES, RING_ENTRIES};
use self::sys::{Mapping, Socket};
use super::cq::CompletionQueue;
use super::drive::{self, Aside, Drive, Woke};
use super::handshake::{HelloFormat, HELLO_HEADER, KIND_ACCEPT, KIND_HELLO, KIND_REJECT};
use super::responder::{self, Refusal, WriteTarget};
use super::{
    Capabilities, Completion, Fabric, FabricError, Incoming, Listener, Notify, QueuePair, RecvWr, RemoteAddr, SendOp,
    SendWr, WcOpcode, WcStatus,
};
use crate::intmap::{IntMap, IntSet};
use crate::mr::{Access, MrError, ProtectionDomain, RKey, RegionAllocator, RemoteTarget};
use crate::provider::{flushed_recv, flushed_send};

/// Hello magic of the shm provider.
pub const HELLO_MAGIC: [u8; 4] = *b"CHSM";
/// Hello version this build speaks.
pub const HELLO_VERSION: u16 = 3;
/// Largest parameter block accepted in a hello.
pub const MAX_PARAMS: usize = 4096;

const HELLO: HelloFormat = HelloFormat {
    magic: HELLO_MAGIC,
    version: HELLO_VERSION,
    max_body: MAX_PARAMS,
    peer: "chanio shm",
    what: "hello",
};

const OP_SEND: u8 = 1;
const OP_SEND_IMM: u8 = 2;
const OP_WRITE: u8 = 3;
const OP_WRITE_IMM: u8 = 4;
const OP_READ: u8 = 5;
const OP_ACK: u8 = 7;
const OP_NAK: u8 = 8;
/// The responder grants the initiator a region to place Writes into
/// itself: `rkey`, `serial` (its memfd, exported first), `addr` (its first
/// address), `offset` (its size).
const OP_GRANT: u8 = 9;

/// How long a closing queue pair waits for the peer to finish a placement
/// into its memory (a copy of microseconds; only a stopped peer is slower).
const PLACEMENT_DRAIN: Duration = Duration::from_secs(1);

const CTL_EXPORT: u8 = 1;
const CTL_UNEXPORT: u8 = 2;
const CTL_BYTES: usize = 16;

/// Entries taken from the ring per batch.
const BATCH: usize = 64;
/// Size of the checked-registrations set at which dead ones are dropped.
const CHECKED_PRUNE_AT: usize = 64;

/// Tunables of the shm provider.
#[derive(Debug, Clone)]
pub struct ShmOptions {
    /// How long handshakes and memfd exports may take.
    pub handshake_timeout: Duration,
    /// Largest message in bytes.
    pub max_message: u32,
    /// Most outstanding send work requests per queue pair (with the peer's,
    /// at most half a ring).
    pub max_send_wr: u32,
    /// Most posted receives per queue pair.
    pub max_recv_wr: u32,
    /// Which local users a listener lets in: checked against the
    /// credentials the kernel recorded for the connecting process
    /// (`SO_PEERCRED`) before anything else. By default only the
    /// listening process's own user.
    pub access: ShmAccess,
}

impl Default for ShmOptions {
    fn default() -> Self {
        ShmOptions {
            handshake_timeout: Duration::from_secs(5),
            max_message: 1 << 30,
            max_send_wr: 1024,
            max_recv_wr: 4096,
            access: ShmAccess::default(),
        }
    }
}

/// The local users allowed to connect to an shm listener: a connecting
/// process is let in when its user ID is listed, or its (primary) group ID
/// is, or `any_user` is set. An abstract socket has no file permissions, so
/// this is the only gate in front of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmAccess {
    /// User IDs let in.
    pub uids: Vec<u32>,
    /// Group IDs let in (the connecting process's primary group).
    pub gids: Vec<u32>,
    /// Let every local user in.
    pub any_user: bool,
}

impl ShmAccess {
    /// Only the user this process runs as (the default).
    pub fn own_user() -> ShmAccess {
        ShmAccess {
            uids: vec![sys::effective_uid()],
            gids: Vec::new(),
            any_user: false,
        }
    }

    /// Whether a process of user `uid` and group `gid` may connect.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.any_user || self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

impl Default for ShmAccess {
    fn default() -> Self {
        ShmAccess::own_user()
    }
}

/// The shm fabric: a memfd-backed protection domain and connection management.
#[derive(Debug, Clone)]
pub struct ShmFabric {
    pd: ProtectionDomain,
    memory: Arc<MemfdAllocator>,
    opts: ShmOptions,
}

impl ShmFabric {
    /// A fabric with default options.
    pub fn new() -> ShmFabric {
        ShmFabric::with_options(ShmOptions::default())
    }

    /// A fabric with the given options (`max_send_wr` is capped to a
    /// quarter of a ring, so that requests and responses always fit).
    pub fn with_options(mut opts: ShmOptions) -> ShmFabric {
        opts.max_send_wr = opts.max_send_wr.clamp(1, (ring::RING_ENTRIES / 4) as u32);
        let memory = Arc::new(MemfdAllocator::default());
        ShmFabric {
            pd: ProtectionDomain::with_allocator(memory.clone()),
            memory,
            opts,
        }
    }
}

impl Default for ShmFabric {
    fn default() -> Self {
        ShmFabric::new()
    }
}

/// Allocates registrations from sealed memfds, so that peers can map them.
#[derive(Default)]
struct MemfdAllocator {
    live: Mutex<IntMap<u64, (Arc<OwnedFd>, Mapping)>>,
}

/// Names memfds process-wide, so that a buffer of another fabric never
/// matches an export of this one.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

impl MemfdAllocator {
    fn fd(&self, serial: u64) -> Option<Arc<OwnedFd>> {
        self.live.lock().get(&serial).map(|(fd, _)| fd.clone())
    }

    fn is_live(&self, serial: u64) -> bool {
        self.live.lock().contains_key(&serial)
    }
}

impl std::fmt::Debug for MemfdAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemfdAllocator")
            .field("live", &self.live.lock().len())
            .finish()
    }
}

// SAFETY: a fresh memfd reads as zeroes; its shared mapping is page-aligned,
// `len` bytes long, and stays mapped (in `live`) until `free` removes it; the
// table is behind a mutex.
unsafe impl RegionAllocator for MemfdAllocator {
    fn allocate(&self, len: usize) -> Result<(NonNull<u8>, u64), MrError> {
        let oom = |_| MrError::OutOfMemory { bytes: len };
        let fd = sys::sealed_memfd("chanio-shm", len).map_err(oom)?;
        let map = Mapping::new(&fd, len).map_err(oom)?;
        let ptr = map.ptr();
        let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(serial, (Arc::new(fd), map));
        Ok((ptr, serial))
    }

    unsafe fn free(&self, _ptr: NonNull<u8>, _len: usize, handle: u64) {
        // Dropping the mapping unmaps it; peers that mapped the memfd keep
        // their own mappings until they see the unexport.
        self.live.lock().remove(&handle);
    }
}

fn socket_name(addr: &str) -> Result<String, FabricError> {
    let name = addr.strip_prefix("shm://").unwrap_or(addr);
    if name.is_empty() || name.contains('\0') || name.len() > 90 {
        return Err(FabricError::BadAddress {
            addr: addr.to_string(),
            reason: "expected shm://NAME (1 to 90 bytes, no NUL)".into(),
        });
    }
    Ok(name.to_string())
}

fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Fabric for ShmFabric {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            immediate_data: true,
            max_message: self.opts.max_message,
            max_send_wr: self.opts.max_send_wr,
            max_recv_wr: self.opts.max_recv_wr,
        }
    }

    fn domain(&self) -> &ProtectionDomain {
        &self.pd
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, FabricError> {
        let name = if addr.is_empty() || addr == "shm://" {
            unique_name()
        } else {
            socket_name(addr)?
        };
        let listen_err = |source| FabricError::Listen {
            addr: addr.to_string(),
            source,
        };
        let sock = Socket::listen(&name).map_err(listen_err)?;
        let wake = sys::eventfd().map_err(listen_err)?;
        tracing::debug!(%name, "shm listener up");
        Ok(Box::new(ShmListener {
            name,
            sock,
            wake,
            shutdown: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            fabric: self.clone(),
        }))
    }

    fn connect(
        &self,
        addr: &str,
        domain: &ProtectionDomain,
        params: &[u8],
        recvs: Vec<RecvWr>,
    ) -> Result<Box<dyn QueuePair>, FabricError> {
        super::check_domain(domain, &self.pd, "shm")?;
        let name = socket_name(addr)?;
        let peer = format!("shm://{name}");
        let conn_err = |source| FabricError::Connect {
            addr: addr.to_string(),
            source,
        };
        if params.len() > MAX_PARAMS {
            return Err(FabricError::Handshake {
                peer,
                reason: format!("local parameters too long ({} bytes)", params.len()),
            });
        }
        let sock = Socket::connect(&name).map_err(conn_err)?;
        let rings_fd = sys::sealed_memfd("chanio-shm-rings", 2 * RING_BYTES).map_err(conn_err)?;
        let rings = Arc::new(Mapping::new(&rings_fd, 2 * RING_BYTES).map_err(conn_err)?);
        let to_server = sys::eventfd().map_err(conn_err)?;
        let to_client = sys::eventfd().map_err(conn_err)?;
        let sent = sock.send(
            &hello_bytes(KIND_HELLO, params),
            &[rings_fd.as_raw_fd(), to_server.as_raw_fd(), to_client.as_raw_fd()],
        );
        // A listener that refuses us (ShmAccess) may have answered and
        // closed before our hello went out: its reason is the error then.
        let deadline = if sent.is_err() {
            Instant::now() + Duration::from_millis(100)
        } else {
            Instant::now() + self.opts.handshake_timeout
        };
        if let Err(e) = sent {
            return match sock
                .recv_until(HELLO_HEADER + MAX_PARAMS + 1, deadline)
                .map(|m| parse_hello(&m))
            {
                Ok(Ok((KIND_REJECT, why))) => Err(FabricError::Rejected {
                    peer,
                    reason: String::from_utf8_lossy(&why).into_owned(),
                }),
                _ => Err(conn_err(e)),
            };
        }
        let answer = match sock.recv_until(HELLO_HEADER + MAX_PARAMS + 1, deadline) {
            // A listener that refused us closed with our hello unread: the
            // reset is reported first, its reject right after.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => sock
                .recv_until(
                    HELLO_HEADER + MAX_PARAMS + 1,
                    Instant::now() + Duration::from_millis(100),
                )
                .map_err(|_| e),
            other => other,
        };
        let msg = answer.map_err(|e| FabricError::Handshake {
            peer: peer.clone(),
            reason: format!("reading the answer: {e}"),
        })?;
        let (kind, body) = parse_hello(&msg).map_err(|reason| FabricError::Handshake {
            peer: peer.clone(),
            reason,
        })?;
        match kind {
            KIND_ACCEPT => {
                let links = Links {
                    sock,
                    rings,
                    tx_base: 0,
                    rx_base: RING_BYTES,
                    wake_peer: to_server,
                    wake_me: to_client,
                };
                start(self.clone(), domain.clone(), links, peer, body, recvs).map(|qp| qp as Box<dyn QueuePair>)
            }
            KIND_REJECT => Err(FabricError::Rejected {
                peer,
                reason: String::from_utf8_lossy(&body).into_owned(),
            }),
            other => Err(FabricError::Handshake {
                peer,
                reason: format!("unexpected hello kind {other} in answer"),
            }),
        }
    }
}

/// The users and groups `access` lets in, for a refusal.
fn describe_access(access: &ShmAccess) -> String {
    if access.any_user {
        return "every user".into();
    }
    let mut parts = Vec::new();
    if !access.uids.is_empty() {
        parts.push(format!("users {:?}", access.uids));
    }
    if !access.gids.is_empty() {
        parts.push(format!("groups {:?}", access.gids));
    }
    if parts.is_empty() {
        "nobody".into()
    } else {
        parts.join(" and ")
    }
}

fn hello_bytes(kind: u16, body: &[u8]) -> Vec<u8> {
    HELLO.encode(kind, body)
}

/// Runs the decoder of an shm hello on `data`: the fuzzing entry point
/// ([`crate::fuzz`]).
pub(crate) fn decode_untrusted(data: &[u8]) {
    let _ = HELLO.parse(data);
}

/// Validates one hello message (one datagram, without its descriptors).
fn parse_hello(msg: &sys::Message) -> Result<(u16, Vec<u8>), String> {
    if msg.truncated {
        return Err("hello message too long (or too many descriptors)".into());
    }
    HELLO.parse(&msg.bytes).map(|(kind, body)| (kind, body.to_vec()))
}

// ---------------------------------------------------------------------------
// Listener

/// A listening shm endpoint.
pub struct ShmListener {
    name: String,
    sock: Socket,
    wake: OwnedFd,
    shutdown: AtomicBool,
    /// Connections whose hello has not arrived yet, with their deadlines.
    pending: Mutex<Vec<(Socket, Instant)>>,
    fabric: ShmFabric,
}

/// Most connections whose hello is still awaited.
const MAX_HANDSHAKES: usize = 64;

impl std::fmt::Debug for ShmListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmListener").field("name", &self.name).finish()
    }
}

impl Listener for ShmListener {
    fn local_addr(&self) -> String {
        // Like tcp's HOST:PORT, the bare address (connect also takes shm://NAME).
        self.name.clone()
    }

    fn accept(&self, timeout: Option<Duration>) -> Result<Box<dyn Incoming>, FabricError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return Err(FabricError::Shutdown);
            }
            self.take_new_connections();
            if let Some(incoming) = self.take_hello() {
                return Ok(Box::new(incoming));
            }
            // Sleep until a connection, a hello, the shutdown or the earliest
            // deadline (the caller's or a pending hello's).
            let now = Instant::now();
            let (mut fds, hello_deadline) = {
                let pending = self.pending.lock();
                let fds: Vec<_> = pending.iter().map(|(s, _)| s.raw()).collect();
                (fds, pending.iter().map(|(_, d)| *d).min())
            };
            fds.extend([self.sock.raw(), self.wake.as_raw_fd()]);
            if deadline.is_some_and(|d| d <= now) {
                return Err(FabricError::Timeout(timeout.unwrap_or_default()));
            }
            let wake_at = match (deadline, hello_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let left = wake_at.map(|at| at.saturating_duration_since(now).max(Duration::from_millis(1)));
            sys::poll(&fds, left).map_err(|source| FabricError::Io { op: "poll", source })?;
        }
    }

    fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        sys::ring_eventfd(&self.wake);
    }
}

impl ShmListener {
    /// Accepts every queued connection into the table of pending hellos.
    fn take_new_connections(&self) {
        loop {
            match self.sock.accept() {
                Ok(conn) => {
                    if !self.admits(&conn) {
                        continue;
                    }
                    let mut pending = self.pending.lock();
                    if pending.len() >= MAX_HANDSHAKES {
                        tracing::warn!(listener = %self.name, "refusing shm connection: {MAX_HANDSHAKES} hellos already pending");
                        continue;
                    }
                    pending.push((conn, Instant::now() + self.fabric.opts.handshake_timeout));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Per-connection errors (ECONNABORTED, EMFILE) must not
                    // stop the listener.
                    tracing::warn!(listener = %self.name, error = %e, "shm accept failed");
                    return;
                }
            }
        }
    }

    /// Whether the process behind `conn` may connect ([`ShmAccess`]); a
    /// refused one gets a reject naming why, and is closed.
    fn admits(&self, conn: &Socket) -> bool {
        let access = &self.fabric.opts.access;
        match conn.peer_cred() {
            Ok(c) if access.allows(c.uid, c.gid) => true,
            Ok(c) => {
                tracing::warn!(
                    listener = %self.name, pid = c.pid, uid = c.uid, gid = c.gid,
                    "refusing shm connection: its user is not allowed here"
                );
                let why = format!(
                    "user {} (group {}) may not connect to shm://{}; the I/O unit lets in {}",
                    c.uid,
                    c.gid,
                    self.name,
                    describe_access(access)
                );
                // A fresh socket's buffer takes one small message at once.
                let _ = conn.send(&hello_bytes(KIND_REJECT, why.as_bytes()), &[]);
                false
            }
            Err(e) => {
                tracing::warn!(listener = %self.name, "refusing shm connection: cannot read its credentials: {e}");
                false
            }
        }
    }

    /// Reads the hellos that arrived; returns the first valid one, refusing
    /// (and logging) bad, closed and timed-out ones. Never blocks.
    fn take_hello(&self) -> Option<ShmIncoming> {
        let mut pending = self.pending.lock();
        let now = Instant::now();
        let mut i = 0;
        while i < pending.len() {
            let outcome = match pending[i].0.try_recv(HELLO_HEADER + MAX_PARAMS + 1) {
                Ok(Some(msg)) => Some(Ok(msg)),
                Ok(None) if pending[i].1 <= now => Some(Err("timed out waiting for the hello".to_string())),
                Ok(None) => None,
                Err(e) => Some(Err(format!("reading hello: {e}"))),
            };
            let Some(outcome) = outcome else {
                i += 1;
                continue;
            };
            let (sock, _) = pending.swap_remove(i);
            match outcome.and_then(|msg| self.handshake(sock, msg)) {
                Ok(incoming) => return Some(incoming),
                Err(reason) => tracing::warn!(listener = %self.name, "refusing shm connection: {reason}"),
            }
        }
        None
    }

    fn handshake(&self, sock: Socket, mut msg: sys::Message) -> Result<ShmIncoming, String> {
        let (kind, params) = parse_hello(&msg)?;
        if kind != KIND_HELLO {
            return Err(format!("unexpected hello kind {kind}"));
        }
        if msg.fds.len() != 3 {
            return Err(format!("hello carries {} descriptors, not 3", msg.fds.len()));
        }
        let to_client = msg.fds.pop().expect("three descriptors");
        let to_server = msg.fds.pop().expect("three descriptors");
        let rings_fd = msg.fds.pop().expect("three descriptors");
        let size = sys::sealed_size(&rings_fd).map_err(|e| format!("ring memfd: {e}"))?;
        if size != 2 * RING_BYTES {
            return Err(format!("ring memfd has {size} bytes, not {}", 2 * RING_BYTES));
        }
        let rings = Arc::new(Mapping::new(&rings_fd, size).map_err(|e| format!("mapping rings: {e}"))?);
        for fd in [&to_client, &to_server] {
            sys::set_nonblocking(fd).map_err(|e| format!("wake-up descriptor: {e}"))?;
        }
        Ok(ShmIncoming {
            links: Links {
                sock,
                rings,
                tx_base: RING_BYTES,
                rx_base: 0,
                wake_peer: to_client,
                wake_me: to_server,
            },
            peer: format!("shm://{} (client)", self.name),
            params,
            fabric: self.fabric.clone(),
        })
    }
}

impl Drop for ShmListener {
    fn drop(&mut self) {
        if self.name.starts_with('/') {
            let _ = std::fs::remove_file(&self.name);
        }
    }
}

/// A connection request whose hello was received and checked.
pub struct ShmIncoming {
    links: Links,
    peer: String,
    params: Vec<u8>,
    fabric: ShmFabric,
}

impl std::fmt::Debug for ShmIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmIncoming").field("peer", &self.peer).finish()
    }
}

impl Incoming for ShmIncoming {
    fn peer_params(&self) -> &[u8] {
        &self.params
    }

    fn peer_addr(&self) -> String {
        self.peer.clone()
    }

    fn fabric(&self) -> &dyn Fabric {
        &self.fabric
    }

    fn accept(
        self: Box<Self>,
        domain: &ProtectionDomain,
        params: &[u8],
        recvs: Vec<RecvWr>,
    ) -> Result<Box<dyn QueuePair>, FabricError> {
        let this = *self;
        super::check_domain(domain, &this.fabric.pd, "shm")?;
        if params.len() > MAX_PARAMS {
            return Err(FabricError::Handshake {
                peer: this.peer,
                reason: format!("local parameters too long ({} bytes)", params.len()),
            });
        }
        let answer = hello_bytes(KIND_ACCEPT, params);
        // Receives are posted (inside `start`) before the answer goes out.
        let qp = start(this.fabric, domain.clone(), this.links, this.peer, this.params, recvs)?;
        let shared = qp.shared.clone();
        shared.links.sock.send(&answer, &[]).map_err(|source| FabricError::Io {
            op: "send shm accept",
            source,
        })?;
        Ok(qp)
    }

    fn reject(self: Box<Self>, reason: &str) {
        let body = &reason.as_bytes()[..reason.len().min(MAX_PARAMS)];
        let _ = self.links.sock.send(&hello_bytes(KIND_REJECT, body), &[]);
    }
}

// ---------------------------------------------------------------------------
// Queue pair

/// What connects a queue pair to its peer.
struct Links {
    sock: Socket,
    rings: Arc<Mapping>,
    tx_base: usize,
    rx_base: usize,
    /// The eventfd the peer's progress thread sleeps on.
    wake_peer: OwnedFd,
    /// The eventfd ours sleeps on.
    wake_me: OwnedFd,
}

struct Shared {
    fabric: ShmFabric,
    /// The connection's protection domain: the peer's remote keys are
    /// looked up here only.
    domain: ProtectionDomain,
    links: Links,
    peer: String,
    peer_params: Vec<u8>,
    state: Mutex<State>,
    cq: CompletionQueue,
    failed: AtomicBool,
    /// The incoming ring and what executing it needs; its holder executes.
    progress: Mutex<Progress>,
    /// Who drives `progress`: waiting callers or the progress thread.
    drive: Drive,
    /// The progress thread sleeps in `poll` on the ring's sleeping flag.
    thread_polling: AtomicBool,
    /// Regions the peer granted for placed Writes, by remote key.
    grants: Mutex<IntMap<u32, Grant>>,
    /// The placement handshake of the outgoing ring (this side places into
    /// the peer's memory) and of the incoming one (the peer places into ours).
    out_gate: Gate,
    in_gate: Gate,
}

/// A region of the peer this side may place Writes into.
struct Grant {
    serial: u64,
    /// The region's first address and size, in the peer's terms.
    base: u64,
    size: u64,
    map: Arc<Mapping>,
}

struct State {
    failed: bool,
    tx: Ring,
    next_psn: u64,
    outstanding: VecDeque<Pending>,
    recvs: VecDeque<RecvWr>,
    /// Memfds (by serial) this side has sent to the peer.
    exported: IntSet<u64>,
    /// Memfds (by serial) found to be live registrations of this fabric
    /// (inline Sends use them without exporting them).
    checked: IntSet<u64>,
    /// Entries being published (kept to reuse its allocation).
    publish: Vec<Entry>,
    /// Their inline data, in order (kept likewise).
    publish_data: Vec<u8>,
    /// Regions granted to the peer (remote key → first address and memfd
    /// serial), so that each is granted once and a placed Write names one
    /// of them.
    granted: IntMap<u32, (u64, u64)>,
}

struct Pending {
    pub(super) psn: u64,
    pub(super) id: super::WrId,
    pub(super) opcode: WcOpcode,
    pub(super) buf: crate::mr::Buf,
    /// A local error to complete with when the queue pair is flushed.
    pub(super) error: Option<WcStatus>,
}

/// A connected shm queue pair.
pub struct ShmQp {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ShmQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmQp")
            .field("peer", &self.shared.peer)
            .field("failed", &self.shared.failed.load(Ordering::Relaxed))
            .finish()
    }
}

fn start(
    fabric: ShmFabric,
    domain: ProtectionDomain,
    links: Links,
    peer: String,
    peer_params: Vec<u8>,
    recvs: Vec<RecvWr>,
) -> Result<Box<ShmQp>, FabricError> {
    let tx = Ring::new(links.rings.clone(), links.tx_base);
    let rx = Ring::new(links.rings.clone(), links.rx_base);
    let out_gate = Gate::new(links.rings.clone(), links.tx_base);
    let in_gate = Gate::new(links.rings.clone(), links.rx_base);
    let drive = Drive::new().map_err(|source| FabricError::Io {
        op: "socketpair",
        source,
    })?;
    let shared = Arc::new(Shared {
        fabric,
        domain,
        links,
        peer,
        peer_params,
        state: Mutex::new(State {
            failed: false,
            tx,
            next_psn: 0,
            outstanding: VecDeque::new(),
            recvs: recvs.into(),
            exported: IntSet::default(),
            checked: IntSet::default(),
            publish: Vec::new(),
            publish_data: Vec::new(),
            granted: IntMap::default(),
        }),
        cq: CompletionQueue::default(),
        failed: AtomicBool::new(false),
        progress: Mutex::new(Progress {
            rx,
            expected_psn: 0,
            maps: IntMap::default(),
            entries: Vec::with_capacity(BATCH),
            completions: Vec::new(),
            grants_out: Vec::new(),
            socket_ready: true,
            socket_failed: None,
            dead: false,
        }),
        drive,
        thread_polling: AtomicBool::new(false),
        grants: Mutex::new(IntMap::default()),
        out_gate,
        in_gate,
    });
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("chanio-shm-qp".into())
        .spawn(move || progress_thread(&thread_shared))
        .map_err(|source| FabricError::Io {
            op: "spawn shm progress thread",
            source,
        })?;
    Ok(Box::new(ShmQp { shared }))
}

impl QueuePair for ShmQp {
    fn post_send(&self, wrs: &mut Vec<SendWr>) -> Result<(), FabricError> {
        let shared = &self.shared;
        let mut st = shared.state.lock();
        if st.failed {
            shared.cq.push_all(wrs.drain(..).map(flushed_send));
            return Ok(());
        }
        let depth = shared.fabric.opts.max_send_wr;
        if st.outstanding.len() + wrs.len() > depth as usize {
            return Err(FabricError::QueueFull { queue: "send", depth });
        }
        let mut entries = std::mem::take(&mut st.publish);
        let mut data = std::mem::take(&mut st.publish_data);
        entries.clear();
        data.clear();
        // Small Sends go inline while the ring stays at most half full, so
        // their extra slots never take the room the depth limits promise
        // to later entries (see `docs/protocol.md` §7b).
        let mut planned = match st.tx.used(RING_ENTRIES / 4) {
            Ok(used) => used,
            Err(_) => RING_ENTRIES,
        };
        let mut local_error: Option<String> = None;
        for wr in wrs.drain(..) {
            let opcode = wr.opcode();
            let id = wr.id;
            if local_error.is_some() {
                st.outstanding.push_back(Pending {
                    psn: u64::MAX,
                    id,
                    opcode,
                    buf: wr.into_buf(),
                    error: None,
                });
                continue;
            }
            match shared.prepare(&mut st, &wr, &mut planned, &mut data) {
                Ok(entry) => {
                    entries.push(entry);
                    let psn = st.next_psn;
                    st.next_psn += 1;
                    st.outstanding.push_back(Pending {
                        psn,
                        id,
                        opcode,
                        buf: wr.into_buf(),
                        error: None,
                    });
                }
                Err((status, reason)) => {
                    // A local error fails the queue pair, as in verbs: the
                    // request completes with its error after every earlier
                    // one, and the rest are flushed.
                    local_error = Some(reason);
                    st.outstanding.push_back(Pending {
                        psn: u64::MAX,
                        id,
                        opcode,
                        buf: wr.into_buf(),
                        error: Some(status),
                    });
                }
            }
        }
        if !entries.is_empty() {
            if let Err(corrupt) = st.tx.push(&entries, &data) {
                local_error = Some(format!("the peer corrupted the ring: {}", corrupt.0));
            } else if st.tx.consumer_sleeping() {
                sys::ring_eventfd(&shared.links.wake_peer);
            }
        }
        st.publish = entries;
        st.publish_data = data;
        if let Some(reason) = local_error {
            shared.fail_locked(&mut st, &reason, true);
        }
        Ok(())
    }

    fn post_recv(&self, wr: RecvWr) -> Result<(), (FabricError, RecvWr)> {
        let shared = &self.shared;
        let mut st = shared.state.lock();
        if st.failed {
            shared.cq.push(flushed_recv(wr));
            return Ok(());
        }
        let depth = shared.fabric.opts.max_recv_wr;
        if st.recvs.len() >= depth as usize {
            return Err((
                FabricError::QueueFull {
                    queue: "receive",
                    depth,
                },
                wr,
            ));
        }
        st.recvs.push_back(wr);
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        self.shared.cq.poll(out, max)
    }

    /// Executes the incoming ring from the calling thread (run to
    /// completion: no thread hop between the peer's request and the
    /// caller) until a completion is ready, `timeout` passes or
    /// [`QueuePair::interrupt`] is called. When another caller drives
    /// already, sleeps on the completion queue.
    fn wait(&self, timeout: Option<Duration>) -> bool {
        self.shared.drive(timeout)
    }

    fn step_away(&self) {
        self.shared.drive.step_away();
    }

    fn interrupt(&self) {
        self.shared.drive.interrupt();
        self.shared.cq.interrupt();
    }

    fn drives_on_wait(&self) -> bool {
        true
    }

    fn set_notify(&self, notify: Option<Notify>) {
        self.shared.cq.set_notify(notify);
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
        let mut st = self.shared.state.lock();
        self.shared.fail_locked(&mut st, "disconnected locally", false);
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.fabric.capabilities()
    }

    /// Copies into a region the peer granted (`OP_GRANT`, sent by the peer
    /// after it executed a first Write into that region): the remote key
    /// and bounds are checked against the grant, as the peer checks a
    /// Write. Under the grants lock, so that failing (which clears them)
    /// waits for a copy in progress. The placement is the memfd serial
    /// copied into, which the peer checks against the region the key names
    /// when the notification comes.
    fn place(&self, remote: RemoteAddr, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Option<u64> {
        let sh = &self.shared;
        let grants = sh.grants.lock();
        if sh.failed.load(Ordering::Acquire) {
            return None;
        }
        let grant = grants.get(&remote.rkey.0)?;
        let start = remote.addr.checked_sub(grant.base);
        let inside = start
            .and_then(|s| s.checked_add(len as u64))
            .is_some_and(|end| end <= grant.size);
        let (Some(start), true) = (start, inside) else {
            return None;
        };
        if !sh.out_gate.begin_placing() {
            return None;
        }
        // SAFETY: the grants lock is held for the borrow, so no other
        // placement from this process reaches the region; the rest of this
        // process touches a peer's memfd only through copies of ranges the
        // peer names in its own requests, and the peer never names memory it
        // granted for Writes (it exposed it to be written). `size` was
        // checked against the mapping when the grant came.
        let placed = match unsafe { grant.map.bytes_mut(start as usize, len) } {
            Some(dest) => {
                fill(dest);
                Some(grant.serial)
            }
            None => None,
        };
        sh.out_gate.end_placing();
        placed
    }
}

impl Drop for ShmQp {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl Shared {
    /// Checks a request locally, exports its memfd if needed and builds its
    /// ring entry (psn `next_psn`). A Send of at most [`MAX_INLINE`] bytes
    /// goes inline, its bytes appended to `data`, if the ring stays at most
    /// half full with `planned` slots in use before it; `planned` counts the
    /// entry's slots.
    fn prepare(
        &self,
        st: &mut State,
        wr: &SendWr,
        planned: &mut u64,
        data: &mut Vec<u8>,
    ) -> Result<Entry, (WcStatus, String)> {
        let (opcode, buf, remote, imm) = match &wr.op {
            SendOp::Placed {
                token,
                remote,
                imm,
                placement,
            } => {
                // The data is in the peer's memory already (`place`): only
                // the notification goes, naming the memfd the data went
                // into (the peer refuses it if the key names another), and
                // the token stays here.
                if token.len() > self.fabric.opts.max_message as usize {
                    return Err((WcStatus::LocalLengthError, "message longer than max_message".into()));
                }
                *planned += 1;
                return Ok(Entry {
                    opcode: if imm.is_some() { OP_WRITE_IMM } else { OP_WRITE },
                    placed: true,
                    len: token.len() as u32,
                    psn: st.next_psn,
                    serial: *placement,
                    addr: remote.addr,
                    rkey: remote.rkey.0,
                    imm: imm.unwrap_or(0),
                    ..Entry::default()
                });
            }
            SendOp::Send { buf, imm } => (if imm.is_some() { OP_SEND_IMM } else { OP_SEND }, buf, None, *imm),
            SendOp::Write { buf, remote, imm } => (
                if imm.is_some() { OP_WRITE_IMM } else { OP_WRITE },
                buf,
                Some(*remote),
                *imm,
            ),
            SendOp::Read { buf, remote } => (OP_READ, buf, Some(*remote), None),
        };
        if buf.len() > self.fabric.opts.max_message as usize {
            return Err((WcStatus::LocalLengthError, "message longer than max_message".into()));
        }
        if opcode == OP_READ && !buf.access().contains(Access::LOCAL_WRITE) {
            return Err((
                WcStatus::LocalProtectionError,
                "RDMA Read into memory without local write".into(),
            ));
        }
        // A memfd already checked is this fabric's and alive (serials are
        // never reused, and the buffer holds its registration), so only a
        // first use asks the allocator, under its process-wide lock. (Every
        // exported memfd was checked first.)
        let (serial, offset) = buf
            .allocation()
            .filter(|(serial, _)| st.checked.contains(serial) || self.check_live(st, *serial))
            .ok_or_else(|| {
                (
                    WcStatus::LocalProtectionError,
                    "buffer not registered in this fabric's domain".to_string(),
                )
            })?;
        if matches!(opcode, OP_SEND | OP_SEND_IMM) && buf.len() <= MAX_INLINE {
            let entry = Entry {
                opcode,
                inline: true,
                len: buf.len() as u32,
                psn: st.next_psn,
                imm: imm.unwrap_or(0),
                ..Entry::default()
            };
            let slots = ring::slots(&entry);
            if *planned + slots <= RING_ENTRIES / 2 {
                *planned += slots;
                data.extend_from_slice(buf);
                return Ok(entry);
            }
        }
        *planned += 1;
        self.export(st, serial).map_err(|reason| (WcStatus::Flushed, reason))?;
        Ok(Entry {
            opcode,
            status: 0,
            inline: false,
            placed: false,
            len: buf.len() as u32,
            psn: st.next_psn,
            serial,
            offset: offset as u64,
            addr: remote.map_or(0, |r| r.addr),
            rkey: remote.map_or(0, |r| r.rkey.0),
            imm: imm.unwrap_or(0),
        })
    }

    /// Whether memfd `serial` is a live registration of this fabric; if so,
    /// remembers it in `checked` (forgetting dead ones once that set grows).
    fn check_live(&self, st: &mut State, serial: u64) -> bool {
        let memory = &self.fabric.memory;
        if !memory.is_live(serial) {
            return false;
        }
        if st.checked.len() >= CHECKED_PRUNE_AT {
            st.checked.retain(|s| memory.is_live(*s));
        }
        st.checked.insert(serial);
        true
    }

    /// Sends memfd `serial` to the peer unless it has it; first tells it to
    /// drop the memfds of registrations that are gone.
    fn export(&self, st: &mut State, serial: u64) -> Result<(), String> {
        if st.exported.contains(&serial) {
            return Ok(());
        }
        let memory = &self.fabric.memory;
        let dead: Vec<u64> = st.exported.iter().copied().filter(|s| !memory.is_live(*s)).collect();
        for s in dead {
            st.exported.remove(&s);
            self.links
                .sock
                .send(&control(CTL_UNEXPORT, s), &[])
                .map_err(|e| format!("unexport: {e}"))?;
        }
        let fd = memory
            .fd(serial)
            .ok_or_else(|| "registration vanished while posted".to_string())?;
        self.links
            .sock
            .send(&control(CTL_EXPORT, serial), &[fd.as_raw_fd()])
            .map_err(|e| format!("export: {e}"))?;
        st.exported.insert(serial);
        Ok(())
    }

    /// Moves the queue pair to the error state: close the socket (the peer
    /// fails too) and flush everything outstanding, in order.
    fn fail_locked(&self, st: &mut State, reason: &str, warn: bool) {
        if st.failed {
            return;
        }
        st.failed = true;
        self.failed.store(true, Ordering::Release);
        // No placement of ours runs after this (`place` holds the lock
        // while it copies), and none of the peer's into this side's memory
        // once the gate is closed: the buffers flushed below, and those the
        // application exposed, are the application's again.
        self.grants.lock().clear();
        if !self.in_gate.close(Instant::now() + PLACEMENT_DRAIN) {
            tracing::error!(
                peer = %self.peer,
                "the peer is still placing data into memory it was granted, {PLACEMENT_DRAIN:?} after the queue pair closed"
            );
        }
        if warn {
            tracing::warn!(peer = %self.peer, "closing shm queue pair: {reason}");
        } else {
            tracing::debug!(peer = %self.peer, "shm queue pair closed: {reason}");
        }
        self.links.sock.shutdown();
        let mut completions: Vec<Completion> = st
            .outstanding
            .drain(..)
            .map(|p| Completion {
                id: p.id,
                status: p.error.unwrap_or(WcStatus::Flushed),
                opcode: p.opcode,
                byte_len: 0,
                imm: None,
                buf: p.buf,
            })
            .collect();
        completions.extend(st.recvs.drain(..).map(flushed_recv));
        self.cq.push_all(completions);
    }
}

/// A cumulative acknowledgement of requests up to `psn`.
fn ack_entry(psn: u64) -> Entry {
    Entry {
        opcode: OP_ACK,
        psn,
        ..Entry::default()
    }
}

fn control(kind: u8, serial: u64) -> [u8; CTL_BYTES] {
    let mut out = [0u8; CTL_BYTES];
    out[0] = kind;
    out[8..].copy_from_slice(&serial.to_le_bytes());
    out
}

// ---------------------------------------------------------------------------
// Progress: driven by waiting callers, or by the progress thread

impl Shared {
    /// One non-blocking round: take exports off the socket if it was
    /// readable, execute everything in the incoming ring, publish. False
    /// once the queue pair failed (everything is flushed by then).
    fn pump(&self, p: &mut Progress) -> bool {
        if p.dead {
            return false;
        }
        loop {
            if p.socket_ready && p.socket_failed.is_none() {
                if let Err(f) = p.drain_socket(self) {
                    p.socket_failed = Some(f);
                }
                p.socket_ready = false;
            }
            let mut entries = std::mem::take(&mut p.entries);
            entries.clear();
            let result = match p.rx.pop(&mut entries, BATCH) {
                Err(corrupt) => Err(violation(format!("ring: {}", corrupt.0))),
                Ok(0) => Ok(()),
                Ok(_) => {
                    let executed = p.process(self, &entries);
                    // Executed (inline data copied out of the ring): the
                    // producer may reuse the slots.
                    p.rx.release();
                    executed
                }
            };
            let more = !entries.is_empty();
            p.entries = entries;
            if let Err(fatal) = result {
                p.fail(self, fatal);
                p.dead = true;
                return false;
            }
            if self.failed.load(Ordering::Acquire) {
                p.dead = true;
                return false;
            }
            if more {
                continue;
            }
            if let Some(fatal) = p.socket_failed.take() {
                // The peer's last entries were published before it closed
                // the socket and have been executed above.
                p.fail(self, fatal);
                p.dead = true;
                return false;
            }
            return true;
        }
    }

    /// The caller side of [`QueuePair::wait`]: see there.
    fn drive(&self, timeout: Option<Duration>) -> bool {
        self.drive.drive(
            &self.progress,
            &self.cq,
            timeout,
            |p| self.pump(p),
            |p, timeout| {
                if p.rx.prepare_sleep() {
                    return Woke::Ready;
                }
                let mut fds = [
                    drive::pollfd(self.links.wake_me.as_raw_fd(), libc::POLLIN),
                    drive::pollfd(self.links.sock.raw(), libc::POLLIN),
                    drive::pollfd(self.drive.kick_fd(), libc::POLLIN),
                ];
                let polled = drive::poll_fds(&mut fds, timeout);
                // The progress thread may sleep in its own poll on the same
                // flag: leave it set for the producer to ring, or nothing
                // would wake that thread once this caller is gone.
                if !self.thread_polling.load(Ordering::SeqCst) {
                    p.rx.woke();
                }
                if fds[0].revents != 0 {
                    sys::drain_eventfd(&self.links.wake_me);
                }
                p.socket_ready |= fds[1].revents != 0;
                match polled {
                    Ok(true) if fds[2].revents != 0 => Woke::Kicked,
                    Ok(true) => Woke::Ready,
                    Ok(false) => Woke::TimedOut,
                    Err(e) => {
                        p.poll_failed(self, &e);
                        Woke::Ready
                    }
                }
            },
        )
    }
}

/// The progress thread: executes the incoming ring whenever no caller
/// drives (an asynchronous application, a peer's traffic nobody waits for).
fn progress_thread(shared: &Shared) {
    shared.drive.register_thread();
    let links = &shared.links;
    let mut aside = Aside::default();
    loop {
        if shared.drive.thread_stands_aside(&shared.failed, &mut aside) {
            continue;
        }
        let round = shared
            .drive
            .thread_round(&shared.progress, &shared.failed, &aside, |p| {
                if !shared.pump(p) {
                    return None;
                }
                let entries_came = p.rx.prepare_sleep();
                shared.thread_polling.store(!entries_came, Ordering::SeqCst);
                Some(entries_came)
            });
        match round {
            // Callers took over.
            None => continue,
            Some(None) => return,
            // Entries arrived meanwhile.
            Some(Some(true)) => continue,
            Some(Some(false)) => {}
        }
        let polled = sys::poll(&[links.wake_me.as_raw_fd(), links.sock.raw()], None);
        let mut p = shared.progress.lock();
        shared.thread_polling.store(false, Ordering::SeqCst);
        p.rx.woke();
        match polled {
            Ok(ready) => {
                if ready[0] {
                    sys::drain_eventfd(&links.wake_me);
                }
                p.socket_ready |= ready[1];
            }
            Err(e) => {
                p.poll_failed(shared, &e);
                return;
            }
        }
    }
}

/// Why processing stopped: a NAK to send first, or just a reason.
struct Fatal {
    reason: String,
    nak: Option<(u64, WcStatus)>,
    warn: bool,
}

fn violation(reason: impl Into<String>) -> Fatal {
    Fatal {
        reason: format!("protocol violation: {}", reason.into()),
        nak: None,
        warn: true,
    }
}

fn nak(psn: u64, status: WcStatus, reason: impl Into<String>) -> Fatal {
    Fatal {
        reason: reason.into(),
        nak: Some((psn, status)),
        warn: true,
    }
}

/// The responder refused request `psn`: the receive it failed (if any)
/// completes, and the peer gets the NAK.
fn refuse(psn: u64, refusal: Refusal, completions: &mut Vec<Completion>) -> Fatal {
    completions.extend(refusal.receive);
    nak(psn, refusal.status, refusal.reason)
}

/// The progress thread's own state: its incoming ring and the peer's memfds.
struct Progress {
    rx: Ring,
    expected_psn: u64,
    maps: IntMap<u64, Arc<Mapping>>,
    entries: Vec<Entry>,
    /// Completions of one batch (kept to reuse its allocation).
    completions: Vec<Completion>,
    /// Grants made while executing a batch, published with its ACK.
    grants_out: Vec<Entry>,
    /// `poll` said the socket is readable: drain it in the next pump.
    socket_ready: bool,
    /// The socket failed (end of file): fail once the ring is executed.
    socket_failed: Option<Fatal>,
    /// The queue pair failed and everything was flushed.
    dead: bool,
}

impl Progress {
    /// `poll` itself failed: the queue pair cannot wait any more.
    fn poll_failed(&mut self, sh: &Shared, e: &std::io::Error) {
        self.fail(
            sh,
            Fatal {
                reason: format!("poll: {e}"),
                nak: None,
                warn: true,
            },
        );
        self.dead = true;
    }

    fn fail(&mut self, sh: &Shared, fatal: Fatal) {
        let mut st = sh.state.lock();
        if let Some((psn, status)) = fatal.nak {
            if !st.failed {
                let entry = Entry {
                    opcode: OP_NAK,
                    status: status.code(),
                    psn,
                    ..Entry::default()
                };
                if st.tx.push(&[entry], &[]).is_ok() && st.tx.consumer_sleeping() {
                    sys::ring_eventfd(&sh.links.wake_peer);
                }
            }
        }
        sh.fail_locked(&mut st, &fatal.reason, fatal.warn);
    }

    /// Takes every queued control message (memfd exports) off the socket;
    /// `Err` once the socket reached end of file.
    fn drain_socket(&mut self, sh: &Shared) -> Result<(), Fatal> {
        loop {
            match sh.links.sock.try_recv(CTL_BYTES + 1) {
                Ok(Some(msg)) => self.handle_control(sh, msg)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    return Err(Fatal {
                        reason: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            "peer closed the connection".into()
                        } else {
                            format!("socket: {e}")
                        },
                        nak: None,
                        warn: false,
                    })
                }
            }
        }
    }

    fn handle_control(&mut self, sh: &Shared, mut msg: sys::Message) -> Result<(), Fatal> {
        if msg.truncated || msg.bytes.len() != CTL_BYTES {
            return Err(violation("malformed control message"));
        }
        let serial = u64::from_le_bytes(msg.bytes[8..16].try_into().expect("8 bytes"));
        match (msg.bytes[0], msg.fds.len()) {
            (CTL_EXPORT, 1) => {
                let fd = msg.fds.pop().expect("one descriptor");
                let size = sys::sealed_size(&fd).map_err(|e| violation(format!("exported memfd: {e}")))?;
                let map = Mapping::new(&fd, size).map_err(|e| violation(format!("mapping exported memfd: {e}")))?;
                self.maps.insert(serial, Arc::new(map));
            }
            (CTL_UNEXPORT, 0) => {
                // The peer's registration is gone: so is any grant of it
                // (a placement already running keeps its mapping alive).
                self.maps.remove(&serial);
                sh.grants.lock().retain(|_, g| g.serial != serial);
            }
            (kind, fds) => return Err(violation(format!("control message {kind} with {fds} descriptors"))),
        }
        Ok(())
    }

    /// The peer's memfd `serial`, waiting for its export if it is not here
    /// yet (the peer sends it before publishing the request).
    fn ensure_mapped(&mut self, sh: &Shared, serial: u64) -> Result<(), Fatal> {
        let deadline = Instant::now() + sh.fabric.opts.handshake_timeout;
        while !self.maps.contains_key(&serial) {
            let msg = sh
                .links
                .sock
                .recv_until(CTL_BYTES + 1, deadline)
                .map_err(|e| violation(format!("request names memfd {serial}, never exported ({e})")))?;
            self.handle_control(sh, msg)?;
        }
        Ok(())
    }

    /// After a first Write into a region: lets the peer place later Writes
    /// into it itself (its memfd exported, an `OP_GRANT` queued for the
    /// batch's publication). Regions of heap memory are not granted. A
    /// registration is a whole memfd ([`MemfdAllocator`]), so the region's
    /// first byte is the memfd's: the peer places at `addr - base`.
    fn grant(&mut self, sh: &Shared, st: &mut State, rkey: u32, target: &RemoteTarget) -> Result<(), String> {
        let Some((serial, base, size)) = target.region_allocation() else {
            return Ok(());
        };
        // Granted already, unless the key now names another registration
        // (a key freed with its region may be drawn again): then granted
        // anew.
        if st.granted.get(&rkey).is_some_and(|&(_, s)| s == serial) {
            return Ok(());
        }
        if st.granted.len() >= CHECKED_PRUNE_AT {
            // Forget grants of regions that are gone.
            let pd = &sh.domain;
            st.granted
                .retain(|k, (b, _)| pd.remote_target(RKey(*k), *b, 0, Access::NONE).is_ok());
        }
        sh.export(st, serial)?;
        st.granted.insert(rkey, (base, serial));
        self.grants_out.push(Entry {
            opcode: OP_GRANT,
            serial,
            offset: size,
            addr: base,
            rkey,
            ..Entry::default()
        });
        Ok(())
    }

    /// The peer granted a region (`OP_GRANT`): map it for `place`.
    fn take_grant(&mut self, sh: &Shared, e: &Entry) -> Result<(), Fatal> {
        self.ensure_mapped(sh, e.serial)?;
        let map = self.maps[&e.serial].clone();
        if e.offset == 0 || e.offset > map.len() as u64 || e.addr.checked_add(e.offset).is_none() {
            return Err(violation(format!(
                "grant of {} bytes at {:#x} in a memfd of {}",
                e.offset,
                e.addr,
                map.len()
            )));
        }
        sh.grants.lock().insert(
            e.rkey,
            Grant {
                serial: e.serial,
                base: e.addr,
                size: e.offset,
                map,
            },
        );
        Ok(())
    }

    fn process(&mut self, sh: &Shared, entries: &[Entry]) -> Result<(), Fatal> {
        let mut st = sh.state.lock();
        if st.failed {
            return Ok(());
        }
        let mut completions = std::mem::take(&mut self.completions);
        let mut ack = None;
        let mut result = Ok(());
        for e in entries {
            let step = match e.opcode {
                _ if e.inline && !matches!(e.opcode, OP_SEND | OP_SEND_IMM) => {
                    Err(violation(format!("inline data on opcode {}", e.opcode)))
                }
                _ if e.placed && !matches!(e.opcode, OP_WRITE | OP_WRITE_IMM) => {
                    Err(violation(format!("placed data on opcode {}", e.opcode)))
                }
                OP_GRANT => self.take_grant(sh, e),
                OP_SEND | OP_SEND_IMM | OP_WRITE | OP_WRITE_IMM | OP_READ => {
                    if e.psn != self.expected_psn {
                        Err(violation(format!("psn {} where {} was due", e.psn, self.expected_psn)))
                    } else {
                        self.expected_psn += 1;
                        self.execute(sh, &mut st, e, &mut completions)
                            .map(|()| ack = Some(e.psn))
                    }
                }
                OP_ACK => complete_acked(&mut st, e.psn, &mut completions),
                OP_NAK => {
                    let status = WcStatus::from_code(e.status)
                        .filter(|s| !s.is_success())
                        .unwrap_or(WcStatus::RemoteOperationError);
                    let acked = if e.psn > 0 {
                        complete_acked(&mut st, e.psn - 1, &mut completions)
                    } else {
                        Ok(())
                    };
                    acked.and_then(|()| {
                        if let Some(p) = st.outstanding.front() {
                            if p.psn == e.psn {
                                let p = st.outstanding.pop_front().expect("front exists");
                                completions.push(Completion {
                                    id: p.id,
                                    status,
                                    opcode: p.opcode,
                                    byte_len: 0,
                                    imm: None,
                                    buf: p.buf,
                                });
                            }
                        }
                        Err(Fatal {
                            reason: format!("peer refused request {}: {status}", e.psn),
                            nak: None,
                            warn: false,
                        })
                    })
                }
                other => Err(violation(format!("unknown opcode {other}"))),
            };
            if let Err(fatal) = step {
                result = Err(fatal);
                break;
            }
        }
        // The acknowledgement is published before the receives complete,
        // so a peer that disconnects on seeing them cannot overtake it;
        // grants go ahead of it (their memfds were exported already).
        if let Some(psn) = ack {
            self.grants_out.push(ack_entry(psn));
            if let Err(corrupt) = st.tx.push(&self.grants_out, &[]) {
                result = Err(violation(format!("the peer corrupted the ring: {}", corrupt.0)));
            } else if st.tx.consumer_sleeping() {
                sys::ring_eventfd(&sh.links.wake_peer);
            }
        }
        self.grants_out.clear();
        sh.cq.push_all(completions.drain(..));
        self.completions = completions;
        drop(st);
        result
    }

    /// Executes one request: the check and the single copy (from the ring
    /// for an inline Send).
    fn execute(
        &mut self,
        sh: &Shared,
        st: &mut State,
        e: &Entry,
        completions: &mut Vec<Completion>,
    ) -> Result<(), Fatal> {
        let len = e.len as usize;
        let offset = usize::try_from(e.offset).map_err(|_| violation("offset out of range"))?;
        match e.opcode {
            OP_SEND | OP_SEND_IMM => {
                let mut wr = responder::accept_send(&mut st.recvs, e.len).map_err(|r| refuse(e.psn, r, completions))?;
                if e.inline {
                    self.rx.inline_data(e, &mut wr.buf.spare_capacity()[..len]);
                } else {
                    if let Err(fatal) = self.ensure_mapped(sh, e.serial) {
                        responder::put_back(&mut st.recvs, Some(wr));
                        return Err(fatal);
                    }
                    let map = &self.maps[&e.serial];
                    if !map.read_into(offset, &mut wr.buf.spare_capacity()[..len]) {
                        responder::put_back(&mut st.recvs, Some(wr));
                        return Err(violation("Send source outside its memfd"));
                    }
                }
                let imm = (e.opcode == OP_SEND_IMM).then_some(e.imm);
                completions.push(responder::send_received(wr, e.len, imm));
            }
            OP_WRITE | OP_WRITE_IMM => {
                if e.placed && !st.granted.contains_key(&e.rkey) {
                    return Err(violation(format!(
                        "placed Write under key {:#x}, never granted",
                        e.rkey
                    )));
                }
                // A placed Write is checked as any Write (the region may
                // have gone since the grant: a remote access error then, as
                // a Write into a deregistered region gets), and must have
                // gone into the memfd of the region the key names now (a
                // key reused after its region died names another one).
                let accepted = responder::accept_write(
                    &sh.domain,
                    &mut st.recvs,
                    RKey(e.rkey),
                    e.addr,
                    len as u64,
                    e.opcode == OP_WRITE_IMM,
                );
                let WriteTarget {
                    mut target,
                    receive: recv,
                } = accepted.map_err(|r| refuse(e.psn, r, completions))?;
                if e.placed && target.region_allocation().map(|(serial, _, _)| serial) != Some(e.serial) {
                    responder::put_back(&mut st.recvs, recv);
                    return Err(nak(
                        e.psn,
                        WcStatus::RemoteAccessError,
                        format!(
                            "placed Write into memfd {}, not the region key {:#x} names",
                            e.serial, e.rkey
                        ),
                    ));
                }
                if !e.placed {
                    let copied = match self.ensure_mapped(sh, e.serial) {
                        Ok(()) => self.maps[&e.serial].read_into(offset, target.as_mut_slice()),
                        Err(fatal) => {
                            responder::put_back(&mut st.recvs, recv);
                            return Err(fatal);
                        }
                    };
                    if !copied {
                        responder::put_back(&mut st.recvs, recv);
                        return Err(violation("Write source outside its memfd"));
                    }
                    if let Err(reason) = self.grant(sh, st, e.rkey, &target) {
                        responder::put_back(&mut st.recvs, recv);
                        return Err(violation(reason));
                    }
                }
                if let Some(wr) = recv {
                    completions.push(responder::write_received(wr, e.len, e.imm));
                }
            }
            _ => {
                let target = responder::accept_read(&sh.domain, RKey(e.rkey), e.addr, len as u64)
                    .map_err(|r| refuse(e.psn, r, completions))?;
                self.ensure_mapped(sh, e.serial)?;
                if !self.maps[&e.serial].write_from(offset, target.as_slice()) {
                    return Err(violation("Read destination outside its memfd"));
                }
            }
        }
        Ok(())
    }
}

/// Completes every outstanding request up to `psn` (inclusive) as executed.
fn complete_acked(st: &mut State, psn: u64, completions: &mut Vec<Completion>) -> Result<(), Fatal> {
    if psn >= st.next_psn {
        return Err(violation(format!("peer acknowledged psn {psn} before it was sent")));
    }
    while st.outstanding.front().is_some_and(|p| p.psn <= psn) {
        let p = st.outstanding.pop_front().expect("front exists");
        completions.push(Completion {
            id: p.id,
            status: WcStatus::Success,
            opcode: p.opcode,
            byte_len: p.buf.len() as u32,
            imm: None,
            buf: p.buf,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
