//! Running under a service manager: readiness and state notifications
//! (the `sd_notify` protocol of systemd's `Type=notify` units).
//!
//! The manager names a Unix datagram socket in `NOTIFY_SOCKET` (a path,
//! or an abstract name written with a leading `@`); each notification is
//! one datagram of `KEY=VALUE` lines. Without the variable nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The variable that names the manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A state change the manager is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// Started: listening, namespaces attached.
    Ready {
        /// A line for `systemctl status`.
        status: &'a str,
    },
    /// Re-reading the configuration (SIGHUP); `Ready` follows.
    Reloading,
    /// Draining in-flight commands before it exits.
    Stopping,
}

impl State<'_> {
    /// The datagram for this state.
    fn message(self) -> String {
        match self {
            State::Ready { status } => format!("READY=1\nSTATUS={status}\nMAINPID={}\n", std::process::id()),
            State::Reloading => format!("RELOADING=1\nMONOTONIC_USEC={}\n", monotonic_usec()),
            State::Stopping => "STOPPING=1\n".into(),
        }
    }
}

/// Tells the service manager about `state`; `Ok(false)` when no manager
/// listens (`NOTIFY_SOCKET` unset).
///
/// # Errors
/// The socket cannot be reached.
pub fn notify(state: State<'_>) -> io::Result<bool> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    let socket = UnixDatagram::unbound()?;
    let message = state.message();
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(message.as_bytes(), &target)?;
        }
    }
    Ok(true)
}

/// `CLOCK_MONOTONIC` in microseconds, as `RELOADING=1` wants it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_follow_the_protocol() {
        let ready = State::Ready {
            status: "serving 2 namespaces",
        }
        .message();
        assert!(ready.starts_with("READY=1\nSTATUS=serving 2 namespaces\nMAINPID="));
        let reloading = State::Reloading.message();
        let usec: u64 = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|r| r.trim_end().parse().ok())
            .expect("a number of microseconds");
        assert!(usec > 0);
        assert_eq!(State::Stopping.message(), "STOPPING=1\n");
    }
}
