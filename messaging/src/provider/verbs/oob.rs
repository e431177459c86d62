//! The out-of-band connection exchange over TCP, as perftest does it: each
//! side sends what its queue pair needs to reach the other (QP number, PSN,
//! LID, GID, MTU, RDMA Read depth) together with the opaque hello
//! parameters. The connection stays open afterwards as a side channel that
//! carries DISCONNECT, so that a failure or a disconnect on one side moves
//! the other side's queue pair to the error state too (what RDMA CM's
//! DREQ does), and a peer that dies is noticed by its EOF.
//!
//! Every message is `"CHIV" | version u16 | kind u16 | reserved u32 | len
//! u32 | body[len]` (little-endian, the tcp provider's hello layout with its
//! own magic). HELLO (client) and ACCEPT (server) carry a 32-byte endpoint
//! followed by the parameters; REJECT carries a reason; READY (client, once
//! its queue pair is ready to send) and DISCONNECT are empty.
//!
//! ```text
//!  client                                   server
//!  QP → INIT, post receives ── HELLO ──▶    check hello, queue Incoming
//!                                           accept: QP → INIT, post receives,
//!                            ◀── ACCEPT ──  QP → RTR → RTS
//!  QP → RTR → RTS            ── READY ──▶   queue pair handed out
//!  queue pair handed out
//!        ... later, either way:  DISCONNECT or EOF → peer's QP → ERR
//! ```

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::device::Endpoint;

/// Magic of the verbs exchange ("chanio verbs").
pub const MAGIC: [u8; 4] = *b"CHIV";
/// Exchange version this build speaks.
pub const VERSION: u16 = 1;
/// Largest parameter block accepted.
pub const MAX_PARAMS: usize = 4096;

pub(super) const KIND_HELLO: u16 = 1;
pub(super) const KIND_ACCEPT: u16 = 2;
pub(super) const KIND_REJECT: u16 = 3;
pub(super) const KIND_READY: u16 = 4;
pub(super) const KIND_DISCONNECT: u16 = 5;

const HEADER: usize = 16;
const ENDPOINT: usize = 32;

/// Encodes one message.
pub(super) fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// A HELLO or ACCEPT body: the endpoint, then the parameters.
pub(super) fn endpoint_body(ep: &Endpoint, params: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENDPOINT + params.len());
    out.extend_from_slice(&ep.qpn.to_le_bytes());
    out.extend_from_slice(&ep.psn.to_le_bytes());
    out.extend_from_slice(&ep.lid.to_le_bytes());
    out.push(ep.mtu);
    out.push(ep.read_depth);
    out.extend_from_slice(&ep.gid);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(params);
    out
}

/// Splits and checks a HELLO or ACCEPT body.
pub(super) fn parse_endpoint(body: &[u8]) -> Result<(Endpoint, Vec<u8>), String> {
    if body.len() < ENDPOINT {
        return Err(format!("endpoint truncated ({} of {ENDPOINT} bytes)", body.len()));
    }
    let le32 = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let mut gid = [0u8; 16];
    gid.copy_from_slice(&body[12..28]);
    let ep = Endpoint {
        qpn: le32(0),
        psn: le32(4),
        lid: u16::from_le_bytes([body[8], body[9]]),
        mtu: body[10],
        read_depth: body[11],
        gid,
    };
    if ep.qpn > 0xff_ffff || ep.psn > 0xff_ffff {
        return Err(format!("QP number {:#x} or PSN {:#x} exceeds 24 bits", ep.qpn, ep.psn));
    }
    if !(1..=5).contains(&ep.mtu) {
        return Err(format!("path MTU code {} is not 1..=5", ep.mtu));
    }
    if ep.read_depth == 0 {
        return Err("RDMA Read depth 0".into());
    }
    if body[28..32] != [0; 4] {
        return Err("reserved endpoint bytes are not zero".into());
    }
    Ok((ep, body[ENDPOINT..].to_vec()))
}

/// Reads one message within `timeout` (for the whole message); the error
/// is a reason for logs.
pub(super) fn read_message(stream: &mut TcpStream, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
    let deadline = Instant::now() + timeout;
    let mut header = [0u8; HEADER];
    read_exact(stream, &mut header, "exchange header", deadline)?;
    if header[0..4] != MAGIC {
        return Err(format!("bad magic {:02x?} (not a chanio verbs peer)", &header[0..4]));
    }
    let len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    if len > MAX_PARAMS + ENDPOINT {
        return Err(format!("exchange message too long ({len} bytes)"));
    }
    let mut body = vec![0u8; len];
    read_exact(stream, &mut body, "exchange body", deadline)?;
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(format!(
            "unsupported exchange version {version} (this side speaks {VERSION})"
        ));
    }
    if header[8..12] != [0; 4] {
        return Err("reserved header field is not 0".into());
    }
    Ok((u16::from_le_bytes([header[6], header[7]]), body))
}

fn read_exact(stream: &mut TcpStream, buf: &mut [u8], what: &str, deadline: Instant) -> Result<(), String> {
    let mut have = 0;
    while have < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("timed out reading {what} ({have} of {} bytes)", buf.len()));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("reading {what}: {e}"))?;
        match stream.read(&mut buf[have..]) {
            Ok(0) => {
                return Err(format!(
                    "connection closed after {have} of {} bytes of {what}",
                    buf.len()
                ))
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(format!("timed out reading {what} ({have} of {} bytes)", buf.len()))
            }
            Err(e) => return Err(format!("reading {what}: {e}")),
        }
    }
    Ok(())
}

/// Writes one message (blocking socket).
pub(super) fn write_message(stream: &mut TcpStream, kind: u16, body: &[u8]) -> io::Result<()> {
    stream.write_all(&message(kind, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trip_and_checks() {
        let ep = Endpoint {
            qpn: 0x12_3456,
            psn: 0xab_cdef,
            lid: 7,
            mtu: 3,
            read_depth: 16,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1],
        };
        let body = endpoint_body(&ep, b"params");
        assert_eq!(parse_endpoint(&body), Ok((ep, b"params".to_vec())));
        let mut bad = body.clone();
        bad[10] = 9;
        assert!(parse_endpoint(&bad).unwrap_err().contains("MTU"));
        let mut bad = body.clone();
        bad[3] = 1;
        assert!(parse_endpoint(&bad).unwrap_err().contains("24 bits"));
        assert!(parse_endpoint(&body[..31]).is_err());
        let m = message(KIND_READY, &[]);
        assert_eq!(&m[..4], b"CHIV");
        assert_eq!(m.len(), 16);
    }
}
