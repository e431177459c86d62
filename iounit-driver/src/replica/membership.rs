//! Replication membership in etcd: which node is a namespace's primary and
//! which nodes hold every acknowledged write (the in-sync set). Nothing is
//! decided here that etcd does not decide: the primary is whoever created
//! the primary key under its lease, and every change of the in-sync set is
//! a transaction that holds only while this node still holds that key
//! under that lease and the set is the one it last read
//! (docs/decisions.md, "Replication membership").
//!
//! Keys, under a prefix (by default `/chanio/<subsystem NQN>`):
//!
//! ```text
//! PREFIX/ns/NSID/primary   the primary's node name, attached to its lease
//! PREFIX/ns/NSID/in_sync   the in-sync copies, NODE=INSTANCE, comma-separated,
//!                          primary first (INSTANCE: the copy's namespace UUID)
//! ```
//!
//! Fencing: a node acknowledges writes only while [`Membership::is_live`]:
//! until the instant it sent its last answered keep-alive, plus the TTL
//! etcd granted in that answer, less a margin for clock-rate error. etcd
//! expires the lease no earlier than the TTL after it received that
//! keep-alive, later than it was sent, so this node stops acknowledging
//! before any other node can become primary.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};
use parking_lot::Mutex;

/// What can go wrong with the membership store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// etcd could not be reached or refused a request.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// The local runtime that drives the etcd client could not start.
    #[error("cannot start the etcd client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Another node holds the namespace's primary key.
    #[error("namespace {nsid}: node {holder:?} is its primary")]
    NotPrimary {
        /// The namespace.
        nsid: u32,
        /// Who holds the key.
        holder: String,
    },
    /// The in-sync set recorded in etcd does not include this node: its
    /// copy may miss acknowledged writes, so it may not become primary.
    #[error("namespace {nsid}: this node is not in the in-sync set {in_sync:?}")]
    NotInSync {
        /// The namespace.
        nsid: u32,
        /// The set etcd holds.
        in_sync: Vec<String>,
    },
    /// A transaction's conditions no longer held: this node lost the
    /// primary key or its lease, or the in-sync set changed behind it.
    #[error("namespace {nsid}: {what}: this node is no longer its primary, or the in-sync set changed")]
    Lost {
        /// The namespace.
        nsid: u32,
        /// What was attempted.
        what: String,
    },
    /// The lease ran out (or etcd has not answered a keep-alive in time).
    #[error("the membership lease has lapsed")]
    Lapsed,
    /// A node name or value is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// This node's session with etcd: one lease, kept alive in the background.
pub struct Membership {
    rt: tokio::runtime::Runtime,
    client: Client,
    node: String,
    prefix: String,
    lease: i64,
    /// Until when this node may acknowledge writes (see the module docs).
    live_until: Arc<Mutex<Instant>>,
    /// The lease was given back ([`Membership::leave`]).
    left: AtomicBool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("node", &self.node)
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// A namespace this node is primary of, as etcd last confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The namespace.
    pub nsid: u32,
    /// The in-sync copies (`NODE=INSTANCE`), this one first.
    pub in_sync: Vec<String>,
    /// The in-sync key's modification revision: a change is made only
    /// against this one.
    pub revision: i64,
}

/// How long each etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Membership {
    /// Connects to etcd at `endpoints` (`http://HOST:PORT` or `HOST:PORT`)
    /// as node `node`, grants a lease of `ttl` and keeps it alive.
    ///
    /// # Errors
    /// `Invalid` for an empty node name or one with ',', '/' or '=',
    /// `Etcd` when etcd cannot be reached or refuses the lease.
    pub fn join(endpoints: &[String], prefix: &str, node: &str, ttl: Duration) -> Result<Membership, MembershipError> {
        if node.is_empty() || node.contains([',', '/', '=']) {
            return Err(MembershipError::Invalid(format!(
                "node name {node:?}: use a non-empty name without ',', '/' or '='"
            )));
        }
        let ttl_s = ttl.as_secs().max(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chanio-etcd")
            .enable_all()
            .build()
            .map_err(MembershipError::Runtime)?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let (client, lease, live_until) = rt.block_on(async {
            let mut client = Client::connect(endpoints, Some(opts)).await?;
            let sent = Instant::now();
            let granted = client.lease_grant(ttl_s as i64, None).await?;
            let live_until = sent + fence(Duration::from_secs(granted.ttl().max(0) as u64));
            Ok::<_, MembershipError>((client, granted.id(), live_until))
        })?;
        let live_until = Arc::new(Mutex::new(live_until));
        rt.spawn(keep_alive(
            client.clone(),
            lease,
            Duration::from_secs(ttl_s),
            live_until.clone(),
        ));
        let membership = Membership {
            rt,
            client,
            node: node.to_owned(),
            prefix: prefix.trim_end_matches('/').to_owned(),
            lease,
            live_until,
            left: AtomicBool::new(false),
        };
        // One process per node name: the name is taken under the lease. A
        // process that just died still holds it until its lease ends (a
        // restart waits that long); one that is alive keeps it.
        let wait = Duration::from_secs(ttl_s * 2 + 1);
        let started = Instant::now();
        let mut said = false;
        while !membership.take_name()? {
            if started.elapsed() >= wait {
                return Err(MembershipError::Invalid(format!(
                    "another process is node {node:?} under {} (it held the name for {wait:?})",
                    membership.prefix
                )));
            }
            if !said {
                tracing::info!(
                    node,
                    "node name held by another process: waiting up to {wait:?} for its lease to end"
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        tracing::info!(node, lease = format!("{lease:x}"), ttl_s, "joined etcd");
        Ok(membership)
    }

    /// Takes `PREFIX/nodes/NODE` under this node's lease, if free.
    fn take_name(&self) -> Result<bool, MembershipError> {
        let key = format!("{}/nodes/{}", self.prefix, self.node);
        let mut client = self.client.clone();
        self.rt.block_on(async {
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    "",
                    Some(PutOptions::new().with_lease(self.lease)),
                )]);
            Ok(client.txn(txn).await?.succeeded())
        })
    }

    /// Gives the lease back: every key this node holds under it (its name,
    /// a primary key) goes at once instead of when the lease would end,
    /// and the node acknowledges nothing more. Done once; dropping the
    /// membership does it too.
    pub fn leave(&self) {
        if self.left.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        *self.live_until.lock() = Instant::now();
        let mut client = self.client.clone();
        let lease = self.lease;
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await });
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether this node may acknowledge writes now: its lease is certainly
    /// still held.
    pub fn is_live(&self) -> bool {
        Instant::now() < *self.live_until.lock()
    }

    fn key(&self, nsid: u32, name: &str) -> String {
        format!("{}/ns/{nsid}/{name}", self.prefix)
    }

    /// Becomes `nsid`'s primary, its copy being `instance` (the local
    /// namespace's UUID: a copy that was lost, a RAM namespace restarted,
    /// has a new one). The transaction creates the primary key under this
    /// node's lease, and sets the in-sync set to this node alone: where a
    /// set exists it must list this node with this instance, and the
    /// others leave it, since they may hold writes the last primary never
    /// acknowledged; they are resynchronised from this node.
    ///
    /// # Errors
    /// `NotPrimary` when another node holds the key, `NotInSync` when the
    /// recorded set lacks this copy, `Etcd` when etcd cannot be reached.
    pub fn claim(&self, nsid: u32, instance: &str) -> Result<Group, MembershipError> {
        let primary = self.key(nsid, "primary");
        let in_sync = self.key(nsid, "in_sync");
        let me = member(&self.node, instance);
        let mut client = self.client.clone();
        self.rt.block_on(async {
            let existing = client.get(in_sync.as_str(), None).await?;
            let compare = match existing.kvs().first() {
                Some(kv) => {
                    let members = split(kv.value_str()?);
                    if !members.contains(&me) {
                        return Err(MembershipError::NotInSync {
                            nsid,
                            in_sync: members.iter().map(|m| node_of(m).to_owned()).collect(),
                        });
                    }
                    Compare::mod_revision(in_sync.as_str(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::create_revision(in_sync.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new()
                .when([Compare::create_revision(primary.as_str(), CompareOp::Equal, 0), compare])
                .and_then([
                    TxnOp::put(
                        primary.as_str(),
                        self.node.as_str(),
                        Some(PutOptions::new().with_lease(self.lease)),
                    ),
                    TxnOp::put(in_sync.as_str(), me.as_str(), None),
                ]);
            let resp = client.txn(txn).await?;
            if !resp.succeeded() {
                let holder = client.get(primary.as_str(), None).await?;
                let holder = holder
                    .kvs()
                    .first()
                    .map(|kv| kv.value_str().unwrap_or("?").to_owned())
                    .unwrap_or_default();
                return Err(MembershipError::NotPrimary { nsid, holder });
            }
            Ok(Group {
                nsid,
                in_sync: vec![me],
                revision: resp.header().map_or(0, |h| h.revision()),
            })
        })
    }

    /// Whether `nsid` has a primary now (its key exists).
    ///
    /// # Errors
    /// `Etcd` when etcd cannot be reached.
    pub fn has_primary(&self, nsid: u32) -> Result<bool, MembershipError> {
        let key = self.key(nsid, "primary");
        let mut client = self.client.clone();
        self.rt
            .block_on(async { Ok(!client.get(key.as_str(), None).await?.kvs().is_empty()) })
    }

    /// Removes `node` from `group`'s in-sync set, in etcd first: the
    /// transaction holds only while this node holds the primary key under
    /// its lease and the set is still at `group.revision`. On success
    /// `group` is updated.
    ///
    /// # Errors
    /// `Lapsed` when the lease has lapsed, `Lost` when the conditions no
    /// longer held, `Etcd` when etcd cannot be reached.
    pub fn remove(&self, group: &mut Group, node: &str) -> Result<(), MembershipError> {
        let members: Vec<String> = group.in_sync.iter().filter(|m| node_of(m) != node).cloned().collect();
        self.change(group, members, format!("removing {node} from the in-sync set"))
    }

    /// Adds `node`, whose copy is `instance`, to `group`'s in-sync set,
    /// under the same conditions as [`Membership::remove`].
    ///
    /// # Errors
    /// As [`Membership::remove`].
    pub fn add(&self, group: &mut Group, node: &str, instance: &str) -> Result<(), MembershipError> {
        let mut members: Vec<String> = group.in_sync.iter().filter(|m| node_of(m) != node).cloned().collect();
        members.push(member(node, instance));
        self.change(group, members, format!("adding {node} to the in-sync set"))
    }

    fn change(&self, group: &mut Group, members: Vec<String>, what: String) -> Result<(), MembershipError> {
        if !self.is_live() {
            return Err(MembershipError::Lapsed);
        }
        let primary = self.key(group.nsid, "primary");
        let in_sync = self.key(group.nsid, "in_sync");
        let mut client = self.client.clone();
        let resp = self.rt.block_on(async {
            let txn = Txn::new()
                .when([
                    Compare::lease(primary.as_str(), CompareOp::Equal, self.lease),
                    Compare::value(primary.as_str(), CompareOp::Equal, self.node.as_str()),
                    Compare::mod_revision(in_sync.as_str(), CompareOp::Equal, group.revision),
                ])
                .and_then([TxnOp::put(in_sync.as_str(), members.join(","), None)]);
            client.txn(txn).await
        })?;
        if !resp.succeeded() {
            return Err(MembershipError::Lost { nsid: group.nsid, what });
        }
        group.revision = resp.header().map_or(group.revision, |h| h.revision());
        group.in_sync = members;
        Ok(())
    }

    /// The nodes of the in-sync set etcd holds for `nsid`, primary first
    /// (empty when there is none).
    ///
    /// # Errors
    /// `Etcd` when etcd cannot be reached.
    pub fn in_sync(&self, nsid: u32) -> Result<Vec<String>, MembershipError> {
        let key = self.key(nsid, "in_sync");
        let mut client = self.client.clone();
        self.rt.block_on(async {
            let resp = client.get(key.as_str(), None).await?;
            Ok(match resp.kvs().first() {
                Some(kv) => split(kv.value_str()?).iter().map(|m| node_of(m).to_owned()).collect(),
                None => Vec::new(),
            })
        })
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave();
    }
}

/// How long after sending a keep-alive that etcd answered with `ttl` this
/// node may still act on its lease: `ttl` less a tenth (at least 100 ms)
/// for clocks that run at different rates.
fn fence(ttl: Duration) -> Duration {
    ttl.saturating_sub((ttl / 10).max(Duration::from_millis(100)))
}

/// An in-sync set's entry: `NODE=INSTANCE`.
fn member(node: &str, instance: &str) -> String {
    format!("{node}={instance}")
}

/// The node of an in-sync set's entry.
pub fn node_of(member: &str) -> &str {
    member.split_once('=').map_or(member, |(n, _)| n)
}

fn split(v: &str) -> Vec<String> {
    v.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Renews the lease every third of its TTL. Each answer moves
/// `live_until`; an answer with no TTL (the lease is gone) fences the node
/// for good.
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration, live_until: Arc<Mutex<Instant>>) {
    let period = ttl / 3;
    loop {
        let renewed = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            loop {
                let sent = Instant::now();
                keeper.keep_alive().await?;
                match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                        *live_until.lock() = sent + fence(Duration::from_secs(resp.ttl() as u64));
                    }
                    Ok(Ok(Some(_))) => {
                        *live_until.lock() = Instant::now();
                        tracing::error!(
                            lease = format!("{lease:x}"),
                            "the membership lease expired in etcd: this node acknowledges no more writes"
                        );
                        return Ok::<bool, etcd_client::Error>(true);
                    }
                    Ok(Ok(None)) => return Ok(false),
                    Ok(Err(e)) => return Err(e),
                    // A late answer must not be taken for the next
                    // keep-alive's (it would date the lease too late): the
                    // stream is dropped and reopened.
                    Err(_) => {
                        tracing::warn!("etcd did not answer a keep-alive within {REQUEST_TIMEOUT:?}");
                        return Ok(false);
                    }
                }
                tokio::time::sleep(period).await;
            }
        };
        match renewed.await {
            Ok(true) => return,
            Ok(false) => tracing::warn!("etcd closed the keep-alive stream; reopening it"),
            Err(e) => tracing::warn!("etcd keep-alive: {e}; retrying"),
        }
        tokio::time::sleep(period.min(Duration::from_millis(500))).await;
    }
}
