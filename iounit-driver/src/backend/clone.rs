//! Thin clones: a namespace that reads through to a read-only base image
//! and keeps only what was written to it, copy on write, in clusters of
//! [`CLUSTER`] bytes. A hundred machines boot from one golden image and
//! each clone holds only its own changes.
//!
//! # Files
//! A clone at `PATH` is three files:
//! - `PATH`: the clone's data, a sparse file the size of the base; a
//!   cluster's bytes are there once the cluster was written.
//! - `PATH.map`: a header (magic, version, cluster size, and the base's
//!   size, inode and modification time, so that a base changed since is
//!   refused) and a bitmap of the clusters the clone holds, as last made
//!   durable.
//! - `PATH.log`: the boot ID of the running kernel, then the index of each
//!   cluster the clone took since the map was last written.
//!
//! Creating a clone writes the headers and sizes two sparse files: O(1) in
//! the image's size. The map is made first and the data file last, under
//! `PATH.new` renamed into place, so that where `PATH` exists its map is
//! whole; what an interrupted creation left is made anew.
//!
//! # Durability
//! The first write to a cluster copies the rest of it from the base, writes
//! the whole cluster, then sets its bit and appends its index to the log.
//! A flush (and a FUA write) syncs the data, then writes the bitmap and
//! syncs it, then empties the log, all with allocations held back, so a
//! durable bit never names a cluster whose data is not durable.
//!
//! At open, the log's entries are taken back only if they were written
//! under the same kernel boot: after a crash of the daemon alone, the page
//! cache still holds their data. After a reboot (power loss included) they
//! are dropped, and those clusters read from the base again: exactly the
//! writes that were never flushed are lost, as with a volatile write cache,
//! and no block reads anything it never held.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{check_range, BlockError, BlockIo, Discard, ErrorKind, Geometry, WriteZeroes};

/// Bytes per cluster: the unit of copy on write.
pub const CLUSTER: u64 = 64 * 1024;

const MAP_MAGIC: &[u8; 8] = b"CHANIOCM";
const LOG_MAGIC: &[u8; 8] = b"CHANIOCL";
const VERSION: u32 = 1;
/// The map's header, padded; the bitmap follows.
const MAP_HEADER: u64 = 4096;
/// The log's header (magic, boot ID); entries follow, 8 bytes each.
const LOG_HEADER: u64 = 64;
const BOOT_ID_LEN: usize = 36;

/// A clone of a read-only base image. See the [module docs](self).
#[derive(Debug)]
pub struct CloneBackend {
    path: PathBuf,
    base_path: PathBuf,
    base: File,
    data: File,
    map: File,
    geometry: Geometry,
    base_len: u64,
    /// One bit per cluster: held by the clone.
    bits: Vec<AtomicU64>,
    /// Held while a cluster is taken and while a flush runs; holds the log
    /// and its length.
    alloc: Mutex<Log>,
    /// Clusters taken since the map was last written.
    dirty: AtomicBool,
    /// Whether dropping flushes (not when a test plays a crash).
    flush_on_drop: bool,
    /// The running kernel's boot ID, written in the log's header.
    boot: [u8; BOOT_ID_LEN],
}

#[derive(Debug)]
struct Log {
    file: File,
    len: u64,
}

fn with_ext(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

/// The running kernel's boot ID; empty where there is none (the log is
/// then never trusted).
fn boot_id() -> [u8; BOOT_ID_LEN] {
    let mut id = [0u8; BOOT_ID_LEN];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let s = s.trim().as_bytes();
        if s.len() == BOOT_ID_LEN {
            id.copy_from_slice(s);
        }
    }
    id
}

/// What the map's header records of the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BaseStamp {
    len: u64,
    inode: u64,
    mtime_ns: i64,
}

impl BaseStamp {
    fn of(meta: &std::fs::Metadata) -> BaseStamp {
        BaseStamp {
            len: meta.len(),
            inode: meta.ino(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; MAP_HEADER as usize];
        h[..8].copy_from_slice(MAP_MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(CLUSTER as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.len.to_le_bytes());
        h[24..32].copy_from_slice(&self.inode.to_le_bytes());
        h[32..40].copy_from_slice(&self.mtime_ns.to_le_bytes());
        h
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl CloneBackend {
    /// Opens the clone at `path` of the base image `base`, creating it when
    /// `path` does not exist.
    ///
    /// # Errors
    /// `Open` naming the file and the cause: a missing base, a clone whose
    /// map is damaged or of another version, a base that changed since the
    /// clone was made, a clone in use elsewhere.
    pub fn open(base: &Path, path: &Path, block_size: u32) -> Result<CloneBackend, BlockError> {
        let fail = |what: &str, p: &Path, e: std::io::Error| {
            BlockError::with_source(ErrorKind::Open, format!("{what} {}", p.display()), e)
        };
        if block_size != 512 && block_size != 4096 {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("block size {block_size}: use 512 or 4096"),
            ));
        }
        let base_file = File::open(base).map_err(|e| fail("cannot open the base image", base, e))?;
        // Shared: other clones may read it; a writable namespace may not.
        super::uring::lock_shared(&base_file, base)?;
        let meta = base_file.metadata().map_err(|e| fail("cannot stat", base, e))?;
        if !meta.is_file() {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("the base image {} is not a regular file", base.display()),
            ));
        }
        let stamp = BaseStamp::of(&meta);
        let blocks = stamp.len / u64::from(block_size);
        if blocks == 0 {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!(
                    "the base image {} holds no whole {block_size}-byte block",
                    base.display()
                ),
            ));
        }
        let clusters = stamp.len.div_ceil(CLUSTER);
        let bitmap_len = clusters.div_ceil(64) * 8;
        let map_path = with_ext(path, ".map");
        let log_path = with_ext(path, ".log");
        let created = !path.exists();
        let open_rw = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| fail("cannot open", p, e))
        };
        // A new clone's map is made first, its data file under a temporary
        // name renamed into place last: where PATH exists, its map is
        // whole. What an interrupted creation left is made anew.
        let create = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .map_err(|e| fail("cannot create", p, e))
        };
        let data;
        let map;
        let mut bits: Vec<AtomicU64> = (0..bitmap_len / 8).map(|_| AtomicU64::new(0)).collect();
        if created {
            map = create(&map_path)?;
            map.write_all_at(&stamp.header(), 0)
                .map_err(|e| fail("cannot write", &map_path, e))?;
            map.set_len(MAP_HEADER + bitmap_len)
                .map_err(|e| fail("cannot size", &map_path, e))?;
            map.sync_all().map_err(|e| fail("cannot sync", &map_path, e))?;
            let fresh = with_ext(path, ".new");
            data = create(&fresh)?;
            super::uring::lock(&data, path)?;
            data.set_len(stamp.len).map_err(|e| fail("cannot size", &fresh, e))?;
            data.sync_all().map_err(|e| fail("cannot sync", &fresh, e))?;
            std::fs::rename(&fresh, path).map_err(|e| fail("cannot rename the new clone to", path, e))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| fail("cannot sync the directory of", path, e))?;
            }
            tracing::info!(clone = %path.display(), base = %base.display(), "clone created");
        } else {
            data = open_rw(path)?;
            super::uring::lock(&data, path)?;
            map = open_rw(&map_path)?;
            let mut header = vec![0u8; MAP_HEADER as usize];
            map.read_exact_at(&mut header, 0)
                .map_err(|e| fail("cannot read the header of", &map_path, e))?;
            let damaged = |why: String| BlockError::new(ErrorKind::Open, format!("{}: {why}", map_path.display()));
            if &header[..8] != MAP_MAGIC {
                return Err(damaged("not a chanio clone map".into()));
            }
            let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
            let cluster = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
            if version != VERSION || u64::from(cluster) != CLUSTER {
                return Err(damaged(format!(
                    "version {version} with {cluster}-byte clusters (this build reads version {VERSION}, {CLUSTER})"
                )));
            }
            let recorded = BaseStamp {
                len: le64(&header[16..]),
                inode: le64(&header[24..]),
                mtime_ns: le64(&header[32..]) as i64,
            };
            if recorded != stamp {
                return Err(BlockError::new(
                    ErrorKind::Open,
                    format!(
                        "the base image {} changed since the clone {} was made (size, inode or modification time): \
                         its reads through would mix two images",
                        base.display(),
                        path.display()
                    ),
                ));
            }
            let mut bitmap = vec![0u8; bitmap_len as usize];
            map.read_exact_at(&mut bitmap, MAP_HEADER)
                .map_err(|e| fail("cannot read the bitmap of", &map_path, e))?;
            bits = bitmap.chunks_exact(8).map(|c| AtomicU64::new(le64(c))).collect();
        }
        let log_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(|e| fail("cannot open", &log_path, e))?;
        let backend = CloneBackend {
            path: path.to_path_buf(),
            base_path: base.to_path_buf(),
            base: base_file,
            data,
            map,
            geometry: Geometry { block_size, blocks },
            base_len: stamp.len,
            bits,
            alloc: Mutex::new(Log { file: log_file, len: 0 }),
            dirty: AtomicBool::new(false),
            flush_on_drop: true,
            boot: boot_id(),
        };
        backend.replay_log(&log_path)?;
        // The map now says everything the clone holds: written down, and
        // the log started afresh under this boot.
        backend.dirty.store(true, Ordering::Release);
        backend.flush()?;
        Ok(backend)
    }

    /// Takes back the log's clusters if they were written under this boot.
    fn replay_log(&self, log_path: &Path) -> Result<(), BlockError> {
        let log = self.alloc.lock();
        let len = log
            .file
            .metadata()
            .map_err(|e| BlockError::with_source(ErrorKind::Open, format!("cannot stat {}", log_path.display()), e))?
            .len();
        if len < LOG_HEADER {
            return Ok(());
        }
        let mut content = vec![0u8; len as usize];
        log.file
            .read_exact_at(&mut content, 0)
            .map_err(|e| BlockError::with_source(ErrorKind::Open, format!("cannot read {}", log_path.display()), e))?;
        if &content[..8] != LOG_MAGIC {
            return Err(BlockError::new(
                ErrorKind::Open,
                format!("{}: not a chanio clone log", log_path.display()),
            ));
        }
        let entries = content[LOG_HEADER as usize..].chunks_exact(8).map(le64);
        let same_boot = self.boot != [0u8; BOOT_ID_LEN] && content[8..8 + BOOT_ID_LEN] == self.boot;
        let clusters = self.base_len.div_ceil(CLUSTER);
        if same_boot {
            let mut taken = 0;
            for c in entries.filter(|&c| c < clusters) {
                self.set_bit(c);
                taken += 1;
            }
            if taken > 0 {
                tracing::info!(clone = %self.path.display(), clusters = taken, "clone: clusters written before a restart taken back");
            }
        } else {
            let dropped = entries.count();
            if dropped > 0 {
                tracing::warn!(
                    clone = %self.path.display(),
                    clusters = dropped,
                    "clone: clusters written but never flushed before a reboot are dropped; they read from the base"
                );
            }
        }
        Ok(())
    }

    /// Closes the files without a flush, as a crash of the daemon would.
    #[cfg(test)]
    fn crash(mut self) {
        self.flush_on_drop = false;
    }

    /// The clone's data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Clusters the clone holds.
    pub fn clusters_held(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    fn bit(&self, cluster: u64) -> bool {
        self.bits[(cluster / 64) as usize].load(Ordering::Acquire) & (1 << (cluster % 64)) != 0
    }

    fn set_bit(&self, cluster: u64) {
        self.bits[(cluster / 64) as usize].fetch_or(1 << (cluster % 64), Ordering::AcqRel);
    }

    fn io_error(&self, kind: ErrorKind, what: &str, file: &Path, at: u64, e: std::io::Error) -> BlockError {
        BlockError::with_source(kind, format!("{what} {} at byte {at}", file.display()), e)
    }

    /// Takes `cluster` into the clone with `data` at `within` bytes into it:
    /// the rest of the cluster comes from the base.
    fn take_cluster(&self, cluster: u64, within: usize, data: &[u8]) -> Result<(), BlockError> {
        let mut log = self.alloc.lock();
        let start = cluster * CLUSTER;
        if self.bit(cluster) {
            // Taken while this waited for the lock.
            drop(log);
            return self
                .data
                .write_all_at(data, start + within as u64)
                .map_err(|e| self.io_error(ErrorKind::WriteFailed, "cannot write", &self.path, start, e));
        }
        let len = CLUSTER.min(self.base_len - start) as usize;
        let mut whole;
        let bytes: &[u8] = if within == 0 && data.len() == len {
            data
        } else {
            whole = vec![0u8; len];
            self.base
                .read_exact_at(&mut whole, start)
                .map_err(|e| self.io_error(ErrorKind::ReadFailed, "cannot read", &self.base_path, start, e))?;
            whole[within..within + data.len()].copy_from_slice(data);
            &whole
        };
        self.data
            .write_all_at(bytes, start)
            .map_err(|e| self.io_error(ErrorKind::WriteFailed, "cannot write", &self.path, start, e))?;
        let at = LOG_HEADER + log.len;
        log.file
            .write_all_at(&cluster.to_le_bytes(), at)
            .map_err(|e| self.io_error(ErrorKind::WriteFailed, "cannot append to the log of", &self.path, at, e))?;
        log.len += 8;
        self.set_bit(cluster);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Calls `f(cluster, offset, range)` for each run of `len` bytes at
    /// `offset` that lies in one cluster.
    fn for_each_cluster(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, u64, std::ops::Range<usize>) -> Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let cluster = at / CLUSTER;
            let n = ((cluster + 1) * CLUSTER - at).min((len - done) as u64) as usize;
            f(cluster, at, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

impl BlockIo for CloneBackend {
    fn describe(&self) -> String {
        format!(
            "clone {} of {} ({} of {} clusters of {} KiB its own)",
            self.path.display(),
            self.base_path.display(),
            self.clusters_held(),
            self.base_len.div_ceil(CLUSTER),
            CLUSTER / 1024
        )
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(self.geometry, offset, buf.len() as u64)?;
        // Runs of clusters from the same file go in one read.
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let own = self.bit(at / CLUSTER);
            let mut end = done;
            while end < buf.len() && self.bit((offset + end as u64) / CLUSTER) == own {
                let c = (offset + end as u64) / CLUSTER;
                end = (((c + 1) * CLUSTER - offset) as usize).min(buf.len());
            }
            let (file, path) = if own {
                (&self.data, &self.path)
            } else {
                (&self.base, &self.base_path)
            };
            file.read_exact_at(&mut buf[done..end], at)
                .map_err(|e| self.io_error(ErrorKind::ReadFailed, "cannot read", path, at, e))?;
            done = end;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        check_range(self.geometry, offset, data.len() as u64)?;
        self.for_each_cluster(offset, data.len(), |cluster, at, range| {
            if self.bit(cluster) {
                self.data
                    .write_all_at(&data[range], at)
                    .map_err(|e| self.io_error(ErrorKind::WriteFailed, "cannot write", &self.path, at, e))
            } else {
                self.take_cluster(cluster, (at - cluster * CLUSTER) as usize, &data[range])
            }
        })?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        // Held throughout: no cluster is taken between the data sync and
        // the bitmap that names it.
        let mut log = self.alloc.lock();
        self.data
            .sync_data()
            .map_err(|e| self.io_error(ErrorKind::WriteFailed, "cannot sync", &self.path, 0, e))?;
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let result = (|| {
            let bitmap: Vec<u8> = self
                .bits
                .iter()
                .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
                .collect();
            let map_path = with_ext(&self.path, ".map");
            self.map
                .write_all_at(&bitmap, MAP_HEADER)
                .and_then(|()| self.map.sync_data())
                .map_err(|e| self.io_error(ErrorKind::WriteFailed, "cannot write", &map_path, MAP_HEADER, e))?;
            let mut header = vec![0u8; LOG_HEADER as usize];
            header[..8].copy_from_slice(LOG_MAGIC);
            header[8..8 + BOOT_ID_LEN].copy_from_slice(&self.boot);
            let log_path = with_ext(&self.path, ".log");
            log.file
                .set_len(LOG_HEADER)
                .and_then(|()| log.file.write_all_at(&header, 0))
                .map_err(|e| self.io_error(ErrorKind::WriteFailed, "cannot reset", &log_path, 0, e))?;
            log.len = 0;
            Ok(())
        })();
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }
}

impl WriteZeroes for CloneBackend {
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(self.geometry, offset, len)?;
        let zeros = vec![0u8; CLUSTER as usize];
        let mut done = 0u64;
        while done < len {
            let n = (CLUSTER - (offset + done) % CLUSTER).min(len - done);
            self.write(offset + done, &zeros[..n as usize], false)?;
            done += n;
        }
        Ok(())
    }
}

impl Discard for CloneBackend {
    /// Deallocated blocks read as zeros, never as the base's data again.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len)
    }
}

impl Drop for CloneBackend {
    fn drop(&mut self) {
        if !self.flush_on_drop {
            return;
        }
        if let Err(e) = self.flush() {
            tracing::error!(clone = %self.path.display(), "clone: the last flush failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
