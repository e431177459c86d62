//! Wire formats of the push-push protocol: connection parameters, message
//! headers, transfer indications and the 32-bit immediate encoding. All
//! little-endian, all decoded defensively (see `docs/protocol.md`).

use crate::mr::RKey;

/// Protocol version carried in parameters and message headers (2: the
/// Grant message).
pub const VERSION: u8 = 2;
/// Size of the parameter block exchanged in the hello.
pub const PARAMS_LEN: usize = 32;
/// Size of a message header.
pub const HEADER_LEN: usize = 16;
/// Most slot releases one message header can carry.
pub const MAX_RELEASES: usize = 32;
/// Size of a transfer-indication payload.
pub const INDICATION_LEN: usize = 12;
/// Size of a Grant payload.
pub const GRANT_LEN: usize = 24;
/// Largest slot index (15 bits of the immediate).
pub const MAX_INDEX: u16 = 0x7fff;
/// Largest direct-placement tag: a direct push's 15-bit index is the tag
/// in bits 13..0 and [`DIRECT_FLAG`] in bit 14.
pub const MAX_TAG: u16 = 0x3fff;
/// Bit 14 of a direct push's index: the sender's flag, delivered with the
/// placement (an application's "this completes the request").
pub const DIRECT_FLAG: u16 = 0x4000;

const FLAG_SEPARATE_INDICATION: u16 = 1;

/// Why a peer's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, WireError> {
    Err(WireError(msg.into()))
}

/// Connection parameters: what each side advertises in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Receives pre-posted for the peer: the peer's initial credits.
    pub recv_depth: u16,
    /// Largest message payload the peer may Send us.
    pub msg_size: u32,
    /// Number of push slots pre-registered for the peer.
    pub slot_count: u16,
    /// Size of each push slot.
    pub slot_size: u32,
    /// Address of slot 0 (slot `i` is at `slot_addr + i * slot_size`).
    pub slot_addr: u64,
    /// Remote key of the slot pool.
    pub slot_rkey: RKey,
    /// This side asks for transfer indications as separate messages.
    pub separate_indication: bool,
}

impl Params {
    /// Encodes as the 32-byte parameter block.
    pub fn encode(&self) -> [u8; PARAMS_LEN] {
        let mut b = [0u8; PARAMS_LEN];
        b[0..2].copy_from_slice(&u16::from(VERSION).to_le_bytes());
        let flags = if self.separate_indication {
            FLAG_SEPARATE_INDICATION
        } else {
            0
        };
        b[2..4].copy_from_slice(&flags.to_le_bytes());
        b[4..6].copy_from_slice(&self.recv_depth.to_le_bytes());
        b[6..8].copy_from_slice(&self.slot_count.to_le_bytes());
        b[8..12].copy_from_slice(&self.msg_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.slot_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.slot_addr.to_le_bytes());
        b[24..28].copy_from_slice(&self.slot_rkey.0.to_le_bytes());
        b
    }

    /// Decodes and validates a peer's parameter block.
    ///
    /// # Errors
    /// Wrong length or version, unknown flags, or values out of range.
    pub fn decode(b: &[u8]) -> Result<Params, WireError> {
        if b.len() != PARAMS_LEN {
            return err(format!("parameter block is {} bytes, expected {PARAMS_LEN}", b.len()));
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let version = u16_at(0);
        if version != u16::from(VERSION) {
            return err(format!("protocol version {version} (this side speaks {VERSION})"));
        }
        let flags = u16_at(2);
        if flags & !FLAG_SEPARATE_INDICATION != 0 {
            return err(format!("unknown parameter flags {flags:#x}"));
        }
        if u32_at(28) != 0 {
            return err("reserved parameter field is not zero");
        }
        let p = Params {
            recv_depth: u16_at(4),
            slot_count: u16_at(6),
            msg_size: u32_at(8),
            slot_size: u32_at(12),
            slot_addr: u64::from_le_bytes(b[16..24].try_into().map_err(|_| WireError("short".into()))?),
            slot_rkey: RKey(u32_at(24)),
            separate_indication: flags & FLAG_SEPARATE_INDICATION != 0,
        };
        if p.recv_depth < super::MIN_RECV_DEPTH {
            return err(format!(
                "receive depth {} below the minimum {}",
                p.recv_depth,
                super::MIN_RECV_DEPTH
            ));
        }
        if p.msg_size == 0 || p.msg_size > super::MAX_MSG_SIZE {
            return err(format!(
                "message size {} outside 1..={}",
                p.msg_size,
                super::MAX_MSG_SIZE
            ));
        }
        if p.slot_count > MAX_INDEX + 1 {
            return err(format!("{} slots, at most {}", p.slot_count, MAX_INDEX as u32 + 1));
        }
        if p.slot_count > 0 && p.slot_size == 0 {
            return err("slots of zero bytes");
        }
        if u64::from(p.slot_count)
            .checked_mul(u64::from(p.slot_size))
            .and_then(|len| p.slot_addr.checked_add(len))
            .is_none()
        {
            return err("slot pool wraps the address space");
        }
        Ok(p)
    }
}

/// Kind of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Application data.
    Data,
    /// Credits and slot releases only.
    Control,
    /// A transfer indication for a push written without immediate data.
    Indication,
    /// A later grant: a deeper receive queue, and push slots where the
    /// hello granted none ([`Grant`]).
    Grant,
}

/// A message header. `releases` slot indices (u16 each) and then `len`
/// payload bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the message is.
    pub kind: Kind,
    /// Credits granted to the receiver of this message.
    pub credits: u16,
    /// Number of slot indices after the header.
    pub releases: u16,
    /// Delivery sequence number (data and indications), 0 for control.
    pub seq: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// Encodes into the first [`HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than the header (a local sizing bug).
    pub fn encode(&self, out: &mut [u8]) {
        out[0] = VERSION;
        out[1] = match self.kind {
            Kind::Data => 1,
            Kind::Control => 2,
            Kind::Indication => 3,
            Kind::Grant => 4,
        };
        out[2..4].copy_from_slice(&self.credits.to_le_bytes());
        out[4..6].copy_from_slice(&self.releases.to_le_bytes());
        out[6..8].copy_from_slice(&0u16.to_le_bytes());
        out[8..12].copy_from_slice(&self.seq.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
    }

    /// Decodes a received message of `msg.len()` bytes, checking that the
    /// header, the releases and the payload account for every byte.
    ///
    /// # Errors
    /// Short message, wrong version, unknown kind, non-zero reserved bytes,
    /// too many releases, or lengths that do not add up.
    pub fn decode(msg: &[u8]) -> Result<Header, WireError> {
        if msg.len() < HEADER_LEN {
            return err(format!("message of {} bytes is shorter than its header", msg.len()));
        }
        if msg[0] != VERSION {
            return err(format!("message version {} (this side speaks {VERSION})", msg[0]));
        }
        let kind = match msg[1] {
            1 => Kind::Data,
            2 => Kind::Control,
            3 => Kind::Indication,
            4 => Kind::Grant,
            k => return err(format!("unknown message kind {k}")),
        };
        if msg[6] != 0 || msg[7] != 0 {
            return err("reserved header bytes are not zero");
        }
        let h = Header {
            kind,
            credits: u16::from_le_bytes([msg[2], msg[3]]),
            releases: u16::from_le_bytes([msg[4], msg[5]]),
            seq: u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]),
            len: u32::from_le_bytes([msg[12], msg[13], msg[14], msg[15]]),
        };
        if h.releases as usize > MAX_RELEASES {
            return err(format!(
                "{} slot releases in one message (at most {MAX_RELEASES})",
                h.releases
            ));
        }
        let expected = HEADER_LEN + 2 * h.releases as usize + h.len as usize;
        if expected != msg.len() {
            return err(format!(
                "message lengths add up to {expected} bytes but {} arrived",
                msg.len()
            ));
        }
        match kind {
            Kind::Control if h.len != 0 => err("control message with a payload"),
            Kind::Indication if h.len as usize != INDICATION_LEN => {
                err(format!("indication of {} bytes (expected {INDICATION_LEN})", h.len))
            }
            Kind::Grant if h.len as usize != GRANT_LEN => {
                err(format!("grant of {} bytes (expected {GRANT_LEN})", h.len))
            }
            _ => Ok(h),
        }
    }

    /// Offset of the payload in the message.
    pub fn payload_offset(&self) -> usize {
        HEADER_LEN + 2 * self.releases as usize
    }

    /// The slot indices released by the message.
    pub fn releases<'a>(&self, msg: &'a [u8]) -> impl Iterator<Item = u16> + 'a {
        msg[HEADER_LEN..self.payload_offset()]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    }
}

/// What a Grant message grants: the sender's receive queue grew to
/// `recv_depth` (the header's credits stand for the receives added), and,
/// where the hello granted no slots, `slot_count` push slots (none when 0).
///
/// Payload: `recv_depth u16 | reserved u16 | slot_count u16 | reserved u16
/// | slot_size u32 | slot_rkey u32 | slot_addr u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The sender's receive depth now: the receiver's credit limit.
    pub recv_depth: u16,
    /// Push slots granted (0: none in this grant).
    pub slot_count: u16,
    /// Size of each slot.
    pub slot_size: u32,
    /// Remote key of the slot pool.
    pub slot_rkey: RKey,
    /// Address of slot 0.
    pub slot_addr: u64,
}

impl Grant {
    /// Encodes as the [`GRANT_LEN`]-byte payload.
    pub fn encode(&self) -> [u8; GRANT_LEN] {
        let mut b = [0u8; GRANT_LEN];
        b[0..2].copy_from_slice(&self.recv_depth.to_le_bytes());
        b[4..6].copy_from_slice(&self.slot_count.to_le_bytes());
        b[8..12].copy_from_slice(&self.slot_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.slot_rkey.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.slot_addr.to_le_bytes());
        b
    }

    /// Decodes and validates a Grant payload on its own (what it may
    /// change of the peer's parameters is checked by the connection).
    ///
    /// # Errors
    /// Wrong size, non-zero reserved fields, or slot values out of range.
    pub fn decode(b: &[u8]) -> Result<Grant, WireError> {
        let b: &[u8; GRANT_LEN] = b
            .try_into()
            .map_err(|_| WireError(format!("grant of {} bytes (expected {GRANT_LEN})", b.len())))?;
        if b[2..4] != [0; 2] || b[6..8] != [0; 2] {
            return err("reserved grant fields are not zero");
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[16..24]);
        let g = Grant {
            recv_depth: u16::from_le_bytes([b[0], b[1]]),
            slot_count: u16::from_le_bytes([b[4], b[5]]),
            slot_size: u32_at(8),
            slot_rkey: RKey(u32_at(12)),
            slot_addr: u64::from_le_bytes(addr),
        };
        if g.slot_count > MAX_INDEX + 1 {
            return err(format!("{} slots, at most {}", g.slot_count, MAX_INDEX as u32 + 1));
        }
        if g.slot_count > 0 && g.slot_size == 0 {
            return err("slots of zero bytes");
        }
        if g.slot_count == 0 && (g.slot_size != 0 || g.slot_rkey.0 != 0 || g.slot_addr != 0) {
            return err("a grant of no slots describes a slot pool");
        }
        if u64::from(g.slot_count)
            .checked_mul(u64::from(g.slot_size))
            .and_then(|len| g.slot_addr.checked_add(len))
            .is_none()
        {
            return err("slot pool wraps the address space");
        }
        Ok(g)
    }
}

/// Where a push landed: a slot of the receiver's pool or a buffer the
/// receiver exposed for direct placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Slot index in the receiver's pool.
    Slot(u16),
    /// Tag of an exposed buffer.
    Direct(u16),
}

/// The 32-bit immediate of a push: `bit 31` target kind (0 slot, 1 direct),
/// `bits 30..16` slot index or tag, `bits 15..0` low 16 bits of the
/// delivery sequence number.
pub fn encode_imm(target: Target, seq: u32) -> u32 {
    let (kind, index) = match target {
        Target::Slot(i) => (0u32, i),
        Target::Direct(t) => (1u32, t),
    };
    debug_assert!(index <= MAX_INDEX);
    kind << 31 | u32::from(index & MAX_INDEX) << 16 | (seq & 0xffff)
}

/// Inverse of [`encode_imm`]: `(target, low 16 bits of seq)`.
pub fn decode_imm(imm: u32) -> (Target, u16) {
    let index = ((imm >> 16) & u32::from(MAX_INDEX)) as u16;
    let target = if imm >> 31 == 1 {
        Target::Direct(index)
    } else {
        Target::Slot(index)
    };
    (target, imm as u16)
}

/// Encodes a transfer indication (the separate-message form of the
/// immediate): `kind u8 | pad u8 | index u16 | len u32 | reserved u32`.
pub fn encode_indication(target: Target, len: u32) -> [u8; INDICATION_LEN] {
    let mut b = [0u8; INDICATION_LEN];
    let (kind, index) = match target {
        Target::Slot(i) => (0u8, i),
        Target::Direct(t) => (1u8, t),
    };
    b[0] = kind;
    b[2..4].copy_from_slice(&index.to_le_bytes());
    b[4..8].copy_from_slice(&len.to_le_bytes());
    b
}

/// Decodes a transfer indication.
///
/// # Errors
/// Wrong size, unknown kind, index out of range or non-zero padding.
pub fn decode_indication(b: &[u8]) -> Result<(Target, u32), WireError> {
    if b.len() != INDICATION_LEN {
        return err(format!("indication of {} bytes", b.len()));
    }
    if b[1] != 0 || b[8..12] != [0; 4] {
        return err("indication padding is not zero");
    }
    let index = u16::from_le_bytes([b[2], b[3]]);
    if index > MAX_INDEX {
        return err(format!("indication index {index} out of range"));
    }
    let target = match b[0] {
        0 => Target::Slot(index),
        1 => Target::Direct(index),
        k => return err(format!("unknown indication kind {k}")),
    };
    Ok((target, u32::from_le_bytes([b[4], b[5], b[6], b[7]])))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn imm_layout_is_documented_one() {
        assert_eq!(encode_imm(Target::Slot(3), 0x1_0005), 0x0003_0005);
        assert_eq!(encode_imm(Target::Direct(0x7fff), 0xffff), 0xffff_ffff);
        assert_eq!(decode_imm(0x8001_0002), (Target::Direct(1), 2));
    }

    #[test]
    fn params_reject_bad_values() {
        let good = Params {
            recv_depth: 16,
            msg_size: 4096,
            slot_count: 8,
            slot_size: 65536,
            slot_addr: 0x1000,
            slot_rkey: RKey(5),
            separate_indication: true,
        };
        assert_eq!(Params::decode(&good.encode()), Ok(good));
        let mut b = good.encode();
        b[0] = 9;
        assert!(Params::decode(&b).unwrap_err().0.contains("version 9"));
        assert!(Params::decode(&b[..20]).is_err());
        let shallow = Params { recv_depth: 1, ..good };
        assert!(Params::decode(&shallow.encode()).is_err());
        let mut flags = good.encode();
        flags[2] = 0x80;
        assert!(Params::decode(&flags).is_err());
    }

    #[test]
    fn header_lengths_must_add_up() {
        let h = Header {
            kind: Kind::Data,
            credits: 3,
            releases: 2,
            seq: 9,
            len: 5,
        };
        let mut msg = vec![0u8; HEADER_LEN + 4 + 5];
        h.encode(&mut msg);
        msg[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&[7, 0, 9, 0]);
        let d = Header::decode(&msg).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.releases(&msg).collect::<Vec<_>>(), vec![7, 9]);
        assert!(Header::decode(&msg[..msg.len() - 1]).is_err());
        let mut bad = msg.clone();
        bad[1] = 42;
        assert!(Header::decode(&bad).is_err());
    }

    #[test]
    fn grants_reject_bad_values() {
        let none = Grant {
            recv_depth: 40,
            slot_count: 0,
            slot_size: 0,
            slot_rkey: RKey(0),
            slot_addr: 0,
        };
        assert_eq!(Grant::decode(&none.encode()), Ok(none));
        assert!(Grant::decode(&none.encode()[..20]).is_err());
        let mut reserved = none.encode();
        reserved[3] = 1;
        assert!(Grant::decode(&reserved).unwrap_err().0.contains("reserved"));
        let stray = Grant {
            slot_rkey: RKey(7),
            ..none
        };
        assert!(Grant::decode(&stray.encode()).is_err());
        let empty = Grant { slot_count: 4, ..none };
        assert!(Grant::decode(&empty.encode()).unwrap_err().0.contains("zero bytes"));
        let wraps = Grant {
            slot_count: 4,
            slot_size: 1 << 20,
            slot_addr: u64::MAX - 100,
            ..none
        };
        assert!(Grant::decode(&wraps.encode()).unwrap_err().0.contains("wraps"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn imm_round_trip(direct: bool, index in 0u16..=MAX_INDEX, seq: u32) {
            let target = if direct { Target::Direct(index) } else { Target::Slot(index) };
            prop_assert_eq!(decode_imm(encode_imm(target, seq)), (target, seq as u16));
        }

        #[test]
        fn indication_round_trip(direct: bool, index in 0u16..=MAX_INDEX, len: u32) {
            let target = if direct { Target::Direct(index) } else { Target::Slot(index) };
            prop_assert_eq!(decode_indication(&encode_indication(target, len)), Ok((target, len)));
        }

        #[test]
        fn grant_round_trip(depth: u16, count in 1u16..=MAX_INDEX, size in 1u32..=1 << 20, rkey: u32, addr in 0u64..1 << 48) {
            let g = Grant { recv_depth: depth, slot_count: count, slot_size: size, slot_rkey: RKey(rkey), slot_addr: addr };
            prop_assert_eq!(Grant::decode(&g.encode()), Ok(g));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Header::decode(&bytes);
            let _ = Params::decode(&bytes);
            let _ = decode_indication(&bytes);
            let _ = Grant::decode(&bytes);
        }
    }
}
