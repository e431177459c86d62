//! Progress of a verbs queue pair: reaping the completion queue (by a
//! waiting caller, or by the completion thread while none waits), sleeping
//! on the completion channel, and failing the queue pair.

use super::*;

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) cq: Arc<Cq>,
    /// Its own callback is never set: ours is in `notify`, run only once
    /// the state lock is released.
    pub(super) queue: CompletionQueue,
    pub(super) notify: Mutex<Option<Notify>>,
    pub(super) failed: AtomicBool,
    pub(super) closing: AtomicBool,
    pub(super) told_peer: AtomicBool,
    pub(super) socket: TcpStream,
    pub(super) wake: WakeFd,
    /// Callers that drive the queue pair (run to completion) and the
    /// completion thread's lease.
    pub(super) drive: Drive,
    /// Held by the caller that drives: the one that may sleep on the
    /// completion channel (other callers sleep on `queue`).
    pub(super) events: Mutex<()>,
    pub(super) peer: String,
    pub(super) peer_params: Vec<u8>,
    pub(super) caps: Capabilities,
    /// Outstanding RDMA Reads allowed (`max_rd_atomic`); 0: none at all.
    pub(super) read_depth: u8,
    pub(super) domain: ProtectionDomain,
}

/// As in [`PreparedQp`], its `Drop` destroys `qp` before the tables give
/// their buffers back, and leaks them if that fails.
pub(super) struct State {
    /// `None` once destroyed after a failed flush.
    pub(super) qp: Option<RawQp>,
    /// Posted to the device, in posting order.
    pub(super) sends: VecDeque<SendSlot>,
    pub(super) recvs: VecDeque<RecvSlot>,
    pub(super) next_seq: u64,
    pub(super) failed_at: Option<Instant>,
    /// Software completions due after every posted request came back.
    pub(super) deferred: Vec<Completion>,
    /// Reused by every post and reap (nothing allocated per request): the
    /// descriptors of a post, the device completions and the provider's
    /// of a reap.
    pub(super) descs: Vec<SendDesc>,
    pub(super) wcs: Vec<Wc>,
    pub(super) done: Vec<Completion>,
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(qp) = self.qp.take() {
            destroy_or_leak(qp, &mut self.sends, &mut self.recvs);
        }
    }
}

impl State {
    fn outstanding(&self) -> usize {
        self.sends.len() + self.recvs.len()
    }

    /// Turns a device completion into the provider's, handing the buffer back.
    fn complete(&mut self, wc: &Wc) -> Option<Completion> {
        if wc.wr_id & RECV_BIT != 0 {
            // rxe reports a receive too small for the Send as
            // REM_INV_REQ_ERR, mlx5 as LOC_LEN_ERR: both are the receiver's
            // local length error (see `device::map_recv_status`).
            let status = device::map_recv_status(wc.raw_status);
            let success = status == WcStatus::Success;
            let seq = wc.wr_id & !RECV_BIT;
            let pos = self.recvs.iter().position(|s| s.seq == seq)?;
            let RecvSlot { id, mut buf, .. } = self.recvs.remove(pos)?;
            let with_imm_write = success && wc.opcode == rdma_mummy_sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
            let opcode = if with_imm_write {
                WcOpcode::RecvRdmaWithImm
            } else {
                WcOpcode::Recv
            };
            if success && !with_imm_write {
                buf.set_len((wc.byte_len as usize).min(buf.capacity()));
            } else {
                buf.set_len(0);
            }
            Some(Completion {
                id,
                status,
                opcode,
                byte_len: if success { wc.byte_len } else { 0 },
                imm: if success { wc.imm } else { None },
                buf,
            })
        } else {
            let success = wc.status == WcStatus::Success;
            let pos = self.sends.iter().position(|s| s.seq == wc.wr_id)?;
            let SendSlot { id, opcode, buf, .. } = self.sends.remove(pos)?;
            Some(Completion {
                id,
                status: wc.status,
                opcode,
                byte_len: if success { buf.len() as u32 } else { 0 },
                imm: None,
                buf,
            })
        }
    }
}

impl Shared {
    /// Polls the device CQ dry and queues the completions (in order, under
    /// the state lock), then whatever software completions became due.
    pub(super) fn reap(&self) {
        self.reap_for(false);
    }

    /// [`Shared::reap`]; `driver` when the caller is the thread that drives
    /// (it sees what it queued, so it is not kicked).
    pub(super) fn reap_for(&self, driver: bool) {
        let mut newly_failed = false;
        let mut pushed = false;
        let mut st = self.state.lock();
        let mut wcs = std::mem::take(&mut st.wcs);
        let mut done = std::mem::take(&mut st.done);
        loop {
            wcs.clear();
            let n = self.cq.poll(&mut wcs, REAP_BATCH);
            for wc in &wcs {
                if !matches!(wc.status, WcStatus::Success | WcStatus::Flushed) {
                    tracing::debug!(
                        peer = %self.peer,
                        status = %device::status_name(wc.raw_status),
                        vendor_err = wc.vendor_err,
                        "verbs work request failed"
                    );
                }
                if wc.status != WcStatus::Success && !self.failed.load(Ordering::Acquire) {
                    newly_failed = true;
                    self.fail_locked(&mut st);
                }
                match st.complete(wc) {
                    Some(c) => done.push(c),
                    None => tracing::debug!(wr_id = wc.wr_id, "completion of an unknown request ignored"),
                }
            }
            if st.outstanding() == 0 {
                done.append(&mut st.deferred);
            }
            pushed |= !done.is_empty();
            self.queue.push_all(done.drain(..));
            if n < REAP_BATCH {
                break;
            }
        }
        st.wcs = wcs;
        st.done = done;
        drop(st);
        if newly_failed {
            self.tell_peer();
            self.wake.wake();
        }
        if pushed {
            if !driver {
                self.drive.interrupt();
            }
            self.notify_callback();
        }
    }

    /// After completions were queued other than by the driving caller's own
    /// reap: kicks that caller, then runs the notify callback.
    pub(super) fn run_notify(&self) {
        self.drive.interrupt();
        self.notify_callback();
    }

    /// Runs the notify callback; never with the state lock held (it is not
    /// re-entrant, and the callback may well poll or post).
    fn notify_callback(&self) {
        let notify = self.notify.lock().clone();
        if let Some(notify) = notify {
            notify();
        }
    }

    /// Whether the queue pair failed and the device owes nothing more:
    /// driving it can bring no further completion.
    pub(super) fn spent(&self) -> bool {
        self.failed.load(Ordering::Acquire) && self.state.lock().outstanding() == 0
    }

    /// Takes the pending events off the channel and, if there were any,
    /// arms the CQ again; the caller reaps next. Rule for both the driving
    /// caller and the completion thread: whoever takes an event arms
    /// again, so the CQ is armed (or an event is pending) whenever a thread
    /// sleeps on the channel. Left unarmed, a thread asleep on the channel
    /// would sleep through every later completion until someone polled.
    /// Returns false if arming failed: the queue pair was failed.
    fn take_events_and_rearm(&self) -> bool {
        self.cq.take_events() == 0 || self.arm()
    }

    /// The driving caller's sleep: arms the CQ, looks once more (a
    /// completion that arrived before arming raised no event), then sleeps
    /// on the completion channel and the kick.
    pub(super) fn sleep_on_cq(&self, timeout: Option<Duration>) -> Woke {
        if !self.arm() {
            // The queue pair was failed: the pump sees the flush.
            return Woke::Ready;
        }
        self.reap_for(true);
        if self.queue.has_completions() {
            return Woke::Ready;
        }
        // The side channel too: while callers keep driving, the completion
        // thread stands aside and does not read it, and a peer's close
        // reaches this side only there.
        let socket_fd = match self.failed.load(Ordering::Acquire) {
            false => self.socket.as_raw_fd(),
            true => -1,
        };
        match device::wait_readable([self.cq.fd(), self.drive.kick_fd(), socket_fd], timeout) {
            Ok([events, kicked, socket]) => {
                if events {
                    // Arming fails only by failing the queue pair: the
                    // pump then sees the flush.
                    self.take_events_and_rearm();
                }
                if socket && peer_gone(&self.socket) {
                    self.peer_left();
                    return Woke::Ready;
                }
                if kicked {
                    Woke::Kicked
                } else if events {
                    Woke::Ready
                } else {
                    Woke::TimedOut
                }
            }
            Err(error) => {
                tracing::error!(peer = %self.peer, %error, "poll on the completion channel failed; failing the queue pair");
                self.fail();
                // Never spin: a failing `poll` returns at once.
                std::thread::sleep(POLL_INTERVAL);
                Woke::Ready
            }
        }
    }

    /// After a failure found outside the completion thread (state lock
    /// released): tells the peer, wakes the thread so it starts the flush
    /// grace, and runs the callback if completions were queued.
    pub(super) fn after_failure(&self, pushed: bool) {
        self.tell_peer();
        self.wake.wake();
        if pushed {
            self.run_notify();
        }
    }

    /// Fails the queue pair and tells the peer (state lock not held).
    pub(super) fn fail(&self) {
        self.fail_locked(&mut self.state.lock());
        self.after_failure(false);
    }

    /// Asks for a completion event; returns whether events can be relied
    /// on. If not, the queue pair is failed, so the device flushes what it
    /// holds, and the caller must poll for that flush instead of waiting.
    fn arm(&self) -> bool {
        match self.cq.arm() {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(
                    peer = %self.peer,
                    %error,
                    "ibv_req_notify_cq failed; failing the queue pair and polling for its flush"
                );
                self.fail();
                false
            }
        }
    }

    /// After `ibv_post_send` refused the last `unposted` requests of a
    /// batch (all of them, or, with 0, an unnamed one): those leave the
    /// in-flight table and complete as flushed, ahead of `later`.
    pub(super) fn unposted(
        &self,
        st: &mut State,
        unposted: usize,
        error: &std::io::Error,
        mut later: Vec<Completion>,
    ) -> Vec<Completion> {
        if unposted == 0 {
            // The driver named no bad request: it may have queued them
            // all (rxe does), so they stay in flight and come back with
            // the flush after the move to ERR (or `abandon_hardware`).
            tracing::warn!(
                peer = %self.peer,
                %error,
                "ibv_post_send failed without naming a request; treating the batch as posted and failing the queue pair"
            );
        } else {
            tracing::warn!(peer = %self.peer, %error, "ibv_post_send refused a request; failing the queue pair");
        }
        let keep = st.sends.len() - unposted;
        let unposted = st.sends.split_off(keep);
        let mut flushed: Vec<Completion> = unposted.into_iter().map(flushed_slot).collect();
        flushed.append(&mut later);
        flushed
    }

    /// Marks the queue pair failed and moves it to ERR (idempotent).
    pub(super) fn fail_locked(&self, st: &mut State) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        st.failed_at = Some(Instant::now());
        if let Some(qp) = &st.qp {
            qp.to_error();
        }
    }

    /// Queues software completions behind everything the device still owes.
    /// Returns whether any were queued now: the caller then runs the notify
    /// callback once it has released the lock.
    #[must_use]
    pub(super) fn complete_later(
        &self,
        st: &mut MutexGuard<'_, State>,
        completions: impl IntoIterator<Item = Completion>,
    ) -> bool {
        st.deferred.extend(completions);
        if st.outstanding() == 0 && !st.deferred.is_empty() {
            let due = std::mem::take(&mut st.deferred);
            self.queue.push_all(due);
            return true;
        }
        false
    }

    /// Sends DISCONNECT on the side channel, once.
    fn tell_peer(&self) {
        if !self.told_peer.swap(true, Ordering::AcqRel) {
            let _ = (&self.socket).write(&oob::message(oob::KIND_DISCONNECT, &[]));
        }
    }

    /// The device did not flush in time: destroy the queue pair (ending
    /// the NIC's access to the buffers) and flush the rest in software. If
    /// the destroy fails, the buffers still posted are leaked instead
    /// (`destroy_or_leak`); only the software completions are delivered.
    fn abandon_hardware(&self) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if st.outstanding() == 0 {
            return;
        }
        tracing::warn!(
            peer = %self.peer,
            outstanding = st.outstanding(),
            "device did not flush the failed queue pair in {FLUSH_GRACE:?}; destroying it and flushing in software"
        );
        if let Some(qp) = st.qp.take() {
            destroy_or_leak(qp, &mut st.sends, &mut st.recvs);
        }
        let mut done: Vec<Completion> = st.sends.drain(..).map(flushed_slot).collect();
        done.extend(
            st.recvs
                .drain(..)
                .map(|s| flushed_recv(RecvWr { id: s.id, buf: s.buf })),
        );
        done.append(&mut st.deferred);
        let pushed = !done.is_empty();
        self.queue.push_all(done);
        drop(guard);
        if pushed {
            self.run_notify();
        }
    }

    fn grace_left(&self) -> Option<Duration> {
        let st = self.state.lock();
        let failed_at = st.failed_at?;
        if st.outstanding() == 0 {
            return None;
        }
        Some(FLUSH_GRACE.saturating_sub(failed_at.elapsed()))
    }
}

pub(super) fn completion_thread(shared: Arc<Shared>) {
    shared.drive.register_thread();
    // Whether completion events can be relied on (arming worked) and
    // whether `poll` works; without either, the device is polled every
    // POLL_INTERVAL while it still owes completions.
    let mut events_ok = shared.arm();
    let mut poll_ok = true;
    shared.reap();
    let mut peer_open = true;
    let mut aside = Aside::default();
    let mut stood_aside = false;
    loop {
        if shared.closing.load(Ordering::Acquire) && shared.state.lock().outstanding() == 0 {
            break;
        }
        let grace = shared.grace_left();
        if grace.is_some_and(|g| g.is_zero()) {
            shared.abandon_hardware();
            continue;
        }
        // While callers drive, they poll the CQ themselves (a failed queue
        // pair never parks the thread: it runs the flush grace).
        if !shared.closing.load(Ordering::Acquire) && shared.drive.thread_stands_aside(&shared.failed, &mut aside) {
            stood_aside = true;
            continue;
        }
        if std::mem::take(&mut stood_aside) {
            // Callers reaped while the thread stood aside: take what they
            // left, arming first so that what comes after raises an event.
            if events_ok {
                events_ok = shared.arm();
            }
            shared.reap();
        }
        let owed = shared.state.lock().outstanding() > 0;
        let timeout = if events_ok && poll_ok {
            grace
        } else if owed {
            Some(grace.map_or(POLL_INTERVAL, |g| g.min(POLL_INTERVAL)))
        } else {
            // Nothing left to poll for: only the wake fd and the side
            // channel matter, and without `poll` they are checked this often.
            Some(grace.map_or(POLL_INTERVAL * 10, |g| g.min(POLL_INTERVAL * 10)))
        };
        let (events, socket) = shared.wait_ready(timeout, peer_open, &mut poll_ok);
        // Callers that drive take the event and the completions themselves
        // (the event stays pending on the channel for them).
        if !socket
            && !shared.closing.load(Ordering::Acquire)
            && shared.drive.thread_stands_aside(&shared.failed, &mut aside)
        {
            stood_aside = true;
            continue;
        }
        if events && events_ok {
            events_ok = shared.take_events_and_rearm();
        } else if events {
            shared.cq.take_events();
        }
        shared.reap();
        if socket && peer_gone(&shared.socket) {
            peer_open = false;
            shared.peer_left();
        }
    }
}

impl Shared {
    /// The peer disconnected or failed (its DISCONNECT or EOF on the side
    /// channel): the queue pair fails, after sends it executed complete.
    /// Whoever reads the side channel calls this: the completion thread, or
    /// a caller that drives while the thread stands aside.
    pub(super) fn peer_left(&self) {
        // It needs no answer.
        self.told_peer.store(true, Ordering::Release);
        drain_sends(self);
        self.fail_locked(&mut self.state.lock());
        tracing::debug!(peer = %self.peer, "verbs peer disconnected");
    }

    /// Waits up to `timeout` for a completion event, the side channel (when
    /// `peer_open`) or the wake fd; returns whether events and the socket
    /// are ready. Once `poll` failed (`poll_ok` false), it sleeps instead
    /// and reports events pending.
    fn wait_ready(&self, timeout: Option<Duration>, peer_open: bool, poll_ok: &mut bool) -> (bool, bool) {
        let socket_fd = if peer_open { self.socket.as_raw_fd() } else { -1 };
        let ready = if *poll_ok {
            device::wait_readable([self.cq.fd(), socket_fd, self.wake.fd()], timeout)
        } else {
            Err(std::io::Error::other("poll failed before"))
        };
        match ready {
            Ok([events, socket, wake]) => {
                if wake {
                    self.wake.drain();
                }
                (events, socket)
            }
            Err(error) => {
                if *poll_ok {
                    tracing::error!(
                        peer = %self.peer,
                        %error,
                        "poll on the completion channel failed; polling the queue pair instead"
                    );
                    *poll_ok = false;
                }
                // Never spin: a failing `poll` returns at once.
                std::thread::sleep(timeout.unwrap_or(POLL_INTERVAL));
                self.wake.drain();
                // The events fd cannot be watched: take whatever is pending.
                (true, peer_open)
            }
        }
    }
}

/// Gives sends still in flight up to [`DISCONNECT_DRAIN`] to complete, so
/// a Send the peer executed before disconnecting completes successfully
/// instead of being flushed by the move to ERR. Events that arrive
/// meanwhile stay pending on the channel for the completion thread.
pub(super) fn drain_sends(shared: &Shared) {
    let deadline = Instant::now() + DISCONNECT_DRAIN;
    loop {
        shared.reap();
        if shared.failed.load(Ordering::Acquire) || shared.state.lock().sends.is_empty() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(POLL_INTERVAL));
    }
}

/// Reads the side channel; true when the peer sent DISCONNECT, closed it or it failed.
pub(super) fn peer_gone(socket: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match (&*socket).read(&mut buf) {
        Ok(_) => true, // EOF, or a DISCONNECT (nothing else is ever sent)
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            false
        }
        Err(_) => true,
    }
}
