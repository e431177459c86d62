//! NVMe wire formats: the bytes an NVMe-over-fabrics host and controller
//! exchange, laid out as the NVM Express Base Specification 2.0 and NVM
//! Express over Fabrics 1.1 define them, and [`transport`]: chanio's binding
//! of NVMe capsules to messaging channels. The host module and the I/O-unit
//! module both build on this crate, so neither depends on the other.
//!
//! This crate only encodes and decodes; it holds no queue state and does no
//! I/O. Everything is little-endian. Decoders take `&[u8]`, check the length
//! first and never panic, whatever the bytes; a peer's bad input comes back as
//! an [`NvmeError`], which [`NvmeError::status`] turns into the completion
//! status a controller should answer with.
//!
//! ```text
//! command capsule                         response capsule
//! +--------------------------+            +--------------------+
//! | Sqe (64 bytes)           |            | Cqe (16 bytes)     |
//! |   opcode, flags, CID     |            |   DW0: result      |
//! |   NSID, MPTR             |            |   SQ head, SQ id   |
//! |   DPTR: Sgl (16 bytes)   |            |   CID              |
//! |   CDW10..CDW15           |            |   Status + phase   |
//! +--------------------------+            +--------------------+
//! | in-capsule data          |
//! +--------------------------+
//! ```
//!
//! | module         | contents                                                      |
//! |----------------|---------------------------------------------------------------|
//! | [`command`]    | [`Sqe`], opcodes, I/O command fields, Dataset Management ranges |
//! | [`sgl`]        | [`Sgl`] descriptors (keyed data block, in-capsule offset)     |
//! | [`completion`] | [`Cqe`]                                                       |
//! | [`status`]     | [`Status`] codes and their names                              |
//! | [`identify`]   | Identify Controller, Identify Namespace, namespace lists      |
//! | [`log`]        | Get Log Page fields, Error Information and Changed Namespace List |
//! | [`fabrics`]    | Connect, Property Get/Set, NQNs                               |
//! | [`features`]   | Set/Get Features: Number of Queues, Keep Alive Timer          |
//! | [`event`]      | Asynchronous Event Request completions                        |
//!
//! Structures are plain values with public fields named after the
//! specification's mnemonics (`nsze`, `ioccsz`, ...), each documented with the
//! full name. Reserved fields are written as zero and ignored when decoding,
//! so a peer implementing a later revision still interoperates; values the
//! specification reserves *inside* a defined field (a FUSE of 11b, an unknown
//! SGL type) are errors.

#![warn(missing_docs)]

pub mod command;
pub mod completion;
pub mod descriptors;
pub mod event;
pub mod fabrics;
pub mod features;
pub mod identify;
pub mod log;
pub mod sgl;
pub mod status;
pub mod transport;
pub mod window;

use std::fmt;

pub use command::{AdminOpcode, DataPointer, DsmRange, Fuse, IoOpcode, Psdt, Sqe, SQE_LEN};
pub use completion::{Cqe, CQE_LEN};
pub use descriptors::NamespaceIds;
pub use event::{AsyncEvent, AsyncEventType};
pub use fabrics::{
    Connect, ConnectData, ConnectResponse, FabricsCommandType, HostId, InvalidParameter, Nqn, PropertyGet, PropertySet,
    PropertySize,
};
pub use features::{FeatureId, FeatureSelect, KeepAliveTimer, NumberOfQueues};
pub use identify::{AsciiField, Cns, IdentifyController, IdentifyNamespace, LbaFormat, NamespaceList};
pub use log::{ChangedNamespaceList, ErrorLogEntry, GetLogPage, LogPageId, ReplicationStatus, SmartLog};
pub use sgl::{Sgl, SGL_LEN};
pub use status::{Status, StatusCodeType};
pub use window::{SharedWindow, WindowCommand, WindowDescriptor};

/// Namespace identifier (NSID).
///
/// `0` means "no namespace" and [`Nsid::BROADCAST`] (`FFFFFFFFh`) addresses
/// every namespace; the values in between name one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nsid(pub u32);

impl Nsid {
    /// The broadcast value `FFFFFFFFh`: all namespaces.
    pub const BROADCAST: Nsid = Nsid(0xffff_ffff);

    /// Whether this names a single namespace (neither 0 nor broadcast).
    pub fn is_valid(self) -> bool {
        self.0 != 0 && self != Nsid::BROADCAST
    }
}

impl fmt::Display for Nsid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nsid {}", self.0)
    }
}

/// Command identifier (CID): chosen by the host, unique among the commands
/// outstanding on one submission queue, echoed in the completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CommandId(pub u16);

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cid {}", self.0)
    }
}

/// Why NVMe bytes or values were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NvmeError {
    /// A structure had the wrong size.
    #[error("{what} is {len} bytes, expected {expected}")]
    Length {
        /// The structure.
        what: &'static str,
        /// Bytes given.
        len: usize,
        /// Bytes the layout needs.
        expected: usize,
    },
    /// A code this implementation does not know (opcode, CNS, log page, ...).
    #[error("unknown {field} {value:#x}")]
    Unknown {
        /// The field holding the code.
        field: &'static str,
        /// The code.
        value: u32,
    },
    /// A field holds a value the specification reserves.
    #[error("{field} holds the reserved value {value:#x}")]
    Reserved {
        /// The field.
        field: &'static str,
        /// The reserved value.
        value: u32,
    },
    /// An SGL descriptor whose type or subtype is not supported here.
    #[error("unsupported SGL descriptor type {sgl_type:X}h subtype {subtype:X}h")]
    UnsupportedSgl {
        /// Descriptor type (byte 15, bits 7:4).
        sgl_type: u8,
        /// Descriptor subtype (byte 15, bits 3:0).
        subtype: u8,
    },
    /// A keyed SGL length that does not fit the 24-bit length field.
    #[error("keyed SGL length {len} exceeds the 24-bit maximum of 16777215")]
    SglLength {
        /// The requested length.
        len: u32,
    },
    /// A value outside the range its field allows.
    #[error("{field} {value} is outside {min}..={max}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// An NVMe Qualified Name that breaks the naming rules.
    #[error("invalid NQN: {reason}")]
    InvalidNqn {
        /// What is wrong with it.
        reason: String,
    },
    /// A field whose contents are malformed.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A command was read as a kind it is not (a Read parsed as a Connect).
    #[error("expected {expected}, found opcode {opcode:#04x}")]
    WrongCommand {
        /// The command kind the caller asked for.
        expected: &'static str,
        /// The opcode found.
        opcode: u8,
    },
}

impl NvmeError {
    /// The completion status a controller should return for a command that
    /// failed to decode with this error. Every mapping sets Do Not Retry: the
    /// same bytes would fail again.
    pub fn status(&self) -> Status {
        let status = match self {
            NvmeError::UnsupportedSgl { .. } => Status::SGL_INVALID_DESCRIPTOR_TYPE,
            NvmeError::SglLength { .. } => Status::SGL_INVALID_DATA_LENGTH,
            NvmeError::WrongCommand { .. } => Status::INVALID_OPCODE,
            _ => Status::INVALID_FIELD,
        };
        status.with_dnr()
    }
}

/// Fails with [`NvmeError::Length`] unless `bytes` is exactly `expected` long.
pub(crate) fn check_len(what: &'static str, bytes: &[u8], expected: usize) -> Result<(), NvmeError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(NvmeError::Length {
            what,
            len: bytes.len(),
            expected,
        })
    }
}

// Fixed-offset little-endian accessors. Callers check the buffer length first
// (with `check_len` or a fixed-size array), so the offsets, which are
// constants from the layouts, are always in bounds.

pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn get_u128(b: &[u8], off: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    u128::from_le_bytes(a)
}

pub(crate) fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

pub(crate) fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u128(b: &mut [u8], off: usize, v: u128) {
    b[off..off + 16].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_error_names_sizes() {
        let e = check_len("command capsule", &[0u8; 63], 64).unwrap_err();
        assert_eq!(e.to_string(), "command capsule is 63 bytes, expected 64");
        assert!(check_len("x", &[0u8; 4], 4).is_ok());
    }

    #[test]
    fn errors_map_to_statuses_with_dnr() {
        let sgl = NvmeError::UnsupportedSgl {
            sgl_type: 2,
            subtype: 0,
        };
        assert_eq!(sgl.status(), Status::SGL_INVALID_DESCRIPTOR_TYPE.with_dnr());
        assert_eq!(
            NvmeError::SglLength { len: 1 << 24 }.status(),
            Status::SGL_INVALID_DATA_LENGTH.with_dnr()
        );
        let op = NvmeError::WrongCommand {
            expected: "Connect",
            opcode: 0x02,
        };
        assert_eq!(op.status(), Status::INVALID_OPCODE.with_dnr());
        let cns = NvmeError::Unknown {
            field: "CNS",
            value: 0x55,
        };
        assert_eq!(cns.status(), Status::INVALID_FIELD.with_dnr());
        let len = NvmeError::Length {
            what: "x",
            len: 1,
            expected: 2,
        };
        assert_eq!(len.status(), Status::INVALID_FIELD.with_dnr());
        assert!(len.status().dnr());
    }

    #[test]
    fn nsid_validity() {
        assert!(!Nsid(0).is_valid());
        assert!(!Nsid::BROADCAST.is_valid());
        assert!(Nsid(1).is_valid());
        assert!(Nsid(0xffff_fffe).is_valid());
    }

    #[test]
    fn accessors_are_little_endian() {
        let mut b = [0u8; 32];
        put_u16(&mut b, 0, 0x0102);
        put_u32(&mut b, 2, 0x0304_0506);
        put_u64(&mut b, 6, 0x0708_090a_0b0c_0d0e);
        assert_eq!(&b[..14], &[2, 1, 6, 5, 4, 3, 0x0e, 0x0d, 0x0c, 0x0b, 0x0a, 9, 8, 7]);
        assert_eq!(get_u16(&b, 0), 0x0102);
        assert_eq!(get_u32(&b, 2), 0x0304_0506);
        assert_eq!(get_u64(&b, 6), 0x0708_090a_0b0c_0d0e);
        put_u128(&mut b, 16, 0x1122);
        assert_eq!(get_u128(&b, 16), 0x1122);
        assert_eq!(get_array::<2>(&b, 16), [0x22, 0x11]);
    }
}
