//! The verbs provider: reliable-connected queue pairs on RDMA NICs
//! (ConnectX and other libibverbs devices) and soft-RoCE (rxe), behind the
//! cargo feature `verbs`.
//!
//! ```text
//!  VerbsFabric ── one device context, one ibv_pd (= the fabric's ProtectionDomain,
//!     │           every BufPool an ibv_mr: Buf/BufPool report the NIC's lkey/rkey);
//!     │           each child domain (one per connection) an ibv_pd of its own,
//!     │           where that connection's QP and memory live
//!     ├─ listen ─▶ VerbsListener (TCP, out-of-band exchange, see `oob`)
//!     └─ connect ─▶ PreparedQp (INIT, receives posted) ─ exchange ─▶ RTR/RTS ─▶ VerbsQp
//!                     VerbsQp: ibv_qp + ibv_cq + completion channel + one thread
//! ```
//!
//! libibverbs is reached through `rdma-mummy-sys`, which loads
//! `libibverbs.so.1` with `dlopen` at run time: a build needs no RDMA
//! package, and on a machine without the library or without a device
//! [`VerbsFabric::new`] fails at once with [`FabricError::Unavailable`]
//! saying how to create a soft-RoCE device (see `docs/soft-roce.md` and
//! `docs/decisions.md`).
//!
//! # Mapping to the trait
//! - Connection set-up is an out-of-band exchange over TCP (QP number,
//!   PSN, LID, GID, MTU, Read depth and the hello parameters), as perftest
//!   does; the TCP connection stays open as a side channel for
//!   DISCONNECT, so a failure on one side fails the other (RC itself only
//!   notices on the next send). Listen addresses are TCP `host:port`.
//! - QP attributes: path MTU the smaller active MTU of both ports, timeout
//!   14, retry count 7, RNR retry 0 (credits make a missing receive a
//!   protocol error, reported as [`WcStatus::ReceiverNotReady`]), Read depth
//!   the smaller of what this device issues and the peer's device serves
//!   (when that is 0, RDMA Reads complete with
//!   [`WcStatus::LocalProtectionError`] without being posted), remote write
//!   and read allowed on the QP (each registration still decides). RoCE
//!   uses a GRH with the GID at `CHANIO_VERBS_GID_INDEX`, else the first
//!   RoCE v2 IPv4-mapped GID; a peer whose GID is of the other RoCE
//!   version is refused.
//! - Memory is registered with `IBV_ACCESS_LOCAL_WRITE` always (as
//!   perftest does), plus the remote rights the registration asks for;
//!   the local rights are checked in software before posting.
//! - A receive too small for the Send completes with
//!   [`WcStatus::LocalLengthError`] on every device (rxe reports
//!   `IBV_WC_REM_INV_REQ_ERR` there, mlx5 `IBV_WC_LOC_LEN_ERR`).
//! - Every send is signaled; one CQ per queue pair serves both queues. A
//!   small thread per queue pair waits on the completion channel
//!   (`ibv_get_cq_event`, `ibv_ack_cq_events`, `ibv_req_notify_cq`) and on
//!   the side channel, polls the CQ into the provider's completion queue
//!   and runs the notify callback; [`QueuePair::poll`] and
//!   [`QueuePair::wait`] also poll the CQ directly, so a busy poller does
//!   not wait for the interrupt.
//! - No shared receive queue: each queue pair's receives are exactly its
//!   credits (see `docs/decisions.md`).
//! - [`Capabilities::immediate_data`] is false on iWARP devices, where the
//!   protocol then sends separate indications. Note that iWARP queue pairs
//!   can only be connected through RDMA CM, which this provider does not
//!   use yet: on siw, connecting fails at the RTR transition.
//!
//! # Threads and cleanup
//! Per listener one accept thread and one short thread per hello; per queue
//! pair one completion thread. Dropping a [`VerbsQp`] disconnects it,
//! waits (at most [`qp::FLUSH_GRACE`]) until every posted request came
//! back, then destroys QP, CQ and channel in that order; memory regions are
//! deregistered when their last `Buf` goes. Should `ibv_destroy_qp` or
//! `ibv_dereg_mr` fail, the memory the device may still reach is leaked,
//! never freed, and an error is logged.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::handshake::{AcceptQueue, HelloError, Refused};
use super::{Capabilities, Fabric, FabricError, Incoming, Listener, QueuePair, RecvWr};
use crate::mr::{ProtectionDomain, Registrar};

mod device;
pub(crate) mod oob;
pub mod qp;

use device::{Context, Endpoint, OpenSpec, Pd, WakeFd};
pub use oob::{MAGIC as EXCHANGE_MAGIC, VERSION as EXCHANGE_VERSION};
pub use qp::VerbsQp;

/// Environment variable naming the RDMA device (`ibv_devices` lists them).
pub const DEVICE_ENV: &str = "CHANIO_VERBS_DEVICE";
/// Environment variable with the GID table index to use as source GID.
pub const GID_INDEX_ENV: &str = "CHANIO_VERBS_GID_INDEX";
/// Environment variable that, set to `0`, makes the provider offer no
/// immediate data, as an iWARP device does: the protocol then sends every
/// transfer indication as a separate message (a way to test that path on
/// InfiniBand and RoCE devices).
pub const IMMEDIATE_ENV: &str = "CHANIO_VERBS_IMMEDIATE";

/// Tunables of the verbs provider.
#[derive(Debug, Clone)]
pub struct VerbsOptions {
    /// Device name (`rxe0`, `mlx5_0`); `None` for the first one listed.
    pub device: Option<String>,
    /// Port number on the device (from 1).
    pub port: u8,
    /// GID table index; `None` picks the first RoCE v2 IPv4-mapped GID
    /// (or index 0 on InfiniBand).
    pub gid_index: Option<u8>,
    /// How long a listener waits for a new connection's hello, and an
    /// acceptor for the client's READY.
    pub handshake_timeout: Duration,
    /// How long `connect` waits for the TCP connection and the answer.
    pub connect_timeout: Duration,
    /// Largest message in bytes (further capped by the port's limit).
    pub max_message: u32,
    /// Most outstanding send work requests per queue pair (capped by the device).
    pub max_send_wr: u32,
    /// Most posted receives per queue pair (capped by the device).
    pub max_recv_wr: u32,
    /// Offer immediate data where the device has it (iWARP has none).
    pub immediate_data: bool,
}

impl Default for VerbsOptions {
    fn default() -> Self {
        VerbsOptions {
            device: None,
            port: 1,
            gid_index: None,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            max_message: 1 << 30,
            max_send_wr: 1024,
            max_recv_wr: 1024,
            immediate_data: true,
        }
    }
}

impl VerbsOptions {
    /// Defaults, with the device from [`DEVICE_ENV`], the GID index from
    /// [`GID_INDEX_ENV`] and immediate data from [`IMMEDIATE_ENV`] when set.
    ///
    /// # Errors
    /// [`FabricError::Unavailable`] when `CHANIO_VERBS_GID_INDEX` is not a
    /// number from 0 to 255, or `CHANIO_VERBS_IMMEDIATE` is neither 0 nor 1.
    pub fn from_env() -> Result<VerbsOptions, FabricError> {
        let mut opts = VerbsOptions {
            device: std::env::var(DEVICE_ENV).ok().filter(|d| !d.is_empty()),
            ..VerbsOptions::default()
        };
        match std::env::var(IMMEDIATE_ENV).as_deref().map(str::trim) {
            Err(_) | Ok("" | "1") => {}
            Ok("0") => opts.immediate_data = false,
            Ok(other) => {
                return Err(FabricError::Unavailable {
                    provider: "verbs",
                    reason: format!("{IMMEDIATE_ENV}={other:?}: use 0 (separate indications) or 1"),
                })
            }
        }
        if let Ok(index) = std::env::var(GID_INDEX_ENV) {
            if !index.is_empty() {
                opts.gid_index = Some(index.trim().parse().map_err(|_| FabricError::Unavailable {
                    provider: "verbs",
                    reason: format!("{GID_INDEX_ENV}={index:?} is not a GID index (0..=255)"),
                })?);
            }
        }
        Ok(opts)
    }
}

/// The verbs fabric: one opened RDMA device port, one protection domain.
#[derive(Debug, Clone)]
pub struct VerbsFabric {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Arc<Context>,
    /// Its registrar is the fabric's device protection domain.
    domain: ProtectionDomain,
    opts: VerbsOptions,
    caps: Capabilities,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = self.ctx.info();
        f.debug_struct("VerbsFabric")
            .field("device", &info.name)
            .field("port", &info.port)
            .field("gid_index", &info.gid_index)
            .field("caps", &self.caps)
            .finish()
    }
}

impl VerbsFabric {
    /// Opens the device named by `CHANIO_VERBS_DEVICE` (or the first one).
    ///
    /// # Errors
    /// [`FabricError::Unavailable`] at once when libibverbs or an RDMA
    /// device is missing, with how to create a soft-RoCE device.
    pub fn new() -> Result<VerbsFabric, FabricError> {
        VerbsFabric::open(VerbsOptions::from_env()?)
    }

    /// Opens a device with the given options.
    ///
    /// # Errors
    /// [`FabricError::Unavailable`] (no library, no device, port down, bad
    /// GID index) or [`FabricError::Io`] (protection domain).
    pub fn open(opts: VerbsOptions) -> Result<VerbsFabric, FabricError> {
        let ctx = Context::open(&OpenSpec {
            device: opts.device.clone(),
            port: opts.port,
            gid_index: opts.gid_index,
        })?;
        let pd = Pd::new(&ctx)?;
        let info = ctx.info();
        let max_cqe = info.max_cqe.max(2);
        let caps = Capabilities {
            immediate_data: opts.immediate_data && !info.iwarp,
            max_message: opts.max_message.min(info.max_msg_sz.max(1)),
            max_send_wr: opts.max_send_wr.min(info.max_qp_wr).min(max_cqe / 2).max(1),
            max_recv_wr: opts.max_recv_wr.min(info.max_qp_wr).min(max_cqe / 2).max(1),
        };
        tracing::debug!(device = %info.name, port = info.port, gid_index = info.gid_index, ?caps, "verbs fabric open");
        let domain = ProtectionDomain::with_registrar(pd as Arc<dyn Registrar>);
        Ok(VerbsFabric {
            inner: Arc::new(Inner {
                ctx,
                domain,
                opts,
                caps,
            }),
        })
    }

    /// Name of the device in use.
    pub fn device_name(&self) -> &str {
        &self.inner.ctx.info().name
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, FabricError> {
    let bad = |reason: String| FabricError::BadAddress {
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| bad(format!("{e} (verbs addresses are the TCP host:port of the exchange)")))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))
}

fn params_fit(peer: &str, params: &[u8]) -> Result<(), FabricError> {
    if params.len() > oob::MAX_PARAMS {
        return Err(FabricError::Handshake {
            peer: peer.to_string(),
            reason: format!("local parameters too long ({} bytes)", params.len()),
        });
    }
    Ok(())
}

impl Fabric for VerbsFabric {
    fn name(&self) -> &'static str {
        "verbs"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }

    fn domain(&self) -> &ProtectionDomain {
        &self.inner.domain
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, FabricError> {
        let sa = resolve(addr)?;
        let listen_err = |source| FabricError::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = std::net::TcpListener::bind(sa).map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let wake = Arc::new(WakeFd::new().map_err(listen_err)?);
        let shared = Arc::new(ListenShared {
            handshakes: AtomicUsize::new(0),
            queue: AcceptQueue::new(MAX_PENDING),
        });
        let thread = {
            let (shared, wake, fabric) = (shared.clone(), wake.clone(), self.clone());
            std::thread::Builder::new()
                .name("chanio-verbs-accept".into())
                .spawn(move || accept_loop(listener, wake, shared, fabric))
                .map_err(|source| FabricError::Io {
                    op: "spawn accept thread",
                    source,
                })?
        };
        tracing::debug!(%local, device = %self.device_name(), "verbs listener up");
        Ok(Box::new(VerbsListener {
            local,
            shared,
            wake,
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
        let sa = resolve(addr)?;
        let peer = format!("verbs://{sa}");
        params_fit(&peer, params)?;
        let timeout = self.inner.opts.connect_timeout;
        let conn_err = |source| FabricError::Connect {
            addr: addr.to_string(),
            source,
        };
        let handshake = |reason: String| FabricError::Handshake {
            peer: peer.clone(),
            reason,
        };
        // Receives are posted (INIT) before the peer can learn our QP number.
        let mut prepared = qp::PreparedQp::new(&self.inner, domain, recvs)?;
        let mut stream = TcpStream::connect_timeout(&sa, timeout).map_err(conn_err)?;
        stream.set_nodelay(true).map_err(conn_err)?;
        let hello = oob::endpoint_body(&prepared.endpoint(), params);
        oob::write_message(&mut stream, oob::KIND_HELLO, &hello).map_err(conn_err)?;
        let (kind, body) = oob::read_message(&mut stream, timeout).map_err(|e| handshake(e.to_string()))?;
        match kind {
            oob::KIND_ACCEPT => {
                let (remote, peer_params) = oob::parse_endpoint(&body).map_err(handshake)?;
                oob::check_gid_types(self.inner.ctx.info().gid_type, remote.gid_type).map_err(handshake)?;
                prepared.ready_to_send(&remote)?;
                oob::write_message(&mut stream, oob::KIND_READY, &[]).map_err(conn_err)?;
                prepared
                    .start(stream, peer, peer_params)
                    .map(|qp| Box::new(qp) as Box<dyn QueuePair>)
            }
            oob::KIND_REJECT => Err(FabricError::Rejected {
                peer,
                reason: String::from_utf8_lossy(&body).into_owned(),
            }),
            other => Err(handshake(format!("unexpected exchange message kind {other} in answer"))),
        }
    }
}

// ---------------------------------------------------------------------------
// Listener

struct ListenShared {
    handshakes: AtomicUsize,
    queue: AcceptQueue<VerbsIncoming>,
}

/// A listening verbs endpoint (the TCP side of the exchange).
pub struct VerbsListener {
    local: SocketAddr,
    shared: Arc<ListenShared>,
    wake: Arc<WakeFd>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for VerbsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsListener").field("local", &self.local).finish()
    }
}

const MAX_PENDING: usize = 128;
const MAX_HANDSHAKES: usize = 64;

fn accept_loop(listener: std::net::TcpListener, wake: Arc<WakeFd>, shared: Arc<ListenShared>, fabric: VerbsFabric) {
    let mut poll_failed = false;
    while !shared.queue.is_closed() {
        match device::wait_readable([listener.as_raw_fd(), wake.fd()], None) {
            Ok([_, woken]) => {
                if woken {
                    wake.drain();
                }
            }
            Err(e) => {
                // Persistent: go on by polling the (non-blocking) listener.
                if !poll_failed {
                    tracing::error!(error = %e, "poll on the verbs listener failed; polling every 10 ms instead");
                    poll_failed = true;
                }
                std::thread::sleep(Duration::from_millis(10));
                wake.drain();
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    if shared.handshakes.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
                        shared.handshakes.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!(%peer, "refusing verbs connection: {MAX_HANDSHAKES} hellos already pending");
                        continue;
                    }
                    let (shared, fabric) = (shared.clone(), fabric.clone());
                    let spawned = std::thread::Builder::new()
                        .name("chanio-verbs-hello".into())
                        .spawn(move || {
                            handshake(stream, peer, &shared, fabric);
                            shared.handshakes.fetch_sub(1, Ordering::AcqRel);
                        });
                    if let Err(e) = spawned {
                        tracing::warn!(%peer, error = %e, "refusing connection: cannot spawn handshake thread");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; listener keeps going");
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
}

fn handshake(stream: TcpStream, peer: SocketAddr, shared: &ListenShared, fabric: VerbsFabric) {
    let refuse = |reason: &str| tracing::warn!(%peer, "refusing verbs connection: {reason}");
    let setup = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        return refuse(&format!("socket setup: {e}"));
    }
    let mut stream = stream;
    let (kind, body) = match oob::read_message(&mut stream, fabric.inner.opts.handshake_timeout) {
        Ok(message) => message,
        Err(e) => {
            let reason = e.to_string();
            if matches!(e, HelloError::Version { .. }) {
                let _ = oob::write_message(&mut stream, oob::KIND_REJECT, reason.as_bytes());
                let _ = stream.shutdown(Shutdown::Write);
            }
            return refuse(&reason);
        }
    };
    if kind != oob::KIND_HELLO {
        return refuse(&format!("first message is kind {kind}, not a hello"));
    }
    let (remote, params) = match oob::parse_endpoint(&body) {
        Ok(parsed) => parsed,
        Err(reason) => {
            let _ = oob::write_message(&mut stream, oob::KIND_REJECT, reason.as_bytes());
            return refuse(&reason);
        }
    };
    if let Err(reason) = oob::check_gid_types(fabric.inner.ctx.info().gid_type, remote.gid_type) {
        let _ = oob::write_message(&mut stream, oob::KIND_REJECT, reason.as_bytes());
        return refuse(&reason);
    }
    let incoming = VerbsIncoming {
        stream,
        peer: format!("verbs://{peer}"),
        params,
        remote,
        fabric,
    };
    match shared.queue.offer(incoming) {
        Ok(()) | Err(Refused::Closed) => {}
        Err(Refused::Full(mut incoming)) => {
            let _ = oob::write_message(&mut incoming.stream, oob::KIND_REJECT, b"too many pending connections");
            refuse("accept queue full");
        }
    }
}

impl Listener for VerbsListener {
    fn local_addr(&self) -> String {
        self.local.to_string()
    }

    fn accept(&self, timeout: Option<Duration>) -> Result<Box<dyn Incoming>, FabricError> {
        self.shared.queue.take(timeout).map(|i| Box::new(i) as _)
    }

    fn shutdown(&self) {
        self.shared.queue.close();
        self.wake.wake();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for VerbsListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A connection whose hello was received and checked.
pub struct VerbsIncoming {
    stream: TcpStream,
    peer: String,
    params: Vec<u8>,
    remote: Endpoint,
    fabric: VerbsFabric,
}

impl std::fmt::Debug for VerbsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsIncoming").field("peer", &self.peer).finish()
    }
}

impl Incoming for VerbsIncoming {
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
        let VerbsIncoming {
            mut stream,
            peer,
            params: peer_params,
            remote,
            fabric,
        } = *self;
        params_fit(&peer, params)?;
        let prepared =
            qp::PreparedQp::new(&fabric.inner, domain, recvs).and_then(|mut p| p.ready_to_send(&remote).map(|()| p));
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                // Tell the client instead of leaving it to time out.
                let reason = format!("server cannot set up its queue pair: {e}");
                let _ = oob::write_message(&mut stream, oob::KIND_REJECT, reason.as_bytes());
                return Err(e);
            }
        };
        let answer = oob::endpoint_body(&prepared.endpoint(), params);
        oob::write_message(&mut stream, oob::KIND_ACCEPT, &answer).map_err(|source| FabricError::Io {
            op: "write exchange answer",
            source,
        })?;
        // The client is ready to receive only once it says so: our first
        // Send must not reach a queue pair that is not in RTR yet.
        let handshake = |reason: String| FabricError::Handshake {
            peer: peer.clone(),
            reason,
        };
        match oob::read_message(&mut stream, fabric.inner.opts.handshake_timeout)
            .map_err(|e| handshake(e.to_string()))?
        {
            (oob::KIND_READY, _) => {}
            (kind, _) => return Err(handshake(format!("expected READY, got message kind {kind}"))),
        }
        prepared
            .start(stream, peer, peer_params)
            .map(|qp| Box::new(qp) as Box<dyn QueuePair>)
    }

    fn reject(mut self: Box<Self>, reason: &str) {
        let _ = self
            .stream
            .write_all(&oob::message(oob::KIND_REJECT, reason.as_bytes()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::provider::WcStatus;
    use rdma_mummy_sys::ibv_wc_status as s;

    #[test]
    fn without_a_device_open_fails_at_once_saying_how_to_make_one() {
        let started = Instant::now();
        match VerbsFabric::open(VerbsOptions::default()) {
            Ok(fabric) => eprintln!("an RDMA device is present ({}); nothing to check", fabric.device_name()),
            Err(FabricError::Unavailable { provider, reason }) => {
                assert_eq!(provider, "verbs");
                assert!(
                    reason.contains("sudo rdma link add rxe0 type rxe netdev <interface>"),
                    "{reason}"
                );
                assert!(reason.contains("modprobe rdma_rxe"), "{reason}");
                assert!(reason.contains("ibv_devices"), "{reason}");
                assert!(started.elapsed() < Duration::from_secs(2), "fails at once");
                let shown = FabricError::Unavailable { provider, reason }.to_string();
                assert!(shown.starts_with("verbs provider unavailable: "), "{shown}");
            }
            Err(other) => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_device_is_unavailable() {
        let opts = VerbsOptions {
            device: Some("no-such-rdma-device".into()),
            ..VerbsOptions::default()
        };
        assert!(matches!(
            VerbsFabric::open(opts),
            Err(FabricError::Unavailable { provider: "verbs", .. })
        ));
    }

    #[test]
    fn every_completion_status_maps() {
        use device::map_status;
        assert_eq!(map_status(s::IBV_WC_SUCCESS), WcStatus::Success);
        assert_eq!(map_status(s::IBV_WC_REM_ACCESS_ERR), WcStatus::RemoteAccessError);
        assert_eq!(map_status(s::IBV_WC_RNR_RETRY_EXC_ERR), WcStatus::ReceiverNotReady);
        assert_eq!(map_status(s::IBV_WC_REM_INV_REQ_ERR), WcStatus::RemoteInvalidRequest);
        assert_eq!(map_status(s::IBV_WC_LOC_LEN_ERR), WcStatus::LocalLengthError);
        assert_eq!(map_status(s::IBV_WC_LOC_PROT_ERR), WcStatus::LocalProtectionError);
        assert_eq!(map_status(s::IBV_WC_WR_FLUSH_ERR), WcStatus::Flushed);
        assert_eq!(map_status(s::IBV_WC_REM_OP_ERR), WcStatus::RemoteOperationError);
        assert_eq!(map_status(s::IBV_WC_RETRY_EXC_ERR), WcStatus::RemoteOperationError);
        for status in 0..=s::IBV_WC_TM_RNDV_INCOMPLETE + 5 {
            let mapped = map_status(status);
            assert_eq!(mapped == WcStatus::Success, status == s::IBV_WC_SUCCESS, "{status}");
        }
    }

    #[test]
    fn a_receive_too_small_is_a_local_length_error_on_rxe_and_mlx5() {
        use device::{map_recv_status, map_status};
        assert_eq!(map_recv_status(s::IBV_WC_REM_INV_REQ_ERR), WcStatus::LocalLengthError);
        assert_eq!(map_recv_status(s::IBV_WC_LOC_LEN_ERR), WcStatus::LocalLengthError);
        for status in 0..=s::IBV_WC_TM_RNDV_INCOMPLETE + 5 {
            if status != s::IBV_WC_REM_INV_REQ_ERR {
                assert_eq!(map_recv_status(status), map_status(status), "{status}");
            }
        }
    }
}
