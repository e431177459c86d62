//! The `iounitd` configuration file (TOML).
//!
//! ```toml
//! nqn = "nqn.2026-11.io.chanio:iounit"     # subsystem NQN (optional)
//! listen = ["tcp://127.0.0.1:4520"]
//! allowed_hosts = []                       # host NQNs; empty allows any
//! max_io_queues = 8                        # per controller
//! max_queue_depth = 128                    # entries per queue
//! workers = 256                            # worker threads (one per queue)
//!
//! [[namespace]]
//! backend = "ram:64MiB"                    # NSID 1
//!
//! [[namespace]]
//! nsid = 3                                 # optional explicit NSID
//! backend = "file:/var/lib/chanio/disk.img:1GiB"
//! ```
//!
//! On SIGHUP the daemon re-reads the file and attaches or detaches
//! namespaces to match it (namespace hot-plug); other settings need a
//! restart.

use std::path::Path;

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
}

/// A loaded configuration: target settings plus the namespaces.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Target settings (with no namespaces: the daemon attaches them).
    pub target: TargetConfig,
    /// Namespaces in file order.
    pub namespaces: Vec<NamespaceEntry>,
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
    #[serde(default)]
    namespace: Vec<Namespace>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Namespace {
    nsid: Option<u32>,
    backend: String,
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
        namespaces.push(NamespaceEntry { nsid: ns.nsid, spec });
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
        },
        namespaces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "#,
            "test.toml",
        )
        .unwrap();
        assert_eq!(cfg.target.max_queue_depth, 64);
        assert_eq!(cfg.target.max_io_queues, 8);
        assert_eq!(cfg.target.workers, 16);
        assert_eq!(cfg.namespaces.len(), 2);
        assert_eq!(cfg.namespaces[1].nsid, Some(7));
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
