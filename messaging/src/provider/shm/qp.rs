//! The shm queue pair and its send side: requests go into the outgoing ring,
//! with exports of new memory announced on the socket first.

use super::*;
use crate::mr::Buf;
use crate::provider::Placement;

/// What connects a queue pair to its peer.
pub(super) struct Links {
    pub(super) sock: Socket,
    pub(super) rings: Arc<Mapping>,
    pub(super) tx_base: usize,
    pub(super) rx_base: usize,
    /// The eventfd the peer's progress sleeps on.
    pub(super) wake_peer: OwnedFd,
    /// The eventfd ours sleeps on.
    pub(super) wake_me: OwnedFd,
}

pub(super) struct Shared {
    pub(super) fabric: ShmFabric,
    /// The connection's protection domain: the peer's remote keys are
    /// looked up here only.
    pub(super) domain: ProtectionDomain,
    pub(super) links: Links,
    pub(super) peer: String,
    pub(super) peer_params: Vec<u8>,
    pub(super) state: Mutex<State>,
    pub(super) cq: CompletionQueue,
    pub(super) failed: AtomicBool,
    /// The incoming ring and what executing it needs; its holder executes.
    pub(super) progress: Mutex<Progress>,
    /// Who drives `progress`: waiting callers or the progress engine.
    pub(super) drive: Drive,
    /// The progress engine sleeps on the ring's sleeping flag.
    pub(super) thread_polling: AtomicBool,
    /// Regions the peer granted for placed Writes, by remote key.
    pub(super) grants: Mutex<IntMap<u32, Grant>>,
    /// The placement handshake of the outgoing ring (this side places into
    /// the peer's memory) and of the incoming one (the peer places into ours).
    out_gate: Gate,
    in_gate: Gate,
}

/// A region of the peer this side may place Writes into.
pub(super) struct Grant {
    pub(super) serial: u64,
    /// The region's first address and size, in the peer's terms.
    pub(super) base: u64,
    pub(super) size: u64,
    pub(super) map: Arc<Mapping>,
}

pub(super) struct State {
    pub(super) failed: bool,
    pub(super) tx: Ring,
    pub(super) next_psn: u64,
    pub(super) outstanding: VecDeque<Pending>,
    pub(super) recvs: VecDeque<RecvWr>,
    /// Memfds (by serial) this side has sent to the peer.
    exported: IntSet<u64>,
    /// Of those, memory shared by its owner (`share_memory`): not a
    /// registration of the fabric's, so never unexported as a dead one.
    pub(super) shared_out: IntSet<u64>,
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
    pub(super) granted: IntMap<u32, (u64, u64)>,
}

pub(super) struct Pending {
    pub(super) psn: u64,
    pub(super) id: crate::provider::WrId,
    pub(super) opcode: WcOpcode,
    pub(super) buf: crate::mr::Buf,
    /// A local error to complete with when the queue pair is flushed.
    pub(super) error: Option<WcStatus>,
}

/// A connected shm queue pair.
pub struct ShmQp {
    /// Its place in the progress engine: declared first, so it is dropped
    /// (and the descriptors leave the engine's epoll) before they close.
    _engine: Registration,
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for ShmQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmQp")
            .field("peer", &self.shared.peer)
            .field("failed", &self.shared.failed.load(Ordering::Relaxed))
            .finish()
    }
}

pub(super) fn start(
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
    let engine = engine::reserve().map_err(|source| FabricError::Io {
        op: "start the progress engine",
        source,
    })?;
    drive.attach_engine(engine.waker());
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
            shared_out: IntSet::default(),
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
    let driven: Arc<dyn Driven> = shared.clone();
    let events = libc::EPOLLIN as u32;
    engine
        .start(
            Arc::downgrade(&driven),
            &[
                (shared.links.wake_me.as_raw_fd(), events),
                (shared.links.sock.raw(), events),
            ],
        )
        .map_err(|source| FabricError::Io {
            op: "epoll_ctl",
            source,
        })?;
    Ok(Box::new(ShmQp {
        _engine: engine,
        shared,
    }))
}

impl ShmQp {
    /// Posts `wrs` (with their `placements`, one each, when some were
    /// placed) as one batch into the outgoing ring. Long: each request's
    /// local checks, its ring entry and the batch's push, under the one
    /// state lock.
    fn post(&self, wrs: &mut Vec<SendWr>, mut placements: Option<&mut Vec<Option<u64>>>) -> Result<(), FabricError> {
        // The responder copies a Send from one buffer: the tail joins the
        // head here (order kept, so `placements` still lines up).
        crate::provider::flatten_gathers(wrs);
        let shared = &self.shared;
        let mut st = shared.state.lock();
        let depth = shared.fabric.opts.max_send_wr;
        if !st.failed && st.outstanding.len() + wrs.len() > depth as usize {
            return Err(FabricError::QueueFull { queue: "send", depth });
        }
        // `placements` is read in place and cleared, so the caller's vector
        // keeps its allocation for the next batch.
        if st.failed {
            shared.cq.push_all(wrs.drain(..).map(flushed_send));
            if let Some(p) = placements.as_mut() {
                p.clear();
            }
            return Ok(());
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
        for (i, wr) in wrs.drain(..).enumerate() {
            let placement = placements.as_ref().and_then(|p| p.get(i).copied().flatten());
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
            match shared.prepare(&mut st, &wr, placement, &mut planned, &mut data) {
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
        if let Some(p) = placements.as_mut() {
            p.clear();
        }
        if let Some(reason) = local_error {
            shared.fail_locked(&mut st, &reason, true);
        }
        Ok(())
    }
}

impl QueuePair for ShmQp {
    fn post_send(&self, wrs: &mut Vec<SendWr>) -> Result<(), FabricError> {
        self.post(wrs, None)
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

    fn placement(&self) -> Option<&dyn Placement> {
        Some(self)
    }

    fn share_memory(&self, memory: &dyn crate::mr::ExternalMemory) -> Result<Option<u64>, FabricError> {
        let Some(shared) = memory.memfd() else {
            return Ok(None);
        };
        let sh = &self.shared;
        // The whole memory goes to the peer, beyond any key's reach: only
        // to a process of this one's own user, which could read this
        // process's memory anyway.
        match sh.links.sock.peer_cred() {
            Ok(c) if c.uid == sys::effective_uid() => {}
            _ => return Ok(None),
        }
        let mut st = sh.state.lock();
        if st.failed {
            return Err(FabricError::Io {
                op: "share memory",
                source: std::io::Error::from(std::io::ErrorKind::NotConnected),
            });
        }
        if st.exported.contains(&shared.id) {
            return Ok(Some(shared.id));
        }
        sh.links
            .sock
            .send(&control(CTL_EXPORT, shared.id), &[shared.fd.as_raw_fd()])
            .map_err(|source| FabricError::Io {
                op: "share memory",
                source,
            })?;
        st.exported.insert(shared.id);
        st.shared_out.insert(shared.id);
        Ok(Some(shared.id))
    }

    fn peer_memory(&self, token: u64) -> Result<Option<crate::provider::PeerMemory>, FabricError> {
        let sh = &self.shared;
        let mut progress = sh.progress.lock();
        if let Err(fatal) = progress.ensure_mapped(sh, token) {
            return Err(FabricError::Io {
                op: "map the peer's shared memory",
                source: std::io::Error::other(fatal.reason),
            });
        }
        let map = progress.maps[&token].clone();
        Ok(Some(crate::provider::PeerMemory::new(map)))
    }
}

impl crate::provider::PeerMap for Mapping {
    fn len(&self) -> usize {
        Mapping::len(self)
    }

    fn read_into(&self, offset: usize, dest: &mut [u8]) -> bool {
        Mapping::read_into(self, offset, dest)
    }

    fn write_from(&self, offset: usize, src: &[u8]) -> bool {
        Mapping::write_from(self, offset, src)
    }
}

impl Placement for ShmQp {
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

    fn post_send_placed(&self, wrs: &mut Vec<SendWr>, placements: &mut Vec<Option<u64>>) -> Result<(), FabricError> {
        self.post(wrs, Some(placements))
    }
}

impl Drop for ShmQp {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl Shared {
    /// Checks a request locally, exports its memfd if needed and builds its
    /// ring entry (psn `next_psn`); a Write with a `placement` becomes the
    /// notification of a placed Write. A Send of at most [`MAX_INLINE`] bytes
    /// goes inline, its bytes appended to `data`, if the ring stays at most
    /// half full with `planned` slots in use before it; `planned` counts the
    /// entry's slots.
    fn prepare(
        &self,
        st: &mut State,
        wr: &SendWr,
        placement: Option<u64>,
        planned: &mut u64,
        data: &mut Vec<u8>,
    ) -> Result<Entry, (WcStatus, String)> {
        if let Some(placement) = placement {
            return match &wr.op {
                SendOp::Write { buf, remote, imm } => self.placed_entry(st, buf, *remote, *imm, placement, planned),
                _ => Err((WcStatus::LocalProtectionError, "only a Write can be placed".into())),
            };
        }
        let (opcode, buf, remote, imm) = match &wr.op {
            SendOp::Send { buf, imm } => (if imm.is_some() { OP_SEND_IMM } else { OP_SEND }, buf, None, *imm),
            SendOp::Write { buf, remote, imm } => (
                if imm.is_some() { OP_WRITE_IMM } else { OP_WRITE },
                buf,
                Some(*remote),
                *imm,
            ),
            SendOp::Read { buf, remote } => (OP_READ, buf, Some(*remote), None),
            SendOp::SendGather(_) => {
                return Err((
                    WcStatus::LocalProtectionError,
                    "a gathered Send reached the ring unflattened".into(),
                ))
            }
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

    /// The entry of a placed Write: the data is in the peer's memory already
    /// ([`Placement::place`]), so only the notification goes, naming the
    /// memfd the data went into (the peer refuses it if the key names
    /// another), and the token stays here.
    fn placed_entry(
        &self,
        st: &State,
        token: &Buf,
        remote: RemoteAddr,
        imm: Option<u32>,
        placement: u64,
        planned: &mut u64,
    ) -> Result<Entry, (WcStatus, String)> {
        if token.len() > self.fabric.opts.max_message as usize {
            return Err((WcStatus::LocalLengthError, "message longer than max_message".into()));
        }
        *planned += 1;
        Ok(Entry {
            opcode: if imm.is_some() { OP_WRITE_IMM } else { OP_WRITE },
            placed: true,
            len: token.len() as u32,
            psn: st.next_psn,
            serial: placement,
            addr: remote.addr,
            rkey: remote.rkey.0,
            imm: imm.unwrap_or(0),
            ..Entry::default()
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
    pub(super) fn export(&self, st: &mut State, serial: u64) -> Result<(), String> {
        if st.exported.contains(&serial) {
            return Ok(());
        }
        let memory = &self.fabric.memory;
        let dead: Vec<u64> = st
            .exported
            .iter()
            .copied()
            .filter(|s| !memory.is_live(*s) && !st.shared_out.contains(s))
            .collect();
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
    pub(super) fn fail_locked(&self, st: &mut State, reason: &str, warn: bool) {
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
pub(super) fn ack_entry(psn: u64) -> Entry {
    Entry {
        opcode: OP_ACK,
        psn,
        ..Entry::default()
    }
}

pub(super) fn control(kind: u8, serial: u64) -> [u8; CTL_BYTES] {
    let mut out = [0u8; CTL_BYTES];
    out[0] = kind;
    out[8..].copy_from_slice(&serial.to_le_bytes());
    out
}
