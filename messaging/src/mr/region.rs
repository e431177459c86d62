//! Registered regions and the buffers carved from them: `Region` owns the
//! mapping and its registration, `BufPool` hands out its chunks as `Buf`s,
//! and `RemoteTarget` is the responder's view of a region a key names.

use super::*;

pub(super) struct Region {
    pub(super) ptr: NonNull<u8>,
    pub(super) layout: Layout,
    pub(super) chunk_size: usize,
    pub(super) count: usize,
    pub(super) lkey: LKey,
    pub(super) rkey: RKey,
    pub(super) access: Access,
    pub(super) free: Mutex<Vec<u32>>,
    /// `free`'s length, written under its lock: [`BufPool::available`]
    /// reads it without taking the lock (the protocol asks before every
    /// send whether a buffer is left).
    pub(super) free_count: AtomicUsize,
    /// Per chunk, the `Buf`s it is split into ([`Buf::split_to`]), 0 while
    /// it is one whole `Buf`: a whole one returns its chunk to `free` on
    /// drop with one load, a piece when it is the last one.
    pub(super) pieces: Box<[AtomicU32]>,
    pub(super) pd: Weak<PdInner>,
    /// The device registration, undone before the memory is freed.
    pub(super) device: Option<(Arc<dyn Registrar>, u64)>,
    /// The allocator that provided the memory and its handle (heap if none).
    pub(super) allocation: Option<(Arc<dyn RegionAllocator>, u64)>,
    /// The owner of memory registered in place
    /// ([`ProtectionDomain::register_external`]): kept alive while the
    /// region lives, and never freed by it.
    pub(super) external: Option<Arc<dyn ExternalMemory>>,
}

/// Frees region memory where it came from.
///
/// # Safety
/// `ptr` must come from `map_anonymous(layout.size())` when `allocation` is `None`,
/// else from that allocator's `allocate(layout.size())` with that handle;
/// it is freed once and never used after.
pub(super) unsafe fn release(ptr: NonNull<u8>, layout: Layout, allocation: Option<(Arc<dyn RegionAllocator>, u64)>) {
    match allocation {
        // SAFETY: the caller's contract, passed on.
        Some((allocator, handle)) => unsafe { allocator.free(ptr, layout.size(), handle) },
        // SAFETY: the caller's contract: a mapping of `layout.size()` bytes
        // from `map_anonymous`, unmapped once.
        None => unsafe {
            libc::munmap(ptr.as_ptr().cast(), layout.size());
        },
    }
}

/// `bytes` of fresh, zeroed, page-aligned memory straight from the kernel
/// (an anonymous private mapping), for a registration without an
/// allocator. Not from the heap: its pages cost nothing until touched, and
/// unmapping gives them back to the system at once (a freed heap block of
/// this size would stay with the process, and a reused one would have to
/// be zeroed, touching every page).
pub(super) fn map_anonymous(bytes: usize) -> Option<NonNull<u8>> {
    // SAFETY: an anonymous mapping at an address the kernel picks refers to
    // no existing memory; the result is checked before use.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    NonNull::new(raw.cast())
}

// SAFETY: the region is a plain mapping (or allocation) of bytes that nothing else
// frees while the `Arc<Region>` lives; all access to the bytes goes through
// `Buf` (exclusive per chunk) or `RemoteTarget` (the documented DMA hazard),
// and the free list is behind a mutex.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: shared access only reads immutable fields or goes
// through the mutex-protected free list.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(pd) = self.pd.upgrade() {
            let mut regions = pd.regions.write();
            if regions.get(&self.lkey.0).is_some_and(|w| w.strong_count() == 0) {
                regions.remove(&self.lkey.0);
            }
        }
        if let Some((registrar, handle)) = self.device.take() {
            // SAFETY: `handle` came from `register` on this registrar and is
            // deregistered once, here; the memory is still allocated.
            if let Err(error) = unsafe { registrar.deregister(handle) } {
                // The device (or a peer's RDMA Write) may still reach the
                // memory: freeing it could let DMA land in reused memory.
                tracing::error!(
                    %error,
                    bytes = self.layout.size(),
                    "deregistration failed; leaking the memory instead of freeing it"
                );
                // Memory owned elsewhere must outlive the device's reach
                // too: its owner is leaked with it.
                std::mem::forget(self.external.take());
                return;
            }
        }
        if self.external.take().is_some() {
            // Registered in place: the owner frees its memory.
            return;
        }
        // SAFETY: `ptr` came from `map_anonymous(self.layout.size())` (or the
        // allocator in `allocation`) and is freed once, here, after the last
        // `Arc` (and so the last `Buf`/`RemoteTarget`) died and, with a
        // registrar, after the device let go of it (`Ok`).
        unsafe { release(self.ptr, self.layout, self.allocation.take()) };
    }
}

/// One registration split into equal chunks that are checked out as [`Buf`]s.
/// Clones share the registration; it is deregistered when the pool and every
/// `Buf` from it are gone.
#[derive(Clone)]
pub struct BufPool {
    pub(super) region: Arc<Region>,
}

impl BufPool {
    /// Checks out a free chunk, or `None` when all are in use.
    pub fn checkout(&self) -> Option<Buf> {
        let index = {
            let mut free = self.region.free.lock();
            let index = free.pop()?;
            self.region.free_count.store(free.len(), Ordering::Release);
            index
        };
        Some(Buf {
            region: self.region.clone(),
            index,
            start: 0,
            cap: self.region.chunk_size,
            len: 0,
        })
    }

    /// Size of each chunk in bytes.
    pub fn chunk_size(&self) -> usize {
        self.region.chunk_size
    }

    /// Number of chunks.
    pub fn count(&self) -> usize {
        self.region.count
    }

    /// Number of chunks not checked out.
    pub fn available(&self) -> usize {
        self.region.free_count.load(Ordering::Acquire)
    }

    /// Local key of the registration.
    pub fn lkey(&self) -> LKey {
        self.region.lkey
    }

    /// Remote key of the registration.
    pub fn rkey(&self) -> RKey {
        self.region.rkey
    }

    /// Access rights of the registration.
    pub fn access(&self) -> Access {
        self.region.access
    }

    /// The whole registration as a remote descriptor.
    pub fn remote(&self) -> RemoteBuf {
        RemoteBuf {
            addr: self.region.ptr.as_ptr() as u64,
            len: u32::try_from(self.region.layout.size()).unwrap_or(u32::MAX),
            rkey: self.region.rkey,
        }
    }
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("chunk_size", &self.chunk_size())
            .field("count", &self.count())
            .field("available", &self.available())
            .field("access", &self.region.access)
            .field("rkey", &self.region.rkey)
            .finish()
    }
}

/// One chunk of registered memory, or a piece of one, owned exclusively.
///
/// A `Buf` has a capacity (its chunk size, or its piece's) and a length (how
/// many bytes hold data); it derefs to the first `len` bytes. Dropping it
/// returns the chunk to its pool, once every piece split from it
/// ([`Buf::split_to`]) is dropped too.
pub struct Buf {
    pub(super) region: Arc<Region>,
    index: u32,
    /// Where this piece starts in its chunk (0 for a whole chunk).
    start: usize,
    /// This piece's size.
    cap: usize,
    len: usize,
}

impl Buf {
    /// Chunk index within its pool.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Splits off the first `at` bytes of data as a buffer of their own
    /// (capacity `at`); this one keeps the rest, data and capacity. Both
    /// stay registered where they were, so each can be sent, pushed or
    /// posted on its own (a large write pushed in slot-sized pieces from
    /// one buffer, with no copy); the chunk returns to its pool once every
    /// piece is dropped.
    ///
    /// # Panics
    /// If `at` exceeds the length (a local programming error).
    pub fn split_to(&mut self, at: usize) -> Buf {
        assert!(at <= self.len, "Buf::split_to({at}) beyond length {}", self.len);
        let pieces = &self.region.pieces[self.index as usize];
        if pieces.load(Ordering::Acquire) == 0 {
            // Whole until now: no other `Buf` of the chunk exists to race.
            pieces.store(2, Ordering::Release);
        } else {
            pieces.fetch_add(1, Ordering::AcqRel);
        }
        let front = Buf {
            region: self.region.clone(),
            index: self.index,
            start: self.start,
            cap: at,
            len: at,
        };
        self.start += at;
        self.cap -= at;
        self.len -= at;
        front
    }

    /// Sets the data length.
    ///
    /// # Panics
    /// If `len` exceeds the capacity (a local programming error).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "Buf::set_len({len}) beyond capacity {}",
            self.capacity()
        );
        self.len = len;
    }

    /// Copies `data` to the start of the buffer and sets the length.
    ///
    /// # Errors
    /// Returns the capacity when `data` does not fit.
    pub fn fill(&mut self, data: &[u8]) -> Result<(), usize> {
        if data.len() > self.capacity() {
            return Err(self.capacity());
        }
        self.spare_capacity()[..data.len()].copy_from_slice(data);
        self.len = data.len();
        Ok(())
    }

    /// The whole chunk, whatever the length, for filling in place.
    pub fn spare_capacity(&mut self) -> &mut [u8] {
        // SAFETY: the piece lies inside the live allocation (index < count,
        // start + cap <= chunk_size) and this `Buf` is its only local handle
        // (the free list hands each index out once, and the pieces of a
        // split chunk are disjoint), so no other local reference aliases it;
        // `&mut self` makes this borrow exclusive among this handle's own
        // borrows.
        unsafe { std::slice::from_raw_parts_mut(self.chunk_ptr(), self.cap) }
    }

    /// Local key of the registration the chunk belongs to.
    pub fn lkey(&self) -> LKey {
        self.region.lkey
    }

    /// Access rights of the registration the chunk belongs to.
    pub fn access(&self) -> Access {
        self.region.access
    }

    /// Virtual address of the chunk's first byte.
    pub fn addr(&self) -> u64 {
        self.chunk_ptr() as u64
    }

    /// The chunk (whole capacity) as a remote descriptor, for advertising it
    /// to a peer. Meaningful only if the pool was registered with remote access.
    pub fn remote(&self) -> RemoteBuf {
        RemoteBuf {
            addr: self.addr(),
            len: u32::try_from(self.capacity()).unwrap_or(u32::MAX),
            rkey: self.region.rkey,
        }
    }

    /// The allocator handle of the registration and the chunk's offset in
    /// it, when the domain has a [`RegionAllocator`] (`None` for its own mappings).
    pub fn allocation(&self) -> Option<(u64, usize)> {
        let (_, handle) = self.region.allocation.as_ref()?;
        Some((*handle, self.index as usize * self.region.chunk_size + self.start))
    }

    /// Whether this buffer belongs to `pool`.
    pub fn is_from(&self, pool: &BufPool) -> bool {
        Arc::ptr_eq(&self.region, &pool.region)
    }

    fn chunk_ptr(&self) -> *mut u8 {
        // SAFETY: index < count and start <= chunk_size, so the offset stays
        // inside the allocation.
        unsafe {
            self.region
                .ptr
                .as_ptr()
                .add(self.index as usize * self.region.chunk_size + self.start)
        }
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: as in `spare_capacity`; `len <= cap` is kept by `set_len`/`fill`/`split_to`.
        unsafe { std::slice::from_raw_parts(self.chunk_ptr(), self.len) }
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.spare_capacity()[..len]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let pieces = &self.region.pieces[self.index as usize];
        // A piece gives the chunk back only as the last one (leaving 0).
        if pieces.load(Ordering::Acquire) != 0 && pieces.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let mut free = self.region.free.lock();
        free.push(self.index);
        self.region.free_count.store(free.len(), Ordering::Release);
    }
}

impl fmt::Debug for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buf")
            .field("index", &self.index)
            .field("start", &self.start)
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("lkey", &self.region.lkey)
            .finish()
    }
}

/// A checked range of registered memory reached by remote key: the place a
/// peer's RDMA Write lands or an RDMA Read is served from. It holds the
/// region alive while data moves.
pub struct RemoteTarget {
    pub(super) region: Arc<Region>,
    pub(super) offset: usize,
    pub(super) len: usize,
}

impl RemoteTarget {
    /// Length of the range.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The registration the range lies in, when the domain has a
    /// [`RegionAllocator`]: its allocator handle, its first address and its
    /// size in bytes (`None` for heap memory).
    pub fn region_allocation(&self) -> Option<(u64, u64, u64)> {
        let (_, handle) = self.region.allocation.as_ref()?;
        Some((
            *handle,
            self.region.ptr.as_ptr() as u64,
            self.region.layout.size() as u64,
        ))
    }

    /// The bytes, for serving an RDMA Read.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `offset + len` was bounds-checked against the live allocation
        // in `remote_target`. Concurrent local writers exist only if the peer
        // reads memory it was not granted: the DMA hazard in the module docs.
        unsafe { std::slice::from_raw_parts(self.region.ptr.as_ptr().add(self.offset), self.len) }
    }

    /// The bytes, for placing an RDMA Write.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: bounds as in `as_slice`. The range was granted to the peer,
        // so no local `Buf` is reading it unless the peer breaks its grant:
        // the DMA hazard in the module docs. Bytes have no invalid values.
        unsafe { std::slice::from_raw_parts_mut(self.region.ptr.as_ptr().add(self.offset), self.len) }
    }
}

impl fmt::Debug for RemoteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteTarget")
            .field("rkey", &self.region.rkey)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

/// Memory owned elsewhere, registered in place
/// ([`ProtectionDomain::register_external`]): peers of the domain reach
/// it by [`Exposure::rkey`] until the exposure is dropped, which revokes
/// the key at once.
pub struct Exposure {
    pub(super) region: Arc<Region>,
}

impl Exposure {
    fn region(&self) -> &Region {
        &self.region
    }

    /// The remote key peers name the memory by.
    pub fn rkey(&self) -> RKey {
        self.region().rkey
    }

    /// The local key (for this side's own work requests on the device).
    pub fn lkey(&self) -> LKey {
        self.region().lkey
    }

    /// The address of the first byte, as peers name it.
    pub fn addr(&self) -> u64 {
        self.region().ptr.as_ptr() as u64
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.region().layout.size() as u64
    }

    /// Whether the exposure is empty (never: registration refuses that).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rights peers have.
    pub fn access(&self) -> Access {
        self.region().access
    }
}

impl Drop for Exposure {
    fn drop(&mut self) {
        let region = &self.region;
        // Revoked now, even while a transfer under way holds the region:
        // no new access finds the key.
        if let Some(pd) = region.pd.upgrade() {
            let mut regions = pd.regions.write();
            if regions
                .get(&region.lkey.0)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(region)))
            {
                regions.remove(&region.lkey.0);
            }
        }
    }
}

impl fmt::Debug for Exposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exposure")
            .field("rkey", &self.rkey())
            .field("len", &self.len())
            .field("access", &self.access())
            .finish()
    }
}
