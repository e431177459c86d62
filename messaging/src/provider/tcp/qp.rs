//! The tcp queue pair and its send side: posting threads write their own
//! frames, and what does not fit stays queued as owned work requests.

use super::*;
use crate::provider::RemoteAddr;

/// A tcp queue pair.
pub struct TcpQp {
    /// Its place in the progress engine: declared first, so it is dropped
    /// (and the socket leaves the engine's epoll) before the socket closes.
    _engine: Registration,
    shared: Arc<QpShared>,
    /// An accepted queue pair's place in its address's count.
    pub(super) _slot: Option<AddressSlot>,
}

pub(super) struct QpShared {
    pub(super) stream: mio::net::TcpStream,
    pub(super) peer: String,
    peer_params: Vec<u8>,
    pub(super) fabric: TcpFabric,
    /// The connection's protection domain: the peer's remote keys are
    /// looked up here only.
    pub(super) domain: ProtectionDomain,
    pub(super) cq: CompletionQueue,
    pub(super) recvs: Mutex<VecDeque<RecvWr>>,
    pub(super) tx: Mutex<Tx>,
    pub(super) failed: AtomicBool,
    /// Schedules a round of the progress engine.
    waker: EngineWaker,
    /// The receive side; its holder reads the socket.
    pub(super) rx: Mutex<Rx>,
    /// Who drives `rx`: waiting callers or the progress engine.
    pub(super) drive: Drive,
}

#[derive(Default)]
pub(super) struct Tx {
    /// Frames not yet fully written; bytes of the first already written.
    pub(super) frames: VecDeque<TxFrame>,
    pub(super) head_written: usize,
    /// Requests written or being written, awaiting ACK or READ_RESP.
    pub(super) outstanding: VecDeque<Pending>,
    next_psn: u64,
    pub(super) failed: bool,
    /// The newest request executed for the peer and not yet acknowledged:
    /// it rides on the next frame written, or goes out as an ACK.
    pub(super) ack_due: Option<u64>,
    /// Pumps that read nothing since `ack_due` became due.
    pub(super) ack_idle: u32,
    /// One past the newest psn acknowledged so far.
    pub(super) acked: u64,
}

impl Tx {
    /// Queues an explicit ACK for whatever is due.
    pub(super) fn ack_now(&mut self) {
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

impl TcpQp {
    pub(super) fn start(
        fabric: TcpFabric,
        domain: ProtectionDomain,
        stream: TcpStream,
        peer: String,
        peer_params: Vec<u8>,
        recvs: Vec<RecvWr>,
    ) -> Result<TcpQp, FabricError> {
        TcpQp::start_with_answer(fabric, domain, stream, peer, peer_params, recvs, None)
    }

    pub(super) fn start_with_answer(
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
        let stream = mio::net::TcpStream::from_std(stream);
        let engine = engine::reserve().map_err(io_err("start the progress engine"))?;
        let drive = Drive::new().map_err(io_err("socketpair"))?;
        drive.attach_engine(engine.waker());
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
            waker: engine.waker(),
            rx: Mutex::new(Rx::new()),
            drive,
        });
        let driven: Arc<dyn Driven> = shared.clone();
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        engine
            .start(Arc::downgrade(&driven), &[(shared.stream.as_raw_fd(), events)])
            .map_err(io_err("epoll_ctl"))?;
        Ok(TcpQp {
            _engine: engine,
            shared,
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
                // next round flushes in order), and the rest are flushed.
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
            let (header, payload, pending_buf) = request_frame(wr.op, psn);
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
        let unwritten = !tx.frames.is_empty();
        drop(tx);
        if local_error {
            shared.fail_from_outside();
        } else if let Err(e) = flushed {
            tracing::debug!(peer = %shared.peer, error = %e, "tcp write failed");
            shared.fail_from_outside();
        } else if unwritten {
            // The socket took only part: the engine finishes the writing
            // once it can (a caller that drives meanwhile writes, too).
            shared.waker.wake();
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
        // Flush now, so that every work request has completed when
        // disconnect returns: under the state lock (waiting for a caller
        // that drives), unless this thread is the engine's in a round,
        // which may hold it (then the engine flushes).
        let rx = if engine::in_round() {
            shared.rx.try_lock()
        } else {
            Some(shared.rx.lock())
        };
        if let Some(mut rx) = rx {
            shared.pump(&mut rx, false);
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.fabric.capabilities()
    }
}

/// The frame a request becomes: its header, the payload written after it,
/// and the buffer kept until the reply (a Read's destination).
fn request_frame(op: SendOp, psn: u64) -> (Header, TxPayload, Option<Buf>) {
    let request = |opcode, len: usize, remote: Option<RemoteAddr>, imm: Option<u32>| Header {
        opcode,
        status: 0,
        len: len as u32,
        psn,
        addr: remote.map_or(0, |r| r.addr),
        rkey: remote.map_or(0, |r| r.rkey.0),
        imm: imm.unwrap_or(0),
        ack: 0,
    };
    match op {
        SendOp::Send { buf, imm } => {
            let opcode = if imm.is_some() { OP_SEND_IMM } else { OP_SEND };
            (request(opcode, buf.len(), None, imm), TxPayload::Buf(buf), None)
        }
        SendOp::Write { buf, remote, imm } => {
            let opcode = if imm.is_some() { OP_WRITE_IMM } else { OP_WRITE };
            (request(opcode, buf.len(), Some(remote), imm), TxPayload::Buf(buf), None)
        }
        SendOp::Read { buf, remote } => (
            request(OP_READ_REQ, buf.len(), Some(remote), None),
            TxPayload::None,
            Some(buf),
        ),
        // Into the socket as one payload: the tail copied after the head.
        SendOp::SendGather(g) => {
            let buf = g.into_flat();
            (request(OP_SEND, buf.len(), None, None), TxPayload::Buf(buf), None)
        }
    }
}

impl Drop for TcpQp {
    fn drop(&mut self) {
        self.disconnect();
    }
}

pub(super) fn check_local(wr: &SendWr, max_message: u32) -> Result<(), WcStatus> {
    if wr.len() > max_message as usize {
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
pub(super) fn flush_tx(stream: &mio::net::TcpStream, tx: &mut Tx) -> io::Result<()> {
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
    /// Fails the queue pair from a posting thread: the next round (the
    /// engine's, scheduled here, or a caller's) does the flushing.
    fn fail_from_outside(&self) {
        self.failed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
        self.waker.wake();
    }
}
