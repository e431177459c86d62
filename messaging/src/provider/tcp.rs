//! The tcp provider: verbs RC semantics emulated faithfully over TCP.
//!
//! Each queue pair is one TCP connection (`TCP_NODELAY`). Posting threads
//! write their own frames straight to the socket (no thread hop on the send
//! path); frames are read, placed and executed by the thread that waits on
//! the queue pair (run to completion, `provider/drive.rs`: the waiting
//! thread polls the socket itself, so a completion reaches it without a
//! hop) or, when nobody waits, by the queue pair's I/O thread. The socket
//! is non-blocking: whatever does not fit stays queued as owned work
//! requests (no copy) and the waiting thread or the I/O thread finishes it
//! when the socket drains, so a full socket never blocks a poster nor
//! deadlocks two peers sending to each other.
//!
//! # Frames
//! Every frame is a 40-byte little-endian header plus `len` payload bytes:
//!
//! ```text
//!  0      1       2          4        8         16         24      28      32
//!  │opcode│status │reserved=0│len u32 │psn u64  │addr u64  │rkey u32│imm u32│ack u64│ payload…
//! ```
//!
//! Requests (`SEND`, `SEND_IMM`, `WRITE`, `WRITE_IMM`, `READ_REQ`) carry a
//! packet sequence number (psn) counted per direction from 0; the responder
//! checks it is exactly the next one. The responder acknowledges what it
//! executed cumulatively: in the `ack` field of the next frame it writes
//! (the reply usually), or with an explicit `ACK psn` when nothing is about
//! to ride (see `pump` for the rules); `READ_RESP psn` carries read data and
//! acks every earlier request; `NAK psn status` is followed by closing the
//! connection. Send completions are reported when the acknowledgement
//! arrives, after the peer executed the request, as an RC NIC does; a
//! remote access violation thus reaches the sender as a `RemoteAccessError`
//! completion.
//!
//! One-sided writes are placed straight into the registered region after
//! checking key, bounds and access, and Sends into the posted receive
//! buffer. Once a frame's header is known, the rest of its payload is read
//! from the socket directly into that final place, with the next headers
//! read ahead in the same vectored read. Between frames the reader reads
//! ahead at most 16 KiB; payload bytes caught in that read-ahead are copied
//! once, which saves a system call per small frame: of any payload, at most
//! the first 16 KiB can be copied, the rest is always read into place.
//!
//! # Hello
//! `"CHIO" | version u16 | kind u16 | reserved u32 | len u32 | params[len]`,
//! kind 1 = hello (client), 2 = accept, 3 = reject (params hold the reason).
//! The listener validates magic, version, kind and length under a timeout on
//! its own thread per connection, logs a refusal and keeps accepting.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;

use super::cq::CompletionQueue;
use super::drive::{self, Aside, Drive, Woke};
use super::handshake::{AcceptQueue, HelloFormat, Refused, KIND_ACCEPT, KIND_HELLO, KIND_REJECT};
use super::responder::{self, Refusal, WriteTarget};
use super::{
    Capabilities, Completion, Fabric, FabricError, Incoming, Listener, Notify, QueuePair, RecvWr, SendOp, SendWr,
    WcOpcode, WcStatus, WrId,
};
use crate::mr::{Access, Buf, ProtectionDomain, RKey, RemoteTarget};
use crate::provider::{flushed_recv, flushed_send};

/// Hello magic.
pub const HELLO_MAGIC: [u8; 4] = *b"CHIO";
/// Hello version this build speaks.
pub const HELLO_VERSION: u16 = 2;
/// Largest parameter block accepted in a hello.
pub const MAX_PARAMS: usize = 4096;
/// Size of a frame header.
pub const FRAME_HEADER: usize = 40;

const HELLO: HelloFormat = HelloFormat {
    magic: HELLO_MAGIC,
    version: HELLO_VERSION,
    max_body: MAX_PARAMS,
    peer: "chanio",
    what: "hello",
};

const OP_SEND: u8 = 1;
const OP_SEND_IMM: u8 = 2;
const OP_WRITE: u8 = 3;
const OP_WRITE_IMM: u8 = 4;
const OP_READ_REQ: u8 = 5;
const OP_READ_RESP: u8 = 6;
const OP_ACK: u8 = 7;
const OP_NAK: u8 = 8;
const OP_DISCONNECT: u8 = 9;

/// Requests acknowledged at the latest once this many are unacknowledged.
const ACK_EVERY: u64 = 64;
/// Pumps that read nothing an acknowledgement waits through for a ride.
const ACK_IDLE_PUMPS: u32 = 16;
/// Bytes read ahead between frames (headers and small payloads).
pub(crate) const READ_AHEAD: usize = 16 * 1024;
const STAGING: usize = 64 * 1024;
pub(crate) const MAX_IOVECS: usize = 64;
const SOCKET: Token = Token(0);
const WAKE: Token = Token(1);

/// Tunables of the tcp provider.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long a listener waits for a new connection's hello.
    pub handshake_timeout: Duration,
    /// How long `connect` waits for the TCP connection and the peer's answer.
    pub connect_timeout: Duration,
    /// Largest message in bytes.
    pub max_message: u32,
    /// Most outstanding send work requests per queue pair.
    pub max_send_wr: u32,
    /// Most posted receives per queue pair.
    pub max_recv_wr: u32,
    /// Most connections a listener holds from one source address at once,
    /// counted from the TCP accept (hellos still awaited included) until
    /// the queue pair is dropped; one more is answered with a reject.
    pub max_connections_per_address: usize,
    /// Most hellos a listener reads at once (each on its own short-lived
    /// thread). When all are taken, a new connection ends the one that has
    /// waited longest, if that waited over 100 ms.
    pub max_handshakes: usize,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            max_message: 1 << 30,
            max_send_wr: 4096,
            max_recv_wr: 4096,
            max_connections_per_address: 256,
            max_handshakes: 64,
        }
    }
}

/// The tcp fabric: one protection domain and TCP connection management.
#[derive(Debug, Clone)]
pub struct TcpFabric {
    pd: ProtectionDomain,
    opts: TcpOptions,
}

impl TcpFabric {
    /// A fabric with default options.
    pub fn new() -> TcpFabric {
        TcpFabric::with_options(TcpOptions::default())
    }

    /// A fabric with the given options.
    pub fn with_options(opts: TcpOptions) -> TcpFabric {
        TcpFabric {
            pd: ProtectionDomain::new(),
            opts,
        }
    }
}

impl Default for TcpFabric {
    fn default() -> Self {
        TcpFabric::new()
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, FabricError> {
    let bad = |reason: String| FabricError::BadAddress {
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))
}

impl Fabric for TcpFabric {
    fn name(&self) -> &'static str {
        "tcp"
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
        let sa = resolve(addr)?;
        let listen_err = |source| FabricError::Listen {
            addr: addr.to_string(),
            source,
        };
        let std_listener = std::net::TcpListener::bind(sa).map_err(listen_err)?;
        let local = std_listener.local_addr().map_err(listen_err)?;
        std_listener.set_nonblocking(true).map_err(listen_err)?;
        let mut listener = mio::net::TcpListener::from_std(std_listener);
        let poll = Poll::new().map_err(listen_err)?;
        poll.registry()
            .register(&mut listener, SOCKET, Interest::READABLE)
            .map_err(listen_err)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).map_err(listen_err)?);
        let shared = Arc::new(ListenShared {
            handshakes: std::sync::atomic::AtomicUsize::new(0),
            hellos: Mutex::new(VecDeque::new()),
            next_hello: std::sync::atomic::AtomicU64::new(0),
            queue: AcceptQueue::new(MAX_PENDING),
            per_address: Arc::new(Mutex::new(HashMap::new())),
            hellos_per_address: Arc::new(Mutex::new(HashMap::new())),
        });
        let thread = {
            let shared = shared.clone();
            let fabric = self.clone();
            std::thread::Builder::new()
                .name("chanio-tcp-accept".into())
                .spawn(move || accept_loop(poll, listener, shared, fabric))
                .map_err(|source| FabricError::Io {
                    op: "spawn accept thread",
                    source,
                })?
        };
        tracing::debug!(%local, "tcp listener up");
        Ok(Box::new(TcpListener {
            local,
            shared,
            waker,
            thread: Mutex::new(Some(thread)),
        }))
    }

    fn connect(
        &self,
        addr: &str,
        domain: &ProtectionDomain,
        params: &[u8],
        recvs: Vec<RecvWr>,
    ) -> Result<Box<dyn QueuePair>, FabricError> {
        super::check_domain(domain, &self.pd, "tcp")?;
        let sa = resolve(addr)?;
        let peer = format!("tcp://{sa}");
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
        let mut stream = TcpStream::connect_timeout(&sa, self.opts.connect_timeout).map_err(conn_err)?;
        stream.set_nodelay(true).map_err(conn_err)?;
        stream
            .set_read_timeout(Some(self.opts.connect_timeout))
            .map_err(conn_err)?;
        stream.write_all(&hello_bytes(KIND_HELLO, params)).map_err(conn_err)?;
        let (kind, body) =
            read_hello(&mut stream, self.opts.connect_timeout).map_err(|reason| FabricError::Handshake {
                peer: peer.clone(),
                reason,
            })?;
        match kind {
            KIND_ACCEPT => {
                TcpQp::start(self.clone(), domain.clone(), stream, peer, body, recvs).map(|qp| Box::new(qp) as _)
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

fn hello_bytes(kind: u16, body: &[u8]) -> Vec<u8> {
    HELLO.encode(kind, body)
}

/// Runs the decoders of what a tcp peer sends (hello, frame header) on
/// `data`: the fuzzing entry point ([`crate::fuzz`]).
pub(crate) fn decode_untrusted(data: &[u8]) {
    let _ = HELLO.parse(data);
    for chunk in data.chunks_exact(FRAME_HEADER) {
        if let Ok(h) = <&[u8; FRAME_HEADER]>::try_from(chunk) {
            let _ = Header::decode(h);
        }
    }
}

/// Reads and validates one hello message within `timeout`; the error is a
/// reason for logs.
fn read_hello(stream: &mut TcpStream, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
    HELLO.read(stream, timeout)
}

// ---------------------------------------------------------------------------
// Listener

struct ListenShared {
    handshakes: std::sync::atomic::AtomicUsize,
    /// The hellos being read, oldest first, each with a handle on its
    /// socket that ends the read when the hello is evicted.
    hellos: Mutex<VecDeque<PendingHello>>,
    next_hello: std::sync::atomic::AtomicU64,
    queue: AcceptQueue<TcpIncoming>,
    /// Live connections per source address.
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Hellos awaited per source address.
    hellos_per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A hello being read on its handshake thread.
struct PendingHello {
    id: u64,
    peer: SocketAddr,
    since: Instant,
    /// The same socket (a duplicated descriptor), to shut it down.
    handle: TcpStream,
}

/// A handshake's place among those being read (its entry and its count),
/// given back however the handshake ends.
struct HandshakePlace {
    shared: Arc<ListenShared>,
    id: u64,
}

impl Drop for HandshakePlace {
    fn drop(&mut self) {
        self.shared.hellos.lock().retain(|h| h.id != self.id);
        self.shared.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A second handle on `stream`'s socket.
fn stream_handle(stream: &mio::net::TcpStream) -> io::Result<TcpStream> {
    use std::os::fd::{AsFd, OwnedFd};
    let fd: OwnedFd = stream.as_fd().try_clone_to_owned()?;
    Ok(TcpStream::from(fd))
}

/// Every handshake is taken: ends the oldest pending hello if it waited
/// longer than [`HELLO_EVICTABLE_AFTER`] (its thread then reads the end of
/// the stream and goes), so that `peer` gets its turn. Whether it did.
fn evict_oldest_hello(shared: &ListenShared, peer: SocketAddr) -> bool {
    let mut hellos = shared.hellos.lock();
    let Some(oldest) = hellos.front() else {
        return false;
    };
    let waited = oldest.since.elapsed();
    if waited < HELLO_EVICTABLE_AFTER {
        return false;
    }
    let Some(oldest) = hellos.pop_front() else {
        return false;
    };
    tracing::warn!(
        evicted = %oldest.peer, %peer,
        "every handshake taken: closing the hello waiting longest ({} ms) for a new connection",
        waited.as_millis()
    );
    let _ = oldest.handle.shutdown(Shutdown::Both);
    true
}

/// One connection counted against its source address's limit
/// (`TcpOptions::max_connections_per_address`); it goes with the queue
/// pair (or with the hello that never became one).
struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressSlot {
    /// A slot for `ip`, or `None` when it already holds `max`.
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut held = counts.lock();
        let n = held.entry(ip).or_insert(0);
        if *n >= max.max(1) {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.counts.lock();
        if let Some(n) = held.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// A listening tcp endpoint.
pub struct TcpListener {
    local: SocketAddr,
    shared: Arc<ListenShared>,
    waker: Arc<Waker>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener").field("local", &self.local).finish()
    }
}

pub(crate) const MAX_PENDING: usize = 128;
/// A pending hello that waited this long may make room for a new
/// connection when every handshake is taken: a client that means it sends
/// its hello at once, one that trickles bytes (slowloris) loses its place.
const HELLO_EVICTABLE_AFTER: Duration = Duration::from_millis(100);
/// Most hellos awaited from one source address.
pub(crate) const MAX_HANDSHAKES_PER_ADDRESS: usize = 16;

fn accept_loop(mut poll: Poll, listener: mio::net::TcpListener, shared: Arc<ListenShared>, fabric: TcpFabric) {
    let mut events = Events::with_capacity(16);
    while !shared.queue.is_closed() {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "tcp listener poll failed; listener stops");
            break;
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    // Hellos awaited from one address are few: a client
                    // that opens many and says nothing is closed at once,
                    // and cannot take every handshake from others.
                    let Some(hello_slot) =
                        AddressSlot::take(&shared.hellos_per_address, peer.ip(), MAX_HANDSHAKES_PER_ADDRESS)
                    else {
                        tracing::warn!(%peer, "refusing tcp connection: {MAX_HANDSHAKES_PER_ADDRESS} hellos from its address already pending");
                        continue;
                    };
                    // Over its address's limit, the connection is still
                    // read up to its hello and then refused with the
                    // reason (closing it unread would reset it, and the
                    // reason would be lost).
                    let max = fabric.opts.max_connections_per_address;
                    let slot = AddressSlot::take(&shared.per_address, peer.ip(), max);
                    let max_handshakes = fabric.opts.max_handshakes.max(1);
                    if shared.handshakes.load(Ordering::Acquire) >= max_handshakes && !evict_oldest_hello(&shared, peer)
                    {
                        tracing::warn!(%peer, "refusing tcp connection: {max_handshakes} hellos already pending");
                        continue;
                    }
                    let Ok(handle) = stream_handle(&stream) else {
                        tracing::warn!(%peer, "refusing tcp connection: cannot duplicate its descriptor");
                        continue;
                    };
                    shared.handshakes.fetch_add(1, Ordering::AcqRel);
                    let id = shared.next_hello.fetch_add(1, Ordering::Relaxed);
                    shared.hellos.lock().push_back(PendingHello {
                        id,
                        peer,
                        since: Instant::now(),
                        handle,
                    });
                    let for_thread = shared.clone();
                    let fabric = fabric.clone();
                    let spawned = std::thread::Builder::new()
                        .name("chanio-tcp-hello".into())
                        .spawn(move || {
                            let shared = for_thread;
                            let _place = HandshakePlace {
                                shared: shared.clone(),
                                id,
                            };
                            handshake(stream, peer, shared, fabric, slot, id);
                            drop(hello_slot);
                        });
                    if let Err(e) = spawned {
                        shared.hellos.lock().retain(|h| h.id != id);
                        shared.handshakes.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!(%peer, error = %e, "refusing connection: cannot spawn handshake thread");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Per-connection accept errors (ECONNABORTED, EMFILE) must not
                    // stop the listener; back off briefly on resource exhaustion.
                    tracing::warn!(error = %e, "accept failed; listener keeps going");
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
}

fn handshake(
    stream: mio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<ListenShared>,
    fabric: TcpFabric,
    slot: Option<AddressSlot>,
    id: u64,
) {
    let refuse = |reason: &str| tracing::warn!(%peer, "refusing tcp connection: {reason}");
    let stream = TcpStream::from(stream);
    let setup = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        return refuse(&format!("socket setup: {e}"));
    }
    let mut stream = stream;
    let (kind, params) = match read_hello(&mut stream, fabric.opts.handshake_timeout) {
        Ok(hello) => hello,
        Err(reason) => {
            if reason.starts_with("unsupported hello version") {
                let _ = stream.write_all(&hello_bytes(KIND_REJECT, reason.as_bytes()));
                let _ = stream.shutdown(Shutdown::Write);
            }
            return refuse(&reason);
        }
    };
    // Read whole: no longer a hello that a new connection may evict.
    shared.hellos.lock().retain(|h| h.id != id);
    if kind != KIND_HELLO {
        return refuse(&format!("first message is hello kind {kind}, not a hello"));
    }
    let Some(slot) = slot else {
        let max = fabric.opts.max_connections_per_address;
        let why = format!("too many connections from {}: at most {max} at once", peer.ip());
        let _ = stream.write_all(&hello_bytes(KIND_REJECT, why.as_bytes()));
        return refuse(&format!("{max} connections from its address already"));
    };
    let incoming = TcpIncoming {
        stream,
        peer: format!("tcp://{peer}"),
        params,
        fabric,
        slot,
    };
    match shared.queue.offer(incoming) {
        Ok(()) | Err(Refused::Closed) => {}
        Err(Refused::Full(mut incoming)) => {
            let _ = incoming
                .stream
                .write_all(&hello_bytes(KIND_REJECT, b"too many pending connections"));
            refuse("accept queue full");
        }
    }
}

impl Listener for TcpListener {
    fn local_addr(&self) -> String {
        self.local.to_string()
    }

    fn accept(&self, timeout: Option<Duration>) -> Result<Box<dyn Incoming>, FabricError> {
        self.shared.queue.take(timeout).map(|i| Box::new(i) as _)
    }

    fn shutdown(&self) {
        self.shared.queue.close();
        let _ = self.waker.wake();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A connection whose hello was accepted by the listener.
pub struct TcpIncoming {
    stream: TcpStream,
    peer: String,
    params: Vec<u8>,
    fabric: TcpFabric,
    slot: AddressSlot,
}

impl std::fmt::Debug for TcpIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpIncoming").field("peer", &self.peer).finish()
    }
}

impl Incoming for TcpIncoming {
    fn peer_params(&self) -> &[u8] {
        &self.params
    }

    fn fabric(&self) -> &dyn Fabric {
        &self.fabric
    }

    fn peer_addr(&self) -> String {
        self.peer.clone()
    }

    fn accept(
        self: Box<Self>,
        domain: &ProtectionDomain,
        params: &[u8],
        recvs: Vec<RecvWr>,
    ) -> Result<Box<dyn QueuePair>, FabricError> {
        super::check_domain(domain, &self.fabric.pd, "tcp")?;
        let TcpIncoming {
            stream,
            peer,
            params: peer_params,
            fabric,
            slot,
        } = *self;
        if params.len() > MAX_PARAMS {
            return Err(FabricError::Handshake {
                peer,
                reason: format!("local parameters too long ({} bytes)", params.len()),
            });
        }
        // The answer goes out only once the receives are posted: `start`
        // posts them before the I/O thread reads anything.
        let answer = hello_bytes(KIND_ACCEPT, params);
        let mut qp = TcpQp::start_with_answer(fabric, domain.clone(), stream, peer, peer_params, recvs, Some(answer))?;
        qp._slot = Some(slot);
        Ok(Box::new(qp))
    }

    fn reject(mut self: Box<Self>, reason: &str) {
        let _ = self.stream.write_all(&hello_bytes(KIND_REJECT, reason.as_bytes()));
    }
}

// ---------------------------------------------------------------------------
// Queue pair

/// A tcp queue pair.
pub struct TcpQp {
    shared: Arc<QpShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// An accepted queue pair's place in its address's count.
    _slot: Option<AddressSlot>,
}

struct QpShared {
    stream: mio::net::TcpStream,
    peer: String,
    peer_params: Vec<u8>,
    fabric: TcpFabric,
    /// The connection's protection domain: the peer's remote keys are
    /// looked up here only.
    domain: ProtectionDomain,
    cq: CompletionQueue,
    recvs: Mutex<VecDeque<RecvWr>>,
    tx: Mutex<Tx>,
    failed: AtomicBool,
    /// Wakes the I/O thread's epoll.
    waker: Waker,
    /// The receive side; its holder reads the socket.
    rx: Mutex<Rx>,
    /// Who drives `rx`: waiting callers or the I/O thread.
    drive: Drive,
}

#[derive(Default)]
struct Tx {
    /// Frames not yet fully written; bytes of the first already written.
    frames: VecDeque<TxFrame>,
    head_written: usize,
    /// Requests written or being written, awaiting ACK or READ_RESP.
    outstanding: VecDeque<Pending>,
    next_psn: u64,
    failed: bool,
    /// The newest request executed for the peer and not yet acknowledged:
    /// it rides on the next frame written, or goes out as an ACK.
    ack_due: Option<u64>,
    /// Pumps that read nothing since `ack_due` became due.
    ack_idle: u32,
    /// One past the newest psn acknowledged so far.
    acked: u64,
}

impl Tx {
    /// Queues an explicit ACK for whatever is due.
    fn ack_now(&mut self) {
        if let Some(psn) = self.ack_due.take() {
            self.acked = psn + 1;
            self.frames.push_back(TxFrame {
                header: Header::control(OP_ACK, psn, WcStatus::Success).encode(),
                payload: TxPayload::None,
                request_psn: None,
            });
        }
    }

    /// Puts the due acknowledgement into the header of the first frame not
    /// yet started. Not past a queued READ_RESP: the peer must see a read's
    /// data before an acknowledgement that covers the read.
    fn piggyback_ack(&mut self) {
        let Some(psn) = self.ack_due else { return };
        if self.frames.iter().any(|f| f.header[0] == OP_READ_RESP) {
            return;
        }
        let fresh = usize::from(self.head_written > 0);
        if let Some(frame) = self.frames.get_mut(fresh) {
            frame.header[32..40].copy_from_slice(&(psn + 1).to_le_bytes());
            self.ack_due = None;
            self.acked = psn + 1;
        }
    }
}

struct TxFrame {
    header: [u8; FRAME_HEADER],
    payload: TxPayload,
    /// For requests: the psn whose pending entry gets the buffer back once written.
    request_psn: Option<u64>,
}

enum TxPayload {
    None,
    Buf(Buf),
    Region(RemoteTarget),
}

impl TxPayload {
    fn bytes(&self) -> &[u8] {
        match self {
            TxPayload::None => &[],
            TxPayload::Buf(b) => b,
            TxPayload::Region(t) => t.as_slice(),
        }
    }
}

struct Pending {
    psn: u64,
    id: WrId,
    opcode: WcOpcode,
    buf: Option<Buf>,
    written: bool,
    /// A local error found at posting: the status it completes with.
    error: Option<WcStatus>,
}

#[derive(Clone, Copy)]
struct Header {
    opcode: u8,
    status: u8,
    len: u32,
    psn: u64,
    addr: u64,
    rkey: u32,
    imm: u32,
    /// Piggybacked cumulative acknowledgement: every request up to psn
    /// `ack - 1` was executed; 0 carries none.
    ack: u64,
}

impl Header {
    fn encode(&self) -> [u8; FRAME_HEADER] {
        let mut h = [0u8; FRAME_HEADER];
        h[0] = self.opcode;
        h[1] = self.status;
        h[4..8].copy_from_slice(&self.len.to_le_bytes());
        h[8..16].copy_from_slice(&self.psn.to_le_bytes());
        h[16..24].copy_from_slice(&self.addr.to_le_bytes());
        h[24..28].copy_from_slice(&self.rkey.to_le_bytes());
        h[28..32].copy_from_slice(&self.imm.to_le_bytes());
        h[32..40].copy_from_slice(&self.ack.to_le_bytes());
        h
    }

    fn decode(h: &[u8; FRAME_HEADER]) -> Result<Header, String> {
        let le32 = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let le64 = |i: usize| {
            u64::from_le_bytes([
                h[i],
                h[i + 1],
                h[i + 2],
                h[i + 3],
                h[i + 4],
                h[i + 5],
                h[i + 6],
                h[i + 7],
            ])
        };
        if h[2] != 0 || h[3] != 0 {
            return Err("reserved header bytes are not zero".into());
        }
        let header = Header {
            opcode: h[0],
            status: h[1],
            len: le32(4),
            psn: le64(8),
            addr: le64(16),
            rkey: le32(24),
            imm: le32(28),
            ack: le64(32),
        };
        if !(OP_SEND..=OP_DISCONNECT).contains(&header.opcode) {
            return Err(format!("unknown opcode {}", header.opcode));
        }
        Ok(header)
    }

    fn control(opcode: u8, psn: u64, status: WcStatus) -> Header {
        Header {
            opcode,
            status: status.code(),
            len: 0,
            psn,
            addr: 0,
            rkey: 0,
            imm: 0,
            ack: 0,
        }
    }
}

impl TcpQp {
    fn start(
        fabric: TcpFabric,
        domain: ProtectionDomain,
        stream: TcpStream,
        peer: String,
        peer_params: Vec<u8>,
        recvs: Vec<RecvWr>,
    ) -> Result<TcpQp, FabricError> {
        TcpQp::start_with_answer(fabric, domain, stream, peer, peer_params, recvs, None)
    }

    fn start_with_answer(
        fabric: TcpFabric,
        domain: ProtectionDomain,
        mut stream: TcpStream,
        peer: String,
        peer_params: Vec<u8>,
        recvs: Vec<RecvWr>,
        answer: Option<Vec<u8>>,
    ) -> Result<TcpQp, FabricError> {
        let io_err = |op| move |source| FabricError::Io { op, source };
        if recvs.len() > fabric.opts.max_recv_wr as usize {
            return Err(FabricError::QueueFull {
                queue: "receive",
                depth: fabric.opts.max_recv_wr,
            });
        }
        stream.set_read_timeout(None).map_err(io_err("set_read_timeout"))?;
        if let Some(answer) = answer {
            stream.write_all(&answer).map_err(io_err("write hello answer"))?;
        }
        stream.set_nonblocking(true).map_err(io_err("set_nonblocking"))?;
        let mut stream = mio::net::TcpStream::from_std(stream);
        let poll = Poll::new().map_err(io_err("epoll_create"))?;
        poll.registry()
            .register(&mut stream, SOCKET, Interest::READABLE | Interest::WRITABLE)
            .map_err(io_err("epoll_ctl"))?;
        let waker = Waker::new(poll.registry(), WAKE).map_err(io_err("eventfd"))?;
        let drive = Drive::new().map_err(io_err("socketpair"))?;
        let shared = Arc::new(QpShared {
            stream,
            peer,
            peer_params,
            fabric,
            domain,
            cq: CompletionQueue::default(),
            recvs: Mutex::new(recvs.into()),
            tx: Mutex::new(Tx::default()),
            failed: AtomicBool::new(false),
            waker,
            rx: Mutex::new(Rx::new()),
            drive,
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("chanio-tcp-qp".into())
                .spawn(move || io_thread(&shared, poll))
                .map_err(io_err("spawn I/O thread"))?
        };
        Ok(TcpQp {
            shared,
            thread: Mutex::new(Some(thread)),
            _slot: None,
        })
    }
}

impl std::fmt::Debug for TcpQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpQp")
            .field("peer", &self.shared.peer)
            .field("failed", &self.is_failed())
            .finish()
    }
}

impl QueuePair for TcpQp {
    fn post_send(&self, wrs: &mut Vec<SendWr>) -> Result<(), FabricError> {
        let shared = &self.shared;
        let mut tx = shared.tx.lock();
        if tx.failed {
            drop(tx);
            shared.cq.push_all(wrs.drain(..).map(flushed_send));
            return Ok(());
        }
        let depth = shared.fabric.opts.max_send_wr;
        if tx.outstanding.len() + wrs.len() > depth as usize {
            return Err(FabricError::QueueFull { queue: "send", depth });
        }
        let mut local_error = false;
        for wr in wrs.drain(..) {
            let opcode = wr.opcode();
            let status = if local_error {
                Some(WcStatus::Flushed)
            } else {
                check_local(&wr, shared.fabric.opts.max_message).err()
            };
            if let Some(status) = status {
                // A local error fails the queue pair, as in verbs: the request
                // completes with its error after every earlier one (which the
                // I/O thread flushes in order), and the rest are flushed.
                local_error = true;
                let psn = tx.next_psn;
                tx.next_psn += 1;
                tx.outstanding.push_back(Pending {
                    psn,
                    id: wr.id,
                    opcode,
                    buf: Some(wr.into_buf()),
                    written: false,
                    error: Some(status),
                });
                continue;
            }
            let psn = tx.next_psn;
            tx.next_psn += 1;
            let (header, payload, pending_buf) = match wr.op {
                // Refused by `check_local` above.
                SendOp::Placed { token, .. } => {
                    local_error = true;
                    tx.outstanding.push_back(Pending {
                        psn,
                        id: wr.id,
                        opcode,
                        buf: Some(token),
                        written: false,
                        error: Some(WcStatus::LocalProtectionError),
                    });
                    continue;
                }
                SendOp::Send { buf, imm } => (
                    Header {
                        opcode: if imm.is_some() { OP_SEND_IMM } else { OP_SEND },
                        status: 0,
                        len: buf.len() as u32,
                        psn,
                        addr: 0,
                        rkey: 0,
                        imm: imm.unwrap_or(0),
                        ack: 0,
                    },
                    TxPayload::Buf(buf),
                    None,
                ),
                SendOp::Write { buf, remote, imm } => (
                    Header {
                        opcode: if imm.is_some() { OP_WRITE_IMM } else { OP_WRITE },
                        status: 0,
                        len: buf.len() as u32,
                        psn,
                        addr: remote.addr,
                        rkey: remote.rkey.0,
                        imm: imm.unwrap_or(0),
                        ack: 0,
                    },
                    TxPayload::Buf(buf),
                    None,
                ),
                SendOp::Read { buf, remote } => (
                    Header {
                        opcode: OP_READ_REQ,
                        status: 0,
                        len: buf.len() as u32,
                        psn,
                        addr: remote.addr,
                        rkey: remote.rkey.0,
                        imm: 0,
                        ack: 0,
                    },
                    TxPayload::None,
                    Some(buf),
                ),
            };
            tx.outstanding.push_back(Pending {
                psn,
                id: wr.id,
                opcode,
                buf: pending_buf,
                written: false,
                error: None,
            });
            tx.frames.push_back(TxFrame {
                header: header.encode(),
                payload,
                request_psn: Some(psn),
            });
        }
        let flushed = flush_tx(&shared.stream, &mut tx);
        drop(tx);
        if local_error {
            shared.fail_from_outside();
        } else if let Err(e) = flushed {
            tracing::debug!(peer = %shared.peer, error = %e, "tcp write failed");
            shared.fail_from_outside();
        }
        Ok(())
    }

    fn post_recv(&self, wr: RecvWr) -> Result<(), (FabricError, RecvWr)> {
        let shared = &self.shared;
        let mut recvs = shared.recvs.lock();
        if shared.failed.load(Ordering::Acquire) {
            drop(recvs);
            shared.cq.push(flushed_recv(wr));
            return Ok(());
        }
        let depth = shared.fabric.opts.max_recv_wr;
        if recvs.len() >= depth as usize {
            return Err((
                FabricError::QueueFull {
                    queue: "receive",
                    depth,
                },
                wr,
            ));
        }
        recvs.push_back(wr);
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        self.shared.cq.poll(out, max)
    }

    /// Drives the socket from the calling thread (run to completion: no
    /// thread hop between the socket and the caller) until a completion is
    /// ready, `timeout` passes or [`QueuePair::interrupt`] is called. When
    /// another caller drives already, sleeps on the completion queue.
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
        let shared = &self.shared;
        {
            let mut tx = shared.tx.lock();
            if !tx.failed {
                tx.frames.push_back(TxFrame {
                    header: Header::control(OP_DISCONNECT, 0, WcStatus::Success).encode(),
                    payload: TxPayload::None,
                    request_psn: None,
                });
                let _ = flush_tx(&shared.stream, &mut tx);
            }
        }
        shared.fail_from_outside();
        if let Some(thread) = self.thread.lock().take() {
            if thread.thread().id() != std::thread::current().id() {
                thread.thread().unpark();
                let _ = thread.join();
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.fabric.capabilities()
    }
}

impl Drop for TcpQp {
    fn drop(&mut self) {
        self.disconnect();
    }
}

fn check_local(wr: &SendWr, max_message: u32) -> Result<(), WcStatus> {
    let len = match &wr.op {
        SendOp::Send { buf, .. } | SendOp::Write { buf, .. } => buf.len(),
        SendOp::Read { buf, .. } => buf.len(),
        // tcp never places (`QueuePair::place` says no): nothing was copied.
        SendOp::Placed { .. } => return Err(WcStatus::LocalProtectionError),
    };
    if len > max_message as usize {
        return Err(WcStatus::LocalLengthError);
    }
    if let SendOp::Read { buf, .. } = &wr.op {
        if !buf.access().contains(Access::LOCAL_WRITE) {
            return Err(WcStatus::LocalProtectionError);
        }
    }
    Ok(())
}

/// Writes as much of the queued frames as the socket takes without blocking.
fn flush_tx(stream: &mio::net::TcpStream, tx: &mut Tx) -> io::Result<()> {
    tx.piggyback_ack();
    while !tx.frames.is_empty() {
        // On the stack: a flush allocates nothing.
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut used = 0;
        let mut skip = tx.head_written;
        for frame in tx.frames.iter() {
            if used + 2 > MAX_IOVECS {
                break;
            }
            for part in [&frame.header[..], frame.payload.bytes()] {
                if skip >= part.len() {
                    skip -= part.len();
                } else {
                    slices[used] = IoSlice::new(&part[skip..]);
                    used += 1;
                    skip = 0;
                }
            }
        }
        let written = match (&*stream).write_vectored(&slices[..used]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut left = written + tx.head_written;
        tx.head_written = 0;
        while let Some(frame) = tx.frames.front() {
            let size = FRAME_HEADER + frame.payload.bytes().len();
            if left < size {
                tx.head_written = left;
                break;
            }
            left -= size;
            let frame = tx.frames.pop_front().expect("front exists");
            if let Some(psn) = frame.request_psn {
                let front = tx.outstanding.front().map_or(psn, |p| p.psn);
                if let Some(p) = tx.outstanding.get_mut((psn - front) as usize) {
                    p.written = true;
                    if let TxPayload::Buf(buf) = frame.payload {
                        p.buf = Some(buf);
                    }
                }
            }
        }
    }
    Ok(())
}

impl QpShared {
    /// Fails the queue pair from a posting thread: the I/O thread does the flushing.
    fn fail_from_outside(&self) {
        self.failed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
        let _ = self.waker.wake();
    }
}

// ---------------------------------------------------------------------------
// Receive side: driven by waiting callers, or by the I/O thread

/// The receive side of a queue pair: the read-ahead buffer, the frame being
/// read and what it produced. Whoever holds it (a waiting caller or the I/O
/// thread) reads the socket.
struct Rx {
    staging: Box<[u8]>,
    start: usize,
    end: usize,
    sink: Sink,
    expected_psn: u64,
    ack_due: Option<u64>,
    completions: Vec<Completion>,
    /// The queue pair failed and everything was flushed.
    dead: bool,
    /// The socket gave bytes since `got_bytes` was last cleared.
    got_bytes: bool,
}

/// Where the payload of the frame being read goes.
enum Sink {
    Idle,
    Recv {
        wr: RecvWr,
        header: Header,
        filled: usize,
    },
    Remote {
        target: RemoteTarget,
        recv: Option<RecvWr>,
        header: Header,
        filled: usize,
    },
    ReadResp {
        pending: Pending,
        filled: usize,
    },
}

/// Why the I/O thread stops; `nak` is what to tell the peer first.
struct Fatal {
    reason: String,
    nak: Option<(u64, WcStatus)>,
    /// The peer broke the transport protocol (logged as a warning).
    violation: bool,
}

fn fatal(reason: impl Into<String>) -> Fatal {
    Fatal {
        reason: reason.into(),
        nak: None,
        violation: false,
    }
}

fn violation(reason: impl Into<String>) -> Fatal {
    Fatal {
        violation: true,
        ..fatal(reason)
    }
}

impl QpShared {
    /// One round of work without blocking: read and execute what the socket
    /// holds, queue the ACK, write what is queued, publish completions. The
    /// ACK goes out before completions are published: an application that
    /// disconnects as soon as it sees a message must not overtake the
    /// acknowledgement of that message. False once the queue pair failed
    /// (everything is flushed by then).
    fn pump(&self, rx: &mut Rx, short_read_drains: bool) -> bool {
        if rx.dead {
            return false;
        }
        if self.failed.load(Ordering::Acquire) {
            rx.fail(self, fatal("disconnected locally"));
            return false;
        }
        rx.got_bytes = false;
        let read = rx.read_available(self, short_read_drains);
        let flushed = {
            let mut tx = self.tx.lock();
            // An acknowledgement waits for a frame to ride on (the
            // application's reply) while the application reacts to what it
            // was handed: not when nothing was handed over, not past
            // ACK_EVERY requests, not through ACK_IDLE_PUMPS pumps that
            // read nothing, and never through a sleep (`ack_before_sleep`).
            if let Some(psn) = rx.ack_due.take() {
                tx.ack_due = Some(psn);
                tx.ack_idle = 0;
                if rx.completions.is_empty() || psn + 1 - tx.acked >= ACK_EVERY {
                    tx.ack_now();
                }
            } else if tx.ack_due.is_some() && !rx.got_bytes {
                tx.ack_idle += 1;
                if tx.ack_idle >= ACK_IDLE_PUMPS {
                    tx.ack_now();
                }
            }
            flush_tx(&self.stream, &mut tx)
        };
        rx.publish(self);
        if let Err(f) = read {
            rx.fail(self, f);
            return false;
        }
        if let Err(e) = flushed {
            rx.fail(self, fatal(format!("write: {e}")));
            return false;
        }
        true
    }

    /// Sends the acknowledgement still due before this side sleeps (nothing
    /// it could ride on is coming); returns whether frames remain unwritten.
    fn ack_before_sleep(&self) -> io::Result<bool> {
        let mut tx = self.tx.lock();
        if tx.failed {
            return Ok(false);
        }
        tx.ack_now();
        flush_tx(&self.stream, &mut tx)?;
        Ok(!tx.frames.is_empty())
    }

    /// The caller side of [`QueuePair::wait`]: see there.
    fn drive(&self, timeout: Option<Duration>) -> bool {
        self.drive.drive(
            &self.rx,
            &self.cq,
            timeout,
            // A spinning waiter's round is this pump: it reads the socket
            // without a zero-timeout poll(2) first, so the read that finds
            // the data returns it (one syscall, not two), and one that finds
            // nothing costs no more than the poll (bench/tcplat.c: a plain
            // spinning recv is the kernel's floor; figures in
            // docs/performance.md).
            |rx| self.pump(rx, true),
            |rx, timeout| {
                let want_write = match self.ack_before_sleep() {
                    Ok(pending) => pending,
                    Err(e) => {
                        rx.fail(self, fatal(format!("write: {e}")));
                        return Woke::Ready;
                    }
                };
                let events = if want_write {
                    libc::POLLIN | libc::POLLOUT
                } else {
                    libc::POLLIN
                };
                let mut fds = [
                    drive::pollfd(self.stream.as_raw_fd(), events),
                    drive::pollfd(self.drive.kick_fd(), libc::POLLIN),
                ];
                match drive::poll_fds(&mut fds, timeout) {
                    Ok(true) if fds[1].revents != 0 => Woke::Kicked,
                    Ok(true) => Woke::Ready,
                    Ok(false) => Woke::TimedOut,
                    Err(e) => {
                        rx.fail(self, fatal(format!("poll: {e}")));
                        Woke::Ready
                    }
                }
            },
        )
    }
}

/// The I/O thread: it reads the socket whenever no caller drives it (an
/// asynchronous application, a peer's traffic nobody waits for), and
/// finishes writes the socket did not take.
fn io_thread(shared: &QpShared, mut poll: Poll) {
    shared.drive.register_thread();
    let mut events = Events::with_capacity(8);
    let mut aside = Aside::default();
    loop {
        if shared.drive.thread_stands_aside(&shared.failed, &mut aside) {
            continue;
        }
        let round = shared.drive.thread_round(&shared.rx, &shared.failed, &aside, |rx| {
            let alive = shared.pump(rx, false);
            if alive {
                if let Err(e) = shared.ack_before_sleep() {
                    rx.fail(shared, fatal(format!("write: {e}")));
                    return false;
                }
            }
            alive
        });
        match round {
            None => continue,
            Some(false) => return,
            Some(true) => {}
        }
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() != io::ErrorKind::Interrupted {
                shared.failed.store(true, Ordering::Release);
                shared.rx.lock().fail(shared, fatal(format!("epoll_wait: {e}")));
                return;
            }
        }
    }
}

impl Rx {
    fn new() -> Rx {
        Rx {
            staging: vec![0u8; STAGING].into_boxed_slice(),
            start: 0,
            end: 0,
            sink: Sink::Idle,
            expected_psn: 0,
            ack_due: None,
            completions: Vec::new(),
            dead: false,
            got_bytes: false,
        }
    }

    fn publish(&mut self, sh: &QpShared) {
        if !self.completions.is_empty() {
            sh.cq.push_all(self.completions.drain(..));
        }
    }

    /// Reads and executes frames until the socket has no more bytes. With
    /// `short_read_drains`, a read that returned less than it asked for
    /// counts as the end (the socket had no more at that moment: a caller
    /// that polls level-triggered saves the read that would say so); the
    /// I/O thread's edge-triggered epoll needs the socket read to EAGAIN.
    fn read_available(&mut self, sh: &QpShared, short_read_drains: bool) -> Result<(), Fatal> {
        let mut drained = false;
        loop {
            if !matches!(self.sink, Sink::Idle) {
                let remaining = sink_dest(&mut self.sink).len();
                if remaining == 0 {
                    self.finish_sink();
                    continue;
                }
                let buffered = self.end - self.start;
                if buffered > 0 {
                    let n = buffered.min(remaining);
                    sink_dest(&mut self.sink)[..n].copy_from_slice(&self.staging[self.start..self.start + n]);
                    self.start += n;
                    advance_sink(&mut self.sink, n);
                    continue;
                }
                // The read-ahead is empty: one vectored read puts the rest of
                // this payload straight into its final place and reads ahead
                // the next frame headers into the read-ahead buffer.
                if drained {
                    return Ok(());
                }
                self.start = 0;
                self.end = 0;
                let dest = sink_dest(&mut self.sink);
                let mut iov = [IoSliceMut::new(dest), IoSliceMut::new(&mut self.staging[..READ_AHEAD])];
                match read_vectored_some(&sh.stream, &mut iov)? {
                    Some(n) => {
                        self.got_bytes = true;
                        drained = short_read_drains && n < remaining + READ_AHEAD;
                        let placed = n.min(remaining);
                        advance_sink(&mut self.sink, placed);
                        self.end = n - placed;
                    }
                    None => return Ok(()),
                }
                continue;
            }
            if self.end - self.start < FRAME_HEADER {
                if drained {
                    return Ok(());
                }
                match self.refill(sh)? {
                    None => return Ok(()),
                    Some(short) => drained = short_read_drains && short,
                }
                continue;
            }
            let mut raw = [0u8; FRAME_HEADER];
            raw.copy_from_slice(&self.staging[self.start..self.start + FRAME_HEADER]);
            self.start += FRAME_HEADER;
            let header = Header::decode(&raw).map_err(|r| violation(format!("malformed frame: {r}")))?;
            if header.ack > 0 {
                let mut tx = sh.tx.lock();
                complete_acked(&mut self.completions, &mut tx, header.ack - 1, true)?;
            }
            self.begin_frame(sh, header)?;
        }
    }

    /// Compacts the read-ahead buffer and reads more: `None` when the socket
    /// is drained, else whether the read was short.
    fn refill(&mut self, sh: &QpShared) -> Result<Option<bool>, Fatal> {
        if self.start > 0 {
            self.staging.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Between frames, read ahead at most READ_AHEAD bytes: payload bytes
        // caught in it are copied once, larger ones go straight to their place.
        let limit = (self.end + READ_AHEAD).min(self.staging.len());
        let want = limit - self.end;
        match read_some(&sh.stream, &mut self.staging[self.end..limit])? {
            Some(n) => {
                self.got_bytes = true;
                self.end += n;
                Ok(Some(n < want))
            }
            None => Ok(None),
        }
    }

    fn check_psn(&mut self, header: &Header) -> Result<(), Fatal> {
        if header.psn != self.expected_psn {
            return Err(violation(format!(
                "out-of-order request psn {} (expected {})",
                header.psn, self.expected_psn
            )));
        }
        self.expected_psn += 1;
        Ok(())
    }

    /// The responder refused request `psn`: the receive it failed (if
    /// any) completes here, and the peer gets the NAK.
    fn refuse(&mut self, psn: u64, refusal: Refusal) -> Fatal {
        self.completions.extend(refusal.receive);
        Fatal {
            reason: refusal.reason,
            nak: Some((psn, refusal.status)),
            violation: true,
        }
    }

    fn begin_frame(&mut self, sh: &QpShared, header: Header) -> Result<(), Fatal> {
        let max = sh.fabric.opts.max_message;
        if header.len > max {
            return Err(violation(format!(
                "frame of {} bytes exceeds the {max}-byte limit",
                header.len
            )));
        }
        match header.opcode {
            OP_SEND | OP_SEND_IMM => {
                self.check_psn(&header)?;
                let accepted = responder::accept_send(&mut sh.recvs.lock(), header.len);
                let wr = accepted.map_err(|r| self.refuse(header.psn, r))?;
                self.sink = Sink::Recv { wr, header, filled: 0 };
            }
            OP_WRITE | OP_WRITE_IMM => {
                self.check_psn(&header)?;
                let accepted = responder::accept_write(
                    &sh.domain,
                    &mut sh.recvs.lock(),
                    RKey(header.rkey),
                    header.addr,
                    header.len.into(),
                    header.opcode == OP_WRITE_IMM,
                );
                let WriteTarget { target, receive } = accepted.map_err(|r| self.refuse(header.psn, r))?;
                self.sink = Sink::Remote {
                    target,
                    recv: receive,
                    header,
                    filled: 0,
                };
            }
            OP_READ_REQ => {
                self.check_psn(&header)?;
                let target = responder::accept_read(&sh.domain, RKey(header.rkey), header.addr, header.len.into())
                    .map_err(|r| self.refuse(header.psn, r))?;
                // The response acks everything before it; drop a pending ACK for those.
                if self.ack_due.is_some_and(|p| p < header.psn) {
                    self.ack_due = None;
                }
                let mut tx = sh.tx.lock();
                if tx.ack_due.is_some_and(|p| p < header.psn) {
                    tx.ack_due = None;
                }
                drop(tx);
                let response = Header {
                    opcode: OP_READ_RESP,
                    status: 0,
                    len: header.len,
                    psn: header.psn,
                    addr: 0,
                    rkey: 0,
                    imm: 0,
                    ack: 0,
                };
                sh.tx.lock().frames.push_back(TxFrame {
                    header: response.encode(),
                    payload: TxPayload::Region(target),
                    request_psn: None,
                });
            }
            OP_READ_RESP => {
                let mut tx = sh.tx.lock();
                complete_acked(
                    &mut self.completions,
                    &mut tx,
                    header.psn.wrapping_sub(1),
                    header.psn > 0,
                )?;
                let front = tx.outstanding.pop_front();
                drop(tx);
                match front {
                    Some(p) if p.psn == header.psn && p.opcode == WcOpcode::RdmaRead && p.written => {
                        let want = p.buf.as_ref().map_or(0, |b| b.len());
                        if want != header.len as usize {
                            return Err(violation(format!(
                                "read response of {} bytes for a {want}-byte read",
                                header.len
                            )));
                        }
                        self.sink = Sink::ReadResp { pending: p, filled: 0 };
                    }
                    other => {
                        if let Some(p) = other {
                            sh.tx.lock().outstanding.push_front(p);
                        }
                        return Err(violation(format!(
                            "read response for psn {} matches no read",
                            header.psn
                        )));
                    }
                }
            }
            OP_ACK => {
                let mut tx = sh.tx.lock();
                complete_acked(&mut self.completions, &mut tx, header.psn, true)?;
            }
            OP_NAK => {
                let status = WcStatus::from_code(header.status)
                    .filter(|s| !s.is_success())
                    .unwrap_or(WcStatus::RemoteOperationError);
                let mut tx = sh.tx.lock();
                complete_acked(
                    &mut self.completions,
                    &mut tx,
                    header.psn.wrapping_sub(1),
                    header.psn > 0,
                )?;
                if let Some(pos) = tx.outstanding.iter().position(|p| p.psn == header.psn) {
                    if let Some(mut p) = tx.outstanding.remove(pos) {
                        let buf = p.buf.take().or_else(|| take_frame_buf(&mut tx, p.psn));
                        if let Some(buf) = buf {
                            self.completions.push(Completion {
                                id: p.id,
                                status,
                                opcode: p.opcode,
                                byte_len: 0,
                                imm: None,
                                buf,
                            });
                        }
                    }
                }
                return Err(fatal(format!("peer refused request {}: {status}", header.psn)));
            }
            OP_DISCONNECT => return Err(fatal("peer disconnected")),
            _ => return Err(violation(format!("unknown opcode {}", header.opcode))),
        }
        Ok(())
    }

    fn finish_sink(&mut self) {
        match std::mem::replace(&mut self.sink, Sink::Idle) {
            Sink::Idle => {}
            Sink::Recv { wr, header, .. } => {
                let imm = (header.opcode == OP_SEND_IMM).then_some(header.imm);
                self.completions.push(responder::send_received(wr, header.len, imm));
                self.ack_due = Some(header.psn);
            }
            Sink::Remote { recv, header, .. } => {
                if let Some(wr) = recv {
                    self.completions
                        .push(responder::write_received(wr, header.len, header.imm));
                }
                self.ack_due = Some(header.psn);
            }
            Sink::ReadResp { pending, .. } => {
                if let Some(buf) = pending.buf {
                    self.completions.push(Completion {
                        id: pending.id,
                        status: WcStatus::Success,
                        opcode: WcOpcode::RdmaRead,
                        byte_len: buf.len() as u32,
                        imm: None,
                        buf,
                    });
                }
            }
        }
    }

    /// Moves the queue pair to the error state: tell the peer why (best
    /// effort), close, and flush every outstanding request.
    fn fail(&mut self, shared: &QpShared, why: Fatal) {
        if self.dead {
            return;
        }
        self.dead = true;
        let was_failed = shared.failed.swap(true, Ordering::AcqRel);
        match (&why.nak, why.violation) {
            (Some((_, status)), _) => {
                tracing::warn!(peer = %shared.peer, "closing tcp queue pair: {} ({status})", why.reason)
            }
            (None, true) => tracing::warn!(peer = %shared.peer, "closing tcp queue pair: {}", why.reason),
            (None, false) if !was_failed => {
                tracing::debug!(peer = %shared.peer, "tcp queue pair closed: {}", why.reason)
            }
            (None, false) => {}
        }
        {
            let mut tx = shared.tx.lock();
            tx.failed = true;
            if let Some((psn, status)) = why.nak {
                tx.frames.push_back(TxFrame {
                    header: Header::control(OP_NAK, psn, status).encode(),
                    payload: TxPayload::None,
                    request_psn: None,
                });
                let _ = shared.stream.set_nodelay(true);
                let _ = flush_tx(&shared.stream, &mut tx);
            }
        }
        let _ = shared.stream.shutdown(Shutdown::Both);
        // Everything still in flight completes with a flush error, in order.
        match std::mem::replace(&mut self.sink, Sink::Idle) {
            Sink::Idle => {}
            Sink::Recv { wr, .. } => self.completions.push(flushed_recv(wr)),
            Sink::Remote { recv, .. } => self.completions.extend(recv.map(flushed_recv)),
            Sink::ReadResp { pending, .. } => self.completions.extend(pending.buf.map(|buf| Completion {
                id: pending.id,
                status: WcStatus::Flushed,
                opcode: pending.opcode,
                byte_len: 0,
                imm: None,
                buf,
            })),
        }
        {
            let mut tx = shared.tx.lock();
            let frames: Vec<TxFrame> = tx.frames.drain(..).collect();
            tx.head_written = 0;
            for frame in frames {
                if let (Some(psn), TxPayload::Buf(buf)) = (frame.request_psn, frame.payload) {
                    if let Some(p) = tx.outstanding.iter_mut().find(|p| p.psn == psn) {
                        p.buf = Some(buf);
                    }
                }
            }
            for p in tx.outstanding.drain(..) {
                if let Some(buf) = p.buf {
                    self.completions.push(Completion {
                        id: p.id,
                        status: p.error.unwrap_or(WcStatus::Flushed),
                        opcode: p.opcode,
                        byte_len: 0,
                        imm: None,
                        buf,
                    });
                }
            }
        }
        let recvs: Vec<RecvWr> = shared.recvs.lock().drain(..).collect();
        self.completions.extend(recvs.into_iter().map(flushed_recv));
        self.publish(shared);
    }
}

/// The part of the current payload's destination not yet filled.
fn sink_dest(sink: &mut Sink) -> &mut [u8] {
    match sink {
        Sink::Idle => &mut [],
        Sink::Recv { wr, header, filled } => &mut wr.buf.spare_capacity()[*filled..header.len as usize],
        Sink::Remote { target, filled, .. } => &mut target.as_mut_slice()[*filled..],
        Sink::ReadResp { pending, filled } => match pending.buf.as_mut() {
            Some(b) => &mut b[*filled..],
            None => &mut [],
        },
    }
}

fn advance_sink(sink: &mut Sink, n: usize) {
    match sink {
        Sink::Idle => {}
        Sink::Recv { filled, .. } | Sink::Remote { filled, .. } | Sink::ReadResp { filled, .. } => *filled += n,
    }
}

/// Completes every outstanding request up to `psn` (inclusive) as executed.
fn complete_acked(completions: &mut Vec<Completion>, tx: &mut Tx, psn: u64, any: bool) -> Result<(), Fatal> {
    if !any {
        return Ok(());
    }
    while let Some(front) = tx.outstanding.front() {
        if front.psn > psn {
            break;
        }
        if !front.written {
            return Err(violation(format!("peer acknowledged psn {psn} before it was sent")));
        }
        if front.opcode == WcOpcode::RdmaRead {
            // A read completes only with its data.
            return Err(violation(format!("peer acknowledged read {} without data", front.psn)));
        }
        let p = tx.outstanding.pop_front().expect("front exists");
        if let Some(buf) = p.buf {
            completions.push(Completion {
                id: p.id,
                status: WcStatus::Success,
                opcode: p.opcode,
                byte_len: buf.len() as u32,
                imm: None,
                buf,
            });
        }
    }
    Ok(())
}

fn take_frame_buf(tx: &mut Tx, psn: u64) -> Option<Buf> {
    let pos = tx.frames.iter().position(|f| f.request_psn == Some(psn))?;
    let frame = tx.frames.remove(pos)?;
    match frame.payload {
        TxPayload::Buf(b) => Some(b),
        _ => None,
    }
}

/// One non-blocking vectored read: `Some(n)` bytes, `None` when drained.
fn read_vectored_some(stream: &mio::net::TcpStream, iov: &mut [IoSliceMut<'_>]) -> Result<Option<usize>, Fatal> {
    loop {
        match (&*stream).read_vectored(iov) {
            Ok(0) => return Err(fatal("peer closed the connection")),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fatal(format!("read: {e}"))),
        }
    }
}

/// One non-blocking read: `Some(n)` bytes, `None` when the socket is drained.
fn read_some(stream: &mio::net::TcpStream, dest: &mut [u8]) -> Result<Option<usize>, Fatal> {
    if dest.is_empty() {
        return Err(fatal("internal: read into an empty buffer"));
    }
    read_vectored_some(stream, &mut [IoSliceMut::new(dest)])
}
