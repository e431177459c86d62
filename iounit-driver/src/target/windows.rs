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

use std::collections::HashMap;
use std::sync::Arc;

use messaging::mr::{Access, Exposure, ExternalMemory, MrError, ProtectionDomain};
use parking_lot::Mutex;

use crate::nvme::window::status as window_status;
use crate::nvme::{Status, WindowDescriptor};

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
    exposure: Exposure,
}

/// Where a window lies, for a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) nsid: u32,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// What a queue asks to expose.
pub(crate) struct OpenRequest<'a> {
    pub(crate) hostnqn: &'a str,
    pub(crate) queue: u64,
    pub(crate) domain: &'a ProtectionDomain,
    pub(crate) nsid: u32,
    pub(crate) memory: Arc<dyn ExternalMemory>,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) write: bool,
}

/// Every open window of the target.
pub(crate) struct Windows {
    limit_per_host: usize,
    inner: Mutex<Table>,
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
        }
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
    pub(crate) fn open(&self, req: OpenRequest<'_>) -> Result<WindowDescriptor, Status> {
        let (Ok(offset), Ok(len)) = (usize::try_from(req.offset), usize::try_from(req.len)) else {
            return Err(Status::LBA_OUT_OF_RANGE.with_dnr());
        };
        let held = {
            let t = self.inner.lock();
            t.open.values().filter(|w| w.hostnqn == req.hostnqn).count()
        };
        if held >= self.limit_per_host {
            tracing::info!(host = %req.hostnqn, held, "window refused: the host holds its limit");
            return Err(window_status::LIMIT_EXCEEDED.with_dnr());
        }
        let access = match req.write {
            true => Access::REMOTE_READ | Access::REMOTE_WRITE | Access::LOCAL_WRITE,
            false => Access::REMOTE_READ,
        };
        let exposure = req
            .domain
            .register_external(req.memory, offset, len, access)
            .map_err(|e| {
                tracing::warn!(host = %req.hostnqn, nsid = req.nsid, "cannot register a window: {e}");
                match e {
                    // The device refuses this memory (a NIC cannot pin the
                    // pages of a file on a disk file system, for one).
                    MrError::Device { .. } => window_status::NOT_WINDOWABLE.with_dnr(),
                    _ => Status::INTERNAL_ERROR,
                }
            })?;
        let mut t = self.inner.lock();
        // Checked again under the lock: two queues of one host may race.
        if t.open.values().filter(|w| w.hostnqn == req.hostnqn).count() >= self.limit_per_host {
            drop(t);
            return Err(window_status::LIMIT_EXCEEDED.with_dnr());
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
                exposure,
            },
        );
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
            offset: 4096,
            len: 8192,
            write,
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
        assert!(refused.same_code(window_status::LIMIT_EXCEEDED));
        // Another host has its own count.
        let w3 = windows.open(request(b, qb, &pd, &mem, false)).unwrap();
        let key_live = |d: &WindowDescriptor| {
            pd.remote_target(messaging::mr::RKey(d.stag), d.addr, 1, Access::REMOTE_READ)
                .is_ok()
        };
        assert!(key_live(&w1) && key_live(&w2) && key_live(&w3));

        // Close: only the owning queue's, and the key goes at once.
        assert!(!windows.close(qb, w1.id));
        assert_eq!(windows.placement(qb, w1.id), None);
        assert_eq!(
            windows.placement(qa, w1.id),
            Some(Placement {
                nsid: 1,
                offset: 4096,
                len: 8192
            })
        );
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
