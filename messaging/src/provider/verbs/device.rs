//! Safe wrappers over the libibverbs objects the provider uses: device
//! context, protection domain (also the [`Registrar`] of the fabric's
//! [`ProtectionDomain`](crate::mr::ProtectionDomain)), completion channel,
//! completion queue and RC queue pair, plus the few fd helpers the
//! completion thread needs. Every `unsafe` of the provider lives in this file.
//!
//! Ownership keeps the C objects' order of destruction right: a queue pair
//! holds an `Arc` to its completion queue and protection domain, a
//! completion queue to its channel, and all of them to the device context,
//! so nothing is destroyed while something created from it lives. Memory
//! regions hold the protection domain through the registrar.
//!
//! The two posting calls are `unsafe fn`: the caller keeps every posted
//! buffer alive until its completion (the queue pair's in-flight tables do).

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::Duration;

use rdma_mummy_sys as sys;

use super::super::{FabricError, WcStatus};
use crate::mr::{Access, LKey, MrError, RKey, Registrar, Registration};

/// `IBV_LINK_LAYER_ETHERNET` from `verbs.h` (not exported by the bindings).
const LINK_LAYER_ETHERNET: u8 = 2;

/// How to make a soft-RoCE device, for error messages.
pub(super) const RXE_HINT: &str = "to use soft-RoCE, load the driver and add a device over a network interface: \
`sudo modprobe rdma_rxe && sudo rdma link add rxe0 type rxe netdev <interface>`, then check with `ibv_devices` \
(Debian packages rdma-core, ibverbs-providers, ibverbs-utils, iproute2; see docs/soft-roce.md)";

fn unavailable(reason: String) -> FabricError {
    FabricError::Unavailable {
        provider: "verbs",
        reason,
    }
}

/// What was learned about the device and port when the context was opened.
#[derive(Debug, Clone)]
pub(super) struct DeviceInfo {
    /// Device name (`rxe0`, `mlx5_0`, ...).
    pub name: String,
    /// iWARP transport (siw, some Chelsio/Intel NICs): no immediate data.
    pub iwarp: bool,
    /// Port used.
    pub port: u8,
    /// The port's link layer is Ethernet (RoCE): routes need a GRH.
    pub ethernet: bool,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU as `ibv_mtu` (1 = 256 ... 5 = 4096).
    pub active_mtu: u8,
    /// Largest message the port takes.
    pub max_msg_sz: u32,
    /// GID table index used as the source GID.
    pub gid_index: u8,
    /// That GID.
    pub gid: [u8; 16],
    /// That GID's type (RoCE v1 and v2 peers cannot talk to each other).
    pub gid_type: GidType,
    /// Device limits used to size queues.
    pub max_qp_wr: u32,
    /// Largest completion queue.
    pub max_cqe: u32,
    /// Outstanding RDMA Reads this device serves per queue pair (may be 0).
    pub max_qp_rd_atom: u8,
    /// Outstanding RDMA Reads this device issues per queue pair (may be 0:
    /// then it cannot post RDMA Reads at all).
    pub max_qp_init_rd_atom: u8,
}

/// The type of a GID, told to the peer: both ends of a RoCE connection
/// must use the same RoCE version, or packets are silently dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GidType {
    /// Not known (an older peer, or `ibv_query_gid_ex` unsupported).
    Unknown,
    /// An InfiniBand port.
    InfiniBand,
    /// RoCE v1 (Ethernet frames, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP).
    RoceV2,
}

impl std::fmt::Display for GidType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GidType::Unknown => "unknown",
            GidType::InfiniBand => "InfiniBand",
            GidType::RoceV1 => "RoCE v1",
            GidType::RoceV2 => "RoCE v2",
        })
    }
}

/// Which device, port and GID to open.
#[derive(Debug, Clone, Default)]
pub(super) struct OpenSpec {
    pub device: Option<String>,
    pub port: u8,
    pub gid_index: Option<u8>,
}

/// An open device (`ibv_context`).
pub(super) struct Context {
    raw: NonNull<sys::ibv_context>,
    info: DeviceInfo,
}

// SAFETY: libibverbs is thread safe: a context may be used and closed from
// any thread, and every object created from it (PD, CQ, QP) too.
unsafe impl Send for Context {}
// SAFETY: as above; shared references only call thread-safe verbs.
unsafe impl Sync for Context {}

impl Context {
    /// Opens the named device (or the first one) and checks its port.
    ///
    /// # Errors
    /// [`FabricError::Unavailable`] with how to fix it: libibverbs missing,
    /// no kernel RDMA support, no device, unknown device, port down.
    pub(super) fn open(spec: &OpenSpec) -> Result<Arc<Context>, FabricError> {
        let mut count = 0;
        // SAFETY: `count` is a valid out-pointer; the list is freed below.
        let list = unsafe { sys::ibv_get_device_list(&mut count) };
        if list.is_null() {
            let err = io::Error::last_os_error();
            return Err(unavailable(match err.raw_os_error() {
                // rdma-mummy-sys answers EOPNOTSUPP when it could not dlopen libibverbs.
                Some(libc::EOPNOTSUPP) => format!(
                    "libibverbs.so.1 could not be loaded (install the Debian packages libibverbs1 and \
                     ibverbs-providers); then {RXE_HINT}"
                ),
                Some(libc::ENOSYS) => format!(
                    "the kernel offers no RDMA verbs (no /sys/class/infiniband_verbs: ib_uverbs not loaded, \
                     no RDMA device); {RXE_HINT}"
                ),
                _ => format!("ibv_get_device_list failed: {err}; {RXE_HINT}"),
            }));
        }
        let list = DeviceList { raw: list };
        let mut names = Vec::new();
        let mut chosen = None;
        for i in 0..usize::try_from(count).unwrap_or(0) {
            // SAFETY: the list holds `count` valid device pointers while it lives.
            let dev = unsafe { *list.raw.add(i) };
            if dev.is_null() {
                break;
            }
            // SAFETY: `dev` is a valid device; the name is a NUL-terminated string it owns.
            let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            let wanted = match &spec.device {
                None => true,
                Some(want) => *want == name,
            };
            if chosen.is_none() && wanted {
                chosen = Some((dev, name.clone()));
            }
            names.push(name);
        }
        let Some((dev, name)) = chosen else {
            return Err(unavailable(match &spec.device {
                None => format!(
                    "no RDMA device found (`ibv_devices` lists none; if one exists, the Debian package \
                     ibverbs-providers may be missing); {RXE_HINT}"
                ),
                Some(want) => format!(
                    "no RDMA device named {want:?} (CHANIO_VERBS_DEVICE); found: {}",
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                ),
            }));
        };
        // SAFETY: `dev` is valid while the list lives.
        let (transport, node_type) = unsafe { ((*dev).transport_type, (*dev).node_type) };
        let iwarp =
            transport == sys::ibv_transport_type::IBV_TRANSPORT_IWARP || node_type == sys::ibv_node_type::IBV_NODE_RNIC;
        // SAFETY: `dev` is valid; the context outlives the list, as documented.
        let raw = NonNull::new(unsafe { sys::ibv_open_device(dev) }).ok_or_else(|| {
            unavailable(format!(
                "cannot open RDMA device {name}: {} (check permissions on /dev/infiniband)",
                io::Error::last_os_error()
            ))
        })?;
        drop(list);
        let mut ctx = Context {
            raw,
            info: DeviceInfo {
                name: name.clone(),
                iwarp,
                port: spec.port,
                ethernet: false,
                lid: 0,
                active_mtu: 0,
                max_msg_sz: 0,
                gid_index: 0,
                gid: [0; 16],
                gid_type: GidType::Unknown,
                max_qp_wr: 0,
                max_cqe: 0,
                max_qp_rd_atom: 0,
                max_qp_init_rd_atom: 0,
            },
        };
        ctx.query(spec)?;
        Ok(Arc::new(ctx))
    }

    fn query(&mut self, spec: &OpenSpec) -> Result<(), FabricError> {
        let name = self.info.name.clone();
        // SAFETY: an all-zero `ibv_device_attr` (integers and arrays) is valid.
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `attr` is a valid out-pointer.
        if unsafe { sys::ibv_query_device(self.raw.as_ptr(), &mut attr) } != 0 {
            return Err(unavailable(format!(
                "ibv_query_device({name}) failed: {}",
                io::Error::last_os_error()
            )));
        }
        if spec.port == 0 || spec.port > attr.phys_port_cnt {
            return Err(unavailable(format!(
                "{name} has no port {} (it has {})",
                spec.port, attr.phys_port_cnt
            )));
        }
        // SAFETY: an all-zero `ibv_port_attr` (integers) is valid.
        let mut port: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `port` is a valid out-pointer.
        if unsafe { sys::ibv_query_port(self.raw.as_ptr(), spec.port, &mut port) } != 0 {
            return Err(unavailable(format!(
                "ibv_query_port({name}, {}) failed: {}",
                spec.port,
                io::Error::last_os_error()
            )));
        }
        if port.state != sys::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(unavailable(format!(
                "port {} of {name} is not active (state {}); for soft-RoCE, the network interface under it \
                 must be up (`rdma link` shows the state)",
                spec.port, port.state
            )));
        }
        let info = &mut self.info;
        info.ethernet = port.link_layer == LINK_LAYER_ETHERNET;
        info.lid = port.lid;
        info.active_mtu = u8::try_from(port.active_mtu).unwrap_or(1);
        info.max_msg_sz = port.max_msg_sz;
        info.max_qp_wr = u32::try_from(attr.max_qp_wr).unwrap_or(0);
        info.max_cqe = u32::try_from(attr.max_cqe).unwrap_or(0);
        info.max_qp_rd_atom = attr.max_qp_rd_atom.clamp(0, 16) as u8;
        info.max_qp_init_rd_atom = attr.max_qp_init_rd_atom.clamp(0, 16) as u8;
        let (index, gid) = self.choose_gid(spec, port.gid_tbl_len)?;
        self.info.gid_index = index;
        self.info.gid = gid;
        self.info.gid_type = if !self.info.ethernet {
            GidType::InfiniBand
        } else {
            // On an Ethernet port the "IB/RoCE v1" type reads as either value.
            match self.gid_type(index) {
                Some(sys::IBV_GID_TYPE_ROCE_V2) => GidType::RoceV2,
                Some(sys::IBV_GID_TYPE_ROCE_V1 | sys::IBV_GID_TYPE_IB) => GidType::RoceV1,
                _ => GidType::Unknown,
            }
        };
        Ok(())
    }

    /// The source GID: the asked index; else on RoCE the first RoCE v2
    /// IPv4-mapped GID (routable over UDP/IP, what perftest picks with
    /// `-x`), then the first IPv4-mapped one; else index 0.
    fn choose_gid(&self, spec: &OpenSpec, table_len: i32) -> Result<(u8, [u8; 16]), FabricError> {
        if let Some(index) = spec.gid_index {
            return self.gid(index).map(|gid| (index, gid)).ok_or_else(|| {
                unavailable(format!(
                    "GID index {index} (CHANIO_VERBS_GID_INDEX) of {} port {} cannot be read; \
                     `show_gids` or /sys/class/infiniband/{}/ports/{}/gids/ list the valid ones",
                    self.info.name, spec.port, self.info.name, spec.port
                ))
            });
        }
        if !self.info.ethernet {
            return Ok((0, self.gid(0).unwrap_or([0; 16])));
        }
        // Indices go up to 255, so a table of 256 entries is probed whole.
        let len = u16::try_from(table_len.clamp(0, 256)).unwrap_or(0);
        let mut first_v4 = None;
        for index in (0..len).filter_map(|i| u8::try_from(i).ok()) {
            let Some(gid) = self.gid(index) else { continue };
            if !is_ipv4_mapped(&gid) {
                continue;
            }
            if self.gid_type(index) == Some(sys::IBV_GID_TYPE_ROCE_V2) {
                return Ok((index, gid));
            }
            first_v4.get_or_insert((index, gid));
        }
        Ok(first_v4.unwrap_or((0, self.gid(0).unwrap_or([0; 16]))))
    }

    fn gid(&self, index: u8) -> Option<[u8; 16]> {
        // SAFETY: an all-zero GID union is valid.
        let mut gid: sys::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `gid` is a valid out-pointer.
        let rc = unsafe { sys::ibv_query_gid(self.raw.as_ptr(), self.info.port, i32::from(index), &mut gid) };
        // SAFETY: every bit pattern of the union is a valid byte array.
        let raw = unsafe { gid.raw };
        (rc == 0 && raw != [0; 16]).then_some(raw)
    }

    fn gid_type(&self, index: u8) -> Option<u32> {
        // SAFETY: an all-zero entry (integers and a GID union) is valid.
        let mut entry: sys::ibv_gid_entry = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `entry` is a valid out-pointer.
        let rc = unsafe {
            sys::ibv_query_gid_ex(
                self.raw.as_ptr(),
                u32::from(self.info.port),
                u32::from(index),
                &mut entry,
                0,
            )
        };
        (rc == 0).then_some(entry.gid_type)
    }

    pub(super) fn info(&self) -> &DeviceInfo {
        &self.info
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every object made from the context holds an `Arc` to it,
        // so this runs after all of them were destroyed.
        unsafe { sys::ibv_close_device(self.raw.as_ptr()) };
    }
}

fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xff && gid[11] == 0xff
}

struct DeviceList {
    raw: *mut *mut sys::ibv_device,
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `ibv_get_device_list` and is freed once.
        unsafe { sys::ibv_free_device_list(self.raw) };
    }
}

/// A protection domain (`ibv_pd`), and the registrar of the fabric's
/// memory: every pool of the fabric's domain is an `ibv_mr` in it.
pub(super) struct Pd {
    raw: NonNull<sys::ibv_pd>,
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
    pub(super) fn new(ctx: &Arc<Context>) -> Result<Arc<Pd>, FabricError> {
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

fn access_flags(access: Access) -> u32 {
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

/// A completion channel plus its completion queue (`ibv_comp_channel`,
/// `ibv_cq`), one per queue pair.
pub(super) struct Cq {
    raw: NonNull<sys::ibv_cq>,
    channel: NonNull<sys::ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: see `Context`.
unsafe impl Send for Cq {}
// SAFETY: see `Context`.
unsafe impl Sync for Cq {}

/// One work completion, decoded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wc {
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
    pub(super) fn new(ctx: &Arc<Context>, entries: u32) -> Result<Arc<Cq>, FabricError> {
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
    pub(super) fn fd(&self) -> RawFd {
        // SAFETY: the channel lives as long as `self`.
        unsafe { (*self.channel.as_ptr()).fd }
    }

    /// Requests an event for the next completion (`ibv_req_notify_cq`).
    pub(super) fn arm(&self) -> io::Result<()> {
        // SAFETY: the CQ is live.
        match unsafe { sys::ibv_req_notify_cq(self.raw.as_ptr(), 0) } {
            0 => Ok(()),
            rc => Err(os_error(rc)),
        }
    }

    /// Takes every pending event off the channel without blocking
    /// (`ibv_get_cq_event`) and acknowledges them (`ibv_ack_cq_events`),
    /// so the CQ can always be destroyed. Returns how many there were.
    pub(super) fn take_events(&self) -> u32 {
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
    pub(super) fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize {
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
pub(super) fn map_status(status: u32) -> WcStatus {
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
pub(super) fn map_recv_status(status: u32) -> WcStatus {
    match status {
        sys::ibv_wc_status::IBV_WC_REM_INV_REQ_ERR => WcStatus::LocalLengthError,
        other => map_status(other),
    }
}

/// The verbs name of a status, for logs.
pub(super) fn status_name(status: u32) -> String {
    // SAFETY: `ibv_wc_status_str` returns a static string for any value
    // (or null when libibverbs lacks it).
    let name = unsafe { sys::ibv_wc_status_str(status) };
    if name.is_null() {
        return format!("status {status}");
    }
    // SAFETY: non-null: a static NUL-terminated string.
    unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

/// What one side tells the other to connect its queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Endpoint {
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
pub(super) fn read_depth_towards(info: &DeviceInfo, remote: &Endpoint) -> u8 {
    info.max_qp_init_rd_atom.min(remote.read_depth)
}

/// An RC queue pair (`ibv_qp`). Its completion queue and domain outlive it.
///
/// Destroy it with [`RawQp::destroy`] where buffers are still posted: only
/// its `Ok` says the NIC let go of them. Dropping destroys it too, and only
/// logs a failure, which is right only where nothing is posted.
pub(super) struct RawQp {
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
pub(super) struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: LKey,
}

/// The operation of a send work request.
#[derive(Debug, Clone, Copy)]
pub(super) enum SendKind {
    Send { imm: Option<u32> },
    Write { addr: u64, rkey: RKey, imm: Option<u32> },
    Read { addr: u64, rkey: RKey },
}

/// Send requests chained into one `ibv_post_send` call, built on the stack.
const POST_CHAIN: usize = 16;

/// One send work request to post.
#[derive(Debug, Clone, Copy)]
pub(super) struct SendDesc {
    pub wr_id: u64,
    pub kind: SendKind,
    pub sge: Sge,
}

impl RawQp {
    /// Creates an RC queue pair whose send and receive queues complete on `cq`.
    ///
    /// # Errors
    /// `Io` with the errno.
    pub(super) fn new(pd: &Arc<Pd>, cq: &Arc<Cq>, max_send_wr: u32, max_recv_wr: u32) -> Result<RawQp, FabricError> {
        // SAFETY: an all-zero init attr (null pointers, zero caps) is valid.
        let mut attr: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.raw.as_ptr();
        attr.recv_cq = cq.raw.as_ptr();
        attr.cap.max_send_wr = max_send_wr;
        attr.cap.max_recv_wr = max_recv_wr;
        attr.cap.max_send_sge = 1;
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
    pub(super) fn qpn(&self) -> u32 {
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
    pub(super) fn to_init(&self, port: u8) -> io::Result<()> {
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
    pub(super) fn to_rts(&self, info: &DeviceInfo, local: &Endpoint, remote: &Endpoint) -> io::Result<()> {
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
    pub(super) fn to_error(&self) {
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
    pub(super) unsafe fn post_send(&self, descs: &[SendDesc]) -> Result<(), (usize, io::Error)> {
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
        let mut sges: [sys::ibv_sge; POST_CHAIN] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut wrs: [sys::ibv_send_wr; POST_CHAIN] = unsafe { std::mem::zeroed() };
        for ((d, wr), sge) in descs.iter().zip(wrs.iter_mut()).zip(sges.iter_mut()) {
            use sys::ibv_wr_opcode as op;
            *sge = sys::ibv_sge {
                addr: d.sge.addr,
                length: d.sge.len,
                lkey: d.sge.lkey.0,
            };
            wr.wr_id = d.wr_id;
            wr.num_sge = i32::from(d.sge.len > 0);
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
                (*wr).sg_list = sge_base.add(i);
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
    pub(super) unsafe fn post_recv(&self, wr_id: u64, sge: Sge) -> Result<(), (bool, io::Error)> {
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
    pub(super) fn destroy(mut self) -> io::Result<()> {
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
fn os_error(rc: i32) -> io::Error {
    io::Error::from_raw_os_error(i32::try_from(rc.unsigned_abs()).unwrap_or(i32::MAX))
}

/// A non-blocking eventfd that wakes the completion thread.
#[derive(Debug)]
pub(super) struct WakeFd {
    file: File,
}

impl WakeFd {
    /// Creates the eventfd.
    ///
    /// # Errors
    /// The errno.
    pub(super) fn new() -> io::Result<WakeFd> {
        // SAFETY: plain syscall with valid flags.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(WakeFd {
            file: File::from(owned),
        })
    }

    /// Makes the fd readable.
    pub(super) fn wake(&self) {
        let _ = (&self.file).write(&1u64.to_ne_bytes());
    }

    /// Clears it.
    pub(super) fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = (&self.file).read(&mut buf);
    }

    pub(super) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable (or hung up) or `timeout` passes;
/// returns which are (none after a timeout or a signal). Negative fds are
/// ignored.
///
/// # Errors
/// A `poll` failure other than `EINTR`, or a closed fd (`POLLNVAL`): these
/// persist, so the caller must not simply call again at once.
pub(super) fn wait_readable<const N: usize>(fds: [RawFd; N], timeout: Option<Duration>) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX));
    // SAFETY: `pfds` is a valid array of N pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(err);
    }
    if pfds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(pfds.map(|p| p.revents != 0))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with valid commands.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_errnos_from_old_rxe_are_normalised() {
        assert_eq!(os_error(-libc::EINVAL).raw_os_error(), Some(libc::EINVAL));
        assert_eq!(os_error(libc::ENOMEM).raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn wait_readable_reports_ready_fds_and_fails_on_a_closed_one() {
        let wake = WakeFd::new().unwrap();
        let quiet = wait_readable([wake.fd(), -1], Some(Duration::from_millis(1))).unwrap();
        assert_eq!(quiet, [false, false]);
        wake.wake();
        assert_eq!(wait_readable([wake.fd(), -1], None).unwrap(), [true, false]);
        wake.drain();
        // A descriptor number far above any open one: POLLNVAL, an error
        // the caller must not retry at once, rather than "readable".
        assert!(wait_readable([wake.fd(), 1 << 20], None).is_err());
    }
}
