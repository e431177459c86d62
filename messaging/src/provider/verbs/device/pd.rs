//! The protection domain (`ibv_pd`) and memory registration (`ibv_mr`).

use super::*;

/// A protection domain (`ibv_pd`), and the registrar of the fabric's
/// memory: every pool of the fabric's domain is an `ibv_mr` in it.
pub(crate) struct Pd {
    pub(crate) raw: NonNull<sys::ibv_pd>,
    _ctx: Arc<Context>,
}

// SAFETY: see `Context`: verbs objects are thread safe.
unsafe impl Send for Pd {}
// SAFETY: see `Context`.
unsafe impl Sync for Pd {}

impl Pd {
    /// Allocates a protection domain on the device.
    ///
    /// # Errors
    /// `Io` with the errno.
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Arc<Pd>, FabricError> {
        // SAFETY: the context is open.
        let raw = NonNull::new(unsafe { sys::ibv_alloc_pd(ctx.raw.as_ptr()) }).ok_or_else(|| FabricError::Io {
            op: "ibv_alloc_pd",
            source: io::Error::last_os_error(),
        })?;
        Ok(Arc::new(Pd { raw, _ctx: ctx.clone() }))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: memory regions and queue pairs hold an `Arc<Pd>`, so none is left.
        let rc = unsafe { sys::ibv_dealloc_pd(self.raw.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_pd failed");
        }
    }
}

pub(crate) fn access_flags(access: Access) -> u32 {
    let mut flags = 0;
    if access.contains(Access::LOCAL_WRITE) {
        flags |= sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    }
    if access.contains(Access::REMOTE_WRITE) {
        flags |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
    }
    if access.contains(Access::REMOTE_READ) {
        flags |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    }
    flags
}

// SAFETY: `ibv_reg_mr` lets peers reach exactly `addr..addr + len` with the
// mapped remote rights (the local NIC gets local write too, see below), and
// only after `ibv_dereg_mr` succeeded does `deregister` return `Ok`: then the
// NIC no longer touches the pages. libibverbs calls are thread safe.
unsafe impl Registrar for Pd {
    unsafe fn register(&self, addr: *mut u8, len: usize, access: Access) -> Result<Registration, MrError> {
        // Always local write, as perftest registers: some drivers refuse or
        // mishandle regions without it. Only this process's own work
        // requests use the local rights, and the queue pair checks them in
        // software before posting (an RDMA Read into memory without
        // `LOCAL_WRITE` fails there); what a peer may do stays the NIC's
        // to enforce through the remote rights.
        let flags = (access_flags(access) | sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0) as i32;
        // SAFETY: the caller guarantees `addr..addr + len` stays allocated
        // until `deregister` returns `Ok`; the PD is alive (`&self`).
        let mr = unsafe { sys::ibv_reg_mr(self.raw.as_ptr(), addr.cast(), len, flags) };
        let Some(mr) = NonNull::new(mr) else {
            let err = io::Error::last_os_error();
            let source = if err.raw_os_error() == Some(libc::ENOMEM) {
                // Registration pins pages, counted against RLIMIT_MEMLOCK.
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!(
                        "{err}: registering pins memory, which counts against the locked-memory limit; \
                         raise it (`ulimit -l unlimited`, LimitMEMLOCK=infinity for a systemd service, \
                         or memlock in /etc/security/limits.conf)"
                    ),
                )
            } else {
                err
            };
            return Err(MrError::Device { bytes: len, source });
        };
        // SAFETY: `mr` is the live region just registered.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        Ok(Registration {
            lkey: LKey(lkey),
            rkey: RKey(rkey),
            handle: mr.as_ptr() as usize as u64,
        })
    }

    unsafe fn deregister(&self, handle: u64) -> Result<(), MrError> {
        let mr = handle as usize as *mut sys::ibv_mr;
        // SAFETY: the caller passes a handle from `register`, once, so `mr`
        // is a live region of this PD.
        let bytes = unsafe { (*mr).length };
        // SAFETY: as above; the region is not used after this call.
        let rc = unsafe { sys::ibv_dereg_mr(mr) };
        if rc != 0 {
            // The NIC may still map the pages (and a peer write into them):
            // the caller must leak the memory.
            return Err(MrError::Deregister {
                bytes,
                source: os_error(rc),
            });
        }
        Ok(())
    }

    fn new_domain(&self) -> Result<Option<Arc<dyn Registrar>>, MrError> {
        match Pd::new(&self._ctx) {
            Ok(pd) => Ok(Some(pd)),
            Err(FabricError::Io { source, .. }) => Err(MrError::Device { bytes: 0, source }),
            Err(other) => Err(MrError::Device {
                bytes: 0,
                source: io::Error::other(other.to_string()),
            }),
        }
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}
