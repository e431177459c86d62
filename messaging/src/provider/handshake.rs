//! Pieces every connection-oriented provider's listener shares: the hello
//! codec, the queue of connections whose hello passed, and
//! deadline-bounded reads for the hello itself.
//!
//! Every provider's hello (tcp, shm, and the verbs side channel) has the
//! same 16-byte little-endian header, then `len` bytes of body:
//!
//! ```text
//!  0  magic     4   the provider's (CHIO tcp, CHSM shm, CHIV verbs)
//!  4  version   2   must equal the provider's
//!  6  kind      2   HELLO 1, ACCEPT 2, REJECT 3 (verbs adds more)
//!  8  reserved  4   0
//! 12  len       4   body length, at most the provider's limit
//! ```

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::FabricError;

/// Size of a hello header.
pub(crate) const HELLO_HEADER: usize = 16;
/// The client's hello.
pub(crate) const KIND_HELLO: u16 = 1;
/// The listener's answer that accepts.
pub(crate) const KIND_ACCEPT: u16 = 2;
/// The listener's answer that refuses; the body is the reason.
pub(crate) const KIND_REJECT: u16 = 3;

/// One provider's hello: its magic, version and body limit, and the words
/// its errors use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HelloFormat {
    pub magic: [u8; 4],
    pub version: u16,
    /// Largest body accepted.
    pub max_body: usize,
    /// Who sends this magic, for "not a ... peer".
    pub peer: &'static str,
    /// What the message is called in errors ("hello", "exchange").
    pub what: &'static str,
}

/// Why a hello (or its answer) is refused: the reason a log and a REJECT
/// carry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    #[error("bad magic {magic:02x?} (not a {peer} peer)")]
    Magic { magic: [u8; 4], peer: &'static str },
    #[error("unsupported {what} version {got} (this side speaks {ours})")]
    Version { what: &'static str, got: u16, ours: u16 },
    #[error("reserved {what} field is {value:#x}, not 0")]
    Reserved { what: &'static str, value: u32 },
    #[error("{what} parameters too long ({len} > {max} bytes)")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{what} message too long (or too many descriptors)")]
    Oversized { what: &'static str },
    #[error("truncated {what} ({len} bytes)")]
    Truncated { what: &'static str, len: usize },
    #[error("{what} says {says} parameter bytes but carries {carries}")]
    LengthMismatch {
        what: &'static str,
        says: usize,
        carries: usize,
    },
    #[error("timed out reading {what} ({have} of {want} bytes)")]
    Timeout { what: String, have: usize, want: usize },
    #[error("truncated {what}: connection closed after {have} of {want} bytes")]
    Closed { what: String, have: usize, want: usize },
    #[error("reading {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// A checked hello header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HelloHeader {
    pub kind: u16,
    pub len: usize,
}

impl HelloFormat {
    /// A message of `kind` carrying `body`.
    pub(crate) fn encode(&self, kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_HEADER + body.len());
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Checks a header: magic, version, reserved field and length, in that
    /// order (a peer of another version may well send longer messages,
    /// and deserves the version reason rather than a length one).
    pub(crate) fn check(&self, header: &[u8; HELLO_HEADER]) -> Result<HelloHeader, HelloError> {
        let (what, max) = (self.what, self.max_body);
        if header[0..4] != self.magic {
            return Err(HelloError::Magic {
                magic: [header[0], header[1], header[2], header[3]],
                peer: self.peer,
            });
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != self.version {
            return Err(HelloError::Version {
                what,
                got: version,
                ours: self.version,
            });
        }
        let reserved = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if reserved != 0 {
            return Err(HelloError::Reserved { what, value: reserved });
        }
        let len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
        if len > max {
            return Err(HelloError::TooLong { what, len, max });
        }
        Ok(HelloHeader {
            kind: u16::from_le_bytes([header[6], header[7]]),
            len,
        })
    }

    /// Parses a whole message that arrived as one datagram.
    pub(crate) fn parse<'a>(&self, bytes: &'a [u8]) -> Result<(u16, &'a [u8]), HelloError> {
        let Some((header, body)) = bytes.split_first_chunk::<HELLO_HEADER>() else {
            return Err(HelloError::Truncated {
                what: self.what,
                len: bytes.len(),
            });
        };
        let h = self.check(header)?;
        if h.len != body.len() {
            return Err(HelloError::LengthMismatch {
                what: self.what,
                says: h.len,
                carries: body.len(),
            });
        }
        Ok((h.kind, body))
    }

    /// Reads and checks one message from a stream within `timeout` (a
    /// deadline for the whole message). When only the version is wrong and
    /// the length is within bounds, the body is read before the error
    /// returns, so that a REJECT sent then is not destroyed by a reset for
    /// unread data.
    pub(crate) fn read(&self, stream: &mut TcpStream, timeout: Duration) -> Result<(u16, Vec<u8>), HelloError> {
        let deadline = Instant::now() + timeout;
        let mut header = [0u8; HELLO_HEADER];
        read_exact_by(stream, &mut header, &format!("{} header", self.what), deadline)?;
        let checked = self.check(&header);
        let len = match &checked {
            Ok(h) => h.len,
            Err(_) if header[0..4] == self.magic => {
                let len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
                if len <= self.max_body {
                    len
                } else {
                    0
                }
            }
            Err(_) => 0,
        };
        let mut body = vec![0u8; len];
        read_exact_by(stream, &mut body, &format!("{} parameters", self.what), deadline)?;
        checked.map(|h| (h.kind, body))
    }
}

/// Connections whose hello was checked, waiting for `Listener::accept`.
pub(crate) struct AcceptQueue<T> {
    queue: Mutex<VecDeque<T>>,
    ready: Condvar,
    closed: AtomicBool,
    capacity: usize,
}

/// Why [`AcceptQueue::offer`] refused an item.
pub(crate) enum Refused<T> {
    /// The queue holds `capacity` items: answer the peer "busy".
    Full(T),
    /// The listener shut down.
    Closed,
}

impl<T> AcceptQueue<T> {
    pub(crate) fn new(capacity: usize) -> AcceptQueue<T> {
        AcceptQueue {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            closed: AtomicBool::new(false),
            capacity,
        }
    }

    /// Queues a checked connection for `take`.
    pub(crate) fn offer(&self, item: T) -> Result<(), Refused<T>> {
        let mut queue = self.queue.lock();
        if self.is_closed() {
            return Err(Refused::Closed);
        }
        if queue.len() >= self.capacity {
            return Err(Refused::Full(item));
        }
        queue.push_back(item);
        self.ready.notify_one();
        Ok(())
    }

    /// The next connection, waiting up to `timeout` (forever with `None`).
    pub(crate) fn take(&self, timeout: Option<Duration>) -> Result<T, FabricError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut queue = self.queue.lock();
        loop {
            if self.is_closed() {
                return Err(FabricError::Shutdown);
            }
            if let Some(item) = queue.pop_front() {
                return Ok(item);
            }
            match deadline {
                Some(d) => {
                    if self.ready.wait_until(&mut queue, d).timed_out() && queue.is_empty() {
                        return Err(FabricError::Timeout(timeout.unwrap_or_default()));
                    }
                }
                None => self.ready.wait(&mut queue),
            }
        }
    }

    /// Refuses everything from now on, wakes waiting `take`s and drops the
    /// queued connections.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let dropped: Vec<T> = self.queue.lock().drain(..).collect();
        self.ready.notify_all();
        drop(dropped);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Reads exactly `buf.len()` bytes before `deadline` (a deadline for the
/// whole read, not per `read()` call); the error is a reason for logs.
pub(crate) fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    what: &str,
    deadline: Instant,
) -> Result<(), HelloError> {
    let mut have = 0;
    while have < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let want = buf.len();
        let timed_out = || HelloError::Timeout {
            what: what.into(),
            have,
            want,
        };
        if left.is_zero() {
            return Err(timed_out());
        }
        stream.set_read_timeout(Some(left)).map_err(|source| HelloError::Io {
            what: what.into(),
            source,
        })?;
        match stream.read(&mut buf[have..]) {
            Ok(0) => {
                return Err(HelloError::Closed {
                    what: what.into(),
                    have,
                    want,
                })
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(timed_out())
            }
            Err(source) => {
                return Err(HelloError::Io {
                    what: what.into(),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: HelloFormat = HelloFormat {
        magic: *b"TEST",
        version: 2,
        max_body: 8,
        peer: "test",
        what: "hello",
    };

    #[test]
    fn hellos_round_trip_and_every_header_field_is_checked() {
        let msg = FORMAT.encode(KIND_ACCEPT, b"body");
        assert_eq!(msg.len(), HELLO_HEADER + 4);
        assert_eq!(FORMAT.parse(&msg).ok(), Some((KIND_ACCEPT, &b"body"[..])));
        let field = |at: usize, bytes: &[u8]| {
            FORMAT
                .parse(&field_bytes(&msg, at, bytes))
                .expect_err("refused")
                .to_string()
        };
        assert!(field(0, b"XXXX").starts_with("bad magic"));
        assert!(field(4, &3u16.to_le_bytes()).starts_with("unsupported hello version 3"));
        assert!(field(8, &1u32.to_le_bytes()).starts_with("reserved hello field"));
        assert!(field(12, &9u32.to_le_bytes()).starts_with("hello parameters too long (9 > 8"));
        assert!(field(12, &3u32.to_le_bytes()).contains("says 3 parameter bytes but carries 4"));
        // The version is judged before the length.
        let mut m = field_bytes(&msg, 4, &3u16.to_le_bytes());
        m[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(FORMAT.parse(&m), Err(HelloError::Version { got: 3, .. })));
        assert!(matches!(
            FORMAT.parse(&msg[..15]),
            Err(HelloError::Truncated { len: 15, .. })
        ));
    }

    fn field_bytes(msg: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut m = msg.to_vec();
        m[at..at + bytes.len()].copy_from_slice(bytes);
        m
    }

    #[test]
    fn queue_offers_takes_and_closes() {
        let q = AcceptQueue::new(1);
        assert!(q.offer(1).is_ok());
        assert!(matches!(q.offer(2), Err(Refused::Full(2))));
        assert_eq!(q.take(None).ok(), Some(1));
        assert!(matches!(
            q.take(Some(Duration::from_millis(10))),
            Err(FabricError::Timeout(_))
        ));
        q.close();
        assert!(matches!(q.offer(3), Err(Refused::Closed)));
        assert!(matches!(q.take(None), Err(FabricError::Shutdown)));
    }
}
