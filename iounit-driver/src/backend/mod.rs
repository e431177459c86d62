//! The common block layer: one small set of traits every storage backend
//! implements, a factory that opens backends by spec, and the namespace
//! registry that backends register into and deregister from.
//!
//! ```text
//!            BlockBackend  (supertrait, blanket-implemented)
//!          ┌──────┼─────────────┐
//!       BlockIo  WriteZeroes  Discard
//!     read/write/flush/geometry
//!
//!  open("ram:64MiB" | "file:/path:1GiB") ──▶ Arc<dyn BlockBackend>
//!  Registry::attach(nsid, backend) / detach(nsid) ──▶ callbacks to subscribers
//! ```
//!
//! Backends: [`ram`] (memory), [`uring`] (regular files and block devices
//! through io_uring, `O_DIRECT` where the file system supports it). Every
//! call is checked against the geometry before it reaches storage.
//!
//! Two contracts: the [`BlockIo`] calls run one request each and return
//! when it is done (the RAM backend, and every command that is not a read,
//! write or flush); a backend that offers its [`BlockIo::files`] is also
//! driven asynchronously by each queue's [`ring::Ring`], many requests in
//! flight, completed in whatever order the device finishes them.

use std::fmt;
use std::sync::Arc;

use messaging::units::{parse_size, UnitError};

pub mod clone;
pub mod ram;
pub mod registry;
pub mod ring;
pub mod uring;

pub use registry::{NamespaceCache, NamespaceRef, Registry, RegistryEvent, SubscriptionId};

/// Size and shape of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
}

impl Geometry {
    /// Capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

/// What went wrong in a backend, as a small stable kind (the NVMe layer
/// maps it to a status code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request leaves the device.
    OutOfRange,
    /// The request is malformed (misaligned, zero length...).
    InvalidArgument,
    /// The device failed a read.
    ReadFailed,
    /// The device failed a write or flush.
    WriteFailed,
    /// The backend cannot be opened or created.
    Open,
    /// The backend is going away.
    NotReady,
}

/// A block-layer error: kind, context, and the underlying cause if any.
///
/// It displays as "context: cause", so every log line and reply that shows
/// it carries the OS reason (`No space left on device`, `Permission
/// denied`); the cause is therefore not also offered as its `source`,
/// which would print it twice in a report of the chain.
#[derive(Debug, thiserror::Error)]
#[error("{context}{}", cause_suffix(.cause))]
pub struct BlockError {
    kind: ErrorKind,
    context: String,
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

fn cause_suffix(cause: &Option<Box<dyn std::error::Error + Send + Sync>>) -> String {
    cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
}

impl BlockError {
    /// A new error.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> BlockError {
        BlockError {
            kind,
            context: context.into(),
            cause: None,
        }
    }

    /// A new error with a cause.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BlockError {
        BlockError {
            kind,
            context: context.into(),
            cause: Some(source.into()),
        }
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The OS error number behind it, when the cause is an OS error.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.cause.as_ref()?.downcast_ref::<std::io::Error>()?.raw_os_error()
    }
}

/// Reads, writes and flushes at byte offsets. Offsets and lengths are
/// multiples of the block size and inside the device (callers check with
/// [`check_range`]).
pub trait BlockIo: Send + Sync + fmt::Debug {
    /// What this backend is, for logs and identify data (e.g. `ram:64MiB`).
    fn describe(&self) -> String;

    /// Size and shape.
    fn geometry(&self) -> Geometry;

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// `ReadFailed` (with the OS cause) or `OutOfRange`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;

    /// Writes `data` at `offset`; with `fua`, the data is durable when this
    /// returns.
    ///
    /// # Errors
    /// `WriteFailed` or `OutOfRange`.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError>;

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// `WriteFailed`.
    fn flush(&self) -> Result<(), BlockError>;

    /// The files behind this backend, for a backend that a queue's own
    /// [`ring::Ring`] can drive with many requests in flight. `None` (the
    /// default) means the queue calls the methods above, one at a time.
    fn files(&self) -> Option<&Arc<uring::Files>> {
        None
    }

    /// Whether a call may wait (for a device, a lock, the network). A
    /// worker thread serves many queues, so such calls run on the target's
    /// blocking threads instead, many at once, and complete back to their
    /// queue; only a backend whose calls never wait (memory) is called on
    /// the worker. The default, `true`, is the safe answer.
    fn may_block(&self) -> bool {
        true
    }

    /// The memory that holds this backend's blocks, byte 0 being block 0,
    /// for storage windows to register in place (hosts then reach it with
    /// one-sided RDMA). `None` (the default): the backend cannot be
    /// windowed.
    fn window_memory(&self) -> Option<Arc<dyn messaging::mr::ExternalMemory>> {
        None
    }

    /// Makes `len` bytes at `offset` that a window wrote durable (a
    /// window's commit). The default flushes the whole backend.
    ///
    /// # Errors
    /// `OutOfRange`, or what [`BlockIo::flush`] gives.
    fn commit(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(self.geometry(), offset, len)?;
        self.flush()
    }
}

/// Zeroing a range without sending zeros.
pub trait WriteZeroes {
    /// Sets `len` bytes at `offset` to zero.
    ///
    /// # Errors
    /// `WriteFailed` or `OutOfRange`.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError>;
}

/// Deallocating a range (NVMe Dataset Management, deallocate).
pub trait Discard {
    /// Deallocates `len` bytes at `offset`; they read back as zeros.
    ///
    /// # Errors
    /// `WriteFailed` or `OutOfRange`.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
}

/// Everything the NVMe layer needs from a backend.
pub trait BlockBackend: BlockIo + WriteZeroes + Discard {}

impl<T: BlockIo + WriteZeroes + Discard> BlockBackend for T {}

/// Checks that `len` bytes at `offset` are block-aligned and inside `geo`.
///
/// # Errors
/// `InvalidArgument` for misalignment, `OutOfRange` past the end.
pub fn check_range(geo: Geometry, offset: u64, len: u64) -> Result<(), BlockError> {
    let bs = u64::from(geo.block_size);
    if offset % bs != 0 || len % bs != 0 {
        return Err(BlockError::new(
            ErrorKind::InvalidArgument,
            format!("{len} bytes at {offset} are not aligned to {bs}-byte blocks"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= geo.bytes() => Ok(()),
        _ => Err(BlockError::new(
            ErrorKind::OutOfRange,
            format!("{len} bytes at {offset} leave the {}-byte device", geo.bytes()),
        )),
    }
}

/// A parsed backend specification: `ram:SIZE[:BS]` or `file:PATH[:SIZE[:BS]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// Memory of `size` bytes.
    Ram {
        /// Capacity.
        size: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// A regular file or block device; a missing file is created at `size`.
    File {
        /// Path.
        path: std::path::PathBuf,
        /// Size to create a missing file with (required then).
        size: Option<u64>,
        /// Logical block size.
        block_size: u32,
    },
    /// A thin clone of a read-only base image (`clone:BASE:PATH[:BLOCK]`):
    /// reads go through to `base` until written; `path` (and `path.map`,
    /// `path.log`) keep what was written, and are created if missing.
    Clone {
        /// The base image, read only.
        base: std::path::PathBuf,
        /// The clone's data file.
        path: std::path::PathBuf,
        /// Logical block size.
        block_size: u32,
    },
}

/// Why a backend specification does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not `KIND:...` at all.
    #[error("{0:?}: expected ram:SIZE, file:PATH[:SIZE] or clone:BASE:PATH, e.g. ram:64MiB")]
    Syntax(String),
    /// A kind other than ram or file.
    #[error("unknown backend {kind:?} in {spec:?}: use ram, file or clone")]
    UnknownKind {
        /// The kind given.
        kind: String,
        /// The whole specification.
        spec: String,
    },
    /// The size does not parse.
    #[error("size in {spec:?}: {source}")]
    Size {
        /// The whole specification.
        spec: String,
        /// Why.
        #[source]
        source: UnitError,
    },
    /// A block size other than 512 or 4096.
    #[error("block size {0:?}: use 512 or 4096")]
    BlockSize(String),
    /// `file:` without a path.
    #[error("{0:?}: missing file path")]
    MissingPath(String),
}

impl std::str::FromStr for BackendSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<BackendSpec, SpecError> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| SpecError::Syntax(s.into()))?;
        let block_size = |t: Option<&str>| -> Result<u32, SpecError> {
            match t {
                None => Ok(512),
                Some("512") => Ok(512),
                Some("4096") | Some("4k") | Some("4KiB") => Ok(4096),
                Some(o) => Err(SpecError::BlockSize(o.into())),
            }
        };
        match kind {
            "ram" => {
                let mut parts = rest.split(':');
                let size = parse_size(parts.next().unwrap_or_default())
                    .map_err(|source| SpecError::Size { spec: s.into(), source })?;
                let block_size = block_size(parts.next())?;
                Ok(BackendSpec::Ram { size, block_size })
            }
            "file" => {
                // The path may contain ':' only if it is followed by a size.
                let mut parts: Vec<&str> = rest.split(':').collect();
                let mut block = None;
                let mut size = None;
                if parts.len() >= 3 {
                    block = parts.pop();
                }
                if parts.len() >= 2 {
                    if let Ok(sz) = parse_size(parts[parts.len() - 1]) {
                        size = Some(sz);
                        parts.pop();
                    }
                }
                let path = parts.join(":");
                if path.is_empty() {
                    return Err(SpecError::MissingPath(s.into()));
                }
                Ok(BackendSpec::File {
                    path: path.into(),
                    size,
                    block_size: block_size(block)?,
                })
            }
            "clone" => {
                // Paths may not contain ':' here.
                let parts: Vec<&str> = rest.split(':').collect();
                let (base, path, block) = match parts.as_slice() {
                    [b, p] => (*b, *p, None),
                    [b, p, bs] => (*b, *p, Some(*bs)),
                    _ => return Err(SpecError::Syntax(s.into())),
                };
                if base.is_empty() || path.is_empty() {
                    return Err(SpecError::MissingPath(s.into()));
                }
                Ok(BackendSpec::Clone {
                    base: base.into(),
                    path: path.into(),
                    block_size: block_size(block)?,
                })
            }
            other => Err(SpecError::UnknownKind {
                kind: other.into(),
                spec: s.into(),
            }),
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Ram { size, block_size } => write!(f, "ram:{size}:{block_size}"),
            BackendSpec::File { path, size, block_size } => match size {
                Some(s) => write!(f, "file:{}:{s}:{block_size}", path.display()),
                None => write!(f, "file:{}", path.display()),
            },
            BackendSpec::Clone { base, path, block_size } => {
                write!(f, "clone:{}:{}:{block_size}", base.display(), path.display())
            }
        }
    }
}

/// The factory: opens the backend a spec names.
///
/// # Errors
/// `Open` with the cause (bad size, missing file without a size, I/O error).
pub fn open(spec: &BackendSpec) -> Result<Arc<dyn BlockBackend>, BlockError> {
    match spec {
        BackendSpec::Ram { size, block_size } => Ok(Arc::new(ram::RamBackend::new(*size, *block_size)?)),
        BackendSpec::File { path, size, block_size } => {
            Ok(Arc::new(uring::FileBackend::open(path, *size, *block_size)?))
        }
        BackendSpec::Clone { base, path, block_size } => {
            Ok(Arc::new(clone::CloneBackend::open(base, path, *block_size)?))
        }
    }
}

/// The conformance suite every backend passes.
pub mod conformance {
    use super::*;

    /// Runs every check against `backend` (which must be at least 1 MiB and
    /// is overwritten).
    ///
    /// # Panics
    /// On the first failed check.
    pub fn run(backend: &dyn BlockBackend) {
        let geo = backend.geometry();
        let bs = geo.block_size as usize;
        assert!(geo.bytes() >= 1 << 20, "conformance needs at least 1 MiB");
        // Round trip at the first and last block, and a multi-block range.
        for (offset, blocks) in [(0u64, 1usize), (geo.bytes() - bs as u64, 1), (8 * bs as u64, 33)] {
            let data: Vec<u8> = (0..blocks * bs).map(|i| (i as u64 * 7 + offset) as u8).collect();
            backend.write(offset, &data, false).expect("write");
            let mut back = vec![0u8; data.len()];
            backend.read(offset, &mut back).expect("read");
            assert_eq!(back, data, "round trip at {offset}");
        }
        backend.write(0, &vec![9u8; bs], true).expect("fua write");
        backend.flush().expect("flush");
        // Zeroing and discard read back as zeros.
        backend
            .write(bs as u64 * 100, &vec![0xffu8; 4 * bs], false)
            .expect("write");
        backend.write_zeroes(bs as u64 * 101, bs as u64).expect("write zeroes");
        backend.discard(bs as u64 * 102, bs as u64).expect("discard");
        let mut back = vec![1u8; 4 * bs];
        backend.read(bs as u64 * 100, &mut back).expect("read");
        assert!(back[..bs].iter().all(|&b| b == 0xff));
        assert!(
            back[bs..3 * bs].iter().all(|&b| b == 0),
            "zeroed and discarded blocks read as zeros"
        );
        assert!(back[3 * bs..].iter().all(|&b| b == 0xff));
        // Out of range is refused, never clamped.
        let mut one = vec![0u8; bs];
        assert_eq!(
            backend.read(geo.bytes(), &mut one).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            backend.write(geo.bytes(), &one, false).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            backend
                .write_zeroes(geo.bytes() - bs as u64, 2 * bs as u64)
                .unwrap_err()
                .kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            backend.read(1, &mut one).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            "ram:64MiB".parse::<BackendSpec>(),
            Ok(BackendSpec::Ram {
                size: 64 << 20,
                block_size: 512
            })
        );
        assert_eq!(
            "ram:1GiB:4096".parse::<BackendSpec>(),
            Ok(BackendSpec::Ram {
                size: 1 << 30,
                block_size: 4096
            })
        );
        assert_eq!(
            "file:/tmp/disk.img:1GiB".parse::<BackendSpec>(),
            Ok(BackendSpec::File {
                path: "/tmp/disk.img".into(),
                size: Some(1 << 30),
                block_size: 512
            })
        );
        assert_eq!(
            "file:/dev/nvme0n1".parse::<BackendSpec>(),
            Ok(BackendSpec::File {
                path: "/dev/nvme0n1".into(),
                size: None,
                block_size: 512
            })
        );
        assert!("ram:lots".parse::<BackendSpec>().is_err());
        assert!("ram:1MiB:1000".parse::<BackendSpec>().is_err());
        assert!("tape:1".parse::<BackendSpec>().is_err());
        assert!("file:".parse::<BackendSpec>().is_err());
    }

    #[test]
    fn ranges_are_checked() {
        let geo = Geometry {
            block_size: 512,
            blocks: 8,
        };
        assert!(check_range(geo, 0, 4096).is_ok());
        assert_eq!(check_range(geo, 512, 4096).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert_eq!(
            check_range(geo, 100, 512).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            check_range(geo, u64::MAX - 511, 512).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
    }
}
