//! The receive side, driven by waiting callers or by the progress engine: reads
//! frames, executes them through the common responder, and fails the queue
//! pair on a protocol violation.

use super::*;

/// The receive side of a queue pair: the read-ahead buffer, the frame being
/// read and what it produced. Whoever holds it (a waiting caller or the I/O
/// thread) reads the socket.
pub(super) struct Rx {
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
pub(super) enum Sink {
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

pub(super) fn fatal(reason: impl Into<String>) -> Fatal {
    Fatal::closed(reason)
}

pub(super) fn violation(reason: impl Into<String>) -> Fatal {
    Fatal::violation(reason)
}

impl QpShared {
    /// One round of work without blocking: read and execute what the socket
    /// holds, queue the ACK, write what is queued, publish completions. The
    /// ACK goes out before completions are published: an application that
    /// disconnects as soon as it sees a message must not overtake the
    /// acknowledgement of that message. False once the queue pair failed
    /// (everything is flushed by then).
    pub(super) fn pump(&self, rx: &mut Rx, short_read_drains: bool) -> bool {
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
    pub(super) fn drive(&self, timeout: Option<Duration>) -> bool {
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

/// The progress engine's round: it reads the socket whenever no caller
/// drives it (an asynchronous application, a peer's traffic nobody waits
/// for), and finishes writes the socket did not take.
impl Driven for QpShared {
    fn round(&self, aside: &mut Aside, fired: &mut u32) -> Next {
        // The socket is read to the end in every round: what fired is news
        // only, and it is consumed by any round.
        *fired = 0;
        let round = self.drive.engine_round(&self.rx, &self.failed, aside, |rx| {
            if !self.pump(rx, false) {
                return None;
            }
            match self.ack_before_sleep() {
                Ok(unwritten) => Some(unwritten),
                Err(e) => {
                    rx.fail(self, fatal(format!("write: {e}")));
                    None
                }
            }
        });
        match round {
            Ok(Some(unwritten)) => Next::Sleep { writable: unwritten },
            Ok(None) => Next::Done,
            Err(next) => next,
        }
    }
}

impl Rx {
    pub(super) fn new() -> Rx {
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
    /// that polls saves the read that would say so); the engine's round
    /// reads to EAGAIN, so that one round takes everything there.
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
        Fatal::refused(psn, refusal, &mut self.completions)
    }

    /// Starts executing a frame whose header was read: one function per
    /// opcode decides where its payload goes (`self.sink`) or what it does.
    fn begin_frame(&mut self, sh: &QpShared, header: Header) -> Result<(), Fatal> {
        let max = sh.fabric.opts.max_message;
        if header.len > max {
            return Err(violation(format!(
                "frame of {} bytes exceeds the {max}-byte limit",
                header.len
            )));
        }
        match header.opcode {
            OP_SEND | OP_SEND_IMM => self.begin_send(sh, header),
            OP_WRITE | OP_WRITE_IMM => self.begin_write(sh, header),
            OP_READ_REQ => self.answer_read(sh, header),
            OP_READ_RESP => self.begin_read_response(sh, header),
            OP_ACK => complete_acked(&mut self.completions, &mut sh.tx.lock(), header.psn, true),
            OP_NAK => Err(self.take_nak(sh, header)),
            OP_DISCONNECT => Err(fatal("peer disconnected")),
            _ => Err(violation(format!("unknown opcode {}", header.opcode))),
        }
    }

    /// A Send: its payload goes into the next posted receive.
    fn begin_send(&mut self, sh: &QpShared, header: Header) -> Result<(), Fatal> {
        self.check_psn(&header)?;
        let accepted = responder::accept_send(&mut sh.recvs.lock(), header.len);
        let wr = accepted.map_err(|r| self.refuse(header.psn, r))?;
        self.sink = Sink::Recv { wr, header, filled: 0 };
        Ok(())
    }

    /// A Write: its payload goes into the registered region the key names.
    fn begin_write(&mut self, sh: &QpShared, header: Header) -> Result<(), Fatal> {
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
        Ok(())
    }

    /// A Read request: queues the response, whose payload is the region
    /// itself (written from there, not copied).
    fn answer_read(&mut self, sh: &QpShared, header: Header) -> Result<(), Fatal> {
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
        tx.frames.push_back(TxFrame {
            header: response.encode(),
            payload: TxPayload::Region(target),
            request_psn: None,
        });
        Ok(())
    }

    /// A Read response: acks every earlier request, and its payload goes
    /// into the buffer of the oldest outstanding request, which must be
    /// that Read.
    fn begin_read_response(&mut self, sh: &QpShared, header: Header) -> Result<(), Fatal> {
        let mut tx = sh.tx.lock();
        complete_acked(
            &mut self.completions,
            &mut tx,
            header.psn.wrapping_sub(1),
            header.psn > 0,
        )?;
        let front = tx.outstanding.pop_front();
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
                Ok(())
            }
            other => {
                if let Some(p) = other {
                    tx.outstanding.push_front(p);
                }
                Err(violation(format!(
                    "read response for psn {} matches no read",
                    header.psn
                )))
            }
        }
    }

    /// A NAK: acks what came before it, completes the refused request with
    /// the peer's status, and ends the queue pair.
    fn take_nak(&mut self, sh: &QpShared, header: Header) -> Fatal {
        let status = WcStatus::from_code(header.status)
            .filter(|s| !s.is_success())
            .unwrap_or(WcStatus::RemoteOperationError);
        let mut tx = sh.tx.lock();
        if let Err(f) = complete_acked(
            &mut self.completions,
            &mut tx,
            header.psn.wrapping_sub(1),
            header.psn > 0,
        ) {
            return f;
        }
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
        fatal(format!("peer refused request {}: {status}", header.psn))
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
pub(super) fn sink_dest(sink: &mut Sink) -> &mut [u8] {
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

pub(super) fn advance_sink(sink: &mut Sink, n: usize) {
    match sink {
        Sink::Idle => {}
        Sink::Recv { filled, .. } | Sink::Remote { filled, .. } | Sink::ReadResp { filled, .. } => *filled += n,
    }
}

/// Completes every outstanding request up to `psn` (inclusive) as executed.
pub(super) fn complete_acked(completions: &mut Vec<Completion>, tx: &mut Tx, psn: u64, any: bool) -> Result<(), Fatal> {
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

pub(super) fn take_frame_buf(tx: &mut Tx, psn: u64) -> Option<Buf> {
    let pos = tx.frames.iter().position(|f| f.request_psn == Some(psn))?;
    let frame = tx.frames.remove(pos)?;
    match frame.payload {
        TxPayload::Buf(b) => Some(b),
        _ => None,
    }
}

/// One non-blocking vectored read: `Some(n)` bytes, `None` when drained.
pub(super) fn read_vectored_some(
    stream: &mio::net::TcpStream,
    iov: &mut [IoSliceMut<'_>],
) -> Result<Option<usize>, Fatal> {
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
pub(super) fn read_some(stream: &mio::net::TcpStream, dest: &mut [u8]) -> Result<Option<usize>, Fatal> {
    if dest.is_empty() {
        return Err(fatal("internal: read into an empty buffer"));
    }
    read_vectored_some(stream, &mut [IoSliceMut::new(dest)])
}
