//! Connection options and target URIs.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use nvme::transport;
use nvme::{HostId, Nqn};

use crate::HostError;

/// Largest number of I/O queues a host asks for.
pub const MAX_IO_QUEUES: u16 = 64;

/// How a [`Host`](crate::Host) connects and behaves. `Default` gives
/// sensible values; change fields as needed:
///
/// ```
/// use std::time::Duration;
/// let opts = host::HostOptions {
///     io_queues: 4,
///     command_timeout: Duration::from_secs(5),
///     ..host::HostOptions::default()
/// };
/// assert!(opts.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostOptions {
    /// This host's NQN, sent in every Connect. The default is the
    /// machine's `/etc/nvme/hostnqn`, or one derived from its hostname (see
    /// [`default_hostnqn`]).
    pub hostnqn: String,
    /// The subsystem to connect to.
    pub subnqn: String,
    /// I/O queues to ask for; the I/O unit may grant fewer (Set Features,
    /// Number of Queues), and the host uses what it grants.
    pub io_queues: u16,
    /// Entries per I/O queue: commands in flight per queue.
    pub queue_depth: u16,
    /// How long one call (all its commands, retries included) may take.
    pub command_timeout: Duration,
    /// Keep Alive Timeout announced to the I/O unit; a Keep Alive is sent
    /// every half of it. From 100 ms to the most an I/O unit accepts
    /// (`nvme::transport::KATO_MS`, 300 s); keep alive cannot be
    /// disabled.
    pub keep_alive: Duration,
    /// After a connection loss, how long commands wait for the host to
    /// reconnect before failing with [`HostError::ConnectionLost`].
    pub reconnect_deadline: Duration,
    /// How long setting up one queue (TCP connection and Fabrics Connect)
    /// may take.
    pub connect_timeout: Duration,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            hostnqn: default_hostnqn(),
            subnqn: nvme::transport::DEFAULT_NQN.to_string(),
            io_queues: 1,
            queue_depth: 32,
            command_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            reconnect_deadline: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl HostOptions {
    /// Checks every field.
    ///
    /// # Errors
    /// [`HostError::InvalidArgument`] naming the first bad field.
    pub fn validate(&self) -> Result<(), HostError> {
        let bad = |msg: String| Err(HostError::InvalidArgument(msg));
        if let Err(e) = Nqn::new(self.hostnqn.clone()) {
            return bad(format!("host NQN {:?}: {e}", self.hostnqn));
        }
        if let Err(e) = Nqn::new(self.subnqn.clone()) {
            return bad(format!("subsystem NQN {:?}: {e}", self.subnqn));
        }
        if self.io_queues == 0 || self.io_queues > MAX_IO_QUEUES {
            return bad(format!("io_queues {} is outside 1..={MAX_IO_QUEUES}", self.io_queues));
        }
        if self.queue_depth < 2 || self.queue_depth > transport::MAX_QUEUE_DEPTH {
            return bad(format!(
                "queue_depth {} is outside 2..={}",
                self.queue_depth,
                transport::MAX_QUEUE_DEPTH
            ));
        }
        if self.command_timeout.is_zero() {
            return bad("command_timeout must be more than zero".into());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be more than zero".into());
        }
        let max_kato = Duration::from_millis((*transport::KATO_MS.end()).into());
        if self.keep_alive < Duration::from_millis(100) || self.keep_alive > max_kato {
            return bad(format!(
                "keep_alive {:?} is outside 100ms..={max_kato:?} (an I/O unit frees the controller \
                 of a host silent for that long, and keep alive cannot be disabled)",
                self.keep_alive
            ));
        }
        Ok(())
    }

    /// KATO in milliseconds.
    pub(crate) fn kato_ms(&self) -> u32 {
        u32::try_from(self.keep_alive.as_millis()).unwrap_or(u32::MAX)
    }
}

/// The transport a [`TargetUri`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// The tcp fabric provider.
    Tcp,
    /// RDMA through the verbs provider (builds with the `verbs` feature).
    Rdma,
    /// Shared memory on one host.
    Shm,
    /// The best fabric both ends have (verbs, then shm, then tcp).
    Auto,
}

impl Transport {
    /// The scheme (`"tcp"`, `"rdma"`, `"shm"`, `"auto"`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Rdma => "rdma",
            Transport::Shm => "shm",
            Transport::Auto => "auto",
        }
    }

    pub(crate) fn scheme(self) -> messaging::Scheme {
        match self {
            Transport::Tcp => messaging::Scheme::Tcp,
            Transport::Rdma => messaging::Scheme::Rdma,
            Transport::Shm => messaging::Scheme::Shm,
            Transport::Auto => messaging::Scheme::Auto,
        }
    }
}

/// A parsed target address: `tcp://HOST:PORT`, `rdma://HOST:PORT`,
/// `shm://NAME`, or `auto://HOST:PORT` (also written `HOST:PORT`).
///
/// ```
/// let uri: host::TargetUri = "127.0.0.1:4520".parse().unwrap();
/// assert_eq!(uri.to_string(), "auto://127.0.0.1:4520");
/// assert!("ftp://10.0.0.1:4420".parse::<host::TargetUri>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetUri {
    transport: Transport,
    addr: String,
}

impl TargetUri {
    /// Parses a URI.
    ///
    /// # Errors
    /// [`HostError::InvalidUri`] for an unknown scheme, or an address that
    /// is not `HOST:PORT` (not a name, for shm).
    pub fn parse(uri: &str) -> Result<TargetUri, HostError> {
        let bad = |reason: String| HostError::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        let uri_trimmed = uri.trim();
        let (scheme, addr) = match uri_trimmed.split_once("://") {
            Some((scheme, addr)) => (scheme.to_ascii_lowercase(), addr),
            None => ("auto".to_string(), uri_trimmed),
        };
        let transport = match scheme.as_str() {
            "tcp" => Transport::Tcp,
            "rdma" => Transport::Rdma,
            "shm" => Transport::Shm,
            "auto" => Transport::Auto,
            other => {
                return Err(bad(format!(
                    "unknown transport {other:?}; use tcp://HOST:PORT, rdma://HOST:PORT, shm://NAME or auto://HOST:PORT"
                )))
            }
        };
        let addr = addr.trim_end_matches('/');
        if transport == Transport::Shm {
            if addr.is_empty() {
                return Err(bad("missing shared-memory name, e.g. shm://unit0".into()));
            }
            return Ok(TargetUri {
                transport,
                addr: addr.to_string(),
            });
        }
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| bad("missing port; expected HOST:PORT, e.g. tcp://127.0.0.1:4520".into()))?;
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner.ends_with(']') && inner.len() > 1
        } else {
            !host.is_empty() && !host.contains(':') && !host.contains('/')
        };
        if !host_ok {
            return Err(bad(format!("{host:?} is not a host name or address")));
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {}
            _ => return Err(bad(format!("port {port:?} is not a number in 1..=65535"))),
        }
        Ok(TargetUri {
            transport,
            addr: addr.to_string(),
        })
    }

    /// The transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The provider address (`HOST:PORT`, or a name for shm).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn to_transport_uri(&self) -> messaging::TransportUri {
        messaging::TransportUri {
            scheme: self.transport.scheme(),
            addr: self.addr.clone(),
        }
    }
}

impl fmt::Display for TargetUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.transport.name(), self.addr)
    }
}

impl TargetUri {
    /// Parses a URI that may list alternate addresses of the same
    /// subsystem after the first, comma-separated, each `HOST:PORT` (or a
    /// name for shm) or with the same scheme spelled out:
    /// `tcp://10.0.0.1:4520,10.0.0.2:4520`. The host reconnects to them in
    /// turn when the current one is lost (a replicated namespace's new
    /// primary). Returns the first, and the others' addresses.
    ///
    /// # Errors
    /// As [`TargetUri::parse`]; alternates with another scheme, or with
    /// `auto` (the transport must be one for all), are refused.
    pub fn parse_with_alternates(uri: &str) -> Result<(TargetUri, Vec<String>), HostError> {
        let mut parts = uri.split(',');
        let first = TargetUri::parse(parts.next().unwrap_or_default())?;
        let mut alternates = Vec::new();
        for part in parts {
            let part = part.trim();
            if first.transport() == Transport::Auto {
                return Err(HostError::InvalidUri {
                    uri: uri.to_string(),
                    reason: "alternate addresses need one transport for all: start with tcp://, rdma:// or shm://"
                        .into(),
                });
            }
            let alt = match part.contains("://") {
                true => TargetUri::parse(part)?,
                false => TargetUri::parse(&format!("{}://{part}", first.transport().name()))?,
            };
            if alt.transport() != first.transport() {
                return Err(HostError::InvalidUri {
                    uri: uri.to_string(),
                    reason: format!("alternate {part:?} uses another transport than {first}"),
                });
            }
            alternates.push(alt.addr().to_string());
        }
        Ok((first, alternates))
    }
}

impl FromStr for TargetUri {
    type Err = HostError;

    fn from_str(s: &str) -> Result<TargetUri, HostError> {
        TargetUri::parse(s)
    }
}

/// Where nvme-cli keeps the machine's host NQN and host ID.
const NVME_DIR: &str = "/etc/nvme";

/// The default host NQN: the machine's, as nvme-cli keeps it in
/// `/etc/nvme/hostnqn`; without that file, `nqn.2014-08.org.nvmexpress:uuid:`
/// and a stable UUID-shaped hash of the machine's hostname, so that one
/// machine always presents the same identity.
pub fn default_hostnqn() -> String {
    system_identity(Path::new(NVME_DIR))
        .0
        .unwrap_or_else(|| format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid_text(&host_uuid(&hostname()))))
}

/// The host identifier sent in Connect: the machine's (`/etc/nvme/hostid`)
/// when `hostnqn` is the machine's NQN (`/etc/nvme/hostnqn`); otherwise the
/// same 16 bytes as the UUID in a UUID-form NQN, or a hash of a custom NQN.
pub(crate) fn host_id(hostnqn: &str) -> HostId {
    host_id_in(Path::new(NVME_DIR), hostnqn)
}

fn host_id_in(dir: &Path, hostnqn: &str) -> HostId {
    if let (Some(nqn), Some(id)) = system_identity(dir) {
        if nqn == hostnqn {
            return HostId(id);
        }
    }
    match hostnqn
        .strip_prefix("nqn.2014-08.org.nvmexpress:uuid:")
        .and_then(parse_uuid)
    {
        Some(bytes) => HostId(bytes),
        None => HostId(host_uuid(hostnqn)),
    }
}

/// The host NQN and host ID that `dir` (`/etc/nvme`) holds, each when its
/// file is there and well formed (`hostnqn` a valid NQN, `hostid` a UUID).
fn system_identity(dir: &Path) -> (Option<String>, Option<[u8; 16]>) {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|t| t.trim().to_string())
    };
    let nqn = read("hostnqn").filter(|n| Nqn::new(n.clone()).is_ok());
    let id = read("hostid").and_then(|t| parse_uuid(&t));
    (nqn, id)
}

fn hostname() -> String {
    for path in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            let name = text.trim();
            if !name.is_empty() {
                return name.to_string();
            }
        }
    }
    std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_string())
}

/// 16 stable bytes from a name (two FNV-1a passes), shaped as a version 4,
/// variant 1 UUID.
fn host_uuid(name: &str) -> [u8; 16] {
    let fnv = |seed: u64| {
        name.bytes()
            .fold(seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
    };
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_be_bytes());
    b[8..].copy_from_slice(&fnv(0x6c62_272e_07bb_0142).to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

fn uuid_text(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternates_share_the_first_addresses_transport() {
        let (first, alts) = TargetUri::parse_with_alternates("tcp://10.0.0.1:4520,10.0.0.2:4520,tcp://h:1").unwrap();
        assert_eq!(first.to_string(), "tcp://10.0.0.1:4520");
        assert_eq!(alts, ["10.0.0.2:4520", "h:1"]);
        let (_, none) = TargetUri::parse_with_alternates("shm://x").unwrap();
        assert!(none.is_empty());
        for bad in ["tcp://a:1,shm://b", "a:1,b:2", "tcp://a:1,", "tcp://a:1,b"] {
            assert!(TargetUri::parse_with_alternates(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn the_machines_nvme_identity_is_used_when_it_is_there() {
        let dir = std::env::temp_dir().join(format!("chanio-nvme-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Nothing there: no identity.
        assert_eq!(system_identity(&dir), (None, None));
        let nqn = "nqn.2014-08.org.nvmexpress:uuid:00000000-1111-2222-3333-444444444444";
        std::fs::write(dir.join("hostnqn"), format!("{nqn}\n")).unwrap();
        std::fs::write(dir.join("hostid"), "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee\n").unwrap();
        let id = [
            0xaa, 0xaa, 0xaa, 0xaa, 0xbb, 0xbb, 0xcc, 0xcc, 0xdd, 0xdd, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee,
        ];
        assert_eq!(system_identity(&dir), (Some(nqn.to_string()), Some(id)));
        // The machine's NQN goes with the machine's ID; another NQN keeps its own.
        assert_eq!(host_id_in(&dir, nqn), HostId(id));
        let other = "nqn.2014-08.org.nvmexpress:uuid:00000000-1111-2222-3333-555555555555";
        assert_ne!(host_id_in(&dir, other), HostId(id));
        // A malformed file is ignored.
        std::fs::write(dir.join("hostnqn"), "not an nqn").unwrap();
        std::fs::write(dir.join("hostid"), "xyz").unwrap();
        assert_eq!(system_identity(&dir), (None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uris() {
        let u = TargetUri::parse("tcp://127.0.0.1:4520").unwrap();
        assert_eq!(u.transport(), Transport::Tcp);
        assert_eq!(u.addr(), "127.0.0.1:4520");
        assert_eq!(
            TargetUri::parse("localhost:1").unwrap().to_string(),
            "auto://localhost:1"
        );
        assert_eq!(TargetUri::parse("TCP://[::1]:9/").unwrap().addr(), "[::1]:9");
        for bad in [
            "",
            "tcp://",
            "tcp://host",
            "tcp://:80",
            "tcp://h:0",
            "tcp://h:99999",
            "tcp://h:x",
            "udp://h:1",
            "a:b:c",
        ] {
            assert!(TargetUri::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(
            TargetUri::parse("rdma://10.0.0.1:4420").unwrap().transport(),
            Transport::Rdma
        );
        assert_eq!(TargetUri::parse("shm://unit0").unwrap().addr(), "unit0");
        assert!(TargetUri::parse("shm://").is_err());
    }

    #[test]
    fn default_options_are_valid() {
        let opts = HostOptions::default();
        opts.validate().unwrap();
        assert_eq!(opts.subnqn, "nqn.2026-11.io.chanio:iounit");
        assert_eq!(opts.kato_ms(), 10_000);
        assert!(Nqn::new(opts.hostnqn.clone()).is_ok());
        assert_eq!(default_hostnqn(), default_hostnqn(), "stable");
    }

    #[test]
    fn bad_options_are_named() {
        let cases: Vec<(HostOptions, &str)> = vec![
            (
                HostOptions {
                    hostnqn: "host".into(),
                    ..HostOptions::default()
                },
                "host NQN",
            ),
            (
                HostOptions {
                    io_queues: 0,
                    ..HostOptions::default()
                },
                "io_queues",
            ),
            (
                HostOptions {
                    queue_depth: 5000,
                    ..HostOptions::default()
                },
                "queue_depth",
            ),
            (
                HostOptions {
                    command_timeout: Duration::ZERO,
                    ..HostOptions::default()
                },
                "command_timeout",
            ),
            (
                HostOptions {
                    keep_alive: Duration::from_millis(5),
                    ..HostOptions::default()
                },
                "keep_alive",
            ),
            (
                HostOptions {
                    keep_alive: Duration::ZERO,
                    ..HostOptions::default()
                },
                "keep_alive",
            ),
            (
                HostOptions {
                    keep_alive: Duration::from_secs(301),
                    ..HostOptions::default()
                },
                "keep_alive",
            ),
        ];
        for (opts, field) in cases {
            let e = opts.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        }
    }

    #[test]
    fn host_ids_follow_the_nqn() {
        let u = host_uuid("box");
        let nqn = format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid_text(&u));
        assert_eq!(host_id(&nqn).0, u);
        assert_eq!(u[6] >> 4, 4, "version 4");
        assert_eq!(parse_uuid(&uuid_text(&u)), Some(u));
        assert_eq!(parse_uuid("xyz"), None);
        assert_ne!(host_id("nqn.a").0, host_id("nqn.b").0);
    }
}
