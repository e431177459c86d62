//! The host library's error type.
//!
//! ```text
//! HostError
//!  ├── InvalidUri, InvalidArgument     refused before anything was sent
//!  ├── Connect { uri, stage }          ── source: the HostError of that stage
//!  ├── Nvme { command, status }        the I/O unit completed the command with an error
//!  ├── Timeout { command, after }      no completion in time
//!  ├── ConnectionLost { uri, waited }  the channels failed and did not come back in time
//!  ├── Protocol                        the I/O unit broke the transport binding
//!  ├── Closed                          Host::close was called
//!  └── Messaging, Memory, Decode       lower layers
//! ```

use std::time::Duration;

use messaging::mr::MrError;
use nvme::{NvmeError, Status};

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// A target URI that cannot be used.
    #[error("invalid target URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument refused before any command was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Setting up the controller or one of its queues failed.
    #[error("connecting to {uri} failed ({stage})")]
    Connect {
        /// The target URI.
        uri: String,
        /// The step that failed ("admin queue", "I/O queue 2", ...).
        stage: String,
        /// Why.
        #[source]
        source: Box<HostError>,
    },
    /// The I/O unit completed the command with an error status.
    #[error("{command} failed: {status}")]
    Nvme {
        /// The command ("Read", "Identify", ...).
        command: &'static str,
        /// The completion status (SCT, SC, DNR).
        status: Status,
    },
    /// The command did not complete within the command timeout.
    #[error("{command} timed out after {after:?}")]
    Timeout {
        /// The command.
        command: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection to the I/O unit was lost and could not be re-established
    /// within the reconnect deadline.
    #[error("connection to {uri} lost and not re-established within {waited:?}")]
    ConnectionLost {
        /// The target URI.
        uri: String,
        /// The reconnect deadline that expired.
        waited: Duration,
    },
    /// The I/O unit broke chanio's NVMe transport binding.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The host was closed.
    #[error("the host connection is closed")]
    Closed,
    /// A storage window is gone: closed, revoked by the I/O unit, or lost
    /// with its queue's connection. Open a new one.
    #[error("the storage window is gone: {0}")]
    WindowClosed(String),
    /// The messaging layer failed.
    #[error(transparent)]
    Messaging(#[from] messaging::Error),
    /// Registering buffers failed.
    #[error("registering buffers")]
    Memory(#[from] MrError),
    /// An NVMe structure could not be built or decoded.
    #[error("invalid NVMe data")]
    Decode(#[from] NvmeError),
    /// Starting a background thread failed.
    #[error("starting thread {name}")]
    Thread {
        /// The thread's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl HostError {
    /// The NVMe status, when the I/O unit completed the command with an
    /// error (also through [`HostError::Connect`]).
    pub fn status(&self) -> Option<Status> {
        match self {
            HostError::Nvme { status, .. } => Some(*status),
            HostError::Connect { source, .. } => source.status(),
            _ => None,
        }
    }

    /// Whether the error is a timeout (also through [`HostError::Connect`]).
    pub fn is_timeout(&self) -> bool {
        match self {
            HostError::Timeout { .. } => true,
            HostError::Connect { source, .. } => source.is_timeout(),
            _ => false,
        }
    }

    pub(crate) fn connect(uri: &str, stage: impl Into<String>, source: HostError) -> HostError {
        HostError::Connect {
            uri: uri.to_string(),
            stage: stage.into(),
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvme_errors_read_as_words() {
        let e = HostError::Nvme {
            command: "Read",
            status: Status::LBA_OUT_OF_RANGE,
        };
        assert_eq!(e.to_string(), "Read failed: LBA Out of Range (SCT 0h, SC 80h)");
        assert_eq!(e.status(), Some(Status::LBA_OUT_OF_RANGE));
        let c = HostError::connect(
            "tcp://127.0.0.1:1",
            "admin queue",
            HostError::Nvme {
                command: "Connect",
                status: Status::CONNECT_INVALID_HOST,
            },
        );
        assert_eq!(c.to_string(), "connecting to tcp://127.0.0.1:1 failed (admin queue)");
        assert_eq!(c.status(), Some(Status::CONNECT_INVALID_HOST));
        let source = std::error::Error::source(&c).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some("Connect failed: Connect Invalid Host (SCT 1h, SC 84h)")
        );
    }

    #[test]
    fn timeouts_are_recognised() {
        let t = HostError::Timeout {
            command: "Flush",
            after: Duration::from_secs(2),
        };
        assert!(t.is_timeout());
        assert_eq!(t.to_string(), "Flush timed out after 2s");
        assert!(HostError::connect("x", "y", t).is_timeout());
        assert!(!HostError::Closed.is_timeout());
    }
}
