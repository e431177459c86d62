//! The RC queue pair (`ibv_qp`): its state transitions and the posting calls.

use super::*;

/// What one side tells the other to connect its queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub mtu: u8,
    /// RDMA Reads this side serves at once (its `max_dest_rd_atomic`; 0
    /// when it serves none).
    pub read_depth: u8,
    pub gid: [u8; 16],
    /// The type of `gid`.
    pub gid_type: GidType,
}

/// How many RDMA Reads this side may have outstanding towards `remote`
/// (`max_rd_atomic`): what this device issues and the peer serves. 0 means
/// this queue pair cannot post RDMA Reads.
pub(crate) fn read_depth_towards(info: &DeviceInfo, remote: &Endpoint) -> u8 {
    info.max_qp_init_rd_atom.min(remote.read_depth)
}

/// An RC queue pair (`ibv_qp`). Its completion queue and domain outlive it.
///
/// Destroy it with [`RawQp::destroy`] where buffers are still posted: only
/// its `Ok` says the NIC let go of them. Dropping destroys it too, and only
/// logs a failure, which is right only where nothing is posted.
pub(crate) struct RawQp {
    raw: NonNull<sys::ibv_qp>,
    /// False once `destroy` ran (whatever its result).
    live: bool,
    cq: Arc<Cq>,
    pd: Arc<Pd>,
}

// SAFETY: see `Context`: posting and modifying are thread safe.
unsafe impl Send for RawQp {}
// SAFETY: see `Context`.
unsafe impl Sync for RawQp {}

/// A scatter entry: registered local memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: LKey,
}

/// The operation of a send work request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SendKind {
    Send { imm: Option<u32> },
    Write { addr: u64, rkey: RKey, imm: Option<u32> },
    Read { addr: u64, rkey: RKey },
}

/// Send requests chained into one `ibv_post_send` call, built on the stack.
pub(crate) const POST_CHAIN: usize = 16;

/// One send work request to post.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendDesc {
    pub wr_id: u64,
    pub kind: SendKind,
    pub sge: Sge,
    /// A second scatter entry (a gathered Send), after `sge`.
    pub tail: Option<Sge>,
}

impl RawQp {
    /// Creates an RC queue pair whose send and receive queues complete on `cq`.
    ///
    /// # Errors
    /// `Io` with the errno.
    pub(crate) fn new(pd: &Arc<Pd>, cq: &Arc<Cq>, max_send_wr: u32, max_recv_wr: u32) -> Result<RawQp, FabricError> {
        // SAFETY: an all-zero init attr (null pointers, zero caps) is valid.
        let mut attr: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.raw.as_ptr();
        attr.recv_cq = cq.raw.as_ptr();
        attr.cap.max_send_wr = max_send_wr;
        attr.cap.max_recv_wr = max_recv_wr;
        // Two: a gathered Send (a capsule, then the application's data).
        attr.cap.max_send_sge = 2;
        attr.cap.max_recv_sge = 1;
        attr.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 1;
        // SAFETY: PD and CQ are live (held by the new value); `attr` is valid.
        let raw =
            NonNull::new(unsafe { sys::ibv_create_qp(pd.raw.as_ptr(), &mut attr) }).ok_or_else(|| FabricError::Io {
                op: "ibv_create_qp",
                source: io::Error::last_os_error(),
            })?;
        Ok(RawQp {
            raw,
            live: true,
            cq: cq.clone(),
            pd: pd.clone(),
        })
    }

    /// The queue pair number.
    pub(crate) fn qpn(&self) -> u32 {
        // SAFETY: the QP is live.
        unsafe { (*self.raw.as_ptr()).qp_num }
    }

    fn modify(&self, attr: &mut sys::ibv_qp_attr, mask: sys::ibv_qp_attr_mask, op: &'static str) -> io::Result<()> {
        // SAFETY: the QP is live and `attr` is a valid attribute block for `mask`.
        match unsafe { sys::ibv_modify_qp(self.raw.as_ptr(), attr, mask.0 as i32) } {
            0 => Ok(()),
            rc => Err(io::Error::other(format!("ibv_modify_qp to {op}: {}", os_error(rc)))),
        }
    }

    fn zeroed_attr() -> sys::ibv_qp_attr {
        // SAFETY: an all-zero attribute block (integers, GID union) is valid.
        unsafe { std::mem::zeroed() }
    }

    /// RESET → INIT, allowing remote write and read.
    ///
    /// # Errors
    /// The device's refusal.
    pub(crate) fn to_init(&self, port: u8) -> io::Result<()> {
        use sys::ibv_qp_attr_mask as m;
        let mut attr = Self::zeroed_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = port;
        attr.qp_access_flags = access_flags(Access::ALL);
        self.modify(
            &mut attr,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
            "INIT",
        )
    }

    /// INIT → RTR → RTS against `remote`.
    ///
    /// # Errors
    /// The device's refusal.
    pub(crate) fn to_rts(&self, info: &DeviceInfo, local: &Endpoint, remote: &Endpoint) -> io::Result<()> {
        use sys::ibv_qp_attr_mask as m;
        let mut attr = Self::zeroed_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = u32::from(local.mtu.min(remote.mtu).max(1));
        attr.dest_qp_num = remote.qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = local.read_depth;
        attr.min_rnr_timer = 12;
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = info.port;
        if info.ethernet || remote.lid == 0 {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = sys::ibv_gid { raw: remote.gid };
            attr.ah_attr.grh.sgid_index = info.gid_index;
            attr.ah_attr.grh.hop_limit = 64;
            attr.ah_attr.grh.traffic_class = 0;
            attr.ah_attr.grh.flow_label = 0;
        }
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;
        let mut attr = Self::zeroed_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = 14;
        attr.retry_cnt = 7;
        // Credits make a missing receive a protocol error: fail at once.
        attr.rnr_retry = 0;
        attr.sq_psn = local.psn;
        // Never more than either side can take; 0 (no Reads) is valid, and
        // the queue pair then refuses RDMA Reads before posting them.
        attr.max_rd_atomic = read_depth_towards(info, remote);
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Any state → ERR: everything outstanding completes with a flush error.
    pub(crate) fn to_error(&self) {
        let mut attr = Self::zeroed_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        if let Err(e) = self.modify(&mut attr, sys::ibv_qp_attr_mask::IBV_QP_STATE, "ERR") {
            tracing::warn!(error = %e, "cannot move queue pair to the error state");
        }
    }

    /// Posts a chain of send work requests, all signaled, built on the
    /// stack ([`POST_CHAIN`] at a time): nothing is allocated per post.
    ///
    /// # Safety
    /// Every `sge` must lie in memory registered in this queue pair's
    /// domain under its `lkey`, and that memory must stay allocated and
    /// unused by local code until the request's completion was polled (or
    /// the queue pair was destroyed).
    ///
    /// # Errors
    /// How many requests were posted (those before the one the driver
    /// names as bad) and the errno. When the driver names none, all of its
    /// chain count as posted: rxe, like the kernel's `ib_post_send`, may
    /// fail after queueing them, so their memory must stay with the device
    /// until they complete or the queue pair is destroyed. Chains after a
    /// failed one are not posted.
    pub(crate) unsafe fn post_send(&self, descs: &[SendDesc]) -> Result<(), (usize, io::Error)> {
        for (k, chain) in descs.chunks(POST_CHAIN).enumerate() {
            // SAFETY: forwarded from this function's contract.
            if let Err((posted, e)) = unsafe { self.post_chain(chain) } {
                return Err((k * POST_CHAIN + posted, e));
            }
        }
        Ok(())
    }

    /// One chain of at most [`POST_CHAIN`] requests: see [`RawQp::post_send`].
    ///
    /// # Safety
    /// As for [`RawQp::post_send`].
    unsafe fn post_chain(&self, descs: &[SendDesc]) -> Result<(), (usize, io::Error)> {
        debug_assert!(descs.len() <= POST_CHAIN);
        if descs.is_empty() {
            return Ok(());
        }
        // SAFETY: an all-zero SGE and send WR (null pointers, integers,
        // unions of those) are valid values.
        let mut sges: [[sys::ibv_sge; 2]; POST_CHAIN] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut wrs: [sys::ibv_send_wr; POST_CHAIN] = unsafe { std::mem::zeroed() };
        for ((d, wr), sge) in descs.iter().zip(wrs.iter_mut()).zip(sges.iter_mut()) {
            use sys::ibv_wr_opcode as op;
            let entry = |s: &Sge| sys::ibv_sge {
                addr: s.addr,
                length: s.len,
                lkey: s.lkey.0,
            };
            sge[0] = entry(&d.sge);
            wr.num_sge = i32::from(d.sge.len > 0);
            if let Some(tail) = d.tail.as_ref().filter(|t| t.len > 0) {
                // An empty head would leave a hole before the tail.
                let at = usize::from(d.sge.len > 0);
                sge[at] = entry(tail);
                wr.num_sge = at as i32 + 1;
            }
            wr.wr_id = d.wr_id;
            wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            let (opcode, imm, remote) = match d.kind {
                SendKind::Send { imm: None } => (op::IBV_WR_SEND, None, None),
                SendKind::Send { imm: Some(v) } => (op::IBV_WR_SEND_WITH_IMM, Some(v), None),
                SendKind::Write { addr, rkey, imm: None } => (op::IBV_WR_RDMA_WRITE, None, Some((addr, rkey))),
                SendKind::Write {
                    addr,
                    rkey,
                    imm: Some(v),
                } => (op::IBV_WR_RDMA_WRITE_WITH_IMM, Some(v), Some((addr, rkey))),
                SendKind::Read { addr, rkey } => (op::IBV_WR_RDMA_READ, None, Some((addr, rkey))),
            };
            wr.opcode = opcode;
            if let Some(v) = imm {
                wr.imm_data_invalidated_rkey_union.imm_data = v.to_be();
            }
            if let Some((addr, rkey)) = remote {
                wr.wr.rdma = sys::rdma_t {
                    remote_addr: addr,
                    rkey: rkey.0,
                };
            }
        }
        // Pointers are taken only now, after the last `&mut` borrow of either
        // array, and both arrays stay untouched until the call returns.
        let n = descs.len();
        let base = wrs.as_mut_ptr();
        let sge_base = sges.as_mut_ptr();
        for i in 0..n {
            // SAFETY: `i < n <= POST_CHAIN`, so every pointer formed here is
            // in bounds; `i + 1` is only formed when `i + 1 < n`.
            unsafe {
                let wr = base.add(i);
                (*wr).sg_list = sge_base.add(i).cast::<sys::ibv_sge>();
                (*wr).next = if i + 1 < n { base.add(i + 1) } else { ptr::null_mut() };
            }
        }
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: the chain and its scatter lists live until the call returns
        // (the driver copies them into the send queue); the caller keeps the
        // memory they name alive until completion.
        let rc = unsafe { sys::ibv_post_send(self.raw.as_ptr(), base, &mut bad) };
        if rc == 0 {
            return Ok(());
        }
        // Compared by address, never dereferenced: a `bad` outside the
        // chain (or null) counts everything as posted, the safe side.
        let posted = (0..n).find(|&i| ptr::eq(base.wrapping_add(i), bad)).unwrap_or(n);
        Err((posted, os_error(rc)))
    }

    /// Posts one receive.
    ///
    /// # Safety
    /// As for [`RawQp::post_send`]: the memory stays registered, allocated
    /// and untouched until the completion was polled (or the queue pair was
    /// destroyed), also when this fails with `true`.
    ///
    /// # Errors
    /// Whether the request may have been posted anyway (the driver named no
    /// bad request, see [`RawQp::post_send`]) and the errno.
    pub(crate) unsafe fn post_recv(&self, wr_id: u64, sge: Sge) -> Result<(), (bool, io::Error)> {
        let mut list = sys::ibv_sge {
            addr: sge.addr,
            length: sge.len,
            lkey: sge.lkey.0,
        };
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut list,
            num_sge: i32::from(sge.len > 0),
        };
        let mut bad = ptr::null_mut();
        let wr_ptr: *mut sys::ibv_recv_wr = &mut wr;
        // SAFETY: `wr` and `list` live across the call; the caller keeps the
        // memory alive until completion.
        match unsafe { sys::ibv_post_recv(self.raw.as_ptr(), wr_ptr, &mut bad) } {
            0 => Ok(()),
            // Compared by address only: the one request is named as bad
            // exactly when it was not posted.
            rc => Err((!ptr::eq(bad, wr_ptr), os_error(rc))),
        }
    }

    /// Destroys the queue pair (`ibv_destroy_qp`).
    ///
    /// # Errors
    /// The errno. The NIC may then still access the memory of requests
    /// that did not complete: the caller must never free it. The
    /// completion queue and domain are leaked too (destroying them would
    /// fail with the queue pair alive).
    pub(crate) fn destroy(mut self) -> io::Result<()> {
        self.destroy_once()
    }

    fn destroy_once(&mut self) -> io::Result<()> {
        if !std::mem::replace(&mut self.live, false) {
            return Ok(());
        }
        // SAFETY: the QP is live and destroyed once (`live` was true and
        // is now false); on success the NIC no longer touches the buffers
        // of requests that never completed.
        let rc = unsafe { sys::ibv_destroy_qp(self.raw.as_ptr()) };
        if rc != 0 {
            // Leaked references keep the CQ, PD and context alive for good.
            std::mem::forget(self.cq.clone());
            std::mem::forget(self.pd.clone());
            return Err(os_error(rc));
        }
        Ok(())
    }
}

impl Drop for RawQp {
    fn drop(&mut self) {
        if let Err(error) = self.destroy_once() {
            tracing::error!(%error, "ibv_destroy_qp failed");
        }
    }
}

/// An errno returned by a verb; older rxe returns it negated (`-EINVAL`).
pub(crate) fn os_error(rc: i32) -> io::Error {
    io::Error::from_raw_os_error(i32::try_from(rc.unsigned_abs()).unwrap_or(i32::MAX))
}
