//! The shm provider: verbs RC semantics between processes on one host,
//! with data moved by a single memory copy.
//!
//! ```text
//!  client process                                   server process
//!  ──────────────                                   ──────────────
//!  SOCK_SEQPACKET "\0chanio-NAME" ── hello + fds ──▶ listener
//!    (rings memfd, 2 eventfds)     ◀── accept ────
//!  ring 0 (client → server): requests, responses ──▶ server's progress
//!  client's progress ◀── ring 1 (server → client): requests, responses
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
//! Every request is executed by the responder's progress (a waiting caller,
//! or the progress engine when nobody waits, `provider/engine.rs`), which makes
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
//! initiator may then copy a Write's data there itself ([`Placement::place`](crate::provider::Placement::place),
//! checked against the grant; shm is the provider whose
//! [`QueuePair::placement`] is `Some`) and post the Write's notification
//! ([`Placement::post_send_placed`](crate::provider::Placement::post_send_placed)): the responder
//! checks it as any Write, minus the copy, and also that the key still
//! names the memfd the data went into. A gate in the rings' header keeps a
//! closing side's memory its own (`docs/protocol.md` §7b, ADR 5).
//!
//! # Rings and wake-ups
//! One ring per direction in a memfd the client creates (`docs/protocol.md`
//! §7b); an entry is published by the lap in its first word, so the
//! consumer reads one cache line per entry. Each side's progress (a
//! waiting caller or the engine) consumes its incoming ring and sleeps
//! on its eventfd and the socket after setting the ring's
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
use super::engine::{self, Driven, Next, Registration};
use super::handshake::{HelloError, HelloFormat, HELLO_HEADER, KIND_ACCEPT, KIND_HELLO, KIND_REJECT};
use super::responder::{self, Fatal, Refusal, WriteTarget};
use super::{
    Capabilities, Completion, Fabric, FabricError, Incoming, Listener, Notify, QueuePair, RecvWr, RemoteAddr, SendOp,
    SendWr, WcOpcode, WcStatus,
};
use crate::intmap::{IntMap, IntSet};
use crate::mr::{Access, ExternalMemory, MrError, ProtectionDomain, RKey, RegionAllocator, RemoteTarget};
use crate::provider::{flushed_recv, flushed_send};

mod listener;
mod progress;
mod qp;
use listener::*;
use progress::*;
use qp::*;

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
    /// How long a connecting side waits for the listener's answer.
    pub connect_timeout: Duration,
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
            connect_timeout: Duration::from_secs(10),
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

/// Memory in a sealed memfd (its size can never change), mapped shared
/// and read-write, zero-filled: memory owned outside a domain (a RAM
/// namespace, a storage window's cache) that a domain registers in place
/// ([`ProtectionDomain::register_external`](crate::mr::ProtectionDomain::register_external))
/// and that this provider can share with a peer process
/// ([`QueuePair::share_memory`](crate::provider::QueuePair::share_memory)).
pub struct SealedMemory {
    map: Mapping,
    fd: OwnedFd,
    id: u64,
}

impl SealedMemory {
    /// `len` (non-zero) zeroed bytes in a new memfd named `name` (for
    /// `/proc/PID/maps` and the like).
    ///
    /// # Errors
    /// The system's, when the memfd cannot be made, sized, sealed or
    /// mapped.
    pub fn new(name: &str, len: usize) -> std::io::Result<SealedMemory> {
        let fd = sys::sealed_memfd(name, len)?;
        let map = Mapping::new(&fd, len)?;
        Ok(SealedMemory {
            map,
            fd,
            id: crate::mr::memory_id(),
        })
    }
}

impl std::fmt::Debug for SealedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedMemory")
            .field("len", &self.map.len())
            .field("id", &self.id)
            .finish()
    }
}

// SAFETY: one shared mapping of `len` readable and writable bytes of a
// memfd that holds them from offset 0 and is sealed against any change of
// size; unmapped only when this value drops. Bytes have no invalid values,
// and nothing here hands out a reference to them.
unsafe impl ExternalMemory for SealedMemory {
    fn as_ptr(&self) -> NonNull<u8> {
        self.map.ptr()
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn memfd(&self) -> Option<crate::mr::SharedFd<'_>> {
        use std::os::fd::AsFd;
        Some(crate::mr::SharedFd {
            fd: self.fd.as_fd(),
            id: self.id,
        })
    }
}

/// Allocates registrations from sealed memfds, so that peers can map them.
#[derive(Default)]
struct MemfdAllocator {
    live: Mutex<IntMap<u64, (Arc<OwnedFd>, Mapping)>>,
}

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
        // Process-wide, so that a buffer of another fabric (or memory
        // shared by its owner) never matches an export of this one.
        let serial = crate::mr::memory_id();
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
        let msg = self.read_answer(&sock, sent, addr, &peer)?;
        let (kind, body) = parse_hello(&msg).map_err(|e| FabricError::Handshake {
            peer: peer.clone(),
            reason: e.to_string(),
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

impl ShmFabric {
    /// The listener's answer to our hello (`sent` is how sending it went).
    fn read_answer(
        &self,
        sock: &Socket,
        sent: std::io::Result<()>,
        addr: &str,
        peer: &str,
    ) -> Result<sys::Message, FabricError> {
        // A listener that refuses us (ShmAccess) may have answered and
        // closed before our hello went out: its reason is the error then.
        if let Err(e) = sent {
            let deadline = Instant::now() + Duration::from_millis(100);
            return match sock
                .recv_until(HELLO_HEADER + MAX_PARAMS + 1, deadline)
                .map(|m| parse_hello(&m))
            {
                Ok(Ok((KIND_REJECT, why))) => Err(FabricError::Rejected {
                    peer: peer.to_string(),
                    reason: String::from_utf8_lossy(&why).into_owned(),
                }),
                _ => Err(FabricError::Connect {
                    addr: addr.to_string(),
                    source: e,
                }),
            };
        }
        let deadline = Instant::now() + self.opts.connect_timeout;
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
        answer.map_err(|e| FabricError::Handshake {
            peer: peer.to_string(),
            reason: format!("reading the answer: {e}"),
        })
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
fn parse_hello(msg: &sys::Message) -> Result<(u16, Vec<u8>), HelloError> {
    if msg.truncated {
        return Err(HelloError::Oversized { what: HELLO.what });
    }
    HELLO.parse(&msg.bytes).map(|(kind, body)| (kind, body.to_vec()))
}

#[cfg(test)]
mod tests;
