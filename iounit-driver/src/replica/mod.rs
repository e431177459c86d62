//! Synchronous replication of a namespace across I/O units.
//!
//! The primary's namespace is a [`ReplicatedBackend`]: it writes locally,
//! forwards the write to every replica in the in-sync set over the
//! messaging layer (the primary connects to each replica as a host does,
//! and the host library pushes the data), and acknowledges only when all
//! of them have it, as DRBD's protocol C does. A replica that fails or
//! times out leaves the in-sync set through etcd ([`membership`]) before
//! the write that found it failed is acknowledged; writes then go on
//! degraded. Reads are served locally. A primary whose lease has lapsed
//! acknowledges nothing (Namespace Not Ready).

pub mod membership;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use host::{Host, HostError, HostOptions, Nsid};
use parking_lot::Mutex;

use crate::backend::{BlockBackend, BlockError, BlockIo, Discard, ErrorKind, Geometry, WriteZeroes};
use membership::{Group, Membership, MembershipError};

/// One replica of one namespace: `--replica NSID=NODE@URI`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// The namespace, the same NSID on the replica.
    pub nsid: u32,
    /// The replica's node name (as it appears in the in-sync set).
    pub node: String,
    /// Where it listens: a target URI as `hostctl --target` takes.
    pub uri: String,
}

/// A `--replica` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("replica {0:?}: use NSID=NODE@URI, e.g. 1=b@tcp://10.0.0.2:4520")]
pub struct ReplicaSpecError(String);

impl std::str::FromStr for ReplicaSpec {
    type Err = ReplicaSpecError;

    fn from_str(s: &str) -> Result<ReplicaSpec, ReplicaSpecError> {
        let bad = || ReplicaSpecError(s.to_owned());
        let (nsid, rest) = s.split_once('=').ok_or_else(bad)?;
        let (node, uri) = rest.split_once('@').ok_or_else(bad)?;
        let nsid: u32 = nsid.trim().parse().map_err(|_| bad())?;
        if nsid == 0 || node.is_empty() || node.contains([',', '/']) || !uri.contains("://") {
            return Err(bad());
        }
        Ok(ReplicaSpec {
            nsid,
            node: node.to_owned(),
            uri: uri.to_owned(),
        })
    }
}

/// How the primary reaches its replicas: a forwarded command that takes
/// longer than this fails, and the replica leaves the in-sync set.
const REPLICA_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands to a replica whose connection dropped fail at once (the
/// replica leaves the set; it comes back through a resync).
const REPLICA_RECONNECT: Duration = Duration::ZERO;
/// I/O queues of a connection to a replica.
const REPLICA_QUEUES: u16 = 2;
/// How often the supervisor looks at etcd and at missing replicas.
const SUPERVISE: Duration = Duration::from_millis(250);
/// The longest pause between attempts to resynchronise an unreachable
/// member.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The unit of resynchronisation and of the dirty map.
const CHUNK: u64 = 1 << 20;
/// Locks that keep a resync copy and a host's write of the same chunk
/// apart (chunk index modulo this).
const STRIPES: usize = 64;
/// The share of its time the resync copy may take: it sleeps as long as
/// each copy took, so foreground I/O keeps at least half.
const RESYNC_DUTY: f64 = 0.5;

/// What this node is for a replicated namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It serves hosts and replicates their writes.
    Primary,
    /// It takes writes only from the primary (the namespace is masked to
    /// the other members' replication NQNs) and waits to take over.
    Replica,
    /// Told before it becomes primary: the other members must be refused
    /// from now on.
    TakingOver,
}

/// Told each role change, so that the daemon masks the namespace.
pub type RoleHook = Box<dyn Fn(Role) + Send + Sync>;

/// A replica getting this primary's writes.
struct Target {
    node: String,
    host: Host,
    /// `Host::connections` when it was connected: a forward that finds it
    /// changed reached another incarnation of the replica.
    connections: u64,
    /// In etcd's in-sync set; false while it is being resynchronised.
    in_sync: bool,
    /// The member's copy (its namespace UUID).
    instance: String,
}

/// What a member that gets no writes missed: some chunks of the copy it
/// held (`instance`: a member that comes back as another copy, restarted
/// empty, missed everything), or anything.
#[derive(Debug, Clone)]
enum Missed {
    Chunks { map: Vec<bool>, instance: String },
    All,
}

struct State {
    group: Option<Group>,
    targets: Vec<Target>,
    /// Members that get no writes, and what they missed since.
    missed: std::collections::HashMap<String, Missed>,
    /// Members whose resync is running.
    resyncing: std::collections::HashSet<String>,
    /// Each running resync's chunks copied and to copy.
    progress: std::collections::HashMap<String, (usize, usize)>,
    /// Members whose last resync failed: when to try again, and the
    /// pause after that (doubling up to `RETRY_MAX`).
    retry: std::collections::HashMap<String, (std::time::Instant, Duration)>,
}

struct Inner {
    local: Arc<dyn BlockBackend>,
    nsid: u32,
    geo: Geometry,
    /// The local copy's identity in the in-sync set.
    instance: String,
    membership: Arc<Membership>,
    /// The other members.
    members: Vec<ReplicaSpec>,
    state: Mutex<State>,
    stripes: Vec<parking_lot::RwLock<()>>,
    /// Held (shared) by each write taken as a replica; taking over waits
    /// for those in progress.
    replica_writes: parking_lot::RwLock<()>,
    /// Set, once and for good, when this node becomes primary (read on
    /// every I/O, without the state's lock).
    primary: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
}

/// A replicated namespace on one of its members (see the module docs).
pub struct ReplicatedBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for ReplicatedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicatedBackend")
            .field("nsid", &self.inner.nsid)
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

/// The host NQN a primary connects to its replicas with.
pub fn replication_hostnqn(node: &str) -> String {
    format!("nqn.2026-11.io.chanio:replication:{node}")
}

impl ReplicatedBackend {
    /// Serves `nsid` from `local` as a member of its replication group
    /// with `members` (the others; an entry for this node is ignored).
    /// `instance` names the local copy (the namespace's UUID). The node
    /// becomes primary if it can claim the namespace in etcd, else a
    /// replica that takes over when the primary's key goes away; `on_role`
    /// is told its role now and at each change.
    ///
    /// # Errors
    /// `Open` when etcd cannot be reached.
    pub fn start(
        local: Arc<dyn BlockBackend>,
        nsid: u32,
        instance: &str,
        members: &[ReplicaSpec],
        membership: Arc<Membership>,
        on_role: RoleHook,
    ) -> Result<ReplicatedBackend, BlockError> {
        let me = membership.node().to_owned();
        let inner = Arc::new(Inner {
            geo: local.geometry(),
            local,
            nsid,
            instance: instance.to_owned(),
            membership,
            members: members.iter().filter(|m| m.node != me).cloned().collect(),
            state: Mutex::new(State {
                group: None,
                targets: Vec::new(),
                missed: Default::default(),
                resyncing: Default::default(),
                progress: Default::default(),
                retry: Default::default(),
            }),
            stripes: (0..STRIPES).map(|_| parking_lot::RwLock::new(())).collect(),
            replica_writes: parking_lot::RwLock::new(()),
            primary: std::sync::atomic::AtomicBool::new(false),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        match inner.try_claim(&on_role) {
            Ok(_) => {}
            Err(MembershipError::NotPrimary { holder, .. }) => {
                tracing::info!(nsid, primary = %holder, "replica of a replicated namespace");
                on_role(Role::Replica);
            }
            Err(e @ MembershipError::NotInSync { .. }) => {
                tracing::info!(nsid, "replica of a replicated namespace, to be resynchronised: {e}");
                on_role(Role::Replica);
            }
            Err(e) => return Err(BlockError::with_source(ErrorKind::Open, "replication", e)),
        }
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name(format!("chanio-repl-{nsid}"))
            .spawn(move || supervise(&weak, &on_role))
            .map_err(|e| BlockError::with_source(ErrorKind::Open, "replication: starting its supervisor", e))?;
        Ok(ReplicatedBackend { inner })
    }

    /// This node's role now.
    pub fn role(&self) -> Role {
        self.inner.role()
    }

    /// This member's state, for people (the vendor log page C0h, `hostctl
    /// status`): its role, the in-sync set, and each other member's state
    /// and resync progress.
    pub fn status(&self) -> String {
        let i = &self.inner;
        let role = i.role();
        let st = i.state.lock();
        let me = i.membership.node();
        let live = if i.membership.is_live() {
            ""
        } else {
            " (lease lapsed: acknowledging nothing)"
        };
        match role {
            Role::Replica | Role::TakingOver => {
                format!(
                    "namespace {}: replica on node {me}, taking writes from the primary only{live}\n",
                    i.nsid
                )
            }
            Role::Primary => {
                let in_sync: Vec<&str> = st
                    .group
                    .as_ref()
                    .map(|g| g.in_sync.iter().map(|m| membership::node_of(m)).collect())
                    .unwrap_or_default();
                let mut out = format!(
                    "namespace {}: primary on node {me}{live}; in sync: {}\n",
                    i.nsid,
                    in_sync.join(", ")
                );
                for m in &i.members {
                    let state = if in_sync.contains(&m.node.as_str()) {
                        "in sync".to_owned()
                    } else if let Some((done, total)) = st.progress.get(&m.node) {
                        format!(
                            "resynchronising: {done}/{total} chunks ({:.0} %)",
                            100.0 * *done as f64 / (*total).max(1) as f64
                        )
                    } else {
                        match st.missed.get(&m.node) {
                            Some(Missed::Chunks { map, .. }) => format!(
                                "out of sync, not reachable; missed {} of {} chunks",
                                map.iter().filter(|c| **c).count(),
                                map.len()
                            ),
                            _ => "out of sync, not reachable; to be copied in full".to_owned(),
                        }
                    };
                    out.push_str(&format!("  {} ({}): {state}\n", m.node, m.uri));
                }
                out
            }
        }
    }

    /// The in-sync nodes as this primary last confirmed them in etcd
    /// (empty on a replica).
    pub fn in_sync(&self) -> Vec<String> {
        let st = self.inner.state.lock();
        st.group.as_ref().map_or_else(Vec::new, |g| {
            g.in_sync.iter().map(|m| membership::node_of(m).to_owned()).collect()
        })
    }
}

impl Drop for ReplicatedBackend {
    fn drop(&mut self) {
        self.inner.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Every `SUPERVISE`: a replica takes over when the primary's key is
/// gone; a primary starts the resync of each member that gets no writes
/// and can be reached. Ends when the backend is dropped.
fn supervise(inner: &std::sync::Weak<Inner>, on_role: &RoleHook) {
    loop {
        std::thread::sleep(SUPERVISE);
        let Some(inner) = inner.upgrade() else { return };
        if inner.stop.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        match inner.role() {
            Role::Replica => match inner.membership.has_primary(inner.nsid) {
                Ok(false) => match inner.try_claim(on_role) {
                    Ok(_) | Err(MembershipError::NotPrimary { .. }) | Err(MembershipError::NotInSync { .. }) => {}
                    Err(e) => tracing::warn!(nsid = inner.nsid, "cannot take over: {e}"),
                },
                Ok(true) => {}
                Err(e) => tracing::debug!(nsid = inner.nsid, "etcd: {e}"),
            },
            // (Never stored: a state only the hook is told.)
            Role::Primary | Role::TakingOver => {
                for spec in inner.members.clone() {
                    let waiting = {
                        let st = inner.state.lock();
                        st.missed.contains_key(&spec.node)
                            && !st.resyncing.contains(&spec.node)
                            && st
                                .retry
                                .get(&spec.node)
                                .is_none_or(|(at, _)| *at <= std::time::Instant::now())
                    };
                    if waiting {
                        let job = inner.clone();
                        inner.state.lock().resyncing.insert(spec.node.clone());
                        let spawned = std::thread::Builder::new()
                            .name(format!("chanio-resync-{}", spec.node))
                            .spawn(move || job.resync(&spec));
                        if let Err(e) = spawned {
                            tracing::warn!("cannot start a resync thread: {e}");
                        }
                    }
                }
            }
        }
    }
}

impl Inner {
    /// Claims the namespace; on success this node is primary, alone in
    /// the in-sync set, and every other member is to be resynchronised.
    fn try_claim(&self, on_role: &RoleHook) -> Result<(), MembershipError> {
        let group = self.membership.claim(self.nsid, &self.instance)?;
        // The other members' connections are refused before this node
        // acts as primary, and the writes they sent that are under way
        // finish first.
        on_role(Role::TakingOver);
        {
            let _drained = self.replica_writes.write();
            let mut st = self.state.lock();
            st.group = Some(group);
            for m in &self.members {
                st.missed.insert(m.node.clone(), Missed::All);
            }
            self.primary.store(true, std::sync::atomic::Ordering::Release);
        }
        tracing::info!(nsid = self.nsid, "primary of a replicated namespace");
        on_role(Role::Primary);
        Ok(())
    }

    fn role(&self) -> Role {
        if self.primary.load(std::sync::atomic::Ordering::Acquire) {
            Role::Primary
        } else {
            Role::Replica
        }
    }

    /// Fails unless this node may acknowledge writes.
    fn live(&self) -> Result<(), BlockError> {
        if self.role() != Role::Primary {
            return Err(BlockError::new(
                ErrorKind::NotReady,
                format!("namespace {}: this node is not its primary", self.nsid),
            ));
        }
        if self.membership.is_live() {
            Ok(())
        } else {
            Err(BlockError::new(
                ErrorKind::NotReady,
                format!(
                    "namespace {}: this node's membership lease has lapsed: it acknowledges no writes",
                    self.nsid
                ),
            ))
        }
    }

    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / CHUNK..(offset + len.max(1)).div_ceil(CHUNK)
    }

    /// Shared locks on the stripes of `chunks`, in ascending order (a
    /// resync's copy of one of them waits).
    fn lock_chunks(&self, chunks: std::ops::Range<u64>) -> Vec<parking_lot::RwLockReadGuard<'_, ()>> {
        let mut stripes: Vec<usize> = chunks.map(|c| (c % STRIPES as u64) as usize).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes.iter().map(|&i| self.stripes[i].read()).collect()
    }

    /// A change of the namespace: `local` on this copy, then `op` on every
    /// replica getting writes. On a replica (the primary's own writes)
    /// only `local`.
    fn replicate<'d>(
        &self,
        what: &str,
        range: Option<(u64, u64)>,
        local: impl FnOnce() -> Result<(), BlockError>,
        op: impl Fn(Host, Nsid) -> Forward<'d>,
    ) -> Result<(), BlockError> {
        {
            let _replica = self.replica_writes.read();
            if self.role() == Role::Replica {
                return local();
            }
        }
        self.live()?;
        let chunks = range.map(|(o, l)| self.chunks(o, l));
        let _held = chunks.clone().map(|c| self.lock_chunks(c));
        local()?;
        let targets: Vec<(String, Host, u64, bool)> = {
            let mut st = self.state.lock();
            if let Some(chunks) = &chunks {
                for missed in st.missed.values_mut() {
                    if let Missed::Chunks { map, .. } = missed {
                        for c in chunks.clone() {
                            if let Some(bit) = map.get_mut(c as usize) {
                                *bit = true;
                            }
                        }
                    }
                }
            }
            st.targets
                .iter()
                .map(|t| (t.node.clone(), t.host.clone(), t.connections, t.in_sync))
                .collect()
        };
        // Every replica at once; the write waits for the slowest. This
        // (blocking) thread reaps the completions itself.
        let forwards: Vec<Forward<'d>> = targets
            .iter()
            .map(|(_, host, ..)| op(host.clone(), Nsid(self.nsid)))
            .collect();
        let results = host::block_on(host::join_all(forwards));
        for ((node, host, connections, in_sync), result) in targets.into_iter().zip(results) {
            let result = result.map_err(|e| e.to_string()).and_then(|()| {
                if host.connections() == connections {
                    Ok(())
                } else {
                    Err("the replica was reconnected: it may not hold what this node sent it before".into())
                }
            });
            if let Err(e) = result {
                let why = format!("{what}: {e}");
                if in_sync {
                    self.drop_replica(&node, &why)?;
                } else {
                    self.abort_resync(&node, &why);
                }
            }
        }
        self.live()
    }

    /// Takes `node` out of the in-sync set, in etcd first; the write that
    /// found it failed is acknowledged only if that succeeded.
    fn drop_replica(&self, node: &str, why: &dyn fmt::Display) -> Result<(), BlockError> {
        let mut st = self.state.lock();
        let State {
            group, targets, missed, ..
        } = &mut *st;
        let Some(group) = group.as_mut() else {
            return Ok(());
        };
        if !group.in_sync.iter().any(|m| membership::node_of(m) == node) {
            return Ok(());
        }
        match self.membership.remove(group, node) {
            Ok(()) => {
                tracing::warn!(
                    nsid = self.nsid,
                    replica = node,
                    in_sync = ?group.in_sync,
                    "replica left the in-sync set ({why}); writes go on degraded"
                );
                let left = match targets.iter().position(|t| t.node == node) {
                    Some(i) => {
                        let t = targets.remove(i);
                        t.host.close();
                        let chunks = self.geo.bytes().div_ceil(CHUNK) as usize;
                        Missed::Chunks {
                            map: vec![false; chunks],
                            instance: t.instance,
                        }
                    }
                    None => Missed::All,
                };
                missed.insert(node.to_owned(), left);
                Ok(())
            }
            Err(e) => {
                let kind = match e {
                    MembershipError::Lapsed | MembershipError::Lost { .. } => ErrorKind::NotReady,
                    _ => ErrorKind::WriteFailed,
                };
                Err(BlockError::new(
                    kind,
                    format!(
                        "namespace {}: replica {node} failed ({why}) and cannot leave the in-sync set: {e}",
                        self.nsid
                    ),
                ))
            }
        }
    }

    /// Stops feeding a member being resynchronised; it starts over later,
    /// from nothing known.
    fn abort_resync(&self, node: &str, why: &dyn fmt::Display) {
        let mut st = self.state.lock();
        if let Some(i) = st.targets.iter().position(|t| t.node == node && !t.in_sync) {
            st.targets.remove(i).host.close();
            st.missed.insert(node.to_owned(), Missed::All);
            tracing::warn!(nsid = self.nsid, replica = node, "resync abandoned: {why}");
        }
    }

    /// Brings `spec`'s member back: it gets every new write from now on,
    /// then the chunks it missed (all of them when that is not known) are
    /// copied to it, each under its stripe's lock, at most `RESYNC_DUTY`
    /// of the time; then it joins the in-sync set through etcd.
    fn resync(self: Arc<Self>, spec: &ReplicaSpec) {
        let node = spec.node.clone();
        let outcome = self.resync_inner(spec);
        let mut st = self.state.lock();
        st.resyncing.remove(&node);
        st.progress.remove(&node);
        if outcome.is_ok() {
            st.retry.remove(&node);
        }
        if let Err(e) = outcome {
            let pause = st.retry.get(&node).map_or(SUPERVISE, |(_, p)| (*p * 2).min(RETRY_MAX));
            st.retry
                .insert(node.clone(), (std::time::Instant::now() + pause, pause));
            if let Some(i) = st.targets.iter().position(|t| t.node == node && !t.in_sync) {
                st.targets.remove(i).host.close();
            }
            // Not reached: what it missed is still known. Failed midway:
            // anything may be missing.
            st.missed.entry(node.clone()).or_insert(Missed::All);
            tracing::debug!(nsid = self.nsid, replica = %node, "resync not done: {e}");
        }
    }

    fn resync_inner(&self, spec: &ReplicaSpec) -> Result<(), String> {
        let (host, instance) = connect(spec, self.membership.node(), self.geo)?;
        let connections = host.connections();
        let missed = {
            let mut st = self.state.lock();
            if self.role() != Role::Primary {
                host.close();
                return Err("no longer primary".into());
            }
            st.targets.push(Target {
                node: spec.node.clone(),
                host: host.clone(),
                connections,
                in_sync: false,
                instance: instance.clone(),
            });
            match st.missed.remove(&spec.node) {
                // The same copy: only what it missed.
                Some(m @ Missed::Chunks { .. }) if matches!(&m, Missed::Chunks { instance: i, .. } if *i == instance) => {
                    m
                }
                _ => Missed::All,
            }
        };
        // Writes that began before the member was added may not reach it:
        // each holds its chunks' stripes until it is done.
        for stripe in &self.stripes {
            drop(stripe.write());
        }
        let total = self.geo.bytes().div_ceil(CHUNK);
        let todo: Vec<u64> = match &missed {
            Missed::All => (0..total).collect(),
            Missed::Chunks { map, .. } => (0..total)
                .filter(|&c| map.get(c as usize).copied().unwrap_or(true))
                .collect(),
        };
        tracing::info!(
            nsid = self.nsid,
            replica = %spec.node,
            chunks = todo.len(),
            of = total,
            "resynchronising replica"
        );
        self.state.lock().progress.insert(spec.node.clone(), (0, todo.len()));
        let mut buf = vec![0u8; CHUNK as usize];
        let started = std::time::Instant::now();
        let mut last_report = started;
        for (done, &c) in todo.iter().enumerate() {
            if self.stop.load(std::sync::atomic::Ordering::Acquire) {
                return Err("stopping".into());
            }
            let offset = c * CHUNK;
            let len = CHUNK.min(self.geo.bytes() - offset) as usize;
            let copy = std::time::Instant::now();
            {
                let _held = self.stripes[(c % STRIPES as u64) as usize].write();
                if !self.state.lock().targets.iter().any(|t| t.node == spec.node) {
                    return Err("abandoned".into());
                }
                self.local
                    .read(offset, &mut buf[..len])
                    .map_err(|e| format!("reading the local copy: {e}"))?;
                host.write(
                    Nsid(self.nsid),
                    offset / u64::from(self.geo.block_size),
                    &buf[..len],
                    false,
                )
                .map_err(|e| format!("writing to the replica: {e}"))?;
                if host.connections() != connections {
                    return Err("the replica was reconnected".into());
                }
            }
            self.state
                .lock()
                .progress
                .insert(spec.node.clone(), (done + 1, todo.len()));
            std::thread::sleep(copy.elapsed().mul_f64((1.0 - RESYNC_DUTY) / RESYNC_DUTY));
            if last_report.elapsed() >= Duration::from_secs(2) {
                last_report = std::time::Instant::now();
                tracing::info!(
                    nsid = self.nsid,
                    replica = %spec.node,
                    "resync {}/{} chunks ({:.0} %)",
                    done + 1,
                    todo.len(),
                    100.0 * (done + 1) as f64 / todo.len() as f64
                );
            }
        }
        host.flush(Nsid(self.nsid))
            .map_err(|e| format!("flushing the replica: {e}"))?;
        let mut st = self.state.lock();
        let State { group, targets, .. } = &mut *st;
        let Some(group) = group.as_mut() else {
            return Err("no longer primary".into());
        };
        let Some(target) = targets.iter_mut().find(|t| t.node == spec.node) else {
            return Err("abandoned".into());
        };
        self.membership
            .add(group, &spec.node, &instance)
            .map_err(|e| format!("joining the in-sync set: {e}"))?;
        target.in_sync = true;
        tracing::info!(
            nsid = self.nsid,
            replica = %spec.node,
            in_sync = ?group.in_sync,
            secs = started.elapsed().as_secs_f64(),
            "replica resynchronised and back in the in-sync set"
        );
        Ok(())
    }
}

/// One forwarded command (it holds a clone of the replica's connection,
/// and borrows the data).
type Forward<'h> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), HostError>> + Send + 'h>>;

/// Connects to one member and checks its namespace can hold this one;
/// returns the connection and the member's copy's instance (its
/// namespace UUID).
fn connect(spec: &ReplicaSpec, node: &str, geo: Geometry) -> Result<(Host, String), String> {
    let opts = HostOptions {
        hostnqn: replication_hostnqn(node),
        command_timeout: REPLICA_COMMAND_TIMEOUT,
        reconnect_deadline: REPLICA_RECONNECT,
        connect_timeout: Duration::from_secs(1),
        // Forwards come from many blocking threads at once.
        io_queues: REPLICA_QUEUES,
        queue_depth: 128,
        ..HostOptions::default()
    };
    let host = Host::connect(&spec.uri, opts).map_err(|e| format!("cannot connect to {}: {e}", spec.uri))?;
    let checked = (|| {
        let info = host
            .namespaces()
            .map_err(|e| format!("{}: {e}", spec.uri))?
            .into_iter()
            .find(|n| n.nsid == Nsid(spec.nsid))
            .ok_or_else(|| format!("{} serves no namespace {} to this node", spec.uri, spec.nsid))?;
        if info.block_size != geo.block_size || info.blocks < geo.blocks {
            return Err(format!(
                "{} namespace {}: {} blocks of {} bytes cannot hold {} blocks of {}",
                spec.uri, spec.nsid, info.blocks, info.block_size, geo.blocks, geo.block_size
            ));
        }
        let ids = host
            .namespace_ids(Nsid(spec.nsid))
            .map_err(|e| format!("{}: namespace identifiers: {e}", spec.uri))?;
        Ok(nvme::descriptors::uuid_text(&ids.uuid))
    })();
    match checked {
        Ok(instance) => Ok((host, instance)),
        Err(e) => {
            host.close();
            Err(e)
        }
    }
}

impl BlockIo for ReplicatedBackend {
    fn describe(&self) -> String {
        format!("{} replicated", self.inner.local.describe())
    }

    fn geometry(&self) -> Geometry {
        self.inner.geo
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.inner.local.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        let i = &self.inner;
        let lba = offset / u64::from(i.geo.block_size);
        i.replicate(
            "write",
            Some((offset, data.len() as u64)),
            || i.local.write(offset, data, fua),
            |h, ns| Box::pin(async move { h.write_async(ns, lba, data, fua).await }),
        )
    }

    fn flush(&self) -> Result<(), BlockError> {
        let i = &self.inner;
        i.replicate(
            "flush",
            None,
            || i.local.flush(),
            |h, ns| Box::pin(async move { h.flush_async(ns).await }),
        )
    }

    /// On the primary every command runs on a blocking thread (a write
    /// waits for the replicas); a replica's writes are local only, and run
    /// where the local storage's would.
    fn may_block(&self) -> bool {
        self.inner.role() == Role::Primary || self.inner.local.may_block()
    }

    // No `files` and no `window_memory`: every write must come through
    // `write`, never straight to the local storage.
}

impl WriteZeroes for ReplicatedBackend {
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let i = &self.inner;
        let bs = u64::from(i.geo.block_size);
        i.replicate(
            "write zeroes",
            Some((offset, len)),
            || i.local.write_zeroes(offset, len),
            |h, ns| Box::pin(async move { h.write_zeroes_async(ns, offset / bs, len / bs).await }),
        )
    }
}

impl Discard for ReplicatedBackend {
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let i = &self.inner;
        let bs = u64::from(i.geo.block_size);
        i.replicate(
            "deallocate",
            Some((offset, len)),
            || i.local.discard(offset, len),
            |h, ns| Box::pin(async move { h.trim_async(ns, offset / bs, len / bs).await }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_specs_parse() {
        let r: ReplicaSpec = "1=b@tcp://127.0.0.1:4521".parse().unwrap();
        assert_eq!(r.nsid, 1);
        assert_eq!(r.node, "b");
        assert_eq!(r.uri, "tcp://127.0.0.1:4521");
        for bad in [
            "b@tcp://x:1",
            "0=b@tcp://x:1",
            "1=@tcp://x:1",
            "1=b",
            "1=b@x",
            "1=a,b@tcp://x:1",
            "x=b@tcp://x:1",
        ] {
            assert!(bad.parse::<ReplicaSpec>().is_err(), "{bad} parsed");
        }
    }
}
