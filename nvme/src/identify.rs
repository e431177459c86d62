//! Identify command and its data structures (NVMe Base 2.0 §5.17, NVM
//! Command Set 2.0 §4.1.5).
//!
//! The Identify command names what it returns in CDW10 bits 7:0 (CNS); each
//! structure is 4096 bytes:
//!
//! | CNS | structure                          | type                   |
//! |-----|------------------------------------|------------------------|
//! | 00h | Identify Namespace (NVM)           | [`IdentifyNamespace`]  |
//! | 01h | Identify Controller                | [`IdentifyController`] |
//! | 02h | Active Namespace ID list           | [`NamespaceList`]      |

use std::fmt;

use super::command::{AdminOpcode, Sqe};
use super::fabrics::{Nqn, NQN_FIELD_LEN};
use super::{
    get_array, get_u128, get_u16, get_u32, get_u64, put_u128, put_u16, put_u32, put_u64, CommandId, Nsid, NvmeError,
};

/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

/// Controller or Namespace Structure (CNS): which Identify data to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cns {
    /// 00h Identify Namespace for the NSID (NVM command set).
    Namespace = 0x00,
    /// 01h Identify Controller.
    Controller = 0x01,
    /// 02h Active Namespace ID list: active NSIDs greater than the NSID.
    ActiveNamespaceList = 0x02,
    /// 03h Namespace Identification Descriptor list.
    NamespaceDescriptors = 0x03,
    /// 04h NVM Set list.
    NvmSetList = 0x04,
    /// 05h I/O command set specific Identify Namespace.
    IoCommandSetNamespace = 0x05,
    /// 06h I/O command set specific Identify Controller.
    IoCommandSetController = 0x06,
    /// 07h Active Namespace ID list for an I/O command set.
    IoCommandSetActiveNamespaceList = 0x07,
    /// 08h I/O command set independent Identify Namespace.
    IndependentNamespace = 0x08,
    /// 10h Allocated Namespace ID list.
    AllocatedNamespaceList = 0x10,
    /// 11h Identify Namespace for an allocated NSID.
    AllocatedNamespace = 0x11,
    /// 12h Controllers attached to the NSID.
    NamespaceControllerList = 0x12,
    /// 13h Controllers in the NVM subsystem.
    ControllerList = 0x13,
}

impl Cns {
    /// The CNS with this value, or `None` for one this module does not know.
    pub fn from_u8(v: u8) -> Option<Cns> {
        Some(match v {
            0x00 => Cns::Namespace,
            0x01 => Cns::Controller,
            0x02 => Cns::ActiveNamespaceList,
            0x03 => Cns::NamespaceDescriptors,
            0x04 => Cns::NvmSetList,
            0x05 => Cns::IoCommandSetNamespace,
            0x06 => Cns::IoCommandSetController,
            0x07 => Cns::IoCommandSetActiveNamespaceList,
            0x08 => Cns::IndependentNamespace,
            0x10 => Cns::AllocatedNamespaceList,
            0x11 => Cns::AllocatedNamespace,
            0x12 => Cns::NamespaceControllerList,
            0x13 => Cns::ControllerList,
            _ => return None,
        })
    }
}

impl From<Cns> for u8 {
    fn from(cns: Cns) -> u8 {
        cns as u8
    }
}

impl Sqe {
    /// An Identify command for `cns` about `nsid` (the data pointer is left
    /// for the caller).
    pub fn identify(command_id: CommandId, cns: Cns, nsid: Nsid) -> Sqe {
        Sqe {
            nsid,
            cdw10: u32::from(u8::from(cns)),
            ..Sqe::new(AdminOpcode::Identify.into(), command_id)
        }
    }

    /// The CNS of an Identify command (CDW10 bits 7:0).
    ///
    /// # Errors
    /// [`NvmeError::Unknown`] for a CNS this module does not know.
    pub fn identify_cns(&self) -> Result<Cns, NvmeError> {
        let v = self.cdw10 as u8;
        Cns::from_u8(v).ok_or(NvmeError::Unknown {
            field: "CNS",
            value: v.into(),
        })
    }

    /// The controller identifier of an Identify command (CDW10 bits 31:16).
    pub fn identify_cntid(&self) -> u16 {
        (self.cdw10 >> 16) as u16
    }
}

/// A fixed-size ASCII field padded with spaces (serial number, model,
/// firmware revision).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AsciiField<const N: usize>(pub [u8; N]);

impl<const N: usize> AsciiField<N> {
    /// Pads `text` with spaces to `N` bytes.
    ///
    /// # Errors
    /// [`NvmeError::InvalidField`] if `text` is longer than `N` bytes or has
    /// characters outside printable ASCII.
    pub fn new(text: &str) -> Result<AsciiField<N>, NvmeError> {
        if text.len() > N {
            return Err(NvmeError::InvalidField {
                field: "ASCII field",
                reason: format!("{:?} is {} bytes, at most {N}", text, text.len()),
            });
        }
        if let Some(c) = text.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(NvmeError::InvalidField {
                field: "ASCII field",
                reason: format!("{c:?} is not printable ASCII"),
            });
        }
        let mut b = [b' '; N];
        b[..text.len()].copy_from_slice(text.as_bytes());
        Ok(AsciiField(b))
    }

    /// The text with trailing spaces and NULs removed. Bytes outside
    /// printable ASCII (a peer may send anything) show as U+FFFD.
    pub fn text(&self) -> String {
        let end = self.0.iter().rposition(|&c| c != b' ' && c != 0).map_or(0, |i| i + 1);
        self.0[..end]
            .iter()
            .map(|&c| {
                if (0x20..0x7f).contains(&c) {
                    c as char
                } else {
                    '\u{fffd}'
                }
            })
            .collect()
    }
}

impl<const N: usize> Default for AsciiField<N> {
    fn default() -> AsciiField<N> {
        AsciiField([b' '; N])
    }
}

impl<const N: usize> fmt::Debug for AsciiField<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text())
    }
}

impl<const N: usize> fmt::Display for AsciiField<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Identify Controller data (CNS 01h). Fields this crate has no use for are
/// written as zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct IdentifyController {
    /// PCI Vendor ID (bytes 0..2).
    pub vid: u16,
    /// PCI Subsystem Vendor ID (bytes 2..4).
    pub ssvid: u16,
    /// Serial Number (bytes 4..24).
    pub sn: AsciiField<20>,
    /// Model Number (bytes 24..64).
    pub mn: AsciiField<40>,
    /// Firmware Revision (bytes 64..72).
    pub fr: AsciiField<8>,
    /// Recommended Arbitration Burst (byte 72).
    pub rab: u8,
    /// IEEE OUI Identifier (bytes 73..76).
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities (byte 76).
    pub cmic: u8,
    /// Maximum Data Transfer Size (byte 77): a power of two in units of the
    /// minimum memory page size; 0 for no limit.
    pub mdts: u8,
    /// Controller ID (bytes 78..80).
    pub cntlid: u16,
    /// Version (bytes 80..84): see [`IdentifyController::version`].
    pub ver: u32,
    /// RTD3 Resume Latency in microseconds (bytes 84..88).
    pub rtd3r: u32,
    /// RTD3 Entry Latency in microseconds (bytes 88..92).
    pub rtd3e: u32,
    /// Optional Asynchronous Events Supported (bytes 92..96).
    pub oaes: u32,
    /// Controller Attributes (bytes 96..100).
    pub ctratt: u32,
    /// Controller Type (byte 111): 1 I/O, 2 discovery, 3 administrative.
    pub cntrltype: u8,
    /// Optional Admin Command Support (bytes 256..258).
    pub oacs: u16,
    /// Abort Command Limit, 0-based (byte 258).
    pub acl: u8,
    /// Asynchronous Event Request Limit, 0-based (byte 259).
    pub aerl: u8,
    /// Firmware Updates (byte 260).
    pub frmw: u8,
    /// Log Page Attributes (byte 261).
    pub lpa: u8,
    /// Error Log Page Entries, 0-based (byte 262).
    pub elpe: u8,
    /// Number of Power States Support, 0-based (byte 263).
    pub npss: u8,
    /// Keep Alive Support (bytes 320..322): granularity in 100 ms units; 0
    /// when Keep Alive is not supported.
    pub kas: u16,
    /// Submission Queue Entry Size (byte 512): maximum in bits 7:4, required
    /// in bits 3:0, each log2 of bytes (66h for 64-byte entries).
    pub sqes: u8,
    /// Completion Queue Entry Size (byte 513), as SQES (44h for 16 bytes).
    pub cqes: u8,
    /// Maximum Outstanding Commands (bytes 514..516).
    pub maxcmd: u16,
    /// Number of Namespaces: the largest NSID (bytes 516..520).
    pub nn: u32,
    /// Optional NVM Command Support (bytes 520..522).
    pub oncs: u16,
    /// Fused Operation Support (bytes 522..524).
    pub fuses: u16,
    /// Format NVM Attributes (byte 524).
    pub fna: u8,
    /// Volatile Write Cache (byte 525).
    pub vwc: u8,
    /// Atomic Write Unit Normal, 0-based blocks (bytes 526..528).
    pub awun: u16,
    /// Atomic Write Unit Power Fail, 0-based blocks (bytes 528..530).
    pub awupf: u16,
    /// Atomic Compare & Write Unit (bytes 532..534).
    pub acwu: u16,
    /// SGL Support (bytes 536..540).
    pub sgls: u32,
    /// Maximum Number of Allowed Namespaces (bytes 540..544).
    pub mnan: u32,
    /// NVM Subsystem NVMe Qualified Name (bytes 768..1024); `None` when the
    /// field is empty.
    pub subnqn: Option<Nqn>,
    /// I/O Queue Command Capsule Supported Size in 16-byte units (bytes
    /// 1792..1796; fabrics).
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size in 16-byte units (bytes
    /// 1796..1800; fabrics).
    pub iorcsz: u32,
    /// In Capsule Data Offset in 16-byte units (bytes 1800..1802; fabrics).
    pub icdoff: u16,
    /// Fabrics Controller Attributes (byte 1802): bit 0 set for the static
    /// controller model.
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors (byte 1803; fabrics); 0 for no limit.
    pub msdbd: u8,
    /// Optional Fabric Commands Support (bytes 1804..1806).
    pub ofcs: u16,
}

impl IdentifyController {
    /// ONCS bit 0: Compare.
    pub const ONCS_COMPARE: u16 = 1 << 0;
    /// ONCS bit 2: Dataset Management.
    pub const ONCS_DATASET_MANAGEMENT: u16 = 1 << 2;
    /// ONCS bit 3: Write Zeroes.
    pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
    /// ONCS bit 4: the Save field of Set Features and the Select field of Get
    /// Features.
    pub const ONCS_SAVE_SELECT: u16 = 1 << 4;
    /// VWC bit 0: a volatile write cache is present.
    pub const VWC_PRESENT: u8 = 1 << 0;
    /// SGLS bits 1:0 = 01b: SGLs supported, no alignment requirement.
    pub const SGLS_SUPPORTED: u32 = 0x1;
    /// SGLS bit 2: Keyed SGL Data Block descriptors.
    pub const SGLS_KEYED: u32 = 1 << 2;
    /// SGLS bit 20: SGL offsets (in-capsule data).
    pub const SGLS_OFFSET: u32 = 1 << 20;
    /// LPA bit 2: extended data for Get Log Page (NUMDU, offsets).
    pub const LPA_EXTENDED_DATA: u8 = 1 << 2;
    /// OAES bit 8: Namespace Attribute Notices.
    pub const OAES_NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    /// CTRATT bit 0: 128-bit host identifiers.
    pub const CTRATT_HOST_ID_128: u32 = 1 << 0;
    /// CNTRLTYPE 1h: I/O controller.
    pub const CNTRLTYPE_IO: u8 = 1;
    /// CNTRLTYPE 2h: discovery controller.
    pub const CNTRLTYPE_DISCOVERY: u8 = 2;

    /// The VER encoding of a specification version: major in bits 31:16,
    /// minor in 15:8, tertiary in 7:0 (2.0.0 is 00020000h).
    pub fn version(major: u16, minor: u8, tertiary: u8) -> u32 {
        u32::from(major) << 16 | u32::from(minor) << 8 | u32::from(tertiary)
    }

    /// Encodes as 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        put_u16(&mut b, 0, self.vid);
        put_u16(&mut b, 2, self.ssvid);
        b[4..24].copy_from_slice(&self.sn.0);
        b[24..64].copy_from_slice(&self.mn.0);
        b[64..72].copy_from_slice(&self.fr.0);
        b[72] = self.rab;
        b[73..76].copy_from_slice(&self.ieee);
        b[76] = self.cmic;
        b[77] = self.mdts;
        put_u16(&mut b, 78, self.cntlid);
        put_u32(&mut b, 80, self.ver);
        put_u32(&mut b, 84, self.rtd3r);
        put_u32(&mut b, 88, self.rtd3e);
        put_u32(&mut b, 92, self.oaes);
        put_u32(&mut b, 96, self.ctratt);
        b[111] = self.cntrltype;
        put_u16(&mut b, 256, self.oacs);
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        b[263] = self.npss;
        put_u16(&mut b, 320, self.kas);
        b[512] = self.sqes;
        b[513] = self.cqes;
        put_u16(&mut b, 514, self.maxcmd);
        put_u32(&mut b, 516, self.nn);
        put_u16(&mut b, 520, self.oncs);
        put_u16(&mut b, 522, self.fuses);
        b[524] = self.fna;
        b[525] = self.vwc;
        put_u16(&mut b, 526, self.awun);
        put_u16(&mut b, 528, self.awupf);
        put_u16(&mut b, 532, self.acwu);
        put_u32(&mut b, 536, self.sgls);
        put_u32(&mut b, 540, self.mnan);
        if let Some(nqn) = &self.subnqn {
            b[768..768 + NQN_FIELD_LEN].copy_from_slice(&nqn.to_field());
        }
        put_u32(&mut b, 1792, self.ioccsz);
        put_u32(&mut b, 1796, self.iorcsz);
        put_u16(&mut b, 1800, self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        put_u16(&mut b, 1804, self.ofcs);
        b
    }

    /// Decodes Identify Controller data.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 4096 bytes; [`NvmeError::InvalidNqn`]
    /// if SUBNQN is set but not a valid NQN.
    pub fn decode(b: &[u8]) -> Result<IdentifyController, NvmeError> {
        super::check_len("Identify Controller data", b, IDENTIFY_LEN)?;
        let subnqn_field = &b[768..768 + NQN_FIELD_LEN];
        let subnqn = if subnqn_field[0] == 0 {
            None
        } else {
            Some(Nqn::from_field(subnqn_field)?)
        };
        Ok(IdentifyController {
            vid: get_u16(b, 0),
            ssvid: get_u16(b, 2),
            sn: AsciiField(get_array(b, 4)),
            mn: AsciiField(get_array(b, 24)),
            fr: AsciiField(get_array(b, 64)),
            rab: b[72],
            ieee: get_array(b, 73),
            cmic: b[76],
            mdts: b[77],
            cntlid: get_u16(b, 78),
            ver: get_u32(b, 80),
            rtd3r: get_u32(b, 84),
            rtd3e: get_u32(b, 88),
            oaes: get_u32(b, 92),
            ctratt: get_u32(b, 96),
            cntrltype: b[111],
            oacs: get_u16(b, 256),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            npss: b[263],
            kas: get_u16(b, 320),
            sqes: b[512],
            cqes: b[513],
            maxcmd: get_u16(b, 514),
            nn: get_u32(b, 516),
            oncs: get_u16(b, 520),
            fuses: get_u16(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: get_u16(b, 526),
            awupf: get_u16(b, 528),
            acwu: get_u16(b, 532),
            sgls: get_u32(b, 536),
            mnan: get_u32(b, 540),
            subnqn,
            ioccsz: get_u32(b, 1792),
            iorcsz: get_u32(b, 1796),
            icdoff: get_u16(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
            ofcs: get_u16(b, 1804),
        })
    }
}

/// One LBA Format descriptor of Identify Namespace (4 bytes: MS bits 15:0,
/// LBADS bits 23:16, RP bits 25:24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LbaFormat {
    /// Metadata Size: metadata bytes per logical block.
    pub ms: u16,
    /// LBA Data Size: log2 of the block size in bytes (9 for 512).
    pub lbads: u8,
    /// Relative Performance (2 bits): 0 best, 3 degraded.
    pub rp: u8,
}

impl LbaFormat {
    /// Smallest LBADS the specification allows (512-byte blocks).
    pub const MIN_LBADS: u8 = 9;

    /// A format of `block_size`-byte blocks without metadata.
    ///
    /// # Errors
    /// [`NvmeError::InvalidField`] unless `block_size` is a power of two of
    /// at least 512 (512 and 4096 are the usual ones).
    pub fn with_block_size(block_size: u32) -> Result<LbaFormat, NvmeError> {
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(NvmeError::InvalidField {
                field: "block size",
                reason: format!("{block_size} is not a power of two of at least 512"),
            });
        }
        Ok(LbaFormat {
            ms: 0,
            lbads: block_size.trailing_zeros() as u8,
            rp: 0,
        })
    }

    /// Block size in bytes.
    ///
    /// # Errors
    /// [`NvmeError::OutOfRange`] if LBADS is below 9 or too large for a u32.
    pub fn block_size(&self) -> Result<u32, NvmeError> {
        if (LbaFormat::MIN_LBADS..32).contains(&self.lbads) {
            Ok(1 << self.lbads)
        } else {
            Err(NvmeError::OutOfRange {
                field: "LBADS",
                value: self.lbads.into(),
                min: LbaFormat::MIN_LBADS.into(),
                max: 31,
            })
        }
    }

    /// The 4-byte descriptor as a dword.
    pub fn to_dword(self) -> u32 {
        u32::from(self.ms) | u32::from(self.lbads) << 16 | u32::from(self.rp & 0x3) << 24
    }

    /// Reads a descriptor dword (reserved bits 31:26 ignored).
    pub fn from_dword(v: u32) -> LbaFormat {
        LbaFormat {
            ms: v as u16,
            lbads: (v >> 16) as u8,
            rp: ((v >> 24) & 0x3) as u8,
        }
    }
}

/// Identify Namespace data for the NVM command set (CNS 00h).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct IdentifyNamespace {
    /// Namespace Size in logical blocks (bytes 0..8).
    pub nsze: u64,
    /// Namespace Capacity in logical blocks (bytes 8..16).
    pub ncap: u64,
    /// Namespace Utilization in logical blocks (bytes 16..24).
    pub nuse: u64,
    /// Namespace Features (byte 24): bit 0 thin provisioning, bit 2
    /// deallocated-block errors, bit 4 optimal I/O fields valid.
    pub nsfeat: u8,
    /// Formatted LBA Size (byte 26): format index in bits 3:0 (low) and 6:5
    /// (high), metadata at the end of each block in bit 4.
    pub flbas: u8,
    /// Metadata Capabilities (byte 27).
    pub mc: u8,
    /// End-to-end Data Protection Capabilities (byte 28).
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings (byte 29).
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities (byte 30).
    pub nmic: u8,
    /// Reservation Capabilities (byte 31).
    pub rescap: u8,
    /// Deallocate Logical Block Features (byte 33): bits 2:0 what reading a
    /// deallocated block returns (001b zeroes), bit 3 Write Zeroes may
    /// deallocate.
    pub dlfeat: u8,
    /// Namespace Atomic Write Unit Normal, 0-based (bytes 34..36).
    pub nawun: u16,
    /// Namespace Atomic Write Unit Power Fail, 0-based (bytes 36..38).
    pub nawupf: u16,
    /// Namespace Optimal I/O Boundary in blocks (bytes 46..48).
    pub noiob: u16,
    /// NVM Capacity in bytes (bytes 48..64).
    pub nvmcap: u128,
    /// Namespace Preferred Write Granularity, 0-based (bytes 64..66).
    pub npwg: u16,
    /// Namespace Preferred Write Alignment, 0-based (bytes 66..68).
    pub npwa: u16,
    /// Namespace Preferred Deallocate Granularity, 0-based (bytes 68..70).
    pub npdg: u16,
    /// Namespace Preferred Deallocate Alignment, 0-based (bytes 70..72).
    pub npda: u16,
    /// Namespace Optimal Write Size, 0-based (bytes 72..74).
    pub nows: u16,
    /// ANA Group Identifier (bytes 92..96).
    pub anagrpid: u32,
    /// Namespace Attributes (byte 99): bit 0 write protected.
    pub nsattr: u8,
    /// Namespace Globally Unique Identifier (bytes 104..120).
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (bytes 120..128).
    pub eui64: [u8; 8],
    /// LBA formats (bytes 128.., 4 bytes each); NLBAF (byte 25) is their
    /// number less one. Between 1 and 64 entries: [`IdentifyNamespace::encode`]
    /// writes at most 64, and a zero format when the list is empty.
    pub lba_formats: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    /// Most LBA formats a namespace can report.
    pub const MAX_LBA_FORMATS: usize = 64;
    /// DLFEAT bits 2:0 = 001b: deallocated blocks read as zeroes.
    pub const DLFEAT_READ_ZEROES: u8 = 0x1;
    /// DLFEAT bit 3: Write Zeroes may deallocate.
    pub const DLFEAT_WRITE_ZEROES_DEALLOCATES: u8 = 1 << 3;
    /// NSFEAT bit 0: thin provisioning.
    pub const NSFEAT_THIN_PROVISIONING: u8 = 1 << 0;

    /// A fully allocated namespace of `blocks` blocks of `block_size` bytes,
    /// formatted with its only LBA format.
    ///
    /// # Errors
    /// Those of [`LbaFormat::with_block_size`].
    pub fn new(blocks: u64, block_size: u32) -> Result<IdentifyNamespace, NvmeError> {
        Ok(IdentifyNamespace {
            nsze: blocks,
            ncap: blocks,
            nuse: blocks,
            lba_formats: vec![LbaFormat::with_block_size(block_size)?],
            ..IdentifyNamespace::default()
        })
    }

    /// Index of the LBA format in use (FLBAS bits 3:0, plus bits 6:5 as bits
    /// 5:4 of the index).
    pub fn formatted_lba_index(&self) -> usize {
        usize::from(self.flbas & 0xf) | usize::from((self.flbas >> 5) & 0x3) << 4
    }

    /// Sets FLBAS to use LBA format `index`, keeping bit 4.
    ///
    /// # Errors
    /// [`NvmeError::OutOfRange`] unless `index` names one of `lba_formats`.
    pub fn set_formatted_lba_index(&mut self, index: usize) -> Result<(), NvmeError> {
        if index >= self.lba_formats.len().min(IdentifyNamespace::MAX_LBA_FORMATS) {
            return Err(NvmeError::OutOfRange {
                field: "LBA format index",
                value: index as u64,
                min: 0,
                max: self.lba_formats.len().saturating_sub(1) as u64,
            });
        }
        self.flbas = (self.flbas & 0x10) | (index & 0xf) as u8 | ((index >> 4) as u8) << 5;
        Ok(())
    }

    /// The LBA format in use.
    ///
    /// # Errors
    /// [`NvmeError::OutOfRange`] if FLBAS names a format beyond the list.
    pub fn current_lba_format(&self) -> Result<LbaFormat, NvmeError> {
        let index = self.formatted_lba_index();
        self.lba_formats.get(index).copied().ok_or(NvmeError::OutOfRange {
            field: "FLBAS format index",
            value: index as u64,
            min: 0,
            max: self.lba_formats.len().saturating_sub(1) as u64,
        })
    }

    /// Block size of the format in use, in bytes.
    ///
    /// # Errors
    /// Those of [`IdentifyNamespace::current_lba_format`] and
    /// [`LbaFormat::block_size`].
    pub fn block_size(&self) -> Result<u32, NvmeError> {
        self.current_lba_format()?.block_size()
    }

    /// Namespace size in bytes (NSZE × block size).
    ///
    /// # Errors
    /// Those of [`IdentifyNamespace::block_size`]; [`NvmeError::OutOfRange`]
    /// if the product overflows a u64.
    pub fn size_bytes(&self) -> Result<u64, NvmeError> {
        let block = u64::from(self.block_size()?);
        self.nsze.checked_mul(block).ok_or(NvmeError::OutOfRange {
            field: "NSZE",
            value: self.nsze,
            min: 0,
            max: u64::MAX / block,
        })
    }

    /// Encodes as 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        put_u64(&mut b, 0, self.nsze);
        put_u64(&mut b, 8, self.ncap);
        put_u64(&mut b, 16, self.nuse);
        b[24] = self.nsfeat;
        let formats = &self.lba_formats[..self.lba_formats.len().min(IdentifyNamespace::MAX_LBA_FORMATS)];
        b[25] = formats.len().saturating_sub(1) as u8;
        b[26] = self.flbas;
        b[27] = self.mc;
        b[28] = self.dpc;
        b[29] = self.dps;
        b[30] = self.nmic;
        b[31] = self.rescap;
        b[33] = self.dlfeat;
        put_u16(&mut b, 34, self.nawun);
        put_u16(&mut b, 36, self.nawupf);
        put_u16(&mut b, 46, self.noiob);
        put_u128(&mut b, 48, self.nvmcap);
        put_u16(&mut b, 64, self.npwg);
        put_u16(&mut b, 66, self.npwa);
        put_u16(&mut b, 68, self.npdg);
        put_u16(&mut b, 70, self.npda);
        put_u16(&mut b, 72, self.nows);
        put_u32(&mut b, 92, self.anagrpid);
        b[99] = self.nsattr;
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        for (i, f) in formats.iter().enumerate() {
            put_u32(&mut b, 128 + 4 * i, f.to_dword());
        }
        b
    }

    /// Decodes Identify Namespace data.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 4096 bytes; [`NvmeError::OutOfRange`]
    /// if NLBAF reports more than 64 formats.
    pub fn decode(b: &[u8]) -> Result<IdentifyNamespace, NvmeError> {
        super::check_len("Identify Namespace data", b, IDENTIFY_LEN)?;
        let count = usize::from(b[25]) + 1;
        if count > IdentifyNamespace::MAX_LBA_FORMATS {
            return Err(NvmeError::OutOfRange {
                field: "NLBAF",
                value: u64::from(b[25]),
                min: 0,
                max: 63,
            });
        }
        Ok(IdentifyNamespace {
            nsze: get_u64(b, 0),
            ncap: get_u64(b, 8),
            nuse: get_u64(b, 16),
            nsfeat: b[24],
            flbas: b[26],
            mc: b[27],
            dpc: b[28],
            dps: b[29],
            nmic: b[30],
            rescap: b[31],
            dlfeat: b[33],
            nawun: get_u16(b, 34),
            nawupf: get_u16(b, 36),
            noiob: get_u16(b, 46),
            nvmcap: get_u128(b, 48),
            npwg: get_u16(b, 64),
            npwa: get_u16(b, 66),
            npdg: get_u16(b, 68),
            npda: get_u16(b, 70),
            nows: get_u16(b, 72),
            anagrpid: get_u32(b, 92),
            nsattr: b[99],
            nguid: get_array(b, 104),
            eui64: get_array(b, 120),
            lba_formats: (0..count)
                .map(|i| LbaFormat::from_dword(get_u32(b, 128 + 4 * i)))
                .collect(),
        })
    }
}

/// A list of up to 1024 namespace identifiers in increasing order, as the
/// Active Namespace ID list (CNS 02h) returns: 4096 bytes, unused entries
/// zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NamespaceList(Vec<Nsid>);

impl NamespaceList {
    /// Most entries a list holds.
    pub const MAX_ENTRIES: usize = 1024;

    /// Wraps a list after checking it.
    ///
    /// # Errors
    /// [`NvmeError::InvalidField`] if an entry is 0 or broadcast or the list
    /// is not strictly increasing; [`NvmeError::OutOfRange`] for more than
    /// 1024 entries.
    pub fn new(nsids: Vec<Nsid>) -> Result<NamespaceList, NvmeError> {
        if nsids.len() > NamespaceList::MAX_ENTRIES {
            return Err(NvmeError::OutOfRange {
                field: "namespace list length",
                value: nsids.len() as u64,
                min: 0,
                max: NamespaceList::MAX_ENTRIES as u64,
            });
        }
        if let Some(bad) = nsids.iter().find(|n| !n.is_valid()) {
            return Err(NvmeError::InvalidField {
                field: "namespace list",
                reason: format!("entry {:#x} is not a namespace", bad.0),
            });
        }
        if nsids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(NvmeError::InvalidField {
                field: "namespace list",
                reason: "entries are not in increasing order".into(),
            });
        }
        Ok(NamespaceList(nsids))
    }

    /// The answer to an Active Namespace ID list request: the first 1024
    /// valid identifiers in `active` greater than `after`, in order.
    pub fn active_after(active: impl IntoIterator<Item = Nsid>, after: Nsid) -> NamespaceList {
        let mut nsids: Vec<Nsid> = active.into_iter().filter(|n| n.is_valid() && *n > after).collect();
        nsids.sort_unstable();
        nsids.dedup();
        nsids.truncate(NamespaceList::MAX_ENTRIES);
        NamespaceList(nsids)
    }

    /// The identifiers.
    pub fn nsids(&self) -> &[Nsid] {
        &self.0
    }

    /// Encodes as 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode_nsids(&self.0)
    }

    /// Decodes a namespace list: entries up to the first zero, the rest zero.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 4096 bytes; [`NvmeError::InvalidField`]
    /// for a non-zero entry after a zero, a broadcast entry, or entries out of
    /// order.
    pub fn decode(b: &[u8]) -> Result<NamespaceList, NvmeError> {
        super::check_len("namespace list", b, IDENTIFY_LEN)?;
        NamespaceList::new(decode_nsids(b)?)
    }
}

/// Writes NSIDs as a 4096-byte, zero-filled list (at most 1024 entries).
pub(crate) fn encode_nsids(nsids: &[Nsid]) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    for (i, n) in nsids.iter().take(NamespaceList::MAX_ENTRIES).enumerate() {
        put_u32(&mut b, 4 * i, n.0);
    }
    b
}

/// Reads the entries of a zero-terminated 4096-byte NSID list; the caller
/// has checked the length.
pub(crate) fn decode_nsids(b: &[u8]) -> Result<Vec<Nsid>, NvmeError> {
    let all: Vec<u32> = b.chunks_exact(4).map(|c| get_u32(c, 0)).collect();
    let used = all.iter().position(|&n| n == 0).unwrap_or(all.len());
    if let Some(pos) = all[used..].iter().position(|&n| n != 0) {
        return Err(NvmeError::InvalidField {
            field: "namespace list",
            reason: format!("entry {} follows the terminating zero", used + pos),
        });
    }
    Ok(all[..used].iter().map(|&n| Nsid(n)).collect())
}

#[cfg(test)]
mod tests;
