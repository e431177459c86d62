//! Storage windows (`docs/protocol.md` §9.6): blocks of a namespace the
//! I/O unit exposed under a steering tag, read and written with one-sided
//! RDMA on the queue that opened them, with no command per access.

use std::sync::atomic::{AtomicBool, Ordering};

use messaging::mr::RKey;
use messaging::provider::RemoteAddr;
use nvme::{WindowCommand, WindowDescriptor};

use super::*;

/// A window onto blocks of a namespace, from [`Host::open_window`].
///
/// Reads and writes go straight to the I/O unit's storage memory by RDMA
/// (the I/O unit's command threads take no part); the host's `IoBuf`s are
/// the other end, with no copy. Over shm, with an I/O unit running as this
/// process's user, the I/O unit shares the memory itself and reads and
/// writes are copies this process makes, with no round trip. Offsets are
/// bytes from the window's first block, at any alignment.
///
/// What is promised (`docs/protocol.md` §9.6): a [`Window::read_at`] sees
/// every [`Window::write_at`] that completed before it started, and every
/// command's write that completed before it started. Written data is
/// durable once [`Window::commit`] returned. A window write and a
/// command to the same blocks at the same time leave either's bytes.
///
/// The window is closed by [`Window::close`], or when dropped (one round
/// trip to the I/O unit). The I/O unit revokes it when its queue's
/// connection ends (a reconnect included), when its namespace is detached
/// or changes, and when the namespace is masked: calls then fail with
/// [`HostError::WindowClosed`], and a window is opened anew. A window
/// copied to over shared memory learns of a revocation at its next
/// commit or close (until then its copies go on).
pub struct Window {
    host: Host,
    queue: Arc<Queue>,
    /// Drives the channel for a thread blocked on a transfer.
    driver: Arc<Driver>,
    /// Over shm: the I/O unit's memory the window lies in, mapped here,
    /// and the window's offset in it. Reads and writes are then copies.
    mapped: Option<(messaging::provider::PeerMemory, u64)>,
    nsid: Nsid,
    slba: u64,
    block_size: u32,
    desc: WindowDescriptor,
    open: AtomicBool,
}

impl Host {
    /// Opens a window onto `blocks` blocks of namespace `nsid` from `slba`,
    /// read-only or writable.
    ///
    /// # Errors
    /// [`HostError::InvalidArgument`] for 0 blocks; [`HostError::Nvme`]
    /// with the I/O unit's refusal: LBA Out of Range, Invalid Namespace,
    /// Namespace Cannot Be Windowed (a thin clone), Window Limit Exceeded,
    /// and for a file window that is a cached extent (over verbs), Window
    /// Cache Limit Exceeded (over 64 MiB) and Window Overlaps A Cached
    /// Window; see [`HostError`] for the rest.
    pub fn open_window(&self, nsid: Nsid, slba: u64, blocks: u32, writable: bool) -> Result<Window, HostError> {
        exec::block_on(self.open_window_async(nsid, slba, blocks, writable))
    }

    /// Async form of [`Host::open_window`].
    ///
    /// # Errors
    /// As [`Host::open_window`].
    pub async fn open_window_async(
        &self,
        nsid: Nsid,
        slba: u64,
        blocks: u32,
        writable: bool,
    ) -> Result<Window, HostError> {
        let inner = &self.handle.inner;
        if blocks == 0 {
            return Err(HostError::InvalidArgument("a window of 0 blocks".into()));
        }
        let ns = inner.namespace_info(nsid, "Window Open").await?;
        let op = Op::window(
            nsid,
            WindowCommand::Open {
                slba,
                blocks,
                write: writable,
            },
        )?;
        let deadline = Instant::now() + inner.opts.command_timeout;
        let session = inner.session(deadline).await?;
        let queue = session.pick(&inner.next_queue).clone();
        let reply = inner.run_once(&queue, &op, deadline).await?;
        let desc = WindowDescriptor::decode(reply_data(&reply))?;
        let mapped = match desc.shared {
            Some(shared) => match queue.endpoint().peer_memory(shared.token) {
                Ok(Some(memory)) => Some((memory, shared.offset)),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!("a window's shared memory cannot be mapped, using RDMA: {e}");
                    None
                }
            },
            None => None,
        };
        let driver = Arc::new(Driver {
            ep: queue.endpoint().clone(),
        });
        let window = Window {
            host: self.clone(),
            queue,
            driver,
            mapped,
            nsid,
            slba,
            block_size: ns.block_size,
            desc,
            open: AtomicBool::new(true),
        };
        let want = u64::from(blocks) * u64::from(ns.block_size);
        if let Some((memory, offset)) = &window.mapped {
            if offset.checked_add(want).is_none_or(|end| end > memory.len() as u64) {
                return Err(HostError::Protocol(format!(
                    "a window of {want} bytes at {offset} of shared memory of {} bytes",
                    memory.len()
                )));
            }
        }
        if desc.len != want || desc.write != writable {
            return Err(HostError::Protocol(format!(
                "Window Open of {want} bytes (writable: {writable}) answered with {} bytes (writable: {})",
                desc.len, desc.write
            )));
        }
        Ok(window)
    }
}

impl Window {
    /// The window's length in bytes.
    pub fn len(&self) -> u64 {
        self.desc.len
    }

    /// Whether the window is empty (never: a window has at least a block).
    pub fn is_empty(&self) -> bool {
        self.desc.len == 0
    }

    /// Whether the host may write through the window.
    pub fn writable(&self) -> bool {
        self.desc.write
    }

    /// The namespace and first block the window starts at.
    pub fn start(&self) -> (Nsid, u64) {
        (self.nsid, self.slba)
    }

    /// Whether reads and writes are copies this process makes into memory
    /// the I/O unit shared with it (over shm, same user), not RDMA.
    pub fn shared_memory(&self) -> bool {
        self.mapped.is_some()
    }

    /// The steering tag (remote key) and address the I/O unit gave it.
    pub fn stag(&self) -> (u32, u64) {
        (self.desc.stag, self.desc.addr)
    }

    /// Reads `buf.len()` bytes at byte `offset` of the window into `buf`.
    ///
    /// # Errors
    /// [`HostError::InvalidArgument`] for a range outside the window;
    /// [`HostError::WindowClosed`] when the window or its connection is gone.
    pub fn read_at(&self, offset: u64, buf: &mut IoBuf) -> Result<(), HostError> {
        exec::block_on(self.read_at_async(offset, buf))
    }

    /// Async form of [`Window::read_at`].
    ///
    /// # Errors
    /// As [`Window::read_at`].
    pub async fn read_at_async(&self, offset: u64, buf: &mut IoBuf) -> Result<(), HostError> {
        let remote = self.remote(offset, buf.len(), false)?;
        if let Some((memory, base)) = &self.mapped {
            return match memory.read(base + offset, buf) {
                true => Ok(()),
                false => Err(HostError::Protocol("a window outside its shared memory".into())),
            };
        }
        self.rdma_read(remote, buf).await
    }

    /// An RDMA Read of `buf.len()` bytes at `remote` into `buf`.
    async fn rdma_read(&self, remote: RemoteAddr, buf: &mut IoBuf) -> Result<(), HostError> {
        // `lent` gives the IoBuf fresh memory if this future is dropped
        // mid-read: the Read may still land in the lent memory.
        let (raw, lent) = buf.lend()?;
        let ep = self.queue.endpoint();
        let read = self.helped(async {
            let ticket = ep.read_remote_async(remote, raw).await?;
            ticket.buf_completion().await
        });
        let raw = read.await.map_err(|e| self.gone(e))?;
        lent.restore(raw)
    }

    /// Writes `buf` at byte `offset` of the window. The data is in the
    /// I/O unit's memory when this returns, durable after [`Window::commit`].
    ///
    /// # Errors
    /// As [`Window::read_at`]; [`HostError::InvalidArgument`] for a
    /// read-only window.
    pub fn write_at(&self, offset: u64, buf: &mut IoBuf) -> Result<(), HostError> {
        exec::block_on(self.write_at_async(offset, buf))
    }

    /// Async form of [`Window::write_at`].
    ///
    /// # Errors
    /// As [`Window::write_at`].
    pub async fn write_at_async(&self, offset: u64, buf: &mut IoBuf) -> Result<(), HostError> {
        let remote = self.remote(offset, buf.len(), true)?;
        if let Some((memory, base)) = &self.mapped {
            return match memory.write(base + offset, buf) {
                true => Ok(()),
                false => Err(HostError::Protocol("a window outside its shared memory".into())),
            };
        }
        self.rdma_write(remote, buf).await
    }

    /// An RDMA Write of `buf` at `remote`.
    async fn rdma_write(&self, remote: RemoteAddr, buf: &mut IoBuf) -> Result<(), HostError> {
        let (raw, lent) = buf.lend_out()?;
        let ep = self.queue.endpoint();
        let sent = self
            .helped(async {
                let ticket = ep.write_remote_async(remote, raw).await?;
                ticket.buf_completion().await.map(drop)
            })
            .await;
        lent.reclaim()?;
        sent.map_err(|e| self.gone(e))
    }

    /// Makes everything written through the window durable; it returns
    /// once the I/O unit's storage holds it (`docs/protocol.md` §9.6).
    ///
    /// # Errors
    /// [`HostError::WindowClosed`], or the I/O unit's status.
    pub fn commit(&self) -> Result<(), HostError> {
        exec::block_on(self.commit_async())
    }

    /// Async form of [`Window::commit`].
    ///
    /// # Errors
    /// As [`Window::commit`].
    pub async fn commit_async(&self) -> Result<(), HostError> {
        self.command(WindowCommand::Commit {
            id: self.desc.id,
            slba: 0,
            blocks: 0,
        })
        .await
    }

    /// Makes `blocks` blocks from byte `offset` of the window (a multiple
    /// of the block size) durable.
    ///
    /// # Errors
    /// As [`Window::commit`]; [`HostError::InvalidArgument`] for a range
    /// that is not whole blocks inside the window.
    pub async fn commit_range_async(&self, offset: u64, blocks: u32) -> Result<(), HostError> {
        let bs = u64::from(self.block_size);
        let len = u64::from(blocks) * bs;
        if blocks == 0 || offset % bs != 0 || offset.checked_add(len).is_none_or(|end| end > self.desc.len) {
            return Err(HostError::InvalidArgument(format!(
                "a commit of {blocks} blocks at byte {offset} of a {}-byte window",
                self.desc.len
            )));
        }
        self.command(WindowCommand::Commit {
            id: self.desc.id,
            slba: self.slba + offset / bs,
            blocks,
        })
        .await
    }

    /// Closes the window: its key is revoked at the I/O unit.
    ///
    /// # Errors
    /// [`HostError::WindowClosed`] when it was revoked already.
    pub fn close(self) -> Result<(), HostError> {
        exec::block_on(self.close_async())
    }

    /// Async form of [`Window::close`].
    ///
    /// # Errors
    /// As [`Window::close`].
    pub async fn close_async(self) -> Result<(), HostError> {
        self.close_inner().await
    }

    async fn close_inner(&self) -> Result<(), HostError> {
        if !self.open.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let id = self.desc.id;
        self.command_anyway(WindowCommand::Close { id }).await
    }

    /// A one-sided transfer of `buf` at any address under any key on the
    /// window's connection, without this side's checks: what a hostile
    /// host could send, for tests of the I/O unit's (a refused one closes
    /// the connection and fails with [`HostError::WindowClosed`]).
    #[doc(hidden)]
    pub fn transfer_unchecked(&self, addr: u64, stag: u32, buf: &mut IoBuf, write: bool) -> Result<(), HostError> {
        let remote = RemoteAddr { addr, rkey: RKey(stag) };
        exec::block_on(async {
            match write {
                true => self.rdma_write(remote, buf).await,
                false => self.rdma_read(remote, buf).await,
            }
        })
    }

    /// Runs `fut`, which waits for a transfer on the window's channel: a
    /// thread blocked on it drives the channel meanwhile (its completion
    /// then wakes it at once), as a command's caller reaps its queue.
    async fn helped<F: std::future::Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let driver = Arc::downgrade(&self.driver);
        std::future::poll_fn(|cx| {
            let r = fut.as_mut().poll(cx);
            if r.is_pending() {
                exec::offer_help(&driver);
            }
            r
        })
        .await
    }

    /// Where `len` bytes at `offset` are on the I/O unit.
    fn remote(&self, offset: u64, len: usize, write: bool) -> Result<RemoteAddr, HostError> {
        if !self.open.load(Ordering::Acquire) {
            return Err(HostError::WindowClosed("closed by this host".into()));
        }
        // A copy through shared memory would not notice by itself that the
        // window went with its connection (an RDMA transfer fails then); an
        // atomic load, not the channel's lock, on this path.
        if self.mapped.is_some() && self.queue.endpoint().is_failed() {
            self.open.store(false, Ordering::Release);
            return Err(HostError::WindowClosed("its connection closed".into()));
        }
        if write && !self.desc.write {
            return Err(HostError::InvalidArgument("a write through a read-only window".into()));
        }
        let inside = len > 0 && offset.checked_add(len as u64).is_some_and(|end| end <= self.desc.len);
        if !inside {
            return Err(HostError::InvalidArgument(format!(
                "{len} bytes at byte {offset} of a {}-byte window",
                self.desc.len
            )));
        }
        Ok(RemoteAddr {
            addr: self.desc.addr + offset,
            rkey: RKey(self.desc.stag),
        })
    }

    /// A one-sided transfer failed: its connection is gone, and the window
    /// with it (a refused key closes the connection too).
    fn gone(&self, e: messaging::Error) -> HostError {
        self.open.store(false, Ordering::Release);
        self.host
            .handle
            .inner
            .report_lost(self.queue.generation, "a window's transfer failed");
        HostError::WindowClosed(format!("its connection failed: {e}"))
    }

    async fn command(&self, cmd: WindowCommand) -> Result<(), HostError> {
        if !self.open.load(Ordering::Acquire) {
            return Err(HostError::WindowClosed("closed by this host".into()));
        }
        self.command_anyway(cmd).await
    }

    async fn command_anyway(&self, cmd: WindowCommand) -> Result<(), HostError> {
        let inner = &self.host.handle.inner;
        let op = Op::window(self.nsid, cmd)?;
        let deadline = Instant::now() + inner.opts.command_timeout;
        match inner.run_once(&self.queue, &op, deadline).await {
            Err(HostError::Nvme { status, .. }) if status.same_code(nvme::window::status::UNKNOWN_WINDOW) => {
                self.open.store(false, Ordering::Release);
                Err(HostError::WindowClosed("revoked by the I/O unit".into()))
            }
            r => r.map(drop),
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if self.open.load(Ordering::Acquire) {
            if let Err(e) = exec::block_on(self.close_inner()) {
                tracing::debug!("closing a dropped window: {e}");
            }
        }
    }
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Window")
            .field("nsid", &self.nsid.0)
            .field("slba", &self.slba)
            .field("len", &self.desc.len)
            .field("writable", &self.desc.write)
            .field("id", &self.desc.id)
            .finish()
    }
}

/// A window's channel, driven by a thread blocked on one of its transfers
/// ([`exec::offer_help`]): one-sided completions arrive by the channel's
/// progress, not as deliveries a queue's reaper waits for.
struct Driver {
    ep: messaging::Endpoint,
}

/// How long one round of driving waits for the channel to move.
const DRIVE_SLICE: Duration = Duration::from_millis(1);

impl exec::Helper for Driver {
    fn help(&self, woken: &std::sync::atomic::AtomicBool) {
        while !woken.load(Ordering::Acquire) {
            if let Err(messaging::Error::Closed(_)) = self.ep.wait_progress(DRIVE_SLICE) {
                // The transfer fails with the channel: re-polled, it ends.
                return;
            }
        }
    }

    fn corked(&self, f: &mut dyn FnMut()) {
        let _cork = self.ep.cork();
        f();
    }
}

#[cfg(test)]
mod tests;

impl Inner {
    /// Runs a command on `queue` once: a window lives on one queue's
    /// connection, so a command lost with it is not re-issued elsewhere.
    pub(super) async fn run_once(&self, queue: &Queue, op: &Op<'_>, deadline: Instant) -> Result<Reply, HostError> {
        match queue.execute(op, None, &self.cache, Some(deadline), &self.timer).await {
            Ok(reply) => check_reply(op, reply),
            Err(ExecError::Lost) => {
                self.report_lost(queue.generation, "a queue's channel closed");
                Err(HostError::WindowClosed(format!(
                    "its connection closed during {}",
                    op.name
                )))
            }
            Err(ExecError::Timeout { in_flight }) => {
                if in_flight {
                    self.report_lost(
                        queue.generation,
                        &format!("{} timed out on queue {}", op.name, queue.qid),
                    );
                }
                Err(HostError::Timeout {
                    command: op.name,
                    after: self.opts.command_timeout,
                })
            }
            Err(ExecError::Host(e)) => Err(e),
        }
    }
}
