//! The `iounitd` configuration file (TOML).
//!
//! ```toml
//! nqn = "nqn.2026-11.io.chanio:iounit"     # subsystem NQN (optional)
//! listen = ["tcp://127.0.0.1:4520"]
//! allowed_hosts = []                       # host NQNs; empty allows any
//! max_io_queues = 8                        # per controller
//! max_queue_depth = 128                    # entries per queue
//! workers = 256                            # queues served at once
//! threads = 0                              # threads serving them (0: one per CPU)
//! max_controllers_per_host = 8             # controllers one host NQN may hold
//! max_connections_per_address = 256        # tcp connections from one address
//! max_windows_per_host = 64                # storage windows one host NQN holds
//! window_file_cache = false                # file windows as cached extents
//! shm_allow_uids = [1000]                  # users let in on shm:// listeners
//! shm_allow_gids = []                      # ... or groups (primary group)
//! shm_allow_any_user = false               # default: only the daemon's user
//!
//! [[namespace]]
//! backend = "ram:64MiB"                    # NSID 1
//!
//! [[namespace]]
//! nsid = 3                                 # optional explicit NSID
//! backend = "file:/var/lib/chanio/disk.img:1GiB"
//! hosts = ["nqn.2014-08.org.nvmexpress:uuid:..."]  # masking: only these
//!                                          # hosts see it (default: all)
//! replicas = ["a@tcp://10.0.0.1:4520", "b@tcp://10.0.0.2:4520"]
//!                                          # its replication group, the same
//!                                          # list on every member
//!
//! [replication]                            # needed by `replicas`
//! node = "a"                               # this node's name in the group
//! etcd = ["http://10.0.0.9:2379"]          # the membership store
//! lease_ttl = 5                            # seconds
//! etcd_prefix = "/chanio/<nqn>"            # optional
//! ```
//!
//! On SIGHUP the daemon re-reads the file and attaches or detaches
//! namespaces to match it (namespace hot-plug, [`plan_reload`]), except
//! that a RAM namespace is never replaced by another RAM spec at its NSID
//! (its data would be lost), and applies each namespace's `hosts`; other
//! settings need a restart.

use std::path::Path;

use messaging::provider::shm::ShmAccess;
use serde::Deserialize;

use crate::backend::BackendSpec;
use crate::target::{TargetConfig, DEFAULT_NQN};

/// A namespace entry: an optional NSID and a backend spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceEntry {
    /// Explicit namespace ID, or the lowest free one.
    pub nsid: Option<u32>,
    /// What stores it.
    pub spec: BackendSpec,
    /// The host NQNs that see it; empty: every allowed host.
    pub hosts: Vec<String>,
    /// Its replication group's members, `NODE@URI` (empty: not
    /// replicated).
    pub replicas: Vec<String>,
}

/// The `[replication]` table: this node's place in replication groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// This node's name.
    pub node: Option<String>,
    /// etcd endpoints.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// Lease time-to-live in seconds.
    pub lease_ttl: Option<u64>,
    /// Key prefix in etcd.
    pub etcd_prefix: Option<String>,
}

/// A loaded configuration: target settings plus the namespaces.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Target settings (with no namespaces: the daemon attaches them).
    pub target: TargetConfig,
    /// Namespaces in file order.
    pub namespaces: Vec<NamespaceEntry>,
    /// The `[replication]` table, if any.
    pub replication: ReplicationConfig,
}

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// Path.
        path: String,
        /// What is wrong, with the position.
        message: String,
    },
    /// A value is invalid.
    #[error("{path}: {message}")]
    Invalid {
        /// Path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    nqn: Option<String>,
    listen: Option<Vec<String>>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    max_io_queues: Option<u16>,
    max_queue_depth: Option<u16>,
    workers: Option<usize>,
    threads: Option<usize>,
    max_controllers_per_host: Option<usize>,
    max_connections_per_address: Option<usize>,
    max_windows_per_host: Option<usize>,
    #[serde(default)]
    window_file_cache: bool,
    #[serde(default)]
    shm_allow_uids: Vec<u32>,
    #[serde(default)]
    shm_allow_gids: Vec<u32>,
    #[serde(default)]
    shm_allow_any_user: bool,
    #[serde(default)]
    namespace: Vec<Namespace>,
    #[serde(default)]
    replication: ReplicationConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Namespace {
    nsid: Option<u32>,
    backend: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    replicas: Vec<String>,
}

/// Who may connect over shm: the users and groups listed, or, when none
/// is, the daemon's own user (the default), or everyone.
pub fn shm_access(uids: Vec<u32>, gids: Vec<u32>, any_user: bool) -> ShmAccess {
    if uids.is_empty() && gids.is_empty() {
        return ShmAccess {
            any_user,
            ..ShmAccess::own_user()
        };
    }
    ShmAccess { uids, gids, any_user }
}

/// Reads and validates a configuration file.
///
/// # Errors
/// Unreadable file, TOML syntax, unknown keys, bad backend specs.
pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text, &shown)
}

/// Parses configuration text (`origin` names it in errors).
///
/// # Errors
/// As [`load`].
pub fn parse(text: &str, origin: &str) -> Result<DaemonConfig, ConfigError> {
    let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_string(),
        message: e.to_string(),
    })?;
    let defaults = TargetConfig::default();
    let mut namespaces = Vec::new();
    for (i, ns) in file.namespace.iter().enumerate() {
        let spec: BackendSpec = ns.backend.parse().map_err(|m| ConfigError::Invalid {
            path: origin.to_string(),
            message: format!("namespace #{}: {m}", i + 1),
        })?;
        for r in &ns.replicas {
            if !r
                .split_once('@')
                .is_some_and(|(n, u)| !n.is_empty() && u.contains("://"))
            {
                return Err(ConfigError::Invalid {
                    path: origin.to_string(),
                    message: format!("namespace #{}: replica {r:?}: use NODE@URI", i + 1),
                });
            }
        }
        namespaces.push(NamespaceEntry {
            nsid: ns.nsid,
            spec,
            hosts: ns.hosts.clone(),
            replicas: ns.replicas.clone(),
        });
    }
    Ok(DaemonConfig {
        target: TargetConfig {
            nqn: file.nqn.unwrap_or_else(|| DEFAULT_NQN.into()),
            listen: file.listen.unwrap_or(defaults.listen),
            namespaces: Vec::new(),
            allowed_hosts: file.allowed_hosts,
            max_io_queues: file.max_io_queues.unwrap_or(defaults.max_io_queues),
            max_queue_depth: file.max_queue_depth.unwrap_or(defaults.max_queue_depth),
            workers: file.workers.unwrap_or(defaults.workers),
            threads: file.threads.unwrap_or(defaults.threads),
            max_controllers_per_host: file
                .max_controllers_per_host
                .unwrap_or(defaults.max_controllers_per_host),
            shm_access: shm_access(file.shm_allow_uids, file.shm_allow_gids, file.shm_allow_any_user),
            max_connections_per_address: file
                .max_connections_per_address
                .unwrap_or(defaults.max_connections_per_address),
            serial: None,
            max_windows_per_host: file.max_windows_per_host.unwrap_or(defaults.max_windows_per_host),
            window_file_cache: file.window_file_cache,
        },
        namespaces,
        replication: file.replication,
    })
}

/// What a reload changes: the namespaces to detach and the entries to
/// attach, in order, and the RAM namespaces it keeps because replacing
/// them would lose their data.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan<'a> {
    /// Attached namespaces no entry names any more.
    pub detach: Vec<u32>,
    /// Entries not attached yet.
    pub attach: Vec<&'a NamespaceEntry>,
    /// RAM namespaces that an entry with another RAM spec would take the
    /// place of (a resize): kept as they are, with that entry, which is not
    /// attached, and the reason for the operator.
    pub refused: Vec<(u32, &'a NamespaceEntry, String)>,
}

/// Plans a reload from the `attached` namespaces (NSID and spec) to the
/// `wanted` entries. An attached namespace stays when an entry names its
/// spec (and its NSID, if the entry gives one); the others are detached,
/// and entries left over are attached, each at its NSID or the lowest free
/// one. A RAM namespace is memory: detaching it discards its data. When an
/// entry with a RAM spec would land at the NSID of a RAM namespace being
/// detached, the reload is a resize that would lose that data, so the
/// namespace is kept and the entry is refused.
pub fn plan_reload<'a>(
    attached: &std::collections::BTreeMap<u32, BackendSpec>,
    wanted: &'a [NamespaceEntry],
) -> ReloadPlan<'a> {
    // One entry per namespace and one namespace per entry: two entries
    // with the same spec are two namespaces.
    let assigned = assign(attached, wanted);
    let mut plan = ReloadPlan::default();
    for &nsid in attached.keys() {
        if !assigned.contains_key(&nsid) {
            plan.detach.push(nsid);
        }
    }
    let mut occupied: std::collections::BTreeSet<u32> =
        attached.keys().filter(|n| !plan.detach.contains(n)).copied().collect();
    for w in wanted {
        if assigned.values().any(|a| std::ptr::eq(*a, w)) {
            continue;
        }
        let lands = w
            .nsid
            .unwrap_or_else(|| (1..).find(|n| !occupied.contains(n)).unwrap_or(u32::MAX));
        let replaced = attached
            .get(&lands)
            .filter(|old| plan.detach.contains(&lands) && is_ram(old) && is_ram(&w.spec));
        match replaced {
            Some(old) => {
                plan.detach.retain(|&n| n != lands);
                plan.refused.push((
                    lands,
                    w,
                    format!(
                        "namespace {lands}: replacing {old} with {} would discard its data (RAM); \
                         kept as it is. To resize it, remove it from the configuration and reload, \
                         then add the new size and reload again",
                        w.spec
                    ),
                ));
            }
            None => plan.attach.push(w),
        }
        occupied.insert(lands);
    }
    plan
}

/// Which entry of `wanted` each attached namespace is: an entry with an
/// NSID is the namespace at that NSID (when the spec matches); the others,
/// in file order, take the lowest attached NSID with their spec not taken
/// yet (the order in which they were attached). A namespace no entry
/// names is missing from the map.
pub fn assign<'a>(
    attached: &std::collections::BTreeMap<u32, BackendSpec>,
    wanted: &'a [NamespaceEntry],
) -> std::collections::BTreeMap<u32, &'a NamespaceEntry> {
    let mut out = std::collections::BTreeMap::new();
    for w in wanted {
        if let Some(nsid) = w.nsid {
            if attached.get(&nsid) == Some(&w.spec) {
                out.insert(nsid, w);
            }
        }
    }
    for w in wanted.iter().filter(|w| w.nsid.is_none()) {
        let free = attached
            .iter()
            .find(|(nsid, spec)| **spec == w.spec && !out.contains_key(*nsid))
            .map(|(nsid, _)| *nsid);
        if let Some(nsid) = free {
            out.insert(nsid, w);
        }
    }
    out
}

fn is_ram(spec: &BackendSpec) -> bool {
    matches!(spec, BackendSpec::Ram { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_comes_from_its_table_and_each_namespace_s_replicas() {
        let cfg = parse(
            "[replication]\nnode = \"a\"\netcd = [\"http://10.0.0.9:2379\"]\nlease_ttl = 3\n\n\
             [[namespace]]\nbackend = \"ram:1MiB\"\nreplicas = [\"a@tcp://10.0.0.1:4520\", \"b@tcp://10.0.0.2:4520\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(cfg.replication.node.as_deref(), Some("a"));
        assert_eq!(cfg.replication.etcd, ["http://10.0.0.9:2379"]);
        assert_eq!(cfg.replication.lease_ttl, Some(3));
        assert_eq!(cfg.namespaces[0].replicas.len(), 2);
        for bad in [
            "replicas = [\"b\"]",
            "replicas = [\"@tcp://x:1\"]",
            "replicas = [\"b@x\"]",
        ] {
            let text = format!("[[namespace]]\nbackend = \"ram:1MiB\"\n{bad}\n");
            assert!(parse(&text, "t").is_err(), "{bad} parsed");
        }
        assert!(parse("[replication]\nnodes = \"a\"\n", "t").is_err());
    }

    fn entries(list: &[(Option<u32>, &str)]) -> Vec<NamespaceEntry> {
        list.iter()
            .map(|&(nsid, spec)| NamespaceEntry {
                nsid,
                spec: spec.parse().expect("spec"),
                hosts: Vec::new(),
                replicas: Vec::new(),
            })
            .collect()
    }

    fn attached(list: &[(u32, &str)]) -> std::collections::BTreeMap<u32, BackendSpec> {
        list.iter().map(|&(n, spec)| (n, spec.parse().expect("spec"))).collect()
    }

    #[test]
    fn a_reload_never_replaces_a_ram_namespace() {
        let now = attached(&[(1, "ram:1MiB"), (2, "ram:2MiB")]);
        // The same namespaces: nothing to do.
        let same = entries(&[(None, "ram:1MiB"), (None, "ram:2MiB")]);
        assert_eq!(plan_reload(&now, &same), ReloadPlan::default());
        // Namespace 2 removed: detached (its data is discarded, as asked).
        let fewer = entries(&[(None, "ram:1MiB")]);
        let plan = plan_reload(&now, &fewer);
        assert_eq!((plan.detach, plan.attach.len(), plan.refused.len()), (vec![2], 0, 0));
        // Namespace 1 resized, with or without its NSID: refused, kept.
        for resized in [
            entries(&[(None, "ram:4MiB"), (None, "ram:2MiB")]),
            entries(&[(Some(1), "ram:4MiB"), (None, "ram:2MiB")]),
        ] {
            let plan = plan_reload(&now, &resized);
            assert!(plan.detach.is_empty() && plan.attach.is_empty(), "{plan:?}");
            assert_eq!(plan.refused.len(), 1);
            assert_eq!(plan.refused[0].0, 1);
            assert!(plan.refused[0].2.contains("discard"), "{}", plan.refused[0].2);
        }
        // A new RAM namespace elsewhere is attached as usual.
        let more = entries(&[(None, "ram:1MiB"), (None, "ram:2MiB"), (Some(5), "ram:4MiB")]);
        let plan = plan_reload(&now, &more);
        assert_eq!((plan.detach.len(), plan.attach.len(), plan.refused.len()), (0, 1, 0));
        // A file may take a RAM namespace's place: the file keeps its data.
        let file = entries(&[(Some(1), "file:/tmp/x.img:1MiB"), (None, "ram:2MiB")]);
        let plan = plan_reload(&now, &file);
        assert_eq!((plan.detach, plan.attach.len(), plan.refused.len()), (vec![1], 1, 0));
    }

    #[test]
    fn each_namespace_is_matched_to_one_entry() {
        let now = attached(&[(1, "ram:1MiB"), (2, "ram:1MiB"), (7, "ram:2MiB")]);
        let mut wanted = entries(&[(None, "ram:1MiB"), (None, "ram:1MiB"), (Some(7), "ram:2MiB")]);
        wanted[1].hosts = vec!["nqn.2026-11.io.chanio:b".into()];
        let map = assign(&now, &wanted);
        assert!(std::ptr::eq(map[&1], &wanted[0]) && std::ptr::eq(map[&2], &wanted[1]));
        assert!(std::ptr::eq(map[&7], &wanted[2]));
        // An entry whose spec changed names no namespace.
        let changed = entries(&[(None, "ram:1MiB"), (Some(7), "ram:4MiB")]);
        let map = assign(&now, &changed);
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn entries_with_one_spec_are_as_many_namespaces() {
        let now = attached(&[(1, "ram:1MiB")]);
        let want = entries(&[(None, "ram:1MiB"), (None, "ram:1MiB")]);
        let plan = plan_reload(&now, &want);
        assert!(plan.detach.is_empty() && plan.refused.is_empty());
        assert_eq!(plan.attach.len(), 1, "the second entry is a second namespace");
        assert!(std::ptr::eq(plan.attach[0], &want[1]));
        // And back: one entry keeps one of the two.
        let now = attached(&[(1, "ram:1MiB"), (2, "ram:1MiB")]);
        let plan = plan_reload(&now, &want[..1]);
        assert!(plan.attach.is_empty());
        assert_eq!(plan.detach, vec![2]);
    }

    #[test]
    fn the_packaged_example_parses() {
        let cfg = parse(include_str!("../../packaging/iounitd.toml"), "packaging/iounitd.toml").unwrap();
        assert_eq!(cfg.target.listen.len(), 2);
        assert_eq!(cfg.namespaces.len(), 2);
        assert_eq!(cfg.namespaces[1].nsid, Some(2));
    }

    #[test]
    fn full_file_parses() {
        let cfg = parse(
            r#"
            nqn = "nqn.2026-11.io.chanio:test"
            listen = ["tcp://127.0.0.1:0"]
            allowed_hosts = ["nqn.2026-11.io.chanio:host1"]
            max_queue_depth = 64
            workers = 16
            [[namespace]]
            backend = "ram:16MiB"
            [[namespace]]
            nsid = 7
            backend = "ram:1MiB:4096"
            hosts = ["nqn.2026-11.io.chanio:host1"]
            "#,
            "test.toml",
        )
        .unwrap();
        assert_eq!(cfg.target.max_queue_depth, 64);
        assert_eq!(cfg.target.max_io_queues, 8);
        assert_eq!(cfg.target.workers, 16);
        assert_eq!(cfg.namespaces.len(), 2);
        assert_eq!(cfg.namespaces[1].nsid, Some(7));
        assert!(cfg.namespaces[0].hosts.is_empty(), "unmasked by default");
        assert_eq!(cfg.namespaces[1].hosts, ["nqn.2026-11.io.chanio:host1"]);
    }

    #[test]
    fn mistakes_are_reported_with_context() {
        let e = parse("listen = 5", "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:"), "{e}");
        let e = parse("lisen = []", "x.toml").unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = parse("[[namespace]]\nbackend = \"ram:lots\"", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("namespace #1"), "{e}");
    }
}
