//! Completion status (NVMe Base 2.0 §4.6.1).
//!
//! The 16-bit status field of a completion queue entry:
//!
//! ```text
//!  15   14   13:12  11:9  8:1  0
//! +----+----+------+-----+----+---+
//! |DNR | M  | CRD  | SCT | SC | P |
//! +----+----+------+-----+----+---+
//! ```
//!
//! [`Status`] holds the parts that say what happened: the status code type
//! (SCT), the status code (SC) and Do Not Retry (DNR). The phase tag, More and
//! Command Retry Delay are properties of one completion and stay on
//! [`Cqe`](super::Cqe).

use std::fmt;

/// Status Code Type (SCT): which table a status code belongs to. Three bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StatusCodeType(u8);

impl StatusCodeType {
    /// 0h: Generic Command Status.
    pub const GENERIC: StatusCodeType = StatusCodeType(0);
    /// 1h: Command Specific Status.
    pub const COMMAND_SPECIFIC: StatusCodeType = StatusCodeType(1);
    /// 2h: Media and Data Integrity Errors.
    pub const MEDIA_DATA_INTEGRITY: StatusCodeType = StatusCodeType(2);
    /// 3h: Path Related Status.
    pub const PATH_RELATED: StatusCodeType = StatusCodeType(3);
    /// 7h: Vendor Specific.
    pub const VENDOR_SPECIFIC: StatusCodeType = StatusCodeType(7);

    /// The status code type with this value, if it fits in three bits.
    pub const fn new(value: u8) -> Option<StatusCodeType> {
        if value <= 7 {
            Some(StatusCodeType(value))
        } else {
            None
        }
    }

    /// The three-bit value.
    pub const fn value(self) -> u8 {
        self.0
    }

    /// The specification's name for this status code type.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "Generic Command Status",
            1 => "Command Specific Status",
            2 => "Media and Data Integrity Errors",
            3 => "Path Related Status",
            7 => "Vendor Specific",
            _ => "Reserved",
        }
    }
}

/// A completion status: status code type, status code and Do Not Retry.
///
/// Equality compares all three; use [`Status::same_code`] to ignore DNR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status {
    sct: StatusCodeType,
    sc: u8,
    dnr: bool,
}

impl Status {
    /// Successful Completion (SCT 0h, SC 00h).
    pub const SUCCESS: Status = Status::new(StatusCodeType::GENERIC, 0x00);

    // Generic Command Status (SCT 0h).
    /// Invalid Command Opcode (SCT 0h, SC 01h).
    pub const INVALID_OPCODE: Status = Status::new(StatusCodeType::GENERIC, 0x01);
    /// Invalid Field in Command (SCT 0h, SC 02h).
    pub const INVALID_FIELD: Status = Status::new(StatusCodeType::GENERIC, 0x02);
    /// Command ID Conflict (SCT 0h, SC 03h).
    pub const COMMAND_ID_CONFLICT: Status = Status::new(StatusCodeType::GENERIC, 0x03);
    /// Data Transfer Error (SCT 0h, SC 04h).
    pub const DATA_TRANSFER_ERROR: Status = Status::new(StatusCodeType::GENERIC, 0x04);
    /// Internal Error (SCT 0h, SC 06h).
    pub const INTERNAL_ERROR: Status = Status::new(StatusCodeType::GENERIC, 0x06);
    /// Command Abort Requested (SCT 0h, SC 07h).
    pub const ABORT_REQUESTED: Status = Status::new(StatusCodeType::GENERIC, 0x07);
    /// Command Aborted due to SQ Deletion (SCT 0h, SC 08h).
    pub const ABORTED_SQ_DELETION: Status = Status::new(StatusCodeType::GENERIC, 0x08);
    /// Invalid Namespace or Format (SCT 0h, SC 0Bh).
    pub const INVALID_NAMESPACE: Status = Status::new(StatusCodeType::GENERIC, 0x0b);
    /// Command Sequence Error (SCT 0h, SC 0Ch).
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::new(StatusCodeType::GENERIC, 0x0c);
    /// Invalid SGL Segment Descriptor (SCT 0h, SC 0Dh).
    pub const SGL_INVALID_SEGMENT_DESCRIPTOR: Status = Status::new(StatusCodeType::GENERIC, 0x0d);
    /// Invalid Number of SGL Descriptors (SCT 0h, SC 0Eh).
    pub const SGL_INVALID_DESCRIPTOR_COUNT: Status = Status::new(StatusCodeType::GENERIC, 0x0e);
    /// Data SGL Length Invalid (SCT 0h, SC 0Fh).
    pub const SGL_INVALID_DATA_LENGTH: Status = Status::new(StatusCodeType::GENERIC, 0x0f);
    /// SGL Descriptor Type Invalid (SCT 0h, SC 11h).
    pub const SGL_INVALID_DESCRIPTOR_TYPE: Status = Status::new(StatusCodeType::GENERIC, 0x11);
    /// SGL Offset Invalid (SCT 0h, SC 16h).
    pub const SGL_INVALID_OFFSET: Status = Status::new(StatusCodeType::GENERIC, 0x16);
    /// Host Identifier Inconsistent Format (SCT 0h, SC 18h).
    pub const HOST_ID_INCONSISTENT_FORMAT: Status = Status::new(StatusCodeType::GENERIC, 0x18);
    /// Keep Alive Timer Expired (SCT 0h, SC 19h).
    pub const KEEP_ALIVE_EXPIRED: Status = Status::new(StatusCodeType::GENERIC, 0x19);
    /// Keep Alive Timeout Invalid (SCT 0h, SC 1Ah).
    pub const KEEP_ALIVE_INVALID: Status = Status::new(StatusCodeType::GENERIC, 0x1a);
    /// Transient Transport Error (SCT 0h, SC 22h).
    pub const TRANSIENT_TRANSPORT_ERROR: Status = Status::new(StatusCodeType::GENERIC, 0x22);
    /// LBA Out of Range (SCT 0h, SC 80h; NVM command set).
    pub const LBA_OUT_OF_RANGE: Status = Status::new(StatusCodeType::GENERIC, 0x80);
    /// Capacity Exceeded (SCT 0h, SC 81h; NVM command set).
    pub const CAPACITY_EXCEEDED: Status = Status::new(StatusCodeType::GENERIC, 0x81);
    /// Namespace Not Ready (SCT 0h, SC 82h; NVM command set).
    pub const NAMESPACE_NOT_READY: Status = Status::new(StatusCodeType::GENERIC, 0x82);

    // Command Specific Status (SCT 1h).
    /// Completion Queue Invalid (SCT 1h, SC 00h).
    pub const INVALID_COMPLETION_QUEUE: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x00);
    /// Invalid Queue Identifier (SCT 1h, SC 01h).
    pub const INVALID_QUEUE_IDENTIFIER: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x01);
    /// Invalid Queue Size (SCT 1h, SC 02h).
    pub const INVALID_QUEUE_SIZE: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x02);
    /// Abort Command Limit Exceeded (SCT 1h, SC 03h).
    pub const ABORT_LIMIT_EXCEEDED: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x03);
    /// Asynchronous Event Request Limit Exceeded (SCT 1h, SC 05h).
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x05);
    /// Invalid Log Page (SCT 1h, SC 09h).
    pub const INVALID_LOG_PAGE: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x09);
    /// Feature Identifier Not Saveable (SCT 1h, SC 0Dh).
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x0d);
    /// Feature Not Changeable (SCT 1h, SC 0Eh).
    pub const FEATURE_NOT_CHANGEABLE: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x0e);
    /// Feature Not Namespace Specific (SCT 1h, SC 0Fh).
    pub const FEATURE_NOT_NAMESPACE_SPECIFIC: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x0f);
    /// Fabrics: Incompatible Format (SCT 1h, SC 80h).
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x80);
    /// Fabrics: Controller Busy (SCT 1h, SC 81h).
    pub const CONNECT_CONTROLLER_BUSY: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x81);
    /// Fabrics: Connect Invalid Parameters (SCT 1h, SC 82h).
    pub const CONNECT_INVALID_PARAMETERS: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x82);
    /// Fabrics: Connect Restart Discovery (SCT 1h, SC 83h).
    pub const CONNECT_RESTART_DISCOVERY: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x83);
    /// Fabrics: Connect Invalid Host (SCT 1h, SC 84h).
    pub const CONNECT_INVALID_HOST: Status = Status::new(StatusCodeType::COMMAND_SPECIFIC, 0x84);

    // Media and Data Integrity Errors (SCT 2h).
    /// Write Fault (SCT 2h, SC 80h).
    pub const WRITE_FAULT: Status = Status::new(StatusCodeType::MEDIA_DATA_INTEGRITY, 0x80);
    /// Unrecovered Read Error (SCT 2h, SC 81h).
    pub const UNRECOVERED_READ_ERROR: Status = Status::new(StatusCodeType::MEDIA_DATA_INTEGRITY, 0x81);
    /// Compare Failure (SCT 2h, SC 85h).
    pub const COMPARE_FAILURE: Status = Status::new(StatusCodeType::MEDIA_DATA_INTEGRITY, 0x85);
    /// Access Denied (SCT 2h, SC 86h).
    pub const ACCESS_DENIED: Status = Status::new(StatusCodeType::MEDIA_DATA_INTEGRITY, 0x86);

    /// A status with Do Not Retry clear.
    pub const fn new(sct: StatusCodeType, sc: u8) -> Status {
        Status { sct, sc, dnr: false }
    }

    /// The status code type.
    pub const fn sct(self) -> StatusCodeType {
        self.sct
    }

    /// The status code.
    pub const fn sc(self) -> u8 {
        self.sc
    }

    /// Do Not Retry: the same command would fail again.
    pub const fn dnr(self) -> bool {
        self.dnr
    }

    /// The same status with Do Not Retry set.
    #[must_use]
    pub const fn with_dnr(self) -> Status {
        Status { dnr: true, ..self }
    }

    /// Whether this is Successful Completion.
    pub const fn is_success(self) -> bool {
        self.sct.0 == 0 && self.sc == 0
    }

    /// Whether `self` and `other` have the same SCT and SC, whatever DNR.
    pub const fn same_code(self, other: Status) -> bool {
        self.sct.0 == other.sct.0 && self.sc == other.sc
    }

    /// Reads a CQE status field: bits 8:1 SC, bits 11:9 SCT, bit 15 DNR. The
    /// phase tag, CRD and More are ignored.
    pub const fn from_field(field: u16) -> Status {
        Status {
            sct: StatusCodeType(((field >> 9) & 0x7) as u8),
            sc: (field >> 1) as u8,
            dnr: field & 0x8000 != 0,
        }
    }

    /// The CQE status field for this status, with the phase tag, CRD and More
    /// clear.
    pub const fn to_field(self) -> u16 {
        (self.sc as u16) << 1 | (self.sct.0 as u16) << 9 | if self.dnr { 0x8000 } else { 0 }
    }

    /// The specification's name for the status code, if it is one this module
    /// knows.
    ///
    /// Command-specific codes 80h..BFh depend on the command; as this crate
    /// serves fabrics, they are named after the Fabrics command statuses
    /// (Connect Invalid Parameters, ...), not the NVM command set ones.
    ///
    /// Long: one arm per status code, a table read top to bottom.
    pub fn name(self) -> Option<&'static str> {
        let name = match (self.sct.0, self.sc) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x05) => "Commands Aborted due to Power Loss Notification",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x08) => "Command Aborted due to SQ Deletion",
            (0, 0x09) => "Command Aborted due to Failed Fused Command",
            (0, 0x0a) => "Command Aborted due to Missing Fused Command",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x0c) => "Command Sequence Error",
            (0, 0x0d) => "Invalid SGL Segment Descriptor",
            (0, 0x0e) => "Invalid Number of SGL Descriptors",
            (0, 0x0f) => "Data SGL Length Invalid",
            (0, 0x10) => "Metadata SGL Length Invalid",
            (0, 0x11) => "SGL Descriptor Type Invalid",
            (0, 0x12) => "Invalid Use of Controller Memory Buffer",
            (0, 0x13) => "PRP Offset Invalid",
            (0, 0x14) => "Atomic Write Unit Exceeded",
            (0, 0x15) => "Operation Denied",
            (0, 0x16) => "SGL Offset Invalid",
            (0, 0x18) => "Host Identifier Inconsistent Format",
            (0, 0x19) => "Keep Alive Timer Expired",
            (0, 0x1a) => "Keep Alive Timeout Invalid",
            (0, 0x1b) => "Command Aborted due to Preempt and Abort",
            (0, 0x1c) => "Sanitize Failed",
            (0, 0x1d) => "Sanitize In Progress",
            (0, 0x1e) => "SGL Data Block Granularity Invalid",
            (0, 0x1f) => "Command Not Supported for Queue in CMB",
            (0, 0x20) => "Namespace is Write Protected",
            (0, 0x21) => "Command Interrupted",
            (0, 0x22) => "Transient Transport Error",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (0, 0x83) => "Reservation Conflict",
            (0, 0x84) => "Format In Progress",
            (1, 0x00) => "Completion Queue Invalid",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x03) => "Abort Command Limit Exceeded",
            (1, 0x05) => "Asynchronous Event Request Limit Exceeded",
            (1, 0x06) => "Invalid Firmware Slot",
            (1, 0x07) => "Invalid Firmware Image",
            (1, 0x08) => "Invalid Interrupt Vector",
            (1, 0x09) => "Invalid Log Page",
            (1, 0x0a) => "Invalid Format",
            (1, 0x0b) => "Firmware Activation Requires Conventional Reset",
            (1, 0x0c) => "Invalid Queue Deletion",
            (1, 0x0d) => "Feature Identifier Not Saveable",
            (1, 0x0e) => "Feature Not Changeable",
            (1, 0x0f) => "Feature Not Namespace Specific",
            (1, 0x10) => "Firmware Activation Requires NVM Subsystem Reset",
            (1, 0x11) => "Firmware Activation Requires Controller Level Reset",
            (1, 0x12) => "Firmware Activation Requires Maximum Time Violation",
            (1, 0x13) => "Firmware Activation Prohibited",
            (1, 0x14) => "Overlapping Range",
            (1, 0x15) => "Namespace Insufficient Capacity",
            (1, 0x16) => "Namespace Identifier Unavailable",
            (1, 0x18) => "Namespace Already Attached",
            (1, 0x19) => "Namespace Is Private",
            (1, 0x1a) => "Namespace Not Attached",
            (1, 0x1b) => "Thin Provisioning Not Supported",
            (1, 0x1c) => "Controller List Invalid",
            (1, 0x80) => "Incompatible Format",
            (1, 0x81) => "Controller Busy",
            (1, 0x82) => "Connect Invalid Parameters",
            (1, 0x83) => "Connect Restart Discovery",
            (1, 0x84) => "Connect Invalid Host",
            (1, 0x85) => "Invalid Queue Type",
            (1, 0x90) => "Discover Restart",
            (1, 0x91) => "Authentication Required",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x82) => "End-to-end Guard Check Error",
            (2, 0x83) => "End-to-end Application Tag Check Error",
            (2, 0x84) => "End-to-end Reference Tag Check Error",
            (2, 0x85) => "Compare Failure",
            (2, 0x86) => "Access Denied",
            // chanio's storage windows (`crate::window::status`).
            (7, 0x01) => "Namespace Cannot Be Windowed (chanio)",
            (7, 0x02) => "Window Limit Exceeded (chanio)",
            (7, 0x03) => "Unknown Window (chanio)",
            (7, 0x04) => "Window Cache Limit Exceeded (chanio)",
            (7, 0x05) => "Window Overlaps A Cached Window (chanio)",
            (2, 0x87) => "Deallocated or Unwritten Logical Block",
            (3, 0x00) => "Internal Path Error",
            (3, 0x01) => "Asymmetric Access Persistent Loss",
            (3, 0x02) => "Asymmetric Access Inaccessible",
            (3, 0x03) => "Asymmetric Access Transition",
            (3, 0x60) => "Controller Pathing Error",
            (3, 0x70) => "Host Pathing Error",
            (3, 0x71) => "Command Aborted By Host",
            _ => return None,
        };
        Some(name)
    }

    /// The status in words, as CLIs print it:
    /// `"LBA Out of Range (SCT 0h, SC 80h)"`, with `", DNR"` inside the
    /// parentheses when Do Not Retry is set. Codes without a known name are
    /// described by their status code type.
    pub fn describe(&self) -> String {
        let dnr = if self.dnr { ", DNR" } else { "" };
        let (sct, sc) = (self.sct.0, self.sc);
        match self.name() {
            Some(name) => format!("{name} (SCT {sct:X}h, SC {sc:02X}h{dnr})"),
            None => format!("Unknown {} status (SCT {sct:X}h, SC {sc:02X}h{dnr})", self.sct.name()),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl From<u16> for Status {
    /// Same as [`Status::from_field`].
    fn from(field: u16) -> Status {
        Status::from_field(field)
    }
}

impl From<Status> for u16 {
    /// Same as [`Status::to_field`].
    fn from(status: Status) -> u16 {
        status.to_field()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn field_layout_matches_spec() {
        // SC in bits 8:1, SCT in 11:9, DNR in 15.
        assert_eq!(Status::LBA_OUT_OF_RANGE.to_field(), 0x80 << 1);
        assert_eq!(Status::CONNECT_INVALID_HOST.to_field(), 0x84 << 1 | 1 << 9);
        assert_eq!(Status::WRITE_FAULT.with_dnr().to_field(), 0x80 << 1 | 2 << 9 | 0x8000);
        // Linux writes statuses shifted right by one: NVME_SC_CONNECT_INVALID_PARAM = 0x182.
        assert_eq!(Status::CONNECT_INVALID_PARAMETERS.to_field() >> 1, 0x182);
        assert_eq!(Status::FEATURE_NOT_SAVEABLE.to_field() >> 1, 0x10d);
        assert_eq!(Status::SGL_INVALID_DESCRIPTOR_TYPE.to_field() >> 1, 0x011);
        assert_eq!(Status::SGL_INVALID_DATA_LENGTH.to_field() >> 1, 0x00f);
        assert_eq!(Status::UNRECOVERED_READ_ERROR.to_field() >> 1, 0x281);
    }

    #[test]
    fn phase_crd_and_more_are_ignored() {
        let field = Status::INVALID_FIELD.to_field() | 1 | 0x3000 | 0x4000;
        assert_eq!(Status::from_field(field), Status::INVALID_FIELD);
    }

    #[test]
    fn describe_names_codes() {
        assert_eq!(Status::LBA_OUT_OF_RANGE.describe(), "LBA Out of Range (SCT 0h, SC 80h)");
        assert_eq!(Status::SUCCESS.to_string(), "Successful Completion (SCT 0h, SC 00h)");
        assert_eq!(
            Status::CONNECT_INVALID_HOST.with_dnr().describe(),
            "Connect Invalid Host (SCT 1h, SC 84h, DNR)"
        );
        assert_eq!(Status::WRITE_FAULT.describe(), "Write Fault (SCT 2h, SC 80h)");
        let vendor = Status::new(StatusCodeType::VENDOR_SPECIFIC, 0x42);
        assert_eq!(vendor.describe(), "Unknown Vendor Specific status (SCT 7h, SC 42h)");
        let reserved = Status::from_field(5 << 9 | 1 << 1);
        assert_eq!(reserved.describe(), "Unknown Reserved status (SCT 5h, SC 01h)");
    }

    #[test]
    fn success_and_dnr() {
        assert!(Status::SUCCESS.is_success());
        assert!(Status::default().is_success());
        assert!(!Status::INTERNAL_ERROR.is_success());
        let dnr = Status::INTERNAL_ERROR.with_dnr();
        assert!(dnr.dnr());
        assert_ne!(dnr, Status::INTERNAL_ERROR);
        assert!(dnr.same_code(Status::INTERNAL_ERROR));
        assert!(!dnr.same_code(Status::INVALID_FIELD));
        assert_eq!(StatusCodeType::new(8), None);
        assert_eq!(StatusCodeType::new(2), Some(StatusCodeType::MEDIA_DATA_INTEGRITY));
    }

    proptest! {
        #[test]
        fn field_round_trip(sct in 0u8..8, sc: u8, dnr: bool) {
            let mut s = Status::new(StatusCodeType::new(sct).unwrap(), sc);
            if dnr {
                s = s.with_dnr();
            }
            prop_assert_eq!(Status::from_field(s.to_field()), s);
            prop_assert_eq!(u16::from(Status::from(s.to_field())), s.to_field());
            prop_assert!(!s.describe().is_empty());
        }
    }
}
