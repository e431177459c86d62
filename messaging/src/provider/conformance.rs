//! The provider conformance suite: every [`Fabric`] must pass it.
//!
//! Each check is a function taking the fabric and an address to listen on
//! (`127.0.0.1:0` for tcp, `""` for loopback); [`CHECKS`] lists them all so
//! that a provider's test file can run each as its own test. The checks
//! panic with a message on failure, like assertions.

use std::time::{Duration, Instant};

use super::{
    Completion, Fabric, FabricError, Gather, QueuePair, RecvWr, RemoteAddr, SendOp, SendWr, WcOpcode, WcStatus, WrId,
};
use crate::mr::{Access, BufPool, ProtectionDomain, RKey};

/// A named conformance check.
pub type Check = (&'static str, fn(&dyn Fabric, &str));

/// Every check, by name.
pub const CHECKS: &[Check] = &[
    ("send_recv", send_recv),
    ("send_in_order", send_in_order),
    ("send_gather", send_gather),
    ("write", write),
    ("write_with_imm", write_with_imm),
    ("read", read),
    ("bad_key", bad_key),
    ("other_domains_key", other_domains_key),
    ("out_of_bounds", out_of_bounds),
    ("no_permission", no_permission),
    ("receiver_not_ready", receiver_not_ready),
    ("receive_too_small", receive_too_small),
    ("local_protection", local_protection),
    ("disconnect_flush", disconnect_flush),
    ("executed_before_disconnect", executed_before_disconnect),
    ("back_pressure", back_pressure),
    ("large_transfers_both_ways", large_transfers_both_ways),
    ("hello_params", hello_params),
];

/// Names the fabrics a test run covers, comma-separated (`verbs`, or
/// `tcp,shm`); unset, every fabric this build has runs.
pub const FABRICS_ENV: &str = "CHANIO_TEST_FABRICS";

/// Set to `1`, a missing RDMA device fails the verbs tests instead of
/// skipping them (the soft-RoCE VM sets it: there a skip would hide a fault).
pub const REQUIRE_VERBS_ENV: &str = "CHANIO_REQUIRE_VERBS";

/// Whether this test run covers the fabric called `name` ([`FABRICS_ENV`]).
pub fn selected(name: &str) -> bool {
    match std::env::var(FABRICS_ENV) {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|n| n.trim() == name),
        _ => true,
    }
}

/// The verbs fabric for a test, when this run covers verbs: `None` when it
/// does not, or when no RDMA device is there (said once on stderr, past the
/// harness's capture).
///
/// # Panics
/// When [`REQUIRE_VERBS_ENV`] is `1` and the device cannot be opened.
#[cfg(feature = "verbs")]
pub fn verbs_for_tests() -> Option<super::verbs::VerbsFabric> {
    use std::io::Write;
    static SKIP_NOTICE: std::sync::Once = std::sync::Once::new();
    if !selected("verbs") {
        return None;
    }
    match super::verbs::VerbsFabric::new() {
        Ok(fabric) => Some(fabric),
        Err(e) if std::env::var(REQUIRE_VERBS_ENV).is_ok_and(|v| v == "1") => {
            panic!("{REQUIRE_VERBS_ENV}=1 but the verbs fabric cannot be opened: {e}")
        }
        Err(e) => {
            SKIP_NOTICE.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "verbs tests skipped: no RDMA device (scripts/rxe-vm.sh runs them over soft-RoCE)\n  ({e})"
                );
            });
            None
        }
    }
}

/// Whether a test should run over verbs: this run covers verbs, the build
/// has the provider and a device opens (`verbs_for_tests`, with the `verbs` feature).
///
/// # Panics
/// When [`REQUIRE_VERBS_ENV`] is `1` and the build lacks the provider or
/// the device cannot be opened.
pub fn verbs_usable() -> bool {
    #[cfg(feature = "verbs")]
    return verbs_for_tests().is_some();
    #[cfg(not(feature = "verbs"))]
    {
        let required = std::env::var(REQUIRE_VERBS_ENV).is_ok_and(|v| v == "1");
        assert!(
            !(required && selected("verbs")),
            "{REQUIRE_VERBS_ENV}=1 but this build has no verbs provider (build with --features verbs)"
        );
        false
    }
}

const TIMEOUT: Duration = Duration::from_secs(20);
const RW: Access = Access::ALL;

/// Connects two queue pairs through a listener on `addr`: `(client, server)`.
///
/// # Panics
/// If listening, connecting or accepting fails.
pub fn connect_pair(
    fabric: &dyn Fabric,
    addr: &str,
    client: (&[u8], Vec<RecvWr>),
    server: (&[u8], Vec<RecvWr>),
) -> (Box<dyn QueuePair>, Box<dyn QueuePair>) {
    let domain = fabric.domain();
    connect_pair_in(fabric, addr, (domain, client.0, client.1), (domain, server.0, server.1))
}

/// As [`connect_pair`], each queue pair in the given protection domain
/// (the fabric's or a child of it).
///
/// # Panics
/// If listening, connecting or accepting fails.
pub fn connect_pair_in(
    fabric: &dyn Fabric,
    addr: &str,
    client: (&ProtectionDomain, &[u8], Vec<RecvWr>),
    server: (&ProtectionDomain, &[u8], Vec<RecvWr>),
) -> (Box<dyn QueuePair>, Box<dyn QueuePair>) {
    let listener = fabric.listen(addr).expect("listen");
    let local = listener.local_addr();
    std::thread::scope(|s| {
        let acceptor = s.spawn(|| {
            let incoming = listener.accept(Some(TIMEOUT)).expect("accept");
            let peer = incoming.peer_params().to_vec();
            (
                incoming
                    .accept(server.0, server.1, server.2)
                    .expect("accept queue pair"),
                peer,
            )
        });
        let qp = fabric.connect(&local, client.0, client.1, client.2).expect("connect");
        let (server_qp, seen) = acceptor.join().expect("acceptor thread");
        assert_eq!(seen, client.1, "server saw the client's hello parameters");
        (qp, server_qp)
    })
}

/// Registers `count` chunks of `size` bytes with every access right.
///
/// # Panics
/// If registration fails.
pub fn pool(fabric: &dyn Fabric, size: usize, count: usize, access: Access) -> BufPool {
    fabric.domain().register(size, count, access).expect("register")
}

/// `n` receives from `pool`, with ids `base..base+n`.
///
/// # Panics
/// If the pool runs dry.
pub fn recvs(pool: &BufPool, n: usize, base: u64) -> Vec<RecvWr> {
    (0..n)
        .map(|i| RecvWr {
            id: WrId(base + i as u64),
            buf: pool.checkout().expect("pool has room"),
        })
        .collect()
}

/// Waits for exactly `n` completions.
///
/// # Panics
/// After a 20 s timeout, naming what arrived.
pub fn wait_for(qp: &dyn QueuePair, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + TIMEOUT;
    let mut out = Vec::new();
    while out.len() < n {
        let now = Instant::now();
        assert!(now < deadline, "timed out waiting for {n} completions, got {out:?}");
        let want = n - out.len();
        if qp.poll(&mut out, want) == 0 {
            qp.wait(Some(deadline - now));
        }
    }
    out
}

/// Asserts that no completion arrives within a short while.
///
/// # Panics
/// If one does.
pub fn assert_quiet(qp: &dyn QueuePair) {
    let mut out = Vec::new();
    qp.wait(Some(Duration::from_millis(50)));
    qp.poll(&mut out, 16);
    assert!(out.is_empty(), "unexpected completions: {out:?}");
}

fn send_wr(pool: &BufPool, id: u64, data: &[u8], imm: Option<u32>) -> SendWr {
    let mut buf = pool.checkout().expect("pool has room");
    buf.fill(data).expect("fits");
    SendWr {
        id: WrId(id),
        op: SendOp::Send { buf, imm },
    }
}

/// A Send lands in the posted receive, with and without immediate data.
pub fn send_recv(fabric: &dyn Fabric, addr: &str) {
    let p = pool(fabric, 4096, 8, RW);
    let (a, b) = connect_pair(fabric, addr, (b"a", vec![]), (b"b", recvs(&p, 2, 100)));
    a.post_send(&mut vec![
        send_wr(&p, 1, b"hello", None),
        send_wr(&p, 2, b"with imm", Some(0xdead_beef)),
    ])
    .expect("post");
    let sent = wait_for(&*a, 2);
    assert!(sent
        .iter()
        .all(|c| c.status == WcStatus::Success && c.opcode == WcOpcode::Send));
    assert_eq!(sent.iter().map(|c| c.id).collect::<Vec<_>>(), vec![WrId(1), WrId(2)]);
    let got = wait_for(&*b, 2);
    assert_eq!(got[0].id, WrId(100));
    assert_eq!(
        (got[0].status, got[0].opcode, got[0].byte_len),
        (WcStatus::Success, WcOpcode::Recv, 5)
    );
    assert_eq!(&got[0].buf[..], b"hello");
    assert_eq!(got[0].imm, None);
    assert_eq!(&got[1].buf[..], b"with imm");
    assert_eq!(got[1].imm, Some(0xdead_beef));
    assert!(!a.is_failed() && !b.is_failed());
}

/// Many Sends in one batch and across batches arrive in posting order.
pub fn send_in_order(fabric: &dyn Fabric, addr: &str) {
    let p = pool(fabric, 64, 512, RW);
    let (a, b) = connect_pair(fabric, addr, (b"", vec![]), (b"", recvs(&p, 200, 1000)));
    for batch in 0..4u64 {
        let mut wrs: Vec<SendWr> = (0..50u64)
            .map(|i| {
                let n = batch * 50 + i;
                send_wr(&p, n, &n.to_le_bytes(), None)
            })
            .collect();
        a.post_send(&mut wrs).expect("post");
        assert!(wrs.is_empty(), "an accepted batch leaves the vector empty");
    }
    let got = wait_for(&*b, 200);
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.status, WcStatus::Success);
        assert_eq!(c.id, WrId(1000 + i as u64), "receives are consumed in order");
        assert_eq!(&c.buf[..], &(i as u64).to_le_bytes(), "message {i} arrives in order");
    }
    let sent = wait_for(&*a, 200);
    assert!(sent.iter().enumerate().all(|(i, c)| c.id == WrId(i as u64)));
}

/// A gathered Send arrives as one message, head then tail, and the tail
/// goes back to its pool once the Send completes.
pub fn send_gather(fabric: &dyn Fabric, addr: &str) {
    let p = pool(fabric, 4096, 4, RW);
    let tails = pool(fabric, 2048, 1, RW);
    let (a, b) = connect_pair(fabric, addr, (b"", vec![]), (b"", recvs(&p, 2, 100)));
    let mut head = p.checkout().expect("pool has room");
    head.fill(b"capsule:").expect("fits");
    let mut tail = tails.checkout().expect("pool has room");
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
    tail.fill(&data).expect("fits");
    let gather = Gather::new(head, tail).expect("the tail fits the head's capacity");
    a.post_send(&mut vec![SendWr {
        id: WrId(1),
        op: SendOp::SendGather(gather),
    }])
    .expect("post");
    let sent = wait_for(&*a, 1);
    assert_eq!((sent[0].status, sent[0].opcode), (WcStatus::Success, WcOpcode::Send));
    assert_eq!(
        tails.available(),
        1,
        "the tail is back in its pool once the Send completed"
    );
    let got = wait_for(&*b, 1);
    assert_eq!((got[0].status, got[0].byte_len), (WcStatus::Success, 8 + 2048));
    assert_eq!(&got[0].buf[..8], b"capsule:");
    assert_eq!(&got[0].buf[8..], &data[..]);
    assert!(!a.is_failed() && !b.is_failed());
    // A tail that would not fit the head is refused before anything posts.
    let mut big = p.checkout().expect("pool has room");
    big.fill(&[1; 3000]).expect("fits");
    let mut tail = tails.checkout().expect("back in its pool");
    tail.fill(&[2; 2048]).expect("fits");
    assert!(Gather::new(big, tail).is_err());
}

/// An RDMA Write lands in the peer's registered memory; no receive is consumed.
pub fn write(fabric: &dyn Fabric, addr: &str) {
    let local = pool(fabric, 8192, 2, RW);
    let remote = pool(fabric, 8192, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let mut target = remote.checkout().expect("chunk");
    let desc = target.remote();
    let (a, b) = connect_pair(fabric, addr, (b"", vec![]), (b"", recvs(&local, 1, 7)));
    let mut src = local.checkout().expect("chunk");
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    src.fill(&data).expect("fits");
    a.post_send(&mut vec![SendWr {
        id: WrId(9),
        op: SendOp::Write {
            buf: src,
            remote: RemoteAddr {
                addr: desc.addr + 100,
                rkey: desc.rkey,
            },
            imm: None,
        },
    }])
    .expect("post");
    let done = wait_for(&*a, 1);
    assert_eq!(
        (done[0].id, done[0].status, done[0].opcode),
        (WrId(9), WcStatus::Success, WcOpcode::RdmaWrite)
    );
    target.set_len(8192);
    assert_eq!(&target[100..5100], &data[..]);
    assert!(
        target[..100].iter().all(|&b| b == 0),
        "bytes before the write untouched"
    );
    assert_quiet(&*b);
}

/// A Write with immediate lands and consumes a receive carrying imm and length.
pub fn write_with_imm(fabric: &dyn Fabric, addr: &str) {
    let local = pool(fabric, 4096, 4, RW);
    let remote = pool(fabric, 4096, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let mut target = remote.checkout().expect("chunk");
    let desc = target.remote();
    let (a, b) = connect_pair(fabric, addr, (b"", vec![]), (b"", recvs(&local, 1, 50)));
    let mut src = local.checkout().expect("chunk");
    src.fill(&[0xab; 3000]).expect("fits");
    a.post_send(&mut vec![SendWr {
        id: WrId(1),
        op: SendOp::Write {
            buf: src,
            remote: RemoteAddr {
                addr: desc.addr,
                rkey: desc.rkey,
            },
            imm: Some(0x8000_0042),
        },
    }])
    .expect("post");
    let got = wait_for(&*b, 1);
    assert_eq!(got[0].id, WrId(50));
    assert_eq!(
        (got[0].status, got[0].opcode, got[0].byte_len, got[0].imm),
        (WcStatus::Success, WcOpcode::RecvRdmaWithImm, 3000, Some(0x8000_0042))
    );
    target.set_len(3001);
    assert!(target[..3000].iter().all(|&b| b == 0xab));
    assert_eq!(target[3000], 0);
    assert_eq!(wait_for(&*a, 1)[0].status, WcStatus::Success);
}

/// An RDMA Read fetches the peer's registered memory.
pub fn read(fabric: &dyn Fabric, addr: &str) {
    let local = pool(fabric, 65536, 1, Access::LOCAL_WRITE);
    let remote = pool(fabric, 65536, 1, Access::LOCAL_WRITE | Access::REMOTE_READ);
    let mut source = remote.checkout().expect("chunk");
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    source.fill(&data).expect("fits");
    let desc = source.remote();
    let (a, _b) = connect_pair(fabric, addr, (b"", vec![]), (b"", vec![]));
    let mut dest = local.checkout().expect("chunk");
    dest.set_len(40000);
    a.post_send(&mut vec![SendWr {
        id: WrId(3),
        op: SendOp::Read {
            buf: dest,
            remote: RemoteAddr {
                addr: desc.addr + 1000,
                rkey: desc.rkey,
            },
        },
    }])
    .expect("post");
    let got = wait_for(&*a, 1);
    assert_eq!(
        (got[0].status, got[0].opcode, got[0].byte_len),
        (WcStatus::Success, WcOpcode::RdmaRead, 40000)
    );
    assert_eq!(&got[0].buf[..], &data[1000..41000]);
}

fn expect_remote_access_error(fabric: &dyn Fabric, addr: &str, op: impl FnOnce(&BufPool) -> SendOp) {
    let local = pool(fabric, 4096, 4, RW);
    let (a, b) = connect_pair(fabric, addr, (b"", recvs(&local, 1, 10)), (b"", recvs(&local, 1, 20)));
    a.post_send(&mut vec![SendWr {
        id: WrId(1),
        op: op(&local),
    }])
    .expect("post");
    let got = wait_for(&*a, 2);
    let (bad, rest): (Vec<_>, Vec<_>) = got.into_iter().partition(|c| c.id == WrId(1));
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].status, WcStatus::RemoteAccessError, "{:?}", bad[0]);
    assert_eq!(
        (rest[0].id, rest[0].status),
        (WrId(10), WcStatus::Flushed),
        "the connection breaks"
    );
    let peer = wait_for(&*b, 1);
    assert_eq!(
        (peer[0].id, peer[0].status),
        (WrId(20), WcStatus::Flushed),
        "the peer's queue pair fails too"
    );
    assert!(a.is_failed());
}

fn write_op(local: &BufPool, addr: u64, rkey: RKey, len: usize) -> SendOp {
    let mut buf = local.checkout().expect("chunk");
    buf.set_len(len);
    SendOp::Write {
        buf,
        remote: RemoteAddr { addr, rkey },
        imm: None,
    }
}

fn read_op(local: &BufPool, addr: u64, rkey: RKey, len: usize) -> SendOp {
    let mut buf = local.checkout().expect("chunk");
    buf.set_len(len);
    SendOp::Read {
        buf,
        remote: RemoteAddr { addr, rkey },
    }
}

/// A Write with an unknown remote key fails with a remote access error and breaks the connection.
pub fn bad_key(fabric: &dyn Fabric, addr: &str) {
    let remote = pool(fabric, 4096, 1, RW);
    let desc = remote.remote();
    expect_remote_access_error(fabric, addr, |l| {
        write_op(l, desc.addr, RKey(desc.rkey.0 ^ 0x5a5a_0000), 16)
    });
}

/// Connections are isolated as protection domains isolate them on a NIC:
/// the server's queue pair runs in a domain of its own, where the client's
/// Write reaches a region of that domain, while a Write and a Read with
/// the right key and address of a region registered for another
/// connection (another child of the fabric's domain) fail with remote
/// access errors and leave that region untouched.
pub fn other_domains_key(fabric: &dyn Fabric, addr: &str) {
    let fabric_domain = fabric.domain();
    let child = || fabric_domain.child().expect("a child domain");
    let (server_domain, another) = (child(), child());
    let elsewhere = another.register(4096, 1, RW).expect("register");
    let server_pool = server_domain.register(4096, 2, RW).expect("register");
    let local = pool(fabric, 4096, 4, RW);
    for attack in ["write", "read"] {
        let (a, b) = connect_pair_in(
            fabric,
            addr,
            (fabric_domain, b"", recvs(&local, 1, 10)),
            (&server_domain, b"", recvs(&server_pool, 1, 20)),
        );
        // The server's own region is reachable.
        let own = server_pool.checkout().expect("chunk");
        let d = own.remote();
        a.post_send(&mut vec![SendWr {
            id: WrId(1),
            op: write_op(&local, d.addr, d.rkey, 16),
        }])
        .expect("post");
        let got = wait_for(&*a, 1);
        assert_eq!((got[0].id, got[0].status), (WrId(1), WcStatus::Success), "{attack}");
        // Another connection's region is not.
        let d = elsewhere.remote();
        let op = match attack {
            "write" => write_op(&local, d.addr, d.rkey, 16),
            _ => read_op(&local, d.addr, d.rkey, 16),
        };
        a.post_send(&mut vec![SendWr { id: WrId(2), op }]).expect("post");
        let got = wait_for(&*a, 2);
        let bad = got.iter().find(|c| c.id == WrId(2)).expect("the attack completes");
        assert_eq!(bad.status, WcStatus::RemoteAccessError, "{attack}: {bad:?}");
        assert!(a.is_failed(), "{attack}: the connection breaks");
        let peer = wait_for(&*b, 1);
        assert_eq!(
            peer[0].status,
            WcStatus::Flushed,
            "{attack}: the server's queue pair fails too"
        );
        drop(own);
    }
    let mut untouched = elsewhere.checkout().expect("chunk");
    assert!(
        untouched.spare_capacity().iter().all(|&b| b == 0),
        "the other connection's memory was written"
    );
}

/// A Write past the end of the registration fails with a remote access error.
pub fn out_of_bounds(fabric: &dyn Fabric, addr: &str) {
    let remote = pool(fabric, 4096, 1, RW);
    let desc = remote.remote();
    expect_remote_access_error(fabric, addr, |l| write_op(l, desc.addr + 4000, desc.rkey, 200));
}

/// Writes to read-only memory and reads of write-only memory fail with remote access errors.
pub fn no_permission(fabric: &dyn Fabric, addr: &str) {
    let read_only = pool(fabric, 4096, 1, Access::LOCAL_WRITE | Access::REMOTE_READ);
    let d = read_only.remote();
    expect_remote_access_error(fabric, addr, |l| write_op(l, d.addr, d.rkey, 16));
    let write_only = pool(fabric, 4096, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let d = write_only.remote();
    expect_remote_access_error(fabric, addr, |l| read_op(l, d.addr, d.rkey, 16));
}

/// A Send with no posted receive fails with receiver-not-ready; nothing is dropped silently.
pub fn receiver_not_ready(fabric: &dyn Fabric, addr: &str) {
    let p = pool(fabric, 256, 4, RW);
    let (a, b) = connect_pair(fabric, addr, (b"", vec![]), (b"", vec![]));
    a.post_send(&mut vec![
        send_wr(&p, 1, b"nobody listens", None),
        send_wr(&p, 2, b"queued behind", None),
    ])
    .expect("post");
    let got = wait_for(&*a, 2);
    assert_eq!((got[0].id, got[0].status), (WrId(1), WcStatus::ReceiverNotReady));
    assert_eq!((got[1].id, got[1].status), (WrId(2), WcStatus::Flushed));
    assert!(a.is_failed());
    let deadline = Instant::now() + TIMEOUT;
    while !b.is_failed() {
        assert!(Instant::now() < deadline, "peer never failed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An RDMA Read into memory without local write fails with a local
/// protection error, after the requests posted before it and before those
/// posted after it (which are flushed).
pub fn local_protection(fabric: &dyn Fabric, addr: &str) {
    let p = pool(fabric, 256, 8, RW);
    let read_only = pool(fabric, 256, 1, Access::REMOTE_READ);
    let source = pool(fabric, 256, 1, Access::LOCAL_WRITE | Access::REMOTE_READ);
    let d = source.remote();
    let (a, _b) = connect_pair(fabric, addr, (b"", vec![]), (b"", recvs(&p, 4, 0)));
    let mut bad = read_only.checkout().expect("chunk");
    bad.set_len(16);
    a.post_send(&mut vec![
        send_wr(&p, 1, b"before", None),
        SendWr {
            id: WrId(2),
            op: SendOp::Read {
                buf: bad,
                remote: RemoteAddr {
                    addr: d.addr,
                    rkey: d.rkey,
                },
            },
        },
        send_wr(&p, 3, b"after", None),
    ])
    .expect("post");
    let got = wait_for(&*a, 3);
    let ids: Vec<u64> = got.iter().map(|c| c.id.0).collect();
    assert_eq!(ids, vec![1, 2, 3], "completions in posting order");
    assert!(matches!(got[0].status, WcStatus::Success | WcStatus::Flushed));
    assert_eq!(got[1].status, WcStatus::LocalProtectionError);
    assert_eq!(got[2].status, WcStatus::Flushed);
    assert!(a.is_failed());
}

/// A Send larger than the posted receive fails on both sides.
///
/// The IB specification has the responder NAK with Remote Invalid Request
/// and complete the receive with a length error: ConnectX does, and the
/// software providers must. Soft-RoCE (rxe, Linux 6.1) treats the receive as
/// a malformed work request instead: the requester sees Remote Operational
/// Error and the receive completes with Local QP Operation Error (mapped to
/// [`WcStatus::RemoteOperationError`]). Over verbs either pair is accepted:
/// both fail the queue pair on both sides, which is what chanio relies on.
pub fn receive_too_small(fabric: &dyn Fabric, addr: &str) {
    let small = pool(fabric, 16, 1, RW);
    let big = pool(fabric, 256, 1, RW);
    let (a, b) = connect_pair(fabric, addr, (b"", vec![]), (b"", recvs(&small, 1, 5)));
    a.post_send(&mut vec![send_wr(&big, 1, &[1; 100], None)]).expect("post");
    let got = wait_for(&*a, 1);
    let peer = wait_for(&*b, 1);
    assert_eq!(peer[0].id, WrId(5));
    let statuses = (got[0].status, peer[0].status);
    let spec = (WcStatus::RemoteInvalidRequest, WcStatus::LocalLengthError);
    let rxe = (WcStatus::RemoteOperationError, WcStatus::RemoteOperationError);
    assert!(
        statuses == spec || (fabric.name() == "verbs" && statuses == rxe),
        "(requester, responder) statuses {statuses:?}"
    );
}

/// Disconnecting flushes every posted receive on both sides and every later post.
pub fn disconnect_flush(fabric: &dyn Fabric, addr: &str) {
    let p = pool(fabric, 128, 16, RW);
    let (a, b) = connect_pair(fabric, addr, (b"", recvs(&p, 3, 10)), (b"", recvs(&p, 4, 20)));
    a.disconnect();
    let mine = wait_for(&*a, 3);
    assert!(mine
        .iter()
        .all(|c| c.status == WcStatus::Flushed && c.opcode == WcOpcode::Recv));
    assert_eq!(mine.iter().map(|c| c.id.0).collect::<Vec<_>>(), vec![10, 11, 12]);
    let theirs = wait_for(&*b, 4);
    assert!(theirs.iter().all(|c| c.status == WcStatus::Flushed));
    b.post_send(&mut vec![send_wr(&p, 99, b"too late", None)])
        .expect("post after failure is accepted");
    let late = wait_for(&*b, 1);
    assert_eq!((late[0].id, late[0].status), (WrId(99), WcStatus::Flushed));
    b.post_recv(RecvWr {
        id: WrId(77),
        buf: p.checkout().expect("chunk"),
    })
    .expect("post recv after failure");
    assert_eq!(wait_for(&*b, 1)[0].status, WcStatus::Flushed);
    drop((mine, theirs, late));
    assert_eq!(p.available(), 16, "every buffer came back through a completion");
}

/// A Send the peer received completes successfully even if the peer
/// disconnects the moment it sees it: the acknowledgement is not overtaken.
pub fn executed_before_disconnect(fabric: &dyn Fabric, addr: &str) {
    let p = pool(fabric, 128, 8, RW);
    for round in 0..20 {
        let (a, b) = connect_pair(fabric, addr, (b"", vec![]), (b"", recvs(&p, 1, 1)));
        a.post_send(&mut vec![send_wr(&p, 5, b"last words", None)])
            .expect("post");
        let got = wait_for(&*b, 1);
        assert_eq!(got[0].status, WcStatus::Success);
        b.disconnect();
        let sent = wait_for(&*a, 1);
        assert_eq!(
            (sent[0].id, sent[0].status),
            (WrId(5), WcStatus::Success),
            "round {round}"
        );
    }
}

/// A send queue without room hands the whole batch back; nothing is lost.
pub fn back_pressure(fabric: &dyn Fabric, addr: &str) {
    let depth = fabric.capabilities().max_send_wr as usize;
    let p = pool(fabric, 8, depth + 1, RW);
    let (a, _b) = connect_pair(fabric, addr, (b"", vec![]), (b"", vec![]));
    let mut wrs: Vec<SendWr> = (0..=depth as u64).map(|i| send_wr(&p, i, b"x", None)).collect();
    match a.post_send(&mut wrs) {
        Err(FabricError::QueueFull { queue: "send", .. }) => {
            assert_eq!(wrs.len(), depth + 1, "the whole batch comes back");
            assert!(wrs.iter().enumerate().all(|(i, w)| w.id == WrId(i as u64)));
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert!(!a.is_failed(), "a full queue does not fail the queue pair");
    let rdepth = fabric.capabilities().max_recv_wr as usize;
    let rp = pool(fabric, 8, rdepth + 1, RW);
    for i in 0..rdepth {
        a.post_recv(RecvWr {
            id: WrId(i as u64),
            buf: rp.checkout().expect("chunk"),
        })
        .expect("room for a receive");
    }
    let extra = RecvWr {
        id: WrId(u64::MAX),
        buf: rp.checkout().expect("chunk"),
    };
    match a.post_recv(extra) {
        Err((FabricError::QueueFull { queue: "receive", .. }, back)) => assert_eq!(back.id, WrId(u64::MAX)),
        other => panic!("expected QueueFull, got {:?}", other.map_err(|(e, _)| e)),
    }
}

/// Both sides write and send megabytes to each other at once; all of it
/// arrives intact and nobody deadlocks on full sockets.
pub fn large_transfers_both_ways(fabric: &dyn Fabric, addr: &str) {
    const CHUNK: usize = 1 << 20;
    const N: usize = 16;
    let src_a = pool(fabric, CHUNK, N, RW);
    let src_b = pool(fabric, CHUNK, N, RW);
    let dst_a = pool(fabric, CHUNK, N, RW);
    let dst_b = pool(fabric, CHUNK, N, RW);
    let (a, b) = connect_pair(fabric, addr, (b"", recvs(&dst_a, N, 0)), (b"", recvs(&dst_b, N, 0)));
    let fill = |p: &BufPool, seed: u8| -> Vec<SendWr> {
        (0..N)
            .map(|i| {
                let mut buf = p.checkout().expect("chunk");
                buf.set_len(CHUNK - i);
                let tag = seed.wrapping_add(i as u8);
                buf.iter_mut().enumerate().for_each(|(j, x)| *x = tag ^ (j as u8));
                SendWr {
                    id: WrId(i as u64),
                    op: SendOp::Send { buf, imm: None },
                }
            })
            .collect()
    };
    let (wa, wb) = (fill(&src_a, 1), fill(&src_b, 101));
    std::thread::scope(|s| {
        s.spawn(|| a.post_send(&mut { wa }).expect("post a"));
        s.spawn(|| b.post_send(&mut { wb }).expect("post b"));
    });
    for (qp, seed) in [(&a, 101u8), (&b, 1u8)] {
        let mut got = wait_for(&**qp, 2 * N);
        got.retain(|c| c.opcode == WcOpcode::Recv);
        assert_eq!(got.len(), N);
        for (i, c) in got.iter().enumerate() {
            assert_eq!(c.status, WcStatus::Success);
            assert_eq!(c.byte_len as usize, CHUNK - i);
            let tag = seed.wrapping_add(i as u8);
            assert!(
                c.buf.iter().enumerate().all(|(j, &x)| x == tag ^ (j as u8)),
                "message {i} intact"
            );
        }
    }
}

/// Hello parameters travel both ways, byte for byte.
pub fn hello_params(fabric: &dyn Fabric, addr: &str) {
    let client: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let (a, b) = connect_pair(fabric, addr, (&client, vec![]), (b"server side", vec![]));
    assert_eq!(a.peer_params(), b"server side");
    assert_eq!(b.peer_params(), &client[..]);
    assert!(!a.peer_addr().is_empty());
}
