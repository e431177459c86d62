//! The tcp provider: verbs RC semantics emulated faithfully over TCP.
//!
//! Each queue pair is one TCP connection (`TCP_NODELAY`). Posting threads
//! write their own frames straight to the socket (no thread hop on the send
//! path); frames are read, placed and executed by the thread that waits on
//! the queue pair (run to completion, `provider/drive.rs`: the waiting
//! thread polls the socket itself, so a completion reaches it without a
//! hop) or, when nobody waits, by the progress engine (`provider/engine.rs`,
//! a few threads for every queue pair of the process). The socket
//! is non-blocking: whatever does not fit stays queued as owned work
//! requests (no copy) and the waiting thread or the engine finishes it
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
use super::engine::{self, Driven, EngineWaker, Next, Registration};
use super::handshake::{AcceptQueue, HelloError, HelloFormat, Refused, KIND_ACCEPT, KIND_HELLO, KIND_REJECT};
use super::responder::{self, Fatal, Refusal, WriteTarget};
use super::{
    Capabilities, Completion, Fabric, FabricError, Incoming, Listener, Notify, QueuePair, RecvWr, SendOp, SendWr,
    WcOpcode, WcStatus, WrId,
};
use crate::mr::{Access, Buf, ProtectionDomain, RKey, RemoteTarget};
use crate::provider::{flushed_recv, flushed_send};

mod frame;
mod listener;
mod qp;
mod rx;
use frame::*;
pub(crate) use listener::MAX_PENDING;
use listener::*;
use qp::*;
use rx::*;

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
        let (kind, body) = read_hello(&mut stream, self.opts.connect_timeout).map_err(|e| FabricError::Handshake {
            peer: peer.clone(),
            reason: e.to_string(),
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
fn read_hello(stream: &mut TcpStream, timeout: Duration) -> Result<(u16, Vec<u8>), HelloError> {
    HELLO.read(stream, timeout)
}
