//! The Namespace Identification Descriptor list (Identify, CNS 03h): the
//! identifiers a host keys a namespace by across restarts and paths (udev's
//! `/dev/disk/by-id`, multipath). Each descriptor is a type (NIDT), a
//! length (NIDL), two reserved bytes and the identifier; the list ends at
//! a zero type or at 4096 bytes.

use crate::identify::IDENTIFY_LEN;
use crate::NvmeError;

/// NIDT 02h: Namespace Globally Unique Identifier, 16 bytes.
const NIDT_NGUID: u8 = 0x02;
/// NIDT 03h: Namespace UUID, 16 bytes.
const NIDT_UUID: u8 = 0x03;
/// NIDT 04h: Command Set Identifier, 1 byte.
const NIDT_CSI: u8 = 0x04;
/// The NVM command set's CSI.
const CSI_NVM: u8 = 0x00;

/// A namespace's identifiers as CNS 03h lists them. An all-zero identifier
/// is absent (NVMe reserves zero for "not reported").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NamespaceIds {
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// Namespace UUID (RFC 9562).
    pub uuid: [u8; 16],
}

/// A UUID in its canonical text form: 8-4-4-4-12 lowercase hex digits.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

impl NamespaceIds {
    /// The 4096-byte descriptor list: NGUID and UUID where not zero, then
    /// the command set (NVM).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        let mut at = 0;
        let mut put = |nidt: u8, id: &[u8]| {
            b[at] = nidt;
            b[at + 1] = id.len() as u8;
            b[at + 4..at + 4 + id.len()].copy_from_slice(id);
            at += 4 + id.len();
        };
        if self.nguid != [0; 16] {
            put(NIDT_NGUID, &self.nguid);
        }
        if self.uuid != [0; 16] {
            put(NIDT_UUID, &self.uuid);
        }
        put(NIDT_CSI, &[CSI_NVM]);
        b
    }

    /// Reads a descriptor list; types it does not know are skipped by their
    /// length.
    ///
    /// # Errors
    /// [`NvmeError::Length`] for a list that is not 4096 bytes;
    /// [`NvmeError::InvalidField`] for a descriptor that runs past the end,
    /// or an NGUID or UUID of the wrong length.
    pub fn decode(b: &[u8]) -> Result<NamespaceIds, NvmeError> {
        crate::check_len("Namespace Identification Descriptor list", b, IDENTIFY_LEN)?;
        let bad = |reason: String| NvmeError::InvalidField {
            field: "namespace identification descriptor",
            reason,
        };
        let mut ids = NamespaceIds::default();
        let mut at = 0;
        while at + 4 <= b.len() && b[at] != 0 {
            let (nidt, nidl) = (b[at], usize::from(b[at + 1]));
            let id = b
                .get(at + 4..at + 4 + nidl)
                .ok_or_else(|| bad(format!("type {nidt:#x} of {nidl} bytes at {at} runs past the list")))?;
            let sixteen = |id: &[u8]| -> Result<[u8; 16], NvmeError> {
                id.try_into()
                    .map_err(|_| bad(format!("type {nidt:#x} of {nidl} bytes, expected 16")))
            };
            match nidt {
                NIDT_NGUID => ids.nguid = sixteen(id)?,
                NIDT_UUID => ids.uuid = sixteen(id)?,
                _ => {}
            }
            at += 4 + nidl;
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let ids = NamespaceIds {
            nguid: [0x11; 16],
            uuid: [0x22; 16],
        };
        let b = ids.encode();
        assert_eq!(&b[..4], &[NIDT_NGUID, 16, 0, 0]);
        assert_eq!(&b[20..24], &[NIDT_UUID, 16, 0, 0]);
        assert_eq!(&b[40..45], &[NIDT_CSI, 1, 0, 0, CSI_NVM]);
        assert_eq!(b[45], 0, "the list ends with a zero type");
        assert_eq!(NamespaceIds::decode(&b).unwrap(), ids);
        let none = NamespaceIds::default();
        assert_eq!(&none.encode()[..5], &[NIDT_CSI, 1, 0, 0, CSI_NVM]);
        assert_eq!(NamespaceIds::decode(&none.encode()).unwrap(), none);
        let mut u = [0u8; 16];
        u[0] = 0xab;
        u[15] = 0x01;
        assert_eq!(uuid_text(&u), "ab000000-0000-0000-0000-000000000001");
    }

    #[test]
    fn malformed_lists_are_refused() {
        assert!(NamespaceIds::decode(&[0; 100]).is_err());
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0] = NIDT_NGUID;
        b[1] = 8;
        assert!(NamespaceIds::decode(&b).is_err(), "an NGUID of 8 bytes");
        // Fifteen unknown descriptors of 256 bytes, then one that overruns.
        let mut b = vec![0u8; IDENTIFY_LEN];
        for at in (0..IDENTIFY_LEN - 256).step_by(256) {
            b[at] = 0x77;
            b[at + 1] = 252;
        }
        b[IDENTIFY_LEN - 256] = 0x77;
        b[IDENTIFY_LEN - 255] = 255;
        assert!(NamespaceIds::decode(&b).is_err(), "a descriptor past the end");
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0] = 0x01; // EUI-64: skipped
        b[1] = 8;
        b[12] = NIDT_UUID;
        b[13] = 16;
        b[16..32].copy_from_slice(&[5; 16]);
        assert_eq!(NamespaceIds::decode(&b).unwrap().uuid, [5; 16]);
    }
}
