//! Submitting a command: a CID and its cell, the data pointer (an exposed
//! buffer for a read), the capsule and any pushed data, then the wait for
//! the completion; and the guard that cleans up after a caller that stops
//! waiting.

use super::*;

/// How far a command's submission got: what a caller that stops waiting
/// leaves behind ([`SlotGuard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Stage {
    /// Nothing is on the wire: the slot can be freed.
    Unsent = 0,
    /// The capsule went, not all its pushed data: half a command is on
    /// the wire, and the channel's stream is unusable.
    CapsuleOnly = 1,
    /// The whole command went: the I/O unit may still answer, and write
    /// into the command's buffer.
    Whole = 2,
}

/// A command's [`Stage`], shared by its submission and its guard (both
/// borrow it across awaits of a future that may move between threads).
#[derive(Debug)]
pub(super) struct StageCell(AtomicU8);

impl StageCell {
    fn new() -> StageCell {
        StageCell(AtomicU8::new(Stage::Unsent as u8))
    }

    fn set(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::Release);
    }

    fn get(&self) -> Stage {
        match self.0.load(Ordering::Acquire) {
            0 => Stage::Unsent,
            1 => Stage::CapsuleOnly,
            _ => Stage::Whole,
        }
    }
}

impl Queue {
    /// Runs one command: takes a CID, exposes the read destination
    /// (`lent`, a spare exposure or one from `cache`), sends the capsule
    /// and any pushed data (for [`OpData::OutLent`], `lent` itself), and
    /// waits for the completion until `deadline`. A lent write buffer has
    /// left the fabric (back in its pool) when this returns, unless it
    /// returns a timeout.
    pub(crate) async fn execute(
        &self,
        op: &Op<'_>,
        lent: Option<Buf>,
        cache: &BufCache,
        deadline: Option<Instant>,
        timer: &Timer,
    ) -> Result<Reply, ExecError> {
        // Whatever the command waits for (a CID, send credits, a staging
        // buffer, its completion) comes from this queue's channel: a thread
        // blocked on it reaps the queue meanwhile. Not on the admin queue:
        // its commands are few and some wait for minutes (asynchronous
        // event requests), which its receiver thread does without waking.
        let mut run = std::pin::pin!(self.run_command(op, lent, cache, deadline, timer));
        std::future::poll_fn(|cx| {
            let r = run.as_mut().poll(cx);
            if r.is_pending() && self.qid != 0 {
                exec::offer_help(&self.me);
            }
            r
        })
        .await
    }

    async fn run_command(
        &self,
        op: &Op<'_>,
        mut lent: Option<Buf>,
        cache: &BufCache,
        deadline: Option<Instant>,
        timer: &Timer,
    ) -> Result<Reply, ExecError> {
        let (cid, cell) = match exec::deadline(timer, deadline, self.acquire(deadline)).await {
            None => return Err(ExecError::Timeout { in_flight: false }),
            Some(Err(())) => return Err(ExecError::Lost),
            Some(Ok(acquired)) => acquired,
        };
        let stage = StageCell::new();
        let mut guard = SlotGuard {
            queue: self,
            cid,
            cell: &cell,
            stage: &stage,
            done: false,
        };
        let mut sqe = op.sqe;
        sqe.command_id = CommandId(cid as u16);
        let sgl = self.data_pointer(
            cid,
            &op.data,
            lent.take_if(|_| matches!(op.data, OpData::In(_))),
            cache,
            &mut sqe,
        )?;
        sqe.set_sgl(&sgl).map_err(|e| ExecError::Host(e.into()))?;
        let lent_push = match exec::deadline(timer, deadline, self.submit(&sqe, &op.data, lent, &stage, timer)).await {
            Some(Ok(ticket)) => ticket,
            Some(Err(e)) => return Err(e),
            // A half-sent command closes the channel (the guard), an unsent
            // one frees its slot: either way nothing is left holding a CID.
            None => return Err(ExecError::Timeout { in_flight: false }),
        };
        // No timer entry for this wait: the queue's sweep wakes it once the
        // deadline passed (see `Sweep for Mutex<State>`).
        let reply = match self.wait_reply(&cell, deadline, timer).await {
            Some(r) => {
                guard.done = true;
                r.map_err(|()| ExecError::Lost)
            }
            None => match cell.try_take() {
                Some(r) => {
                    guard.done = true;
                    r.map_err(|()| ExecError::Lost)
                }
                None => return Err(ExecError::Timeout { in_flight: true }),
            },
        };
        if let Some(ticket) = lent_push {
            // The I/O unit answered, so it has the data; the lent buffer
            // returns to its owner once the fabric completed the push:
            // acknowledged (the acknowledgement travels ahead of, or with,
            // the answer), or flushed if the channel fails. No deadline
            // here: cut short, a write that succeeded would hand its caller
            // fresh memory in place of the data it wrote.
            let _ = ticket.completion().await;
        }
        reply
    }

    /// The command's data pointer: in-capsule data, data pushed after the
    /// capsule, or (a read) the buffer exposed for the I/O unit's push,
    /// `read_buf` if the caller lent one. A read's transfer tag goes into
    /// `sqe`.
    fn data_pointer(
        &self,
        cid: usize,
        data: &OpData<'_>,
        read_buf: Option<Buf>,
        cache: &BufCache,
        sqe: &mut Sqe,
    ) -> Result<Sgl, ExecError> {
        Ok(match data {
            OpData::None => Sgl::KeyedDataBlock {
                addr: 0,
                len: 0,
                key: 0,
            },
            OpData::Out(d) if d.len() <= transport::INLINE_DATA_MAX => Sgl::DataBlockOffset {
                offset: 0,
                len: d.len() as u32,
            },
            OpData::Out(d) => Sgl::TransportDataBlock {
                len: u32::try_from(d.len()).map_err(|_| too_long(d.len()))?,
            },
            OpData::OutLent(len) if *len <= transport::INLINE_DATA_MAX => Sgl::DataBlockOffset {
                offset: 0,
                len: *len as u32,
            },
            OpData::OutLent(len) => Sgl::TransportDataBlock {
                len: u32::try_from(*len).map_err(|_| too_long(*len))?,
            },
            OpData::In(len) => {
                // A channel that closed under us (the I/O unit restarted, say)
                // loses the command like a failed send does: it is re-issued
                // on the next connection, not failed.
                let exposure = self.expose(cid, *len, read_buf, cache).map_err(|e| match e {
                    HostError::Messaging(messaging::Error::Closed(_)) => ExecError::Lost,
                    e => ExecError::Host(e),
                })?;
                transport::set_transfer_tag(sqe, exposure.target.tag);
                transport::set_completes_by_data(sqe);
                Sgl::KeyedDataBlock {
                    addr: exposure.target.remote.addr,
                    len: u32::try_from(*len).map_err(|_| too_long(*len))?,
                    key: exposure.target.remote.rkey.0,
                }
            }
        })
    }

    /// A free CID and the cell its completion will land in.
    fn acquire(&self, deadline: Option<Instant>) -> impl Future<Output = Result<(usize, Arc<Cell>), ()>> + '_ {
        std::future::poll_fn(move |cx| {
            let mut st = self.state.lock();
            if st.closed {
                return Poll::Ready(Err(()));
            }
            if st.slots.len() < self.depth {
                let cell = st.reusable_cell().unwrap_or_default();
                let cid = st.slots.insert(Slot {
                    cell: cell.clone(),
                    deadline,
                    exposure: None,
                    data: None,
                    ignored: false,
                });
                return Poll::Ready(Ok((cid, cell)));
            }
            if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                st.waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    fn expose(&self, cid: usize, len: usize, read_buf: Option<Buf>, cache: &BufCache) -> Result<Exposure, HostError> {
        let spare = if read_buf.is_none() {
            let mut st = self.state.lock();
            let best = st
                .spare
                .iter()
                .enumerate()
                .filter(|(_, e)| e.capacity >= len)
                .min_by_key(|(_, e)| e.capacity)
                .map(|(i, _)| i);
            best.map(|i| st.spare.swap_remove(i))
        } else {
            None
        };
        let exposure = match spare {
            Some(e) => e,
            None => {
                let buf = match read_buf {
                    Some(b) => b,
                    None => cache.checkout(len)?,
                };
                let capacity = buf.capacity();
                Exposure {
                    target: self.ep.expose(buf)?,
                    capacity,
                }
            }
        };
        let mut st = self.state.lock();
        if st.closed {
            return Err(HostError::Messaging(messaging::Error::Closed(
                messaging::CloseReason::Disconnected,
            )));
        }
        match st.tags.entry(exposure.target.tag) {
            Entry::Occupied(mut users) => users.get_mut().later.push_back(cid),
            Entry::Vacant(v) => {
                v.insert(TagUsers {
                    oldest: cid,
                    later: VecDeque::new(),
                });
            }
        }
        if let Some(slot) = st.slots.get_mut(cid) {
            slot.exposure = Some(exposure);
        }
        Ok(exposure)
    }

    /// Sends the capsule, then the data it does not carry: copied into
    /// staging buffers, or (`OpData::OutLent`) the lent buffer itself, in
    /// slot-sized pieces, whose last push ticket is returned (the capsule's
    /// Send's ticket when the lent data rides in the capsule).
    async fn submit(
        &self,
        sqe: &Sqe,
        data: &OpData<'_>,
        lent: Option<Buf>,
        stage: &StageCell,
        timer: &Timer,
    ) -> Result<Option<Ticket>, ExecError> {
        let inline: &[u8] = match data {
            OpData::Out(d) if d.len() <= transport::INLINE_DATA_MAX => d,
            _ => &[],
        };
        // A lent buffer of at most a capsule's data travels in the capsule,
        // gathered after the SQE from where it is (no copy on verbs).
        let (gathered, lent) = match (data, lent) {
            (OpData::OutLent(len), Some(b)) if *len <= transport::INLINE_DATA_MAX && b.len() == *len => (Some(b), None),
            (_, lent) => (None, lent),
        };
        // What is pushed after the capsule, checked before anything goes out
        // (half a command on the wire would cost the channel).
        let pushed: Option<&[u8]> = match (data, &lent) {
            (OpData::Out(d), _) if d.len() > transport::INLINE_DATA_MAX => Some(d),
            (OpData::OutLent(len), Some(b)) if b.len() == *len => Some(b),
            (OpData::OutLent(_), _) if gathered.is_some() => None,
            (OpData::OutLent(_), _) => {
                return Err(ExecError::Host(HostError::Protocol(
                    "a lent write buffer is missing or of the wrong length".into(),
                )));
            }
            _ => None,
        };
        // Only a pushed write asks (it takes the endpoint's lock).
        let chunk = if pushed.is_some() { self.ep.max_push() } else { 0 };
        if pushed.is_some() && chunk == 0 {
            return Err(ExecError::Host(HostError::Protocol(
                "the I/O unit granted no slots for write data".into(),
            )));
        }
        // Zero copy: a lent buffer goes out itself, in pieces of one slot.
        let from_lent = matches!(data, OpData::OutLent(_)) && pushed.is_some();
        // The capsule (SQE, then in-capsule data) is gathered straight into
        // the channel's send buffer.
        let sqe_bytes = sqe.encode();
        let capsule: [&[u8]; 2] = [&sqe_bytes, inline];
        let _lock = self.submit.lock().await;
        let mut lent_push = None;
        match gathered {
            Some(buf) => {
                let t = self
                    .ep
                    .send_gather_async(&sqe_bytes[..], buf)
                    .await
                    .map_err(|e| self.send_failed(e))?;
                lent_push = Some(t);
            }
            None => self
                .ep
                .send_async(&capsule)
                .await
                .map_err(|e| self.send_failed(e))?
                .detach(),
        }
        stage.set(Stage::CapsuleOnly);
        if from_lent {
            if let Some(mut buf) = lent {
                // The pieces `transport::push_chunks` names, split off the
                // buffer in order: each returns its part of the chunk when
                // its push completes, and the last push's completion comes
                // after the others' (one queue pair completes in order).
                while buf.len() > chunk {
                    let piece = buf.split_to(chunk);
                    self.ep
                        .push_buf_async(piece)
                        .await
                        .map_err(|e| self.send_failed(e))?
                        .detach();
                }
                let t = self.ep.push_buf_async(buf).await.map_err(|e| self.send_failed(e))?;
                lent_push = Some(t);
            }
        } else if let Some(d) = pushed {
            for (off, len) in transport::push_chunks(d.len(), chunk) {
                let mut buf = self.push_buf(timer).await?;
                buf.fill(&d[off..off + len])
                    .map_err(|cap| ExecError::Host(HostError::Protocol(format!("push chunk above {cap} bytes"))))?;
                let t = self.ep.push_buf_async(buf).await.map_err(|e| self.send_failed(e))?;
                let mut pushes = self.pushes.lock();
                pushes.push_back(t);
                // Each push in flight holds one of PUSH_BUFFERS staging
                // buffers, so a ticket older than the newest PUSH_BUFFERS
                // is done: keeping it would only grow the deque and the
                // endpoint's ticket table.
                while pushes.len() > PUSH_BUFFERS {
                    pushes.pop_front();
                }
            }
        }
        stage.set(Stage::Whole);
        Ok(lent_push)
    }

    fn send_failed(&self, e: messaging::Error) -> ExecError {
        match e {
            messaging::Error::Closed(_) | messaging::Error::Transfer(_) => ExecError::Lost,
            e => {
                // The stream may hold half a command: start over on a new channel.
                self.ep.close();
                ExecError::Host(e.into())
            }
        }
    }

    /// A staging buffer for pushed data, waiting for earlier pushes of this
    /// queue to complete when all are in use.
    async fn push_buf(&self, timer: &Timer) -> Result<Buf, ExecError> {
        let pool = {
            let mut slot = self.push_pool.lock();
            match &*slot {
                Some(p) => p.clone(),
                None => {
                    let p = self
                        .domain
                        .register(self.ep.max_push(), PUSH_BUFFERS, Access::LOCAL_WRITE)
                        .map_err(|e| ExecError::Host(e.into()))?;
                    *slot = Some(p.clone());
                    p
                }
            }
        };
        loop {
            if let Some(b) = pool.checkout() {
                return Ok(b);
            }
            let oldest = self.pushes.lock().pop_front();
            match oldest {
                Some(t) => {
                    let _ = t.completion().await;
                }
                None => timer.sleep_until(Instant::now() + Duration::from_millis(1)).await,
            }
            if self.is_closed() {
                return Err(ExecError::Lost);
            }
        }
    }

    /// The command's completion, or `None` once `deadline` passed or the
    /// timer stopped (the queue's sweep wakes the waiter then).
    fn wait_reply<'a>(
        &'a self,
        cell: &'a Cell,
        deadline: Option<Instant>,
        timer: &'a Timer,
    ) -> impl Future<Output = Option<Result<Reply, ()>>> + 'a {
        let mut first = true;
        std::future::poll_fn(move |cx| {
            let mut inner = cell.inner.lock();
            if let Some(r) = inner.result.take() {
                return Poll::Ready(Some(r));
            }
            // A stopped timer sweeps no more: that is the deadline (looked
            // at under the cell's lock, which its final sweep takes too, so
            // a wait registered just before that sweep is woken by it). The
            // first look reads no clock: a command just sent has not timed
            // out (and one that was late already is woken by the next sweep).
            if let Some(d) = deadline {
                if timer.is_stopped() || (!first && Instant::now() >= d) {
                    return Poll::Ready(None);
                }
            }
            first = false;
            inner.waker = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

/// Cleans up a command's slot when its caller stops waiting early.
pub(super) struct SlotGuard<'a> {
    queue: &'a Queue,
    cid: usize,
    cell: &'a Arc<Cell>,
    stage: &'a StageCell,
    done: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let stage = self.stage.get();
        if stage == Stage::CapsuleOnly {
            // Half a command is on the wire: the channel's stream is unusable.
            tracing::warn!(qid = self.queue.qid, "closing queue: a write's data push was abandoned");
            self.queue.ep.close();
            return;
        }
        let waiters = {
            let mut st = self.queue.state.lock();
            let ours = st.slots.get(self.cid).is_some_and(|s| Arc::ptr_eq(&s.cell, self.cell));
            if !ours {
                return;
            }
            if stage == Stage::Whole {
                // The I/O unit may still answer, and write into the buffer:
                // keep the CID and the buffer out of use until it does.
                if let Some(slot) = st.slots.get_mut(self.cid) {
                    slot.ignored = true;
                    slot.data = None;
                }
                return;
            }
            let slot = st.slots.remove(self.cid);
            if let Some(exposure) = slot.exposure {
                take_tag(&mut st.tags, exposure.target.tag, Some(self.cid));
                st.spare.push(exposure);
            }
            std::mem::take(&mut st.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }
}

pub(super) fn too_long(len: usize) -> ExecError {
    ExecError::Host(HostError::InvalidArgument(format!(
        "{len} bytes do not fit one command"
    )))
}
