//! Progress, driven by waiting callers or by the progress engine: executes
//! the incoming ring through the common responder, takes grants and
//! exports, and fails the queue pair on a protocol violation.

use super::*;

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
    pub(super) fn drive(&self, timeout: Option<Duration>) -> bool {
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
                // The engine may sleep on the same flag: leave it set for
                // the producer to ring, or nothing would wake the engine
                // once this caller is gone.
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

/// The progress engine's round: it executes the incoming ring whenever no
/// caller drives (an asynchronous application, a peer's traffic nobody
/// waits for). Descriptor 0 is the ring's eventfd, 1 the socket.
impl Driven for Shared {
    fn round(&self, aside: &mut Aside, fired: &mut u32) -> Next {
        let round = self.drive.engine_round(&self.progress, &self.failed, aside, |p| {
            // What the engine slept on is news now.
            self.thread_polling.store(false, Ordering::SeqCst);
            p.rx.woke();
            if *fired & 1 != 0 {
                sys::drain_eventfd(&self.links.wake_me);
            }
            p.socket_ready |= *fired & 2 != 0;
            *fired = 0;
            if !self.pump(p) {
                return None;
            }
            let entries_came = p.rx.prepare_sleep();
            self.thread_polling.store(!entries_came, Ordering::SeqCst);
            Some(entries_came)
        });
        match round {
            Ok(None) => Next::Done,
            Ok(Some(true)) => Next::Again,
            Ok(Some(false)) => Next::Sleep { writable: false },
            Err(next) => {
                // The engine stays aside: the producer need not ring for it
                // (a caller that sleeps on the ring holds the lock and keeps
                // its own request to be rung).
                self.drive.engine_try(&self.progress, |p| {
                    self.thread_polling.store(false, Ordering::SeqCst);
                    p.rx.woke();
                });
                next
            }
        }
    }
}

pub(super) fn violation(reason: impl Into<String>) -> Fatal {
    Fatal::violation(format!("protocol violation: {}", reason.into()))
}

pub(super) fn nak(psn: u64, status: WcStatus, reason: impl Into<String>) -> Fatal {
    Fatal::nak(psn, status, reason)
}

pub(super) fn refuse(psn: u64, refusal: Refusal, completions: &mut Vec<Completion>) -> Fatal {
    Fatal::refused(psn, refusal, completions)
}

/// The progress state: the incoming ring and the peer's memfds.
pub(super) struct Progress {
    pub(super) rx: Ring,
    pub(super) expected_psn: u64,
    pub(super) maps: IntMap<u64, Arc<Mapping>>,
    pub(super) entries: Vec<Entry>,
    /// Completions of one batch (kept to reuse its allocation).
    pub(super) completions: Vec<Completion>,
    /// Grants made while executing a batch, published with its ACK.
    pub(super) grants_out: Vec<Entry>,
    /// `poll` said the socket is readable: drain it in the next pump.
    pub(super) socket_ready: bool,
    /// The socket failed (end of file): fail once the ring is executed.
    pub(super) socket_failed: Option<Fatal>,
    /// The queue pair failed and everything was flushed.
    pub(super) dead: bool,
}

impl Progress {
    /// `poll` itself failed: the queue pair cannot wait any more.
    fn poll_failed(&mut self, sh: &Shared, e: &std::io::Error) {
        self.fail(sh, Fatal::violation(format!("poll: {e}")));
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
        sh.fail_locked(&mut st, &fatal.reason, fatal.violation);
    }

    /// Takes every queued control message (memfd exports) off the socket;
    /// `Err` once the socket reached end of file.
    fn drain_socket(&mut self, sh: &Shared) -> Result<(), Fatal> {
        loop {
            match sh.links.sock.try_recv(CTL_BYTES + 1) {
                Ok(Some(msg)) => self.handle_control(sh, msg)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    return Err(Fatal::closed(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        "peer closed the connection".into()
                    } else {
                        format!("socket: {e}")
                    }))
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
    pub(super) fn ensure_mapped(&mut self, sh: &Shared, serial: u64) -> Result<(), Fatal> {
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
                        Err(Fatal::closed(format!("peer refused request {}: {status}", e.psn)))
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
        let offset = usize::try_from(e.offset).map_err(|_| violation("offset out of range"))?;
        match e.opcode {
            OP_SEND | OP_SEND_IMM => self.execute_send(sh, st, e, offset, completions),
            OP_WRITE | OP_WRITE_IMM => self.execute_write(sh, st, e, offset, completions),
            _ => {
                let target = responder::accept_read(&sh.domain, RKey(e.rkey), e.addr, e.len.into())
                    .map_err(|r| refuse(e.psn, r, completions))?;
                self.ensure_mapped(sh, e.serial)?;
                if !self.maps[&e.serial].write_from(offset, target.as_slice()) {
                    return Err(violation("Read destination outside its memfd"));
                }
                Ok(())
            }
        }
    }

    /// A Send: its data (inline in the ring, or in the initiator's memfd)
    /// goes into the next posted receive.
    fn execute_send(
        &mut self,
        sh: &Shared,
        st: &mut State,
        e: &Entry,
        offset: usize,
        completions: &mut Vec<Completion>,
    ) -> Result<(), Fatal> {
        let len = e.len as usize;
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
        Ok(())
    }

    /// A Write: copied from the initiator's memfd into the region (which is
    /// then granted for placement), or, placed already, only checked.
    fn execute_write(
        &mut self,
        sh: &Shared,
        st: &mut State,
        e: &Entry,
        offset: usize,
        completions: &mut Vec<Completion>,
    ) -> Result<(), Fatal> {
        if e.placed && !st.granted.contains_key(&e.rkey) {
            return Err(violation(format!(
                "placed Write under key {:#x}, never granted",
                e.rkey
            )));
        }
        // A placed Write is checked as any Write (the region may have gone
        // since the grant: a remote access error then, as a Write into a
        // deregistered region gets), and must have gone into the memfd of
        // the region the key names now (a key reused after its region died
        // names another one).
        let accepted = responder::accept_write(
            &sh.domain,
            &mut st.recvs,
            RKey(e.rkey),
            e.addr,
            e.len.into(),
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
        Ok(())
    }
}

/// Completes every outstanding request up to `psn` (inclusive) as executed.
pub(super) fn complete_acked(st: &mut State, psn: u64, completions: &mut Vec<Completion>) -> Result<(), Fatal> {
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
