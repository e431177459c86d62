//! Get Log Page and the log pages this crate serves (NVMe Base 2.0 §5.16).
//!
//! ```text
//! Get Log Page    CDW10: LID bits 7:0, LSP 14:8, RAE 15, NUMDL 31:16
//!                 CDW11: NUMDU bits 15:0, LSI 31:16
//!                 CDW12/13: offset in bytes (low/high)
//! ```
//!
//! NUMD (NUMDU:NUMDL) is a 0-based count of dwords, so a request covers
//! `(NUMD + 1) * 4` bytes.

use super::command::{AdminOpcode, Sqe};
use super::identify::{decode_nsids, encode_nsids, IDENTIFY_LEN};
use super::status::Status;
use super::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, CommandId, Nsid, NvmeError};

/// Size of one Error Information log entry.
pub const ERROR_LOG_ENTRY_LEN: usize = 64;
/// Size of the Changed Namespace List log page.
pub const CHANGED_NAMESPACE_LIST_LEN: usize = IDENTIFY_LEN;
/// Largest transfer one Get Log Page can ask for: 2^32 dwords.
pub const MAX_LOG_LEN: u64 = 4 << 32;

/// Size of the SMART / Health Information log page.
pub const SMART_LOG_LEN: usize = 512;

/// The SMART / Health Information log page (02h), controller-wide.
///
/// ```text
/// byte  0       Critical Warning
///       1..3    Composite Temperature (kelvins; 0: not reported)
///       3       Available Spare (%)      4  Available Spare Threshold (%)
///       5       Percentage Used (%)
///      32..48   Data Units Read          (thousands of 512-byte units, rounded up)
///      48..64   Data Units Written
///      64..80   Host Read Commands       80..96   Host Write Commands
///      96..112  Controller Busy Time (minutes)
///     112..128  Power Cycles            128..144  Power On Hours
///     144..160  Unsafe Shutdowns        160..176  Media and Data Integrity Errors
///     176..192  Number of Error Information Log Entries
/// ```
/// The 16-byte counters are little-endian 128-bit integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmartLog {
    /// Critical Warning bits (0: none).
    pub critical_warning: u8,
    /// Composite Temperature in kelvins; 0 when not reported.
    pub temperature_k: u16,
    /// Available Spare, percent.
    pub available_spare: u8,
    /// Available Spare Threshold, percent.
    pub spare_threshold: u8,
    /// Percentage Used.
    pub percentage_used: u8,
    /// Data Units Read: thousands of 512-byte units read by hosts.
    pub data_units_read: u128,
    /// Data Units Written.
    pub data_units_written: u128,
    /// Host Read Commands.
    pub host_read_commands: u128,
    /// Host Write Commands.
    pub host_write_commands: u128,
    /// Controller Busy Time, minutes.
    pub busy_minutes: u128,
    /// Power Cycles.
    pub power_cycles: u128,
    /// Power On Hours.
    pub power_on_hours: u128,
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors.
    pub media_errors: u128,
    /// Number of Error Information Log Entries over the controller's life.
    pub error_log_entries: u128,
}

impl SmartLog {
    /// Data units (thousands of 512-byte units, rounded up) for `bytes`.
    pub fn data_units(bytes: u128) -> u128 {
        bytes.div_ceil(512 * 1000)
    }

    fn counters(&self) -> [(usize, u128); 10] {
        [
            (32, self.data_units_read),
            (48, self.data_units_written),
            (64, self.host_read_commands),
            (80, self.host_write_commands),
            (96, self.busy_minutes),
            (112, self.power_cycles),
            (128, self.power_on_hours),
            (144, self.unsafe_shutdowns),
            (160, self.media_errors),
            (176, self.error_log_entries),
        ]
    }

    /// The 512-byte page.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SMART_LOG_LEN];
        b[0] = self.critical_warning;
        put_u16(&mut b, 1, self.temperature_k);
        b[3] = self.available_spare;
        b[4] = self.spare_threshold;
        b[5] = self.percentage_used;
        for (off, v) in self.counters() {
            b[off..off + 16].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decodes a page.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 512 bytes.
    pub fn decode(b: &[u8]) -> Result<SmartLog, NvmeError> {
        if b.len() != SMART_LOG_LEN {
            return Err(NvmeError::Length {
                what: "SMART / Health log page",
                len: b.len(),
                expected: SMART_LOG_LEN,
            });
        }
        let at = |off: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[off..off + 16]);
            u128::from_le_bytes(a)
        };
        Ok(SmartLog {
            critical_warning: b[0],
            temperature_k: get_u16(b, 1),
            available_spare: b[3],
            spare_threshold: b[4],
            percentage_used: b[5],
            data_units_read: at(32),
            data_units_written: at(48),
            host_read_commands: at(64),
            host_write_commands: at(80),
            busy_minutes: at(96),
            power_cycles: at(112),
            power_on_hours: at(128),
            unsafe_shutdowns: at(144),
            media_errors: at(160),
            error_log_entries: at(176),
        })
    }
}

/// Log page identifiers (LID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LogPageId {
    /// 01h Error Information.
    ErrorInformation = 0x01,
    /// 02h SMART / Health Information.
    SmartHealth = 0x02,
    /// 03h Firmware Slot Information.
    FirmwareSlot = 0x03,
    /// 04h Changed Namespace List.
    ChangedNamespaceList = 0x04,
    /// 05h Commands Supported and Effects.
    CommandsSupportedAndEffects = 0x05,
    /// 70h Discovery (fabrics discovery controllers).
    Discovery = 0x70,
    /// C0h (vendor specific): chanio's replication status, a
    /// [`ReplicationStatus`].
    ReplicationStatus = 0xC0,
}

impl LogPageId {
    /// The log page with this identifier, or `None` for one this module does
    /// not know.
    pub fn from_u8(v: u8) -> Option<LogPageId> {
        Some(match v {
            0x01 => LogPageId::ErrorInformation,
            0x02 => LogPageId::SmartHealth,
            0x03 => LogPageId::FirmwareSlot,
            0x04 => LogPageId::ChangedNamespaceList,
            0x05 => LogPageId::CommandsSupportedAndEffects,
            0x70 => LogPageId::Discovery,
            0xC0 => LogPageId::ReplicationStatus,
            _ => return None,
        })
    }
}

impl From<LogPageId> for u8 {
    fn from(lid: LogPageId) -> u8 {
        lid as u8
    }
}

/// The fields of a Get Log Page command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GetLogPage {
    /// Log Page Identifier (CDW10 bits 7:0).
    pub lid: u8,
    /// Log Specific Field (CDW10 bits 14:8, 7 bits).
    pub lsp: u8,
    /// Retain Asynchronous Event (CDW10 bit 15).
    pub rae: bool,
    /// Number of dwords, 0-based (NUMDL in CDW10 bits 31:16, NUMDU in CDW11
    /// bits 15:0).
    pub numd: u32,
    /// Log Specific Identifier (CDW11 bits 31:16).
    pub lsi: u16,
    /// Byte offset into the log page (CDW12 low, CDW13 high).
    pub offset: u64,
}

impl GetLogPage {
    /// A request for the first `len` bytes of log page `lid`.
    ///
    /// # Errors
    /// [`NvmeError::InvalidField`] unless `len` is a non-zero multiple of 4
    /// no larger than [`MAX_LOG_LEN`].
    pub fn new(lid: LogPageId, len: u64) -> Result<GetLogPage, NvmeError> {
        // Low two bits set: not a whole number of dwords.
        if len == 0 || len & 0x3 != 0 || len > MAX_LOG_LEN {
            return Err(NvmeError::InvalidField {
                field: "log page length",
                reason: format!("{len} bytes is not a non-zero multiple of 4 up to 2^34"),
            });
        }
        Ok(GetLogPage {
            lid: lid.into(),
            numd: (len / 4 - 1) as u32,
            ..GetLogPage::default()
        })
    }

    /// The log page asked for, if this module knows it.
    pub fn log_page_id(&self) -> Option<LogPageId> {
        LogPageId::from_u8(self.lid)
    }

    /// Number of bytes asked for: `(NUMD + 1) * 4`.
    pub fn byte_len(&self) -> u64 {
        (u64::from(self.numd) + 1) * 4
    }

    /// The Get Log Page command (the data pointer is left for the caller).
    pub fn to_sqe(&self, command_id: CommandId, nsid: Nsid) -> Sqe {
        Sqe {
            nsid,
            cdw10: u32::from(self.lid)
                | u32::from(self.lsp & 0x7f) << 8
                | u32::from(self.rae) << 15
                | (self.numd & 0xffff) << 16,
            cdw11: self.numd >> 16 | u32::from(self.lsi) << 16,
            cdw12: self.offset as u32,
            cdw13: (self.offset >> 32) as u32,
            ..Sqe::new(AdminOpcode::GetLogPage.into(), command_id)
        }
    }

    /// Reads the fields of a Get Log Page command.
    ///
    /// # Errors
    /// [`NvmeError::WrongCommand`] unless the opcode is 02h.
    pub fn from_sqe(sqe: &Sqe) -> Result<GetLogPage, NvmeError> {
        if sqe.opcode != u8::from(AdminOpcode::GetLogPage) {
            return Err(NvmeError::WrongCommand {
                expected: "Get Log Page",
                opcode: sqe.opcode,
            });
        }
        Ok(GetLogPage {
            lid: sqe.cdw10 as u8,
            lsp: ((sqe.cdw10 >> 8) & 0x7f) as u8,
            rae: sqe.cdw10 & 1 << 15 != 0,
            numd: sqe.cdw10 >> 16 | (sqe.cdw11 & 0xffff) << 16,
            lsi: (sqe.cdw11 >> 16) as u16,
            offset: u64::from(sqe.cdw13) << 32 | u64::from(sqe.cdw12),
        })
    }
}

/// One 64-byte entry of the Error Information log page (LID 01h).
///
/// ```text
/// bytes  0..8   error count          16..24  LBA
///        8..10  SQ id                24..28  NSID
///       10..12  command id           28      vendor specific info available
///       12..14  status field         29      transport type
///       14..16  parameter location   30      command set identifier
///                                    31      opcode
///       32..40  command specific     40..42  transport specific
///       63      log page version
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ErrorLogEntry {
    /// Error Count: a unique, incrementing identifier for the error; 0 marks
    /// an unused entry.
    pub error_count: u64,
    /// Submission queue of the command; FFFFh when not tied to a command.
    pub sq_id: u16,
    /// Command identifier; FFFFh when not tied to a command.
    pub command_id: CommandId,
    /// Status field of the completion (bits 15:1, phase tag in bit 0): read
    /// it with [`ErrorLogEntry::status`].
    pub status_field: u16,
    /// Parameter Error Location: byte in bits 7:0, bit in 10:8; FFFFh when
    /// not specific to a parameter.
    pub parameter_error_location: u16,
    /// First LBA that had the error.
    pub lba: u64,
    /// Namespace of the error.
    pub nsid: Nsid,
    /// Vendor Specific Information Available: log page holding more, or 0.
    pub vendor_specific: u8,
    /// Transport type of the error (TRTYPE).
    pub transport_type: u8,
    /// Command set identifier of the command (reserved in earlier revisions).
    pub csi: u8,
    /// Opcode of the command (reserved in earlier revisions).
    pub opcode: u8,
    /// Command Specific Information.
    pub command_specific: u64,
    /// Transport Type Specific Information.
    pub transport_specific: u16,
    /// Log Page Version (reserved in earlier revisions).
    pub log_page_version: u8,
}

impl ErrorLogEntry {
    /// Parameter Error Location value meaning "not a specific parameter".
    pub const NO_LOCATION: u16 = 0xffff;

    /// An entry for command `command_id` of queue `sq_id` that failed with
    /// `status`, with no specific parameter location.
    pub fn new(error_count: u64, sq_id: u16, command_id: CommandId, status: Status) -> ErrorLogEntry {
        ErrorLogEntry {
            error_count,
            sq_id,
            command_id,
            status_field: status.to_field(),
            parameter_error_location: ErrorLogEntry::NO_LOCATION,
            ..ErrorLogEntry::default()
        }
    }

    /// The status (SCT, SC, DNR).
    pub fn status(&self) -> Status {
        Status::from_field(self.status_field)
    }

    /// `(byte, bit)` of the offending parameter in the command, or `None`
    /// when the error is not tied to one.
    pub fn error_location(&self) -> Option<(u8, u8)> {
        if self.parameter_error_location == ErrorLogEntry::NO_LOCATION {
            None
        } else {
            Some((
                self.parameter_error_location as u8,
                ((self.parameter_error_location >> 8) & 0x7) as u8,
            ))
        }
    }

    /// Points the entry at bit `bit` (0..=7) of byte `byte` of the command.
    pub fn set_error_location(&mut self, byte: u8, bit: u8) {
        self.parameter_error_location = u16::from(byte) | u16::from(bit & 0x7) << 8;
    }

    /// Encodes as 64 bytes.
    pub fn encode(&self) -> [u8; ERROR_LOG_ENTRY_LEN] {
        let mut b = [0u8; ERROR_LOG_ENTRY_LEN];
        put_u64(&mut b, 0, self.error_count);
        put_u16(&mut b, 8, self.sq_id);
        put_u16(&mut b, 10, self.command_id.0);
        put_u16(&mut b, 12, self.status_field);
        put_u16(&mut b, 14, self.parameter_error_location);
        put_u64(&mut b, 16, self.lba);
        put_u32(&mut b, 24, self.nsid.0);
        b[28] = self.vendor_specific;
        b[29] = self.transport_type;
        b[30] = self.csi;
        b[31] = self.opcode;
        put_u64(&mut b, 32, self.command_specific);
        put_u16(&mut b, 40, self.transport_specific);
        b[63] = self.log_page_version;
        b
    }

    /// Decodes one 64-byte entry.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 64 bytes.
    pub fn decode(b: &[u8]) -> Result<ErrorLogEntry, NvmeError> {
        super::check_len("Error Information log entry", b, ERROR_LOG_ENTRY_LEN)?;
        Ok(ErrorLogEntry {
            error_count: get_u64(b, 0),
            sq_id: get_u16(b, 8),
            command_id: CommandId(get_u16(b, 10)),
            status_field: get_u16(b, 12),
            parameter_error_location: get_u16(b, 14),
            lba: get_u64(b, 16),
            nsid: Nsid(get_u32(b, 24)),
            vendor_specific: b[28],
            transport_type: b[29],
            csi: b[30],
            opcode: b[31],
            command_specific: get_u64(b, 32),
            transport_specific: get_u16(b, 40),
            log_page_version: b[63],
        })
    }

    /// Encodes entries back to back, as the log page returns them.
    pub fn encode_list(entries: &[ErrorLogEntry]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.encode()).collect()
    }

    /// Decodes a log page of whole entries.
    ///
    /// # Errors
    /// [`NvmeError::InvalidField`] unless the length is a multiple of 64.
    pub fn decode_list(b: &[u8]) -> Result<Vec<ErrorLogEntry>, NvmeError> {
        let entries = b.chunks_exact(ERROR_LOG_ENTRY_LEN);
        if !entries.remainder().is_empty() {
            return Err(NvmeError::InvalidField {
                field: "Error Information log",
                reason: format!("{} bytes is not a whole number of 64-byte entries", b.len()),
            });
        }
        entries.map(ErrorLogEntry::decode).collect()
    }
}

/// The vendor log page C0h: the state of each replicated namespace of the
/// I/O unit, as text for people (its role, the in-sync set, each replica's
/// state and resync progress). Layout: the text's length in bytes (32-bit
/// little endian), then the text (UTF-8, one line per fact); the rest of
/// the page is zeros.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ReplicationStatus {
    /// The text.
    pub text: String,
}

impl ReplicationStatus {
    /// Bytes of the page a host reads.
    pub const PAGE_LEN: usize = 4096;

    /// Encodes the page (the text cut, at a character, to what fits).
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.text.len().min(Self::PAGE_LEN - 4);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let mut b = vec![0u8; 4];
        put_u32(&mut b, 0, end as u32);
        b.extend_from_slice(&self.text.as_bytes()[..end]);
        b
    }

    /// Decodes a page.
    ///
    /// # Errors
    /// [`NvmeError::Length`] for a page shorter than its length says,
    /// [`NvmeError::InvalidField`] for text that is not UTF-8.
    pub fn decode(b: &[u8]) -> Result<ReplicationStatus, NvmeError> {
        if b.len() < 4 {
            return Err(NvmeError::Length {
                what: "replication status log page",
                len: b.len(),
                expected: 4,
            });
        }
        let len = get_u32(b, 0) as usize;
        let text = b.get(4..4 + len).ok_or(NvmeError::Length {
            what: "replication status log page",
            len: b.len(),
            expected: 4 + len,
        })?;
        let text = std::str::from_utf8(text).map_err(|e| NvmeError::InvalidField {
            field: "replication status text",
            reason: e.to_string(),
        })?;
        Ok(ReplicationStatus { text: text.to_owned() })
    }
}

/// The Changed Namespace List log page (LID 04h): namespaces whose Identify
/// data changed since the page was last read, as up to 1024 NSIDs in 4096
/// bytes. When more than 1024 changed, the page holds FFFFFFFFh alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ChangedNamespaceList {
    nsids: Vec<Nsid>,
    overflowed: bool,
}

impl ChangedNamespaceList {
    /// Most namespaces the page lists.
    pub const MAX_ENTRIES: usize = 1024;

    /// The page for these changed namespaces; more than 1024 give the
    /// overflow page.
    ///
    /// # Errors
    /// [`NvmeError::InvalidField`] if an entry is 0 or broadcast.
    pub fn new(nsids: Vec<Nsid>) -> Result<ChangedNamespaceList, NvmeError> {
        if let Some(bad) = nsids.iter().find(|n| !n.is_valid()) {
            return Err(NvmeError::InvalidField {
                field: "changed namespace list",
                reason: format!("entry {:#x} is not a namespace", bad.0),
            });
        }
        if nsids.len() > ChangedNamespaceList::MAX_ENTRIES {
            return Ok(ChangedNamespaceList {
                nsids: Vec::new(),
                overflowed: true,
            });
        }
        Ok(ChangedNamespaceList {
            nsids,
            overflowed: false,
        })
    }

    /// The changed namespaces (empty when the list overflowed).
    pub fn nsids(&self) -> &[Nsid] {
        &self.nsids
    }

    /// Whether more than 1024 namespaces changed, so the host must rescan
    /// them all.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Encodes as 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        if self.overflowed {
            encode_nsids(&[Nsid::BROADCAST])
        } else {
            encode_nsids(&self.nsids)
        }
    }

    /// Decodes the log page.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 4096 bytes; [`NvmeError::InvalidField`]
    /// for a non-zero entry after a zero, or FFFFFFFFh other than alone first.
    pub fn decode(b: &[u8]) -> Result<ChangedNamespaceList, NvmeError> {
        super::check_len("Changed Namespace List log", b, CHANGED_NAMESPACE_LIST_LEN)?;
        let nsids = decode_nsids(b)?;
        if nsids == [Nsid::BROADCAST] {
            return Ok(ChangedNamespaceList {
                nsids: Vec::new(),
                overflowed: true,
            });
        }
        ChangedNamespaceList::new(nsids)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn replication_status_round_trips_and_cuts_at_a_character() {
        let st = ReplicationStatus {
            text: "namespace 1: primary on node a; in sync: a, b\n".into(),
        };
        assert_eq!(ReplicationStatus::decode(&st.encode()).unwrap(), st);
        let mut page = st.encode();
        page.resize(ReplicationStatus::PAGE_LEN, 0);
        assert_eq!(ReplicationStatus::decode(&page).unwrap(), st);
        let long = ReplicationStatus {
            text: "é".repeat(3000)
        };
        let page = long.encode();
        assert!(page.len() <= ReplicationStatus::PAGE_LEN);
        let back = ReplicationStatus::decode(&page).unwrap();
        assert!(back.text.len() < long.text.len() && back.text.chars().all(|c| c == 'é'));
        assert!(ReplicationStatus::decode(&[9, 0, 0, 0, b'x']).is_err());
        assert!(ReplicationStatus::decode(&[2, 0, 0, 0, 0xff, 0xfe]).is_err());
    }

    #[test]
    fn get_log_page_fields_match_spec() {
        let mut req = GetLogPage::new(LogPageId::ChangedNamespaceList, 4096).unwrap();
        req.rae = true;
        assert_eq!(req.numd, 1023);
        let sqe = req.to_sqe(CommandId(1), Nsid::BROADCAST);
        assert_eq!(sqe.opcode, 0x02);
        assert_eq!(sqe.cdw10, 0x04 | 1 << 15 | 1023 << 16, "LID 7:0, RAE 15, NUMDL 31:16");
        assert_eq!(sqe.cdw11, 0);
        let b = sqe.encode();
        assert_eq!(b[40], 0x04, "LID at byte 40");
        assert_eq!(&b[42..44], &1023u16.to_le_bytes(), "NUMDL at bytes 42..44");
        let back = GetLogPage::from_sqe(&Sqe::decode(&b).unwrap()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.byte_len(), 4096);
        assert_eq!(back.log_page_id(), Some(LogPageId::ChangedNamespaceList));
    }

    #[test]
    fn numdu_extends_the_length() {
        let mut sqe = Sqe::new(0x02, CommandId(1));
        sqe.cdw10 = 0xffff_0001;
        sqe.cdw11 = 0x0005_0002; // NUMDU 2, LSI 5
        let req = GetLogPage::from_sqe(&sqe).unwrap();
        assert_eq!(req.numd, 0x2_ffff);
        assert_eq!(req.byte_len(), 0x3_0000 * 4);
        assert_eq!(req.lsi, 5);
        assert_eq!(req.to_sqe(CommandId(1), Nsid(0)).cdw11, sqe.cdw11);
        let max = GetLogPage::new(LogPageId::ErrorInformation, MAX_LOG_LEN).unwrap();
        assert_eq!(max.numd, u32::MAX);
        assert_eq!(max.byte_len(), MAX_LOG_LEN);
        assert!(GetLogPage::new(LogPageId::ErrorInformation, 0).is_err());
        assert!(GetLogPage::new(LogPageId::ErrorInformation, 6).is_err());
        assert!(GetLogPage::new(LogPageId::ErrorInformation, MAX_LOG_LEN + 4).is_err());
        assert!(GetLogPage::from_sqe(&Sqe::new(0x06, CommandId(1))).is_err());
        let mut offset = GetLogPage::new(LogPageId::ErrorInformation, 64).unwrap();
        offset.offset = 0x1_0000_0040;
        let sqe = offset.to_sqe(CommandId(1), Nsid(0));
        assert_eq!((sqe.cdw12, sqe.cdw13), (0x40, 1));
        assert_eq!(LogPageId::from_u8(0x99), None);
        let smart = SmartLog {
            available_spare: 100,
            spare_threshold: 10,
            data_units_read: 3,
            data_units_written: 1,
            host_read_commands: 1 << 70,
            host_write_commands: 9,
            power_on_hours: 5,
            media_errors: 2,
            error_log_entries: 4,
            ..SmartLog::default()
        };
        let page = smart.encode();
        assert_eq!(page.len(), SMART_LOG_LEN);
        assert_eq!(page[3], 100);
        assert_eq!(page[32], 3, "Data Units Read at byte 32");
        assert_eq!(page[64 + 8], 1 << 6, "a 128-bit counter, little-endian");
        assert_eq!(page[80], 9, "Host Write Commands at byte 80");
        assert_eq!(page[128], 5, "Power On Hours at byte 128");
        assert_eq!(page[160], 2);
        assert_eq!(SmartLog::decode(&page), Ok(smart));
        assert!(SmartLog::decode(&page[..511]).is_err());
        assert_eq!(
            (
                SmartLog::data_units(1),
                SmartLog::data_units(512_000),
                SmartLog::data_units(512_001)
            ),
            (1, 1, 2)
        );
    }

    #[test]
    fn error_entry_layout_matches_spec() {
        let mut e = ErrorLogEntry::new(7, 2, CommandId(0x1234), Status::LBA_OUT_OF_RANGE.with_dnr());
        e.set_error_location(40, 3);
        e.lba = 0x1122_3344;
        e.nsid = Nsid(5);
        e.transport_type = 1;
        e.command_specific = 0xabcd;
        let b = e.encode();
        assert_eq!(&b[0..8], &7u64.to_le_bytes(), "error count at 0");
        assert_eq!(&b[8..10], &[2, 0], "SQ id at 8");
        assert_eq!(&b[10..12], &[0x34, 0x12], "command id at 10");
        assert_eq!(&b[12..14], &(0x8000u16 | 0x80 << 1).to_le_bytes(), "status field at 12");
        assert_eq!(&b[14..16], &[40, 3], "parameter error location at 14");
        assert_eq!(&b[16..24], &0x1122_3344u64.to_le_bytes(), "LBA at 16");
        assert_eq!(&b[24..28], &[5, 0, 0, 0], "NSID at 24");
        assert_eq!(b[29], 1, "transport type at 29");
        assert_eq!(&b[32..40], &0xabcdu64.to_le_bytes(), "command specific at 32");
        let back = ErrorLogEntry::decode(&b).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.status(), Status::LBA_OUT_OF_RANGE.with_dnr());
        assert_eq!(back.error_location(), Some((40, 3)));
        assert_eq!(
            ErrorLogEntry::new(1, 0, CommandId(0), Status::SUCCESS).error_location(),
            None
        );
        let list = ErrorLogEntry::encode_list(&[e, e]);
        assert_eq!(list.len(), 128);
        assert_eq!(ErrorLogEntry::decode_list(&list), Ok(vec![e, e]));
        assert!(ErrorLogEntry::decode_list(&list[..100]).is_err());
        assert_eq!(ErrorLogEntry::decode_list(&[]), Ok(vec![]));
    }

    #[test]
    fn changed_namespace_list() {
        let list = ChangedNamespaceList::new(vec![Nsid(3), Nsid(1)]).unwrap();
        let b = list.encode();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[..12], &[3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ChangedNamespaceList::decode(&b), Ok(list));
        let over = ChangedNamespaceList::new((1..=1025).map(Nsid).collect()).unwrap();
        assert!(over.overflowed());
        let b = over.encode();
        assert_eq!(&b[..8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(ChangedNamespaceList::decode(&b), Ok(over));
        let exactly = ChangedNamespaceList::new((1..=1024).map(Nsid).collect()).unwrap();
        assert!(!exactly.overflowed());
        assert_eq!(ChangedNamespaceList::decode(&exactly.encode()), Ok(exactly));
        assert!(ChangedNamespaceList::new(vec![Nsid(0)]).is_err());
        let mut bad = vec![0u8; 4096];
        bad[..8].copy_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(ChangedNamespaceList::decode(&bad).is_err());
        assert!(ChangedNamespaceList::decode(&bad[..4092]).is_err());
        assert_eq!(ChangedNamespaceList::decode(&[0u8; 4096]).unwrap().nsids(), &[]);
    }

    proptest! {
        #[test]
        fn get_log_page_round_trip(lid: u8, lsp in 0u8..0x80, rae: bool, numd: u32, lsi: u16, offset: u64) {
            let req = GetLogPage { lid, lsp, rae, numd, lsi, offset };
            let sqe = Sqe::decode(&req.to_sqe(CommandId(9), Nsid(1)).encode()).unwrap();
            prop_assert_eq!(GetLogPage::from_sqe(&sqe), Ok(req));
        }

        #[test]
        fn error_entry_round_trip(count: u64, sq: u16, cid: u16, status: u16, pel: u16, lba: u64, nsid: u32,
                                  cs: u64, ver: u8) {
            let e = ErrorLogEntry {
                error_count: count, sq_id: sq, command_id: CommandId(cid), status_field: status,
                parameter_error_location: pel, lba, nsid: Nsid(nsid), command_specific: cs,
                log_page_version: ver, ..ErrorLogEntry::default()
            };
            prop_assert_eq!(ErrorLogEntry::decode(&e.encode()), Ok(e));
        }

        #[test]
        fn changed_list_round_trip(ids in proptest::collection::vec(1u32..0xffff_ffff, 0..1100)) {
            let list = ChangedNamespaceList::new(ids.into_iter().map(Nsid).collect()).unwrap();
            prop_assert_eq!(ChangedNamespaceList::decode(&list.encode()), Ok(list));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ErrorLogEntry::decode(&bytes);
            let _ = ErrorLogEntry::decode_list(&bytes);
            let _ = ChangedNamespaceList::decode(&bytes);
        }

        #[test]
        fn list_decoder_never_panics(words in proptest::collection::vec(prop_oneof![Just(0u32), any::<u32>()], 1024)) {
            let b: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let _ = ChangedNamespaceList::decode(&b);
        }
    }
}
