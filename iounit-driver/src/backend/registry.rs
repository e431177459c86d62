//! The namespace registry: the common layer's registration interface.
//!
//! Backends are attached under a namespace ID and detached at run time;
//! the NVMe layer and anyone else subscribe with a callback and hear of
//! every change (the I/O unit turns them into asynchronous events for the
//! hosts). Commands hold a [`NamespaceRef`] while they run; detaching a
//! namespace makes new lookups fail at once and waits for the running
//! commands to finish before it returns.
//!
//! A queue looks its namespace up once per command, so that lookup is
//! kept cheap: through a [`NamespaceCache`] it takes no registry lock, and
//! holding a namespace is one atomic increment (and one decrement when the
//! command ends), not a mutex.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
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
    /// A namespace left the registry: no new command finds it, and those
    /// running are being waited for (`Detached` follows).
    Detaching(u32),
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
    /// Commands holding the namespace ([`NamespaceRef`]s alive).
    inflight: AtomicUsize,
    /// Set by `detach` (with the namespace already out of the map) before
    /// it waits for `inflight` to drain; a lookup that counted itself in
    /// and then sees it backs out (`Namespace::enter`).
    detached: AtomicBool,
    /// `detach` sleeps on `idle` under this lock until `inflight` is 0.
    idle_lock: Mutex<()>,
    idle: Condvar,
}

impl Namespace {
    /// Holds the namespace for one command, unless it is being detached.
    ///
    /// With `detach` this is a store-then-load handshake on both sides
    /// (SeqCst): a lookup counts itself in, then looks at `detached`;
    /// `detach` sets `detached`, then looks at the count. Either the lookup
    /// sees the flag and backs out, or `detach` sees the command and waits
    /// for it: no command runs on a namespace whose detach returned.
    fn enter(ns: Arc<Namespace>, nsid: u32) -> Option<NamespaceRef> {
        ns.inflight.fetch_add(1, Ordering::SeqCst);
        if ns.detached.load(Ordering::SeqCst) {
            ns.leave();
            return None;
        }
        Some(NamespaceRef { nsid, ns })
    }

    fn leave(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.detached.load(Ordering::SeqCst) {
            // `detach` checks the count under this lock before it sleeps:
            // taking it here means the notification cannot fall between.
            let _guard = self.idle_lock.lock();
            self.idle.notify_all();
        }
    }
}

/// One caller's shortcut to the namespace it looked up last (a queue's
/// commands mostly address one namespace): [`Registry::get_cached`] through
/// it takes no registry lock. It holds only a weak reference, so a
/// detached namespace's memory is not kept alive by an idle queue.
#[derive(Debug, Default)]
pub struct NamespaceCache {
    last: Option<(u32, Weak<Namespace>)>,
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
                    inflight: AtomicUsize::new(0),
                    detached: AtomicBool::new(false),
                    idle_lock: Mutex::new(()),
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
        let ns = {
            let mut map = self.namespaces.write();
            let ns = map.remove(&nsid).ok_or(RegistryError::NotFound(nsid))?;
            // Under the map's lock: from here no lookup, cached or not, holds it anew.
            ns.detached.store(true, Ordering::SeqCst);
            ns
        };
        self.notify(RegistryEvent::Detaching(nsid));
        let started = Instant::now();
        let deadline = started + timeout;
        let mut guard = ns.idle_lock.lock();
        while ns.inflight.load(Ordering::SeqCst) > 0 {
            if ns.idle.wait_until(&mut guard, deadline).timed_out() && ns.inflight.load(Ordering::SeqCst) > 0 {
                let inflight = ns.inflight.load(Ordering::SeqCst);
                drop(guard);
                self.notify(RegistryEvent::Detached(nsid));
                return Err(RegistryError::Busy {
                    nsid,
                    inflight,
                    waited: started.elapsed(),
                });
            }
        }
        drop(guard);
        tracing::info!(nsid, "namespace detached");
        self.notify(RegistryEvent::Detached(nsid));
        Ok(ns.backend.clone())
    }

    /// The namespace, held for one command.
    pub fn get(&self, nsid: u32) -> Option<NamespaceRef> {
        Namespace::enter(self.lookup(nsid)?, nsid)
    }

    fn lookup(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.read().get(&nsid).cloned()
    }

    /// As [`Registry::get`], through `cache`: while the namespace `cache`
    /// remembers for `nsid` is attached, no registry lock is taken.
    pub fn get_cached(&self, cache: &mut NamespaceCache, nsid: u32) -> Option<NamespaceRef> {
        if let Some((id, weak)) = &cache.last {
            if *id == nsid {
                if let Some(held) = weak.upgrade().and_then(|ns| Namespace::enter(ns, nsid)) {
                    return Some(held);
                }
            }
        }
        let Some(ns) = self.lookup(nsid) else {
            cache.last = None;
            return None;
        };
        cache.last = Some((nsid, Arc::downgrade(&ns)));
        Namespace::enter(ns, nsid)
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

impl Clone for NamespaceRef {
    /// Another hold of the same namespace (a request that runs elsewhere):
    /// a detach waits for it too.
    fn clone(&self) -> NamespaceRef {
        self.ns.inflight.fetch_add(1, Ordering::SeqCst);
        NamespaceRef {
            nsid: self.nsid,
            ns: self.ns.clone(),
        }
    }
}

impl Drop for NamespaceRef {
    fn drop(&mut self) {
        self.ns.leave();
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
                RegistryEvent::Detaching(2),
                RegistryEvent::Detached(2)
            ]
        );
    }

    #[test]
    fn cached_lookups_follow_detach_and_reattach() {
        let reg = Registry::new();
        let first = ram();
        reg.attach(Some(1), first.clone()).unwrap();
        let mut cache = NamespaceCache::default();
        let held = reg.get_cached(&mut cache, 1).unwrap();
        assert!(Arc::ptr_eq(&held.ns.backend, &first));
        drop(held);
        assert!(reg.get_cached(&mut cache, 2).is_none(), "another nsid misses");
        let returned = reg.detach(1, Duration::from_secs(1)).unwrap();
        assert!(reg.get_cached(&mut cache, 1).is_none(), "a detached namespace is gone");
        // The cache holds it weakly: only the backend detach returned and
        // this test's own handle keep it alive.
        assert_eq!(Arc::strong_count(&returned), 2);
        let second = ram();
        reg.attach(Some(1), second.clone()).unwrap();
        let held = reg.get_cached(&mut cache, 1).unwrap();
        assert!(
            Arc::ptr_eq(&held.ns.backend, &second),
            "the new namespace, not the old one"
        );
    }

    #[test]
    fn no_cached_lookup_outlives_its_detach() {
        // Lookups through a cache race a detach: whatever a lookup holds,
        // the detach has not returned yet (it waits for it), and once it
        // returned no lookup succeeds.
        for _ in 0..1000 {
            let reg = Registry::new();
            reg.attach(Some(1), ram()).unwrap();
            let detached = AtomicUsize::new(0);
            std::thread::scope(|s| {
                let looker = s.spawn(|| {
                    let mut cache = NamespaceCache::default();
                    let mut held_after = 0;
                    loop {
                        let done = detached.load(Ordering::SeqCst) == 1;
                        match reg.get_cached(&mut cache, 1) {
                            Some(ns) => {
                                if detached.load(Ordering::SeqCst) == 1 {
                                    held_after += 1;
                                }
                                drop(ns);
                            }
                            None if done => return held_after,
                            None => {}
                        }
                    }
                });
                std::thread::yield_now();
                reg.detach(1, Duration::from_secs(10)).unwrap();
                detached.store(1, Ordering::SeqCst);
                assert_eq!(
                    looker.join().unwrap(),
                    0,
                    "a lookup held the namespace after its detach returned"
                );
            });
        }
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
