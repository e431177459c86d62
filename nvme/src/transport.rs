//! chanio's NVMe transport binding: how NVMe capsules travel on push-push
//! channels. The host module and the I/O-unit module both follow it.
//!
//! - **Queues.** Every NVMe queue (one admin queue, N I/O queues) is its own
//!   messaging channel ([`messaging::Endpoint`]). Its first message is a
//!   Fabrics Connect command; the answer's DW0 is the controller ID.
//! - **Command capsule** (host → I/O unit, one Send): the 64-byte SQE, then
//!   up to [`INLINE_DATA_MAX`] bytes of in-capsule data.
//! - **Response capsule** (I/O unit → host, one Send): the 16-byte CQE.
//! - **Host writes.** Up to [`INLINE_DATA_MAX`] bytes travel in the capsule
//!   (SGL Data Block, offset subtype, offset 0); from a registered buffer
//!   the host lent, the Send gathers them after the SQE (two scatter
//!   entries, no copy over rdma). Larger data (SGL Transport
//!   Data Block) is pushed by the host right after the capsule, on the same
//!   channel, into slots the I/O unit granted: RDMA Writes with immediate,
//!   each at most one slot, in order. The I/O unit writes each chunk to
//!   storage as it lands and releases the slot.
//! - **Host reads** (and admin data such as Identify): the capsule carries a
//!   Keyed SGL Data Block naming the host's registered destination (address,
//!   length, key) and, in CDW3 bits 15:0, the transfer tag under which the
//!   host exposed it ([`transfer_tag`]). The I/O unit pushes the data there
//!   with one RDMA Write with immediate; the immediate names the tag.
//! - **Completions** arrive as a response capsule. Because a channel is
//!   reliable and ordered, a read's data has landed before its CQE arrives,
//!   and a write's CQE leaves only after its last chunk was written. No
//!   completion needs a separate data-ready notice.
//! - **Completion by data.** A host that sets CDW3 bit 16
//!   ([`CDW3_COMPLETE_BY_DATA`]) on a command with a keyed descriptor lets
//!   the I/O unit complete it with the data push alone: when the command
//!   succeeds, the push carries the messaging layer's direct-placement flag
//!   and no response capsule follows; the host completes the command with
//!   status Success and DW0 = 0. A command that fails is answered with a
//!   response capsule, as always. (NVMe/TCP's C2HData SUCCESS flag does the
//!   same.) A read then takes one message from the I/O unit instead of two.
//! - **Admission.** An I/O unit accepts a channel small
//!   ([`lobby_channel`]: a few receives, no push slots), so that a peer that
//!   has not connected costs it a few KiB. Once the Connect is admitted it
//!   grows the channel ([`messaging::Endpoint::grow`]) to the queue's depth,
//!   and grants slots to I/O queues, before it answers: the Grant message
//!   reaches the host ahead of the Connect's response.
//! - **Flow control.** Queue depth is bounded by the channel's credits. A
//!   command takes one receive on each side: its capsule, and its
//!   completion (a response capsule, or a read's flagged data push). A read
//!   without completion by data takes two on the host, and may wait for
//!   credits then. The host pre-posts `queue depth + CHANNEL_SLACK`
//!   receives, and returns their credits in its next capsule's header. The
//!   I/O unit pre-posts `2 × queue depth + CHANNEL_SLACK`: a read's data
//!   push carries no header, so its credits go back in control messages,
//!   once half its receives are owed; twice the depth keeps a host with a
//!   full queue from waiting for them.

use messaging::Config;

use crate::{Cqe, NvmeError, Sqe, CQE_LEN, SQE_LEN};

/// The subsystem NQN an I/O unit uses unless configured otherwise, and the
/// one a host connects to unless told another.
pub const DEFAULT_NQN: &str = "nqn.2026-11.io.chanio:iounit";
/// Largest in-capsule data.
pub const INLINE_DATA_MAX: usize = 4096;
/// Largest data transfer of one command (Identify Controller MDTS = 7,
/// in units of 4 KiB pages: 512 KiB).
pub const MAX_TRANSFER: usize = 512 * 1024;
/// MDTS as reported in Identify Controller.
pub const MDTS: u8 = 7;
/// Size of each slot an I/O unit grants for host-pushed write data.
pub const SLOT_SIZE: u32 = 128 * 1024;
/// Slots an I/O unit grants per queue.
pub const SLOT_COUNT: u16 = 32;
/// Receives posted beyond the queue depth (keep alive, events, control).
pub const CHANNEL_SLACK: u16 = 8;
/// Largest queue depth (entries) an I/O unit accepts.
pub const MAX_QUEUE_DEPTH: u16 = 1024;
/// The keep-alive timeouts (KATO, milliseconds) an I/O unit accepts for a
/// controller, at Connect and in Set Features: 0 (disabled) is refused, so
/// that the controller of a host gone silent is always freed, and with it
/// its queues and worker threads.
pub const KATO_MS: std::ops::RangeInclusive<u32> = 1..=300_000;
/// Message size of every channel: a capsule with full in-capsule data.
pub const CAPSULE_MAX: u32 = (SQE_LEN + INLINE_DATA_MAX) as u32;

/// Channel configuration of a channel an I/O unit accepts, before its NVMe
/// Connect: room for the Connect capsule and its answer, and no push slots.
pub fn lobby_channel() -> Config {
    Config {
        recv_depth: messaging::proto::MIN_RECV_DEPTH,
        send_depth: 4,
        msg_size: CAPSULE_MAX,
        slot_size: 0,
        slot_count: 0,
        separate_indication: false,
    }
}

/// Channel configuration of an I/O-unit admin queue of `depth` entries: no
/// push slots (no admin command moves more than a capsule's data to the I/O
/// unit).
pub fn iounit_admin_channel(depth: u16) -> Config {
    Config {
        slot_size: 0,
        slot_count: 0,
        ..iounit_channel(depth)
    }
}

/// Channel configuration of an I/O-unit I/O queue of `depth` entries.
pub fn iounit_channel(depth: u16) -> Config {
    Config {
        recv_depth: depth.saturating_mul(2).saturating_add(CHANNEL_SLACK),
        send_depth: depth.saturating_mul(2).saturating_add(CHANNEL_SLACK),
        msg_size: CAPSULE_MAX,
        slot_size: SLOT_SIZE,
        slot_count: SLOT_COUNT,
        separate_indication: false,
    }
}

/// Channel configuration of a host queue of `depth` entries. Hosts grant no
/// slots: the I/O unit pushes read data straight into exposed buffers.
pub fn host_channel(depth: u16) -> Config {
    Config {
        recv_depth: depth.saturating_add(CHANNEL_SLACK),
        send_depth: depth.saturating_mul(2).saturating_add(CHANNEL_SLACK),
        msg_size: CAPSULE_MAX,
        slot_size: 0,
        slot_count: 0,
        separate_indication: false,
    }
}

/// Encodes a command capsule into `out` (cleared first).
///
/// # Errors
/// [`NvmeError::Length`] when `data` exceeds [`INLINE_DATA_MAX`].
pub fn encode_capsule(sqe: &Sqe, data: &[u8], out: &mut Vec<u8>) -> Result<(), NvmeError> {
    if data.len() > INLINE_DATA_MAX {
        return Err(NvmeError::Length {
            what: "in-capsule data",
            len: data.len(),
            expected: INLINE_DATA_MAX,
        });
    }
    out.clear();
    out.extend_from_slice(&sqe.encode());
    out.extend_from_slice(data);
    Ok(())
}

/// Splits a command capsule into its SQE and in-capsule data.
///
/// # Errors
/// [`NvmeError::Length`] for a capsule shorter than an SQE or with more
/// in-capsule data than allowed.
pub fn decode_capsule(msg: &[u8]) -> Result<(Sqe, &[u8]), NvmeError> {
    if msg.len() < SQE_LEN || msg.len() > SQE_LEN + INLINE_DATA_MAX {
        return Err(NvmeError::Length {
            what: "command capsule",
            len: msg.len(),
            expected: SQE_LEN,
        });
    }
    let sqe = Sqe::decode(&msg[..SQE_LEN])?;
    Ok((sqe, &msg[SQE_LEN..]))
}

/// Encodes a response capsule.
pub fn encode_response(cqe: &Cqe) -> [u8; CQE_LEN] {
    cqe.encode()
}

/// Decodes a response capsule.
///
/// # Errors
/// [`NvmeError::Length`] unless the message is exactly one CQE.
pub fn decode_response(msg: &[u8]) -> Result<Cqe, NvmeError> {
    Cqe::decode(msg)
}

/// The transfer tag of a command with a keyed descriptor (CDW3 bits 15:0).
pub fn transfer_tag(sqe: &Sqe) -> u16 {
    sqe.cdw3 as u16
}

/// Sets the transfer tag (CDW3 bits 15:0).
pub fn set_transfer_tag(sqe: &mut Sqe, tag: u16) {
    sqe.cdw3 = (sqe.cdw3 & 0xffff_0000) | u32::from(tag);
}

/// CDW3 bit 16 of a command with a keyed descriptor: the host accepts the
/// flagged data push as the command's successful completion (see the
/// module documentation, "Completion by data").
pub const CDW3_COMPLETE_BY_DATA: u32 = 1 << 16;

/// Whether the host asked for completion by data.
pub fn completes_by_data(sqe: &Sqe) -> bool {
    sqe.cdw3 & CDW3_COMPLETE_BY_DATA != 0
}

/// Asks for completion by data.
pub fn set_completes_by_data(sqe: &mut Sqe) {
    sqe.cdw3 |= CDW3_COMPLETE_BY_DATA;
}

/// Chunks of `len` bytes of host-pushed data: `(offset, length)` per push.
pub fn push_chunks(len: usize, slot: usize) -> impl Iterator<Item = (usize, usize)> {
    let slot = slot.max(1);
    (0..len.div_ceil(slot)).map(move |i| (i * slot, (len - i * slot).min(slot)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommandId, Nsid, Status};

    #[test]
    fn capsules_round_trip() {
        let mut sqe = Sqe::read(CommandId(7), Nsid(1), 100, 8).unwrap();
        set_transfer_tag(&mut sqe, 0x1234);
        let mut out = Vec::new();
        encode_capsule(&sqe, b"inline", &mut out).unwrap();
        let (back, data) = decode_capsule(&out).unwrap();
        assert_eq!(back, sqe);
        assert_eq!(transfer_tag(&back), 0x1234);
        assert_eq!(data, b"inline");
        assert!(decode_capsule(&out[..63]).is_err());
        assert!(encode_capsule(&sqe, &[0; INLINE_DATA_MAX + 1], &mut out).is_err());
        let cqe = Cqe::new(CommandId(7), Status::LBA_OUT_OF_RANGE);
        assert_eq!(decode_response(&encode_response(&cqe)).unwrap(), cqe);
    }

    #[test]
    fn chunks_cover_the_data() {
        let c: Vec<_> = push_chunks(300, 128).collect();
        assert_eq!(c, vec![(0, 128), (128, 128), (256, 44)]);
        assert_eq!(push_chunks(0, 128).count(), 0);
    }
}
