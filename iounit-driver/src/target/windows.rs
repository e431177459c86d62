//! Storage windows: ranges of a namespace's storage registered in place in
//! one queue's protection domain, so that its host reads and writes them
//! with one-sided RDMA under a steering tag (`docs/protocol.md` §9.6).
//!
//! The table here owns every window's registration ([`Exposure`]):
//! removing an entry revokes its key at once (the NIC, or the software
//! responder, refuses it from then on). A window goes when its host
//! closes it, when its queue's channel ends, when its namespace is
//! detached, attached anew or masked, and when the target stops. Each host
//! NQN holds at most `max_windows_per_host`.
//!
//! Over a device (a NIC writes pinned pages behind the page cache's
//! back), over shm (its memory can be shared, a file's cannot), and where
//! the target is told to (`window_file_cache`), a file window is a
//! **cached extent** instead: a sealed memfd holding a copy of the
//! window's blocks ([`WindowCache`]), registered in place.
//! The queues keep it coherent with the commands to the same blocks: a
//! command read sees what window writes put there (`overlay`), a command
//! write or zeroing lands there too (`absorb`, `zero`), and Commit writes
//! the extent back to the file, durably. Cached extents of a namespace
//! never overlap, and each is at most [`MAX_CACHED_WINDOW`] bytes.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use messaging::mr::{Access, Exposure, ExternalMemory, MrError, ProtectionDomain};
use messaging::provider::shm::SealedMemory;
use parking_lot::Mutex;

use crate::nvme::window::status as window_status;
use crate::nvme::{Status, WindowDescriptor};

/// The largest cached extent (a window of a file the device cannot
/// register in place): its copy is made, and written back, at once.
pub(crate) const MAX_CACHED_WINDOW: u64 = 64 << 20;

/// One open window.
struct Window {
    hostnqn: String,
    /// The queue it was opened on ([`Windows::queue_serial`]): the only
    /// channel whose domain holds its key.
    queue: u64,
    nsid: u32,
    /// Its first byte in the namespace, and its length.
    offset: u64,
    len: u64,
    /// A cached extent's copy of the blocks (`None`: registered in place).
    cache: Option<Arc<WindowCache>>,
    exposure: Exposure,
}

/// Where a window lies, for a commit.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub(crate) nsid: u32,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// A cached extent's copy, which Commit writes back.
    pub(crate) cache: Option<Arc<WindowCache>>,
}

/// What a queue asks to expose.
pub(crate) struct OpenRequest<'a> {
    pub(crate) hostnqn: &'a str,
    pub(crate) queue: u64,
    pub(crate) domain: &'a ProtectionDomain,
    pub(crate) nsid: u32,
    /// What is registered: the namespace's memory, or a cache.
    pub(crate) memory: Arc<dyn ExternalMemory>,
    /// The window's first byte in `memory`.
    pub(crate) memory_offset: u64,
    /// The window's first byte in the namespace, and its length.
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) write: bool,
    pub(crate) cache: Option<Arc<WindowCache>>,
}

/// Why a window was not opened.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The status Open completes with.
    Status(Status),
    /// The device would not register the memory in place.
    Device,
}

/// Every open window of the target.
pub(crate) struct Windows {
    limit_per_host: usize,
    inner: Mutex<Table>,
    /// Cached extents open: while 0 the queues skip [`Windows::overlay`]
    /// and its kin with one load.
    cached: AtomicUsize,
}

/// Memory holding a copy of a cached extent's blocks: a sealed memfd,
/// mapped shared, so that over shm a host of the daemon's user can map it
/// too. Its bytes are reached only by copies (here, a peer's RDMA, a peer
/// process's copies), never through a reference that outlives one copy.
#[derive(Debug)]
pub(crate) struct WindowCache(SealedMemory);

impl WindowCache {
    /// `len` (non-zero) zeroed bytes.
    pub(crate) fn new(len: usize) -> std::io::Result<WindowCache> {
        SealedMemory::new("chanio-window", len).map(WindowCache)
    }

    /// Runs `f` on `len` bytes at `at` (inside the cache: the callers
    /// clip to it), for the length of one copy.
    fn with_bytes<R>(&self, at: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        assert!(
            at.checked_add(len).is_some_and(|end| end <= self.len()),
            "a cache range outside the cache"
        );
        // SAFETY: the range lies inside the live mapping (asserted above);
        // the slice lives for one copy only (see `unsafe impl Send`), and
        // bytes have no invalid values, so a peer's concurrent RDMA can
        // only change what is copied.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.as_ptr().as_ptr().add(at), len) };
        f(bytes)
    }

    /// Fills the cache from `read` (the file's blocks).
    pub(crate) fn fill(
        &self,
        read: impl FnOnce(&mut [u8]) -> Result<(), crate::backend::BlockError>,
    ) -> Result<(), crate::backend::BlockError> {
        self.with_bytes(0, self.len(), read)
    }

    /// A copy of `len` bytes at `at`.
    pub(crate) fn copy_out(&self, at: usize, len: usize) -> Vec<u8> {
        self.with_bytes(at, len, |b| b.to_vec())
    }
}

// SAFETY: the sealed memory's own promise (see `SealedMemory`), passed on.
unsafe impl ExternalMemory for WindowCache {
    fn as_ptr(&self) -> NonNull<u8> {
        self.0.as_ptr()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn memfd(&self) -> Option<messaging::mr::SharedFd<'_>> {
        self.0.memfd()
    }
}

/// The part of `[offset, offset + len)` in a namespace that a cached
/// extent at `[w_offset, w_offset + w_len)` covers: (its place in the
/// extent, its place in the range, bytes).
fn intersect(w_offset: u64, w_len: u64, offset: u64, len: u64) -> Option<(usize, usize, usize)> {
    let start = offset.max(w_offset);
    let end = (offset + len).min(w_offset + w_len);
    (start < end).then(|| {
        (
            (start - w_offset) as usize,
            (start - offset) as usize,
            (end - start) as usize,
        )
    })
}

#[derive(Default)]
struct Table {
    next_id: u32,
    next_queue: u64,
    open: HashMap<u32, Window>,
}

impl Windows {
    pub(crate) fn new(limit_per_host: usize) -> Windows {
        Windows {
            limit_per_host,
            inner: Mutex::new(Table::default()),
            cached: AtomicUsize::new(0),
        }
    }

    /// Whether a cached extent of `nsid` overlaps `[offset, offset + len)`.
    pub(crate) fn cached_overlap(&self, nsid: u32, offset: u64, len: u64) -> bool {
        let t = self.inner.lock();
        t.open
            .values()
            .any(|w| w.nsid == nsid && w.cache.is_some() && intersect(w.offset, w.len, offset, len).is_some())
    }

    /// Runs `f(cache, place in the extent, place in the range, bytes)` for
    /// each cached extent of `nsid` that `[offset, offset + len)` touches.
    fn each_cached(&self, nsid: u32, offset: u64, len: u64, mut f: impl FnMut(&WindowCache, usize, usize, usize)) {
        if self.cached.load(Ordering::Acquire) == 0 {
            return;
        }
        let t = self.inner.lock();
        for w in t.open.values().filter(|w| w.nsid == nsid) {
            if let (Some(cache), Some((at, r, n))) = (&w.cache, intersect(w.offset, w.len, offset, len)) {
                f(cache, at, r, n);
            }
        }
    }

    /// A command read of `data.len()` bytes at `offset` of `nsid` just
    /// read the file: what cached extents hold there (window writes not
    /// yet written back) replaces it.
    pub(crate) fn overlay(&self, nsid: u32, offset: u64, data: &mut [u8]) {
        self.each_cached(nsid, offset, data.len() as u64, |cache, at, r, n| {
            cache.with_bytes(at, n, |b| data[r..r + n].copy_from_slice(b));
        });
    }

    /// A command wrote `data` at `offset` of `nsid`: cached extents there
    /// take it too.
    pub(crate) fn absorb(&self, nsid: u32, offset: u64, data: &[u8]) {
        self.each_cached(nsid, offset, data.len() as u64, |cache, at, r, n| {
            cache.with_bytes(at, n, |b| b.copy_from_slice(&data[r..r + n]));
        });
    }

    /// A command zeroed (or deallocated) `len` bytes at `offset` of `nsid`.
    pub(crate) fn zero(&self, nsid: u32, offset: u64, len: u64) {
        self.each_cached(nsid, offset, len, |cache, at, _, n| {
            cache.with_bytes(at, n, |b| b.fill(0))
        });
    }

    /// A number naming one queue for as long as the target runs.
    pub(crate) fn queue_serial(&self) -> u64 {
        let mut t = self.inner.lock();
        t.next_queue += 1;
        t.next_queue
    }

    /// Registers the window in the queue's domain.
    ///
    /// # Errors
    /// The status the Open completes with: the host's limit reached, or
    /// the registration refused (out of range, the device said no).
    pub(crate) fn open(&self, req: OpenRequest<'_>) -> Result<WindowDescriptor, Refused> {
        let status = Refused::Status;
        let (Ok(offset), Ok(len)) = (usize::try_from(req.memory_offset), usize::try_from(req.len)) else {
            return Err(status(Status::LBA_OUT_OF_RANGE.with_dnr()));
        };
        let held = {
            let t = self.inner.lock();
            t.open.values().filter(|w| w.hostnqn == req.hostnqn).count()
        };
        if held >= self.limit_per_host {
            tracing::info!(host = %req.hostnqn, held, "window refused: the host holds its limit");
            return Err(status(window_status::LIMIT_EXCEEDED.with_dnr()));
        }
        let access = match req.write {
            true => Access::REMOTE_READ | Access::REMOTE_WRITE | Access::LOCAL_WRITE,
            false => Access::REMOTE_READ,
        };
        let exposure = req
            .domain
            .register_external(req.memory, offset, len, access)
            .map_err(|e| match e {
                // The device refuses this memory (a NIC cannot pin the
                // pages of a file on a disk file system, for one).
                MrError::Device { .. } => {
                    tracing::debug!(host = %req.hostnqn, nsid = req.nsid, "the device refuses a window in place: {e}");
                    Refused::Device
                }
                _ => {
                    tracing::warn!(host = %req.hostnqn, nsid = req.nsid, "cannot register a window: {e}");
                    status(Status::INTERNAL_ERROR)
                }
            })?;
        let mut t = self.inner.lock();
        // Checked again under the lock: two queues of one host may race.
        if t.open.values().filter(|w| w.hostnqn == req.hostnqn).count() >= self.limit_per_host {
            drop(t);
            return Err(status(window_status::LIMIT_EXCEEDED.with_dnr()));
        }
        let id = loop {
            t.next_id = t.next_id.wrapping_add(1);
            if t.next_id != 0 && !t.open.contains_key(&t.next_id) {
                break t.next_id;
            }
        };
        let desc = WindowDescriptor {
            id,
            stag: exposure.rkey().0,
            addr: exposure.addr(),
            len: exposure.len(),
            write: req.write,
            shared: None,
        };
        tracing::debug!(host = %req.hostnqn, nsid = req.nsid, id, offset, len, write = req.write, "window open");
        t.open.insert(
            id,
            Window {
                hostnqn: req.hostnqn.to_owned(),
                queue: req.queue,
                nsid: req.nsid,
                offset: req.offset,
                len: req.len,
                cache: req.cache.clone(),
                exposure,
            },
        );
        if req.cache.is_some() {
            self.cached.fetch_add(1, Ordering::AcqRel);
        }
        Ok(desc)
    }

    /// Where window `id` of queue `queue` lies; `None` when the queue has
    /// no such window.
    pub(crate) fn placement(&self, queue: u64, id: u32) -> Option<Placement> {
        let t = self.inner.lock();
        let w = t.open.get(&id).filter(|w| w.queue == queue)?;
        Some(Placement {
            nsid: w.nsid,
            offset: w.offset,
            len: w.len,
            cache: w.cache.clone(),
        })
    }

    /// Closes window `id` of queue `queue`; whether it had one.
    pub(crate) fn close(&self, queue: u64, id: u32) -> bool {
        let removed = {
            let mut t = self.inner.lock();
            match t.open.get(&id) {
                Some(w) if w.queue == queue => t.open.remove(&id),
                _ => None,
            }
        };
        if removed.as_ref().is_some_and(|w| w.cache.is_some()) {
            self.cached.fetch_sub(1, Ordering::AcqRel);
        }
        removed.is_some()
    }

    /// Revokes every window of a queue whose channel ended.
    pub(crate) fn revoke_queue(&self, queue: u64) {
        self.revoke_where("its queue closed", |w| w.queue == queue);
    }

    /// Revokes every window on namespace `nsid` (detached, attached anew,
    /// masked).
    pub(crate) fn revoke_namespace(&self, nsid: u32, why: &str) {
        self.revoke_where(why, |w| w.nsid == nsid);
    }

    /// Revokes every window.
    pub(crate) fn revoke_all(&self) {
        self.revoke_where("the target stops", |_| true);
    }

    /// Windows open now.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.inner.lock().open.len()
    }

    fn revoke_where(&self, why: &str, pick: impl Fn(&Window) -> bool) {
        let gone: Vec<Window> = {
            let mut t = self.inner.lock();
            let ids: Vec<u32> = t.open.iter().filter(|(_, w)| pick(w)).map(|(&id, _)| id).collect();
            ids.iter().filter_map(|id| t.open.remove(id)).collect()
        };
        for w in &gone {
            tracing::debug!(host = %w.hostnqn, nsid = w.nsid, rkey = w.exposure.rkey().0, "window revoked: {why}");
            if w.cache.is_some() {
                self.cached.fetch_sub(1, Ordering::AcqRel);
            }
        }
        // Deregistered here, outside the table's lock.
        drop(gone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ram::RamBackend;
    use crate::backend::BlockIo;

    fn request<'a>(
        host: &'a str,
        queue: u64,
        pd: &'a ProtectionDomain,
        mem: &Arc<dyn ExternalMemory>,
        write: bool,
    ) -> OpenRequest<'a> {
        OpenRequest {
            hostnqn: host,
            queue,
            domain: pd,
            nsid: 1,
            memory: mem.clone(),
            memory_offset: 4096,
            offset: 4096,
            len: 8192,
            write,
            cache: None,
        }
    }

    #[test]
    fn windows_are_limited_per_host_and_revoked_by_each_trigger() {
        let ram = RamBackend::new(1 << 20, 512).unwrap();
        let mem = ram.window_memory().unwrap();
        let pd = ProtectionDomain::new();
        let windows = Windows::new(2);
        let (a, b) = ("nqn.a", "nqn.b");
        let (qa, qb) = (windows.queue_serial(), windows.queue_serial());
        assert_ne!(qa, qb);
        let w1 = windows.open(request(a, qa, &pd, &mem, false)).unwrap();
        let w2 = windows.open(request(a, qa, &pd, &mem, true)).unwrap();
        assert_ne!((w1.id, w1.stag), (w2.id, w2.stag));
        assert_eq!((w1.len, w1.write, w2.write), (8192, false, true));
        assert_eq!(w1.addr, mem.as_ptr().as_ptr() as u64 + 4096);
        let refused = windows.open(request(a, qa, &pd, &mem, false)).unwrap_err();
        assert!(matches!(refused, Refused::Status(s) if s.same_code(window_status::LIMIT_EXCEEDED)));
        // Another host has its own count.
        let w3 = windows.open(request(b, qb, &pd, &mem, false)).unwrap();
        let key_live = |d: &WindowDescriptor| {
            pd.remote_target(messaging::mr::RKey(d.stag), d.addr, 1, Access::REMOTE_READ)
                .is_ok()
        };
        assert!(key_live(&w1) && key_live(&w2) && key_live(&w3));

        // Close: only the owning queue's, and the key goes at once.
        assert!(!windows.close(qb, w1.id));
        assert!(windows.placement(qb, w1.id).is_none());
        let p = windows.placement(qa, w1.id).unwrap();
        assert_eq!((p.nsid, p.offset, p.len, p.cache.is_none()), (1, 4096, 8192, true));
        assert!(windows.close(qa, w1.id));
        assert!(!key_live(&w1) && !windows.close(qa, w1.id));
        // The host has room again.
        let w4 = windows.open(request(a, qa, &pd, &mem, false)).unwrap();

        windows.revoke_queue(qa);
        assert!(!key_live(&w2) && !key_live(&w4) && key_live(&w3));
        windows.revoke_namespace(2, "test");
        assert!(key_live(&w3));
        windows.revoke_namespace(1, "test");
        assert!(!key_live(&w3));
        assert_eq!((windows.count(), pd.registrations()), (0, 0));
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn cached_extents_take_command_writes_and_give_window_writes_to_reads() {
        let windows = Windows::new(8);
        let pd = ProtectionDomain::new();
        let cache = Arc::new(WindowCache::new(8192).unwrap());
        let q = windows.queue_serial();
        let d = windows
            .open(OpenRequest {
                hostnqn: "nqn.a",
                queue: q,
                domain: &pd,
                nsid: 3,
                memory: cache.clone(),
                memory_offset: 0,
                offset: 4096,
                len: 8192,
                write: true,
                cache: Some(cache.clone()),
            })
            .unwrap();
        assert!(windows.cached_overlap(3, 12287, 1) && !windows.cached_overlap(3, 12288, 10));
        assert!(!windows.cached_overlap(4, 4096, 1) && !windows.cached_overlap(3, 0, 4096));
        // A window write (as RDMA lands): in the cache, not the file.
        pd.remote_target(messaging::mr::RKey(d.stag), d.addr + 100, 3, Access::REMOTE_WRITE)
            .unwrap()
            .as_mut_slice()
            .copy_from_slice(b"abc");
        // A command read across the extent's start sees it, and the file
        // bytes elsewhere.
        let mut read = vec![7u8; 4096 + 200];
        windows.overlay(3, 4096 - 96, &mut read);
        assert_eq!(&read[..96], &[7; 96][..]);
        assert_eq!(&read[96 + 100..96 + 103], b"abc");
        // A command write and a zeroing land in it.
        windows.absorb(3, 4096 + 8190, b"xyzw");
        assert_eq!(cache.copy_out(8190, 2), b"xy");
        windows.zero(3, 4096 + 100, 2);
        assert_eq!(cache.copy_out(100, 3), b"\0\0c");
        // Other namespaces are untouched; closing ends the overlay.
        let mut other = vec![1u8; 10];
        windows.overlay(4, 4096, &mut other);
        assert_eq!(other, vec![1u8; 10]);
        assert!(windows.close(q, d.id));
        let mut after = vec![5u8; 10];
        windows.overlay(3, 4096 + 100, &mut after);
        assert_eq!(after, vec![5u8; 10]);
        assert_eq!(windows.cached.load(Ordering::Relaxed), 0);
    }
}
