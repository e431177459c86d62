//! Progress: reaping completions, routing work and events, and the signal
//! that wakes blocked callers and async tasks.

use super::*;

impl Shared {
    /// Waits until the generation moves past `seen` or `deadline` passes.
    /// On a provider that makes progress in `wait`, one waiting thread
    /// drives it (reading the transport itself, so its completion reaches it
    /// without a thread hop); the others sleep on the signal.
    pub(super) fn sleep(&self, seen: u64, deadline: Option<Instant>) -> Result<(), Error> {
        self.post_held();
        if !self.driven || self.signal.driving.swap(true, Ordering::SeqCst) {
            return self.signal.sleep(seen, deadline);
        }
        let result = self.drive(seen, deadline);
        self.signal.driving.store(false, Ordering::SeqCst);
        // A thread that slept while this one drove takes over if it still waits.
        self.signal.wake_sleepers();
        result
    }

    fn drive(&self, seen: u64, deadline: Option<Instant>) -> Result<(), Error> {
        let moved = || self.signal.generation.load(Ordering::SeqCst) != seen;
        if self.signal.should_spin() {
            // Adaptive polling: a reply already on its way costs no sleep.
            let until = Instant::now() + self.signal.spin;
            loop {
                // The clock is read once per 16 rounds: on shm a round is
                // only a look at the ring.
                for _ in 0..16 {
                    if moved() || self.qp.wait(Some(Duration::ZERO)) {
                        return Ok(());
                    }
                }
                if Instant::now() >= until {
                    break;
                }
            }
        }
        if moved() {
            return Ok(());
        }
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ready = timeout != Some(Duration::ZERO) && self.qp.wait(timeout);
        let timed_out = deadline.is_some_and(|d| !ready && !moved() && Instant::now() >= d);
        self.signal.note_outcome(timed_out);
        if timed_out {
            Err(Error::Timeout(Duration::ZERO))
        } else {
            Ok(())
        }
    }

    /// A delivery that is ready, without waiting: what earlier progress
    /// queued, else what one non-blocking round of provider progress brings.
    pub(super) fn take_ready(&self) -> Option<Result<Received, Error>> {
        if let Some(r) = self.take_received() {
            return Some(r);
        }
        self.drive_once();
        self.take_received()
    }

    /// A delivery the provider already completed, after reaping its
    /// completion queue; the transport itself is not driven.
    pub(super) fn take_received(&self) -> Option<Result<Received, Error>> {
        let mut inner = self.inner.lock();
        self.progress(&mut inner);
        take_delivery(&mut inner)
    }

    /// One non-blocking round of provider progress, when no thread drives.
    fn drive_once(&self) {
        if self.driven && !self.signal.driving.swap(true, Ordering::SeqCst) {
            self.qp.wait(Some(Duration::ZERO));
            self.signal.driving.store(false, Ordering::SeqCst);
            self.signal.wake_sleepers();
        }
    }

    /// Tells a thread driving the provider that events it may wait for were
    /// routed by another thread.
    pub(super) fn routed(&self) {
        if self.signal.driving.load(Ordering::SeqCst) {
            self.qp.interrupt();
        }
    }

    /// Reaps completions, runs the core, posts its work and routes its events.
    pub(super) fn progress(&self, inner: &mut Inner) {
        let mut changed = false;
        let mut routed = false;
        loop {
            let mut batch = std::mem::take(&mut inner.scratch);
            let n = self.qp.poll(&mut batch, POLL_BATCH);
            for c in batch.drain(..) {
                inner.conn.handle_completion(c);
            }
            inner.scratch = batch;
            let (m, r) = self.flush(inner);
            changed |= m;
            routed |= r;
            if n < POLL_BATCH {
                break;
            }
        }
        if changed {
            self.signal.signal();
        }
        // A driver blocked in the provider sees only its transport and the
        // kick: interrupt it for routed events, and for any change while a
        // blocking send waits for capacity (a credit update routes nothing;
        // missed, the sender would sleep in `poll` until the next frame,
        // forever if the peer waits for it in turn).
        if routed || (changed && self.signal.blocked_senders.load(Ordering::SeqCst) > 0) {
            self.routed();
        }
    }

    /// Posts the core's work and routes its events: whether anything moved,
    /// and whether events were routed.
    pub(super) fn flush(&self, inner: &mut Inner) -> (bool, bool) {
        let mut moved = false;
        let mut routed = false;
        while let Some(work) = inner.conn.poll_work() {
            moved = true;
            match work {
                Work::Recv(wr) => {
                    if let Err((e, wr)) = self.qp.post_recv(wr) {
                        inner.conn.handle_recv_post_failure(e.to_string(), wr);
                    }
                }
                // Sends gather in `held` and leave as one batch below,
                // or when the last cork drops.
                Work::Send(wr) => {
                    if !inner.held_placements.is_empty() {
                        inner.held_placements.push(None);
                    }
                    inner.held.push(wr);
                }
                Work::SendPlaced(wr, placement) => {
                    let unplaced = inner.held.len() - inner.held_placements.len();
                    inner.held_placements.extend(std::iter::repeat_n(None, unplaced));
                    inner.held_placements.push(Some(placement));
                    inner.held.push(wr);
                }
                Work::Disconnect => {
                    self.post_held_locked(inner);
                    self.qp.disconnect();
                }
            }
        }
        // Nothing of ours on the wire (everything posted before was
        // executed and reaped): a cork's batch would wait behind nothing,
        // so what is held goes out at once and later sends batch behind
        // it (see `Endpoint::cork`).
        let idle = !inner.held.is_empty() && inner.conn.inflight() == inner.held.len();
        if inner.corks == 0 || idle {
            self.post_held_locked(inner);
        }
        while let Some(event) = inner.conn.poll_event() {
            moved = true;
            routed = true;
            match event {
                Event::Received(r) => inner.inbox.push_back(r),
                Event::Sent { token, result } => resolve(inner, token, result, None),
                Event::OneSided { token, result, buf } => resolve(inner, token, result, Some(buf)),
                Event::Closed(reason) => inner.closed = Some(reason),
            }
        }
        (moved, routed)
    }

    /// Posts the sends a cork held back.
    pub(super) fn post_held(&self) {
        self.post_held_locked(&mut self.inner.lock());
    }

    /// Posts the sends waiting in `held`, as one batch.
    pub(super) fn post_held_locked(&self, inner: &mut Inner) {
        if inner.held.is_empty() {
            return;
        }
        let posted = if inner.held_placements.is_empty() {
            self.qp.post_send(&mut inner.held)
        } else {
            match self.qp.placement() {
                Some(p) => p.post_send_placed(&mut inner.held, &mut inner.held_placements),
                // Placements come from `placement()`: not reached.
                None => Err(FabricError::Unavailable {
                    provider: "placement",
                    reason: "a placed Write on a queue pair without placement".into(),
                }),
            }
        };
        if let Err(e) = posted {
            let wrs = std::mem::take(&mut inner.held);
            inner.held_placements.clear();
            inner.conn.handle_post_failure(e.to_string(), wrs);
        }
    }

    /// Runs `check` after each bit of progress until it yields a value.
    pub(super) fn wait<T>(
        &self,
        deadline: Option<Instant>,
        mut check: impl FnMut(&mut Inner) -> Option<T>,
    ) -> Result<T, Error> {
        loop {
            let seen = self.signal.generation.load(Ordering::SeqCst);
            {
                let mut inner = self.inner.lock();
                self.progress(&mut inner);
                if let Some(v) = check(&mut inner) {
                    return Ok(v);
                }
            }
            self.sleep(seen, deadline)?;
        }
    }
}

/// Wake-up state shared by an endpoint's waiters and its provider
/// notification.
pub(super) struct Signal {
    /// Bumped whenever something may have changed.
    pub(super) generation: AtomicU64,
    /// A thread drives the provider in `QueuePair::wait`.
    pub(super) driving: AtomicBool,
    /// Threads in a blocking send-like call waiting for credits or room.
    pub(super) blocked_senders: AtomicUsize,
    /// The last wait timed out with nothing (no spin next time).
    pub(super) quiet: AtomicBool,
    /// Threads sleeping in `sleep`; `signal` takes the lock only if any.
    pub(super) sleepers: AtomicUsize,
    pub(super) sleep_lock: Mutex<()>,
    pub(super) wake: Condvar,
    pub(super) wakers: Mutex<Vec<Waker>>,
    pub(super) spin: Duration,
}

impl Signal {
    /// Wakes blocked threads and async tasks: something may have changed.
    pub(super) fn signal(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        // A sleeper registers (under the lock) before it re-checks the
        // generation, so either it sees the new value or we see it here.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep_lock.lock();
            self.wake.notify_all();
        }
        let mut wakers = {
            let mut slot = self.wakers.lock();
            if slot.is_empty() {
                return;
            }
            std::mem::take(&mut *slot)
        };
        // Woken outside the lock (a waker may register again at once);
        // the emptied vector goes back for the next registrations, so that
        // an async caller's wait allocates nothing.
        for w in wakers.drain(..) {
            w.wake();
        }
        let mut slot = self.wakers.lock();
        if slot.is_empty() {
            *slot = wakers;
        }
    }

    /// Called after a thread stopped driving: moves the generation and
    /// wakes the threads sleeping in `sleep` (they re-check, and one of
    /// them may take over driving the provider). The generation moves even
    /// with no sleeper yet: a thread that found the provider driven and is
    /// on its way to `sleep` (spinning first) then returns at once instead
    /// of sleeping while nobody drives.
    pub(super) fn wake_sleepers(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep_lock.lock();
            self.wake.notify_all();
        }
    }

    pub(super) fn register(&self, waker: &Waker) {
        let mut wakers = self.wakers.lock();
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    /// Waits until the generation moves past `seen` or `deadline` passes:
    /// first spinning briefly (adaptive polling: a reply that is already on
    /// its way costs no sleep and wake-up), then sleeping on the condvar.
    fn sleep(&self, seen: u64, deadline: Option<Instant>) -> Result<(), Error> {
        if self.should_spin() {
            let until = Instant::now() + self.spin;
            loop {
                for _ in 0..64 {
                    if self.generation.load(Ordering::SeqCst) != seen {
                        return Ok(());
                    }
                    std::hint::spin_loop();
                }
                if Instant::now() >= until {
                    break;
                }
            }
        }
        let mut guard = self.sleep_lock.lock();
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            if self.generation.load(Ordering::SeqCst) != seen {
                break Ok(());
            }
            match deadline {
                Some(d) => {
                    if self.wake.wait_until(&mut guard, d).timed_out() && self.generation.load(Ordering::SeqCst) == seen
                    {
                        break Err(Error::Timeout(d.saturating_duration_since(Instant::now())));
                    }
                }
                None => self.wake.wait(&mut guard),
            }
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        self.note_outcome(result.is_err());
        result
    }

    /// Whether a waiter should poll before it sleeps: not when spinning is
    /// off, nor on a channel whose last wait timed out with nothing (an
    /// idle queue waiting in slices then costs no CPU).
    fn should_spin(&self) -> bool {
        !self.spin.is_zero() && !self.quiet.load(Ordering::Relaxed)
    }

    /// Records how a wait ended, for `should_spin`.
    fn note_outcome(&self, timed_out: bool) {
        self.quiet.store(timed_out, Ordering::Relaxed);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.qp.set_notify(None);
        self.qp.disconnect();
    }
}

/// Hands a transfer's outcome (and a one-sided transfer's buffer) to its
/// ticket; a detached ticket is forgotten instead.
fn resolve(inner: &mut Inner, token: u64, result: Result<(), WcStatus>, buf: Option<crate::mr::Buf>) {
    let key = token as usize;
    if let Some(t) = inner.tickets.get_mut(key) {
        if t.detached {
            inner.tickets.remove(key);
        } else {
            t.result = Some(result);
            t.buf = buf;
        }
    }
}
