//! Set Features and Get Features (NVMe Base 2.0 §5.27, §5.15).
//!
//! ```text
//! Set Features   CDW10: FID bits 7:0, SV (save) bit 31      CDW11..: feature value
//! Get Features   CDW10: FID bits 7:0, SEL bits 10:8         DW0 of the completion: value
//! ```
//!
//! Number of Queues (FID 07h) carries NSQR in bits 15:0 and NCQR in bits
//! 31:16 of CDW11, both 0-based; the completion's DW0 answers with the
//! allocated counts in the same layout. Keep Alive Timer (FID 0Fh) carries
//! the timeout in milliseconds in CDW11.

use super::command::{AdminOpcode, Sqe};
use super::{CommandId, NvmeError};

/// Feature identifiers (FID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FeatureId {
    /// 01h Arbitration.
    Arbitration = 0x01,
    /// 02h Power Management.
    PowerManagement = 0x02,
    /// 04h Temperature Threshold.
    TemperatureThreshold = 0x04,
    /// 05h Error Recovery.
    ErrorRecovery = 0x05,
    /// 06h Volatile Write Cache.
    VolatileWriteCache = 0x06,
    /// 07h Number of Queues.
    NumberOfQueues = 0x07,
    /// 08h Interrupt Coalescing.
    InterruptCoalescing = 0x08,
    /// 0Ah Write Atomicity Normal.
    WriteAtomicityNormal = 0x0a,
    /// 0Bh Asynchronous Event Configuration.
    AsyncEventConfiguration = 0x0b,
    /// 0Eh Timestamp.
    Timestamp = 0x0e,
    /// 0Fh Keep Alive Timer.
    KeepAliveTimer = 0x0f,
}

impl FeatureId {
    /// The feature with this identifier, or `None` for one this module does
    /// not know.
    pub fn from_u8(v: u8) -> Option<FeatureId> {
        Some(match v {
            0x01 => FeatureId::Arbitration,
            0x02 => FeatureId::PowerManagement,
            0x04 => FeatureId::TemperatureThreshold,
            0x05 => FeatureId::ErrorRecovery,
            0x06 => FeatureId::VolatileWriteCache,
            0x07 => FeatureId::NumberOfQueues,
            0x08 => FeatureId::InterruptCoalescing,
            0x0a => FeatureId::WriteAtomicityNormal,
            0x0b => FeatureId::AsyncEventConfiguration,
            0x0e => FeatureId::Timestamp,
            0x0f => FeatureId::KeepAliveTimer,
            _ => return None,
        })
    }
}

impl From<FeatureId> for u8 {
    fn from(fid: FeatureId) -> u8 {
        fid as u8
    }
}

/// Which value Get Features returns (SEL, CDW10 bits 10:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum FeatureSelect {
    /// 000b: the current value.
    #[default]
    Current = 0,
    /// 001b: the default value.
    Default = 1,
    /// 010b: the saved value.
    Saved = 2,
    /// 011b: the feature's capabilities (saveable, per namespace,
    /// changeable).
    SupportedCapabilities = 3,
}

impl Sqe {
    /// A Set Features command for `fid` with `value` in CDW11, saved across
    /// resets when `save` is set.
    pub fn set_features(command_id: CommandId, fid: FeatureId, value: u32, save: bool) -> Sqe {
        Sqe {
            cdw10: u32::from(u8::from(fid)) | u32::from(save) << 31,
            cdw11: value,
            ..Sqe::new(AdminOpcode::SetFeatures.into(), command_id)
        }
    }

    /// A Get Features command for `fid`.
    pub fn get_features(command_id: CommandId, fid: FeatureId, select: FeatureSelect) -> Sqe {
        Sqe {
            cdw10: u32::from(u8::from(fid)) | (select as u32) << 8,
            ..Sqe::new(AdminOpcode::GetFeatures.into(), command_id)
        }
    }

    /// The feature of a Set or Get Features command (CDW10 bits 7:0).
    ///
    /// # Errors
    /// [`NvmeError::Unknown`] for a feature this module does not know.
    pub fn feature_id(&self) -> Result<FeatureId, NvmeError> {
        let v = self.cdw10 as u8;
        FeatureId::from_u8(v).ok_or(NvmeError::Unknown {
            field: "feature identifier",
            value: v.into(),
        })
    }

    /// Save (SV, CDW10 bit 31) of a Set Features command.
    pub fn feature_save(&self) -> bool {
        self.cdw10 & 1 << 31 != 0
    }

    /// Select (SEL, CDW10 bits 10:8) of a Get Features command.
    ///
    /// # Errors
    /// [`NvmeError::Reserved`] for 100b..111b.
    pub fn feature_select(&self) -> Result<FeatureSelect, NvmeError> {
        match (self.cdw10 >> 8) & 0x7 {
            0 => Ok(FeatureSelect::Current),
            1 => Ok(FeatureSelect::Default),
            2 => Ok(FeatureSelect::Saved),
            3 => Ok(FeatureSelect::SupportedCapabilities),
            v => Err(NvmeError::Reserved { field: "SEL", value: v }),
        }
    }
}

/// The Number of Queues feature (FID 07h): I/O submission and completion
/// queue counts, excluding the admin queue. The same layout serves the
/// request (CDW11: NSQR, NCQR) and the answer (DW0: NSQA, NCQA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NumberOfQueues {
    submission: u16,
    completion: u16,
}

impl NumberOfQueues {
    /// Most I/O queues of each kind (the 0-based value FFFFh is invalid).
    pub const MAX: u16 = 0xffff;

    /// `submission` I/O submission queues and `completion` I/O completion
    /// queues.
    ///
    /// # Errors
    /// [`NvmeError::OutOfRange`] if either count is 0.
    pub fn new(submission: u16, completion: u16) -> Result<NumberOfQueues, NvmeError> {
        for (field, n) in [
            ("I/O submission queue count", submission),
            ("I/O completion queue count", completion),
        ] {
            if n == 0 {
                return Err(NvmeError::OutOfRange {
                    field,
                    value: 0,
                    min: 1,
                    max: NumberOfQueues::MAX.into(),
                });
            }
        }
        Ok(NumberOfQueues { submission, completion })
    }

    /// Number of I/O submission queues.
    pub fn submission(&self) -> u16 {
        self.submission
    }

    /// Number of I/O completion queues.
    pub fn completion(&self) -> u16 {
        self.completion
    }

    /// The CDW11 or DW0 value: 0-based submission count in bits 15:0,
    /// 0-based completion count in bits 31:16.
    pub fn to_dword(self) -> u32 {
        u32::from(self.submission - 1) | u32::from(self.completion - 1) << 16
    }

    /// Reads a CDW11 or DW0 value.
    ///
    /// # Errors
    /// [`NvmeError::OutOfRange`] if either 0-based count is FFFFh.
    pub fn from_dword(v: u32) -> Result<NumberOfQueues, NvmeError> {
        let (nsq, ncq) = (v as u16, (v >> 16) as u16);
        for (field, n) in [("NSQR", nsq), ("NCQR", ncq)] {
            if n == 0xffff {
                return Err(NvmeError::OutOfRange {
                    field,
                    value: n.into(),
                    min: 0,
                    max: 0xfffe,
                });
            }
        }
        Ok(NumberOfQueues {
            submission: nsq + 1,
            completion: ncq + 1,
        })
    }
}

/// The Keep Alive Timer feature (FID 0Fh): the Keep Alive Timeout in
/// milliseconds, 0 to disable. Over fabrics the host normally sets it with
/// Connect's KATO instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KeepAliveTimer {
    /// Keep Alive Timeout (KATO) in milliseconds.
    pub timeout_ms: u32,
}

impl KeepAliveTimer {
    /// The CDW11 (Set Features) or DW0 (Get Features) value.
    pub fn to_dword(self) -> u32 {
        self.timeout_ms
    }

    /// Reads a CDW11 or DW0 value.
    pub fn from_dword(v: u32) -> KeepAliveTimer {
        KeepAliveTimer { timeout_ms: v }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn set_features_layout_matches_spec() {
        let q = NumberOfQueues::new(4, 8).unwrap();
        let sqe = Sqe::set_features(CommandId(1), FeatureId::NumberOfQueues, q.to_dword(), true);
        let b = sqe.encode();
        assert_eq!(b[0], 0x09);
        assert_eq!(b[40], 0x07, "FID at byte 40");
        assert_eq!(b[43], 0x80, "SV at CDW10 bit 31");
        assert_eq!(&b[44..48], &[3, 0, 7, 0], "NSQR, NCQR 0-based in CDW11");
        let back = Sqe::decode(&b).unwrap();
        assert_eq!(back.feature_id(), Ok(FeatureId::NumberOfQueues));
        assert!(back.feature_save());
        assert_eq!(NumberOfQueues::from_dword(back.cdw11), Ok(q));
    }

    #[test]
    fn get_features_layout_matches_spec() {
        let sqe = Sqe::get_features(CommandId(1), FeatureId::KeepAliveTimer, FeatureSelect::Saved);
        assert_eq!(sqe.opcode, 0x0a);
        assert_eq!(sqe.cdw10, 0x0f | 2 << 8);
        assert_eq!(sqe.feature_select(), Ok(FeatureSelect::Saved));
        assert!(!sqe.feature_save());
        let mut bad = sqe;
        bad.cdw10 = 0x5ff;
        assert_eq!(
            bad.feature_select(),
            Err(NvmeError::Reserved { field: "SEL", value: 5 })
        );
        assert_eq!(
            bad.feature_id(),
            Err(NvmeError::Unknown {
                field: "feature identifier",
                value: 0xff
            })
        );
        let kato = KeepAliveTimer { timeout_ms: 15_000 };
        let set = Sqe::set_features(CommandId(1), FeatureId::KeepAliveTimer, kato.to_dword(), false);
        assert_eq!(set.cdw11, 15_000);
        assert_eq!(KeepAliveTimer::from_dword(set.cdw11), kato);
    }

    #[test]
    fn queue_counts() {
        assert!(NumberOfQueues::new(0, 1).is_err());
        assert!(NumberOfQueues::new(1, 0).is_err());
        let max = NumberOfQueues::new(0xffff, 1).unwrap();
        assert_eq!(max.to_dword(), 0xfffe);
        assert!(NumberOfQueues::from_dword(0x0000_ffff).is_err());
        assert!(NumberOfQueues::from_dword(0xffff_0000).is_err());
        let q = NumberOfQueues::from_dword(0).unwrap();
        assert_eq!((q.submission(), q.completion()), (1, 1));
        for v in 0..=255u8 {
            if let Some(fid) = FeatureId::from_u8(v) {
                assert_eq!(u8::from(fid), v);
            }
        }
    }

    proptest! {
        #[test]
        fn queue_round_trip(sq in 1u16..=0xffff, cq in 1u16..=0xffff) {
            let q = NumberOfQueues::new(sq, cq).unwrap();
            prop_assert_eq!(NumberOfQueues::from_dword(q.to_dword()), Ok(q));
        }

        #[test]
        fn from_dword_never_panics(v: u32) {
            let _ = NumberOfQueues::from_dword(v);
        }
    }
}
