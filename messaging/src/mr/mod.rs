//! Registered memory: protection domains, buffer pools and remote keys.
//!
//! ```text
//! ProtectionDomain ── register() ──▶ BufPool ── checkout() ──▶ Buf
//!        │                             │                        │
//!   rkey → region table          one registration         one chunk, owned;
//!   (for one-sided access)       (lkey, rkey, access)     checks itself back
//!                                                          in on drop
//! ```
//!
//! A [`BufPool`] is one registration: `count` chunks of `chunk_size` bytes in
//! one page-aligned allocation, with a local key, a remote key and access
//! flags. Each chunk is checked out as a [`Buf`], an owned handle that derefs
//! to its bytes; posting a work request moves the `Buf` into the provider and
//! its completion hands it back, so a buffer can never be touched locally
//! while the fabric owns it. Dropping a `Buf` returns its chunk to the pool.
//!
//! One-sided operations (RDMA Write and Read) from a peer reach memory by
//! remote key: [`ProtectionDomain::remote_target`] checks the key, the bounds
//! and the access flags, exactly as an RDMA NIC does, and yields a
//! [`RemoteTarget`] that keeps the region alive while the data moves.
//!
//! # Device registration
//! A domain made with [`ProtectionDomain::with_registrar`] also registers
//! every allocation with a device (an RDMA NIC, through `ibv_reg_mr`): the
//! [`Registrar`] hands back the device's local and remote keys, which the
//! pool and its buffers then report, and the registration is undone before
//! the memory is freed. Should the device fail to undo it, the memory is
//! leaked rather than freed, since the device (or a peer's RDMA Write) may
//! still reach it. Without a registrar (the software providers) keys are
//! drawn by the domain itself.
//!
//! # Where the memory comes from
//! By default from an anonymous mapping of its own (fresh zero pages,
//! given back to the system when the region goes). A domain made with
//! [`ProtectionDomain::with_allocator`] takes it from a [`RegionAllocator`]
//! instead: the shm provider allocates every registration from a sealed
//! memfd so that a peer process can map it; [`Buf::allocation`] names the
//! allocation and the chunk's offset in it.
//!
//! # The DMA hazard
//! Memory registered with [`Access::REMOTE_WRITE`] can be written by the peer
//! at any time, as with real RDMA hardware. The push-push protocol only
//! writes into memory that the receiver granted and that no local handle is
//! reading (a granted slot or an exposed buffer); a peer that breaks that
//! rule can change bytes under a reader's feet, but can never reach memory
//! outside the registration or read uninitialised memory (regions are
//! zeroed when allocated).

use crate::intmap::IntMap;
use std::alloc::Layout;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::ops::{BitOr, Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

mod region;

use region::*;
pub use region::{Buf, BufPool, Exposure, RemoteTarget};

/// Access rights of a registration, as verbs' `ibv_access_flags`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access(u8);

impl Access {
    /// Local reads only (every registration allows those).
    pub const NONE: Access = Access(0);
    /// The local fabric may write the memory (receives, RDMA Read results).
    pub const LOCAL_WRITE: Access = Access(1);
    /// A peer may RDMA-write the memory (needs `LOCAL_WRITE` too, as in verbs).
    pub const REMOTE_WRITE: Access = Access(2);
    /// A peer may RDMA-read the memory.
    pub const REMOTE_READ: Access = Access(4);

    /// Every right: local write, remote write and remote read.
    pub const ALL: Access = Access(7);

    /// Whether every right in `other` is also in `self`.
    pub fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bit set (bit 0 local write, bit 1 remote write, bit 2 remote read).
    pub fn bits(self) -> u8 {
        self.0
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.contains(Access::LOCAL_WRITE) {
            names.push("LOCAL_WRITE");
        }
        if self.contains(Access::REMOTE_WRITE) {
            names.push("REMOTE_WRITE");
        }
        if self.contains(Access::REMOTE_READ) {
            names.push("REMOTE_READ");
        }
        if names.is_empty() {
            names.push("NONE");
        }
        write!(f, "{}", names.join("|"))
    }
}

/// Local key of a registration (names it in local work requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LKey(pub u32);

/// Remote key of a registration (a peer names it in one-sided operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RKey(pub u32);

/// A keyed descriptor of remote memory: what a peer advertises so that we
/// can write into it or read from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteBuf {
    /// Virtual address of the first byte on the peer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The peer's remote key for the registration.
    pub rkey: RKey,
}

impl RemoteBuf {
    /// Encoded size of [`RemoteBuf::encode`].
    pub const ENCODED_LEN: usize = 16;

    /// Encodes as little-endian `addr u64, len u32, rkey u32`.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.rkey.0.to_le_bytes());
        out
    }

    /// Decodes what [`RemoteBuf::encode`] wrote; `None` if `bytes` is short.
    pub fn decode(bytes: &[u8]) -> Option<RemoteBuf> {
        let b = bytes.get(..Self::ENCODED_LEN)?;
        Some(RemoteBuf {
            addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
            len: u32::from_le_bytes(b[8..12].try_into().ok()?),
            rkey: RKey(u32::from_le_bytes(b[12..16].try_into().ok()?)),
        })
    }
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MrError {
    /// A zero-sized or overflowing pool was asked for.
    #[error("invalid registration size: {count} chunks of {chunk_size} bytes")]
    InvalidSize {
        /// Requested chunk size.
        chunk_size: usize,
        /// Requested chunk count.
        count: usize,
    },
    /// Remote write without local write, which verbs refuses too.
    #[error("remote write access needs local write access as well")]
    InvalidAccess,
    /// The allocator could not provide the memory.
    #[error("out of memory registering {bytes} bytes")]
    OutOfMemory {
        /// Requested total size.
        bytes: usize,
    },
    /// The device refused the registration (a [`Registrar`] failed).
    #[error("the device refused to register {bytes} bytes")]
    Device {
        /// Requested total size.
        bytes: usize,
        /// The cause the device gave.
        #[source]
        source: std::io::Error,
    },
    /// The device could not undo a registration; its memory is leaked.
    #[error("the device could not deregister {bytes} bytes; the memory is leaked")]
    Deregister {
        /// Size of the registration.
        bytes: usize,
        /// The cause the device gave.
        #[source]
        source: std::io::Error,
    },
}

/// Keys and handle of one device registration, as a [`Registrar`] returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    /// The device's local key for the memory.
    pub lkey: LKey,
    /// The device's remote key for the memory.
    pub rkey: RKey,
    /// The registrar's own name for the registration, given back to
    /// [`Registrar::deregister`].
    pub handle: u64,
}

/// A hook that registers a domain's memory with a device, so that the keys
/// a [`BufPool`] and its [`Buf`]s report are the device's own.
///
/// [`ProtectionDomain::register`] calls [`Registrar::register`] once per
/// pool, after allocating (zeroed) memory, and the region calls
/// [`Registrar::deregister`] exactly once, when its last handle is gone and
/// before the memory is freed. If `deregister` fails, the memory is never
/// freed (the region leaks it and logs an error).
///
/// # Safety
/// Implementors promise that:
/// - a successful `register` lets the device reach only `addr..addr + len`:
///   peers holding the remote key only with the remote rights in `access`,
///   the device itself (for this process's own work requests) with local
///   reads and at most local write, which the provider checks against
///   `access` before posting;
/// - once `deregister(handle)` returns `Ok`, the device no longer reads or
///   writes that memory, so it may be freed; whenever the device may still
///   reach it, `deregister` returns `Err` instead;
/// - both are safe to call from any thread (`Send + Sync`).
pub unsafe trait Registrar: Send + Sync {
    /// Registers `len` bytes at `addr` with the given rights.
    ///
    /// # Safety
    /// `addr..addr + len` must be one live allocation that stays allocated
    /// until `deregister` of the returned handle has returned `Ok` (after
    /// an `Err` it stays allocated for good).
    ///
    /// # Errors
    /// [`MrError::Device`] (or another [`MrError`]) when the device refuses.
    unsafe fn register(&self, addr: *mut u8, len: usize, access: Access) -> Result<Registration, MrError>;

    /// Undoes the registration named by `handle`.
    ///
    /// # Safety
    /// `handle` must come from a successful `register` on this registrar and
    /// must not have been deregistered already (whether that returned `Ok`
    /// or `Err`).
    ///
    /// # Errors
    /// [`MrError::Deregister`] when the device may still reach the memory;
    /// the caller then must never free it.
    unsafe fn deregister(&self, handle: u64) -> Result<(), MrError>;

    /// A registrar of a new protection domain on the same device, for
    /// [`ProtectionDomain::child`]: the child's regions are then reachable
    /// only on queue pairs of that device domain. `Ok(None)`, the default,
    /// where the device has one domain that children share.
    ///
    /// # Errors
    /// [`MrError::Device`] when the device refuses a new domain.
    fn new_domain(&self) -> Result<Option<Arc<dyn Registrar>>, MrError> {
        Ok(None)
    }

    /// This registrar as `Any`, so that the provider that made it can find
    /// its device domain behind a [`ProtectionDomain`].
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// A hook that provides the memory of a domain's registrations, for
/// providers that must share it with other processes (the shm provider
/// allocates every registration from a memfd). Without one, a domain
/// maps anonymous memory for each registration.
///
/// # Safety
/// Implementors promise that a successful `allocate(len)` returns a pointer
/// to `len` zeroed, writable bytes, aligned to 4096, that stay valid and
/// are used by nothing else until `free` is called with the same pointer,
/// length and handle, and that both are safe to call from any thread.
pub unsafe trait RegionAllocator: Send + Sync {
    /// Allocates `len` (non-zero) zeroed bytes; returns them and a handle
    /// naming the allocation (given back to `free`, reported by
    /// [`Buf::allocation`]).
    ///
    /// # Errors
    /// [`MrError::OutOfMemory`] (or another [`MrError`]) when it cannot.
    fn allocate(&self, len: usize) -> Result<(NonNull<u8>, u64), MrError>;

    /// Frees an allocation.
    ///
    /// # Safety
    /// `ptr`, `len` and `handle` must come from one successful `allocate`
    /// on this allocator, freed once, and nothing may use the memory after.
    unsafe fn free(&self, ptr: NonNull<u8>, len: usize, handle: u64);
}

/// Memory owned by something else (a storage backend's arena, a file
/// mapped shared) that a domain registers in place
/// ([`ProtectionDomain::register_external`]): peers then read and write it
/// by remote key with no copy through a buffer of ours.
///
/// # Safety
/// Implementors promise that `as_ptr()..as_ptr() + len()` is one mapping
/// of readable and writable bytes that stays mapped, at that address, for
/// as long as the value lives; that both methods always return the same
/// values; and that the bytes carry no invariant beyond being bytes: they
/// may be read and written from any thread at any time (a peer's RDMA
/// lands in them while local code uses them, as DMA does; the owner's own
/// accesses go through raw pointers, never through a reference that
/// claims the bytes unchanging or exclusive for longer than a copy).
pub unsafe trait ExternalMemory: Send + Sync {
    /// The first byte.
    fn as_ptr(&self) -> NonNull<u8>;
    /// The length in bytes.
    fn len(&self) -> usize;
    /// Whether the memory is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The sealed memfd that holds the memory from its first byte, for
    /// providers that share memory with a peer process
    /// ([`QueuePair::share_memory`](crate::provider::QueuePair::share_memory)):
    /// `None` (the default) when there is none.
    fn memfd(&self) -> Option<SharedFd<'_>> {
        None
    }
}

/// A sealed memfd (its size can never change) holding an
/// [`ExternalMemory`], with the process-wide ID it is shared under.
#[derive(Debug, Clone, Copy)]
pub struct SharedFd<'a> {
    /// The memfd; the memory's first byte is at offset 0.
    pub fd: std::os::fd::BorrowedFd<'a>,
    /// From [`memory_id`], once per memfd.
    pub id: u64,
}

static NEXT_MEMORY_ID: AtomicU64 = AtomicU64::new(1);

/// A new process-wide ID for memory shared with peers (never 0, never
/// repeated; the shm provider names its registrations' memfds with the
/// same sequence).
pub fn memory_id() -> u64 {
    NEXT_MEMORY_ID.fetch_add(1, Ordering::Relaxed)
}

/// Why a one-sided access by remote key was refused. Every kind maps to the
/// verbs completion status "remote access error" for the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RemoteAccessError {
    /// No live registration has that remote key.
    #[error("unknown remote key {0:#x}")]
    BadKey(u32),
    /// The range leaves the registration.
    #[error("range {addr:#x}+{len} is outside the registration")]
    OutOfBounds {
        /// First byte asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
    },
    /// The registration lacks the access right.
    #[error("registration does not allow {0:?}")]
    NoPermission(Access),
}

/// A region's local and remote keys, and its device registration.
type RegionKeys = (LKey, RKey, Option<(Arc<dyn Registrar>, u64)>);

/// A protection domain: the set of registrations that peers may reach by
/// remote key. Each fabric instance owns one, and each connection gets a
/// [`child`](ProtectionDomain::child) of it, so that a peer reaches only
/// what was registered for its own connection; clones share a domain.
#[derive(Clone)]
pub struct ProtectionDomain {
    inner: Arc<PdInner>,
}

struct PdInner {
    /// Software keys are a keyed hash of this counter (SipHash under a
    /// secret random key): unpredictable to a peer that saw other keys.
    key_counter: AtomicU64,
    key_hash: RandomState,
    /// Every live registration by local key, which is unique in a domain
    /// (a device may give many local-only regions one remote key: rxe gives
    /// them 0). Software domains give a region equal keys.
    regions: RwLock<IntMap<u32, Weak<Region>>>,
    registrar: Option<Arc<dyn Registrar>>,
    allocator: Option<Arc<dyn RegionAllocator>>,
    /// The domain this one was made from by `child`.
    parent: Option<Arc<PdInner>>,
}

impl ProtectionDomain {
    /// Creates an empty domain. Its keys are random, so that neither a
    /// peer nor a stale key from an earlier process can name a region.
    pub fn new() -> ProtectionDomain {
        ProtectionDomain::build(None)
    }

    /// Creates an empty domain whose registrations are also registered with
    /// a device through `registrar`; pools and buffers report the keys the
    /// registrar returns. The registrar lives as long as any region of it.
    pub fn with_registrar(registrar: Arc<dyn Registrar>) -> ProtectionDomain {
        ProtectionDomain::build(Some(registrar))
    }

    /// Creates an empty domain whose registrations take their memory from
    /// `allocator` instead of anonymous mappings (the shm provider's memfds).
    pub fn with_allocator(allocator: Arc<dyn RegionAllocator>) -> ProtectionDomain {
        let mut pd = ProtectionDomain::build(None);
        if let Some(inner) = Arc::get_mut(&mut pd.inner) {
            inner.allocator = Some(allocator);
        }
        pd
    }

    fn build(registrar: Option<Arc<dyn Registrar>>) -> ProtectionDomain {
        ProtectionDomain {
            inner: Arc::new(PdInner {
                key_counter: AtomicU64::new(0),
                key_hash: RandomState::new(),
                regions: RwLock::new(IntMap::default()),
                registrar,
                allocator: None,
                parent: None,
            }),
        }
    }

    /// A new, empty domain for one connection (or one host controller):
    /// its memory comes from where this domain's does (anonymous mappings, the shm
    /// provider's memfds, the device), but its registrations are reached
    /// only through it. A remote key of any other domain, this one
    /// included, is a remote access error on the child's queue pairs, as a
    /// NIC refuses a key of another protection domain. Buffers of this
    /// domain stay usable locally there (posted, sent from): the child
    /// [`owns`](ProtectionDomain::owns) them.
    ///
    /// On a device that gives each domain its own device protection domain
    /// ([`Registrar::new_domain`]) the child gets one, and only the child's
    /// own buffers can be used on its queue pairs.
    ///
    /// # Errors
    /// The device's error when it refuses a new domain.
    pub fn child(&self) -> Result<ProtectionDomain, MrError> {
        let registrar = match &self.inner.registrar {
            Some(r) => Some(r.new_domain()?.unwrap_or_else(|| r.clone())),
            None => None,
        };
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                key_counter: AtomicU64::new(0),
                key_hash: RandomState::new(),
                regions: RwLock::new(IntMap::default()),
                registrar,
                allocator: self.inner.allocator.clone(),
                parent: Some(self.inner.clone()),
            }),
        })
    }

    /// The device registrar of this domain, if it has one.
    pub fn registrar(&self) -> Option<&Arc<dyn Registrar>> {
        self.inner.registrar.as_ref()
    }

    /// Whether this domain is `other` or was made from it by `child`.
    pub fn is_within(&self, other: &ProtectionDomain) -> bool {
        self.lineage().any(|pd| std::ptr::eq(pd, Arc::as_ptr(&other.inner)))
    }

    /// This domain, then the ones it was made from.
    fn lineage(&self) -> impl Iterator<Item = *const PdInner> + '_ {
        std::iter::successors(Some(&self.inner), |pd| pd.parent.as_ref()).map(Arc::as_ptr)
    }

    /// Registers `count` chunks of `chunk_size` bytes (zeroed, page-aligned)
    /// with the given access rights.
    ///
    /// # Errors
    /// [`MrError::InvalidSize`] for an empty or overflowing size,
    /// [`MrError::OutOfMemory`] when the allocation fails,
    /// [`MrError::InvalidAccess`] for remote write without local write,
    /// or the registrar's error ([`MrError::Device`]) when the device refuses.
    pub fn register(&self, chunk_size: usize, count: usize, access: Access) -> Result<BufPool, MrError> {
        if access.contains(Access::REMOTE_WRITE) && !access.contains(Access::LOCAL_WRITE) {
            return Err(MrError::InvalidAccess);
        }
        let bytes = chunk_size
            .checked_mul(count)
            .filter(|&b| b > 0 && count <= u32::MAX as usize && b <= isize::MAX as usize / 2)
            .ok_or(MrError::InvalidSize { chunk_size, count })?;
        let layout = Layout::from_size_align(bytes, 4096).map_err(|_| MrError::InvalidSize { chunk_size, count })?;
        let (ptr, allocation) = match &self.inner.allocator {
            Some(allocator) => {
                let (ptr, handle) = allocator.allocate(bytes)?;
                (ptr, Some((allocator.clone(), handle)))
            }
            None => (map_anonymous(bytes).ok_or(MrError::OutOfMemory { bytes })?, None),
        };
        // SAFETY: `ptr` is a live allocation of `bytes` bytes that is freed
        // only in `Region::drop`, after `deregister` (or right here on
        // failure, where nothing was registered).
        let (lkey, rkey, device) = match unsafe { self.keys(ptr, bytes, access) } {
            Ok(keys) => keys,
            Err(e) => {
                // SAFETY: allocated above with `layout` (or by the
                // allocator), never shared, freed once here.
                unsafe { release(ptr, layout, allocation) };
                return Err(e);
            }
        };
        let region = Arc::new(Region {
            ptr,
            layout,
            chunk_size,
            count,
            lkey,
            rkey,
            access,
            free: Mutex::new((0..count as u32).rev().collect()),
            free_count: AtomicUsize::new(count),
            pieces: (0..count).map(|_| AtomicU32::new(0)).collect(),
            pd: Arc::downgrade(&self.inner),
            device,
            allocation,
            external: None,
        });
        self.inner.regions.write().insert(lkey.0, Arc::downgrade(&region));
        Ok(BufPool { region })
    }

    /// Registers `len` bytes at `offset` of memory owned elsewhere (a
    /// storage backend's arena, a shared file mapping) in place, with the
    /// given remote rights: peers of this domain's queue pairs then reach
    /// exactly that range by the returned [`Exposure`]'s key, and the data
    /// moves straight to and from it (a device registers it too). Nothing
    /// can be checked out of it locally. Dropping the exposure revokes the
    /// key at once (a transfer already under way finishes), and the owner
    /// is released once the device let go of the memory.
    ///
    /// # Errors
    /// [`MrError::InvalidSize`] for an empty range or one outside the
    /// memory, [`MrError::InvalidAccess`] for remote write without local
    /// write, or the registrar's error when the device refuses.
    pub fn register_external(
        &self,
        memory: Arc<dyn ExternalMemory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<Exposure, MrError> {
        if access.contains(Access::REMOTE_WRITE) && !access.contains(Access::LOCAL_WRITE) {
            return Err(MrError::InvalidAccess);
        }
        let invalid = MrError::InvalidSize {
            chunk_size: len,
            count: 1,
        };
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > memory.len()) || len > isize::MAX as usize / 2 {
            return Err(invalid);
        }
        let layout = Layout::from_size_align(len, 1).map_err(|_| invalid)?;
        // SAFETY: `offset + len` is within the memory (checked above), which
        // `ExternalMemory` promises is one live mapping while `memory` lives.
        let ptr = unsafe { NonNull::new_unchecked(memory.as_ptr().as_ptr().add(offset)) };
        // SAFETY: the range is live for as long as `memory`, which the
        // region keeps until after `deregister` returned `Ok` (and leaks
        // when it does not).
        let (lkey, rkey, device) = unsafe { self.keys(ptr, len, access) }?;
        let region = Arc::new(Region {
            ptr,
            layout,
            chunk_size: len,
            count: 1,
            lkey,
            rkey,
            access,
            free: Mutex::new(Vec::new()),
            free_count: AtomicUsize::new(0),
            pieces: vec![AtomicU32::new(0)].into_boxed_slice(),
            pd: Arc::downgrade(&self.inner),
            device,
            allocation: None,
            external: Some(memory),
        });
        self.inner.regions.write().insert(lkey.0, Arc::downgrade(&region));
        Ok(Exposure { region })
    }

    /// The keys of a new region at `ptr`: the device's, registering it,
    /// or fresh software ones.
    ///
    /// # Safety
    /// As [`Registrar::register`]: `ptr..ptr + len` stays allocated until
    /// the returned handle is deregistered with `Ok` (for good after
    /// `Err`).
    unsafe fn keys(&self, ptr: NonNull<u8>, len: usize, access: Access) -> Result<RegionKeys, MrError> {
        match &self.inner.registrar {
            Some(registrar) => {
                // SAFETY: the caller's promise, passed on.
                let reg = unsafe { registrar.register(ptr.as_ptr(), len, access) }?;
                Ok((reg.lkey, reg.rkey, Some((registrar.clone(), reg.handle))))
            }
            None => {
                let key = self.fresh_key();
                Ok((LKey(key), RKey(key), None))
            }
        }
    }

    /// A software key no live registration of this domain holds.
    fn fresh_key(&self) -> u32 {
        loop {
            let n = self.inner.key_counter.fetch_add(1, Ordering::Relaxed);
            let k = self.inner.key_hash.hash_one(n) as u32;
            if k != 0 && !self.inner.regions.read().contains_key(&k) {
                break k;
            }
        }
    }

    /// Looks up `len` bytes at `addr` under remote key `rkey`, needing the
    /// rights in `need`: the check an RDMA NIC makes before it places or
    /// serves one-sided data. Software fabrics make it; a device makes its
    /// own, and here a device's region is found only where the device gave
    /// it equal local and remote keys.
    ///
    /// # Errors
    /// The [`RemoteAccessError`] that the initiator will see as a remote
    /// access error completion.
    pub fn remote_target(
        &self,
        rkey: RKey,
        addr: u64,
        len: u64,
        need: Access,
    ) -> Result<RemoteTarget, RemoteAccessError> {
        let region = self
            .inner
            .regions
            .read()
            .get(&rkey.0)
            .and_then(Weak::upgrade)
            .filter(|region| region.rkey == rkey)
            .ok_or(RemoteAccessError::BadKey(rkey.0))?;
        if !region.access.contains(need) {
            return Err(RemoteAccessError::NoPermission(need));
        }
        let base = region.ptr.as_ptr() as u64;
        let size = region.layout.size() as u64;
        let end = addr
            .checked_add(len)
            .ok_or(RemoteAccessError::OutOfBounds { addr, len })?;
        if addr < base || end > base + size {
            return Err(RemoteAccessError::OutOfBounds { addr, len });
        }
        Ok(RemoteTarget {
            offset: (addr - base) as usize,
            len: len as usize,
            region,
        })
    }

    /// Whether `buf` may be used in this domain's work requests (the check
    /// a device makes of a local key before it reads or writes a work
    /// request's buffer): it is registered here, or in a domain this one
    /// was made from that shares its device domain.
    pub fn owns(&self, buf: &Buf) -> bool {
        let region_pd = buf.region.pd.as_ptr();
        let device = |r: &Option<Arc<dyn Registrar>>| r.as_ref().map(|r| Arc::as_ptr(r).cast::<()>());
        let mine = device(&self.inner.registrar);
        std::iter::successors(Some(&self.inner), |pd| pd.parent.as_ref())
            .take_while(|pd| device(&pd.registrar) == mine)
            .any(|pd| std::ptr::eq(Arc::as_ptr(pd), region_pd))
    }

    /// Whether `buf` is registered in this very domain: only then can a
    /// peer of this domain's queue pairs reach it by remote key.
    pub fn holds(&self, buf: &Buf) -> bool {
        std::ptr::eq(buf.region.pd.as_ptr(), Arc::as_ptr(&self.inner))
    }

    /// Number of live registrations (for tests and diagnostics).
    pub fn registrations(&self) -> usize {
        self.inner
            .regions
            .read()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

impl Default for ProtectionDomain {
    fn default() -> Self {
        ProtectionDomain::new()
    }
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("registrations", &self.registrations())
            .finish()
    }
}

#[cfg(test)]
mod tests;
