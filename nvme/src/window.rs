//! Storage windows: vendor-specific I/O commands (NVM Command Set opcodes
//! 80h..FFh) with which a host asks an I/O unit to expose a range of a
//! namespace for one-sided RDMA under a steering tag (`docs/protocol.md`
//! §9.6).
//!
//! ```text
//! opcode  command        data         CDW10..CDW13
//!  82h    Window Open    C2H 48 bytes SLBA (10-11), blocks (12), access (13 bit 0: write)
//!  80h    Window Close   none         window ID (10)
//!  84h    Window Commit  none         window ID (10), SLBA (11-12), blocks (13)
//! ```
//!
//! Open answers with a [`WindowDescriptor`] (the window's ID, steering tag,
//! address and length); the host then reads and writes the window with
//! RDMA on the same queue's channel, and Commit makes written blocks
//! durable. The opcodes' low bits give the data direction, as the
//! specification has it for every opcode (00b none, 10b controller to
//! host).

use super::{get_u32, get_u64, put_u32, put_u64, CommandId, Nsid, NvmeError, Sqe, Status, StatusCodeType};

/// Window Close (no data).
pub const OPCODE_CLOSE: u8 = 0x80;
/// Window Open (a [`WindowDescriptor`] to the host).
pub const OPCODE_OPEN: u8 = 0x82;
/// Window Commit (no data).
pub const OPCODE_COMMIT: u8 = 0x84;

/// CDW13 of Open: bit 0 asks for write access (read access always comes).
const OPEN_WRITE: u32 = 1;

/// Statuses of the window commands beyond the generic ones (vendor
/// specific status code type 7h).
pub mod status {
    use super::{Status, StatusCodeType};

    /// The namespace's backend cannot be exposed (not in memory, not
    /// mappable).
    pub const NOT_WINDOWABLE: Status = Status::new(StatusCodeType::VENDOR_SPECIFIC, 0x01);
    /// The host holds as many windows as it may.
    pub const LIMIT_EXCEEDED: Status = Status::new(StatusCodeType::VENDOR_SPECIFIC, 0x02);
    /// No window of this host's with that ID (never opened, closed or
    /// revoked).
    pub const UNKNOWN_WINDOW: Status = Status::new(StatusCodeType::VENDOR_SPECIFIC, 0x03);
    /// A window that must be a cached extent (a file the device cannot
    /// register in place) is larger than a cached extent may be.
    pub const CACHE_LIMIT: Status = Status::new(StatusCodeType::VENDOR_SPECIFIC, 0x04);
    /// A window that must be a cached extent overlaps another one.
    pub const OVERLAPS: Status = Status::new(StatusCodeType::VENDOR_SPECIFIC, 0x05);
}

/// A window command, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowCommand {
    /// Expose `blocks` blocks from `slba` of the command's namespace.
    Open {
        /// First block.
        slba: u64,
        /// Number of blocks (not 0-based).
        blocks: u32,
        /// Whether the host may write.
        write: bool,
    },
    /// Revoke a window.
    Close {
        /// The window.
        id: u32,
    },
    /// Make `blocks` blocks from `slba` (namespace blocks, inside the
    /// window) durable.
    Commit {
        /// The window.
        id: u32,
        /// First block.
        slba: u64,
        /// Number of blocks (not 0-based).
        blocks: u32,
    },
}

impl WindowCommand {
    /// Whether `opcode` is one of the window commands.
    pub fn is_window_opcode(opcode: u8) -> bool {
        matches!(opcode, OPCODE_OPEN | OPCODE_CLOSE | OPCODE_COMMIT)
    }

    /// Decodes a window command; `None` when the opcode is another.
    ///
    /// # Errors
    /// [`NvmeError::Reserved`] for reserved bits set in CDW13 of Open.
    pub fn decode(sqe: &Sqe) -> Option<Result<WindowCommand, NvmeError>> {
        let slba = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
        Some(Ok(match sqe.opcode {
            OPCODE_OPEN if sqe.cdw13 & !OPEN_WRITE != 0 => {
                return Some(Err(NvmeError::Reserved {
                    field: "Window Open CDW13",
                    value: sqe.cdw13,
                }))
            }
            OPCODE_OPEN => WindowCommand::Open {
                slba: slba(sqe.cdw10, sqe.cdw11),
                blocks: sqe.cdw12,
                write: sqe.cdw13 & OPEN_WRITE != 0,
            },
            OPCODE_CLOSE => WindowCommand::Close { id: sqe.cdw10 },
            OPCODE_COMMIT => WindowCommand::Commit {
                id: sqe.cdw10,
                slba: slba(sqe.cdw11, sqe.cdw12),
                blocks: sqe.cdw13,
            },
            _ => return None,
        }))
    }

    /// The command as a submission queue entry for namespace `nsid` (the
    /// data pointer of Open is the transport's to set).
    pub fn to_sqe(self, command_id: CommandId, nsid: Nsid) -> Sqe {
        let mut sqe;
        match self {
            WindowCommand::Open { slba, blocks, write } => {
                sqe = Sqe::new(OPCODE_OPEN, command_id);
                sqe.cdw10 = slba as u32;
                sqe.cdw11 = (slba >> 32) as u32;
                sqe.cdw12 = blocks;
                sqe.cdw13 = if write { OPEN_WRITE } else { 0 };
            }
            WindowCommand::Close { id } => {
                sqe = Sqe::new(OPCODE_CLOSE, command_id);
                sqe.cdw10 = id;
            }
            WindowCommand::Commit { id, slba, blocks } => {
                sqe = Sqe::new(OPCODE_COMMIT, command_id);
                sqe.cdw10 = id;
                sqe.cdw11 = slba as u32;
                sqe.cdw12 = (slba >> 32) as u32;
                sqe.cdw13 = blocks;
            }
        }
        sqe.nsid = nsid;
        sqe
    }
}

/// What Window Open answers: where the window is and the key to it.
///
/// ```text
/// 0  version (1)   1  access (bit 0 read, bit 1 write, bit 2 shared)
/// 2..4 reserved    4  window ID     8  steering tag (remote key)
/// 12..16 reserved
/// 16 address of the window's first byte (the first block asked for)
/// 24 length in bytes
/// 32 shared memory token, 40 the window's offset in it (bit 2 set; else 0)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowDescriptor {
    /// Names the window in Close and Commit.
    pub id: u32,
    /// The steering tag: the remote key RDMA names the window by.
    pub stag: u32,
    /// The address RDMA names the window's first byte by.
    pub addr: u64,
    /// The window's length in bytes.
    pub len: u64,
    /// Whether the host may write.
    pub write: bool,
    /// Over shm, to a host of the I/O unit's own user: the memory the
    /// window lies in, shared with the host's process (the token its
    /// channel maps it by), and the window's offset in it.
    pub shared: Option<SharedWindow>,
}

/// Where a window lies in memory the I/O unit shared with the host
/// (`messaging::Endpoint::share_memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedWindow {
    /// The channel's token for the memory.
    pub token: u64,
    /// The window's first byte in it.
    pub offset: u64,
}

impl WindowDescriptor {
    /// Encoded size.
    pub const LEN: usize = 48;
    const VERSION: u8 = 1;
    const READ: u8 = 1;
    const WRITE: u8 = 2;
    const SHARED: u8 = 4;

    /// Encodes as 48 little-endian bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = Self::VERSION;
        b[1] = Self::READ
            | if self.write { Self::WRITE } else { 0 }
            | if self.shared.is_some() { Self::SHARED } else { 0 };
        put_u32(&mut b, 4, self.id);
        put_u32(&mut b, 8, self.stag);
        put_u64(&mut b, 16, self.addr);
        put_u64(&mut b, 24, self.len);
        if let Some(shared) = self.shared {
            put_u64(&mut b, 32, shared.token);
            put_u64(&mut b, 40, shared.offset);
        }
        b
    }

    /// Decodes what [`WindowDescriptor::encode`] wrote.
    ///
    /// # Errors
    /// `Length` for another size; `Unknown` for another version; `Reserved`
    /// for reserved bits or bytes set, a window without read access, or
    /// shared-memory fields without the shared bit.
    pub fn decode(b: &[u8]) -> Result<WindowDescriptor, NvmeError> {
        if b.len() != Self::LEN {
            return Err(NvmeError::Length {
                what: "window descriptor",
                len: b.len(),
                expected: Self::LEN,
            });
        }
        if b[0] != Self::VERSION {
            return Err(NvmeError::Unknown {
                field: "window descriptor version",
                value: b[0].into(),
            });
        }
        let access = b[1];
        if access & !(Self::READ | Self::WRITE | Self::SHARED) != 0 || access & Self::READ == 0 {
            return Err(NvmeError::Reserved {
                field: "window descriptor access",
                value: access.into(),
            });
        }
        let shared = access & Self::SHARED != 0;
        if b[2..4] != [0, 0] || b[12..16] != [0; 4] || (!shared && b[32..48] != [0; 16]) {
            return Err(NvmeError::Reserved {
                field: "window descriptor reserved bytes",
                value: 0,
            });
        }
        Ok(WindowDescriptor {
            id: get_u32(b, 4),
            stag: get_u32(b, 8),
            addr: get_u64(b, 16),
            len: get_u64(b, 24),
            write: access & Self::WRITE != 0,
            shared: shared.then(|| SharedWindow {
                token: get_u64(b, 32),
                offset: get_u64(b, 40),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_a_submission_entry() {
        for cmd in [
            WindowCommand::Open {
                slba: 0x1_0000_0002,
                blocks: 7,
                write: true,
            },
            WindowCommand::Open {
                slba: 3,
                blocks: 1,
                write: false,
            },
            WindowCommand::Close { id: 9 },
            WindowCommand::Commit {
                id: 4,
                slba: u64::MAX,
                blocks: u32::MAX,
            },
        ] {
            let sqe = cmd.to_sqe(CommandId(5), Nsid(2));
            assert!(WindowCommand::is_window_opcode(sqe.opcode));
            assert_eq!(
                sqe.opcode & 3,
                if matches!(cmd, WindowCommand::Open { .. }) {
                    2
                } else {
                    0
                }
            );
            let back = Sqe::decode(&sqe.encode()).unwrap();
            assert_eq!(WindowCommand::decode(&back).unwrap().unwrap(), cmd);
            assert_eq!(back.nsid, Nsid(2));
        }
        assert!(WindowCommand::decode(&Sqe::new(0x02, CommandId(1))).is_none());
        let mut bad = WindowCommand::Close { id: 1 }.to_sqe(CommandId(1), Nsid(1));
        bad.opcode = OPCODE_OPEN;
        bad.cdw13 = 4;
        assert!(WindowCommand::decode(&bad).unwrap().is_err());
    }

    #[test]
    fn descriptors_round_trip_and_malformed_ones_are_refused() {
        let d = WindowDescriptor {
            id: 3,
            stag: 0xdead_beef,
            addr: 0x7f00_1234_5000,
            len: 1 << 33,
            write: true,
            shared: None,
        };
        let b = d.encode();
        assert_eq!(WindowDescriptor::decode(&b).unwrap(), d);
        let s = WindowDescriptor {
            shared: Some(SharedWindow { token: 9, offset: 4096 }),
            ..d
        };
        assert_eq!(WindowDescriptor::decode(&s.encode()).unwrap(), s);
        assert!(WindowDescriptor::decode(&b[..47]).is_err());
        for (at, v) in [(0, 2), (1, 0), (1, 2), (1, 9), (2, 1), (13, 1), (33, 1)] {
            let mut m = b;
            m[at] = v;
            assert!(WindowDescriptor::decode(&m).is_err(), "byte {at} = {v}");
        }
    }

    #[test]
    fn window_statuses_are_vendor_specific() {
        for s in [status::NOT_WINDOWABLE, status::LIMIT_EXCEEDED, status::UNKNOWN_WINDOW] {
            assert_eq!(s.sct(), StatusCodeType::VENDOR_SPECIFIC);
            assert!(!s.is_success());
        }
    }
}
