//! The session: connecting the admin and I/O queues, and running a command
//! on them, re-issued across a reconnect until its deadline.

use super::*;

impl Inner {
    pub(super) fn spawn(&self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), HostError> {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|source| HostError::Thread {
                name: name.into(),
                source,
            })?;
        let mut threads = self.threads.lock();
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(())
    }

    /// Builds a controller: admin queue, Number of Queues, Identify
    /// Controller, I/O queues.
    pub(super) fn connect_session(self: &Arc<Self>) -> Result<Arc<Session>, HostError> {
        let uri = self.uri.to_string();
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let weak: Weak<Inner> = Arc::downgrade(self);
        let on_lost: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |g| {
            if let Some(inner) = weak.upgrade() {
                inner.report_lost(g, "a queue's channel closed");
            }
        });
        let data = ConnectData {
            host_id: host_id(self.hostnqn.as_str()),
            cntlid: ConnectData::CNTLID_DYNAMIC,
            subnqn: self.subnqn.clone(),
            hostnqn: self.hostnqn.clone(),
        };
        let fabric = self
            .fabrics
            .fabric(self.resolved.scheme)
            .map_err(|e| HostError::InvalidUri {
                uri: self.resolved.to_string(),
                reason: e.to_string(),
            })?;
        let mut params = QueueParams {
            fabric,
            domain: &self.domain,
            addr: &self.addrs[self.current.load(Ordering::Relaxed) % self.addrs.len()],
            depth: ADMIN_QUEUE_DEPTH,
            kato_ms: self.opts.kato_ms(),
            data: &data,
            timeout: self.opts.connect_timeout,
            generation,
        };
        let (admin, cntlid) = Queue::connect(&params, 0).map_err(|e| HostError::connect(&uri, "admin queue", e))?;
        if !self.timer.watch(admin.deadlines()) {
            // The host is closing (its timer stopped): no command could time out.
            admin.close();
            return Err(HostError::Closed);
        }
        let mut io = Vec::new();
        let (queues, max_transfer) = match self.set_up_admin(&admin, &on_lost) {
            Ok(v) => v,
            Err(e) => {
                admin.close();
                return Err(HostError::connect(&uri, "admin commands", e));
            }
        };
        let io_data = ConnectData { cntlid, ..data.clone() };
        params.data = &io_data;
        params.depth = self.opts.queue_depth;
        params.kato_ms = 0;
        for qid in 1..=queues {
            let opened = Queue::connect(&params, qid).and_then(|(q, _)| {
                if !self.timer.watch(q.deadlines()) {
                    q.close();
                    return Err(HostError::Closed);
                }
                let receiver = q.spawn_receiver(on_lost.clone())?;
                self.threads.lock().push(receiver);
                Ok(q)
            });
            match opened {
                Ok(q) => io.push(q),
                Err(e) => {
                    admin.close();
                    io.iter().for_each(|q: &Arc<Queue>| q.close());
                    return Err(HostError::connect(&uri, format!("I/O queue {qid}"), e));
                }
            }
        }
        tracing::info!(%uri, cntlid, io_queues = io.len(), "connected");
        Ok(Arc::new(Session {
            generation,
            cntlid,
            admin,
            io,
            max_transfer,
        }))
    }

    /// On a new admin queue: starts its receiver, asks for the I/O queues
    /// and learns the largest transfer. Returns the queues granted (at most
    /// those asked for) and the largest transfer.
    fn set_up_admin(
        &self,
        admin: &Arc<Queue>,
        on_lost: &Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<(u16, usize), HostError> {
        let receiver = admin.spawn_receiver(on_lost.clone())?;
        self.threads.lock().push(receiver);
        let deadline = Instant::now() + self.opts.connect_timeout;
        let op = Op::set_number_of_queues(self.opts.io_queues)?;
        let reply = self.run_on(admin, &op, deadline)?;
        let granted = NumberOfQueues::from_dword(reply.cqe.dw0)?;
        let queues = self.opts.io_queues.min(granted.submission()).min(granted.completion());
        let reply = self.run_on(admin, &Op::identify(Cns::Controller, Nsid(0)), deadline)?;
        let id = IdentifyController::decode(reply.data.as_deref().unwrap_or(&[]))?;
        let max_transfer = match id.mdts {
            0 => transport::MAX_TRANSFER,
            m => transport::MAX_TRANSFER.min(4096usize.checked_shl(u32::from(m)).unwrap_or(usize::MAX)),
        };
        Ok((queues, max_transfer))
    }

    /// Runs an admin command during set-up (no reconnects).
    fn run_on(&self, queue: &Queue, op: &Op<'_>, deadline: Instant) -> Result<Reply, HostError> {
        let reply = exec::block_on(queue.execute(op, None, &self.cache, Some(deadline), &self.timer));
        match reply {
            Ok(r) => check_reply(op, r),
            Err(ExecError::Timeout { .. }) => Err(HostError::Timeout {
                command: op.name,
                after: self.opts.connect_timeout,
            }),
            Err(ExecError::Lost) => Err(HostError::Protocol(format!(
                "the I/O unit closed the admin queue during {}",
                op.name
            ))),
            Err(ExecError::Host(e)) => Err(e),
        }
    }

    /// Runs one command, re-issuing it after a reconnect.
    pub(super) async fn run(&self, op: &Op<'_>, mut read_buf: Option<Buf>) -> Result<Reply, HostError> {
        loop {
            // Without `once`, `run_with` re-issues by itself and never
            // returns `None`.
            if let Some(reply) = self.run_with(op, read_buf.take(), false).await? {
                return Ok(reply);
            }
        }
    }

    /// Runs one command (with `lent`, the buffer it reads into or writes
    /// from), re-issuing it after a reconnect; with `once`, a command lost
    /// with its channel comes back as `Ok(None)` instead, for a caller that
    /// must take its lent buffer back before re-issuing.
    pub(super) async fn run_with(
        &self,
        op: &Op<'_>,
        mut lent: Option<Buf>,
        once: bool,
    ) -> Result<Option<Reply>, HostError> {
        let deadline = Instant::now() + self.opts.command_timeout;
        loop {
            let session = self.session(deadline).await?;
            let queue = match op.queue {
                QueueKind::Admin => &session.admin,
                QueueKind::Io => session.pick(&self.next_queue),
            };
            match queue
                .execute(op, lent.take(), &self.cache, Some(deadline), &self.timer)
                .await
            {
                Ok(reply) => return check_reply(op, reply).map(Some),
                Err(ExecError::Lost) => {
                    tracing::debug!(command = op.name, "channel lost; re-issuing after reconnect");
                    self.report_lost(session.generation, "a queue's channel closed");
                    if once {
                        return Ok(None);
                    }
                }
                Err(ExecError::Timeout { in_flight }) => {
                    if in_flight {
                        // The command keeps its CID (and read buffer) until
                        // the I/O unit answers, which a hung queue never
                        // does: reset the connection, as a controller reset
                        // would, so the queue does not fill up for good.
                        self.report_lost(
                            session.generation,
                            &format!("{} timed out on queue {}", op.name, queue.qid),
                        );
                    }
                    return Err(HostError::Timeout {
                        command: op.name,
                        after: self.opts.command_timeout,
                    });
                }
                Err(ExecError::Host(e)) => return Err(e),
            }
        }
    }

    /// Runs commands, [`BATCH`] at a time; the first error wins.
    pub(super) async fn run_all<'a>(
        &self,
        ops: impl Iterator<Item = Result<Op<'a>, HostError>>,
    ) -> Result<(), HostError> {
        let ops: Vec<Op<'a>> = ops.collect::<Result<_, _>>()?;
        for batch in ops.chunks(BATCH) {
            let results = exec::join_all(batch.iter().map(|op| self.run(op, None)).collect()).await;
            for r in results {
                r?;
            }
        }
        Ok(())
    }

    /// The current session, waiting while reconnecting (until the reconnect
    /// deadline or `deadline`).
    pub(super) fn session(&self, deadline: Instant) -> impl Future<Output = Result<Arc<Session>, HostError>> + '_ {
        // Dropped with the future: the timer forgets the wake-up.
        let mut entry = None;
        std::future::poll_fn(move |cx| {
            let st = self.state.lock();
            match &*st {
                ConnState::Connected(s) => Poll::Ready(Ok(s.clone())),
                ConnState::Closed => Poll::Ready(Err(HostError::Closed)),
                ConnState::Reconnecting { since } => {
                    let limit = (*since + self.opts.reconnect_deadline).min(deadline);
                    let now = Instant::now();
                    if now >= limit {
                        return Poll::Ready(Err(HostError::ConnectionLost {
                            uri: self.uri.to_string(),
                            waited: now.saturating_duration_since(*since),
                        }));
                    }
                    let mut waiters = self.waiters.lock();
                    if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                        waiters.push(cx.waker().clone());
                    }
                    drop(waiters);
                    if entry.is_none() {
                        match self.timer.wake_at(limit, cx.waker()) {
                            Some(e) => entry = Some(e),
                            None => return Poll::Ready(Err(HostError::Closed)),
                        }
                    }
                    Poll::Pending
                }
            }
        })
    }

    pub(super) fn max_transfer(&self) -> usize {
        match &*self.state.lock() {
            ConnState::Connected(s) => s.max_transfer,
            _ => transport::MAX_TRANSFER,
        }
    }
}

/// Checks a completion: status, and the data a command expects.
pub(super) fn check_reply(op: &Op<'_>, reply: Reply) -> Result<Reply, HostError> {
    let status = reply.cqe.status();
    if !status.is_success() {
        return Err(HostError::Nvme {
            command: op.name,
            status,
        });
    }
    if let OpData::In(len) = op.data {
        match &reply.data {
            None => return Err(HostError::Protocol(format!("{} completed without its data", op.name))),
            Some(d) if d.len() != len && op.queue == QueueKind::Io => {
                return Err(HostError::Protocol(format!(
                    "{} returned {} bytes instead of {len}",
                    op.name,
                    d.len()
                )))
            }
            Some(_) => {}
        }
    }
    Ok(reply)
}

pub(super) fn reply_data(reply: &Reply) -> &[u8] {
    reply.data.as_deref().unwrap_or(&[])
}

pub(super) fn check_request(what: &str, nsid: Nsid, slba: u64, blocks: u64) -> Result<(), HostError> {
    command::check_nsid(nsid, false)?;
    command::check_range(what, slba, blocks, u64::MAX)?;
    Ok(())
}
