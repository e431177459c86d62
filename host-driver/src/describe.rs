//! Identify data in human form, for CLIs and logs.
//!
//! ```
//! use host::describe::{Bytes, ControllerSummary};
//! let id = host::IdentifyController::default();
//! println!("{}", ControllerSummary(&id));
//! assert_eq!(Bytes(64 << 20).to_string(), "64 MiB");
//! ```

use std::fmt;

use nvme::{IdentifyController, IdentifyNamespace};

/// Identify Controller, one field per line.
#[derive(Debug, Clone, Copy)]
pub struct ControllerSummary<'a>(pub &'a IdentifyController);

impl fmt::Display for ControllerSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.0;
        let ver = id.ver;
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "controller id:      {}", id.cntlid)?;
        writeln!(f, "model:              {}", id.mn.text())?;
        writeln!(f, "serial:             {}", id.sn.text())?;
        writeln!(f, "firmware:           {}", id.fr.text())?;
        writeln!(
            f,
            "NVMe version:       {}.{}.{}",
            ver >> 16,
            (ver >> 8) & 0xff,
            ver & 0xff
        )?;
        match &id.subnqn {
            Some(n) => writeln!(f, "subsystem NQN:      {n}")?,
            None => writeln!(f, "subsystem NQN:      (none)")?,
        }
        let mdts = if id.mdts == 0 {
            "unlimited".to_string()
        } else {
            Bytes(4096u64 << id.mdts.min(40)).to_string()
        };
        writeln!(f, "max transfer:       {mdts}")?;
        writeln!(f, "namespaces (max):   {}", id.nn)?;
        writeln!(f, "max commands:       {}", id.maxcmd)?;
        writeln!(f, "keep alive unit:    {} ms", u32::from(id.kas) * 100)?;
        writeln!(
            f,
            "write zeroes:       {}",
            yes(id.oncs & IdentifyController::ONCS_WRITE_ZEROES != 0)
        )?;
        writeln!(
            f,
            "deallocate (trim):  {}",
            yes(id.oncs & IdentifyController::ONCS_DATASET_MANAGEMENT != 0)
        )?;
        writeln!(
            f,
            "volatile cache:     {}",
            yes(id.vwc & IdentifyController::VWC_PRESENT != 0)
        )?;
        writeln!(
            f,
            "capsule size:       {} bytes command, {} bytes response",
            u64::from(id.ioccsz) * 16,
            u64::from(id.iorcsz) * 16
        )?;
        write!(
            f,
            "namespace events:   {}",
            yes(id.oaes & IdentifyController::OAES_NAMESPACE_ATTRIBUTE != 0)
        )
    }
}

/// Identify Namespace, one field per line.
#[derive(Debug, Clone, Copy)]
pub struct NamespaceSummary<'a>(pub &'a IdentifyNamespace);

impl fmt::Display for NamespaceSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.0;
        match id.block_size() {
            Ok(bs) => {
                writeln!(
                    f,
                    "size:               {} ({} blocks)",
                    Bytes(id.nsze.saturating_mul(bs.into())),
                    id.nsze
                )?;
                writeln!(f, "block size:         {bs} bytes")?;
            }
            Err(e) => {
                writeln!(f, "size:               {} blocks", id.nsze)?;
                writeln!(f, "block size:         unknown ({e})")?;
            }
        }
        writeln!(f, "capacity:           {} blocks", id.ncap)?;
        writeln!(f, "utilization:        {} blocks", id.nuse)?;
        writeln!(f, "LBA formats:        {}", id.lba_formats.len())?;
        writeln!(
            f,
            "thin provisioning:  {}",
            if id.nsfeat & IdentifyNamespace::NSFEAT_THIN_PROVISIONING != 0 {
                "yes"
            } else {
                "no"
            }
        )?;
        let nguid: String = id.nguid.iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "NGUID:              {nguid}")
    }
}

/// A UUID in its canonical text form (8-4-4-4-12 hex digits); "none"
/// when all zero (not reported).
pub fn uuid_text(u: &[u8; 16]) -> String {
    if *u == [0; 16] {
        return "none".into();
    }
    nvme::descriptors::uuid_text(u)
}

/// A byte count in binary units ("4 KiB", "1.5 GiB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut unit = 0;
        let mut v = self.0;
        while v >= 1024 && v % 1024 == 0 && unit < UNITS.len() - 1 {
            v /= 1024;
            unit += 1;
        }
        if unit > 0 || self.0 < 1024 {
            return write!(f, "{v} {}", UNITS[unit]);
        }
        let mut x = self.0 as f64;
        let mut unit = 0;
        while x >= 1024.0 && unit < UNITS.len() - 1 {
            x /= 1024.0;
            unit += 1;
        }
        write!(f, "{x:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(Bytes(0).to_string(), "0 bytes");
        assert_eq!(Bytes(512).to_string(), "512 bytes");
        assert_eq!(Bytes(4096).to_string(), "4 KiB");
        assert_eq!(Bytes(64 << 20).to_string(), "64 MiB");
        assert_eq!(Bytes(1536 << 20).to_string(), "1536 MiB");
        assert_eq!(Bytes((1536 << 10) + 1).to_string(), "1.5 MiB");
        assert_eq!(Bytes(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn summaries_name_fields() {
        let id = IdentifyController {
            cntlid: 7,
            mdts: 7,
            ..IdentifyController::default()
        };
        let text = ControllerSummary(&id).to_string();
        assert!(text.contains("controller id:      7"), "{text}");
        assert!(text.contains("max transfer:       512 KiB"), "{text}");
        let ns = IdentifyNamespace::new(2048, 512).unwrap();
        let text = NamespaceSummary(&ns).to_string();
        assert!(text.contains("1 MiB (2048 blocks)"), "{text}");
        assert!(text.contains("block size:         512 bytes"), "{text}");
    }
}
