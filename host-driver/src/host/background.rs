//! The background threads: the supervisor that reconnects a lost session,
//! keep alive, asynchronous events, and closing.

use super::*;

impl Inner {
    /// Marks generation `generation` lost (once): closes its queues, and has
    /// the supervisor reconnect.
    pub(super) fn report_lost(&self, generation: u64, reason: &str) {
        let session = {
            let mut st = self.state.lock();
            match &*st {
                ConnState::Connected(s) if s.generation == generation => {
                    let s = s.clone();
                    *st = ConnState::Reconnecting { since: Instant::now() };
                    s
                }
                _ => return,
            }
        };
        tracing::warn!(uri = %self.uri, "connection lost: {reason}; reconnecting");
        session.close();
        {
            // Forgotten (a new controller may say otherwise), but kept as
            // what a controller to go on with must show.
            let mut cache = self.namespaces.lock();
            let mut used = self.used_nsids.lock();
            used.extend(cache.keys().copied());
            used.sort_unstable();
            used.dedup();
            cache.clear();
        }
        self.notify_state();
        self.emit(HostEvent::Disconnected {
            reason: reason.to_string(),
        });
        if let Some(tx) = &*self.lost_tx.lock() {
            let _ = tx.send(generation);
        }
    }

    fn notify_state(&self) {
        self.state_cv.notify_all();
        let waiters = std::mem::take(&mut *self.waiters.lock());
        waiters.into_iter().for_each(Waker::wake);
    }

    fn emit(&self, event: HostEvent) {
        self.subscribers.lock().retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Reconnects after each loss, with backoff, until closed.
    pub(super) fn supervise(self: Arc<Self>, lost: mpsc::Receiver<u64>) {
        while let Ok(generation) = lost.recv() {
            if generation == STOP {
                return;
            }
            let mut backoff = Duration::from_millis(50);
            let mut attempt = 0u32;
            // The address lost first, then each alternate in turn.
            let start = self.current.load(Ordering::Relaxed);
            loop {
                if !matches!(*self.state.lock(), ConnState::Reconnecting { .. }) {
                    break;
                }
                self.current
                    .store((start + attempt as usize) % self.addrs.len(), Ordering::Relaxed);
                attempt += 1;
                let connected = self.connect_session().and_then(|session| {
                    // An alternate that does not show the namespaces in use
                    // (a replica, not the primary) is no place to go on.
                    match self.missing_namespace(&session) {
                        None => Ok(session),
                        Some(nsid) => {
                            session.close();
                            Err(HostError::Protocol(format!(
                                "{} does not show namespace {nsid}",
                                self.addrs[self.current.load(Ordering::Relaxed)]
                            )))
                        }
                    }
                });
                match connected {
                    Ok(session) => {
                        let mut st = self.state.lock();
                        if matches!(*st, ConnState::Closed) {
                            drop(st);
                            session.close();
                            return;
                        }
                        let cntlid = session.cntlid;
                        self.last_cntlid.store(u64::from(cntlid), Ordering::Relaxed);
                        *st = ConnState::Connected(session);
                        drop(st);
                        tracing::info!(uri = %self.uri, attempt, cntlid, "reconnected");
                        self.notify_state();
                        self.emit(HostEvent::Reconnected { controller_id: cntlid });
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(uri = %self.uri, attempt, "reconnect failed: {e}");
                        let until = Instant::now() + backoff;
                        let mut st = self.state.lock();
                        while !matches!(*st, ConnState::Closed) && Instant::now() < until {
                            self.state_cv.wait_until(&mut st, until);
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    /// A namespace this host has used that `session`'s controller does not
    /// list as active; `None` when it shows them all (or none was used,
    /// or there are no alternates to choose from).
    fn missing_namespace(&self, session: &Session) -> Option<u32> {
        let known: Vec<u32> = self.used_nsids.lock().clone();
        if known.is_empty() || self.addrs.len() < 2 {
            return None;
        }
        let op = Op::identify(Cns::ActiveNamespaceList, Nsid(0));
        let deadline = Instant::now() + self.opts.command_timeout;
        let reply = exec::block_on(
            session
                .admin
                .execute(&op, None, &self.cache, Some(deadline), &self.timer),
        );
        let active = match reply {
            Ok(r) if r.cqe.status().is_success() => r
                .data
                .as_deref()
                .and_then(|d| nvme::NamespaceList::decode(d).ok())
                .map(|l| l.nsids().iter().map(|n| n.0).collect::<Vec<u32>>()),
            _ => None,
        };
        let Some(active) = active else {
            return known.first().copied();
        };
        known.into_iter().find(|n| !active.contains(n))
    }

    /// Sends Keep Alive every half KATO; a keep alive that times out means
    /// the I/O unit is gone.
    pub(super) fn keep_alive_loop(self: Arc<Self>) {
        let period = self.opts.keep_alive / 2;
        loop {
            let session = {
                let until = Instant::now() + period;
                let mut st = self.state.lock();
                while !matches!(*st, ConnState::Closed) && Instant::now() < until {
                    self.state_cv.wait_until(&mut st, until);
                }
                match &*st {
                    ConnState::Closed => return,
                    ConnState::Connected(s) => s.clone(),
                    ConnState::Reconnecting { .. } => continue,
                }
            };
            let deadline = Instant::now() + self.opts.keep_alive.min(self.opts.command_timeout);
            let op = Op::keep_alive();
            let r = exec::block_on(
                session
                    .admin
                    .execute(&op, None, &self.cache, Some(deadline), &self.timer),
            );
            match r {
                Ok(reply) if reply.cqe.status().is_success() => {}
                Ok(reply) => self.report_lost(
                    session.generation,
                    &format!("Keep Alive failed: {}", reply.cqe.status()),
                ),
                Err(ExecError::Timeout { .. }) => self.report_lost(session.generation, "Keep Alive timed out"),
                Err(ExecError::Lost) => self.report_lost(session.generation, "a queue's channel closed"),
                Err(ExecError::Host(e)) => tracing::warn!("Keep Alive not sent: {e}"),
            }
        }
    }

    /// Keeps an Asynchronous Event Request outstanding on every controller
    /// and turns its completions into [`HostEvent`]s.
    pub(super) fn event_loop(self: Arc<Self>) {
        let mut failed_generation = 0;
        loop {
            let session = {
                let mut st = self.state.lock();
                loop {
                    match &*st {
                        ConnState::Closed => return,
                        ConnState::Connected(s) if s.generation != failed_generation => break s.clone(),
                        _ => self.state_cv.wait(&mut st),
                    }
                }
            };
            let op = Op::async_event_request();
            let r = exec::block_on(session.admin.execute(&op, None, &self.cache, None, &self.timer));
            match r {
                Ok(reply) if reply.cqe.status().is_success() => {
                    let event = AsyncEvent::from_dw0(reply.cqe.dw0);
                    exec::block_on(self.handle_async_event(event));
                }
                Ok(reply) => {
                    tracing::warn!("Asynchronous Event Request refused: {}", reply.cqe.status());
                    failed_generation = session.generation;
                }
                Err(ExecError::Lost) => self.report_lost(session.generation, "a queue's channel closed"),
                Err(ExecError::Timeout { .. }) => {}
                Err(ExecError::Host(e)) => {
                    tracing::warn!("Asynchronous Event Request not sent: {e}");
                    failed_generation = session.generation;
                }
            }
        }
    }

    async fn handle_async_event(&self, event: AsyncEvent) {
        let namespace_notice = event.kind() == Some(AsyncEventType::Notice)
            && event.info == AsyncEvent::NOTICE_NAMESPACE_ATTRIBUTE_CHANGED;
        if !namespace_notice {
            self.emit(HostEvent::AsyncEvent(event));
            return;
        }
        let changed = async {
            let op = Op::get_log_page(LogPageId::ChangedNamespaceList, nvme::log::CHANGED_NAMESPACE_LIST_LEN)?;
            let reply = self.run(&op, None).await?;
            Ok::<_, HostError>(ChangedNamespaceList::decode(reply_data(&reply))?)
        }
        .await;
        match changed {
            Ok(list) => {
                {
                    let mut cache = self.namespaces.lock();
                    if list.overflowed() {
                        cache.clear();
                    }
                    for n in list.nsids() {
                        cache.remove(&n.0);
                    }
                }
                self.emit(HostEvent::NamespacesChanged {
                    nsids: list.nsids().to_vec(),
                    all: list.overflowed(),
                });
            }
            Err(e) => {
                tracing::warn!("reading the Changed Namespace List failed: {e}");
                self.namespaces.lock().clear();
                self.emit(HostEvent::NamespacesChanged {
                    nsids: Vec::new(),
                    all: true,
                });
            }
        }
    }

    pub(super) fn close(&self) {
        let old = std::mem::replace(&mut *self.state.lock(), ConnState::Closed);
        if let ConnState::Connected(s) = &old {
            s.close();
        }
        self.notify_state();
        if let Some(tx) = self.lost_tx.lock().take() {
            let _ = tx.send(STOP);
        }
        self.subscribers.lock().clear();
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            // The supervisor may be inside a connect attempt (bounded by the
            // connect timeout); it notices the close on its own.
            let supervisor = t.thread().name() == Some("chanio-host-supervisor");
            if t.thread().id() != me && !supervisor {
                let _ = t.join();
            }
        }
        self.timer.stop();
        drop(old);
    }
}
