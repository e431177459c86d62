//! Sending: messages, pushes into granted slots and into exposed buffers,
//! and the tickets that follow them.

use super::*;
use crate::provider::RemoteAddr;

impl Endpoint {
    /// Sends one message, gathered from its parts (one slice, or several
    /// sent in order as one message: a header and a payload go out without
    /// first being joined), copied into a registered send buffer. Waits
    /// while the peer has no receive credit for us.
    ///
    /// ```no_run
    /// # fn f(ep: &messaging::Endpoint) -> Result<(), messaging::Error> {
    /// ep.send(b"hello")?.wait()?;
    /// let header = [1u8, 2];
    /// ep.send(&[&header[..], b"payload"])?.detach();
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `TooLarge`, `Closed`.
    pub fn send<'a>(&self, message: impl Into<Parts<'a>>) -> Result<Ticket, Error> {
        let parts = message.into();
        self.blocking(None, |inner, token| inner.conn.send(token, parts.as_slices()))
    }

    /// As [`Endpoint::send`], but fails with `WouldBlock` instead of waiting.
    ///
    /// # Errors
    /// `WouldBlock`, `TooLarge`, `Closed`.
    pub fn try_send<'a>(&self, message: impl Into<Parts<'a>>) -> Result<Ticket, Error> {
        let parts = message.into();
        self.attempt(|inner, token| inner.conn.send(token, parts.as_slices()))?
            .map(|key| self.ticket(key))
            .ok_or(Error::WouldBlock)
    }

    /// Async form of [`Endpoint::send`].
    pub fn send_async<'a>(&'a self, message: impl Into<Parts<'a>>) -> impl Future<Output = Result<Ticket, Error>> + 'a {
        let parts = message.into();
        self.async_op(move |inner, token| inner.conn.send(token, parts.as_slices()))
    }

    /// Sends one message of `message` (copied into a send buffer) followed
    /// by `tail`, a buffer registered in [`Endpoint::domain`], waiting for a
    /// credit. On verbs the NIC gathers the tail from where it is (no
    /// copy); tcp and shm copy it as they copy any Send. `tail` returns to
    /// its pool once the Send completes.
    ///
    /// # Errors
    /// `TooLarge`, `Closed`; `BadBuffer` for a tail registered elsewhere.
    pub fn send_gather<'a>(&self, message: impl Into<Parts<'a>>, tail: Buf) -> Result<Ticket, Error> {
        self.check_gather_tail(&tail)?;
        let parts = message.into();
        let mut slot = Some(tail);
        self.blocking(None, |inner, token| {
            push_with(&mut slot, |b| inner.conn.send_gather(token, parts.as_slices(), b))
        })
    }

    /// Async form of [`Endpoint::send_gather`].
    pub async fn send_gather_async<'a>(&'a self, message: impl Into<Parts<'a>>, tail: Buf) -> Result<Ticket, Error> {
        self.check_gather_tail(&tail)?;
        let parts = message.into();
        let mut slot = Some(tail);
        self.async_op(move |inner, token| push_with(&mut slot, |b| inner.conn.send_gather(token, parts.as_slices(), b)))
            .await
    }

    /// Reads `dst.len()` bytes of the peer's memory at `remote` into `dst`
    /// with a one-sided RDMA Read, which the peer's application takes no
    /// part in. `remote` is memory the peer registered with remote read
    /// access and named to us (its [`Buf::remote`]). `dst` must be
    /// registered in [`Endpoint::domain`]; [`Ticket::wait_buf`] gives it
    /// back with the data. A wrong key, an address outside the peer's
    /// region or missing access fails the transfer and closes the channel.
    ///
    /// # Errors
    /// `Closed`; `BadBuffer` for a buffer registered elsewhere or without
    /// local write access.
    pub fn read_remote(&self, remote: RemoteAddr, dst: Buf) -> Result<Ticket, Error> {
        self.check_gather_tail(&dst)?;
        let mut slot = Some(dst);
        self.blocking(None, |inner, token| {
            push_with(&mut slot, |b| inner.conn.read_remote(token, b, remote))
        })
    }

    /// Async form of [`Endpoint::read_remote`].
    pub async fn read_remote_async(&self, remote: RemoteAddr, dst: Buf) -> Result<Ticket, Error> {
        self.check_gather_tail(&dst)?;
        let mut slot = Some(dst);
        self.async_op(move |inner, token| push_with(&mut slot, |b| inner.conn.read_remote(token, b, remote)))
            .await
    }

    /// Writes `src` into the peer's memory at `remote` with a one-sided
    /// RDMA Write (no immediate: the peer's application is not told). The
    /// rules of [`Endpoint::read_remote`] apply, with remote write access;
    /// [`Ticket::wait_buf`] gives `src` back.
    ///
    /// # Errors
    /// As [`Endpoint::read_remote`].
    pub fn write_remote(&self, remote: RemoteAddr, src: Buf) -> Result<Ticket, Error> {
        self.check_gather_tail(&src)?;
        let mut slot = Some(src);
        self.blocking(None, |inner, token| {
            push_with(&mut slot, |b| inner.conn.write_remote(token, b, remote))
        })
    }

    /// Async form of [`Endpoint::write_remote`].
    pub async fn write_remote_async(&self, remote: RemoteAddr, src: Buf) -> Result<Ticket, Error> {
        self.check_gather_tail(&src)?;
        let mut slot = Some(src);
        self.async_op(move |inner, token| push_with(&mut slot, |b| inner.conn.write_remote(token, b, remote)))
            .await
    }

    fn check_gather_tail(&self, tail: &Buf) -> Result<(), Error> {
        match self.shared.domain.owns(tail) {
            true => Ok(()),
            false => Err(Error::BadBuffer(
                "a gathered buffer must be registered in the channel's domain (Endpoint::domain)",
            )),
        }
    }

    /// Pushes `data` into a slot the peer granted (copied once into a
    /// registered staging buffer), waiting for a slot and a credit.
    ///
    /// # Errors
    /// `TooLarge`, `Closed`.
    pub fn push(&self, data: &[u8]) -> Result<Ticket, Error> {
        let buf = self.staging_buf(data, None)?;
        self.push_buf(buf)
    }

    /// Pushes a registered buffer without copying, waiting for a slot and a
    /// credit. The buffer returns to its pool when the push completes.
    ///
    /// # Errors
    /// `TooLarge`, `Closed`.
    pub fn push_buf(&self, buf: Buf) -> Result<Ticket, Error> {
        let mut slot = Some(buf);
        self.blocking(None, |inner, token| push_with(&mut slot, |b| inner.conn.push(token, b)))
    }

    /// Async form of [`Endpoint::push_buf`].
    pub fn push_buf_async(&self, buf: Buf) -> impl Future<Output = Result<Ticket, Error>> + '_ {
        let mut slot = Some(buf);
        self.async_op(move |inner, token| push_with(&mut slot, |b| inner.conn.push(token, b)))
    }

    /// Pushes a registered buffer straight into a buffer the peer exposed.
    ///
    /// # Errors
    /// `TooLarge`, `Closed`.
    pub fn push_direct(&self, buf: Buf, push: DirectPush) -> Result<Ticket, Error> {
        let mut slot = Some(buf);
        self.blocking(None, |inner, token| {
            push_with(&mut slot, |b| inner.conn.push_direct(token, b, push))
        })
    }

    /// Fills `len` bytes for the peer's exposed target and pushes them, as
    /// [`Endpoint::push_direct`] of a `buf` that `fill` wrote. Where the
    /// provider lets the initiator copy into the peer's memory (shm, once
    /// the peer granted the target's region: after a first push into it),
    /// `fill` writes straight into the target and `buf` only stands for the
    /// push (its bytes are not sent): one copy fewer. Elsewhere `fill`
    /// writes `buf`, which is pushed.
    ///
    /// `fill` runs while the provider holds its locks: it must only write
    /// its slice (all `len` bytes), never call into this endpoint.
    ///
    /// # Errors
    /// [`FillError::Fill`]: `fill`'s error; nothing was pushed (the target
    /// may hold part of the data, as after a failed transfer).
    /// [`FillError::Push`]: as [`Endpoint::push_direct`], `TooLarge` also
    /// when `len` exceeds `buf`.
    pub fn push_direct_fill<E>(
        &self,
        mut buf: Buf,
        push: DirectPush,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Ticket, FillError<E>> {
        let target = push.target;
        let max = buf.capacity().min(target.remote.len as usize);
        if len > max {
            return Err(FillError::Push(Error::TooLarge { len, max }));
        }
        buf.set_len(len);
        let remote = crate::provider::RemoteAddr {
            addr: target.remote.addr,
            rkey: target.remote.rkey,
        };
        let mut fill = Some(fill);
        let mut filled = Ok(());
        let placement = self.shared.qp.placement().and_then(|p| {
            p.place(remote, len, &mut |dest| {
                if let Some(f) = fill.take() {
                    filled = f(dest);
                }
            })
        });
        let placement = match (placement, fill) {
            (Some(p), None) => Some(p),
            // Not placed: the data goes the usual way, from `buf`.
            (_, Some(f)) => {
                f(&mut buf).map_err(FillError::Fill)?;
                None
            }
            (None, None) => {
                return Err(FillError::Push(Error::BadBuffer(
                    "the fabric filled a placement it then refused",
                )))
            }
        };
        filled.map_err(FillError::Fill)?;
        let mut slot = Some(buf);
        self.blocking(None, |inner, token| {
            push_with(&mut slot, |b| match placement {
                Some(placement) => inner.conn.push_placed(token, b, push, placement),
                None => inner.conn.push_direct(token, b, push),
            })
        })
        .map_err(FillError::Push)
    }

    /// Runs the channel's progress and, unless that moved anything (a
    /// completion reaped, a message or event routed), waits up to
    /// `timeout` for something to move: how a caller waits for resources
    /// that completions give back (the buffers of detached pushes).
    ///
    /// # Errors
    /// `Closed` once the channel is closed; `Timeout` when nothing moved.
    pub fn wait_progress(&self, timeout: Duration) -> Result<(), Error> {
        let generation = self.shared.signal.generation.load(Ordering::SeqCst);
        {
            let mut inner = self.shared.inner.lock();
            self.shared.progress(&mut inner);
            if let Some(reason) = inner.closed.clone() {
                return Err(Error::Closed(reason));
            }
        }
        if self.shared.signal.generation.load(Ordering::SeqCst) != generation {
            return Ok(());
        }
        self.shared.sleep(generation, Some(Instant::now() + timeout))
    }

    /// A staging buffer of [`Endpoint::max_push`] bytes to fill and hand to
    /// [`Endpoint::push_buf`] (zero-copy pushes), waiting while all are in use.
    ///
    /// # Errors
    /// `Closed`; `BadBuffer` when the peer granted no slots.
    pub fn alloc_push_buf(&self) -> Result<Buf, Error> {
        self.staging_buf(&[], None)
    }

    /// Exposes a buffer (registered with local and remote write in
    /// [`Endpoint::domain`]) for the peer to push into directly; send the
    /// returned target to the peer.
    ///
    /// # Errors
    /// `BadBuffer` (with the buffer dropped) if it lacks remote write or
    /// was registered in another domain (the peer could not reach it).
    pub fn expose(&self, buf: Buf) -> Result<DirectTarget, Error> {
        if !self.shared.domain.holds(&buf) {
            return Err(Error::BadBuffer(
                "an exposed buffer must be registered in the channel's domain (Endpoint::domain)",
            ));
        }
        self.shared
            .inner
            .lock()
            .conn
            .expose(buf)
            .map_err(|_| Error::BadBuffer("direct placement needs local and remote write access"))
    }

    /// Withdraws an exposure the peer did not push to (for example after
    /// the request that advertised it failed), handing the buffer back.
    /// `None` if the tag is not exposed (already pushed to, or unknown).
    pub fn unexpose(&self, tag: u16) -> Option<Buf> {
        self.shared.inner.lock().conn.unexpose(tag)
    }

    /// The handle of the transfer whose ticket is `key`.
    fn ticket(&self, key: usize) -> Ticket {
        Ticket {
            shared: self.shared.clone(),
            key,
            done: false,
        }
    }

    /// One attempt of a send-like operation: the key of its ticket, or
    /// `Ok(None)` when it must wait.
    fn attempt(&self, mut op: impl FnMut(&mut Inner, u64) -> Result<(), SendError>) -> Result<Option<usize>, Error> {
        let mut inner = self.shared.inner.lock();
        let key = inner.tickets.insert(TicketState {
            result: None,
            buf: None,
            detached: false,
        });
        // Optimistic: the operation first, on what the last progress left;
        // only when it finds no credit or room does a round of progress
        // (which may free some) come first, then the one retry. A message
        // that fits leaves with one round of progress instead of two.
        let mut outcome = op(&mut inner, key as u64);
        if matches!(outcome, Err(SendError::Full)) {
            self.shared.progress(&mut inner);
            outcome = op(&mut inner, key as u64);
        }
        match outcome {
            Ok(()) => {
                // Hands the queued work to the provider (or to the cork's
                // batch). Not a whole round of progress: reaping completions
                // is for whoever waits, and posting a send frees nothing a
                // waiter could want, so it signals no one. Events, should
                // the operation have routed any, are signalled as usual.
                let (_, routed) = self.shared.flush(&mut inner);
                if routed {
                    self.shared.signal.signal();
                    self.shared.routed();
                }
                Ok(Some(key))
            }
            Err(e) => {
                inner.tickets.remove(key);
                match e {
                    SendError::Full => Ok(None),
                    e => Err(e.into()),
                }
            }
        }
    }

    /// Runs a send-like operation, waiting (until `deadline`) while it
    /// finds no credit or room.
    fn blocking(
        &self,
        deadline: Option<Instant>,
        mut op: impl FnMut(&mut Inner, u64) -> Result<(), SendError>,
    ) -> Result<Ticket, Error> {
        loop {
            let generation = self.shared.signal.generation.load(Ordering::SeqCst);
            if let Some(key) = self.attempt(&mut op)? {
                return Ok(self.ticket(key));
            }
            // Counted while asleep: credits or room that another thread's
            // progress frees move no event, so that progress must interrupt
            // a driver (which may be this thread) by itself.
            let signal = &self.shared.signal;
            signal.blocked_senders.fetch_add(1, Ordering::SeqCst);
            let slept = self.shared.sleep(generation, deadline);
            signal.blocked_senders.fetch_sub(1, Ordering::SeqCst);
            slept?;
        }
    }

    /// Async form of [`Endpoint::blocking`].
    fn async_op<'a>(
        &'a self,
        mut op: impl FnMut(&mut Inner, u64) -> Result<(), SendError> + 'a,
    ) -> impl Future<Output = Result<Ticket, Error>> + 'a {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            // The waker is registered only when the operation must wait (and
            // then the operation is tried once more, in case what it waits
            // for came before the registration): one registered on every
            // call would be woken by the next signal, this call's own
            // progress included, and its task polled again for nothing.
            match self.attempt(&mut op) {
                Ok(Some(key)) => return Poll::Ready(Ok(self.ticket(key))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            self.shared.signal.register(cx.waker());
            match self.attempt(&mut op) {
                Ok(Some(key)) => Poll::Ready(Ok(self.ticket(key))),
                Ok(None) => {
                    self.shared.post_held();
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(e)),
            }
        })
    }

    fn staging_buf(&self, data: &[u8], deadline: Option<Instant>) -> Result<Buf, Error> {
        let max = self.max_push();
        if max == 0 {
            return Err(Error::BadBuffer("the peer granted no push slots"));
        }
        let pool = match self.shared.staging.get() {
            Some(pool) => pool,
            None => {
                let pool = self
                    .shared
                    .domain
                    .register(max, STAGING_BUFFERS, Access::LOCAL_WRITE)
                    .map_err(ProtoError::Register)?;
                // A racing caller's pool may have won: either serves.
                self.shared.staging.get_or_init(|| pool)
            }
        };
        if data.len() > pool.chunk_size() {
            return Err(Error::TooLarge {
                len: data.len(),
                max: pool.chunk_size(),
            });
        }
        let mut buf = self.shared.wait(deadline, |inner| match &inner.closed {
            Some(reason) => Some(Err(Error::Closed(reason.clone()))),
            None => pool.checkout().map(Ok),
        })??;
        buf.fill(data).map_err(|max| Error::TooLarge { len: data.len(), max })?;
        Ok(buf)
    }
}

pub(super) fn push_with(
    slot: &mut Option<Buf>,
    op: impl FnOnce(Buf) -> Result<(), PushError>,
) -> Result<(), SendError> {
    let buf = slot.take().ok_or(SendError::BadBuffer("buffer already pushed"))?;
    op(buf).map_err(|e| {
        *slot = Some(e.buf);
        e.error
    })
}
