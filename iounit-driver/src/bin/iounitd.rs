//! `iounitd`: the chanio I/O-unit daemon. Parses arguments and runs the
//! library's target; all behaviour lives in the `iounit` crate.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use iounit::backend::{self, BackendSpec, BlockBackend};
use iounit::config::{self, DaemonConfig, NamespaceEntry};
use iounit::identity::Identity;
use iounit::replica::membership::Membership;
use iounit::replica::{self, ReplicaSpec, ReplicatedBackend, Role};
use iounit::service;
use iounit::target::{Target, TargetConfig};

/// The chanio I/O-unit daemon: serves NVMe namespaces to hosts over
/// push-push channels (NVMe capsules, RDMA-style writes with immediate data).
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "\
Namespaces (SPEC):
  ram:SIZE[:BS]               memory, e.g. ram:64MiB or ram:1GiB:4096
  file:PATH[:SIZE[:BS]]       a file or block device through io_uring (O_DIRECT where
                              supported); a missing file is created at SIZE
  clone:BASE:PATH[:BS]        a thin clone of the read-only image BASE: reads go through
                              to BASE until written; PATH (+ PATH.map, PATH.log) keeps
                              the clone's own 64 KiB clusters, created at once if missing
                              (paths may not contain ':')
  BS is the logical block size, 512 (default) or 4096; on a block device at least
  the device's own (file:/dev/nvme0n1 on a 4K-sector drive serves 4096).

Identity: the serial number and each file namespace's NGUID and UUID are kept in
--state FILE (default: beside --config), so hosts see the same device after a restart.

Examples:
  iounitd --listen tcp://127.0.0.1:4520 --ns ram:64MiB
  iounitd --listen tcp://0.0.0.0:4520 --ns ram:64MiB --ns file:/srv/disk.img:1GiB
  iounitd --listen tcp://0.0.0.0:4520 --ns clone:/srv/golden.img:/srv/vm1.img \
          --ns clone:/srv/golden.img:/srv/vm2.img
  iounitd --config /etc/chanio/iounit.toml
  iounitd --listen tcp://0.0.0.0:4520 --ns ram:1GiB --node a --etcd http://10.0.0.9:2379 \
          --replica 1=b@tcp://10.0.0.2:4520
          (primary of namespace 1, replicated synchronously to node b, membership in etcd)

Signals: SIGINT/SIGTERM drain in-flight I/O and exit; SIGHUP re-reads --config and
attaches or detaches namespaces to match it (hosts receive an asynchronous event);
a RAM namespace is never replaced by one of another size, which would discard its
data (remove it in one reload, add the new size in the next).
Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more.

Under systemd (Type=notify, packaging/iounitd.service) it reports READY=1 once it
listens with its namespaces attached, RELOADING=1 around a SIGHUP and STOPPING=1
when it drains; without NOTIFY_SOCKET nothing is sent."
)]
struct Args {
    /// Configuration file (TOML); command-line options override it.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, repeatable: tcp://HOST:PORT, rdma://HOST:PORT, shm://NAME, or auto://HOST:PORT (every usable fabric at once).
    #[arg(long = "listen", value_name = "URI")]
    listen: Vec<String>,
    /// Namespace to serve, repeatable; NSIDs 1, 2, ... in order (see below).
    #[arg(long = "ns", value_name = "SPEC")]
    namespaces: Vec<String>,
    /// Subsystem NQN hosts must name.
    #[arg(long, value_name = "NQN")]
    nqn: Option<String>,
    /// Host NQN allowed to connect, repeatable (default: any host).
    #[arg(long = "allow-host", value_name = "NQN")]
    allow_hosts: Vec<String>,
    /// Most I/O queues per connected host.
    #[arg(long, value_name = "N")]
    max_io_queues: Option<u16>,
    /// Most entries per queue.
    #[arg(long, value_name = "N")]
    queue_depth: Option<u16>,
    /// Queues served at once (default 256); a Connect beyond it gets
    /// Controller Busy.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Threads that serve the queues, each many of them (default: one per
    /// CPU).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Controllers one host NQN may hold at once (default 8).
    #[arg(long, value_name = "N")]
    max_controllers_per_host: Option<usize>,
    /// Connections one source address may hold on tcp:// listeners at once
    /// (default 256); a further one is refused with the reason.
    #[arg(long, value_name = "N")]
    max_connections_per_address: Option<usize>,
    /// User ID let in on shm:// listeners, repeatable (default: only the
    /// user iounitd runs as; checked with SO_PEERCRED).
    #[arg(long = "shm-allow-uid", value_name = "UID")]
    shm_allow_uids: Vec<u32>,
    /// Group ID let in on shm:// listeners (the connecting process's
    /// primary group), repeatable.
    #[arg(long = "shm-allow-gid", value_name = "GID")]
    shm_allow_gids: Vec<u32>,
    /// Let every local user in on shm:// listeners.
    #[arg(long)]
    shm_allow_any_user: bool,
    /// Log lines on stderr: text (coloured only on a terminal, so journald
    /// and files get none), plain text, or one JSON object per line.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "auto")]
    log_format: LogFormat,
    /// Write the daemon's process ID here once it listens; removed when it
    /// stops cleanly.
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Keep the identity hosts see (serial number, each file namespace's
    /// NGUID and UUID) in FILE, so that a restart keeps it. Default: beside
    /// --config, with the extension .state; without --config, a new
    /// identity at every start.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// A member of namespace NSID's replication group: node NODE serves
    /// it at URI (a namespace at least as large, same block size);
    /// repeatable, the same list on every member (this node's own entry
    /// is skipped). The member that claims the namespace in etcd first is
    /// its primary; the others are replicas, masked to the primary, and
    /// take over when it goes. Needs --etcd and --node.
    #[arg(long = "replica", value_name = "NSID=NODE@URI", help_heading = "Replication")]
    replicas: Vec<ReplicaSpec>,
    /// etcd endpoint holding the replication membership (who is primary,
    /// which replicas are in sync), repeatable: http://HOST:PORT.
    #[arg(long = "etcd", value_name = "URL", help_heading = "Replication")]
    etcd: Vec<String>,
    /// This node's name in the replication membership (unique per cluster).
    #[arg(long, value_name = "NAME", help_heading = "Replication")]
    node: Option<String>,
    /// Lease time-to-live in etcd: a primary that cannot renew its lease
    /// stops acknowledging writes before it ends (default 5).
    #[arg(long, value_name = "SECS", help_heading = "Replication")]
    lease_ttl: Option<u64>,
    /// Key prefix of the membership in etcd (default: /chanio/ and the
    /// subsystem NQN).
    #[arg(long, value_name = "PREFIX", help_heading = "Replication")]
    etcd_prefix: Option<String>,
}

/// Replication of this node's namespaces: its etcd session and its
/// replicas, when any are configured.
struct Replication {
    membership: Option<Arc<Membership>>,
    replicas: Vec<ReplicaSpec>,
    /// The replicated namespaces, for the status log page.
    backends: Arc<parking_lot::Mutex<Vec<std::sync::Weak<ReplicatedBackend>>>>,
}

impl Replication {
    /// Joins etcd when a namespace has replicas (`--replica`, or
    /// `replicas` in the config file); options override `[replication]`.
    fn start(args: &Args, cfg: &DaemonConfig) -> Res<Replication> {
        let file = &cfg.replication;
        let nqn = &cfg.target.nqn;
        let wanted = !args.replicas.is_empty() || cfg.namespaces.iter().any(|n| !n.replicas.is_empty());
        let etcd = if args.etcd.is_empty() {
            file.etcd.clone()
        } else {
            args.etcd.clone()
        };
        let node = args.node.clone().or_else(|| file.node.clone());
        let lease_ttl = args.lease_ttl.or(file.lease_ttl).unwrap_or(5);
        let etcd_prefix = args.etcd_prefix.clone().or_else(|| file.etcd_prefix.clone());
        if !wanted {
            if !etcd.is_empty() {
                tracing::warn!("etcd given, but no namespace has replicas: none is replicated");
            }
            return Ok(Replication {
                membership: None,
                replicas: Vec::new(),
                backends: Arc::default(),
            });
        }
        if etcd.is_empty() {
            return Err("replicas need etcd (--etcd, or etcd in [replication]) and a node name".into());
        }
        let Some(node) = node else {
            return Err("replicas need this node's name (--node, or node in [replication])".into());
        };
        if lease_ttl < 2 {
            return Err("lease TTL: use at least 2 seconds".into());
        }
        let prefix = etcd_prefix.unwrap_or_else(|| format!("/chanio/{nqn}"));
        let membership = Membership::join(&etcd, &prefix, &node, Duration::from_secs(lease_ttl))
            .map_err(|e| format!("replication: joining etcd at {}: {e}", etcd.join(", ")))?;
        Ok(Replication {
            membership: Some(Arc::new(membership)),
            replicas: args.replicas.clone(),
            backends: Arc::default(),
        })
    }

    /// Has `target` report each replicated namespace's state in the
    /// vendor log page C0h (`hostctl status`).
    fn report_to(&self, target: &Target) {
        if self.membership.is_none() {
            return;
        }
        let backends = self.backends.clone();
        target.set_replication_status(Arc::new(move || {
            backends
                .lock()
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .map(|b| b.status())
                .collect()
        }));
    }

    /// `backend` as namespace `nsid` (its copy named `instance`, served
    /// to `hosts`, with `listed` members from the config file):
    /// replicated when it has members. As a replica it is masked to the
    /// other members' replication NQNs; as primary, to `hosts`.
    fn wrap(
        &self,
        target: &Target,
        nsid: u32,
        backend: Arc<dyn BlockBackend>,
        instance: &str,
        hosts: &[String],
        listed: &[String],
    ) -> Res<Arc<dyn BlockBackend>> {
        let mut members: Vec<ReplicaSpec> = self.replicas.iter().filter(|r| r.nsid == nsid).cloned().collect();
        for m in listed {
            let spec: ReplicaSpec = format!("{nsid}={m}")
                .parse()
                .map_err(|e| format!("namespace {nsid}: {e}"))?;
            if !members.iter().any(|x| x.node == spec.node) {
                members.push(spec);
            }
        }
        let Some(membership) = &self.membership else {
            return Ok(backend);
        };
        if members.is_empty() {
            return Ok(backend);
        }
        let me = membership.node().to_owned();
        let peers: Vec<String> = members
            .iter()
            .filter(|m| m.node != me)
            .map(|m| replica::replication_hostnqn(&m.node))
            .collect();
        let (target, hosts) = (target.clone(), hosts.to_vec());
        // A replica shows the namespace to the other members' replication
        // connections only. Taking over, it first refuses them (a deposed
        // primary's late writes), then, once primary, shows it to hosts.
        let on_role = Box::new(move |role: Role| {
            let masked = match role {
                Role::Replica => target
                    .set_namespace_refused(nsid, &[])
                    .and_then(|()| target.set_namespace_hosts(nsid, &peers)),
                Role::TakingOver => target.set_namespace_refused(nsid, &peers),
                Role::Primary => target.set_namespace_hosts(nsid, &hosts),
            };
            if let Err(e) = masked {
                tracing::error!(nsid, "cannot mask the namespace for its role ({role:?}): {e}");
            }
        });
        let replicated = Arc::new(ReplicatedBackend::start(
            backend,
            nsid,
            instance,
            &members,
            membership.clone(),
            on_role,
        )?);
        let mut backends = self.backends.lock();
        backends.retain(|b| b.strong_count() > 0);
        backends.push(Arc::downgrade(&replicated));
        Ok(replicated)
    }
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Text, coloured when stderr is a terminal.
    Auto,
    /// Text without colours.
    Text,
    /// One JSON object per line.
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(false).init(),
        LogFormat::Auto => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// The pidfile, removed when the daemon stops cleanly.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &Path) -> Res<PidFile> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write the pidfile {}: {e}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args = Args::parse();
    init_logging(args.log_format);
    if let Err(e) = run(args) {
        eprintln!("iounitd: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(1);
    }
}

fn settings(args: &Args) -> Res<DaemonConfig> {
    let mut cfg = match &args.config {
        Some(path) => config::load(path)?,
        None => DaemonConfig {
            target: TargetConfig::default(),
            namespaces: Vec::new(),
            replication: Default::default(),
        },
    };
    if !args.listen.is_empty() {
        cfg.target.listen = args.listen.clone();
    }
    if !args.namespaces.is_empty() {
        cfg.namespaces = args
            .namespaces
            .iter()
            .map(|s| {
                s.parse::<BackendSpec>()
                    .map(|spec| NamespaceEntry {
                        nsid: None,
                        spec,
                        hosts: Vec::new(),
                        replicas: Vec::new(),
                    })
                    .map_err(|m| format!("--ns {s}: {m}"))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(nqn) = &args.nqn {
        cfg.target.nqn = nqn.clone();
    }
    if !args.allow_hosts.is_empty() {
        cfg.target.allowed_hosts = args.allow_hosts.clone();
    }
    if let Some(n) = args.max_io_queues {
        cfg.target.max_io_queues = n;
    }
    if let Some(n) = args.queue_depth {
        cfg.target.max_queue_depth = n;
    }
    if let Some(n) = args.workers {
        cfg.target.workers = n;
    }
    if let Some(n) = args.threads {
        cfg.target.threads = n;
    }
    if let Some(n) = args.max_controllers_per_host {
        cfg.target.max_controllers_per_host = n;
    }
    if let Some(n) = args.max_connections_per_address {
        cfg.target.max_connections_per_address = n;
    }
    if !args.shm_allow_uids.is_empty() || !args.shm_allow_gids.is_empty() || args.shm_allow_any_user {
        cfg.target.shm_access = config::shm_access(
            args.shm_allow_uids.clone(),
            args.shm_allow_gids.clone(),
            args.shm_allow_any_user,
        );
    }
    if cfg.namespaces.is_empty() {
        tracing::warn!("no namespaces configured (use --ns ram:64MiB or a [[namespace]] in --config)");
    }
    Ok(cfg)
}

fn run(args: Args) -> Res<()> {
    let mut cfg = settings(&args)?;
    let mut identity = identity(&args)?;
    cfg.target.serial = Some(identity.serial().to_string());
    let replication = Replication::start(&args, &cfg)?;
    let target = Target::start(cfg.target.clone())?;
    replication.report_to(&target);
    let mut attached = BTreeMap::new();
    for ns in &cfg.namespaces {
        attach(&target, &mut identity, &replication, ns, &mut attached)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
    // Each of those signals also writes a byte here, so that the main
    // thread sleeps until one comes instead of waking up to look.
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::low_level::pipe::register(sig, wake_tx.try_clone()?)?;
    }
    drop(wake_tx);
    let _pidfile = args.pidfile.as_deref().map(PidFile::write).transpose()?;
    {
        let mut out = std::io::stdout().lock();
        for uri in target.local_uris() {
            writeln!(out, "listening on {uri}")?;
        }
        out.flush()?;
    }
    tell_manager(service::State::Ready {
        status: &status_line(&target, attached.len()),
    });
    while !stop.load(Ordering::Acquire) {
        // A signal that came before this read left its byte: no wake-up is
        // lost between the check above and the read.
        let mut bytes = [0u8; 16];
        match (&wake_rx).read(&mut bytes) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("waiting for signals: {e}").into()),
        }
        if reload.swap(false, Ordering::AcqRel) {
            tell_manager(service::State::Reloading);
            match &args.config {
                Some(path) => match config::load(path) {
                    Ok(new) => resync(&target, &mut identity, &replication, &new.namespaces, &mut attached),
                    Err(e) => tracing::error!("reload failed, keeping the current namespaces: {e}"),
                },
                None => tracing::warn!("SIGHUP ignored: no --config file to reload"),
            }
            tell_manager(service::State::Ready {
                status: &status_line(&target, attached.len()),
            });
        }
    }
    tell_manager(service::State::Stopping);
    target.shutdown();
    // A clean stop hands a primary's namespaces over at once, instead of
    // when its lease would have ended.
    if let Some(m) = &replication.membership {
        m.leave();
    }
    Ok(())
}

/// Tells a service manager (systemd `Type=notify`) what the daemon does;
/// a manager that cannot be reached is logged, never fatal.
fn tell_manager(state: service::State<'_>) {
    if let Err(e) = service::notify(state) {
        tracing::warn!("cannot notify the service manager ({}): {e}", service::NOTIFY_SOCKET);
    }
}

/// The status line a service manager shows.
fn status_line(target: &Target, namespaces: usize) -> String {
    format!("serving {namespaces} namespaces on {}", target.local_uris().join(", "))
}

/// Attaches `ns`, masked first (so that it never shows to a host it is
/// masked from): at its NSID, or the lowest one free.
/// The identity to report: kept in `--state`, or beside `--config`, or
/// new at every start.
fn identity(args: &Args) -> Res<Identity> {
    let path = match (&args.state, &args.config) {
        (Some(state), _) => Some(state.clone()),
        (None, Some(config)) => Some(config.with_extension("state")),
        (None, None) => None,
    };
    let identity = match path {
        Some(path) => Identity::load(&path)?,
        None => {
            tracing::info!(
                "no --state or --config: the serial number and namespace identifiers are new at every start"
            );
            Identity::ephemeral()
        }
    };
    tracing::info!(serial = identity.serial(), state = ?identity.path(), "identity");
    Ok(identity)
}

fn attach(
    target: &Target,
    identity: &mut Identity,
    replication: &Replication,
    ns: &NamespaceEntry,
    attached: &mut BTreeMap<u32, BackendSpec>,
) -> Res<u32> {
    let backend = backend::open(&ns.spec).map_err(|e| format!("namespace {}: {e}", ns.spec))?;
    let nsid = ns
        .nsid
        .unwrap_or_else(|| (1..).find(|n| !attached.contains_key(n)).unwrap_or(u32::MAX));
    // Opened, so a file given by a relative path or a link resolves.
    let backing = match &ns.spec {
        BackendSpec::File { path, .. } | BackendSpec::Clone { path, .. } => {
            Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()))
        }
        BackendSpec::Ram { .. } => None,
    };
    let ids = identity
        .namespace(nsid, backing.as_deref())
        .map_err(|e| format!("namespace {}: {e}", ns.spec))?;
    target.set_namespace_ids(nsid, ids);
    target.set_namespace_hosts(nsid, &ns.hosts)?;
    let instance = nvme::descriptors::uuid_text(&ids.uuid);
    let backend = match replication.wrap(target, nsid, backend, &instance, &ns.hosts, &ns.replicas) {
        Ok(b) => b,
        Err(e) => {
            target.set_namespace_hosts(nsid, &[])?;
            return Err(e);
        }
    };
    if let Err(e) = target.registry().attach(Some(nsid), backend) {
        target.set_namespace_hosts(nsid, &[])?;
        return Err(format!("namespace {}: {e}", ns.spec).into());
    }
    attached.insert(nsid, ns.spec.clone());
    Ok(nsid)
}

/// Makes the attached namespaces match `wanted` (`config::plan_reload`):
/// never by replacing a RAM namespace, whose data that would discard.
fn resync(
    target: &Target,
    identity: &mut Identity,
    replication: &Replication,
    wanted: &[NamespaceEntry],
    attached: &mut BTreeMap<u32, BackendSpec>,
) {
    let plan = config::plan_reload(attached, wanted);
    // A namespace kept because its replacement was refused takes the
    // hosts of the entry that wanted to replace it: a mask is never lost
    // by a refused reload.
    let mut kept_hosts: BTreeMap<u32, &[String]> = BTreeMap::new();
    for (nsid, w, why) in &plan.refused {
        tracing::error!("reload: {why}");
        kept_hosts.insert(*nsid, &w.hosts);
    }
    for nsid in plan.detach {
        let ram = matches!(attached.get(&nsid), Some(BackendSpec::Ram { .. }));
        match target.registry().detach(nsid, Duration::from_secs(30)) {
            Ok(_) if ram => tracing::warn!(nsid, "namespace detached by reload; its RAM data is discarded"),
            Ok(_) => tracing::info!(nsid, "namespace detached by reload"),
            Err(e) => tracing::warn!(nsid, "detach: {e}"),
        }
        attached.remove(&nsid);
        if let Err(e) = target.set_namespace_hosts(nsid, &[]) {
            tracing::warn!(nsid, "unmask: {e}");
        }
    }
    for w in plan.attach {
        match attach(target, identity, replication, w, attached) {
            Ok(nsid) => tracing::info!(nsid, spec = %w.spec, "namespace attached by reload"),
            Err(e) => tracing::error!("{e}"),
        }
    }
    // Namespaces kept as they were take the hosts the file names now.
    let assigned = config::assign(attached, wanted);
    for &nsid in attached.keys() {
        let hosts = match assigned.get(&nsid) {
            Some(w) => &w.hosts[..],
            None => kept_hosts.get(&nsid).copied().unwrap_or_default(),
        };
        if let Err(e) = target.set_namespace_hosts(nsid, hosts) {
            tracing::error!(nsid, "reload: {e}");
        }
    }
}
