//! The namespace registry: the common layer's registration interface.
//!
//! Backends are attached under a namespace ID and detached at run time;
//! the NVMe layer and anyone else subscribe with a callback and hear of
//! every change (the I/O unit turns them into asynchronous events for the
//! hosts). Commands hold a [`NamespaceRef`] while they run; detaching a
//! namespace makes new lookups fail at once and waits for the running
//! commands to finish before it returns.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use slab::Slab;

use super::BlockBackend;

/// Largest namespace ID the registry hands out (Identify Controller NN).
pub const MAX_NAMESPACES: u32 = 1024;

/// A change in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryEvent {
    /// A namespace was attached.
    Attached(u32),
    /// A namespace was detached (its in-flight commands finished).
    Detached(u32),
}

/// Handle for [`Registry::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionId(usize);

/// Registry errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The namespace ID is taken.
    #[error("namespace {0} is already attached")]
    InUse(u32),
    /// The namespace ID is out of range or no IDs are left.
    #[error("namespace ID {0} is out of range 1..={MAX_NAMESPACES}")]
    BadNsid(u32),
    /// No such namespace.
    #[error("namespace {0} is not attached")]
    NotFound(u32),
    /// Commands did not finish in time; the namespace is detached anyway.
    #[error("namespace {nsid} detached with {inflight} commands still running after {waited:?}")]
    Busy {
        /// The namespace.
        nsid: u32,
        /// Commands still running.
        inflight: usize,
        /// How long we waited.
        waited: Duration,
    },
}

type Callback = Arc<dyn Fn(&RegistryEvent) + Send + Sync>;

/// Namespaces by ID, with change subscriptions.
#[derive(Default)]
pub struct Registry {
    namespaces: RwLock<BTreeMap<u32, Arc<Namespace>>>,
    subscribers: Mutex<Slab<Callback>>,
}

struct Namespace {
    backend: Arc<dyn BlockBackend>,
    inflight: Mutex<usize>,
    idle: Condvar,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Registers `backend` under `nsid`, or the lowest free ID; returns the ID.
    ///
    /// # Errors
    /// `InUse` or `BadNsid`.
    pub fn attach(&self, nsid: Option<u32>, backend: Arc<dyn BlockBackend>) -> Result<u32, RegistryError> {
        let id = {
            let mut map = self.namespaces.write();
            let id = match nsid {
                Some(0) => return Err(RegistryError::BadNsid(0)),
                Some(n) if n > MAX_NAMESPACES => return Err(RegistryError::BadNsid(n)),
                Some(n) if map.contains_key(&n) => return Err(RegistryError::InUse(n)),
                Some(n) => n,
                None => (1..=MAX_NAMESPACES)
                    .find(|n| !map.contains_key(n))
                    .ok_or(RegistryError::BadNsid(MAX_NAMESPACES + 1))?,
            };
            tracing::info!(nsid = id, backend = %backend.describe(), "namespace attached");
            map.insert(
                id,
                Arc::new(Namespace {
                    backend,
                    inflight: Mutex::new(0),
                    idle: Condvar::new(),
                }),
            );
            id
        };
        self.notify(RegistryEvent::Attached(id));
        Ok(id)
    }

    /// Deregisters `nsid`: new lookups fail at once; waits up to `timeout`
    /// for running commands, then tells subscribers.
    ///
    /// # Errors
    /// `NotFound`, or `Busy` if commands were still running at the deadline.
    pub fn detach(&self, nsid: u32, timeout: Duration) -> Result<Arc<dyn BlockBackend>, RegistryError> {
        let ns = self
            .namespaces
            .write()
            .remove(&nsid)
            .ok_or(RegistryError::NotFound(nsid))?;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut left = ns.inflight.lock();
        while *left > 0 {
            if ns.idle.wait_until(&mut left, deadline).timed_out() && *left > 0 {
                let inflight = *left;
                drop(left);
                self.notify(RegistryEvent::Detached(nsid));
                return Err(RegistryError::Busy {
                    nsid,
                    inflight,
                    waited: started.elapsed(),
                });
            }
        }
        drop(left);
        tracing::info!(nsid, "namespace detached");
        self.notify(RegistryEvent::Detached(nsid));
        Ok(ns.backend.clone())
    }

    /// The namespace, held for one command.
    pub fn get(&self, nsid: u32) -> Option<NamespaceRef> {
        let ns = self.namespaces.read().get(&nsid)?.clone();
        *ns.inflight.lock() += 1;
        Some(NamespaceRef { nsid, ns })
    }

    /// Attached namespace IDs, ascending.
    pub fn nsids(&self) -> Vec<u32> {
        self.namespaces.read().keys().copied().collect()
    }

    /// Calls `callback` on every later change, from the thread that made it.
    pub fn subscribe(&self, callback: impl Fn(&RegistryEvent) + Send + Sync + 'static) -> SubscriptionId {
        SubscriptionId(self.subscribers.lock().insert(Arc::new(callback)))
    }

    /// Stops a subscription.
    pub fn unsubscribe(&self, id: SubscriptionId) {
        self.subscribers.lock().try_remove(id.0);
    }

    fn notify(&self, event: RegistryEvent) {
        let callbacks: Vec<Callback> = self.subscribers.lock().iter().map(|(_, c)| c.clone()).collect();
        for c in callbacks {
            c(&event);
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("nsids", &self.nsids()).finish()
    }
}

/// A namespace held by a running command; detaching waits for it.
pub struct NamespaceRef {
    nsid: u32,
    ns: Arc<Namespace>,
}

impl NamespaceRef {
    /// The namespace ID.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }
}

impl Deref for NamespaceRef {
    type Target = dyn BlockBackend;
    fn deref(&self) -> &Self::Target {
        &*self.ns.backend
    }
}

impl Drop for NamespaceRef {
    fn drop(&mut self) {
        let mut n = self.ns.inflight.lock();
        *n -= 1;
        if *n == 0 {
            self.ns.idle.notify_all();
        }
    }
}

impl fmt::Debug for NamespaceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamespaceRef").field("nsid", &self.nsid).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::backend::ram::RamBackend;

    fn ram() -> Arc<dyn BlockBackend> {
        Arc::new(RamBackend::new(1 << 20, 512).unwrap())
    }

    #[test]
    fn attach_detach_and_callbacks() {
        let reg = Registry::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sub = reg.subscribe(move |e| s.lock().push(*e));
        assert_eq!(reg.attach(None, ram()).unwrap(), 1);
        assert_eq!(reg.attach(Some(5), ram()).unwrap(), 5);
        assert_eq!(reg.attach(None, ram()).unwrap(), 2);
        assert!(matches!(reg.attach(Some(5), ram()), Err(RegistryError::InUse(5))));
        assert!(matches!(reg.attach(Some(0), ram()), Err(RegistryError::BadNsid(0))));
        assert_eq!(reg.nsids(), vec![1, 2, 5]);
        reg.detach(2, Duration::from_secs(1)).unwrap();
        assert!(reg.get(2).is_none());
        assert!(matches!(reg.detach(2, Duration::ZERO), Err(RegistryError::NotFound(2))));
        reg.unsubscribe(sub);
        reg.attach(None, ram()).unwrap();
        assert_eq!(
            *seen.lock(),
            vec![
                RegistryEvent::Attached(1),
                RegistryEvent::Attached(5),
                RegistryEvent::Attached(2),
                RegistryEvent::Detached(2)
            ]
        );
    }

    #[test]
    fn detach_waits_for_running_commands() {
        let reg = Registry::new();
        reg.attach(Some(1), ram()).unwrap();
        let held = reg.get(1).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            let d = done.clone();
            let reg = &reg;
            let detacher = s.spawn(move || {
                let r = reg.detach(1, Duration::from_secs(10));
                d.store(1, Ordering::SeqCst);
                r
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(reg.get(1).is_none(), "new commands are refused at once");
            assert_eq!(done.load(Ordering::SeqCst), 0, "detach waits for the running command");
            drop(held);
            assert!(detacher.join().unwrap().is_ok());
        });
        reg.attach(Some(1), ram()).unwrap();
        let _held = reg.get(1).unwrap();
        assert!(matches!(
            reg.detach(1, Duration::from_millis(20)),
            Err(RegistryError::Busy { inflight: 1, .. })
        ));
    }
}
