//! The completion channel and queue (`ibv_comp_channel`, `ibv_cq`), and
//! work completion statuses.

use super::*;

/// A completion channel plus its completion queue (`ibv_comp_channel`,
/// `ibv_cq`), one per queue pair.
pub(crate) struct Cq {
    pub(crate) raw: NonNull<sys::ibv_cq>,
    channel: NonNull<sys::ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: see `Context`.
unsafe impl Send for Cq {}
// SAFETY: see `Context`.
unsafe impl Sync for Cq {}

/// One work completion, decoded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wc {
    pub wr_id: u64,
    pub status: WcStatus,
    pub raw_status: u32,
    pub vendor_err: u32,
    pub opcode: u32,
    pub byte_len: u32,
    pub imm: Option<u32>,
}

impl Cq {
    /// Creates a channel (non-blocking fd) and a CQ of `entries` on it.
    ///
    /// # Errors
    /// `Io` with the failed call.
    pub(crate) fn new(ctx: &Arc<Context>, entries: u32) -> Result<Arc<Cq>, FabricError> {
        // SAFETY: the context is open.
        let channel =
            NonNull::new(unsafe { sys::ibv_create_comp_channel(ctx.raw.as_ptr()) }).ok_or_else(|| FabricError::Io {
                op: "ibv_create_comp_channel",
                source: io::Error::last_os_error(),
            })?;
        // SAFETY: `channel` is live; it is destroyed if the CQ cannot be made.
        let fd = unsafe { (*channel.as_ptr()).fd };
        let destroy_channel = || {
            // SAFETY: no CQ uses the channel yet.
            unsafe { sys::ibv_destroy_comp_channel(channel.as_ptr()) };
        };
        if let Err(source) = set_nonblocking(fd) {
            destroy_channel();
            return Err(FabricError::Io {
                op: "fcntl(completion channel)",
                source,
            });
        }
        let entries = i32::try_from(entries).unwrap_or(i32::MAX);
        // SAFETY: context and channel are live; no CQ context pointer is used.
        let raw = unsafe { sys::ibv_create_cq(ctx.raw.as_ptr(), entries, ptr::null_mut(), channel.as_ptr(), 0) };
        let Some(raw) = NonNull::new(raw) else {
            let source = io::Error::last_os_error();
            destroy_channel();
            return Err(FabricError::Io {
                op: "ibv_create_cq",
                source,
            });
        };
        Ok(Arc::new(Cq {
            raw,
            channel,
            _ctx: ctx.clone(),
        }))
    }

    /// The channel's fd, readable when a completion event is pending.
    pub(crate) fn fd(&self) -> RawFd {
        // SAFETY: the channel lives as long as `self`.
        unsafe { (*self.channel.as_ptr()).fd }
    }

    /// Requests an event for the next completion (`ibv_req_notify_cq`).
    pub(crate) fn arm(&self) -> io::Result<()> {
        // SAFETY: the CQ is live.
        match unsafe { sys::ibv_req_notify_cq(self.raw.as_ptr(), 0) } {
            0 => Ok(()),
            rc => Err(os_error(rc)),
        }
    }

    /// Takes every pending event off the channel without blocking
    /// (`ibv_get_cq_event`) and acknowledges them (`ibv_ack_cq_events`),
    /// so the CQ can always be destroyed. Returns how many there were.
    pub(crate) fn take_events(&self) -> u32 {
        let mut n = 0u32;
        loop {
            let mut cq = ptr::null_mut();
            let mut context = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; the out-pointers are valid.
            let rc = unsafe { sys::ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut context) };
            if rc != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: `n` events of this (only) CQ were taken above.
            unsafe { sys::ibv_ack_cq_events(self.raw.as_ptr(), n) };
        }
        n
    }

    /// Polls up to `max` completions into `out`; returns how many.
    pub(crate) fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize {
        const BATCH: usize = 32;
        // Left uninitialised: a spinning caller polls in a tight loop, and
        // zeroing 32 entries each time was a tenth of its work under TCG.
        let mut wcs = [const { std::mem::MaybeUninit::<sys::ibv_wc>::uninit() }; BATCH];
        let want = max.min(BATCH) as i32;
        // SAFETY: the CQ is live and `wcs` has room for `want` entries
        // (`MaybeUninit<T>` has `T`'s layout).
        let n = unsafe { sys::ibv_poll_cq(self.raw.as_ptr(), want, wcs.as_mut_ptr().cast()) };
        if n < 0 {
            tracing::error!(rc = n, "ibv_poll_cq failed");
            return 0;
        }
        let n = (n as usize).min(BATCH);
        for slot in &wcs[..n] {
            // SAFETY: `ibv_poll_cq` wrote the first `n` entries.
            let wc = unsafe { slot.assume_init_ref() };
            let with_imm = wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            out.push(Wc {
                wr_id: wc.wr_id,
                status: map_status(wc.status),
                raw_status: wc.status,
                vendor_err: wc.vendor_err,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
                // SAFETY: with IBV_WC_WITH_IMM set the union holds the
                // immediate (network byte order); any u32 is valid anyway.
                imm: with_imm.then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
            });
        }
        n
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // Events are acknowledged as they are taken; take any left so the
        // destroy cannot block.
        self.take_events();
        // SAFETY: the queue pair using the CQ holds an `Arc<Cq>` and is gone.
        let rc = unsafe { sys::ibv_destroy_cq(self.raw.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_cq failed");
        }
        // SAFETY: its only CQ was just destroyed.
        unsafe { sys::ibv_destroy_comp_channel(self.channel.as_ptr()) };
    }
}

/// `ibv_wc_status` → [`WcStatus`].
pub(crate) fn map_status(status: u32) -> WcStatus {
    use sys::ibv_wc_status as s;
    match status {
        s::IBV_WC_SUCCESS => WcStatus::Success,
        s::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccessError,
        s::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::ReceiverNotReady,
        s::IBV_WC_REM_INV_REQ_ERR | s::IBV_WC_REM_INV_RD_REQ_ERR => WcStatus::RemoteInvalidRequest,
        s::IBV_WC_LOC_LEN_ERR => WcStatus::LocalLengthError,
        s::IBV_WC_LOC_PROT_ERR | s::IBV_WC_LOC_ACCESS_ERR | s::IBV_WC_MW_BIND_ERR | s::IBV_WC_LOC_RDD_VIOL_ERR => {
            WcStatus::LocalProtectionError
        }
        s::IBV_WC_WR_FLUSH_ERR => WcStatus::Flushed,
        // REM_OP_ERR, RETRY_EXC_ERR (peer unreachable), BAD_RESP_ERR,
        // LOC_QP_OP_ERR, REM_ABORT_ERR, FATAL_ERR, RESP_TIMEOUT_ERR,
        // GENERAL_ERR and the rest: the transport itself failed.
        _ => WcStatus::RemoteOperationError,
    }
}

/// `ibv_wc_status` of a receive completion → [`WcStatus`].
///
/// A Send larger than the posted receive is a local length error on the
/// receiver. mlx5 says so (`IBV_WC_LOC_LEN_ERR`); rxe reports it as
/// `IBV_WC_REM_INV_REQ_ERR` on the receive instead (`rxe_resp.c`:
/// `RESPST_ERR_LENGTH` → `do_class_ac_error(..., IB_WC_REM_INV_REQ_ERR)`),
/// the status it also NAKs the sender with. On a receive, the other causes
/// of that status (missing first/last packet, unsupported opcode) cannot
/// come from a conforming peer, so it is mapped as the length error.
pub(crate) fn map_recv_status(status: u32) -> WcStatus {
    match status {
        sys::ibv_wc_status::IBV_WC_REM_INV_REQ_ERR => WcStatus::LocalLengthError,
        other => map_status(other),
    }
}

/// The verbs name of a status, for logs.
pub(crate) fn status_name(status: u32) -> String {
    // SAFETY: `ibv_wc_status_str` returns a static string for any value
    // (or null when libibverbs lacks it).
    let name = unsafe { sys::ibv_wc_status_str(status) };
    if name.is_null() {
        return format!("status {status}");
    }
    // SAFETY: non-null: a static NUL-terminated string.
    unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
}
