//! Scatter-gather list descriptors (NVMe Base 2.0 §4.1.2, NVMe-oF 1.1 §2.3).
//!
//! Over fabrics a command's data pointer is always one 16-byte SGL
//! descriptor. Byte 15 is the SGL identifier: the descriptor type in bits 7:4
//! and the subtype in bits 3:0.
//!
//! ```text
//! Keyed SGL Data Block (type 4h)        Data Block, offset subtype (0h/1h)
//! bytes 0..8   address                   bytes 0..8   offset into the capsule data
//! bytes 8..11  length (24 bits)          bytes 8..12  length
//! bytes 11..15 key                       bytes 12..15 reserved
//! byte  15     40h (or 4Fh: invalidate)  byte  15     01h
//! ```

use super::{get_u32, get_u64, put_u32, put_u64, NvmeError};

/// Size of an SGL descriptor.
pub const SGL_LEN: usize = 16;
/// Largest length a keyed descriptor can carry (24 bits).
pub const KEYED_MAX_LEN: u32 = 0x00ff_ffff;

/// Descriptor type: Data Block.
pub const TYPE_DATA_BLOCK: u8 = 0x0;
/// Descriptor type: Keyed SGL Data Block.
pub const TYPE_KEYED_DATA_BLOCK: u8 = 0x4;
/// Descriptor type: Transport SGL Data Block (NVMe-oF: the transport moves
/// the data its own way).
pub const TYPE_TRANSPORT_DATA_BLOCK: u8 = 0x5;
/// Subtype: the address field is a memory address.
pub const SUBTYPE_ADDRESS: u8 = 0x0;
/// Subtype: the address field is an offset (into in-capsule data).
pub const SUBTYPE_OFFSET: u8 = 0x1;
/// Subtype of a keyed descriptor asking the controller to invalidate the key
/// once the command completes (remote invalidation).
pub const SUBTYPE_INVALIDATE_KEY: u8 = 0xf;

/// One SGL descriptor, as carried in a command's data pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sgl {
    /// Keyed SGL Data Block, address subtype (identifier 40h): data in host
    /// memory the controller reaches with a remote access using `key`.
    KeyedDataBlock {
        /// Remote address.
        addr: u64,
        /// Length in bytes; at most [`KEYED_MAX_LEN`].
        len: u32,
        /// Remote key.
        key: u32,
    },
    /// Keyed SGL Data Block, invalidate-key subtype (identifier 4Fh): as
    /// [`Sgl::KeyedDataBlock`], and the host asks for the key to be
    /// invalidated remotely when the command completes.
    KeyedDataBlockInvalidate {
        /// Remote address.
        addr: u64,
        /// Length in bytes; at most [`KEYED_MAX_LEN`].
        len: u32,
        /// Remote key, to invalidate on completion.
        key: u32,
    },
    /// Data Block, offset subtype (identifier 01h): data carried in the
    /// command capsule itself, starting `offset` bytes into the in-capsule
    /// data area.
    DataBlockOffset {
        /// Offset from the start of the in-capsule data.
        offset: u64,
        /// Length in bytes.
        len: u32,
    },
    /// Transport SGL Data Block (identifier 50h): the transport carries the
    /// data. In chanio's binding, the host pushes it into slots the I/O unit
    /// granted, right after the command, in order.
    TransportDataBlock {
        /// Length in bytes.
        len: u32,
    },
}

impl Sgl {
    /// Encodes as a 16-byte descriptor.
    ///
    /// # Errors
    /// [`NvmeError::SglLength`] if a keyed descriptor's length does not fit in
    /// 24 bits.
    pub fn encode(&self) -> Result<[u8; SGL_LEN], NvmeError> {
        let mut b = [0u8; SGL_LEN];
        match *self {
            Sgl::KeyedDataBlock { addr, len, key } | Sgl::KeyedDataBlockInvalidate { addr, len, key } => {
                if len > KEYED_MAX_LEN {
                    return Err(NvmeError::SglLength { len });
                }
                put_u64(&mut b, 0, addr);
                b[8..11].copy_from_slice(&len.to_le_bytes()[..3]);
                put_u32(&mut b, 11, key);
            }
            Sgl::DataBlockOffset { offset, len } => {
                put_u64(&mut b, 0, offset);
                put_u32(&mut b, 8, len);
            }
            Sgl::TransportDataBlock { len } => put_u32(&mut b, 8, len),
        }
        b[15] = self.identifier();
        Ok(b)
    }

    /// Decodes a 16-byte descriptor.
    ///
    /// # Errors
    /// [`NvmeError::Length`] unless `b` is 16 bytes; [`NvmeError::UnsupportedSgl`]
    /// for any type and subtype other than keyed data block (address or
    /// invalidate) and data block (offset).
    pub fn decode(b: &[u8]) -> Result<Sgl, NvmeError> {
        super::check_len("SGL descriptor", b, SGL_LEN)?;
        let (sgl_type, subtype) = (b[15] >> 4, b[15] & 0xf);
        let keyed = || {
            (
                get_u64(b, 0),
                u32::from_le_bytes([b[8], b[9], b[10], 0]),
                get_u32(b, 11),
            )
        };
        match (sgl_type, subtype) {
            (TYPE_KEYED_DATA_BLOCK, SUBTYPE_ADDRESS) => {
                let (addr, len, key) = keyed();
                Ok(Sgl::KeyedDataBlock { addr, len, key })
            }
            (TYPE_KEYED_DATA_BLOCK, SUBTYPE_INVALIDATE_KEY) => {
                let (addr, len, key) = keyed();
                Ok(Sgl::KeyedDataBlockInvalidate { addr, len, key })
            }
            (TYPE_DATA_BLOCK, SUBTYPE_OFFSET) => Ok(Sgl::DataBlockOffset {
                offset: get_u64(b, 0),
                len: get_u32(b, 8),
            }),
            (TYPE_TRANSPORT_DATA_BLOCK, SUBTYPE_ADDRESS) => Ok(Sgl::TransportDataBlock { len: get_u32(b, 8) }),
            _ => Err(NvmeError::UnsupportedSgl { sgl_type, subtype }),
        }
    }

    /// The SGL identifier byte: `type << 4 | subtype`.
    pub fn identifier(&self) -> u8 {
        match self {
            Sgl::KeyedDataBlock { .. } => TYPE_KEYED_DATA_BLOCK << 4 | SUBTYPE_ADDRESS,
            Sgl::KeyedDataBlockInvalidate { .. } => TYPE_KEYED_DATA_BLOCK << 4 | SUBTYPE_INVALIDATE_KEY,
            Sgl::DataBlockOffset { .. } => TYPE_DATA_BLOCK << 4 | SUBTYPE_OFFSET,
            Sgl::TransportDataBlock { .. } => TYPE_TRANSPORT_DATA_BLOCK << 4 | SUBTYPE_ADDRESS,
        }
    }

    /// Length of the data the descriptor describes, in bytes.
    pub fn len(&self) -> u32 {
        match *self {
            Sgl::KeyedDataBlock { len, .. }
            | Sgl::KeyedDataBlockInvalidate { len, .. }
            | Sgl::DataBlockOffset { len, .. }
            | Sgl::TransportDataBlock { len } => len,
        }
    }

    /// Whether the descriptor describes no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the data sits in host memory behind a key (rather than in the
    /// capsule).
    pub fn is_keyed(&self) -> bool {
        matches!(self, Sgl::KeyedDataBlock { .. } | Sgl::KeyedDataBlockInvalidate { .. })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn keyed_layout_matches_spec() {
        let sgl = Sgl::KeyedDataBlock {
            addr: 0x1122_3344_5566_7788,
            len: 0x00ab_cdef,
            key: 0xdead_beef,
        };
        let b = sgl.encode().unwrap();
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[8..11], &[0xef, 0xcd, 0xab]);
        assert_eq!(&b[11..15], &0xdead_beefu32.to_le_bytes());
        assert_eq!(b[15], 0x40);
        assert_eq!(Sgl::decode(&b), Ok(sgl));
        let inv = Sgl::KeyedDataBlockInvalidate {
            addr: 1,
            len: 2,
            key: 3,
        };
        assert_eq!(inv.encode().unwrap()[15], 0x4f);
    }

    #[test]
    fn offset_layout_matches_spec() {
        let sgl = Sgl::DataBlockOffset { offset: 0, len: 4096 };
        let b = sgl.encode().unwrap();
        assert_eq!(&b[8..12], &4096u32.to_le_bytes());
        assert_eq!(&b[12..15], &[0, 0, 0]);
        assert_eq!(b[15], 0x01);
        assert!(!sgl.is_keyed());
        assert_eq!(sgl.len(), 4096);
    }

    #[test]
    fn keyed_length_limited_to_24_bits() {
        let ok = Sgl::KeyedDataBlock {
            addr: 0,
            len: KEYED_MAX_LEN,
            key: 0,
        };
        assert!(ok.encode().is_ok());
        let big = Sgl::KeyedDataBlock {
            addr: 0,
            len: KEYED_MAX_LEN + 1,
            key: 0,
        };
        assert_eq!(big.encode(), Err(NvmeError::SglLength { len: 1 << 24 }));
        // A data block carries a full 32-bit length.
        assert!(Sgl::DataBlockOffset {
            offset: 0,
            len: u32::MAX
        }
        .encode()
        .is_ok());
    }

    #[test]
    fn unknown_types_are_refused() {
        let mut b = [0u8; SGL_LEN];
        b[15] = 0x30; // Last Segment
        assert_eq!(
            Sgl::decode(&b),
            Err(NvmeError::UnsupportedSgl {
                sgl_type: 3,
                subtype: 0
            })
        );
        b[15] = 0x00; // Data Block with an address: PCIe only
        assert!(Sgl::decode(&b).is_err());
        b[15] = 0x5a; // Transport SGL Data Block
        let e = Sgl::decode(&b).unwrap_err();
        assert_eq!(e.to_string(), "unsupported SGL descriptor type 5h subtype Ah");
        assert!(Sgl::decode(&b[..15]).is_err());
    }

    fn any_sgl() -> impl Strategy<Value = Sgl> {
        prop_oneof![
            (any::<u64>(), 0..=KEYED_MAX_LEN, any::<u32>()).prop_map(|(addr, len, key)| Sgl::KeyedDataBlock {
                addr,
                len,
                key
            }),
            (any::<u64>(), 0..=KEYED_MAX_LEN, any::<u32>())
                .prop_map(|(addr, len, key)| { Sgl::KeyedDataBlockInvalidate { addr, len, key } }),
            (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Sgl::DataBlockOffset { offset, len }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(sgl in any_sgl()) {
            prop_assert_eq!(Sgl::decode(&sgl.encode().unwrap()), Ok(sgl));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Sgl::decode(&bytes);
        }
    }
}
