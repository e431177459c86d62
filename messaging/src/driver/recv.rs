//! Receiving: deliveries of messages and pushes, blocking, timed and async.

use super::*;

impl Endpoint {
    /// Waits for the next delivery.
    ///
    /// # Errors
    /// `Closed` once the channel closed and every earlier delivery was taken.
    pub fn recv(&self) -> Result<Delivery, Error> {
        self.recv_deadline(None)
    }

    /// As [`Endpoint::recv`] with a timeout.
    ///
    /// # Errors
    /// `Timeout`, `Closed`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Delivery, Error> {
        self.recv_deadline(Some(Instant::now() + timeout)).map_err(|e| match e {
            Error::Timeout(_) => Error::Timeout(timeout),
            e => e,
        })
    }

    /// The next delivery if one is ready.
    ///
    /// # Errors
    /// `WouldBlock`, `Closed`.
    pub fn try_recv(&self) -> Result<Delivery, Error> {
        match self.shared.take_ready() {
            Some(r) => r.map(|r| self.delivery(r)),
            None => Err(Error::WouldBlock),
        }
    }

    /// The next delivery already received (by an earlier wait, or by the
    /// provider's fallback), without driving the fabric for more: for a
    /// thread draining a batch, whose next step (posting answers, waking the
    /// callers whose completions it handled) should not wait for a poll of
    /// the transport that most often finds nothing.
    ///
    /// # Errors
    /// `WouldBlock`, `Closed`.
    pub fn try_recv_taken(&self) -> Result<Delivery, Error> {
        match self.shared.take_received() {
            Some(r) => r.map(|r| self.delivery(r)),
            None => Err(Error::WouldBlock),
        }
    }

    /// Async form of [`Endpoint::recv`].
    pub fn recv_async(&self) -> impl Future<Output = Result<Delivery, Error>> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered only to wait, as in `async_op`.
            if let Some(r) = self.shared.take_ready() {
                return Poll::Ready(r.map(|r| self.delivery(r)));
            }
            self.shared.signal.register(cx.waker());
            match self.shared.take_received() {
                Some(r) => Poll::Ready(r.map(|r| self.delivery(r))),
                None => {
                    self.shared.post_held();
                    Poll::Pending
                }
            }
        })
    }

    fn recv_deadline(&self, deadline: Option<Instant>) -> Result<Delivery, Error> {
        let r = self.shared.wait(deadline, take_delivery)?;
        r.map(|r| self.delivery(r))
    }

    fn delivery(&self, received: Received) -> Delivery {
        Delivery {
            received: Some(received),
            shared: self.shared.clone(),
        }
    }
}

pub(super) fn take_delivery(inner: &mut Inner) -> Option<Result<Received, Error>> {
    if let Some(r) = inner.inbox.pop_front() {
        return Some(Ok(r));
    }
    inner.closed.clone().map(|r| Err(Error::Closed(r)))
}
