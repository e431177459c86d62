//! Frame headers (40 bytes, little-endian) and the frames waiting to be written.

use super::*;

pub(super) struct TxFrame {
    pub(super) header: [u8; FRAME_HEADER],
    pub(super) payload: TxPayload,
    /// For requests: the psn whose pending entry gets the buffer back once written.
    pub(super) request_psn: Option<u64>,
}

pub(super) enum TxPayload {
    None,
    Buf(Buf),
    Region(RemoteTarget),
}

impl TxPayload {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            TxPayload::None => &[],
            TxPayload::Buf(b) => b,
            TxPayload::Region(t) => t.as_slice(),
        }
    }
}

pub(super) struct Pending {
    pub(super) psn: u64,
    pub(super) id: WrId,
    pub(super) opcode: WcOpcode,
    pub(super) buf: Option<Buf>,
    pub(super) written: bool,
    /// A local error found at posting: the status it completes with.
    pub(super) error: Option<WcStatus>,
}

/// Why a frame header is malformed.
#[derive(Debug, thiserror::Error)]
pub(super) enum FrameError {
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("unknown opcode {0}")]
    Opcode(u8),
}

#[derive(Clone, Copy)]
pub(super) struct Header {
    pub(super) opcode: u8,
    pub(super) status: u8,
    pub(super) len: u32,
    pub(super) psn: u64,
    pub(super) addr: u64,
    pub(super) rkey: u32,
    pub(super) imm: u32,
    /// Piggybacked cumulative acknowledgement: every request up to psn
    /// `ack - 1` was executed; 0 carries none.
    pub(super) ack: u64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; FRAME_HEADER] {
        let mut h = [0u8; FRAME_HEADER];
        h[0] = self.opcode;
        h[1] = self.status;
        h[4..8].copy_from_slice(&self.len.to_le_bytes());
        h[8..16].copy_from_slice(&self.psn.to_le_bytes());
        h[16..24].copy_from_slice(&self.addr.to_le_bytes());
        h[24..28].copy_from_slice(&self.rkey.to_le_bytes());
        h[28..32].copy_from_slice(&self.imm.to_le_bytes());
        h[32..40].copy_from_slice(&self.ack.to_le_bytes());
        h
    }

    pub(super) fn decode(h: &[u8; FRAME_HEADER]) -> Result<Header, FrameError> {
        let le32 = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let le64 = |i: usize| {
            u64::from_le_bytes([
                h[i],
                h[i + 1],
                h[i + 2],
                h[i + 3],
                h[i + 4],
                h[i + 5],
                h[i + 6],
                h[i + 7],
            ])
        };
        if h[2] != 0 || h[3] != 0 {
            return Err(FrameError::Reserved);
        }
        let header = Header {
            opcode: h[0],
            status: h[1],
            len: le32(4),
            psn: le64(8),
            addr: le64(16),
            rkey: le32(24),
            imm: le32(28),
            ack: le64(32),
        };
        if !(OP_SEND..=OP_DISCONNECT).contains(&header.opcode) {
            return Err(FrameError::Opcode(header.opcode));
        }
        Ok(header)
    }

    pub(super) fn control(opcode: u8, psn: u64, status: WcStatus) -> Header {
        Header {
            opcode,
            status: status.code(),
            len: 0,
            psn,
            addr: 0,
            rkey: 0,
            imm: 0,
            ack: 0,
        }
    }
}
