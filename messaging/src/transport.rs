//! Transport addresses and fabric selection.
//!
//! | address | fabric |
//! |---|---|
//! | `tcp://HOST:PORT` | [`tcp`](crate::provider::tcp): RDMA semantics over TCP, everywhere |
//! | `rdma://HOST:PORT` | [`verbs`](crate::provider) (cargo feature `verbs`): RDMA NICs and soft-RoCE |
//! | `shm://NAME` | shared memory between processes of one host |
//! | `loopback://NAME` | in-process (tests and demos) |
//! | `auto://HOST:PORT`, or `HOST:PORT` with no scheme | the best fabric both ends have, see below |
//!
//! **Auto selection.** A listener on `auto://HOST:PORT` listens on every
//! fabric this process can use: tcp on `HOST:PORT`, verbs (when a device
//! is usable) with its out-of-band exchange on `HOST:PORT+1`, and shm (when
//! built) under the name `auto-PORT`. A client tries them best first and
//! keeps the first that answers: verbs when it has a usable device itself,
//! then shm when `HOST` is an address of this machine, then tcp. So the two
//! ends agree on verbs when both have a device on the same fabric, on shm
//! when they share a host, and on tcp otherwise. The chosen fabric is
//! logged and reported by [`Endpoint::fabric`].

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::provider::handshake::{AcceptQueue, Refused};
use crate::provider::loopback::LoopbackFabric;
use crate::provider::tcp::TcpFabric;
use crate::provider::{Fabric, FabricError, Incoming, Listener};
use crate::{Config, Endpoint, Error};

/// A transport scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `tcp://`
    Tcp,
    /// `rdma://` (the verbs provider)
    Rdma,
    /// `shm://`
    Shm,
    /// `loopback://`
    Loopback,
    /// `auto://` (and no scheme)
    Auto,
}

impl Scheme {
    /// The scheme as written in addresses.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Rdma => "rdma",
            Scheme::Shm => "shm",
            Scheme::Loopback => "loopback",
            Scheme::Auto => "auto",
        }
    }

    /// The scheme of a fabric provider's name (`Endpoint::fabric`).
    pub fn of_fabric(name: &str) -> Option<Scheme> {
        Some(match name {
            "tcp" => Scheme::Tcp,
            "verbs" => Scheme::Rdma,
            "shm" => Scheme::Shm,
            "loopback" => Scheme::Loopback,
            _ => return None,
        })
    }
}

/// A parsed transport address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransportUri {
    /// The transport.
    pub scheme: Scheme,
    /// What follows `scheme://`: `HOST:PORT` or a name.
    pub addr: String,
}

impl TransportUri {
    /// Parses `scheme://addr` or a bare `HOST:PORT` (auto).
    ///
    /// # Errors
    /// [`FabricError::BadAddress`] naming the problem.
    pub fn parse(text: &str) -> Result<TransportUri, FabricError> {
        let bad = |reason: &str| FabricError::BadAddress {
            addr: text.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, addr) = match text.split_once("://") {
            Some((s, a)) => (s.to_ascii_lowercase(), a.trim_end_matches('/')),
            None => ("auto".to_string(), text),
        };
        let scheme = match scheme.as_str() {
            "tcp" => Scheme::Tcp,
            "rdma" => Scheme::Rdma,
            "shm" => Scheme::Shm,
            "loopback" => Scheme::Loopback,
            "auto" => Scheme::Auto,
            other => {
                return Err(bad(&format!(
                    "unknown transport {other:?} (use tcp://, rdma://, shm://, auto:// or HOST:PORT)"
                )))
            }
        };
        if addr.is_empty() {
            return Err(bad("missing address"));
        }
        if matches!(scheme, Scheme::Tcp | Scheme::Rdma | Scheme::Auto) && !has_port(addr) {
            return Err(bad("expected HOST:PORT"));
        }
        Ok(TransportUri {
            scheme,
            addr: addr.to_string(),
        })
    }
}

fn has_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

impl FromStr for TransportUri {
    type Err = FabricError;
    fn from_str(s: &str) -> Result<TransportUri, FabricError> {
        TransportUri::parse(s)
    }
}

impl fmt::Display for TransportUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.addr)
    }
}

/// The fabrics of one process, each created on first use (one protection
/// domain each). Share one `Fabrics` between the channels that must share
/// memory registrations (all queues of one host, say).
#[derive(Default)]
pub struct Fabrics {
    tcp: OnceLock<TcpFabric>,
    loopback: OnceLock<LoopbackFabric>,
    #[cfg(target_os = "linux")]
    shm: OnceLock<crate::provider::shm::ShmFabric>,
    #[cfg(feature = "verbs")]
    verbs: OnceLock<Result<crate::provider::verbs::VerbsFabric, String>>,
    /// How long a connect may take on every fabric made from now on.
    connect_timeout: Option<Duration>,
}

impl Fabrics {
    /// No fabric opened yet.
    pub fn new() -> Fabrics {
        Fabrics::default()
    }

    /// As [`Fabrics::new`], with options for the tcp fabric.
    pub fn with_tcp_options(opts: crate::provider::tcp::TcpOptions) -> Fabrics {
        let fabrics = Fabrics::default();
        let _ = fabrics.tcp.set(TcpFabric::with_options(opts));
        fabrics
    }

    /// This set of fabrics, each fabric it makes from now on giving up a
    /// connect (the transport connection and the hello's answer) after
    /// `timeout`, whatever the provider.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Fabrics {
        self.connect_timeout = Some(timeout);
        self
    }

    /// This set of fabrics, its shm fabric made with `opts` (who may
    /// connect to its listeners, among others).
    #[cfg(target_os = "linux")]
    pub fn with_shm_options(self, opts: crate::provider::shm::ShmOptions) -> Fabrics {
        let _ = self.shm.set(crate::provider::shm::ShmFabric::with_options(opts));
        self
    }

    /// The fabric for `scheme` (not `Auto`).
    ///
    /// # Errors
    /// [`FabricError::Unavailable`] when this build or machine lacks it.
    pub fn fabric(&self, scheme: Scheme) -> Result<&dyn Fabric, FabricError> {
        match scheme {
            Scheme::Tcp => Ok(self.tcp.get_or_init(|| {
                let mut opts = crate::provider::tcp::TcpOptions::default();
                if let Some(t) = self.connect_timeout {
                    opts.connect_timeout = t;
                }
                TcpFabric::with_options(opts)
            })),
            Scheme::Loopback => Ok(self.loopback.get_or_init(LoopbackFabric::new)),
            Scheme::Rdma => self.verbs(),
            Scheme::Shm => self.shm(),
            Scheme::Auto => Err(FabricError::BadAddress {
                addr: "auto://".into(),
                reason: "auto is a selection, not a fabric".into(),
            }),
        }
    }

    #[cfg(target_os = "linux")]
    fn shm(&self) -> Result<&dyn Fabric, FabricError> {
        Ok(self.shm.get_or_init(|| {
            let mut opts = crate::provider::shm::ShmOptions::default();
            if let Some(t) = self.connect_timeout {
                opts.connect_timeout = t;
            }
            crate::provider::shm::ShmFabric::with_options(opts)
        }))
    }

    #[cfg(not(target_os = "linux"))]
    fn shm(&self) -> Result<&dyn Fabric, FabricError> {
        Err(FabricError::Unavailable {
            provider: "shm",
            reason: "the shm provider needs Linux (memfd, eventfd); use tcp://".into(),
        })
    }

    #[cfg(feature = "verbs")]
    fn verbs(&self) -> Result<&dyn Fabric, FabricError> {
        match self.verbs.get_or_init(|| {
            let opened = crate::provider::verbs::VerbsOptions::from_env().and_then(|mut opts| {
                if let Some(t) = self.connect_timeout {
                    opts.connect_timeout = t;
                }
                crate::provider::verbs::VerbsFabric::open(opts)
            });
            opened.map_err(|e| match e {
                FabricError::Unavailable { reason, .. } => reason,
                other => other.to_string(),
            })
        }) {
            Ok(f) => Ok(f),
            Err(reason) => Err(FabricError::Unavailable {
                provider: "verbs",
                reason: reason.clone(),
            }),
        }
    }

    #[cfg(not(feature = "verbs"))]
    fn verbs(&self) -> Result<&dyn Fabric, FabricError> {
        Err(FabricError::Unavailable {
            provider: "verbs",
            reason: "this build has no RDMA support; rebuild with the `verbs` feature (`cargo install chanio-iounit --features verbs`, likewise chanio-host; `--features chanio/verbs` in the workspace; see docs/soft-roce.md)".into(),
        })
    }

    /// Listens on `uri`; `auto://` listens on every usable fabric at once.
    ///
    /// # Errors
    /// Address, bind or availability errors.
    pub fn listen(&self, uri: &TransportUri) -> Result<Box<dyn Listener>, FabricError> {
        match uri.scheme {
            Scheme::Auto => {
                let tcp = self.fabric(Scheme::Tcp)?.listen(&uri.addr)?;
                let local = tcp.local_addr();
                let mut parts: Vec<(Scheme, Box<dyn Listener>)> = vec![(Scheme::Tcp, tcp)];
                if let Some(addr) = shifted_port(&local, 1) {
                    match self.fabric(Scheme::Rdma).and_then(|f| f.listen(&addr)) {
                        Ok(l) => parts.push((Scheme::Rdma, l)),
                        Err(e) => tracing::debug!("auto listener without verbs: {e}"),
                    }
                }
                if let Some(port) = port_of(&local) {
                    match self.fabric(Scheme::Shm).and_then(|f| f.listen(&format!("auto-{port}"))) {
                        Ok(l) => parts.push((Scheme::Shm, l)),
                        Err(e) => tracing::debug!("auto listener without shm: {e}"),
                    }
                }
                let names: Vec<&str> = parts.iter().map(|(s, _)| s.as_str()).collect();
                tracing::info!(%local, fabrics = ?names, "auto listener up");
                Ok(Box::new(MultiListener::start(local, parts)?))
            }
            scheme => self.fabric(scheme)?.listen(&uri.addr),
        }
    }

    /// Connects to `uri` with `cfg`; `auto://` tries verbs, shm and tcp in
    /// that order and keeps the first that answers (see the module docs).
    ///
    /// # Errors
    /// The error of the last fabric tried.
    pub fn connect(&self, uri: &TransportUri, cfg: Config) -> Result<Endpoint, Error> {
        if uri.scheme != Scheme::Auto {
            return Endpoint::connect(self.fabric(uri.scheme)?, &uri.addr, cfg);
        }
        let mut last = None;
        for candidate in self.auto_candidates(&uri.addr) {
            let fabric = match self.fabric(candidate.scheme) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!("auto: {} unavailable: {e}", candidate.scheme.as_str());
                    continue;
                }
            };
            match Endpoint::connect(fabric, &candidate.addr, cfg.clone()) {
                Ok(ep) => {
                    tracing::info!(chosen = %candidate, "auto transport selection");
                    return Ok(ep);
                }
                Err(e) => {
                    tracing::debug!("auto: {candidate} failed: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::Fabric(FabricError::BadAddress {
                addr: uri.to_string(),
                reason: "no usable transport".into(),
            })
        }))
    }

    /// The concrete addresses `auto://addr` may reach, best first.
    pub fn auto_candidates(&self, addr: &str) -> Vec<TransportUri> {
        let mut out = Vec::new();
        if self.fabric(Scheme::Rdma).is_ok() {
            if let Some(a) = shifted_port(addr, 1) {
                out.push(TransportUri {
                    scheme: Scheme::Rdma,
                    addr: a,
                });
            }
        }
        if is_local(addr) && self.fabric(Scheme::Shm).is_ok() {
            if let Some(port) = port_of(addr) {
                out.push(TransportUri {
                    scheme: Scheme::Shm,
                    addr: format!("auto-{port}"),
                });
            }
        }
        out.push(TransportUri {
            scheme: Scheme::Tcp,
            addr: addr.to_string(),
        });
        out
    }
}

impl fmt::Debug for Fabrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fabrics")
            .field("tcp", &self.tcp.get().is_some())
            .field("loopback", &self.loopback.get().is_some())
            .finish_non_exhaustive()
    }
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

fn shifted_port(addr: &str, by: u16) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{host}:{}", port.checked_add(by)?))
}

/// Whether `addr`'s host is this machine: a loopback address or one
/// assigned to a local interface (found by binding to it).
fn is_local(addr: &str) -> bool {
    let Ok(mut addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs.any(|sa: SocketAddr| {
        let ip = sa.ip();
        ip.is_loopback() || ip.is_unspecified() || bindable(ip)
    })
}

fn bindable(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// A listener over several fabrics: one thread per fabric feeds one queue.
struct MultiListener {
    local: String,
    queue: Arc<AcceptQueue<Box<dyn Incoming>>>,
    parts: Vec<Arc<dyn Listener>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl MultiListener {
    fn start(local: String, parts: Vec<(Scheme, Box<dyn Listener>)>) -> Result<MultiListener, FabricError> {
        let queue = Arc::new(AcceptQueue::new(128));
        let mut listeners = Vec::new();
        let mut threads = Vec::new();
        for (scheme, l) in parts {
            let l: Arc<dyn Listener> = Arc::from(l);
            let (q, part) = (queue.clone(), l.clone());
            let t = std::thread::Builder::new()
                .name(format!("chanio-auto-{}", scheme.as_str()))
                .spawn(move || {
                    while !q.is_closed() {
                        match part.accept(Some(Duration::from_millis(200))) {
                            Ok(incoming) => match q.offer(incoming) {
                                Ok(()) => {}
                                Err(Refused::Full(i)) => i.reject("too many pending connections"),
                                Err(Refused::Closed) => return,
                            },
                            Err(FabricError::Timeout(_)) => {}
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|source| FabricError::Io {
                    op: "spawn accept thread",
                    source,
                })?;
            listeners.push(l);
            threads.push(t);
        }
        Ok(MultiListener {
            local,
            queue,
            parts: listeners,
            threads: Mutex::new(threads),
        })
    }
}

impl fmt::Debug for MultiListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiListener")
            .field("local", &self.local)
            .field("fabrics", &self.parts.len())
            .finish()
    }
}

impl Listener for MultiListener {
    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn accept(&self, timeout: Option<Duration>) -> Result<Box<dyn Incoming>, FabricError> {
        self.queue.take(timeout)
    }

    fn shutdown(&self) {
        self.queue.close();
        for p in &self.parts {
            p.shutdown();
        }
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for MultiListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "verbs"))]
    #[test]
    fn rdma_without_the_verbs_feature_names_the_feature_to_build_with() {
        let e = Fabrics::new().fabric(Scheme::Rdma).expect_err("no verbs in this build");
        let text = e.to_string();
        assert!(text.contains("--features verbs"), "{text}");
        assert!(text.contains("cargo install chanio-iounit"), "{text}");
    }

    #[test]
    fn addresses_parse() {
        let u = TransportUri::parse("tcp://127.0.0.1:4520").unwrap();
        assert_eq!((u.scheme, u.addr.as_str()), (Scheme::Tcp, "127.0.0.1:4520"));
        assert_eq!(TransportUri::parse("127.0.0.1:1").unwrap().scheme, Scheme::Auto);
        assert_eq!(TransportUri::parse("shm://unit0").unwrap().to_string(), "shm://unit0");
        assert_eq!(TransportUri::parse("RDMA://[::1]:9/").unwrap().addr, "[::1]:9");
        for bad in ["ftp://x:1", "tcp://", "tcp://host", "auto://:5", "localhost"] {
            assert!(TransportUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_falls_back_to_tcp_when_shm_is_not_listening() {
        let fabrics = Fabrics::new();
        // A plain tcp listener: no shm listener under auto-PORT.
        let listener = fabrics.fabric(Scheme::Tcp).unwrap().listen("127.0.0.1:0").unwrap();
        let addr = listener.local_addr();
        std::thread::scope(|s| {
            let server = s.spawn(|| {
                let incoming = listener.accept(Some(Duration::from_secs(20))).unwrap();
                Endpoint::accept_incoming(incoming, Config::default()).unwrap()
            });
            let client = fabrics
                .connect(&TransportUri::parse(&addr).unwrap(), Config::default())
                .unwrap();
            assert_eq!(client.fabric(), "tcp");
            assert_eq!(server.join().unwrap().fabric(), "tcp");
        });
    }

    #[test]
    fn local_hosts_are_recognised() {
        assert!(is_local("127.0.0.1:1"));
        assert!(is_local("localhost:1"));
        assert!(!is_local("192.0.2.1:1"), "TEST-NET-1 is not ours");
        assert_eq!(shifted_port("127.0.0.1:4520", 1).as_deref(), Some("127.0.0.1:4521"));
        assert_eq!(shifted_port("h:65535", 1), None);
    }

    #[test]
    fn auto_picks_shm_on_one_host() {
        let fabrics = Fabrics::new();
        let listener = fabrics
            .listen(&TransportUri::parse("auto://127.0.0.1:0").unwrap())
            .unwrap();
        let addr = listener.local_addr();
        std::thread::scope(|s| {
            let server = s.spawn(|| {
                let incoming = listener.accept(Some(Duration::from_secs(20))).unwrap();
                Endpoint::accept_incoming(incoming, Config::default()).unwrap()
            });
            let client = fabrics
                .connect(&TransportUri::parse(&addr).unwrap(), Config::default())
                .unwrap();
            let server = server.join().unwrap();
            // Both ends share this host: shm (no verbs device here).
            assert_eq!(client.fabric(), "shm");
            assert_eq!(server.fabric(), "shm");
            client.send(b"chosen").unwrap();
            assert_eq!(&server.recv_timeout(Duration::from_secs(20)).unwrap()[..], b"chosen");
        });
    }
}
