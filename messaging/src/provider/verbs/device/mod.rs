//! Safe wrappers over the libibverbs objects the provider uses: device
//! context, protection domain (also the [`Registrar`] of the fabric's
//! [`ProtectionDomain`](crate::mr::ProtectionDomain)), completion channel,
//! completion queue and RC queue pair, plus the few fd helpers the
//! completion thread needs. Every `unsafe` of the provider lives in this module.
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

mod cq;
mod pd;
mod qp;
mod wake;

pub(super) use cq::*;
pub(super) use pd::*;
pub(super) use qp::*;
pub(super) use wake::*;

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
    ///
    /// Long: the device list, the open and the port and GID queries, each
    /// with its own error, in the order libibverbs needs them.
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

#[cfg(test)]
mod tests;
