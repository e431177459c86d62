//! Completion queue entries (NVMe Base 2.0 §4.6).
//!
//! ```text
//! bytes  0..4   DW0: command specific result
//!        4..8   DW1: command specific result
//!        8..10  SQ head pointer
//!       10..12  SQ identifier
//!       12..14  command identifier
//!       14..16  status field (see `status`) with the phase tag in bit 0
//! ```

use super::status::Status;
use super::{get_u16, get_u32, put_u16, put_u32, CommandId, NvmeError};

/// Size of a completion queue entry.
pub const CQE_LEN: usize = 16;

const PHASE: u16 = 1;
const MORE: u16 = 1 << 14;
const CRD_SHIFT: u16 = 12;

/// A 16-byte completion queue entry (a response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cqe {
    /// Dword 0: command specific (the Connect controller id, the Get
    /// Features value, an asynchronous event, ...).
    pub dw0: u32,
    /// Dword 1: command specific (high half of a Property Get value).
    pub dw1: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue the command came from.
    pub sq_id: u16,
    /// Identifier of the command this completes.
    pub command_id: CommandId,
    /// The raw status field: phase tag (bit 0), SC, SCT, CRD, More, DNR. Read
    /// it with [`Cqe::status`].
    pub status_field: u16,
}

impl Cqe {
    /// A completion of `command_id` with `status` and everything else zero.
    pub fn new(command_id: CommandId, status: Status) -> Cqe {
        Cqe {
            command_id,
            status_field: status.to_field(),
            ..Cqe::default()
        }
    }

    /// Encodes as 16 bytes.
    pub fn encode(&self) -> [u8; CQE_LEN] {
        let mut b = [0u8; CQE_LEN];
        put_u32(&mut b, 0, self.dw0);
        put_u32(&mut b, 4, self.dw1);
        put_u16(&mut b, 8, self.sq_head);
        put_u16(&mut b, 10, self.sq_id);
        put_u16(&mut b, 12, self.command_id.0);
        put_u16(&mut b, 14, self.status_field);
        b
    }

    /// Decodes a 16-byte completion queue entry.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is exactly 16 bytes.
    pub fn decode(b: &[u8]) -> Result<Cqe, NvmeError> {
        super::check_len("response capsule", b, CQE_LEN)?;
        Ok(Cqe {
            dw0: get_u32(b, 0),
            dw1: get_u32(b, 4),
            sq_head: get_u16(b, 8),
            sq_id: get_u16(b, 10),
            command_id: CommandId(get_u16(b, 12)),
            status_field: get_u16(b, 14),
        })
    }

    /// The status: SCT, SC and DNR.
    pub fn status(&self) -> Status {
        Status::from_field(self.status_field)
    }

    /// Replaces SCT, SC and DNR, keeping the phase tag, CRD and More.
    pub fn set_status(&mut self, status: Status) {
        self.status_field = (self.status_field & (PHASE | MORE | 0x3 << CRD_SHIFT)) | status.to_field();
    }

    /// The phase tag (bit 0 of the status field).
    pub fn phase(&self) -> bool {
        self.status_field & PHASE != 0
    }

    /// Sets the phase tag.
    pub fn set_phase(&mut self, phase: bool) {
        self.status_field = (self.status_field & !PHASE) | u16::from(phase);
    }

    /// More (bit 14): the Error Information log page has more about this
    /// command.
    pub fn more(&self) -> bool {
        self.status_field & MORE != 0
    }

    /// Sets More.
    pub fn set_more(&mut self, more: bool) {
        self.status_field = (self.status_field & !MORE) | if more { MORE } else { 0 };
    }

    /// Command Retry Delay (bits 13:12): 0 for none, else which of the
    /// controller's CRDT1..3 delays applies.
    pub fn crd(&self) -> u8 {
        ((self.status_field >> CRD_SHIFT) & 0x3) as u8
    }

    /// DW0 and DW1 as one 64-bit value (DW1 high), as a Property Get of an
    /// 8-byte property returns it.
    pub fn result_u64(&self) -> u64 {
        u64::from(self.dw1) << 32 | u64::from(self.dw0)
    }

    /// Sets DW0 (low half) and DW1 (high half) from one 64-bit value.
    pub fn set_result_u64(&mut self, value: u64) {
        self.dw0 = value as u32;
        self.dw1 = (value >> 32) as u32;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn layout_matches_spec() {
        let mut cqe = Cqe {
            dw0: 0x0403_0201,
            dw1: 0x0807_0605,
            sq_head: 0x0a09,
            sq_id: 0x0c0b,
            command_id: CommandId(0x0e0d),
            status_field: 0,
        };
        cqe.set_status(Status::LBA_OUT_OF_RANGE.with_dnr());
        cqe.set_phase(true);
        let b = cqe.encode();
        assert_eq!(&b[..14], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e]);
        // SC 80h in bits 8:1, phase in bit 0, DNR in bit 15.
        assert_eq!(&b[14..16], &(0x8000u16 | 0x80 << 1 | 1).to_le_bytes());
        assert_eq!(Cqe::decode(&b), Ok(cqe));
    }

    #[test]
    fn status_bits() {
        let mut cqe = Cqe::new(CommandId(5), Status::SUCCESS);
        assert!(cqe.status().is_success());
        cqe.set_phase(true);
        cqe.set_more(true);
        cqe.status_field |= 2 << 12;
        cqe.set_status(Status::INVALID_QUEUE_SIZE);
        assert!(cqe.phase());
        assert!(cqe.more());
        assert_eq!(cqe.crd(), 2);
        assert_eq!(cqe.status(), Status::INVALID_QUEUE_SIZE);
        cqe.set_phase(false);
        cqe.set_more(false);
        assert_eq!(cqe.status_field, Status::INVALID_QUEUE_SIZE.to_field() | 2 << 12);
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert_eq!(
            Cqe::decode(&[0u8; 15]).unwrap_err().to_string(),
            "response capsule is 15 bytes, expected 16"
        );
        assert!(Cqe::decode(&[0u8; 17]).is_err());
    }

    #[test]
    fn sixty_four_bit_results() {
        let mut cqe = Cqe::default();
        cqe.set_result_u64(0x1122_3344_5566_7788);
        assert_eq!(cqe.dw0, 0x5566_7788);
        assert_eq!(cqe.dw1, 0x1122_3344);
        assert_eq!(cqe.result_u64(), 0x1122_3344_5566_7788);
    }

    proptest! {
        #[test]
        fn decode_encode_is_identity(bytes in proptest::array::uniform16(any::<u8>())) {
            let cqe = Cqe::decode(&bytes).unwrap();
            prop_assert_eq!(cqe.encode(), bytes);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(cqe) = Cqe::decode(&bytes) {
                let _ = cqe.status().describe();
            }
        }
    }
}
