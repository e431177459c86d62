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
//! The endpoint is `qpn u32 | psn u32 | lid u16 | mtu u8 | read depth u8 |
//! gid [16] | gid type u8 | reserved [3]`. The GID type (0 not stated,
//! 1 InfiniBand, 2 RoCE v1, 3 RoCE v2) lets a RoCE v1/v2 mismatch, which
//! would otherwise only show as timeouts, be refused with a clear reason;
//! peers that leave it 0 are not checked.
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

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::device::{Endpoint, GidType};
use crate::provider::handshake::{HelloError, HelloFormat};

/// Magic of the verbs exchange ("chanio verbs").
pub const MAGIC: [u8; 4] = *b"CHIV";
/// Exchange version this build speaks.
pub const VERSION: u16 = 1;
/// Largest parameter block accepted.
pub const MAX_PARAMS: usize = 4096;

pub(super) use crate::provider::handshake::{KIND_ACCEPT, KIND_HELLO, KIND_REJECT};
pub(super) const KIND_READY: u16 = 4;
pub(super) const KIND_DISCONNECT: u16 = 5;

const ENDPOINT: usize = 32;

const EXCHANGE: HelloFormat = HelloFormat {
    magic: MAGIC,
    version: VERSION,
    max_body: ENDPOINT + MAX_PARAMS,
    peer: "chanio verbs",
    what: "exchange",
};

/// Encodes one message.
pub(super) fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    EXCHANGE.encode(kind, body)
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
    out.push(gid_type_code(ep.gid_type));
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(params);
    out
}

fn gid_type_code(t: GidType) -> u8 {
    match t {
        GidType::Unknown => 0,
        GidType::InfiniBand => 1,
        GidType::RoceV1 => 2,
        GidType::RoceV2 => 3,
    }
}

/// Refuses a peer whose GID type differs from ours (RoCE v1 packets never
/// reach a RoCE v2 GID and the other way round); unknown types pass.
pub(super) fn check_gid_types(local: GidType, remote: GidType) -> Result<(), String> {
    if local == GidType::Unknown || remote == GidType::Unknown || local == remote {
        return Ok(());
    }
    Err(format!(
        "GID type mismatch: this side uses a {local} GID, the peer a {remote} GID; choose GIDs of the same \
         type on both sides with CHANIO_VERBS_GID_INDEX (`show_gids` or \
         /sys/class/infiniband/<device>/ports/<port>/gid_attrs/types/ list them)"
    ))
}

/// Splits and checks a HELLO or ACCEPT body.
pub(super) fn parse_endpoint(body: &[u8]) -> Result<(Endpoint, Vec<u8>), String> {
    if body.len() < ENDPOINT {
        return Err(format!("endpoint truncated ({} of {ENDPOINT} bytes)", body.len()));
    }
    let le32 = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let mut gid = [0u8; 16];
    gid.copy_from_slice(&body[12..28]);
    let gid_type = match body[28] {
        0 => GidType::Unknown,
        1 => GidType::InfiniBand,
        2 => GidType::RoceV1,
        3 => GidType::RoceV2,
        other => return Err(format!("unknown GID type code {other}")),
    };
    let ep = Endpoint {
        qpn: le32(0),
        psn: le32(4),
        lid: u16::from_le_bytes([body[8], body[9]]),
        mtu: body[10],
        // 0 is valid: that peer serves no RDMA Reads.
        read_depth: body[11],
        gid,
        gid_type,
    };
    if ep.qpn > 0xff_ffff || ep.psn > 0xff_ffff {
        return Err(format!("QP number {:#x} or PSN {:#x} exceeds 24 bits", ep.qpn, ep.psn));
    }
    if ep.qpn <= 1 {
        // QP0 and QP1 are the special management queue pairs, never RC.
        return Err(format!("QP number {} is a special queue pair", ep.qpn));
    }
    if !(1..=5).contains(&ep.mtu) {
        return Err(format!("path MTU code {} is not 1..=5", ep.mtu));
    }
    if body[29..32] != [0; 3] {
        return Err("reserved endpoint bytes are not zero".into());
    }
    Ok((ep, body[ENDPOINT..].to_vec()))
}

/// Reads one message within `timeout` (for the whole message); the error
/// is a reason for logs.
pub(super) fn read_message(stream: &mut TcpStream, timeout: Duration) -> Result<(u16, Vec<u8>), HelloError> {
    EXCHANGE.read(stream, timeout)
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
            gid_type: GidType::RoceV2,
        };
        let body = endpoint_body(&ep, b"params");
        assert_eq!(parse_endpoint(&body), Ok((ep, b"params".to_vec())));
        assert_eq!(body[28], 3, "the GID type sits in the first reserved byte");
        let mut bad = body.clone();
        bad[10] = 9;
        assert!(parse_endpoint(&bad).unwrap_err().contains("MTU"));
        let mut bad = body.clone();
        bad[3] = 1;
        assert!(parse_endpoint(&bad).unwrap_err().contains("24 bits"));
        assert!(parse_endpoint(&body[..31]).is_err());
        for qpn in [0u8, 1] {
            let mut bad = body.clone();
            bad[..4].copy_from_slice(&[qpn, 0, 0, 0]);
            assert!(parse_endpoint(&bad).unwrap_err().contains("special"));
        }
        let mut bad = body.clone();
        bad[28] = 9;
        assert!(parse_endpoint(&bad).unwrap_err().contains("GID type"));
        let mut bad = body.clone();
        bad[31] = 1;
        assert!(parse_endpoint(&bad).unwrap_err().contains("reserved"));
        let mut no_reads = body.clone();
        no_reads[11] = 0;
        assert_eq!(parse_endpoint(&no_reads).map(|(e, _)| e.read_depth), Ok(0));
        let mut old_peer = body.clone();
        old_peer[28] = 0;
        assert_eq!(parse_endpoint(&old_peer).map(|(e, _)| e.gid_type), Ok(GidType::Unknown));
        let m = message(KIND_READY, &[]);
        assert_eq!(&m[..4], b"CHIV");
        assert_eq!(m.len(), 16);
    }

    #[test]
    fn roce_versions_must_match() {
        use GidType::*;
        assert!(check_gid_types(RoceV2, RoceV2).is_ok());
        assert!(check_gid_types(RoceV2, Unknown).is_ok());
        assert!(check_gid_types(Unknown, RoceV1).is_ok());
        let reason = check_gid_types(RoceV2, RoceV1).unwrap_err();
        assert!(reason.contains("RoCE v2") && reason.contains("RoCE v1"), "{reason}");
        assert!(reason.contains("CHANIO_VERBS_GID_INDEX"), "{reason}");
    }

    #[test]
    fn a_newer_version_is_refused_for_its_version_not_its_length() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut m = message(KIND_HELLO, &[]);
        m[4..6].copy_from_slice(&2u16.to_le_bytes());
        m[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        client.write_all(&m).unwrap();
        let reason = read_message(&mut server, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(reason, HelloError::Version { got: 2, .. }), "{reason}");
    }
}
