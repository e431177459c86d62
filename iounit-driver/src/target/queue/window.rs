//! The storage window commands of an I/O queue (`super::super::windows`,
//! `docs/protocol.md` §9.6): Open registers blocks of the namespace's
//! memory in this queue's channel domain and answers with the window's
//! descriptor; Close revokes it; Commit makes written blocks durable.
//! A window is reached only through the channel it was opened on.

use super::admin::copy_out;
use super::*;
use crate::nvme::window::status as window_status;
use crate::nvme::WindowCommand;
use crate::target::windows::{OpenRequest, Refused, WindowCache, MAX_CACHED_WINDOW};

impl Queue {
    pub(super) fn window(&mut self, sqe: &Sqe, cmd: Result<WindowCommand, NvmeError>) -> Result<Outcome, QueueError> {
        let cmd = match cmd {
            Ok(cmd) => cmd,
            Err(e) => {
                tracing::debug!(peer = %self.peer, "window command refused: {e}");
                return Ok(Outcome::status(Status::INVALID_FIELD.with_dnr()));
            }
        };
        match cmd {
            WindowCommand::Open { slba, blocks, write } => self.open_window(sqe, slba, blocks, write),
            WindowCommand::Close { id } => Ok(Outcome::status(match self.shared.windows.close(self.serial, id) {
                true => Status::SUCCESS,
                false => window_status::UNKNOWN_WINDOW.with_dnr(),
            })),
            WindowCommand::Commit { id, slba, blocks } => Ok(self.commit_window(id, slba, blocks)),
        }
    }

    fn open_window(&mut self, sqe: &Sqe, slba: u64, blocks: u32, write: bool) -> Result<Outcome, QueueError> {
        let nsid = sqe.nsid.0;
        // A namespace masked from this host is, to it, one that does not exist.
        if !self.visible(nsid) {
            return Ok(Outcome::status(Status::INVALID_NAMESPACE.with_dnr()));
        }
        let Some(ns) = self.shared.registry.get_cached(&mut self.namespaces, nsid) else {
            return Ok(Outcome::status(Status::INVALID_NAMESPACE.with_dnr()));
        };
        let geo = ns.geometry();
        let in_range = slba.checked_add(u64::from(blocks)).is_some_and(|end| end <= geo.blocks);
        if blocks == 0 || !in_range {
            return Ok(Outcome::status(Status::LBA_OUT_OF_RANGE.with_dnr()));
        }
        let bs = u64::from(geo.block_size);
        let offset = slba * bs;
        let len = u64::from(blocks) * bs;
        let files = ns.files().is_some();
        let in_place = match ns.window_memory() {
            Some(m) if m.len() as u64 >= geo.bytes() => Some(m),
            _ => None,
        };
        // A file's window is its mapping, registered in place, where the
        // software responder writes it through the page tables (so that the
        // page cache knows what is dirty): tcp. It is a cached extent over
        // a device (a NIC writes pinned pages behind the page cache's back,
        // and newer kernels refuse such pins), over shm (a sealed memfd can
        // be shared with the host's process, a file cannot), and where the
        // target caches file windows.
        let device = self.ep.domain().registrar().is_some();
        let cache = device || self.ep.fabric() == "shm" || self.shared.cfg.window_file_cache;
        let direct = match in_place {
            Some(memory) if !(files && cache) => {
                let opened = self.shared.windows.open(OpenRequest {
                    hostnqn: &self.ctrl.hostnqn,
                    queue: self.serial,
                    domain: self.ep.domain(),
                    nsid,
                    memory: memory.clone(),
                    memory_offset: offset,
                    offset,
                    len,
                    write,
                    cache: None,
                });
                match opened {
                    Ok(desc) => Some((desc, memory)),
                    Err(Refused::Status(status)) => return Ok(Outcome::status(status)),
                    Err(Refused::Device) if files => None,
                    Err(Refused::Device) => return Ok(Outcome::status(window_status::NOT_WINDOWABLE.with_dnr())),
                }
            }
            Some(_) | None if files => None,
            _ => return Ok(Outcome::status(window_status::NOT_WINDOWABLE.with_dnr())),
        };
        let (mut desc, memory, memory_offset) = match direct {
            Some((desc, memory)) => (desc, memory, offset),
            None => match self.open_cached(&ns, nsid, offset, len, write) {
                Ok((desc, cache)) => (desc, cache as Arc<dyn messaging::mr::ExternalMemory>, 0),
                Err(status) => return Ok(Outcome::status(status)),
            },
        };
        // Over shm, to a host of the daemon's own user, the memory itself
        // (once per channel): the host then copies to and from it without a
        // round trip. Elsewhere RDMA.
        desc.shared = match self.ep.share_memory(&*memory) {
            Ok(Some(token)) => Some(crate::nvme::SharedWindow {
                token,
                offset: memory_offset,
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(peer = %self.peer, "cannot share a window's memory, RDMA only: {e}");
                None
            }
        };
        let data = desc.encode();
        let answered = self.push_to_host(sqe, data.len(), |dest| copy_out(&data, dest));
        // A window whose descriptor never reached the host is closed again.
        match &answered {
            Ok(Outcome::Done(status, _)) if !status.is_success() => {
                self.shared.windows.close(self.serial, desc.id);
            }
            Err(_) => {
                self.shared.windows.close(self.serial, desc.id);
            }
            _ => {}
        }
        answered
    }

    /// A cached extent over `len` bytes at `offset` of a file namespace:
    /// registered (so that commands keep it current) before it is filled
    /// from the file, here on the worker (it is at most
    /// `MAX_CACHED_WINDOW` bytes).
    fn open_cached(
        &mut self,
        ns: &NamespaceRef,
        nsid: u32,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<(crate::nvme::WindowDescriptor, Arc<WindowCache>), Status> {
        if len > MAX_CACHED_WINDOW {
            return Err(window_status::CACHE_LIMIT.with_dnr());
        }
        if self.shared.windows.cached_overlap(nsid, offset, len) {
            return Err(window_status::OVERLAPS.with_dnr());
        }
        let cache = WindowCache::new(len as usize).map(Arc::new).map_err(|e| {
            tracing::warn!(peer = %self.peer, "no memory for a window's cache of {len} bytes: {e}");
            Status::INTERNAL_ERROR
        })?;
        let desc = self
            .shared
            .windows
            .open(OpenRequest {
                hostnqn: &self.ctrl.hostnqn,
                queue: self.serial,
                domain: self.ep.domain(),
                nsid,
                memory: cache.clone(),
                memory_offset: 0,
                offset,
                len,
                write,
                cache: Some(cache.clone()),
            })
            .map_err(|r| match r {
                Refused::Status(s) => s,
                Refused::Device => window_status::NOT_WINDOWABLE.with_dnr(),
            })?;
        if let Err(e) = cache.fill(|bytes| ns.read(offset, bytes)) {
            self.shared.windows.close(self.serial, desc.id);
            return Err(block_status(&e));
        }
        tracing::info!(peer = %self.peer, nsid, offset, len, "window as a cached extent");
        Ok((desc, cache))
    }

    /// Commit: the blocks (all of the window's when `blocks` is 0) must
    /// lie in the window. They reached memory before the command did (the
    /// host's RDMA Writes go first on the same channel, and RC executes in
    /// order); the backend makes them durable: a RAM namespace at once, a
    /// file's with an `fdatasync` on the queue's ring (the window's pages
    /// are the file's page cache, dirty since the writes), as a Flush.
    fn commit_window(&mut self, id: u32, slba: u64, blocks: u32) -> Outcome {
        let status = |s: Status| Outcome::status(s);
        let Some(window) = self.shared.windows.placement(self.serial, id) else {
            return status(window_status::UNKNOWN_WINDOW.with_dnr());
        };
        let Some(ns) = self.shared.registry.get_cached(&mut self.namespaces, window.nsid) else {
            return status(Status::INVALID_NAMESPACE.with_dnr());
        };
        let bs = u64::from(ns.geometry().block_size);
        let (offset, len) = match blocks {
            0 => (window.offset, window.len),
            n => match slba.checked_mul(bs) {
                Some(offset) => (offset, u64::from(n) * bs),
                None => return status(Status::LBA_OUT_OF_RANGE.with_dnr()),
            },
        };
        let inside = offset >= window.offset
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= window.offset + window.len);
        if !inside {
            return status(Status::LBA_OUT_OF_RANGE.with_dnr());
        }
        if let Some(cache) = &window.cache {
            // A cached extent: a copy of its bytes goes to the file, durably
            // (FUA), on the queue's ring (the copy is what the request owns
            // while the kernel writes it; window writes after it are the
            // next Commit's).
            let data = cache.copy_out((offset - window.offset) as usize, len as usize);
            return Outcome::Start(Start::Writeback { ns, offset, data });
        }
        if io::deferred(&ns) {
            return Outcome::Start(Start::Flush { ns });
        }
        status(match ns.commit(offset, len) {
            Ok(()) => Status::SUCCESS,
            Err(e) => block_status(&e),
        })
    }
}
