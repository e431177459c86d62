//! Submission queue entries and opcodes (NVMe Base 2.0 §4.2, NVM Command Set
//! 2.0 §3).
//!
//! ```text
//! bytes  0      opcode
//!        1      flags: FUSE bits 1:0, PSDT bits 7:6
//!        2..4   command identifier
//!        4..8   NSID
//!        8..12  CDW2          12..16  CDW3
//!       16..24  metadata pointer (MPTR)
//!       24..40  data pointer: PRP1 + PRP2, or one SGL descriptor
//!       40..64  CDW10 .. CDW15
//! ```
//!
//! [`Sqe::decode`] keeps every byte, so any 64 bytes decode and re-encode to
//! themselves; the typed accessors ([`Sqe::fuse`], [`Sqe::sgl`], ...) are
//! where reserved values are refused, so a controller always has the command
//! identifier in hand to answer an error with.

use super::sgl::{Sgl, SGL_LEN};
use super::{get_array, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, CommandId, Nsid, NvmeError};

/// Size of a submission queue entry.
pub const SQE_LEN: usize = 64;
/// Most logical blocks one Read, Write or Write Zeroes can cover (NLB is a
/// 0-based 16-bit field).
pub const MAX_BLOCKS_PER_COMMAND: u32 = 0x1_0000;
/// Most ranges one Dataset Management command can carry (NR is 0-based, 8 bits).
pub const MAX_DSM_RANGES: u16 = 256;
/// Size of one Dataset Management range.
pub const DSM_RANGE_LEN: usize = 16;

const FLAGS_FUSE_MASK: u8 = 0x03;
const FLAGS_PSDT_SHIFT: u8 = 6;
const CDW12_FUA: u32 = 1 << 30;
const CDW12_WRITE_ZEROES_DEAC: u32 = 1 << 25;
const CDW11_DSM_DEALLOCATE: u32 = 1 << 2;

/// A 64-byte submission queue entry (a command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sqe {
    /// Opcode (byte 0); admin or I/O depending on the queue (see
    /// [`AdminOpcode`], [`IoOpcode`]).
    pub opcode: u8,
    /// Flags (byte 1): fused operation in bits 1:0, PRP or SGL in bits 7:6.
    pub flags: u8,
    /// Command identifier (bytes 2..4).
    pub command_id: CommandId,
    /// Namespace identifier (bytes 4..8). For Fabrics commands byte 4 is the
    /// Fabrics command type instead.
    pub nsid: Nsid,
    /// Command dword 2 (bytes 8..12).
    pub cdw2: u32,
    /// Command dword 3 (bytes 12..16).
    pub cdw3: u32,
    /// Metadata pointer (MPTR, bytes 16..24).
    pub metadata_pointer: u64,
    /// Data pointer (DPTR, bytes 24..40).
    pub data_pointer: DataPointer,
    /// Command dword 10 (bytes 40..44).
    pub cdw10: u32,
    /// Command dword 11 (bytes 44..48).
    pub cdw11: u32,
    /// Command dword 12 (bytes 48..52).
    pub cdw12: u32,
    /// Command dword 13 (bytes 52..56).
    pub cdw13: u32,
    /// Command dword 14 (bytes 56..60).
    pub cdw14: u32,
    /// Command dword 15 (bytes 60..64).
    pub cdw15: u32,
}

impl Sqe {
    /// A command with every field but the opcode and identifier zero.
    pub fn new(opcode: u8, command_id: CommandId) -> Sqe {
        Sqe {
            opcode,
            command_id,
            ..Sqe::default()
        }
    }

    /// Encodes as 64 bytes.
    pub fn encode(&self) -> [u8; SQE_LEN] {
        let mut b = [0u8; SQE_LEN];
        b[0] = self.opcode;
        b[1] = self.flags;
        put_u16(&mut b, 2, self.command_id.0);
        put_u32(&mut b, 4, self.nsid.0);
        put_u32(&mut b, 8, self.cdw2);
        put_u32(&mut b, 12, self.cdw3);
        put_u64(&mut b, 16, self.metadata_pointer);
        b[24..40].copy_from_slice(&self.data_pointer.0);
        let dwords = [self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15];
        for (i, dw) in dwords.into_iter().enumerate() {
            put_u32(&mut b, 40 + 4 * i, dw);
        }
        b
    }

    /// Decodes a 64-byte submission queue entry. No field is interpreted, so
    /// only the length can be wrong.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is exactly 64 bytes.
    pub fn decode(b: &[u8]) -> Result<Sqe, NvmeError> {
        super::check_len("command capsule", b, SQE_LEN)?;
        Ok(Sqe {
            opcode: b[0],
            flags: b[1],
            command_id: CommandId(get_u16(b, 2)),
            nsid: Nsid(get_u32(b, 4)),
            cdw2: get_u32(b, 8),
            cdw3: get_u32(b, 12),
            metadata_pointer: get_u64(b, 16),
            data_pointer: DataPointer(get_array(b, 24)),
            cdw10: get_u32(b, 40),
            cdw11: get_u32(b, 44),
            cdw12: get_u32(b, 48),
            cdw13: get_u32(b, 52),
            cdw14: get_u32(b, 56),
            cdw15: get_u32(b, 60),
        })
    }

    /// The fused-operation field (flags bits 1:0).
    ///
    /// # Errors
    /// [`NvmeError::Reserved`] for the reserved value 11b.
    pub fn fuse(&self) -> Result<Fuse, NvmeError> {
        match self.flags & FLAGS_FUSE_MASK {
            0 => Ok(Fuse::Normal),
            1 => Ok(Fuse::First),
            2 => Ok(Fuse::Second),
            v => Err(NvmeError::Reserved {
                field: "FUSE",
                value: v.into(),
            }),
        }
    }

    /// Sets the fused-operation field.
    pub fn set_fuse(&mut self, fuse: Fuse) {
        self.flags = (self.flags & !FLAGS_FUSE_MASK) | fuse as u8;
    }

    /// The PRP or SGL for Data Transfer field (flags bits 7:6).
    ///
    /// # Errors
    /// [`NvmeError::Reserved`] for the reserved value 11b.
    pub fn psdt(&self) -> Result<Psdt, NvmeError> {
        match self.flags >> FLAGS_PSDT_SHIFT {
            0 => Ok(Psdt::Prp),
            1 => Ok(Psdt::SglMetadataBuffer),
            2 => Ok(Psdt::SglMetadataSegment),
            v => Err(NvmeError::Reserved {
                field: "PSDT",
                value: v.into(),
            }),
        }
    }

    /// Sets the PRP or SGL for Data Transfer field.
    pub fn set_psdt(&mut self, psdt: Psdt) {
        self.flags = (self.flags & !(0x3 << FLAGS_PSDT_SHIFT)) | (psdt as u8) << FLAGS_PSDT_SHIFT;
    }

    /// The data pointer read as an SGL descriptor, after checking that PSDT
    /// says SGLs are in use.
    ///
    /// # Errors
    /// [`NvmeError::InvalidField`] if PSDT selects PRPs, [`NvmeError::Reserved`]
    /// for a reserved PSDT, and the errors of [`Sgl::decode`].
    pub fn sgl(&self) -> Result<Sgl, NvmeError> {
        if self.psdt()? == Psdt::Prp {
            return Err(NvmeError::InvalidField {
                field: "PSDT",
                reason: "command uses PRPs, not an SGL".into(),
            });
        }
        self.data_pointer.sgl()
    }

    /// Points the command's data at `sgl` and sets PSDT to SGL (metadata
    /// buffer), as NVMe over Fabrics requires.
    ///
    /// # Errors
    /// Those of [`Sgl::encode`].
    pub fn set_sgl(&mut self, sgl: &Sgl) -> Result<(), NvmeError> {
        self.data_pointer = DataPointer::from_sgl(sgl)?;
        self.set_psdt(Psdt::SglMetadataBuffer);
        Ok(())
    }

    /// Starting LBA of a Read, Write or Write Zeroes (CDW10 low, CDW11 high).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw11) << 32 | u64::from(self.cdw10)
    }

    /// Sets the starting LBA.
    pub fn set_slba(&mut self, slba: u64) {
        self.cdw10 = slba as u32;
        self.cdw11 = (slba >> 32) as u32;
    }

    /// Number of Logical Blocks as on the wire (CDW12 bits 15:0, 0-based).
    pub fn nlb(&self) -> u16 {
        self.cdw12 as u16
    }

    /// Number of logical blocks the command covers (NLB + 1, 1..=65536).
    pub fn block_count(&self) -> u32 {
        u32::from(self.nlb()) + 1
    }

    /// Sets NLB from a 1-based block count.
    ///
    /// # Errors
    /// [`NvmeError::OutOfRange`] unless `count` is in 1..=65536.
    pub fn set_block_count(&mut self, count: u32) -> Result<(), NvmeError> {
        if count == 0 || count > MAX_BLOCKS_PER_COMMAND {
            return Err(NvmeError::OutOfRange {
                field: "block count",
                value: count.into(),
                min: 1,
                max: MAX_BLOCKS_PER_COMMAND.into(),
            });
        }
        self.cdw12 = (self.cdw12 & 0xffff_0000) | (count - 1);
        Ok(())
    }

    /// Force Unit Access (CDW12 bit 30).
    pub fn fua(&self) -> bool {
        self.cdw12 & CDW12_FUA != 0
    }

    /// Sets Force Unit Access.
    pub fn set_fua(&mut self, fua: bool) {
        set_bit(&mut self.cdw12, CDW12_FUA, fua);
    }

    /// Write Zeroes Deallocate (CDW12 bit 25): the blocks may be deallocated.
    pub fn write_zeroes_deallocate(&self) -> bool {
        self.cdw12 & CDW12_WRITE_ZEROES_DEAC != 0
    }

    /// Sets Write Zeroes Deallocate.
    pub fn set_write_zeroes_deallocate(&mut self, deallocate: bool) {
        set_bit(&mut self.cdw12, CDW12_WRITE_ZEROES_DEAC, deallocate);
    }

    /// Number of ranges of a Dataset Management command (CDW10 bits 7:0 are
    /// 0-based, so 1..=256).
    pub fn dsm_range_count(&self) -> u16 {
        u16::from(self.cdw10 as u8) + 1
    }

    /// Sets the Dataset Management range count.
    ///
    /// # Errors
    /// [`NvmeError::OutOfRange`] unless `count` is in 1..=256.
    pub fn set_dsm_range_count(&mut self, count: u16) -> Result<(), NvmeError> {
        if count == 0 || count > MAX_DSM_RANGES {
            return Err(NvmeError::OutOfRange {
                field: "Dataset Management range count",
                value: count.into(),
                min: 1,
                max: MAX_DSM_RANGES.into(),
            });
        }
        self.cdw10 = (self.cdw10 & !0xff) | u32::from(count - 1);
        Ok(())
    }

    /// Dataset Management Attribute – Deallocate (CDW11 bit 2).
    pub fn dsm_deallocate(&self) -> bool {
        self.cdw11 & CDW11_DSM_DEALLOCATE != 0
    }

    /// Sets Attribute – Deallocate.
    pub fn set_dsm_deallocate(&mut self, deallocate: bool) {
        set_bit(&mut self.cdw11, CDW11_DSM_DEALLOCATE, deallocate);
    }

    /// A Read of `blocks` logical blocks from `slba`. The data pointer is
    /// left for the caller.
    ///
    /// # Errors
    /// As [`Sqe::set_block_count`].
    pub fn read(command_id: CommandId, nsid: Nsid, slba: u64, blocks: u32) -> Result<Sqe, NvmeError> {
        Sqe::block_io(IoOpcode::Read, command_id, nsid, slba, blocks)
    }

    /// A Write of `blocks` logical blocks at `slba`. The data pointer is
    /// left for the caller.
    ///
    /// # Errors
    /// As [`Sqe::set_block_count`].
    pub fn write(command_id: CommandId, nsid: Nsid, slba: u64, blocks: u32) -> Result<Sqe, NvmeError> {
        Sqe::block_io(IoOpcode::Write, command_id, nsid, slba, blocks)
    }

    /// A Write Zeroes of `blocks` logical blocks at `slba`.
    ///
    /// # Errors
    /// As [`Sqe::set_block_count`].
    pub fn write_zeroes(command_id: CommandId, nsid: Nsid, slba: u64, blocks: u32) -> Result<Sqe, NvmeError> {
        Sqe::block_io(IoOpcode::WriteZeroes, command_id, nsid, slba, blocks)
    }

    /// A Flush of the namespace's volatile write cache.
    pub fn flush(command_id: CommandId, nsid: Nsid) -> Sqe {
        Sqe {
            nsid,
            ..Sqe::new(IoOpcode::Flush.into(), command_id)
        }
    }

    /// A Dataset Management command carrying `ranges` ranges (the range list
    /// travels as data: see [`DsmRange`]).
    ///
    /// # Errors
    /// As [`Sqe::set_dsm_range_count`].
    pub fn dataset_management(
        command_id: CommandId,
        nsid: Nsid,
        ranges: u16,
        deallocate: bool,
    ) -> Result<Sqe, NvmeError> {
        let mut sqe = Sqe {
            nsid,
            ..Sqe::new(IoOpcode::DatasetManagement.into(), command_id)
        };
        sqe.set_dsm_range_count(ranges)?;
        sqe.set_dsm_deallocate(deallocate);
        Ok(sqe)
    }

    /// A Keep Alive admin command.
    pub fn keep_alive(command_id: CommandId) -> Sqe {
        Sqe::new(AdminOpcode::KeepAlive.into(), command_id)
    }

    /// An Asynchronous Event Request admin command.
    pub fn async_event_request(command_id: CommandId) -> Sqe {
        Sqe::new(AdminOpcode::AsyncEventRequest.into(), command_id)
    }

    /// An Abort admin command for command `target` on submission queue
    /// `sq_id` (CDW10: SQID bits 15:0, CID bits 31:16).
    pub fn abort(command_id: CommandId, sq_id: u16, target: CommandId) -> Sqe {
        Sqe {
            cdw10: u32::from(sq_id) | u32::from(target.0) << 16,
            ..Sqe::new(AdminOpcode::Abort.into(), command_id)
        }
    }

    /// For an Abort command: `(submission queue id, command id)` to abort.
    pub fn abort_target(&self) -> (u16, CommandId) {
        (self.cdw10 as u16, CommandId((self.cdw10 >> 16) as u16))
    }

    fn block_io(op: IoOpcode, command_id: CommandId, nsid: Nsid, slba: u64, blocks: u32) -> Result<Sqe, NvmeError> {
        let mut sqe = Sqe {
            nsid,
            ..Sqe::new(op.into(), command_id)
        };
        sqe.set_slba(slba);
        sqe.set_block_count(blocks)?;
        Ok(sqe)
    }
}

/// The 16-byte data pointer (DPTR) of a command: two PRP entries or one SGL
/// descriptor, depending on the command's PSDT. Kept as raw bytes so any
/// command decodes; read it with [`DataPointer::prp`] or [`DataPointer::sgl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DataPointer(pub [u8; SGL_LEN]);

impl DataPointer {
    /// A data pointer holding PRP entry 1 (bytes 0..8) and 2 (bytes 8..16).
    pub fn from_prp(prp1: u64, prp2: u64) -> DataPointer {
        let mut b = [0u8; SGL_LEN];
        put_u64(&mut b, 0, prp1);
        put_u64(&mut b, 8, prp2);
        DataPointer(b)
    }

    /// A data pointer holding one SGL descriptor.
    ///
    /// # Errors
    /// Those of [`Sgl::encode`].
    pub fn from_sgl(sgl: &Sgl) -> Result<DataPointer, NvmeError> {
        sgl.encode().map(DataPointer)
    }

    /// The two PRP entries.
    pub fn prp(&self) -> (u64, u64) {
        (get_u64(&self.0, 0), get_u64(&self.0, 8))
    }

    /// The SGL descriptor.
    ///
    /// # Errors
    /// Those of [`Sgl::decode`].
    pub fn sgl(&self) -> Result<Sgl, NvmeError> {
        Sgl::decode(&self.0)
    }
}

/// Fused operation (FUSE, flags bits 1:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Fuse {
    /// 00b: a normal, unfused command.
    #[default]
    Normal = 0,
    /// 01b: first command of a fused pair.
    First = 1,
    /// 10b: second command of a fused pair.
    Second = 2,
}

/// PRP or SGL for Data Transfer (PSDT, flags bits 7:6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Psdt {
    /// 00b: PRPs.
    #[default]
    Prp = 0,
    /// 01b: SGLs; MPTR holds the address of a contiguous metadata buffer.
    /// The value NVMe over Fabrics hosts use.
    SglMetadataBuffer = 1,
    /// 10b: SGLs; MPTR holds the address of an SGL segment for metadata.
    SglMetadataSegment = 2,
}

/// Admin command opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AdminOpcode {
    /// 00h Delete I/O Submission Queue.
    DeleteIoSq = 0x00,
    /// 01h Create I/O Submission Queue.
    CreateIoSq = 0x01,
    /// 02h Get Log Page.
    GetLogPage = 0x02,
    /// 04h Delete I/O Completion Queue.
    DeleteIoCq = 0x04,
    /// 05h Create I/O Completion Queue.
    CreateIoCq = 0x05,
    /// 06h Identify.
    Identify = 0x06,
    /// 08h Abort.
    Abort = 0x08,
    /// 09h Set Features.
    SetFeatures = 0x09,
    /// 0Ah Get Features.
    GetFeatures = 0x0a,
    /// 0Ch Asynchronous Event Request.
    AsyncEventRequest = 0x0c,
    /// 18h Keep Alive.
    KeepAlive = 0x18,
    /// 7Fh Fabrics command (Connect, Property Get/Set, ...). Also valid on
    /// I/O queues.
    Fabrics = 0x7f,
}

impl AdminOpcode {
    /// The opcode with this value, or `None` for one this module does not know.
    pub fn from_u8(v: u8) -> Option<AdminOpcode> {
        Some(match v {
            0x00 => AdminOpcode::DeleteIoSq,
            0x01 => AdminOpcode::CreateIoSq,
            0x02 => AdminOpcode::GetLogPage,
            0x04 => AdminOpcode::DeleteIoCq,
            0x05 => AdminOpcode::CreateIoCq,
            0x06 => AdminOpcode::Identify,
            0x08 => AdminOpcode::Abort,
            0x09 => AdminOpcode::SetFeatures,
            0x0a => AdminOpcode::GetFeatures,
            0x0c => AdminOpcode::AsyncEventRequest,
            0x18 => AdminOpcode::KeepAlive,
            0x7f => AdminOpcode::Fabrics,
            _ => return None,
        })
    }

    /// The specification's name for the command.
    pub fn name(self) -> &'static str {
        match self {
            AdminOpcode::DeleteIoSq => "Delete I/O Submission Queue",
            AdminOpcode::CreateIoSq => "Create I/O Submission Queue",
            AdminOpcode::GetLogPage => "Get Log Page",
            AdminOpcode::DeleteIoCq => "Delete I/O Completion Queue",
            AdminOpcode::CreateIoCq => "Create I/O Completion Queue",
            AdminOpcode::Identify => "Identify",
            AdminOpcode::Abort => "Abort",
            AdminOpcode::SetFeatures => "Set Features",
            AdminOpcode::GetFeatures => "Get Features",
            AdminOpcode::AsyncEventRequest => "Asynchronous Event Request",
            AdminOpcode::KeepAlive => "Keep Alive",
            AdminOpcode::Fabrics => "Fabrics",
        }
    }
}

impl From<AdminOpcode> for u8 {
    fn from(op: AdminOpcode) -> u8 {
        op as u8
    }
}

/// NVM command set I/O opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoOpcode {
    /// 00h Flush.
    Flush = 0x00,
    /// 01h Write.
    Write = 0x01,
    /// 02h Read.
    Read = 0x02,
    /// 08h Write Zeroes.
    WriteZeroes = 0x08,
    /// 09h Dataset Management.
    DatasetManagement = 0x09,
}

impl IoOpcode {
    /// The opcode with this value, or `None` for one this module does not know.
    pub fn from_u8(v: u8) -> Option<IoOpcode> {
        Some(match v {
            0x00 => IoOpcode::Flush,
            0x01 => IoOpcode::Write,
            0x02 => IoOpcode::Read,
            0x08 => IoOpcode::WriteZeroes,
            0x09 => IoOpcode::DatasetManagement,
            _ => return None,
        })
    }

    /// The specification's name for the command.
    pub fn name(self) -> &'static str {
        match self {
            IoOpcode::Flush => "Flush",
            IoOpcode::Write => "Write",
            IoOpcode::Read => "Read",
            IoOpcode::WriteZeroes => "Write Zeroes",
            IoOpcode::DatasetManagement => "Dataset Management",
        }
    }

    /// Whether the command moves data from host to controller (bits 1:0 of
    /// the opcode are the data direction: 01b host to controller).
    pub fn is_host_to_controller(self) -> bool {
        (self as u8) & 0x3 == 0x1
    }

    /// Whether the command moves data from controller to host (10b).
    pub fn is_controller_to_host(self) -> bool {
        (self as u8) & 0x3 == 0x2
    }
}

impl From<IoOpcode> for u8 {
    fn from(op: IoOpcode) -> u8 {
        op as u8
    }
}

/// One 16-byte range of a Dataset Management command's data.
///
/// ```text
/// bytes 0..4   context attributes
/// bytes 4..8   length in logical blocks (1-based)
/// bytes 8..16  starting LBA
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DsmRange {
    /// Context attributes (access hints).
    pub context_attributes: u32,
    /// Length of the range in logical blocks (not 0-based).
    pub block_count: u32,
    /// Starting LBA.
    pub slba: u64,
}

impl DsmRange {
    /// Encodes as 16 bytes.
    pub fn encode(&self) -> [u8; DSM_RANGE_LEN] {
        let mut b = [0u8; DSM_RANGE_LEN];
        put_u32(&mut b, 0, self.context_attributes);
        put_u32(&mut b, 4, self.block_count);
        put_u64(&mut b, 8, self.slba);
        b
    }

    /// Decodes one 16-byte range.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 16 bytes.
    pub fn decode(b: &[u8]) -> Result<DsmRange, NvmeError> {
        super::check_len("Dataset Management range", b, DSM_RANGE_LEN)?;
        Ok(DsmRange {
            context_attributes: get_u32(b, 0),
            block_count: get_u32(b, 4),
            slba: get_u64(b, 8),
        })
    }

    /// Decodes the first `count` ranges of a Dataset Management data buffer.
    ///
    /// # Errors
    /// [`NvmeError::Length`] if `data` holds fewer than `count` ranges.
    pub fn decode_list(data: &[u8], count: u16) -> Result<Vec<DsmRange>, NvmeError> {
        let needed = usize::from(count) * DSM_RANGE_LEN;
        let list = data.get(..needed).ok_or(NvmeError::Length {
            what: "Dataset Management range list",
            len: data.len(),
            expected: needed,
        })?;
        list.chunks_exact(DSM_RANGE_LEN).map(DsmRange::decode).collect()
    }

    /// Encodes a range list as the command's data.
    pub fn encode_list(ranges: &[DsmRange]) -> Vec<u8> {
        ranges.iter().flat_map(|r| r.encode()).collect()
    }
}

fn set_bit(dword: &mut u32, bit: u32, on: bool) {
    if on {
        *dword |= bit;
    } else {
        *dword &= !bit;
    }
}

#[cfg(test)]
mod tests;
