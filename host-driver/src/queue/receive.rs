//! Receiving: the reaper that drives the channel, completions matched to
//! their commands, read data to its exposure, and the deadline sweep.

use super::*;

impl Queue {
    fn renew_lease(&self) {
        self.lease.renew();
    }

    /// The receiver thread: reaps whenever no blocked caller does, until
    /// the channel closes; then fails every command in flight.
    pub(super) fn receive_loop(&self) {
        // The park grows to 16 x REAP_LEASE while callers keep reaping
        // (each wake-up may preempt a spinning caller).
        let mut aside = Aside::default();
        loop {
            if self.lease.stands_aside(&mut aside, false, || self.wake_parked()) {
                continue;
            }
            // Blocks (without spinning) while a caller reaps.
            let reaper = self.reaper.lock();
            if self.lease.callers_active(aside.seen()) {
                // A caller came by meanwhile, and may have parked because
                // this thread held the lock: hand the reaping back.
                drop(reaper);
                self.wake_parked();
                continue;
            }
            match self.ep.recv() {
                Ok(d) => self.handle_ready(d),
                Err(e) => {
                    tracing::debug!(qid = self.qid, "queue channel closed: {e}");
                    break;
                }
            }
        }
        self.fail_all();
    }

    /// Takes deliveries off the channel for a blocked caller until `woken`.
    fn reap_for_caller(&self, woken: &AtomicBool) {
        self.renew_lease();
        let Some(reaper) = self.reaper.try_lock() else {
            // Another thread reaps: it completes our command, or wakes us
            // when it stops.
            self.parked.lock().push(std::thread::current());
            if !woken.load(Ordering::Acquire) {
                std::thread::park_timeout(PARKED_RECHECK);
            }
            let me = std::thread::current().id();
            self.parked.lock().retain(|t| t.id() != me);
            return;
        };
        while !woken.load(Ordering::Acquire) {
            match self.ep.recv_timeout(REAP_SLICE) {
                Ok(d) => self.handle_ready(d),
                Err(messaging::Error::Timeout(_)) => {}
                Err(_) => {
                    // Closed: the receiver thread fails what is in flight.
                    drop(reaper);
                    std::thread::park_timeout(PARKED_RECHECK);
                    return;
                }
            }
            self.renew_lease();
        }
        drop(reaper);
        self.renew_lease();
        self.wake_parked();
    }

    /// Wakes the callers parked behind the reaper, so that one takes over.
    fn wake_parked(&self) {
        let parked = std::mem::take(&mut *self.parked.lock());
        parked.iter().for_each(std::thread::Thread::unpark);
    }

    /// Handles `first` and every delivery already taken off the fabric
    /// with it (no poll of the fabric that would delay the waiters these
    /// completions wake).
    fn handle_ready(&self, first: messaging::Delivery) {
        self.handle(first);
        for _ in 1..REAP_BATCH {
            match self.ep.try_recv_taken() {
                Ok(d) => self.handle(d),
                Err(_) => break,
            }
        }
    }

    fn handle(&self, delivery: messaging::Delivery) {
        match delivery.kind() {
            ReceivedKind::Direct { tag, completes_request } => {
                if let Ok(buf) = delivery.into_buf() {
                    self.handle_data(tag, buf, completes_request);
                }
            }
            ReceivedKind::Message => {
                let cqe = transport::decode_response(&delivery);
                drop(delivery);
                match cqe {
                    Ok(cqe) => self.handle_cqe(cqe),
                    Err(e) => {
                        tracing::warn!(qid = self.qid, "closing queue: bad response capsule: {e}");
                        self.ep.close();
                    }
                }
            }
            ReceivedKind::Push => {
                tracing::warn!(
                    qid = self.qid,
                    "closing queue: the I/O unit pushed into a slot we never granted"
                );
                self.ep.close();
            }
        }
    }

    /// Data pushed under `tag`; `completes` when the push was flagged: the
    /// command succeeded and no response capsule follows
    /// ([`transport::CDW3_COMPLETE_BY_DATA`]).
    fn handle_data(&self, tag: u16, buf: Buf, completes: bool) {
        let mut st = self.state.lock();
        let Some(cid) = take_tag(&mut st.tags, tag, None) else {
            tracing::warn!(qid = self.qid, tag, "data for a transfer tag no command uses");
            return;
        };
        if let Some(slot) = st.slots.get_mut(cid) {
            slot.exposure = None;
            if !slot.ignored {
                slot.data = Some(buf);
            }
        }
        if completes {
            let mut cqe = Cqe::new(CommandId(cid as u16), Status::SUCCESS);
            cqe.sq_id = self.qid;
            self.complete(st, cqe);
        }
    }

    fn handle_cqe(&self, cqe: Cqe) {
        self.complete(self.state.lock(), cqe);
    }

    /// Completes the command `cqe` names; `st` is the queue's locked state.
    fn complete(&self, mut st: parking_lot::MutexGuard<'_, State>, cqe: Cqe) {
        let cid = usize::from(cqe.command_id.0);
        let Some(slot) = st.slots.try_remove(cid) else {
            tracing::warn!(qid = self.qid, cid, "completion for a command not in flight");
            return;
        };
        if let Some(exposure) = slot.exposure {
            // Not pushed to: the buffer is still exposed, keep it for reuse.
            take_tag(&mut st.tags, exposure.target.tag, Some(cid));
            st.spare.push(exposure);
        }
        if !slot.ignored && st.cells.len() < self.depth {
            st.cells.push_back(slot.cell.clone());
        }
        let waiters = std::mem::take(&mut st.waiters);
        // The caller's wake-ups run outside the lock.
        drop(st);
        if !slot.ignored {
            slot.cell.complete(Ok(Reply { cqe, data: slot.data }));
        }
        waiters.into_iter().for_each(Waker::wake);
    }

    fn fail_all(&self) {
        let (slots, waiters) = {
            let mut st = self.state.lock();
            st.closed = true;
            st.tags.clear();
            st.spare.clear();
            let slots: Vec<Slot> = st.slots.drain().collect();
            (slots, std::mem::take(&mut st.waiters))
        };
        for slot in slots {
            slot.cell.complete(Err(()));
        }
        waiters.into_iter().for_each(Waker::wake);
    }
}

impl exec::Sweep for Mutex<State> {
    fn sweep(&self, now: Option<Instant>) {
        let mut due = Vec::new();
        {
            let st = self.lock();
            for (_, slot) in st.slots.iter() {
                if slot.deadline.is_some_and(|d| now.is_none_or(|now| d <= now)) {
                    if let Some(w) = slot.cell.inner.lock().waker.take() {
                        due.push(w);
                    }
                }
            }
        }
        // Woken outside the lock; each checks its deadline itself.
        due.into_iter().for_each(Waker::wake);
    }
}

impl Queue {
    /// What the timer sweeps for this queue's command deadlines.
    pub(crate) fn deadlines(&self) -> Weak<dyn exec::Sweep> {
        Arc::downgrade(&self.state) as Weak<dyn exec::Sweep>
    }
}

impl exec::Helper for Queue {
    fn help(&self, woken: &AtomicBool) {
        self.reap_for_caller(woken);
    }

    fn corked(&self, f: &mut dyn FnMut()) {
        let _cork = self.ep.cork();
        f();
    }
}
