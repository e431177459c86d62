//! The shm listener: checks each peer's credentials, bounds handshakes, and
//! reads hellos.

use super::*;

/// A listening shm endpoint.
pub struct ShmListener {
    pub(super) name: String,
    pub(super) sock: Socket,
    pub(super) wake: OwnedFd,
    pub(super) shutdown: AtomicBool,
    /// Connections whose hello has not arrived yet, with their deadlines.
    pub(super) pending: Mutex<Vec<(Socket, Instant)>>,
    pub(super) fabric: ShmFabric,
}

/// Most connections whose hello is still awaited.
pub(super) const MAX_HANDSHAKES: usize = 64;

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
        let (kind, params) = parse_hello(&msg).map_err(|e| e.to_string())?;
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
        crate::provider::check_domain(domain, &this.fabric.pd, "shm")?;
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
