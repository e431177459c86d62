//! The file backend: a regular file or a block device, driven through
//! io_uring.
//!
//! The file is opened twice: with `O_DIRECT` (when the file system supports
//! it; tmpfs, for one, does not) for block-aligned I/O from page-aligned
//! buffers, and buffered for everything else. Linux keeps the two coherent
//! (direct writes invalidate the page cache, direct reads write dirty pages
//! back first).
//!
//! Two ways in: the [`BlockIo`] calls, where each calling thread owns a
//! small ring and a request is submitted and its completion reaped in one
//! `io_uring_enter`; and the queue's own ring ([`super::ring::Ring`]), which
//! keeps many requests in flight on the [`Files`] this backend shares. FUA
//! is a write with `RWF_DSYNC`, Flush an `fdatasync`; Write Zeroes and
//! Deallocate use `fallocate` (zero range, punch hole) and fall back to
//! writing zeros where the file system refuses.
//!
//! Storage windows map the file shared ([`FileMapping`], made at the first
//! window): hosts' RDMA then reaches the page cache, which the kernel
//! keeps coherent with the commands' I/O as above (a direct write drops the
//! cached pages it covers, so the mapping faults them in anew), and a
//! window's commit is an `msync` of its range.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use io_uring::{opcode, types, IoUring};

use super::{check_range, BlockError, BlockIo, Discard, ErrorKind, Geometry, WriteZeroes};

const ALIGN: usize = 4096;
const ZERO_CHUNK: usize = 1 << 20;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// The logical block size of the block device `file` is open on
/// (`BLKSSZGET`): the smallest unit it reads and writes with `O_DIRECT`.
fn logical_block_size(file: &File) -> std::io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // a live, aligned `c_int`; the descriptor is open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut lbs) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    u32::try_from(lbs).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))
}

/// A namespace stored in a file or block device.
pub struct FileBackend {
    files: Arc<Files>,
    geometry: Geometry,
    block_device: bool,
    /// The file mapped shared for storage windows, made at the first
    /// (`None` when it could not be mapped; the reason was logged).
    mapping: OnceLock<Option<Arc<FileMapping>>>,
}

/// A file (or block device) mapped shared, read-write, whole: what storage
/// windows register in place.
pub struct FileMapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl FileMapping {
    fn new(file: &File, len: u64) -> std::io::Result<FileMapping> {
        let len = usize::try_from(len).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a new shared mapping of an open file at an address the
        // kernel picks aliases no memory of ours; the result is checked.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(FileMapping { ptr, len })
    }

    /// Writes `len` bytes at `offset` back to the file and waits for the
    /// device (`msync(MS_SYNC)` of the pages they lie in).
    fn sync(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let page = 4096u64;
        let start = offset / page * page;
        let end = (offset + len).div_ceil(page) * page;
        let end = end.min(self.len as u64);
        if end <= start {
            return Ok(());
        }
        // SAFETY: `start..end` lies inside the mapping (clamped to its
        // length), which is live while `self` is; msync reads no memory.
        let rc = unsafe {
            libc::msync(
                self.ptr.as_ptr().add(start as usize).cast(),
                (end - start) as usize,
                libc::MS_SYNC,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

// SAFETY: the mapping is plain shared memory that nothing frees before
// `Drop`; bytes have no invalid values, so concurrent access from threads
// (and peers' RDMA) changes data, never memory safety.
unsafe impl Send for FileMapping {}
// SAFETY: as for `Send`.
unsafe impl Sync for FileMapping {}

// SAFETY: one shared mapping of `len` readable and writable bytes, unmapped
// only on drop, so for as long as any holder of the `Arc` lives; the
// backend itself never reaches the bytes through it (its I/O goes through
// the files). The file is locked for this namespace alone and never
// shrunk by the daemon; a process that truncates it anyway makes accesses
// past its new end fault (SIGBUS), as with any mapped file.
unsafe impl messaging::mr::ExternalMemory for FileMapping {
    fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl std::fmt::Debug for FileMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileMapping").field("len", &self.len).finish()
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made, once; the last
        // holder (a window's registration, or the backend) is going.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The open files of a file namespace, shared with the requests in flight
/// on them (a request keeps them open until it completes).
#[derive(Debug)]
pub struct Files {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    /// What `O_DIRECT` requests align to: a block device's logical block
    /// size, a page for a regular file.
    align: usize,
}

impl Files {
    /// Files opened elsewhere (tests: pipes, read-only descriptors).
    #[cfg(test)]
    pub(crate) fn from_parts(path: &Path, buffered: File, direct: Option<File>) -> Files {
        Files {
            path: path.to_path_buf(),
            buffered,
            direct,
            align: ALIGN,
        }
    }

    /// The file a request of `len` bytes at `offset` from or into `buf`
    /// goes through: the `O_DIRECT` one when everything is aligned.
    pub(crate) fn pick(&self, offset: u64, buf: *const u8, len: usize) -> &File {
        let a = self.align;
        match &self.direct {
            Some(d) if offset % (a as u64) == 0 && len % a == 0 && (buf as usize) % a == 0 => d,
            _ => &self.buffered,
        }
    }

    /// The file a flush goes through (any descriptor of the file syncs
    /// all its data).
    pub(crate) fn sync_file(&self) -> &File {
        &self.buffered
    }

    /// An error of `kind` naming what failed, where, and the OS reason.
    pub(crate) fn error(&self, kind: ErrorKind, what: &str, offset: u64, e: std::io::Error) -> BlockError {
        BlockError::with_source(kind, format!("{what} at byte {offset} of {}", self.path.display()), e)
    }
}

impl FileBackend {
    /// Opens `path`; a missing regular file is created at `size` bytes
    /// (and `size` is then required).
    ///
    /// # Errors
    /// `Open` naming the path and the cause.
    ///
    /// On a block device the namespace's blocks are at least the device's
    /// logical block size (a smaller `block_size` is raised to it), and
    /// `O_DIRECT` requests align to it.
    pub fn open(path: &Path, size: Option<u64>, block_size: u32) -> Result<FileBackend, BlockError> {
        let fail = |what: &str, e: std::io::Error| {
            BlockError::with_source(ErrorKind::Open, format!("{what} {}", path.display()), e)
        };
        if block_size != 512 && block_size != 4096 {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("block size {block_size}: use 512 or 4096"),
            ));
        }
        let exists = path.exists();
        if !exists && size.is_none() {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!(
                    "{} does not exist; give a size to create it (file:PATH:SIZE)",
                    path.display()
                ),
            ));
        }
        let mut buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!exists)
            .truncate(false)
            .open(path)
            .map_err(|e| fail("cannot open", e))?;
        lock(&buffered, path)?;
        let meta = buffered.metadata().map_err(|e| fail("cannot stat", e))?;
        let block_device = meta.file_type().is_block_device();
        let mut bytes = if block_device {
            buffered.seek(SeekFrom::End(0)).map_err(|e| fail("cannot size", e))?
        } else {
            meta.len()
        };
        let (block_size, align) = match block_device {
            true => {
                let lbs =
                    logical_block_size(&buffered).map_err(|e| fail("cannot read the logical block size of", e))?;
                if lbs > 4096 || !lbs.is_power_of_two() {
                    return Err(BlockError::new(
                        ErrorKind::Open,
                        format!(
                            "{}: a logical block size of {lbs} bytes (namespaces here have 512 or 4096)",
                            path.display()
                        ),
                    ));
                }
                if lbs > block_size {
                    tracing::info!(path = %path.display(), lbs, "namespace blocks raised to the device's logical block size");
                }
                (block_size.max(lbs), lbs as usize)
            }
            false => (block_size, ALIGN),
        };
        if !block_device {
            if let Some(want) = size {
                if want > bytes {
                    buffered.set_len(want).map_err(|e| fail("cannot size", e))?;
                    bytes = want;
                }
            }
        }
        let blocks = bytes / u64::from(block_size);
        if blocks == 0 {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("{} holds no whole {block_size}-byte block", path.display()),
            ));
        }
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        tracing::debug!(path = %path.display(), direct = direct.is_some(), bytes, "file backend open");
        Ok(FileBackend {
            files: Arc::new(Files {
                path: path.to_path_buf(),
                buffered,
                direct,
                align,
            }),
            geometry: Geometry { block_size, blocks },
            block_device,
            mapping: OnceLock::new(),
        })
    }

    /// Whether `O_DIRECT` is in use for aligned requests.
    pub fn is_direct(&self) -> bool {
        self.files.direct.is_some()
    }

    fn pick(&self, offset: u64, buf: *const u8, len: usize) -> &File {
        self.files.pick(offset, buf, len)
    }

    fn io_error(&self, kind: ErrorKind, what: &str, offset: u64, e: std::io::Error) -> BlockError {
        self.files.error(kind, what, offset, e)
    }

    fn datasync(&self) -> Result<(), BlockError> {
        let entry = opcode::Fsync::new(types::Fd(self.files.sync_file().as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: an fsync entry refers to no memory; the fd outlives the call.
        unsafe { submit(entry) }.map_err(|e| self.io_error(ErrorKind::WriteFailed, "fdatasync", 0, e))?;
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        if self.block_device {
            return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
        }
        let entry = opcode::Fallocate::new(types::Fd(self.files.buffered.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: a fallocate entry refers to no memory; the fd outlives the call.
        unsafe { submit(entry) }.map(|_| ())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let zeros = AlignedBuf::zeroed(ZERO_CHUNK.min(len as usize));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write(offset + done, &zeros.as_slice()[..n], false)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBackend")
            .field("path", &self.files.path)
            .field("direct", &self.files.direct.is_some())
            .field("geometry", &self.geometry)
            .finish()
    }
}

/// Takes the backing file for this namespace alone (`flock`, exclusive):
/// a second namespace, or a second daemon, on the same file would
/// interleave writes that nobody orders. The lock lives as long as the
/// open file, so it goes with the namespace (and with a killed daemon).
pub(super) fn lock(file: &File, path: &Path) -> Result<(), BlockError> {
    flock(file, path, libc::LOCK_EX)
}

/// Takes `file`'s lock shared: readers (the clones of one base) together,
/// and no one who holds it exclusively (a writable namespace).
pub(super) fn lock_shared(file: &File, path: &Path) -> Result<(), BlockError> {
    flock(file, path, libc::LOCK_SH)
}

fn flock(file: &File, path: &Path, how: libc::c_int) -> Result<(), BlockError> {
    // SAFETY: `flock` on a descriptor `file` owns for the whole call; no
    // memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(BlockError::new(
            ErrorKind::Open,
            format!(
                "{} is in use by another namespace or process (it holds the file's lock); detach it there first",
                path.display()
            ),
        ));
    }
    Err(BlockError::with_source(
        ErrorKind::Open,
        format!("cannot lock {}", path.display()),
        e,
    ))
}

/// Submits one entry on this thread's ring and waits for its completion.
///
/// # Safety
/// Any memory the entry points at must stay valid and unaliased until this
/// returns (it does not return before the completion is reaped).
unsafe fn submit(entry: io_uring::squeue::Entry) -> std::io::Result<u32> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(8)?);
        }
        let ring = slot
            .as_mut()
            .ok_or_else(|| std::io::Error::other("io_uring unavailable"))?;
        // SAFETY: forwarded from the caller: the memory the entry uses stays
        // valid until the completion below is reaped.
        unsafe { ring.submission().push(&entry.user_data(0x6368)) }
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        loop {
            ring.submit_and_wait(1)?;
            if let Some(cqe) = ring.completion().next() {
                let res = cqe.result();
                return if res < 0 {
                    Err(std::io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as u32)
                };
            }
        }
    })
}

impl BlockIo for FileBackend {
    fn describe(&self) -> String {
        format!("file:{}", self.files.path.display())
    }

    fn files(&self) -> Option<&Arc<Files>> {
        Some(&self.files)
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(self.geometry, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let at = offset + done as u64;
            let file = self.pick(at, rest.as_ptr(), rest.len());
            let entry = opcode::Read::new(types::Fd(file.as_raw_fd()), rest.as_mut_ptr(), rest.len() as u32)
                .offset(at)
                .build();
            // SAFETY: `rest` is exclusively borrowed for the duration of `submit`,
            // which returns only after the kernel completed the read.
            let n = unsafe { submit(entry) }.map_err(|e| self.io_error(ErrorKind::ReadFailed, "read", at, e))?;
            if n == 0 {
                // Past the end of a file that shrank underneath us: reads as zeros.
                rest.fill(0);
                break;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        check_range(self.geometry, offset, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            let at = offset + done as u64;
            let file = self.pick(at, rest.as_ptr(), rest.len());
            let entry = opcode::Write::new(types::Fd(file.as_raw_fd()), rest.as_ptr(), rest.len() as u32)
                .offset(at)
                .build();
            // SAFETY: `rest` is borrowed for the duration of `submit`, which
            // returns only after the kernel completed the write.
            let n = unsafe { submit(entry) }.map_err(|e| self.io_error(ErrorKind::WriteFailed, "write", at, e))?;
            if n == 0 {
                return Err(self.io_error(
                    ErrorKind::WriteFailed,
                    "write",
                    at,
                    std::io::ErrorKind::WriteZero.into(),
                ));
            }
            done += n as usize;
        }
        if fua {
            self.datasync()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.datasync()
    }

    fn window_memory(&self) -> Option<Arc<dyn messaging::mr::ExternalMemory>> {
        let mapping =
            self.mapping
                .get_or_init(|| match FileMapping::new(&self.files.buffered, self.geometry.bytes()) {
                    Ok(m) => Some(Arc::new(m)),
                    Err(e) => {
                        tracing::warn!(path = %self.files.path.display(), "cannot map the file for windows: {e}");
                        None
                    }
                });
        mapping.clone().map(|m| m as Arc<dyn messaging::mr::ExternalMemory>)
    }

    fn commit(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(self.geometry, offset, len)?;
        match self.mapping.get() {
            Some(Some(m)) => m
                .sync(offset, len)
                .map_err(|e| self.io_error(ErrorKind::WriteFailed, "msync", offset, e)),
            // Never mapped: no window wrote anything.
            _ => Ok(()),
        }
    }
}

impl WriteZeroes for FileBackend {
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(self.geometry, offset, len)?;
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zero_bytes(offset, len),
        }
    }
}

impl Discard for FileBackend {
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(self.geometry, offset, len)?;
        match self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zero_bytes(offset, len),
        }
    }
}

/// A page-aligned zeroed buffer, carved out of a slightly larger vector.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf { raw, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    #[cfg(test)]
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chanio-uring-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn conformance() {
        for bs in [512, 4096] {
            let path = temp(&format!("conf-{bs}"));
            let backend = FileBackend::open(&path, Some(2 << 20), bs).unwrap();
            super::super::conformance::run(&backend);
            drop(backend);
            let _ = std::fs::remove_file(&path);
        }
    }

    #[test]
    fn data_survives_reopen_and_missing_needs_size() {
        let path = temp("reopen");
        assert!(
            FileBackend::open(&path, None, 512).is_err(),
            "a missing file needs a size"
        );
        {
            let b = FileBackend::open(&path, Some(1 << 20), 512).unwrap();
            b.write(4096, &[7u8; 4096], true).unwrap();
        }
        let b = FileBackend::open(&path, None, 512).unwrap();
        assert_eq!(b.geometry().bytes(), 1 << 20);
        let mut back = [0u8; 4096];
        b.read(4096, &mut back).unwrap();
        assert_eq!(back, [7u8; 4096]);
        let _ = std::fs::remove_file(&path);
    }

    /// A loop device over a scratch file with 4096-byte logical blocks,
    /// detached on drop. Made with losetup(8), so it needs root: without
    /// it the test says so and passes only if `CHANIO_REQUIRE_LOOP` is
    /// unset (`.ci/run` sets it).
    struct Loop {
        dev: PathBuf,
        file: PathBuf,
    }

    impl Loop {
        fn new(name: &str, sector: u32) -> Option<Loop> {
            let file = temp(name);
            std::fs::File::create(&file).and_then(|f| f.set_len(4 << 20)).ok()?;
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show", "--sector-size", &sector.to_string()])
                .arg(&file)
                .output();
            match out {
                Ok(o) if o.status.success() => Some(Loop {
                    dev: PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
                    file,
                }),
                other => {
                    let _ = std::fs::remove_file(&file);
                    let why = match other {
                        Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                        Err(e) => e.to_string(),
                    };
                    assert!(
                        std::env::var_os("CHANIO_REQUIRE_LOOP").is_none(),
                        "CHANIO_REQUIRE_LOOP is set but no loop device: {why}"
                    );
                    eprintln!("no loop device ({why}): the block-device test did not run");
                    None
                }
            }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").arg("-d").arg(&self.dev).status();
            let _ = std::fs::remove_file(&self.file);
        }
    }

    #[test]
    fn a_block_device_is_served_at_its_logical_block_size_with_o_direct() {
        let Some(dev) = Loop::new("loop4k", 4096) else {
            return;
        };
        // Asked for 512-byte blocks: the device cannot do less than 4096.
        let b = FileBackend::open(&dev.dev, None, 512).unwrap();
        assert_eq!(b.geometry().block_size, 4096);
        assert_eq!(b.geometry().bytes(), 4 << 20);
        assert!(b.is_direct(), "a block device opens with O_DIRECT");
        super::super::conformance::run(&b);
        // Aligned requests go through O_DIRECT: the file behind the loop
        // device has the data at once, with no page cache of the device
        // in between.
        let mut data = AlignedBuf::zeroed(8192);
        data.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i % 253) as u8);
        b.write(8192, data.as_slice(), true).unwrap();
        let mut back = AlignedBuf::zeroed(8192);
        b.read(8192, back.as_mut_slice()).unwrap();
        assert_eq!(back.as_slice(), data.as_slice());
        drop(b);
        let on_file = std::fs::read(&dev.file).unwrap();
        assert_eq!(&on_file[8192..16384], data.as_slice());
    }

    #[test]
    fn a_file_serves_one_namespace_at_a_time() {
        let path = temp("lock");
        let first = FileBackend::open(&path, Some(1 << 20), 512).unwrap();
        let second = FileBackend::open(&path, None, 512).expect_err("the file is locked by the first");
        assert_eq!(second.kind(), ErrorKind::Open);
        assert!(second.to_string().contains("in use"), "{second}");
        drop(first);
        FileBackend::open(&path, None, 512).expect("the lock went with the first namespace");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn errors_carry_their_os_reason() {
        let missing_dir = temp("no-such-dir").join("f");
        let e = FileBackend::open(&missing_dir, Some(1 << 20), 512).expect_err("no directory");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(e.to_string().contains("No such file or directory"), "{e}");
    }
}
