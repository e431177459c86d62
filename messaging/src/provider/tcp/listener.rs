//! The tcp listener: accepts connections, bounds handshakes per listener
//! and per source address, and reads hellos on its own poll thread.

use super::*;

pub(super) struct ListenShared {
    pub(super) handshakes: std::sync::atomic::AtomicUsize,
    /// The hellos being read, oldest first, each with a handle on its
    /// socket that ends the read when the hello is evicted.
    pub(super) hellos: Mutex<VecDeque<PendingHello>>,
    pub(super) next_hello: std::sync::atomic::AtomicU64,
    pub(super) queue: AcceptQueue<TcpIncoming>,
    /// Live connections per source address.
    pub(super) per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Hellos awaited per source address.
    pub(super) hellos_per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A hello being read on its handshake thread.
pub(super) struct PendingHello {
    id: u64,
    peer: SocketAddr,
    since: Instant,
    /// The same socket (a duplicated descriptor), to shut it down.
    handle: TcpStream,
}

/// A handshake's place among those being read (its entry and its count),
/// given back however the handshake ends.
pub(super) struct HandshakePlace {
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
pub(super) fn stream_handle(stream: &mio::net::TcpStream) -> io::Result<TcpStream> {
    use std::os::fd::{AsFd, OwnedFd};
    let fd: OwnedFd = stream.as_fd().try_clone_to_owned()?;
    Ok(TcpStream::from(fd))
}

/// Every handshake is taken: ends the oldest pending hello if it waited
/// longer than [`HELLO_EVICTABLE_AFTER`] (its thread then reads the end of
/// the stream and goes), so that `peer` gets its turn. Whether it did.
pub(super) fn evict_oldest_hello(shared: &ListenShared, peer: SocketAddr) -> bool {
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
pub(super) struct AddressSlot {
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
    pub(super) local: SocketAddr,
    pub(super) shared: Arc<ListenShared>,
    pub(super) waker: Arc<Waker>,
    pub(super) thread: Mutex<Option<JoinHandle<()>>>,
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
pub(super) const HELLO_EVICTABLE_AFTER: Duration = Duration::from_millis(100);
/// Most hellos awaited from one source address.
pub(crate) const MAX_HANDSHAKES_PER_ADDRESS: usize = 16;

/// The listener's thread: accepts connections and hands each hello to a
/// handshake thread, within the listener's limits. Long: one poll loop
/// with its accept, eviction and shutdown cases side by side.
pub(super) fn accept_loop(
    mut poll: Poll,
    listener: mio::net::TcpListener,
    shared: Arc<ListenShared>,
    fabric: TcpFabric,
) {
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

pub(super) fn handshake(
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
        Err(e) => {
            let reason = e.to_string();
            if matches!(e, HelloError::Version { .. }) {
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
        crate::provider::check_domain(domain, &self.fabric.pd, "tcp")?;
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
        // posts them before anything reads the socket.
        let answer = hello_bytes(KIND_ACCEPT, params);
        let mut qp = TcpQp::start_with_answer(fabric, domain.clone(), stream, peer, peer_params, recvs, Some(answer))?;
        qp._slot = Some(slot);
        Ok(Box::new(qp))
    }

    fn reject(mut self: Box<Self>, reason: &str) {
        let _ = self.stream.write_all(&hello_bytes(KIND_REJECT, reason.as_bytes()));
    }
}
