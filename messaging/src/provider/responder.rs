//! The software responder: the decisions a receiving RDMA NIC makes for
//! each incoming request, made once for every provider that emulates one
//! (tcp, shm, loopback).
//!
//! A provider moves bytes: it reads a request off its transport, asks the
//! responder where the request may land, copies the payload there in its
//! own way (from a socket, a ring, a mapped memfd or a buffer), then asks
//! for the completion the receiving side sees. When the responder refuses,
//! the provider NAKs the request with the refusal's status, which fails
//! the queue pair on both sides, as a NIC's would.
//!
//! ```text
//!  Send                 take a posted receive ─ none ─▶ Receiver Not Ready
//!                       fits? ─ no ─▶ receive: Local Length Error,
//!                                     initiator: Remote Invalid Request
//!  Write [+ immediate]  key, bounds, rights ─ no ─▶ Remote Access Error
//!                       (immediate) take a posted receive ─ none ─▶ RNR
//!  Read                 key, bounds, rights ─ no ─▶ Remote Access Error
//! ```
//!
//! Every remote key is checked in the domain the provider passes: the
//! domain of the receiving queue pair.

use std::collections::VecDeque;

use super::{Completion, RecvWr, WcOpcode, WcStatus};
use crate::mr::{Access, ProtectionDomain, RKey, RemoteTarget};

/// Why the responder refused a request.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// What the initiator's completion says (the NAK carries it).
    pub status: WcStatus,
    /// For logs and the queue pair's failure reason.
    pub reason: String,
    /// The receive the request consumed and failed, for the responder's
    /// own completion queue (a Send into a receive too small for it).
    pub receive: Option<Completion>,
}

impl Refusal {
    fn new(status: WcStatus, reason: String) -> Refusal {
        Refusal {
            status,
            reason,
            receive: None,
        }
    }
}

/// Why a provider stops serving a queue pair: the reason (for logs and
/// the queue pair's failure), the NAK to send the peer first, and whether
/// the peer broke the protocol (logged as a warning; anything else, such
/// as the peer closing, at debug level).
#[derive(Debug)]
pub(crate) struct Fatal {
    pub reason: String,
    pub nak: Option<(u64, WcStatus)>,
    pub violation: bool,
}

impl Fatal {
    /// The queue pair ends without a fault of the peer's protocol: the
    /// peer closed, disconnected or refused a request of ours.
    pub fn closed(reason: impl Into<String>) -> Fatal {
        Fatal {
            reason: reason.into(),
            nak: None,
            violation: false,
        }
    }

    /// The peer broke the transport's protocol.
    pub fn violation(reason: impl Into<String>) -> Fatal {
        Fatal {
            violation: true,
            ..Fatal::closed(reason)
        }
    }

    /// Request `psn` fails on this side with `status`, which the peer
    /// learns from a NAK.
    pub fn nak(psn: u64, status: WcStatus, reason: impl Into<String>) -> Fatal {
        Fatal {
            nak: Some((psn, status)),
            ..Fatal::violation(reason)
        }
    }

    /// The responder refused request `psn`: the receive it failed (if any)
    /// joins `completions`, and the peer gets the NAK.
    pub fn refused(psn: u64, refusal: Refusal, completions: &mut Vec<Completion>) -> Fatal {
        completions.extend(refusal.receive);
        Fatal::nak(psn, refusal.status, refusal.reason)
    }
}

/// Where a Write's payload goes, and the receive its immediate data
/// consumes.
#[derive(Debug)]
pub(crate) struct WriteTarget {
    pub target: RemoteTarget,
    pub receive: Option<RecvWr>,
}

/// A Send of `len` bytes: takes the next posted receive, which must hold
/// the payload.
pub(crate) fn accept_send(recvs: &mut VecDeque<RecvWr>, len: u32) -> Result<RecvWr, Refusal> {
    let Some(wr) = recvs.pop_front() else {
        return Err(Refusal::new(
            WcStatus::ReceiverNotReady,
            "Send found no posted receive".into(),
        ));
    };
    if len as usize > wr.buf.capacity() {
        let reason = format!("Send of {len} bytes into a {}-byte receive", wr.buf.capacity());
        return Err(Refusal {
            status: WcStatus::RemoteInvalidRequest,
            reason,
            receive: Some(Completion {
                id: wr.id,
                status: WcStatus::LocalLengthError,
                opcode: WcOpcode::Recv,
                byte_len: len,
                imm: None,
                buf: wr.buf,
            }),
        });
    }
    Ok(wr)
}

/// An RDMA Write of `len` bytes at `addr` under `rkey`, with immediate
/// data when `with_imm` (which consumes the next posted receive). The
/// access check comes first: a refused Write consumes no receive.
pub(crate) fn accept_write(
    pd: &ProtectionDomain,
    recvs: &mut VecDeque<RecvWr>,
    rkey: RKey,
    addr: u64,
    len: u64,
    with_imm: bool,
) -> Result<WriteTarget, Refusal> {
    let target = pd
        .remote_target(rkey, addr, len, Access::REMOTE_WRITE)
        .map_err(|e| Refusal::new(WcStatus::RemoteAccessError, format!("RDMA Write refused: {e}")))?;
    let receive = if with_imm {
        let Some(wr) = recvs.pop_front() else {
            return Err(Refusal::new(
                WcStatus::ReceiverNotReady,
                "Write with immediate found no posted receive".into(),
            ));
        };
        Some(wr)
    } else {
        None
    };
    Ok(WriteTarget { target, receive })
}

/// An RDMA Read of `len` bytes at `addr` under `rkey`: the range it is
/// served from.
pub(crate) fn accept_read(pd: &ProtectionDomain, rkey: RKey, addr: u64, len: u64) -> Result<RemoteTarget, Refusal> {
    pd.remote_target(rkey, addr, len, Access::REMOTE_READ)
        .map_err(|e| Refusal::new(WcStatus::RemoteAccessError, format!("RDMA Read refused: {e}")))
}

/// Puts back a receive that [`accept_send`] or [`accept_write`] took for
/// a request the provider then could not carry out: it stays first in
/// line (and is flushed in order when the queue pair fails).
pub(crate) fn put_back(recvs: &mut VecDeque<RecvWr>, wr: Option<RecvWr>) {
    if let Some(wr) = wr {
        recvs.push_front(wr);
    }
}

/// The receiving side's completion of a Send whose `len` bytes were
/// copied into `wr`'s buffer.
pub(crate) fn send_received(mut wr: RecvWr, len: u32, imm: Option<u32>) -> Completion {
    wr.buf.set_len(len as usize);
    Completion {
        id: wr.id,
        status: WcStatus::Success,
        opcode: WcOpcode::Recv,
        byte_len: len,
        imm,
        buf: wr.buf,
    }
}

/// The receiving side's completion of a Write with immediate data of
/// `len` bytes: the receive carries no data, only `imm`.
pub(crate) fn write_received(mut wr: RecvWr, len: u32, imm: u32) -> Completion {
    wr.buf.set_len(0);
    Completion {
        id: wr.id,
        status: WcStatus::Success,
        opcode: WcOpcode::RecvRdmaWithImm,
        byte_len: len,
        imm: Some(imm),
        buf: wr.buf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::WrId;

    fn domain() -> ProtectionDomain {
        ProtectionDomain::new()
    }

    fn buf(pd: &ProtectionDomain, size: usize, access: Access) -> crate::mr::Buf {
        let pool = pd.register(size, 1, access).expect("registration");
        pool.checkout().expect("a free buffer")
    }

    fn recvs(pd: &ProtectionDomain, sizes: &[usize]) -> VecDeque<RecvWr> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| RecvWr {
                id: WrId(i as u64),
                buf: buf(pd, size, Access::LOCAL_WRITE),
            })
            .collect()
    }

    #[test]
    fn a_send_takes_the_next_receive_or_is_not_ready() {
        let pd = domain();
        let mut q = recvs(&pd, &[64]);
        let wr = accept_send(&mut q, 64).expect("fits");
        assert_eq!(wr.id, WrId(0));
        let done = send_received(wr, 5, Some(7));
        assert_eq!((done.byte_len, done.imm, done.buf.len()), (5, Some(7), 5));
        let refused = accept_send(&mut q, 1).expect_err("no receive left");
        assert_eq!(refused.status, WcStatus::ReceiverNotReady);
        assert!(refused.receive.is_none());
    }

    #[test]
    fn a_send_too_large_fails_the_receive_it_took() {
        let pd = domain();
        let mut q = recvs(&pd, &[16, 64]);
        let refused = accept_send(&mut q, 17).expect_err("too large");
        assert_eq!(refused.status, WcStatus::RemoteInvalidRequest);
        let receive = refused.receive.expect("the receive fails too");
        assert_eq!((receive.id, receive.status), (WrId(0), WcStatus::LocalLengthError));
        assert_eq!(q.len(), 1, "only the one receive is consumed");
    }

    #[test]
    fn writes_and_reads_need_key_bounds_and_rights() {
        let pd = domain();
        let writable = buf(&pd, 4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
        let readable = buf(&pd, 4096, Access::REMOTE_READ);
        let mut q = recvs(&pd, &[16]);
        let w = writable.remote();
        let r = readable.remote();

        let ok = accept_write(&pd, &mut q, w.rkey, w.addr, 4096, false).expect("in bounds");
        assert_eq!(ok.target.len(), 4096);
        assert!(ok.receive.is_none());
        for (rkey, addr, len) in [(w.rkey, w.addr, 4097), (w.rkey, w.addr + 1, 4096), (r.rkey, r.addr, 1)] {
            let refused = accept_write(&pd, &mut q, rkey, addr, len, true).expect_err("refused");
            assert_eq!(refused.status, WcStatus::RemoteAccessError);
        }
        assert_eq!(q.len(), 1, "a refused Write consumes no receive");

        let ok = accept_write(&pd, &mut q, w.rkey, w.addr, 8, true).expect("with immediate");
        let done = write_received(ok.receive.expect("receive taken"), 8, 9);
        assert_eq!(
            (done.opcode, done.imm, done.byte_len),
            (WcOpcode::RecvRdmaWithImm, Some(9), 8)
        );
        let refused = accept_write(&pd, &mut q, w.rkey, w.addr, 8, true).expect_err("no receive");
        assert_eq!(refused.status, WcStatus::ReceiverNotReady);

        assert_eq!(accept_read(&pd, r.rkey, r.addr, 4096).expect("readable").len(), 4096);
        let refused = accept_read(&pd, w.rkey, w.addr, 1).expect_err("not readable");
        assert_eq!(refused.status, WcStatus::RemoteAccessError);
    }

    #[test]
    fn a_key_of_another_domain_is_refused() {
        let (mine, theirs) = (domain(), domain());
        let foreign = buf(
            &theirs,
            4096,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ,
        );
        let f = foreign.remote();
        let refused = accept_write(&mine, &mut VecDeque::new(), f.rkey, f.addr, 1, false).expect_err("foreign");
        assert_eq!(refused.status, WcStatus::RemoteAccessError);
        let refused = accept_read(&mine, f.rkey, f.addr, 1).expect_err("foreign");
        assert_eq!(refused.status, WcStatus::RemoteAccessError);
    }
}
