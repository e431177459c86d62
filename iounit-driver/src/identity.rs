//! The identity hosts see, kept across restarts: the controller's serial
//! number and each namespace's NGUID and UUID (what udev's
//! `/dev/disk/by-id` names and multipath match). They live in a state file
//! (`--state`, by default `iounitd.state` beside the configuration file)
//! that iounitd writes, never the operator:
//!
//! ```toml
//! # iounitd state: the identity hosts see. Written by iounitd.
//! serial = "CHANIO1F2E3D4C5B6A79"
//!
//! [namespace.1]
//! backing = "/var/lib/chanio/disk.img"
//! nguid = "8c1d5e0a9b7f4e2d8a6c3b1f0e9d7c5a"
//! uuid = "5a7c9d0e-1f3b-4c6a-8d2e-4f7b9a0e5d1c"
//! ```
//!
//! A namespace keeps its identifiers while the same file or device backs
//! the same NSID; another backing there gets new ones. A RAM namespace gets
//! new ones at every start: its data does not survive one, so hosts must
//! not take it for the same device.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use nvme::descriptors::uuid_text;
use nvme::NamespaceIds;
use serde::Deserialize;

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading it failed (other than its absence).
    #[error("cannot read the state file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Its contents are not what iounitd writes.
    #[error("the state file {path} is damaged: {reason} (move it aside to start with a new identity)")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing it failed.
    #[error("cannot write the state file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No random bytes for new identifiers.
    #[error("no random bytes for new identifiers: {0}")]
    Random(std::io::Error),
}

/// The serial number and namespace identifiers, and where they are kept.
#[derive(Debug)]
pub struct Identity {
    serial: String,
    namespaces: BTreeMap<u32, Kept>,
    path: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    backing: String,
    ids: NamespaceIds,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    serial: String,
    #[serde(default)]
    namespace: BTreeMap<String, KeptFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeptFile {
    backing: String,
    nguid: String,
    uuid: String,
}

/// Longest serial number (Identify Controller's SN field).
const SERIAL_LEN: usize = 20;

impl Identity {
    /// An identity kept nowhere: a new serial number now, and new
    /// namespace identifiers at every start.
    pub fn ephemeral() -> Identity {
        Identity {
            serial: new_serial(),
            namespaces: BTreeMap::new(),
            path: None,
        }
    }

    /// The identity kept in `path`, made (and written) when the file does
    /// not exist yet.
    ///
    /// # Errors
    /// [`IdentityError`] when the file cannot be read, parsed or written.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let mut text = String::new();
        match std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Identity {
                    path: Some(path.to_path_buf()),
                    ..Identity::ephemeral()
                };
                identity.save()?;
                return Ok(identity);
            }
            Err(source) => {
                return Err(IdentityError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let damaged = |reason: String| IdentityError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        let file: StateFile = toml::from_str(&text).map_err(|e| damaged(e.to_string()))?;
        check_serial(&file.serial).map_err(damaged)?;
        let mut namespaces = BTreeMap::new();
        for (nsid, kept) in file.namespace {
            let n: u32 = nsid
                .parse()
                .ok()
                .filter(|&n| n != 0 && n != u32::MAX)
                .ok_or_else(|| damaged(format!("namespace {nsid:?} is not an NSID")))?;
            let ids = NamespaceIds {
                nguid: parse_hex16(&kept.nguid)
                    .ok_or_else(|| damaged(format!("namespace {n}: NGUID {:?}", kept.nguid)))?,
                uuid: parse_hex16(&kept.uuid).ok_or_else(|| damaged(format!("namespace {n}: UUID {:?}", kept.uuid)))?,
            };
            namespaces.insert(
                n,
                Kept {
                    backing: kept.backing,
                    ids,
                },
            );
        }
        Ok(Identity {
            serial: file.serial,
            namespaces,
            path: Some(path.to_path_buf()),
        })
    }

    /// The controller's serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Where the identity is kept, if anywhere.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The identifiers of namespace `nsid` backed by `backing` (a file or
    /// device path; `None` for RAM): the kept ones while the backing is
    /// the same, else new ones, written to the state file before they are
    /// returned.
    ///
    /// # Errors
    /// [`IdentityError::Write`] or [`IdentityError::Random`].
    pub fn namespace(&mut self, nsid: u32, backing: Option<&Path>) -> Result<NamespaceIds, IdentityError> {
        let Some(backing) = backing else {
            return new_ids();
        };
        let backing = backing.to_string_lossy().into_owned();
        if let Some(kept) = self.namespaces.get(&nsid).filter(|k| k.backing == backing) {
            return Ok(kept.ids);
        }
        let ids = new_ids()?;
        let old = self.namespaces.insert(nsid, Kept { backing, ids });
        if let Err(e) = self.save() {
            match old {
                Some(old) => self.namespaces.insert(nsid, old),
                None => self.namespaces.remove(&nsid),
            };
            return Err(e);
        }
        Ok(ids)
    }

    /// Writes the state file (a new file renamed over the old one, so a
    /// crash leaves one or the other).
    fn save(&self) -> Result<(), IdentityError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut text = String::from("# iounitd state: the identity hosts see. Written by iounitd.\n");
        text.push_str(&format!("serial = {}\n", toml_string(&self.serial)));
        for (nsid, kept) in &self.namespaces {
            text.push_str(&format!(
                "\n[namespace.{nsid}]\nbacking = {}\nnguid = \"{}\"\nuuid = \"{}\"\n",
                toml_string(&kept.backing),
                hex(&kept.ids.nguid),
                uuid_text(&kept.ids.uuid)
            ));
        }
        let write_err = |source| IdentityError::Write {
            path: path.clone(),
            source,
        };
        let mut tmp = path.clone().into_os_string();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(write_err)?;
        f.write_all(text.as_bytes()).map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)?;
        Ok(())
    }
}

/// `CHANIO` and 14 random hex digits: 20 characters, the SN field's size.
/// A new serial number: `CHANIO` and 14 hex digits from the process's
/// random hash keys (20 characters, the SN field's size).
pub fn new_serial() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("CHANIO{:014X}", h.finish() >> 8)
}

/// Checks a serial number: 1 to 20 printable ASCII characters (Identify
/// Controller's SN field).
///
/// # Errors
/// What is wrong with it.
pub fn check_serial(serial: &str) -> Result<(), String> {
    match !serial.is_empty() && serial.len() <= SERIAL_LEN && serial.bytes().all(|b| b.is_ascii_graphic()) {
        true => Ok(()),
        false => Err(format!(
            "serial number {serial:?} is not 1 to {SERIAL_LEN} printable ASCII characters"
        )),
    }
}

fn new_ids() -> Result<NamespaceIds, IdentityError> {
    let nguid = random16()?;
    let mut uuid = random16()?;
    // Version 4 (random), variant 10b (RFC 9562).
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(NamespaceIds { nguid, uuid })
}

fn random16() -> Result<[u8; 16], IdentityError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(IdentityError::Random)?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 16 bytes from 32 hex digits, dashes allowed between them (a UUID).
fn parse_hex16(text: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'-').collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chanio-identity-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("iounitd.state")
    }

    #[test]
    fn an_identity_survives_a_reload_and_follows_the_backing() {
        let path = state_path("reload");
        let odd = Path::new("/srv/disk \"one\"\\\u{7}.img");
        let (serial, ids) = {
            let mut id = Identity::load(&path).unwrap();
            assert_eq!(id.serial().len(), SERIAL_LEN);
            let ids = id.namespace(3, Some(odd)).unwrap();
            assert_eq!(ids.uuid[6] >> 4, 4, "a version 4 UUID");
            (id.serial().to_string(), ids)
        };
        let mut again = Identity::load(&path).unwrap();
        assert_eq!(again.serial(), serial);
        assert_eq!(again.namespace(3, Some(odd)).unwrap(), ids, "same NSID, same backing");
        let other = again.namespace(3, Some(Path::new("/srv/other.img"))).unwrap();
        assert_ne!(other, ids, "another backing is another device");
        assert_ne!(
            again.namespace(4, None).unwrap(),
            again.namespace(4, None).unwrap(),
            "RAM: new every time"
        );
        let reread = Identity::load(&path).unwrap();
        assert_eq!(reread.namespaces.get(&3).map(|k| k.ids), Some(other));
        assert!(!reread.namespaces.contains_key(&4), "RAM namespaces are not kept");
    }

    #[test]
    fn damaged_state_files_are_refused_with_the_reason() {
        let path = state_path("damaged");
        for (text, why) in [
            ("serial = 5\n", "serial"),
            ("serial = \"THIS SERIAL IS FAR TOO LONG\"\n", "printable"),
            (
                "serial = \"A\"\n[namespace.0]\nbacking = \"/x\"\nnguid = \"00\"\nuuid = \"00\"\n",
                "NSID",
            ),
            (
                "serial = \"A\"\n[namespace.1]\nbacking = \"/x\"\nnguid = \"zz\"\nuuid = \"00\"\n",
                "NGUID",
            ),
            ("serial = \"A\"\nextra = 1\n", "extra"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Identity::load(&path).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("damaged"), "{text:?}: {e}");
        }
    }
}
