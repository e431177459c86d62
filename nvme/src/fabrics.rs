//! NVMe over Fabrics commands (NVMe-oF 1.1 §3): Connect, Property Get and
//! Property Set, and NVMe Qualified Names.
//!
//! Every Fabrics command has opcode 7Fh and names its kind in byte 4 (where
//! other commands carry the NSID):
//!
//! ```text
//! Connect command                         Connect data (1024 bytes)
//! byte  0      opcode 7Fh                 bytes   0..16   HOSTID
//! bytes 2..4   command identifier         bytes  16..18   CNTLID
//! byte  4      FCTYPE 01h                 bytes 256..512  SUBNQN
//! bytes 24..40 SGL for the Connect data   bytes 512..768  HOSTNQN
//! bytes 40..42 RECFMT
//! bytes 42..44 QID
//! bytes 44..46 SQSIZE (0-based)
//! byte  46     CATTR
//! bytes 48..52 KATO (milliseconds)
//! ```

use std::fmt;
use std::str::FromStr;

use super::command::{AdminOpcode, Sqe};
use super::sgl::Sgl;
use super::{get_array, get_u16, put_u16, CommandId, Nsid, NvmeError};

/// Size of the Connect command's data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// Size of an NQN field in Connect data and Identify Controller.
pub const NQN_FIELD_LEN: usize = 256;

/// Byte offsets of the Connect command's fields in the 64-byte command, for
/// reporting an invalid parameter (see [`InvalidParameter`]).
pub mod connect_offset {
    /// RECFMT.
    pub const RECFMT: u16 = 40;
    /// QID.
    pub const QID: u16 = 42;
    /// SQSIZE.
    pub const SQSIZE: u16 = 44;
    /// CATTR.
    pub const CATTR: u16 = 46;
    /// KATO.
    pub const KATO: u16 = 48;
}

/// Byte offsets of the Connect data's fields.
pub mod connect_data_offset {
    /// HOSTID.
    pub const HOSTID: u16 = 0;
    /// CNTLID.
    pub const CNTLID: u16 = 16;
    /// SUBNQN.
    pub const SUBNQN: u16 = 256;
    /// HOSTNQN.
    pub const HOSTNQN: u16 = 512;
}

/// Controller properties (the fabrics stand-in for PCIe registers): offsets
/// for [`PropertyGet`] and [`PropertySet`].
pub mod property {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1c;
    /// NVM Subsystem Reset (4 bytes).
    pub const NSSR: u32 = 0x20;
}

/// Fabrics command type (FCTYPE, byte 4 of a Fabrics command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FabricsCommandType {
    /// 00h Property Set.
    PropertySet = 0x00,
    /// 01h Connect.
    Connect = 0x01,
    /// 04h Property Get.
    PropertyGet = 0x04,
    /// 05h Authentication Send.
    AuthenticationSend = 0x05,
    /// 06h Authentication Receive.
    AuthenticationReceive = 0x06,
    /// 08h Disconnect.
    Disconnect = 0x08,
}

impl FabricsCommandType {
    /// The command type with this value, or `None` for one this module does
    /// not know.
    pub fn from_u8(v: u8) -> Option<FabricsCommandType> {
        Some(match v {
            0x00 => FabricsCommandType::PropertySet,
            0x01 => FabricsCommandType::Connect,
            0x04 => FabricsCommandType::PropertyGet,
            0x05 => FabricsCommandType::AuthenticationSend,
            0x06 => FabricsCommandType::AuthenticationReceive,
            0x08 => FabricsCommandType::Disconnect,
            _ => return None,
        })
    }
}

impl From<FabricsCommandType> for u8 {
    fn from(t: FabricsCommandType) -> u8 {
        t as u8
    }
}

impl Sqe {
    /// A Fabrics command of type `fctype`, every other field zero.
    pub fn fabrics(command_id: CommandId, fctype: FabricsCommandType) -> Sqe {
        Sqe {
            nsid: Nsid(u32::from(u8::from(fctype))),
            ..Sqe::new(AdminOpcode::Fabrics.into(), command_id)
        }
    }

    /// The Fabrics command type of a Fabrics command (byte 4).
    ///
    /// # Errors
    /// [`NvmeError::WrongCommand`] if the opcode is not 7Fh,
    /// [`NvmeError::Unknown`] for a command type this module does not know.
    pub fn fabrics_command_type(&self) -> Result<FabricsCommandType, NvmeError> {
        if self.opcode != u8::from(AdminOpcode::Fabrics) {
            return Err(NvmeError::WrongCommand {
                expected: "Fabrics command",
                opcode: self.opcode,
            });
        }
        let fctype = self.nsid.0 as u8;
        FabricsCommandType::from_u8(fctype).ok_or(NvmeError::Unknown {
            field: "fabrics command type",
            value: fctype.into(),
        })
    }

    fn expect_fabrics(&self, want: FabricsCommandType, name: &'static str) -> Result<(), NvmeError> {
        let got = self.fabrics_command_type()?;
        if got == want {
            Ok(())
        } else {
            Err(NvmeError::InvalidField {
                field: "FCTYPE",
                reason: format!("expected {name}, found {got:?}"),
            })
        }
    }
}

/// The Connect command: creates a controller (queue 0) or adds an I/O queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Connect {
    /// Record format (RECFMT): 0 for the format of NVMe-oF 1.x.
    pub recfmt: u16,
    /// Queue identifier (QID): 0 for the admin queue.
    pub qid: u16,
    /// Submission queue size (SQSIZE), 0-based: `sqsize + 1` entries.
    pub sqsize: u16,
    /// Connect attributes (CATTR).
    pub cattr: u8,
    /// Keep Alive Timeout (KATO) in milliseconds; 0 disables it. Admin queue
    /// only.
    pub kato: u32,
}

impl Connect {
    /// CATTR bit 2: the host asks for SQ flow control to be disabled (the
    /// controller then reports SQ head FFFFh).
    pub const CATTR_DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;

    /// A Connect for queue `qid` of `queue_size` entries.
    ///
    /// # Errors
    /// [`NvmeError::OutOfRange`] unless `queue_size` is in 1..=65536.
    pub fn new(qid: u16, queue_size: u32, kato_ms: u32) -> Result<Connect, NvmeError> {
        if queue_size == 0 || queue_size > 0x1_0000 {
            return Err(NvmeError::OutOfRange {
                field: "queue size",
                value: queue_size.into(),
                min: 1,
                max: 0x1_0000,
            });
        }
        Ok(Connect {
            recfmt: 0,
            qid,
            sqsize: (queue_size - 1) as u16,
            cattr: 0,
            kato: kato_ms,
        })
    }

    /// Number of submission queue entries asked for (SQSIZE + 1).
    pub fn queue_size(&self) -> u32 {
        u32::from(self.sqsize) + 1
    }

    /// Whether CATTR asks for SQ flow control to be disabled.
    pub fn sq_flow_control_disabled(&self) -> bool {
        self.cattr & Connect::CATTR_DISABLE_SQ_FLOW_CONTROL != 0
    }

    /// The Connect command, its data (a [`ConnectData`]) described by `data`.
    ///
    /// # Errors
    /// Those of [`Sgl::encode`].
    pub fn to_sqe(&self, command_id: CommandId, data: &Sgl) -> Result<Sqe, NvmeError> {
        let mut sqe = Sqe::fabrics(command_id, FabricsCommandType::Connect);
        sqe.set_sgl(data)?;
        sqe.cdw10 = u32::from(self.recfmt) | u32::from(self.qid) << 16;
        sqe.cdw11 = u32::from(self.sqsize) | u32::from(self.cattr) << 16;
        sqe.cdw12 = self.kato;
        Ok(sqe)
    }

    /// Reads the Connect fields of a command.
    ///
    /// # Errors
    /// [`NvmeError::WrongCommand`] or [`NvmeError::InvalidField`] unless the
    /// command is a Fabrics Connect.
    pub fn from_sqe(sqe: &Sqe) -> Result<Connect, NvmeError> {
        sqe.expect_fabrics(FabricsCommandType::Connect, "Connect")?;
        Ok(Connect {
            recfmt: sqe.cdw10 as u16,
            qid: (sqe.cdw10 >> 16) as u16,
            sqsize: sqe.cdw11 as u16,
            cattr: (sqe.cdw11 >> 16) as u8,
            kato: sqe.cdw12,
        })
    }
}

/// The 1024-byte data of a Connect command.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectData {
    /// Host identifier (HOSTID).
    pub host_id: HostId,
    /// Controller identifier (CNTLID): [`ConnectData::CNTLID_DYNAMIC`] on the
    /// admin queue of a dynamic controller; on I/O queues the controller id
    /// the admin Connect returned.
    pub cntlid: u16,
    /// NQN of the subsystem to connect to (SUBNQN).
    pub subnqn: Nqn,
    /// NQN of the host (HOSTNQN).
    pub hostnqn: Nqn,
}

impl ConnectData {
    /// CNTLID FFFFh: any controller (dynamic controller model).
    pub const CNTLID_DYNAMIC: u16 = 0xffff;
    /// CNTLID FFFEh: any static controller.
    pub const CNTLID_ANY_STATIC: u16 = 0xfffe;

    /// Encodes as 1024 bytes.
    pub fn encode(&self) -> [u8; CONNECT_DATA_LEN] {
        let mut b = [0u8; CONNECT_DATA_LEN];
        b[0..16].copy_from_slice(&self.host_id.0);
        put_u16(&mut b, 16, self.cntlid);
        b[256..512].copy_from_slice(&self.subnqn.to_field());
        b[512..768].copy_from_slice(&self.hostnqn.to_field());
        b
    }

    /// Decodes Connect data.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 1024 bytes; [`NvmeError::InvalidNqn`]
    /// if either NQN field does not hold a valid NQN.
    pub fn decode(b: &[u8]) -> Result<ConnectData, NvmeError> {
        super::check_len("Connect data", b, CONNECT_DATA_LEN)?;
        Ok(ConnectData {
            host_id: HostId(get_array(b, 0)),
            cntlid: get_u16(b, 16),
            subnqn: Nqn::from_field(&b[256..512])?,
            hostnqn: Nqn::from_field(&b[512..768])?,
        })
    }
}

/// The 128-bit host identifier (HOSTID) a host presents in every Connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HostId(pub [u8; 16]);

/// An NVMe Qualified Name: UTF-8, at most 223 bytes, starting with `"nqn."`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nqn(String);

impl Nqn {
    /// Longest NQN, in bytes.
    pub const MAX_LEN: usize = 223;
    /// The well-known NQN of a discovery subsystem.
    pub const DISCOVERY: &'static str = "nqn.2014-08.org.nvmexpress.discovery";

    /// Checks and wraps an NQN.
    ///
    /// # Errors
    /// [`NvmeError::InvalidNqn`] if it is empty, longer than 223 bytes, does
    /// not start with `"nqn."` or contains a NUL.
    pub fn new(name: impl Into<String>) -> Result<Nqn, NvmeError> {
        let name = name.into();
        let reason = if name.is_empty() {
            "empty".to_string()
        } else if name.len() > Nqn::MAX_LEN {
            format!("{} bytes, at most {}", name.len(), Nqn::MAX_LEN)
        } else if !name.starts_with("nqn.") {
            format!("{name:?} does not start with \"nqn.\"")
        } else if name.contains('\0') {
            "contains a NUL byte".to_string()
        } else {
            return Ok(Nqn(name));
        };
        Err(NvmeError::InvalidNqn { reason })
    }

    /// The discovery subsystem's NQN.
    pub fn discovery() -> Nqn {
        Nqn(Nqn::DISCOVERY.to_string())
    }

    /// Whether this is the discovery subsystem's NQN.
    pub fn is_discovery(&self) -> bool {
        self.0 == Nqn::DISCOVERY
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 256-byte, NUL-padded field that carries the NQN on the wire.
    pub fn to_field(&self) -> [u8; NQN_FIELD_LEN] {
        let mut b = [0u8; NQN_FIELD_LEN];
        // `new` capped the length at 223, so it fits with room for the NUL.
        b[..self.0.len()].copy_from_slice(self.0.as_bytes());
        b
    }

    /// Reads a NUL-terminated NQN field. Bytes after the terminator are
    /// ignored.
    ///
    /// # Errors
    /// [`NvmeError::InvalidNqn`] if there is no NUL, the name is not UTF-8 or
    /// it breaks the rules of [`Nqn::new`].
    pub fn from_field(field: &[u8]) -> Result<Nqn, NvmeError> {
        let end = field
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| NvmeError::InvalidNqn {
                reason: "not NUL-terminated".into(),
            })?;
        let name = std::str::from_utf8(&field[..end]).map_err(|e| NvmeError::InvalidNqn {
            reason: format!("not UTF-8 ({e})"),
        })?;
        Nqn::new(name)
    }
}

impl fmt::Display for Nqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Nqn {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Nqn {
    type Err = NvmeError;

    fn from_str(s: &str) -> Result<Nqn, NvmeError> {
        Nqn::new(s)
    }
}

impl TryFrom<String> for Nqn {
    type Error = NvmeError;

    fn try_from(s: String) -> Result<Nqn, NvmeError> {
        Nqn::new(s)
    }
}

/// DW0 of a successful Connect's completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ConnectResponse {
    /// Controller identifier allocated (bits 15:0).
    pub cntlid: u16,
    /// Authentication requirements (AUTHREQ, bits 31:16); 0 when none.
    pub authreq: u16,
}

impl ConnectResponse {
    /// AUTHREQ bit 1 (DW0 bit 17): authentication transaction required.
    pub const AUTHREQ_ATR: u16 = 1 << 1;
    /// AUTHREQ bit 2 (DW0 bit 18): secure channel concatenation required.
    pub const AUTHREQ_ASCR: u16 = 1 << 2;

    /// A response allocating controller `cntlid`, no authentication.
    pub fn new(cntlid: u16) -> ConnectResponse {
        ConnectResponse { cntlid, authreq: 0 }
    }

    /// The completion's DW0.
    pub fn to_dw0(self) -> u32 {
        u32::from(self.cntlid) | u32::from(self.authreq) << 16
    }

    /// Reads a completion's DW0.
    pub fn from_dw0(dw0: u32) -> ConnectResponse {
        ConnectResponse {
            cntlid: dw0 as u16,
            authreq: (dw0 >> 16) as u16,
        }
    }
}

/// DW0 of a Connect completing with Connect Invalid Parameters: where the
/// offending field is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InvalidParameter {
    /// Byte offset of the field (IPO, bits 15:0).
    pub offset: u16,
    /// Whether the offset is into the Connect data (IATTR bit 0, DW0 bit 16)
    /// rather than the command.
    pub in_data: bool,
}

impl InvalidParameter {
    /// A field of the Connect command (see [`connect_offset`]).
    pub fn in_command(offset: u16) -> InvalidParameter {
        InvalidParameter { offset, in_data: false }
    }

    /// A field of the Connect data (see [`connect_data_offset`]).
    pub fn in_data(offset: u16) -> InvalidParameter {
        InvalidParameter { offset, in_data: true }
    }

    /// The completion's DW0.
    pub fn to_dw0(self) -> u32 {
        u32::from(self.offset) | u32::from(self.in_data) << 16
    }

    /// Reads a completion's DW0.
    pub fn from_dw0(dw0: u32) -> InvalidParameter {
        InvalidParameter {
            offset: dw0 as u16,
            in_data: dw0 & 1 << 16 != 0,
        }
    }
}

/// Size of a property (ATTRIB bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum PropertySize {
    /// 000b: 4 bytes.
    #[default]
    FourBytes = 0,
    /// 001b: 8 bytes.
    EightBytes = 1,
}

impl PropertySize {
    fn from_attrib(attrib: u8) -> Result<PropertySize, NvmeError> {
        match attrib & 0x7 {
            0 => Ok(PropertySize::FourBytes),
            1 => Ok(PropertySize::EightBytes),
            v => Err(NvmeError::Reserved {
                field: "property size (ATTRIB)",
                value: v.into(),
            }),
        }
    }
}

/// Property Get: read a controller property. ATTRIB is byte 40, OFST bytes
/// 44..48; the value comes back in DW0 (and DW1 for 8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PropertyGet {
    /// Property size.
    pub size: PropertySize,
    /// Property offset (see [`property`]).
    pub offset: u32,
}

impl PropertyGet {
    /// The Property Get command.
    pub fn to_sqe(&self, command_id: CommandId) -> Sqe {
        let mut sqe = Sqe::fabrics(command_id, FabricsCommandType::PropertyGet);
        sqe.cdw10 = self.size as u32;
        sqe.cdw11 = self.offset;
        sqe
    }

    /// Reads the fields of a Property Get command.
    ///
    /// # Errors
    /// [`NvmeError::WrongCommand`] or [`NvmeError::InvalidField`] unless the
    /// command is a Property Get; [`NvmeError::Reserved`] for a reserved size.
    pub fn from_sqe(sqe: &Sqe) -> Result<PropertyGet, NvmeError> {
        sqe.expect_fabrics(FabricsCommandType::PropertyGet, "Property Get")?;
        Ok(PropertyGet {
            size: PropertySize::from_attrib(sqe.cdw10 as u8)?,
            offset: sqe.cdw11,
        })
    }
}

/// Property Set: write a controller property. ATTRIB is byte 40, OFST bytes
/// 44..48, VALUE bytes 48..56.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PropertySet {
    /// Property size.
    pub size: PropertySize,
    /// Property offset (see [`property`]).
    pub offset: u32,
    /// Value; only the low 4 bytes count for a 4-byte property.
    pub value: u64,
}

impl PropertySet {
    /// The Property Set command.
    pub fn to_sqe(&self, command_id: CommandId) -> Sqe {
        let mut sqe = Sqe::fabrics(command_id, FabricsCommandType::PropertySet);
        sqe.cdw10 = self.size as u32;
        sqe.cdw11 = self.offset;
        sqe.cdw12 = self.value as u32;
        sqe.cdw13 = (self.value >> 32) as u32;
        sqe
    }

    /// Reads the fields of a Property Set command.
    ///
    /// # Errors
    /// [`NvmeError::WrongCommand`] or [`NvmeError::InvalidField`] unless the
    /// command is a Property Set; [`NvmeError::Reserved`] for a reserved size.
    pub fn from_sqe(sqe: &Sqe) -> Result<PropertySet, NvmeError> {
        sqe.expect_fabrics(FabricsCommandType::PropertySet, "Property Set")?;
        Ok(PropertySet {
            size: PropertySize::from_attrib(sqe.cdw10 as u8)?,
            offset: sqe.cdw11,
            value: u64::from(sqe.cdw13) << 32 | u64::from(sqe.cdw12),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn nqn(s: &str) -> Nqn {
        Nqn::new(s).unwrap()
    }

    #[test]
    fn connect_layout_matches_spec() {
        let connect = Connect {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: Connect::CATTR_DISABLE_SQ_FLOW_CONTROL,
            kato: 0,
        };
        let sgl = Sgl::DataBlockOffset {
            offset: 0,
            len: CONNECT_DATA_LEN as u32,
        };
        let mut admin = Connect::new(0, 32, 120_000).unwrap();
        admin.recfmt = 0x0102;
        let b = admin.to_sqe(CommandId(9), &sgl).unwrap().encode();
        assert_eq!(b[0], 0x7f, "opcode 7Fh");
        assert_eq!(&b[2..4], &[9, 0]);
        assert_eq!(b[4], 0x01, "FCTYPE at byte 4");
        assert_eq!(&b[5..8], &[0, 0, 0]);
        assert_eq!(b[39], 0x01, "SGL identifier");
        assert_eq!(&b[40..42], &[0x02, 0x01], "RECFMT at 40");
        assert_eq!(&b[42..44], &[0, 0], "QID at 42");
        assert_eq!(&b[44..46], &[31, 0], "SQSIZE at 44, 0-based");
        assert_eq!(&b[48..52], &120_000u32.to_le_bytes(), "KATO at 48");
        let b = connect.to_sqe(CommandId(1), &sgl).unwrap().encode();
        assert_eq!(&b[42..44], &[3, 0]);
        assert_eq!(&b[44..46], &[127, 0]);
        assert_eq!(b[46], 0x04, "CATTR at 46");
        let back = Connect::from_sqe(&Sqe::decode(&b).unwrap()).unwrap();
        assert_eq!(back, connect);
        assert_eq!(back.queue_size(), 128);
        assert!(back.sq_flow_control_disabled());
        assert_eq!(connect_offset::SQSIZE, 44);
    }

    #[test]
    fn connect_rejects_other_commands() {
        let read = Sqe::read(CommandId(1), Nsid(1), 0, 1).unwrap();
        assert!(matches!(
            Connect::from_sqe(&read),
            Err(NvmeError::WrongCommand { opcode: 0x02, .. })
        ));
        let get = PropertyGet {
            size: PropertySize::FourBytes,
            offset: property::CSTS,
        }
        .to_sqe(CommandId(1));
        assert!(matches!(
            Connect::from_sqe(&get),
            Err(NvmeError::InvalidField { field: "FCTYPE", .. })
        ));
        let mut unknown = Sqe::fabrics(CommandId(1), FabricsCommandType::Connect);
        unknown.nsid = Nsid(0x7e);
        assert_eq!(
            unknown.fabrics_command_type(),
            Err(NvmeError::Unknown {
                field: "fabrics command type",
                value: 0x7e
            })
        );
        assert!(Connect::new(1, 0, 0).is_err());
        assert!(Connect::new(1, 65537, 0).is_err());
        assert_eq!(Connect::new(1, 65536, 0).unwrap().sqsize, 0xffff);
    }

    #[test]
    fn connect_data_layout_matches_spec() {
        let data = ConnectData {
            host_id: HostId([0xab; 16]),
            cntlid: ConnectData::CNTLID_DYNAMIC,
            subnqn: nqn("nqn.2024-01.io.chanio:sub"),
            hostnqn: nqn("nqn.2014-08.org.nvmexpress:uuid:0000"),
        };
        let b = data.encode();
        assert_eq!(&b[0..16], &[0xab; 16], "HOSTID at 0");
        assert_eq!(&b[16..18], &[0xff, 0xff], "CNTLID at 16");
        assert_eq!(&b[256..281], b"nqn.2024-01.io.chanio:sub", "SUBNQN at 256");
        assert_eq!(b[281], 0);
        assert_eq!(&b[512..516], b"nqn.", "HOSTNQN at 512");
        assert_eq!(ConnectData::decode(&b), Ok(data));
        assert!(ConnectData::decode(&b[..1023]).is_err());
        let mut bad = b;
        bad[256..260].copy_from_slice(b"xqn.");
        assert!(matches!(ConnectData::decode(&bad), Err(NvmeError::InvalidNqn { .. })));
        let mut empty = b;
        empty[512] = 0;
        assert!(ConnectData::decode(&empty).is_err());
    }

    #[test]
    fn nqn_rules() {
        assert!(Nqn::new("").is_err());
        assert!(Nqn::new("iqn.2001-04.com.example").is_err());
        assert!(Nqn::new("nqn.a\0b").is_err());
        let longest = format!("nqn.{}", "x".repeat(Nqn::MAX_LEN - 4));
        assert!(Nqn::new(longest.clone()).is_ok());
        let e = Nqn::new(format!("{longest}x")).unwrap_err();
        assert_eq!(e.to_string(), "invalid NQN: 224 bytes, at most 223");
        assert!(Nqn::discovery().is_discovery());
        assert_eq!("nqn.x".parse::<Nqn>().unwrap().as_str(), "nqn.x");
        // Fields: NUL-terminated UTF-8.
        assert!(Nqn::from_field(&[b'n'; 256]).is_err());
        let mut field = [0u8; 256];
        field[..6].copy_from_slice(b"nqn.\xff\xfe");
        assert!(matches!(Nqn::from_field(&field), Err(NvmeError::InvalidNqn { .. })));
        let utf8 = nqn("nqn.2024-01.example:é");
        assert_eq!(Nqn::from_field(&utf8.to_field()), Ok(utf8));
    }

    #[test]
    fn connect_response_dw0() {
        assert_eq!(ConnectResponse::new(0x1234).to_dw0(), 0x1234);
        let r = ConnectResponse {
            cntlid: 7,
            authreq: ConnectResponse::AUTHREQ_ATR,
        };
        assert_eq!(r.to_dw0(), 7 | 1 << 17);
        assert_eq!(ConnectResponse::from_dw0(r.to_dw0()), r);
        let ipo = InvalidParameter::in_data(connect_data_offset::HOSTNQN);
        assert_eq!(ipo.to_dw0(), 1 << 16 | 512);
        assert_eq!(InvalidParameter::from_dw0(ipo.to_dw0()), ipo);
        assert_eq!(InvalidParameter::in_command(connect_offset::SQSIZE).to_dw0(), 44);
    }

    #[test]
    fn property_layouts_match_spec() {
        let get = PropertyGet {
            size: PropertySize::EightBytes,
            offset: property::CAP,
        };
        let b = get.to_sqe(CommandId(2)).encode();
        assert_eq!((b[0], b[4], b[40]), (0x7f, 0x04, 1));
        assert_eq!(&b[44..48], &[0, 0, 0, 0]);
        assert_eq!(PropertyGet::from_sqe(&Sqe::decode(&b).unwrap()), Ok(get));
        let set = PropertySet {
            size: PropertySize::FourBytes,
            offset: property::CC,
            value: 0x0046_0001,
        };
        let b = set.to_sqe(CommandId(3)).encode();
        assert_eq!((b[4], b[40]), (0x00, 0));
        assert_eq!(&b[44..48], &0x14u32.to_le_bytes(), "OFST at 44");
        assert_eq!(&b[48..56], &0x0046_0001u64.to_le_bytes(), "VALUE at 48");
        assert_eq!(PropertySet::from_sqe(&Sqe::decode(&b).unwrap()), Ok(set));
        let mut reserved = set.to_sqe(CommandId(3));
        reserved.cdw10 = 2;
        assert!(matches!(
            PropertySet::from_sqe(&reserved),
            Err(NvmeError::Reserved { .. })
        ));
    }

    proptest! {
        #[test]
        fn connect_round_trip(recfmt: u16, qid: u16, sqsize: u16, cattr: u8, kato: u32) {
            let c = Connect { recfmt, qid, sqsize, cattr, kato };
            let sgl = Sgl::KeyedDataBlock { addr: 0, len: 1024, key: 1 };
            let sqe = Sqe::decode(&c.to_sqe(CommandId(1), &sgl).unwrap().encode()).unwrap();
            prop_assert_eq!(Connect::from_sqe(&sqe), Ok(c));
            prop_assert_eq!(sqe.sgl(), Ok(sgl));
        }

        #[test]
        fn connect_data_round_trip(host in proptest::array::uniform16(any::<u8>()), cntlid: u16,
                                   sub in "nqn\\.[ -~]{0,219}", host_nqn in "nqn\\.[a-z0-9:.-]{1,100}") {
            let data = ConnectData { host_id: HostId(host), cntlid, subnqn: nqn(&sub), hostnqn: nqn(&host_nqn) };
            prop_assert_eq!(ConnectData::decode(&data.encode()), Ok(data));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 1024..=1024),
                                cdw: u32, fctype: u8) {
            let _ = ConnectData::decode(&bytes);
            let _ = Nqn::from_field(&bytes[..256]);
            let mut sqe = Sqe::fabrics(CommandId(1), FabricsCommandType::Connect);
            sqe.nsid = Nsid(fctype.into());
            sqe.cdw10 = cdw;
            let _ = Connect::from_sqe(&sqe);
            let _ = PropertyGet::from_sqe(&sqe);
            let _ = PropertySet::from_sqe(&sqe);
        }

        #[test]
        fn short_connect_data_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = ConnectData::decode(&bytes);
            let _ = Nqn::from_field(&bytes);
        }
    }
}
