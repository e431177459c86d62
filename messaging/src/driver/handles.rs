//! What the endpoint hands out: corks, tickets and deliveries.

use super::*;

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("fabric", &self.shared.fabric)
            .field("peer", &self.shared.peer)
            .field("conn", &self.shared.inner.lock().conn)
            .finish()
    }
}

/// Holds an endpoint's posting back while it lives: see [`Endpoint::cork`].
pub struct Cork<'a> {
    pub(super) shared: &'a Arc<Shared>,
}

impl Drop for Cork<'_> {
    fn drop(&mut self) {
        let mut inner = self.shared.inner.lock();
        inner.corks -= 1;
        if inner.corks == 0 {
            self.shared.post_held_locked(&mut inner);
        }
    }
}

impl std::fmt::Debug for Cork<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cork").finish_non_exhaustive()
    }
}

/// The pending result of a send or push. Wait on it to learn that the
/// peer's fabric executed the transfer; drop it to not care.
pub struct Ticket {
    pub(super) shared: Arc<Shared>,
    pub(super) key: usize,
    pub(super) done: bool,
}

impl Ticket {
    /// Waits for the transfer's completion.
    ///
    /// # Errors
    /// `Transfer(status)` when it failed (`Flushed` if the channel closed first).
    pub fn wait(self) -> Result<(), Error> {
        self.wait_deadline(None)
    }

    /// As [`Ticket::wait`] with a timeout.
    ///
    /// # Errors
    /// `Timeout` or the transfer's failure.
    pub fn wait_timeout(self, timeout: Duration) -> Result<(), Error> {
        self.wait_deadline(Some(Instant::now() + timeout))
    }

    /// Lets the transfer go on without anyone waiting for it: it is
    /// forgotten once it completes, and a failure fails the channel (as any
    /// failed transfer does, which is what the sender sees next). The same
    /// as dropping the ticket, said out loud.
    pub fn detach(self) {}

    /// Async form of [`Ticket::wait`].
    pub fn completion(mut self) -> impl Future<Output = Result<(), Error>> {
        std::future::poll_fn(move |cx| self.poll_with(cx, Ticket::take))
    }

    /// Polls for the outcome `take` takes: reaps, and registers the waker
    /// only to wait, as `Endpoint::async_op` does; the completion may have
    /// come meanwhile and its signal found no waker, so it reaps again
    /// before giving up.
    fn poll_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut take: impl FnMut(&mut Ticket, &mut Inner) -> Option<T>,
    ) -> Poll<T> {
        let shared = self.shared.clone();
        let mut inner = shared.inner.lock();
        shared.progress(&mut inner);
        if let Some(r) = take(self, &mut inner) {
            return Poll::Ready(r);
        }
        drop(inner);
        shared.signal.register(cx.waker());
        let mut inner = shared.inner.lock();
        shared.progress(&mut inner);
        match take(self, &mut inner) {
            Some(r) => Poll::Ready(r),
            None => {
                drop(inner);
                shared.post_held();
                Poll::Pending
            }
        }
    }

    /// Waits for a one-sided transfer ([`Endpoint::read_remote`],
    /// [`Endpoint::write_remote`]) and takes its buffer back: for a Read,
    /// holding the bytes read.
    ///
    /// # Errors
    /// `Transfer(status)` when it failed (the buffer is then dropped to its
    /// pool: the fabric may have written part of it); `BadBuffer` for a
    /// ticket of another kind of transfer.
    pub fn wait_buf(mut self) -> Result<Buf, Error> {
        let shared = self.shared.clone();
        shared.wait(None, |inner| self.take_buf(inner))?
    }

    /// Async form of [`Ticket::wait_buf`].
    pub fn buf_completion(mut self) -> impl Future<Output = Result<Buf, Error>> {
        std::future::poll_fn(move |cx| self.poll_with(cx, Ticket::take_buf))
    }

    fn take_buf(&mut self, inner: &mut Inner) -> Option<Result<Buf, Error>> {
        let t = inner.tickets.get_mut(self.key)?;
        let result = t.result.take()?;
        let buf = t.buf.take();
        inner.tickets.remove(self.key);
        self.done = true;
        Some(match (result, buf) {
            (Err(status), _) => Err(Error::Transfer(status)),
            (Ok(()), Some(buf)) => Ok(buf),
            (Ok(()), None) => Err(Error::BadBuffer("not a one-sided transfer: no buffer comes back")),
        })
    }

    fn wait_deadline(mut self, deadline: Option<Instant>) -> Result<(), Error> {
        let shared = self.shared.clone();
        shared.wait(deadline, |inner| self.take(inner))?
    }

    fn take(&mut self, inner: &mut Inner) -> Option<Result<(), Error>> {
        let result = inner.tickets.get_mut(self.key)?.result.take()?;
        inner.tickets.remove(self.key);
        self.done = true;
        Some(result.map_err(Error::Transfer))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = self.shared.inner.lock();
        if let Some(t) = inner.tickets.get_mut(self.key) {
            if t.result.is_some() {
                inner.tickets.remove(self.key);
            } else {
                t.detached = true;
            }
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("key", &self.key).finish()
    }
}

/// A received message or push: a zero-copy view of the receive buffer or
/// slot it landed in. Dropping it returns the buffer or slot to the peer.
pub struct Delivery {
    pub(super) received: Option<Received>,
    pub(super) shared: Arc<Shared>,
}

impl Delivery {
    /// Kind of delivery.
    pub fn kind(&self) -> ReceivedKind {
        self.received.as_ref().map_or(ReceivedKind::Message, Received::kind)
    }

    /// Delivery sequence number on this channel.
    pub fn seq(&self) -> u32 {
        self.received.as_ref().map_or(0, Received::seq)
    }

    /// For a direct placement: keeps the application's buffer (length set to
    /// the bytes pushed). Other deliveries come back unchanged.
    ///
    /// # Errors
    /// `Err(self)` when this is not a direct placement.
    pub fn into_buf(mut self) -> Result<Buf, Delivery> {
        match self.received.take().map(Received::into_buf) {
            Some(Ok(buf)) => Ok(buf),
            Some(Err(r)) => {
                self.received = Some(r);
                Err(self)
            }
            None => Err(self),
        }
    }
}

impl Deref for Delivery {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.received.as_ref().map_or(&[], Received::data)
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(r) = self.received.take() {
            let mut inner = self.shared.inner.lock();
            inner.conn.release(r);
            let (_, routed) = self.shared.flush(&mut inner);
            drop(inner);
            if routed {
                self.shared.signal.signal();
                self.shared.routed();
            }
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("kind", &self.kind())
            .field("len", &self.len())
            .field("seq", &self.seq())
            .finish()
    }
}
