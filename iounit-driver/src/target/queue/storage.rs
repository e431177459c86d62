//! Storage on the queue's io_uring: the requests a command puts there
//! (each owning the memory the kernel transfers), the staging buffers a
//! read's data waits in until it is pushed, and what a finished request
//! leads to.

use super::*;

/// A read, write or flush on the queue's ring. Each owns the memory the
/// kernel transfers (see [`Ring`]).
pub(super) enum Io {
    /// A read into a staging buffer, pushed to the host once complete.
    Read {
        cid: CommandId,
        _ns: NamespaceRef,
        offset: u64,
        buf: Buf,
        target: DirectTarget,
        by_data: bool,
    },
    /// In-capsule write data: the capsule after its SQE.
    Inline {
        cid: CommandId,
        _ns: NamespaceRef,
        offset: u64,
        capsule: messaging::Delivery,
        fua: bool,
    },
    /// One pushed chunk of the write `write` (a key of `Queue::writes`,
    /// which holds its namespace).
    Chunk {
        write: usize,
        offset: u64,
        data: messaging::Delivery,
        fua: bool,
    },
    Flush {
        cid: CommandId,
        _ns: NamespaceRef,
    },
    /// A cached extent's Commit: its bytes, copied out, written with FUA.
    Writeback {
        cid: CommandId,
        _ns: NamespaceRef,
        offset: u64,
        data: Vec<u8>,
    },
}

// SAFETY: every variant names memory that neither moves nor resizes while
// the request lives: a staging `Buf` (a chunk of a registration) whose
// length is set before the request starts, a `Delivery`'s receive buffer
// or slot, which it holds until dropped, or a `Vec`'s heap buffer, which
// moving the request does not move and nothing resizes; `op` writes
// nothing.
unsafe impl Transfer for Io {
    fn op(&mut self) -> IoOp<'_> {
        match self {
            Io::Read { offset, buf, .. } => IoOp::Read {
                offset: *offset,
                buf: &mut buf[..],
            },
            Io::Inline {
                offset, capsule, fua, ..
            } => IoOp::Write {
                offset: *offset,
                data: capsule.get(SQE_LEN..).unwrap_or_default(),
                fua: *fua,
            },
            Io::Chunk { offset, data, fua, .. } => IoOp::Write {
                offset: *offset,
                data,
                fua: *fua,
            },
            Io::Flush { .. } => IoOp::Flush,
            Io::Writeback { offset, data, .. } => IoOp::Write {
                offset: *offset,
                data,
                fua: true,
            },
        }
    }
}

/// Registered buffers that read data is staged in before its push to the
/// host: many small ones (a queue full of 4 KiB reads never waits for one)
/// and a few of the largest transfer. None is registered before a read
/// needs one: a queue's staging grows with the reads it has had in flight
/// at once, in chunks, up to each tier's bound.
pub(super) struct Staging {
    small: Tier,
    large: Tier,
}

/// One size of staging buffers. Each push in flight holds one (a placed
/// push too: it stands for the push); it returns to its pool when the push
/// completes.
struct Tier {
    size: usize,
    /// Buffers per registration.
    chunk: usize,
    /// Buffers in all, at most.
    max: usize,
    pools: Vec<BufPool>,
}

impl Tier {
    fn new(size: usize, chunk: usize, max: usize) -> Tier {
        Tier {
            size,
            chunk,
            max,
            pools: Vec::new(),
        }
    }

    /// A free buffer, registering another chunk in `ep`'s domain while
    /// under the bound. `None` when all are taken (or a registration failed
    /// and earlier ones will give buffers back).
    fn checkout(&mut self, ep: &Endpoint) -> Result<Option<Buf>, QueueError> {
        if let Some(b) = self.pools.iter().find_map(BufPool::checkout) {
            return Ok(Some(b));
        }
        if self.pools.len() * self.chunk >= self.max {
            return Ok(None);
        }
        match ep.domain().register(self.size, self.chunk, Access::LOCAL_WRITE) {
            Ok(pool) => {
                let b = pool.checkout();
                self.pools.push(pool);
                Ok(b)
            }
            Err(e) if self.pools.is_empty() => Err(QueueError::Staging(e)),
            Err(e) => {
                tracing::warn!(
                    size = self.size,
                    "cannot register more staging buffers, waiting for one: {e}"
                );
                Ok(None)
            }
        }
    }
}

impl Staging {
    pub(super) fn new() -> Staging {
        Staging {
            small: Tier::new(SMALL_STAGING, SMALL_STAGING_CHUNK, SMALL_STAGING_BUFFERS),
            large: Tier::new(transport::MAX_TRANSFER, 1, STAGING_BUFFERS),
        }
    }

    fn tier(&mut self, len: usize) -> &mut Tier {
        if len <= SMALL_STAGING {
            &mut self.small
        } else {
            &mut self.large
        }
    }
}

impl Queue {
    /// Whether no storage request is in flight (on the ring or on a
    /// blocking thread).
    pub(super) fn ring_idle(&self) -> bool {
        self.ring.as_ref().is_none_or(|(r, _)| r.in_flight() == 0) && self.offload.idle()
    }

    /// Starts `io`: on the ring (made on first use) for a namespace with
    /// files, on the target's blocking threads for one whose calls may
    /// wait; `None` once it is there. Where no ring can be made, or it is
    /// full, or the namespace is memory, `io` comes back, to run here and
    /// now instead ([`Queue::run_now`]).
    pub(super) fn start(&mut self, io: Io) -> Option<Io> {
        let Some(ns) = self.namespace_of(&io).cloned() else {
            return Some(io);
        };
        let Some(files) = ns.files().cloned() else {
            if ns.may_block() {
                self.offload(io, ns);
                return None;
            }
            return Some(io);
        };
        if self.ring.is_none() {
            let capacity =
                usize::from(self.depth) + usize::from(transport::CHANNEL_SLACK) + usize::from(transport::SLOT_COUNT);
            match Ring::new(capacity) {
                Ok(ring) => {
                    let waker = ring.waker();
                    self.ring = Some((ring, waker));
                }
                Err(e) => tracing::warn!(
                    qid = self.qid,
                    "no io_uring for this queue ({e}); running I/O one at a time"
                ),
            }
        }
        match &mut self.ring {
            Some((ring, _)) => ring.start(&files, io).err(),
            None => Some(io),
        }
    }

    /// The namespace `io` runs against.
    fn namespace_of<'a>(&'a self, io: &'a Io) -> Option<&'a NamespaceRef> {
        match io {
            Io::Read { _ns: ns, .. }
            | Io::Inline { _ns: ns, .. }
            | Io::Flush { _ns: ns, .. }
            | Io::Writeback { _ns: ns, .. } => Some(ns),
            Io::Chunk { write, .. } => self.writes.get(*write)?.ns.as_ref(),
        }
    }

    /// Runs `io` on a blocking thread; its result comes back through
    /// `offloaded`, and the queue's waker calls its worker.
    fn offload(&mut self, mut io: Io, ns: NamespaceRef) {
        self.offload.in_flight += 1;
        let done = self.offload.done.clone();
        let waker = self.offload.waker.clone();
        self.shared.blocking.spawn(move || {
            // A backend that panics fails the request, not the queue.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_sync(&mut io, &ns)))
                .unwrap_or_else(|_| Err(BlockError::new(ErrorKind::NotReady, "the backend panicked")));
            drop(ns);
            done.lock().push((io, r));
            if let Some(w) = waker {
                w.wake();
            }
        });
    }

    /// Moves on every command whose request a blocking thread finished.
    pub(super) fn reap_offloaded(&mut self) -> Result<bool, QueueError> {
        if self.offload.in_flight == 0 {
            return Ok(false);
        }
        let mut finished = std::mem::take(&mut self.offload.finished);
        std::mem::swap(&mut *self.offload.done.lock(), &mut finished);
        let any = !finished.is_empty();
        let mut outcome = Ok(());
        for (io, r) in finished.drain(..) {
            self.offload.in_flight -= 1;
            if outcome.is_ok() {
                let next = self.done(io, r);
                outcome = self.advance(next);
            }
        }
        self.offload.finished = finished;
        outcome.map(|()| any)
    }

    /// Runs `io` through the blocking calls: the command's next state.
    pub(super) fn run_now(&mut self, mut io: Io) -> State {
        let r = match self.namespace_of(&io).cloned() {
            Some(ns) => run_sync(&mut io, &ns),
            None => Err(BlockError::new(ErrorKind::NotReady, "the write's namespace is gone")),
        };
        self.done(io, r)
    }

    /// A read of `len` bytes at `offset` into a staging buffer, for the
    /// ring.
    pub(super) fn read_io(
        &mut self,
        sqe: &Sqe,
        ns: NamespaceRef,
        offset: u64,
        len: usize,
    ) -> Result<State, QueueError> {
        let cid = sqe.command_id;
        let target = match io::host_target(sqe) {
            Ok(t) => t,
            Err(status) => return Ok(State::complete(cid, status)),
        };
        let mut buf = self.staging_buf(target.remote.len as usize)?;
        // The descriptor takes all `len` bytes (checked by the caller); a
        // staging buffer too small would cut the data short unnoticed.
        if len > buf.capacity() {
            return Ok(State::complete(cid, Status::INTERNAL_ERROR));
        }
        buf.set_len(len);
        Ok(State::Storage(Io::Read {
            cid,
            _ns: ns,
            offset,
            buf,
            target,
            by_data: transport::completes_by_data(sqe),
        }))
    }

    /// A staging buffer for `len` bytes. While all are taken, the ring's
    /// completions (reads whose data is then pushed) and the channel's
    /// (pushes that give their buffer back: the host acknowledges pushes as
    /// they land) are waited for; a host that stops for `STAGING_WAIT`
    /// costs its channel. The clock is read only when all are taken.
    pub(super) fn staging_buf(&mut self, len: usize) -> Result<Buf, QueueError> {
        if let Some(b) = self.staging.tier(len).checkout(&self.ep)? {
            return Ok(b);
        }
        let deadline = Instant::now() + STAGING_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QueueError::NoStaging(STAGING_WAIT));
            }
            if self.ring_idle() {
                match self.ep.wait_progress(left) {
                    Ok(()) | Err(MsgError::Timeout(_)) => {}
                    Err(e) => return Err(QueueError::Push(e)),
                }
            } else if self.ring.as_ref().is_none_or(|(r, _)| r.in_flight() == 0) {
                // Only blocking threads hold buffers: take what they
                // finished (its pushes give buffers back as the host
                // acknowledges them) and look again shortly.
                self.reap_offloaded()?;
                match self.ep.wait_progress(left.min(Duration::from_millis(1))) {
                    Ok(()) | Err(MsgError::Timeout(_)) => {}
                    Err(e) => return Err(QueueError::Push(e)),
                }
            } else {
                // The pushes that give buffers back must move while this
                // thread sleeps in the ring: held sends go out, and the
                // provider's fallback reads the acknowledgements.
                self.ep.step_away();
                self.wait_ring(left.min(TICK))?;
            }
            if let Some(b) = self.staging.tier(len).checkout(&self.ep)? {
                return Ok(b);
            }
        }
    }

    /// Hands the ring's queued requests to the kernel.
    pub(super) fn submit_ring(&mut self) -> Result<(), QueueError> {
        match &mut self.ring {
            Some((ring, _)) => ring.submit().map_err(QueueError::ring("submission")),
            None => Ok(()),
        }
    }

    /// Sleeps in the ring up to `timeout` (a completion or the channel's
    /// waker ends it), then handles what completed.
    fn wait_ring(&mut self, timeout: Duration) -> Result<(), QueueError> {
        if let Some((ring, _)) = &mut self.ring {
            ring.wait(timeout).map_err(QueueError::ring("wait"))?;
        }
        self.reap_ring()
    }

    /// Moves on every command whose request the ring finished; their
    /// pushes and completions go out as one batch.
    pub(super) fn reap_ring(&mut self) -> Result<(), QueueError> {
        let Some((mut ring, waker)) = self.ring.take() else {
            return Ok(());
        };
        let ep = self.ep.clone();
        let cork = ep.cork();
        let mut outcome = Ok(());
        ring.reap(|io, r| {
            if outcome.is_ok() {
                // A finished request leads to a push or a completion, never
                // back to the ring (which is out of `self` meanwhile).
                let next = self.done(io, r);
                outcome = self.advance(next);
            }
        });
        drop(cork);
        self.ring = Some((ring, waker));
        outcome
    }

    /// A request finished with `r`: the command's next state (a read's
    /// data to push, a completion, or, for a chunk, its write's completion
    /// once the last chunk is in).
    pub(super) fn done(&mut self, io: Io, r: Result<(), BlockError>) -> State {
        match (io, r) {
            (
                Io::Read {
                    cid,
                    _ns,
                    offset,
                    mut buf,
                    target,
                    by_data,
                },
                Ok(()),
            ) => {
                // Window writes a cached extent holds, not yet in the file.
                self.shared.windows.overlay(_ns.nsid(), offset, &mut buf);
                drop(_ns);
                State::ToHost {
                    cid,
                    buf,
                    target,
                    by_data,
                }
            }
            (Io::Read { cid, .. }, Err(e)) => State::complete(cid, block_status(&e)),
            (
                Io::Inline {
                    cid,
                    _ns,
                    capsule,
                    offset,
                    ..
                },
                r,
            ) => {
                if r.is_ok() {
                    let data = capsule.get(SQE_LEN..).unwrap_or_default();
                    self.shared.windows.absorb(_ns.nsid(), offset, data);
                }
                // The receive (a credit) and the namespace go back first.
                drop((capsule, _ns));
                State::complete(cid, r.map_or_else(|e| block_status(&e), |()| Status::SUCCESS))
            }
            (Io::Flush { cid, _ns }, r) | (Io::Writeback { cid, _ns, .. }, r) => {
                drop(_ns);
                State::complete(cid, r.map_or_else(|e| block_status(&e), |()| Status::SUCCESS))
            }
            (
                Io::Chunk {
                    write, data, offset, ..
                },
                r,
            ) => {
                if let (Ok(()), Some(ns)) = (&r, self.writes.get(write).and_then(|w| w.ns.as_ref())) {
                    self.shared.windows.absorb(ns.nsid(), offset, &data);
                }
                drop(data);
                if let Some(w) = self.writes.get_mut(write) {
                    w.outstanding = w.outstanding.saturating_sub(1);
                    if let (Err(e), true) = (r, w.status.is_success()) {
                        w.status = block_status(&e);
                    }
                }
                self.finish_write(write)
            }
        }
    }
}

/// `io` through `ns`'s blocking calls.
fn run_sync(io: &mut Io, ns: &NamespaceRef) -> Result<(), BlockError> {
    match io {
        Io::Read { offset, buf, .. } => ns.read(*offset, buf),
        Io::Inline {
            offset, capsule, fua, ..
        } => ns.write(*offset, capsule.get(SQE_LEN..).unwrap_or_default(), *fua),
        Io::Flush { .. } => ns.flush(),
        Io::Chunk { offset, data, fua, .. } => ns.write(*offset, data, *fua),
        Io::Writeback { offset, data, .. } => ns.write(*offset, data, true),
    }
}

/// A request a blocking thread finished, with its result.
type Finished = (Io, Result<(), BlockError>);

/// Storage requests on the target's blocking threads.
#[derive(Default)]
pub(super) struct Offloaded {
    /// Requests there.
    in_flight: usize,
    /// What they finished, with their results.
    done: Arc<parking_lot::Mutex<Vec<Finished>>>,
    /// Swapped with `done` to take its contents (no allocation).
    finished: Vec<Finished>,
    /// Calls the queue's worker when one finishes.
    pub(super) waker: Option<Waker>,
}

impl Offloaded {
    pub(super) fn idle(&self) -> bool {
        self.in_flight == 0
    }
}
