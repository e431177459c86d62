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
/// A replica whose connection dropped has this long to come back before
/// the commands waiting for it fail.
const REPLICA_RECONNECT: Duration = Duration::from_secs(1);

struct Replica {
    node: String,
    host: Host,
}

struct State {
    group: Group,
    replicas: Vec<Replica>,
}

/// A namespace replicated to other I/O units (see the module docs).
pub struct ReplicatedBackend {
    local: Arc<dyn BlockBackend>,
    nsid: u32,
    block_size: u64,
    membership: Arc<Membership>,
    state: Mutex<State>,
}

impl fmt::Debug for ReplicatedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicatedBackend")
            .field("nsid", &self.nsid)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// The host NQN a primary connects to its replicas with.
pub fn replication_hostnqn(node: &str) -> String {
    format!("nqn.2026-11.io.chanio:replication:{node}")
}

impl ReplicatedBackend {
    /// Makes this node the primary of `nsid`, served from `local`, with
    /// `replicas`: claims the namespace in etcd, then connects to each
    /// replica in the in-sync set. A replica that cannot be reached, or
    /// whose namespace does not match, leaves the in-sync set at once.
    ///
    /// # Errors
    /// `Open` when the claim fails (another primary, this node not in
    /// sync, etcd unreachable) or a replica cannot be dropped.
    pub fn start(
        local: Arc<dyn BlockBackend>,
        nsid: u32,
        replicas: &[ReplicaSpec],
        membership: Arc<Membership>,
    ) -> Result<ReplicatedBackend, BlockError> {
        let nodes: Vec<String> = replicas.iter().map(|r| r.node.clone()).collect();
        let group = membership
            .claim(nsid, &nodes)
            .map_err(|e| BlockError::with_source(ErrorKind::Open, "replication", e))?;
        let geo = local.geometry();
        let backend = ReplicatedBackend {
            local,
            nsid,
            block_size: u64::from(geo.block_size),
            membership,
            state: Mutex::new(State {
                group: group.clone(),
                replicas: Vec::new(),
            }),
        };
        for spec in replicas {
            if !group.in_sync.contains(&spec.node) {
                tracing::warn!(
                    nsid,
                    replica = %spec.node,
                    "replica out of sync: it gets no writes until it is resynchronised"
                );
                continue;
            }
            match connect(spec, backend.membership.node(), geo) {
                Ok(host) => {
                    tracing::info!(nsid, replica = %spec.node, uri = %spec.uri, "replica in sync");
                    backend.state.lock().replicas.push(Replica {
                        node: spec.node.clone(),
                        host,
                    });
                }
                Err(e) => backend.drop_replica(&spec.node, &e)?,
            }
        }
        Ok(backend)
    }

    /// The in-sync set as this primary last confirmed it in etcd.
    pub fn in_sync(&self) -> Vec<String> {
        self.state.lock().group.in_sync.clone()
    }

    /// Fails unless this node may acknowledge writes.
    fn live(&self) -> Result<(), BlockError> {
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

    /// Runs `op` on every in-sync replica; each one that fails leaves the
    /// in-sync set (in etcd) before this returns.
    fn forward(&self, what: &str, op: impl Fn(&Host, Nsid) -> Result<(), HostError>) -> Result<(), BlockError> {
        let targets: Vec<(String, Host)> = {
            let st = self.state.lock();
            st.replicas.iter().map(|r| (r.node.clone(), r.host.clone())).collect()
        };
        for (node, host) in targets {
            if let Err(e) = op(&host, Nsid(self.nsid)) {
                let why = format!("{what}: {e}");
                self.drop_replica(&node, &why)?;
            }
        }
        Ok(())
    }

    /// Takes `node` out of the in-sync set, in etcd first; the write that
    /// found it failed is acknowledged only if that succeeded.
    fn drop_replica(&self, node: &str, why: &dyn fmt::Display) -> Result<(), BlockError> {
        let mut st = self.state.lock();
        if !st.group.in_sync.iter().any(|m| m == node) {
            st.replicas.retain(|r| r.node != node);
            return Ok(());
        }
        match self.membership.remove(&mut st.group, node) {
            Ok(()) => {
                tracing::warn!(
                    nsid = self.nsid,
                    replica = node,
                    in_sync = ?st.group.in_sync,
                    "replica left the in-sync set ({why}); writes go on degraded"
                );
                if let Some(i) = st.replicas.iter().position(|r| r.node == node) {
                    st.replicas.remove(i).host.close();
                }
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

    fn lba(&self, offset: u64) -> u64 {
        offset / self.block_size
    }

    fn blocks(&self, len: u64) -> u64 {
        len / self.block_size
    }
}

/// Connects to one replica and checks its namespace can hold this one.
fn connect(spec: &ReplicaSpec, node: &str, geo: Geometry) -> Result<Host, String> {
    let opts = HostOptions {
        hostnqn: replication_hostnqn(node),
        command_timeout: REPLICA_COMMAND_TIMEOUT,
        reconnect_deadline: REPLICA_RECONNECT,
        connect_timeout: REPLICA_COMMAND_TIMEOUT,
        ..HostOptions::default()
    };
    let host = Host::connect(&spec.uri, opts).map_err(|e| format!("cannot connect to {}: {e}", spec.uri))?;
    let info = host
        .namespaces()
        .map_err(|e| format!("{}: {e}", spec.uri))?
        .into_iter()
        .find(|n| n.nsid == Nsid(spec.nsid))
        .ok_or_else(|| format!("{} serves no namespace {}", spec.uri, spec.nsid))?;
    if info.block_size != geo.block_size || info.blocks < geo.blocks {
        host.close();
        return Err(format!(
            "{} namespace {}: {} blocks of {} bytes cannot hold {} blocks of {}",
            spec.uri, spec.nsid, info.blocks, info.block_size, geo.blocks, geo.block_size
        ));
    }
    Ok(host)
}

impl BlockIo for ReplicatedBackend {
    fn describe(&self) -> String {
        format!(
            "{} replicated (in sync: {})",
            self.local.describe(),
            self.in_sync().join(",")
        )
    }

    fn geometry(&self) -> Geometry {
        self.local.geometry()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.local.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        self.live()?;
        self.local.write(offset, data, fua)?;
        let lba = self.lba(offset);
        self.forward("write", |h, ns| h.write(ns, lba, data, fua))?;
        self.live()
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.live()?;
        self.local.flush()?;
        self.forward("flush", |h, ns| h.flush(ns))?;
        self.live()
    }

    /// Every command runs on a blocking thread: a write waits for the
    /// replicas.
    fn may_block(&self) -> bool {
        true
    }

    // No `files` and no `window_memory`: every write must come through
    // `write`, never straight to the local storage.
}

impl WriteZeroes for ReplicatedBackend {
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.live()?;
        self.local.write_zeroes(offset, len)?;
        let (lba, blocks) = (self.lba(offset), self.blocks(len));
        self.forward("write zeroes", |h, ns| h.write_zeroes(ns, lba, blocks))?;
        self.live()
    }
}

impl Discard for ReplicatedBackend {
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.live()?;
        self.local.discard(offset, len)?;
        let (lba, blocks) = (self.lba(offset), self.blocks(len));
        self.forward("deallocate", |h, ns| h.trim(ns, lba, blocks))?;
        self.live()
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
