//! Building and checking commands: pure functions, no I/O.
//!
//! An [`Op`] is one NVMe command as the host will submit it: its SQE (the
//! command identifier and data pointer are filled in at submission, when
//! the queue and the destination are known), a name for errors, the queue
//! kind and its data. User requests larger than one command allows are split
//! here ([`split_blocks`], [`dsm_commands`]).

use std::borrow::Cow;

use nvme::command::MAX_BLOCKS_PER_COMMAND;
use nvme::transport;
use nvme::{Cns, CommandId, DsmRange, FeatureId, GetLogPage, LogPageId, Nsid, NumberOfQueues, Sqe};

use crate::HostError;

/// Most ranges in one Dataset Management command: they travel in the
/// capsule, 16 bytes each.
pub(crate) const DSM_RANGES_PER_COMMAND: usize = transport::INLINE_DATA_MAX / nvme::command::DSM_RANGE_LEN;

/// Which queue a command goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueKind {
    Admin,
    Io,
}

/// A command's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpData<'a> {
    /// No data.
    None,
    /// Host to I/O unit: in the capsule up to `INLINE_DATA_MAX` bytes,
    /// pushed after it otherwise.
    Out(Cow<'a, [u8]>),
    /// I/O unit to host: this many bytes, pushed into an exposed buffer.
    In(usize),
    /// Host to I/O unit: this many bytes (more than `INLINE_DATA_MAX`),
    /// in the registered buffer lent to the command, pushed from there
    /// without a copy when it fits one push.
    OutLent(usize),
}

/// One command, ready to submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Op<'a> {
    pub(crate) name: &'static str,
    pub(crate) queue: QueueKind,
    pub(crate) sqe: Sqe,
    pub(crate) data: OpData<'a>,
}

impl<'a> Op<'a> {
    fn admin(name: &'static str, sqe: Sqe, data: OpData<'a>) -> Op<'a> {
        Op {
            name,
            queue: QueueKind::Admin,
            sqe,
            data,
        }
    }

    fn io(name: &'static str, sqe: Sqe, data: OpData<'a>) -> Op<'a> {
        Op {
            name,
            queue: QueueKind::Io,
            sqe,
            data,
        }
    }

    /// Read of `blocks` blocks of `block_size` bytes at `slba`.
    pub(crate) fn read(nsid: Nsid, slba: u64, blocks: u32, block_size: u32) -> Result<Op<'static>, HostError> {
        check_io("Read", nsid, slba, u64::from(blocks), block_size)?;
        let len = bytes_of(blocks, block_size)?;
        let sqe = Sqe::read(CID, nsid, slba, blocks)?;
        Ok(Op::io("Read", sqe, OpData::In(len)))
    }

    /// Write of `data` (whole blocks of `block_size` bytes) at `slba`.
    pub(crate) fn write(
        nsid: Nsid,
        slba: u64,
        data: &'a [u8],
        block_size: u32,
        fua: bool,
    ) -> Result<Op<'a>, HostError> {
        let blocks = blocks_in(data.len(), block_size)?;
        check_io("Write", nsid, slba, u64::from(blocks), block_size)?;
        bytes_of(blocks, block_size)?;
        let mut sqe = Sqe::write(CID, nsid, slba, blocks)?;
        sqe.set_fua(fua);
        Ok(Op::io("Write", sqe, OpData::Out(Cow::Borrowed(data))))
    }

    /// Write of `len` bytes held in a registered buffer lent to the command
    /// ([`OpData::OutLent`]).
    pub(crate) fn write_lent(
        nsid: Nsid,
        slba: u64,
        len: usize,
        block_size: u32,
        fua: bool,
    ) -> Result<Op<'static>, HostError> {
        let blocks = blocks_in(len, block_size)?;
        check_io("Write", nsid, slba, u64::from(blocks), block_size)?;
        bytes_of(blocks, block_size)?;
        let mut sqe = Sqe::write(CID, nsid, slba, blocks)?;
        sqe.set_fua(fua);
        Ok(Op::io("Write", sqe, OpData::OutLent(len)))
    }

    /// Flush.
    pub(crate) fn flush(nsid: Nsid) -> Result<Op<'static>, HostError> {
        check_nsid(nsid, true)?;
        Ok(Op::io("Flush", Sqe::flush(CID, nsid), OpData::None))
    }

    /// A storage window command (`nvme::window`) on an I/O queue.
    pub(crate) fn window(nsid: Nsid, cmd: nvme::WindowCommand) -> Result<Op<'static>, HostError> {
        check_nsid(nsid, false)?;
        let sqe = cmd.to_sqe(CID, nsid);
        Ok(match cmd {
            nvme::WindowCommand::Open { .. } => Op::io("Window Open", sqe, OpData::In(nvme::WindowDescriptor::LEN)),
            nvme::WindowCommand::Close { .. } => Op::io("Window Close", sqe, OpData::None),
            nvme::WindowCommand::Commit { .. } => Op::io("Window Commit", sqe, OpData::None),
        })
    }

    /// Write Zeroes of `blocks` blocks at `slba`.
    pub(crate) fn write_zeroes(nsid: Nsid, slba: u64, blocks: u32) -> Result<Op<'static>, HostError> {
        check_nsid(nsid, false)?;
        check_range("Write Zeroes", slba, u64::from(blocks), MAX_BLOCKS_PER_COMMAND.into())?;
        Ok(Op::io(
            "Write Zeroes",
            Sqe::write_zeroes(CID, nsid, slba, blocks)?,
            OpData::None,
        ))
    }

    /// Dataset Management (deallocate) of `ranges`.
    pub(crate) fn deallocate(nsid: Nsid, ranges: &[DsmRange]) -> Result<Op<'static>, HostError> {
        check_nsid(nsid, false)?;
        if ranges.is_empty() || ranges.len() > DSM_RANGES_PER_COMMAND {
            return Err(HostError::InvalidArgument(format!(
                "{} ranges in one Dataset Management command (1..={DSM_RANGES_PER_COMMAND})",
                ranges.len()
            )));
        }
        let count = u16::try_from(ranges.len()).unwrap_or(u16::MAX);
        let sqe = Sqe::dataset_management(CID, nsid, count, true)?;
        Ok(Op::io(
            "Dataset Management",
            sqe,
            OpData::Out(Cow::Owned(DsmRange::encode_list(ranges))),
        ))
    }

    /// Identify `cns` about `nsid` (4096 bytes).
    pub(crate) fn identify(cns: Cns, nsid: Nsid) -> Op<'static> {
        Op::admin(
            "Identify",
            Sqe::identify(CID, cns, nsid),
            OpData::In(nvme::identify::IDENTIFY_LEN),
        )
    }

    /// Get Log Page `lid`, `len` bytes.
    pub(crate) fn get_log_page(lid: LogPageId, len: usize) -> Result<Op<'static>, HostError> {
        let page = GetLogPage::new(lid, len as u64)?;
        Ok(Op::admin(
            "Get Log Page",
            page.to_sqe(CID, Nsid::BROADCAST),
            OpData::In(len),
        ))
    }

    /// Set Features, Number of Queues.
    pub(crate) fn set_number_of_queues(queues: u16) -> Result<Op<'static>, HostError> {
        let q = NumberOfQueues::new(queues, queues)?;
        Ok(Op::admin(
            "Set Features",
            Sqe::set_features(CID, FeatureId::NumberOfQueues, q.to_dword(), false),
            OpData::None,
        ))
    }

    /// Keep Alive.
    pub(crate) fn keep_alive() -> Op<'static> {
        Op::admin("Keep Alive", Sqe::keep_alive(CID), OpData::None)
    }

    /// Asynchronous Event Request.
    pub(crate) fn async_event_request() -> Op<'static> {
        Op::admin(
            "Asynchronous Event Request",
            Sqe::async_event_request(CID),
            OpData::None,
        )
    }

    /// Whether the data is pushed after the capsule rather than carried in it.
    #[cfg(test)]
    pub(crate) fn pushes_data(&self) -> bool {
        matches!(&self.data, OpData::Out(d) if d.len() > transport::INLINE_DATA_MAX)
            || matches!(self.data, OpData::OutLent(_))
    }
}

/// Placeholder identifier: the queue assigns the real one.
const CID: CommandId = CommandId(0);

/// Splits `blocks` blocks from `slba` into commands of at most `max` blocks:
/// `(first LBA, blocks, index of the command's first block)`.
pub(crate) fn split_blocks(slba: u64, blocks: u64, max: u32) -> impl Iterator<Item = (u64, u32, u64)> {
    let max = u64::from(max.max(1));
    (0..blocks.div_ceil(max)).map(move |i| {
        let done = i * max;
        // At most `max`, which came from a u32.
        let n = (blocks - done).min(max) as u32;
        (slba + done, n, done)
    })
}

/// Dataset Management commands deallocating `blocks` blocks from `slba`:
/// ranges of at most `u32::MAX` blocks, at most 256 per command.
pub(crate) fn dsm_commands(slba: u64, blocks: u64) -> Vec<Vec<DsmRange>> {
    let ranges: Vec<DsmRange> = split_blocks(slba, blocks, u32::MAX)
        .map(|(lba, n, _)| DsmRange {
            context_attributes: 0,
            block_count: n,
            slba: lba,
        })
        .collect();
    ranges
        .chunks(DSM_RANGES_PER_COMMAND)
        .map(<[DsmRange]>::to_vec)
        .collect()
}

/// Most blocks one Read or Write may carry: the transfer limit, and NLB's
/// 16 bits.
pub(crate) fn max_blocks(max_transfer: usize, block_size: u32) -> u32 {
    let by_transfer = max_transfer / (block_size.max(1) as usize);
    u32::try_from(by_transfer)
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_BLOCKS_PER_COMMAND)
}

/// Checks a user request of `blocks` blocks at `slba`: non-empty, no LBA
/// overflow.
pub(crate) fn check_range(what: &str, slba: u64, blocks: u64, max: u64) -> Result<(), HostError> {
    if blocks == 0 {
        return Err(HostError::InvalidArgument(format!("{what} of 0 blocks")));
    }
    if blocks > max {
        return Err(HostError::InvalidArgument(format!(
            "{what} of {blocks} blocks exceeds {max} blocks per command"
        )));
    }
    if slba.checked_add(blocks).is_none() {
        return Err(HostError::InvalidArgument(format!(
            "{what} of {blocks} blocks at LBA {slba} overflows the LBA range"
        )));
    }
    Ok(())
}

/// Checks that `nsid` names one namespace (`broadcast_ok`: or all of them).
pub(crate) fn check_nsid(nsid: Nsid, broadcast_ok: bool) -> Result<(), HostError> {
    if nsid.is_valid() || (broadcast_ok && nsid == Nsid::BROADCAST) {
        Ok(())
    } else {
        Err(HostError::InvalidArgument(format!(
            "namespace ID {:#x} does not name a namespace",
            nsid.0
        )))
    }
}

/// Number of whole blocks in `len` bytes.
pub(crate) fn blocks_in(len: usize, block_size: u32) -> Result<u32, HostError> {
    let bs = block_size as usize;
    if bs == 0 {
        return Err(HostError::InvalidArgument("block size 0".into()));
    }
    if len == 0 {
        return Err(HostError::InvalidArgument("no data (0 bytes)".into()));
    }
    if len % bs != 0 {
        return Err(HostError::InvalidArgument(format!(
            "{len} bytes is not a whole number of {bs}-byte blocks"
        )));
    }
    u32::try_from(len / bs).map_err(|_| HostError::InvalidArgument(format!("{len} bytes is too many blocks")))
}

fn check_io(what: &str, nsid: Nsid, slba: u64, blocks: u64, block_size: u32) -> Result<(), HostError> {
    check_nsid(nsid, false)?;
    check_range(what, slba, blocks, MAX_BLOCKS_PER_COMMAND.into())?;
    let len = blocks * u64::from(block_size);
    if len > transport::MAX_TRANSFER as u64 {
        return Err(HostError::InvalidArgument(format!(
            "{what} of {len} bytes exceeds the {} bytes one command can move",
            transport::MAX_TRANSFER
        )));
    }
    Ok(())
}

fn bytes_of(blocks: u32, block_size: u32) -> Result<usize, HostError> {
    usize::try_from(u64::from(blocks) * u64::from(block_size))
        .map_err(|_| HostError::InvalidArgument("transfer does not fit in memory".into()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use nvme::IoOpcode;

    #[test]
    fn reads_and_writes_are_built_and_checked() {
        let op = Op::read(Nsid(1), 10, 8, 512).unwrap();
        assert_eq!(op.sqe.opcode, u8::from(IoOpcode::Read));
        assert_eq!(op.sqe.slba(), 10);
        assert_eq!(op.sqe.block_count(), 8);
        assert_eq!(op.data, OpData::In(4096));
        assert_eq!(op.queue, QueueKind::Io);
        assert!(Op::read(Nsid(1), 0, 0, 512).is_err(), "0 blocks");
        assert!(Op::read(Nsid(0), 0, 1, 512).is_err(), "nsid 0");
        assert!(Op::read(Nsid::BROADCAST, 0, 1, 512).is_err(), "broadcast");
        assert!(Op::read(Nsid(1), u64::MAX, 1, 512).is_err(), "LBA overflow");
        assert!(Op::read(Nsid(1), 0, 1024, 512).is_ok(), "512 KiB");
        assert!(Op::read(Nsid(1), 0, 1025, 512).is_err(), "above MAX_TRANSFER");

        let data = vec![0u8; 8192];
        let w = Op::write(Nsid(2), 5, &data, 4096, true).unwrap();
        assert_eq!(w.sqe.opcode, u8::from(IoOpcode::Write));
        assert!(w.sqe.fua());
        assert_eq!(w.sqe.block_count(), 2);
        assert!(w.pushes_data());
        let small = Op::write(Nsid(2), 5, &data[..4096], 4096, false).unwrap();
        assert!(!small.pushes_data(), "4 KiB travels in the capsule");
        let e = Op::write(Nsid(2), 5, &data[..1000], 512, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number"), "{e}");
        assert!(Op::write(Nsid(2), 5, &[], 512, false).is_err());
    }

    #[test]
    fn other_commands() {
        assert_eq!(Op::flush(Nsid(1)).unwrap().sqe.opcode, u8::from(IoOpcode::Flush));
        assert!(Op::flush(Nsid::BROADCAST).is_ok());
        assert!(Op::flush(Nsid(0)).is_err());
        let wz = Op::write_zeroes(Nsid(1), 7, 65536).unwrap();
        assert_eq!(wz.sqe.block_count(), 65536);
        assert!(Op::write_zeroes(Nsid(1), 7, 65537).is_err());
        let ranges = dsm_commands(100, 10);
        let dsm = Op::deallocate(Nsid(1), &ranges[0]).unwrap();
        assert_eq!(dsm.sqe.dsm_range_count(), 1);
        assert!(dsm.sqe.dsm_deallocate());
        match &dsm.data {
            OpData::Out(d) => assert_eq!(DsmRange::decode_list(d, 1).unwrap(), ranges[0]),
            other => panic!("{other:?}"),
        }
        assert!(Op::deallocate(Nsid(1), &[]).is_err());
        let id = Op::identify(Cns::Controller, Nsid(0));
        assert_eq!(id.queue, QueueKind::Admin);
        assert_eq!(id.data, OpData::In(4096));
        let log = Op::get_log_page(LogPageId::ChangedNamespaceList, 4096).unwrap();
        assert_eq!(GetLogPage::from_sqe(&log.sqe).unwrap().byte_len(), 4096);
        assert!(Op::get_log_page(LogPageId::ErrorInformation, 3).is_err());
        let nq = Op::set_number_of_queues(4).unwrap();
        assert_eq!(NumberOfQueues::from_dword(nq.sqe.cdw11).unwrap().submission(), 4);
        assert!(Op::set_number_of_queues(0).is_err());
        assert_eq!(Op::keep_alive().sqe.opcode, 0x18);
        assert_eq!(Op::async_event_request().sqe.opcode, 0x0c);
    }

    #[test]
    fn splitting() {
        let v: Vec<_> = split_blocks(10, 5, 2).collect();
        assert_eq!(v, vec![(10, 2, 0), (12, 2, 2), (14, 1, 4)]);
        assert_eq!(split_blocks(0, 0, 2).count(), 0);
        assert_eq!(max_blocks(512 * 1024, 512), 1024);
        assert_eq!(max_blocks(512 * 1024, 4096), 128);
        assert_eq!(max_blocks(512 * 1024, 1 << 20), 1, "never 0");
        assert_eq!(max_blocks(usize::MAX, 1), MAX_BLOCKS_PER_COMMAND);
        let big = dsm_commands(0, (u32::MAX as u64) * 300);
        assert_eq!(big.len(), 2);
        assert_eq!(big[0].len(), 256);
        assert_eq!(big[1].len(), 44);
        assert_eq!(blocks_in(1024, 512).unwrap(), 2);
        assert!(blocks_in(0, 512).is_err());
        assert!(blocks_in(100, 0).is_err());
    }

    proptest! {
        #[test]
        fn splits_cover_exactly(slba in 0u64..1 << 40, blocks in 0u64..100_000, max in 1u32..70_000) {
            let mut next = slba;
            let mut total = 0u64;
            for (lba, n, offset) in split_blocks(slba, blocks, max) {
                prop_assert_eq!(lba, next);
                prop_assert_eq!(offset, total);
                prop_assert!(n >= 1 && n <= max);
                next += u64::from(n);
                total += u64::from(n);
            }
            prop_assert_eq!(total, blocks);
        }

        #[test]
        fn dsm_ranges_cover_exactly(slba in 0u64..1 << 40, blocks in 1u64..1 << 34) {
            let cmds = dsm_commands(slba, blocks);
            let mut next = slba;
            for cmd in &cmds {
                prop_assert!(!cmd.is_empty() && cmd.len() <= DSM_RANGES_PER_COMMAND);
                for r in cmd {
                    prop_assert_eq!(r.slba, next);
                    next += u64::from(r.block_count);
                }
            }
            prop_assert_eq!(next - slba, blocks);
        }
    }
}
