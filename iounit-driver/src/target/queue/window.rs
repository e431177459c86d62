//! The storage window commands of an I/O queue (`super::super::windows`,
//! `docs/protocol.md` §9.6): Open registers blocks of the namespace's
//! memory in this queue's channel domain and answers with the window's
//! descriptor; Close revokes it; Commit makes written blocks durable.
//! A window is reached only through the channel it was opened on.

use super::admin::copy_out;
use super::*;
use crate::nvme::window::status as window_status;
use crate::nvme::WindowCommand;
use crate::target::windows::OpenRequest;

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
        let memory = match ns.window_memory() {
            Some(m) if m.len() as u64 >= geo.bytes() => m,
            _ => return Ok(Outcome::status(window_status::NOT_WINDOWABLE.with_dnr())),
        };
        let bs = u64::from(geo.block_size);
        let offset = slba * bs;
        let opened = self.shared.windows.open(OpenRequest {
            hostnqn: &self.ctrl.hostnqn,
            queue: self.serial,
            domain: self.ep.domain(),
            nsid,
            memory: memory.clone(),
            offset,
            len: u64::from(blocks) * bs,
            write,
        });
        let mut desc = match opened {
            Ok(desc) => desc,
            Err(status) => return Ok(Outcome::status(status)),
        };
        // Over shm, to a host of the daemon's own user, the memory itself
        // (once per channel): the host then copies to and from it without
        // a round trip. Elsewhere (or where it cannot be shared) RDMA.
        desc.shared = match self.ep.share_memory(&*memory) {
            Ok(Some(token)) => Some(crate::nvme::SharedWindow { token, offset }),
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
        if io::deferred(&ns) {
            return Outcome::Start(Start::Flush { ns });
        }
        status(match ns.commit(offset, len) {
            Ok(()) => Status::SUCCESS,
            Err(e) => block_status(&e),
        })
    }
}
