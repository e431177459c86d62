//! I/O commands: Read, Write (in the capsule, or pushed by the host after
//! it), Flush, Write Zeroes and Dataset Management, checked against the
//! namespace and executed as far as they can be at once; and the chunks
//! of pushed write data, each taken to storage as it lands.

use super::*;
use crate::target::windows::Windows;

/// A write waiting for its pushed data.
pub(super) struct PendingWrite {
    cid: CommandId,
    /// `None` for a write refused before storage was touched: its pushed
    /// data is still taken in (and dropped) so the channel stays in step.
    pub(super) ns: Option<NamespaceRef>,
    offset: u64,
    len: u64,
    received: u64,
    /// Chunks on the ring: the write completes when all its data came
    /// and none is left there.
    pub(super) outstanding: u32,
    fua: bool,
    pub(super) status: Status,
}

impl Queue {
    pub(super) fn io(&mut self, sqe: &Sqe, inline: &[u8]) -> Result<Outcome, QueueError> {
        let outcome = self.io_checked(sqe, inline)?;
        // A write whose data the host pushes after the capsule, refused
        // before storage was touched: take the pushes in, then complete.
        if let (Ok(Sgl::TransportDataBlock { len }), Outcome::Done(status, _)) = (sqe.sgl(), &outcome) {
            if sqe.opcode == IoOpcode::Write as u8 && !status.is_success() && len > 0 {
                return Ok(Outcome::AwaitData(PendingWrite {
                    cid: sqe.command_id,
                    ns: None,
                    offset: 0,
                    len: u64::from(len),
                    received: 0,
                    outstanding: 0,
                    fua: false,
                    status: *status,
                }));
            }
        }
        Ok(outcome)
    }

    fn io_checked(&mut self, sqe: &Sqe, inline: &[u8]) -> Result<Outcome, QueueError> {
        if let Some(cmd) = crate::nvme::WindowCommand::decode(sqe) {
            return self.window(sqe, cmd);
        }
        let Some(op) = IoOpcode::from_u8(sqe.opcode) else {
            return Ok(Outcome::status(Status::INVALID_OPCODE.with_dnr()));
        };
        if op == IoOpcode::Flush && sqe.nsid == Nsid::BROADCAST {
            return Ok(self.flush_all());
        }
        // A namespace masked from this host is, to it, one that does not exist.
        if !self.visible(sqe.nsid.0) {
            return Ok(Outcome::status(Status::INVALID_NAMESPACE.with_dnr()));
        }
        let Some(ns) = self.shared.registry.get_cached(&mut self.namespaces, sqe.nsid.0) else {
            return Ok(Outcome::status(Status::INVALID_NAMESPACE.with_dnr()));
        };
        if matches!(op, IoOpcode::Read | IoOpcode::Write) {
            if let Ok((_, len)) = transfer_range(sqe, &ns) {
                self.shared.stats.count_io(op == IoOpcode::Write, len);
            }
        }
        Ok(match op {
            IoOpcode::Read => return self.read(sqe, ns),
            IoOpcode::Write => write(sqe, inline, ns, &self.shared.windows),
            IoOpcode::Flush if deferred(&ns) => Outcome::Start(Start::Flush { ns }),
            IoOpcode::Flush => Outcome::status(ns.flush().map_or_else(|e| block_status(&e), |()| Status::SUCCESS)),
            IoOpcode::WriteZeroes => write_zeroes(sqe, &ns, &self.shared.windows),
            IoOpcode::DatasetManagement => dataset_management(sqe, inline, &ns, &self.shared.windows),
        })
    }

    /// Flush of every namespace this host sees.
    fn flush_all(&self) -> Outcome {
        for nsid in self.shared.visible_nsids(&self.ctrl.hostnqn) {
            if let Some(ns) = self.shared.registry.get(nsid) {
                if let Err(e) = ns.flush() {
                    return Outcome::status(block_status(&e));
                }
            }
        }
        Outcome::status(Status::SUCCESS)
    }

    fn read(&mut self, sqe: &Sqe, ns: NamespaceRef) -> Result<Outcome, QueueError> {
        let (offset, len) = match transfer_range(sqe, &ns) {
            Ok(r) => r,
            Err(s) => return Ok(Outcome::status(s)),
        };
        if sqe.sgl().map(|s| u64::from(s.len()) < len).unwrap_or(false) {
            return Ok(Outcome::status(Status::SGL_INVALID_DATA_LENGTH.with_dnr()));
        }
        if deferred(&ns) {
            return Ok(Outcome::Start(Start::Read {
                ns,
                offset,
                len: len as usize,
            }));
        }
        // Checked above: the host's buffer takes all `len` bytes.
        self.push_to_host(sqe, len as usize, |dest| {
            ns.read(offset, dest).map_err(|e| block_status(&e))
        })
    }

    /// A chunk of pushed write data: it belongs to the oldest write waiting.
    pub(super) fn pushed(&mut self, d: messaging::Delivery) -> Result<State, QueueError> {
        let Some(&key) = self.awaiting.front() else {
            return Err(QueueError::PushWithoutWrite);
        };
        let w = &mut self.writes[key];
        let len = d.len() as u64;
        if w.received + len > w.len {
            return Err(QueueError::PushBeyondWrite {
                got: w.received + len,
                len: w.len,
            });
        }
        let at = w.offset + w.received;
        w.received += len;
        let (fua, all_in) = (w.fua, w.received == w.len);
        if all_in {
            self.awaiting.pop_front();
        }
        match (w.status.is_success(), &w.ns) {
            (true, Some(ns)) if deferred(ns) => {
                w.outstanding += 1;
                return Ok(State::Storage(Io::Chunk {
                    write: key,
                    offset: at,
                    data: d,
                    fua,
                }));
            }
            (true, Some(ns)) => {
                if let Err(e) = ns.write(at, &d, fua) {
                    w.status = block_status(&e);
                }
            }
            _ => {}
        }
        Ok(self.finish_write(key))
    }

    /// Completes write `key` once all its data came and none of it is left
    /// on the ring.
    pub(super) fn finish_write(&mut self, key: usize) -> State {
        let done = self
            .writes
            .get(key)
            .is_some_and(|w| w.received == w.len && w.outstanding == 0);
        if !done {
            return State::Settled;
        }
        let w = self.writes.remove(key);
        let (cid, status) = (w.cid, w.status);
        // The namespace goes before the completion: a host that saw the
        // write complete may detach it at once.
        drop(w);
        State::complete(cid, status)
    }
}

/// Whether `ns`'s requests leave the worker: on the queue's io_uring
/// (files) or on a blocking thread (a backend that may wait).
pub(super) fn deferred(ns: &NamespaceRef) -> bool {
    ns.files().is_some() || ns.may_block()
}

/// The byte range a Read or Write addresses, checked against the namespace
/// and the largest transfer.
fn transfer_range(sqe: &Sqe, ns: &NamespaceRef) -> Result<(u64, u64), Status> {
    let (offset, len) = block_range(sqe, ns)?;
    if len > transport::MAX_TRANSFER as u64 {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    Ok((offset, len))
}

/// The byte range of the blocks a command addresses.
fn block_range(sqe: &Sqe, ns: &NamespaceRef) -> Result<(u64, u64), Status> {
    let geo = ns.geometry();
    let bs = u64::from(geo.block_size);
    let blocks = u64::from(sqe.block_count());
    let end = sqe
        .slba()
        .checked_add(blocks)
        .ok_or(Status::LBA_OUT_OF_RANGE.with_dnr())?;
    if end > geo.blocks {
        return Err(Status::LBA_OUT_OF_RANGE.with_dnr());
    }
    Ok((sqe.slba() * bs, blocks * bs))
}

fn write(sqe: &Sqe, inline: &[u8], ns: NamespaceRef, windows: &Windows) -> Outcome {
    let (offset, len) = match transfer_range(sqe, &ns) {
        Ok(r) => r,
        Err(s) => return Outcome::status(s),
    };
    match sqe.sgl() {
        Ok(Sgl::DataBlockOffset { offset: 0, len: l }) if u64::from(l) == len && inline.len() as u64 == len => {
            // In-capsule data sits 64 bytes into its buffer, never aligned
            // for O_DIRECT: for files it goes through the page cache, a copy
            // made here at once; only a FUA write (which waits for the
            // device) goes on the ring. A backend that may wait gets it on a
            // blocking thread.
            let waits = match ns.files() {
                Some(_) => sqe.fua(),
                None => ns.may_block(),
            };
            if waits {
                return Outcome::Start(Start::InlineWrite {
                    ns,
                    offset,
                    fua: sqe.fua(),
                });
            }
            Outcome::status(match ns.write(offset, inline, sqe.fua()) {
                Ok(()) => {
                    // Cached extents over these blocks take it too.
                    windows.absorb(ns.nsid(), offset, inline);
                    Status::SUCCESS
                }
                Err(e) => block_status(&e),
            })
        }
        Ok(Sgl::DataBlockOffset { .. }) => Outcome::status(Status::SGL_INVALID_DATA_LENGTH.with_dnr()),
        Ok(Sgl::TransportDataBlock { len: l }) if u64::from(l) == len => Outcome::AwaitData(PendingWrite {
            cid: sqe.command_id,
            ns: Some(ns),
            offset,
            len,
            received: 0,
            outstanding: 0,
            fua: sqe.fua(),
            status: Status::SUCCESS,
        }),
        // The host still pushes the data it announced: `io` sinks it and
        // completes with this status then.
        Ok(Sgl::TransportDataBlock { .. }) => Outcome::status(Status::SGL_INVALID_DATA_LENGTH.with_dnr()),
        // chanio never pulls: keyed descriptors are not accepted for writes.
        Ok(_) => Outcome::status(Status::SGL_INVALID_DESCRIPTOR_TYPE.with_dnr()),
        Err(e) => Outcome::status(e.status()),
    }
}

/// Write Zeroes; cached extents over the blocks are zeroed too.
fn write_zeroes(sqe: &Sqe, ns: &NamespaceRef, windows: &Windows) -> Outcome {
    let (offset, len) = match block_range(sqe, ns) {
        Ok(r) => r,
        Err(s) => return Outcome::status(s),
    };
    let r = if sqe.write_zeroes_deallocate() {
        ns.discard(offset, len)
    } else {
        ns.write_zeroes(offset, len)
    };
    if r.is_ok() {
        windows.zero(ns.nsid(), offset, len);
    }
    Outcome::status(r.map_or_else(|e| block_status(&e), |()| Status::SUCCESS))
}

/// Dataset Management (deallocate); cached extents over the ranges are
/// zeroed too, as the blocks read after a deallocate.
fn dataset_management(sqe: &Sqe, inline: &[u8], ns: &NamespaceRef, windows: &Windows) -> Outcome {
    let geo = ns.geometry();
    let bs = u64::from(geo.block_size);
    let ranges = match DsmRange::decode_list(inline, sqe.dsm_range_count()) {
        Ok(r) => r,
        Err(e) => return Outcome::status(e.status()),
    };
    for r in &ranges {
        let end = r.slba.checked_add(u64::from(r.block_count));
        if end.is_none_or(|e| e > geo.blocks) {
            return Outcome::status(Status::LBA_OUT_OF_RANGE.with_dnr());
        }
    }
    if sqe.dsm_deallocate() {
        for r in &ranges {
            if let Err(e) = ns.discard(r.slba * bs, u64::from(r.block_count) * bs) {
                return Outcome::status(block_status(&e));
            }
            windows.zero(ns.nsid(), r.slba * bs, u64::from(r.block_count) * bs);
        }
    }
    Outcome::status(Status::SUCCESS)
}

/// Where a read's data goes: the command's keyed descriptor and transfer
/// tag.
pub(super) fn host_target(sqe: &Sqe) -> Result<DirectTarget, Status> {
    let (addr, len, key) = match sqe.sgl() {
        Ok(Sgl::KeyedDataBlock { addr, len, key }) | Ok(Sgl::KeyedDataBlockInvalidate { addr, len, key }) => {
            (addr, len, key)
        }
        Ok(_) => return Err(Status::SGL_INVALID_DESCRIPTOR_TYPE.with_dnr()),
        Err(e) => return Err(e.status()),
    };
    Ok(DirectTarget {
        tag: transport::transfer_tag(sqe),
        remote: RemoteBuf {
            addr,
            len,
            rkey: RKey(key),
        },
    })
}

/// The NVMe status for a block-layer error. A backing store that is full
/// reports Capacity Exceeded, one that refuses access Access Denied (both
/// with Do Not Retry: the same command fails the same way until an
/// operator acts); the error, with its OS reason, is logged either way.
pub(super) fn block_status(e: &BlockError) -> Status {
    let failed = matches!(e.kind(), ErrorKind::ReadFailed | ErrorKind::WriteFailed);
    if failed {
        tracing::error!("{e}");
    }
    match (e.kind(), e.raw_os_error()) {
        (_, Some(libc::ENOSPC | libc::EDQUOT)) if failed => Status::CAPACITY_EXCEEDED.with_dnr(),
        (_, Some(libc::EACCES | libc::EPERM)) if failed => Status::ACCESS_DENIED.with_dnr(),
        (ErrorKind::OutOfRange, _) => Status::LBA_OUT_OF_RANGE.with_dnr(),
        (ErrorKind::InvalidArgument, _) => Status::INVALID_FIELD.with_dnr(),
        (ErrorKind::ReadFailed, _) => Status::UNRECOVERED_READ_ERROR,
        (ErrorKind::WriteFailed, _) => Status::WRITE_FAULT,
        (ErrorKind::NotReady, _) => Status::NAMESPACE_NOT_READY,
        _ => Status::INTERNAL_ERROR,
    }
}
