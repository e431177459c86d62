//! Protocol-core tests on the deterministic loopback harness: two
//! [`Connection`]s joined by loopback queue pairs, driven by hand, with no
//! threads and no sleeps.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::provider::loopback::{Faults, LoopbackFabric, LoopbackQp};
use crate::provider::{Fabric, QueuePair};

/// One side of the harness: a connection, its queue pair, and everything
/// the application saw.
struct Side {
    fabric: LoopbackFabric,
    conn: Connection,
    qp: LoopbackQp,
    held: VecDeque<Received>,
    got: Vec<(ReceivedKind, Vec<u8>, u32)>,
    results: HashMap<u64, Result<(), WcStatus>>,
    /// One-sided transfers' results and their buffers, by token.
    one_sided: HashMap<u64, (Result<(), WcStatus>, Buf)>,
    closed: Option<CloseReason>,
    next_token: u64,
}

struct Pair {
    fabric: LoopbackFabric,
    a: Side,
    b: Side,
}

fn small() -> Config {
    Config {
        recv_depth: 8,
        send_depth: 16,
        msg_size: 256,
        slot_size: 1024,
        slot_count: 4,
        separate_indication: false,
    }
}

impl Pair {
    fn new(cfg_a: Config, cfg_b: Config) -> Pair {
        let fabric = LoopbackFabric::new();
        let node_b = fabric.node();
        Pair::on(fabric, node_b, cfg_a, cfg_b)
    }

    fn on(fa: LoopbackFabric, fb: LoopbackFabric, cfg_a: Config, cfg_b: Config) -> Pair {
        let mut ca = Connection::new(fa.domain(), cfg_a).unwrap();
        let mut cb = Connection::new(fb.domain(), cfg_b).unwrap();
        let (pa, pb) = (ca.local_params(), cb.local_params());
        let (qa, qb) = fa.connect_pair(&fb, (&pa, ca.initial_recvs()), (&pb, cb.initial_recvs()));
        ca.handle_connected(qa.peer_params(), qa.capabilities()).unwrap();
        cb.handle_connected(qb.peer_params(), qb.capabilities()).unwrap();
        let side = |fabric: LoopbackFabric, conn, qp| Side {
            fabric,
            conn,
            qp,
            held: VecDeque::new(),
            got: Vec::new(),
            results: HashMap::new(),
            one_sided: HashMap::new(),
            closed: None,
            next_token: 0,
        };
        Pair {
            fabric: fa.clone(),
            a: side(fa, ca, qa),
            b: side(fb, cb, qb),
        }
    }

    /// Runs both sides until neither has work, completions or held operations.
    fn drive(&mut self) {
        loop {
            let mut progress = self.a.step() | self.b.step();
            progress |= self.fabric.run_until_idle() > 0;
            if !progress {
                return;
            }
        }
    }

    fn side(&mut self, a: bool) -> &mut Side {
        if a {
            &mut self.a
        } else {
            &mut self.b
        }
    }
}

impl Side {
    /// Posts pending work, reaps completions, collects events. True if anything happened.
    fn step(&mut self) -> bool {
        let mut progress = false;
        let mut batch = Vec::new();
        while let Some(work) = self.conn.poll_work() {
            progress = true;
            match work {
                Work::Recv(wr) => {
                    if let Err((e, wr)) = self.qp.post_recv(wr) {
                        self.conn.handle_recv_post_failure(e.to_string(), wr);
                    }
                }
                Work::Send(wr) => batch.push(wr),
                Work::SendPlaced(..) => panic!("loopback never places"),
                Work::Disconnect => self.qp.disconnect(),
            }
        }
        if !batch.is_empty() {
            if let Err(e) = self.qp.post_send(&mut batch) {
                self.conn.handle_post_failure(e.to_string(), batch);
            }
        }
        let mut completions = Vec::new();
        while self.qp.poll(&mut completions, 64) > 0 {}
        for c in completions {
            progress = true;
            self.conn.handle_completion(c);
        }
        while let Some(event) = self.conn.poll_event() {
            progress = true;
            match event {
                Event::Received(r) => {
                    self.got.push((r.kind(), r.data().to_vec(), r.seq()));
                    self.held.push_back(r);
                }
                Event::Sent { token, result } => {
                    assert!(
                        self.results.insert(token, result).is_none(),
                        "token {token} resolved twice"
                    );
                }
                Event::OneSided { token, result, buf } => {
                    assert!(
                        self.one_sided.insert(token, (result, buf)).is_none(),
                        "token {token} resolved twice"
                    );
                }
                Event::Closed(reason) => {
                    assert!(self.closed.is_none(), "closed twice");
                    self.closed = Some(reason);
                }
            }
        }
        progress
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn send(&mut self, data: &[u8]) -> Result<u64, SendError> {
        let t = self.token();
        self.conn.send(t, &[data]).map(|()| t)
    }

    fn push(&mut self, data: &[u8]) -> Result<u64, SendError> {
        let pool = self
            .fabric
            .domain()
            .register(data.len().max(1), 1, Access::LOCAL_WRITE)
            .unwrap();
        let mut buf = pool.checkout().unwrap();
        buf.fill(data).unwrap();
        let t = self.token();
        self.conn.push(t, buf).map(|()| t).map_err(|e| e.error)
    }

    fn release_all(&mut self) {
        while let Some(r) = self.held.pop_front() {
            self.conn.release(r);
        }
    }
}

#[test]
fn credits_run_out_and_come_back() {
    let mut p = Pair::new(small(), small());
    let mut sent = 0;
    while p.a.send(b"m").is_ok() {
        sent += 1;
    }
    // Eight credits, one kept in reserve for credit updates.
    assert_eq!(sent, 7);
    assert_eq!(p.a.send(b"m"), Err(SendError::Full));
    p.drive();
    assert_eq!(p.b.held.len(), 7);
    assert_eq!(p.a.conn.credits(), 1);
    p.b.release_all();
    p.drive();
    // Releasing one by one, B owed 4 (half the window) after the fourth and
    // sent a control message with them; the last three stay owed.
    assert_eq!(p.a.conn.credits(), 5);
    assert_eq!(p.b.conn.owed(), 3);
    assert_eq!(p.b.conn.recvs_posted(), 8);
    assert!(p.a.results.values().all(Result::is_ok));
    assert_eq!(p.a.results.len(), 7);
}

#[test]
fn gathered_parts_arrive_as_one_message() {
    let mut p = Pair::new(small(), small());
    let t = p.a.token();
    p.a.conn.send(t, &[b"head ", b"", b"and body"]).unwrap();
    p.drive();
    assert_eq!(p.b.got.len(), 1);
    assert_eq!(p.b.got[0].1, b"head and body");
    assert_eq!(p.a.results[&t], Ok(()));
    // The limit is on the total.
    let half = vec![0u8; 129];
    let t = p.a.token();
    assert_eq!(
        p.a.conn.send(t, &[&half, &half]),
        Err(SendError::TooLarge { len: 258, max: 256 })
    );
}

#[test]
fn credits_piggyback_on_reverse_traffic() {
    let mut p = Pair::new(small(), small());
    p.a.send(b"ping").unwrap();
    p.drive();
    p.b.release_all();
    p.drive();
    assert_eq!(p.b.conn.owed(), 1, "one owed credit is below the update threshold");
    p.b.send(b"pong").unwrap();
    assert_eq!(p.b.conn.owed(), 0, "the reply carries it");
    p.drive();
    assert_eq!(p.a.conn.credits(), 8);
}

#[test]
fn one_way_traffic_never_deadlocks() {
    let mut p = Pair::new(small(), small());
    let mut sent = 0u32;
    let mut stalls = 0;
    while sent < 5000 {
        match p.a.send(&sent.to_le_bytes()) {
            Ok(_) => sent += 1,
            Err(SendError::Full) => {
                p.drive();
                p.b.release_all();
                p.drive();
                stalls += 1;
                assert!(stalls < 5000, "no progress");
            }
            Err(e) => panic!("{e}"),
        }
    }
    p.drive();
    let order: Vec<u32> =
        p.b.got
            .iter()
            .map(|(_, d, _)| u32::from_le_bytes(d[..4].try_into().unwrap()))
            .collect();
    assert_eq!(order, (0..5000).collect::<Vec<_>>());
    assert!(p.b.closed.is_none() && p.a.closed.is_none());
}

#[test]
fn slots_are_reused_after_release() {
    let mut p = Pair::new(small(), small());
    for i in 0..4u8 {
        p.a.push(&[i; 1000]).unwrap();
    }
    assert_eq!(p.a.conn.free_peer_slots(), 0);
    assert!(matches!(p.a.push(b"x"), Err(SendError::Full)));
    p.drive();
    assert_eq!(p.b.got.len(), 4);
    assert!(p
        .b
        .got
        .iter()
        .enumerate()
        .all(|(i, (k, d, _))| *k == ReceivedKind::Push && d == &vec![i as u8; 1000]));
    let first = p.b.held.pop_front().unwrap();
    p.b.conn.release(first);
    p.drive();
    assert_eq!(
        p.a.conn.free_peer_slots(),
        1,
        "one release crosses the threshold of slot_count / 4"
    );
    p.a.push(b"again").unwrap();
    p.drive();
    assert_eq!(p.b.got.last().unwrap().1, b"again");
    assert!(p.a.push(&[0; 1025]).is_err(), "larger than a slot");
}

#[test]
fn push_with_immediate_consumes_a_credit_and_no_message() {
    let mut p = Pair::new(small(), small());
    p.a.push(b"payload").unwrap();
    assert_eq!(p.a.conn.inflight(), 1);
    assert_eq!(p.a.conn.credits(), 7);
    p.drive();
    assert_eq!(p.b.got[0].0, ReceivedKind::Push);
    assert_eq!(p.b.conn.owed(), 1, "the consumed receive was reposted");
}

#[test]
fn separate_indication_mode() {
    let cfg_b = Config {
        separate_indication: true,
        ..small()
    };
    let mut p = Pair::new(small(), cfg_b);
    assert!(
        p.a.conn.separate_indication() && p.b.conn.separate_indication(),
        "either side can ask"
    );
    let t = p.a.push(b"written, then indicated").unwrap();
    assert_eq!(p.a.conn.inflight(), 2, "a write and an indication message");
    p.a.send(b"after").unwrap();
    p.drive();
    assert_eq!(p.b.got[0].0, ReceivedKind::Push);
    assert_eq!(p.b.got[0].1, b"written, then indicated");
    assert_eq!(p.b.got[1].1, b"after");
    assert_eq!(p.a.results[&t], Ok(()));
}

#[test]
fn direct_placement_lands_in_the_exposed_buffer() {
    for (separate, flag) in [(false, false), (true, false), (false, true), (true, true)] {
        let cfg = Config {
            separate_indication: separate,
            ..small()
        };
        let mut p = Pair::new(cfg.clone(), cfg);
        let pool =
            p.b.fabric
                .domain()
                .register(8192, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
                .unwrap();
        let target = p.b.conn.expose(pool.checkout().unwrap()).unwrap();
        // The target travels to the pusher in an ordinary message.
        p.b.send(&target.encode()).unwrap();
        p.drive();
        let advertised = DirectTarget::decode(&p.a.got[0].1).unwrap();
        assert_eq!(advertised, target);
        let src_pool = p.a.fabric.domain().register(8192, 1, Access::LOCAL_WRITE).unwrap();
        let mut src = src_pool.checkout().unwrap();
        src.fill(&[0x5a; 5000]).unwrap();
        p.a.conn
            .push_direct(99, src, DirectPush::to(advertised).completing(flag))
            .unwrap();
        p.drive();
        assert_eq!(
            p.b.got[0].0,
            ReceivedKind::Direct {
                tag: target.tag,
                completes_request: flag
            }
        );
        let r = p.b.held.pop_front().unwrap();
        let buf = r.into_buf().unwrap();
        assert_eq!(&buf[..], &[0x5a; 5000][..]);
        assert_eq!(p.a.results[&99], Ok(()));
        assert!(p.b.conn.unexpose(target.tag).is_none(), "the exposure was consumed");
    }
}

#[test]
fn one_sided_transfers_spend_no_credit_and_hand_their_buffers_back() {
    let mut p = Pair::new(small(), small());
    let region =
        p.b.fabric
            .domain()
            .register(
                4096,
                1,
                Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE,
            )
            .unwrap();
    let mut mem = region.checkout().unwrap();
    let pattern: Vec<u8> = (0..4096).map(|i| (i % 253) as u8).collect();
    mem.fill(&pattern).unwrap();
    let remote = mem.remote();
    let at = |offset: u64| RemoteAddr {
        addr: remote.addr + offset,
        rkey: remote.rkey,
    };
    let credits = p.a.conn.credits();
    let pool = p.a.fabric.domain().register(4096, 2, Access::LOCAL_WRITE).unwrap();
    let mut dst = pool.checkout().unwrap();
    dst.set_len(100);
    p.a.conn.read_remote(7, dst, at(10)).unwrap();
    p.drive();
    let (result, back) = p.a.one_sided.remove(&7).expect("the read resolved");
    assert_eq!(result, Ok(()));
    assert_eq!(&back[..], &pattern[10..110]);
    let mut src = pool.checkout().unwrap();
    src.fill(&[9; 50]).unwrap();
    p.a.conn.write_remote(8, src, at(1000)).unwrap();
    p.drive();
    let (result, src) = p.a.one_sided.remove(&8).expect("the write resolved");
    assert_eq!((result, src.len()), (Ok(()), 50));
    assert!(mem[1000..1050].iter().all(|&b| b == 9));
    assert_eq!(p.a.conn.credits(), credits, "no credit spent");
    assert!(
        p.b.got.is_empty() && p.a.results.is_empty(),
        "no message, no Sent event"
    );
    drop((back, src));
    // Refused before anything is posted, the buffer handed back.
    let unwritable = p.a.fabric.domain().register(64, 1, Access::REMOTE_READ).unwrap();
    let e =
        p.a.conn
            .read_remote(9, unwritable.checkout().unwrap(), at(0))
            .unwrap_err();
    assert!(matches!(e.error, SendError::BadBuffer(_)), "{:?}", e.error);
    let e = p.a.conn.read_remote(9, pool.checkout().unwrap(), at(0)).unwrap_err();
    assert!(
        matches!(e.error, SendError::TooLarge { .. }),
        "an empty read: {:?}",
        e.error
    );
    // A wrong key: the transfer fails and the connection closes.
    let mut dst = e.buf;
    dst.set_len(16);
    let wrong = RemoteAddr {
        addr: remote.addr,
        rkey: crate::mr::RKey(remote.rkey.0 ^ 1),
    };
    p.a.conn.read_remote(10, dst, wrong).unwrap();
    p.drive();
    assert!(p.a.one_sided[&10].0.is_err());
    assert!(matches!(p.a.closed, Some(CloseReason::Fabric(_))), "{:?}", p.a.closed);
}

#[test]
fn exposure_tags_leave_room_for_the_flag() {
    let p = Pair::new(small(), small());
    let pool =
        p.b.fabric
            .domain()
            .register(64, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .unwrap();
    let mut conn = p.b.conn;
    // Expose and withdraw one buffer over a whole rotation and then some:
    // every tag stays below the flag bit, and the rotation wraps.
    let mut seen_zero_again = false;
    for i in 0..(u32::from(wire::MAX_TAG) + 3) {
        let target = conn.expose(pool.checkout().unwrap()).unwrap();
        assert!(target.tag <= wire::MAX_TAG, "tag {} at round {i}", target.tag);
        seen_zero_again |= i > 0 && target.tag == 0;
        drop(conn.unexpose(target.tag).unwrap());
    }
    assert!(seen_zero_again, "tags rotate back to 0 after MAX_TAG");
    // A target naming a tag with the flag bit set is malformed.
    let mut bogus = DirectTarget {
        tag: wire::DIRECT_FLAG,
        remote: conn.expose(pool.checkout().unwrap()).unwrap().remote,
    }
    .encode();
    assert!(DirectTarget::decode(&bogus).is_none());
    bogus[0..2].copy_from_slice(&wire::MAX_TAG.to_le_bytes());
    assert!(DirectTarget::decode(&bogus).is_some());
}

#[test]
fn expose_refuses_memory_without_remote_write() {
    let p = Pair::new(small(), small());
    let pool = p.b.fabric.domain().register(64, 1, Access::LOCAL_WRITE).unwrap();
    let mut conn = p.b.conn;
    assert!(conn.expose(pool.checkout().unwrap()).is_err());
}

#[test]
fn disconnect_flushes_everything_in_flight() {
    let mut p = Pair::new(small(), small());
    p.fabric.set_faults(Faults {
        delay: 10,
        ..Faults::default()
    });
    let t1 = p.a.send(b"one").unwrap();
    let t2 = p.a.push(b"two").unwrap();
    // Both are held by the fabric; now the connection goes down.
    p.a.conn.close();
    p.drive();
    assert_eq!(p.a.results[&t1], Err(WcStatus::Flushed));
    assert_eq!(p.a.results[&t2], Err(WcStatus::Flushed));
    assert_eq!(p.a.closed, Some(CloseReason::Local));
    assert_eq!(p.b.closed, Some(CloseReason::Disconnected));
    assert!(
        p.a.conn.is_drained() && p.b.conn.is_drained(),
        "nothing left with the fabric"
    );
    assert!(p.b.got.is_empty());
    assert!(matches!(p.a.send(b"late"), Err(SendError::Closed(CloseReason::Local))));
}

#[test]
fn fault_break_resolves_every_token() {
    for break_at in 1..12 {
        let mut p = Pair::new(small(), small());
        p.fabric.set_faults(Faults {
            break_at: Some(break_at),
            ..Faults::default()
        });
        let mut tokens = Vec::new();
        for i in 0..20u8 {
            let r = if i % 3 == 0 { p.a.push(&[i; 10]) } else { p.a.send(&[i]) };
            match r {
                Ok(t) => tokens.push(t),
                Err(_) => {
                    p.drive();
                    p.b.release_all();
                }
            }
            p.drive();
        }
        p.b.release_all();
        p.drive();
        assert!(p.a.closed.is_some(), "break at {break_at} closed the connection");
        for t in &tokens {
            assert!(p.a.results.contains_key(t), "token {t} resolved (break at {break_at})");
        }
        assert!(p.a.conn.is_drained() && p.b.conn.is_drained());
        // What was delivered is an in-order prefix of what was accepted.
        let seqs: Vec<u32> = p.b.got.iter().map(|g| g.2).collect();
        assert_eq!(seqs, (0..seqs.len() as u32).collect::<Vec<_>>());
    }
}

#[test]
fn credit_inflation_is_a_violation() {
    let mut p = Pair::new(small(), small());
    // Forge a control message granting more credits than the window.
    forge(&mut p, Kind::Control, 100, &[]);
    assert!(
        matches!(&p.b.closed, Some(CloseReason::Violation(r)) if r.contains("credits")),
        "{:?}",
        p.b.closed
    );
    assert!(p.a.closed.is_some(), "the violator's connection went down too");
}

#[test]
fn malformed_and_misdirected_pushes_are_violations() {
    // A push naming a slot that is already delivered.
    let mut p = Pair::new(small(), small());
    p.a.push(b"first").unwrap();
    p.drive();
    let peer = *p.a.conn.peer_params().unwrap();
    let pool = p.a.fabric.domain().register(64, 1, Access::NONE).unwrap();
    let mut buf = pool.checkout().unwrap();
    buf.fill(b"again").unwrap();
    p.a.qp
        .post_send(&mut vec![SendWr {
            id: WrId(1 << 40),
            op: SendOp::Write {
                buf,
                remote: RemoteAddr {
                    addr: peer.slot_addr,
                    rkey: peer.slot_rkey,
                },
                imm: Some(wire::encode_imm(Target::Slot(0), 1)),
            },
        }])
        .unwrap();
    p.drive();
    assert!(
        matches!(&p.b.closed, Some(CloseReason::Violation(r)) if r.contains("not granted")),
        "{:?}",
        p.b.closed
    );
}

#[test]
fn reordering_across_queue_pairs_keeps_each_in_order() {
    let world = LoopbackFabric::new();
    world.set_faults(Faults {
        reorder_seed: Some(42),
        delay: 1,
        ..Faults::default()
    });
    let mut p1 = Pair::on(world.clone(), world.node(), small(), small());
    let mut p2 = Pair::on(world.node(), world.node(), small(), small());
    for i in 0..6u8 {
        p1.a.send(&[1, i]).unwrap();
        p2.a.send(&[2, i]).unwrap();
        p2.b.send(&[3, i]).unwrap();
    }
    p1.drive();
    p2.drive();
    for (got, tag) in [(&p1.b.got, 1), (&p2.b.got, 2), (&p2.a.got, 3)] {
        let data: Vec<Vec<u8>> = got.iter().map(|g| g.1.clone()).collect();
        assert_eq!(data, (0..6).map(|i| vec![tag, i]).collect::<Vec<_>>());
    }
}

#[test]
fn bad_configs_and_params_are_refused() {
    let pd = ProtectionDomain::new();
    for cfg in [
        Config {
            recv_depth: 2,
            ..small()
        },
        Config { msg_size: 0, ..small() },
        Config {
            slot_size: 0,
            ..small()
        },
        Config {
            send_depth: 1,
            ..small()
        },
    ] {
        assert!(matches!(Connection::new(&pd, cfg), Err(ProtoError::InvalidConfig(_))));
    }
    let mut conn = Connection::new(&pd, small()).unwrap();
    let caps = LoopbackFabric::new().capabilities();
    assert!(matches!(
        conn.handle_connected(b"garbage", caps),
        Err(ProtoError::BadParams(_))
    ));
    assert!(matches!(conn.send(1, &[b"x"]), Err(SendError::NotConnected)));
}

// ----- property tests -----

#[derive(Debug, Clone)]
enum Op {
    Send {
        from_a: bool,
        len: usize,
    },
    Push {
        from_a: bool,
        len: usize,
    },
    Release {
        on_a: bool,
        index: usize,
    },
    ReleaseAll {
        on_a: bool,
    },
    /// B grows to the full configuration (a no-op once grown).
    Grow,
    Drive,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), 0usize..=256).prop_map(|(from_a, len)| Op::Send { from_a, len }),
        2 => (any::<bool>(), 0usize..=1024).prop_map(|(from_a, len)| Op::Push { from_a, len }),
        3 => (any::<bool>(), 0usize..8).prop_map(|(on_a, index)| Op::Release { on_a, index }),
        1 => any::<bool>().prop_map(|on_a| Op::ReleaseAll { on_a }),
        1 => Just(Op::Grow),
        2 => Just(Op::Drive),
    ]
}

/// Unique, checkable payload: sender, counter, then filler.
fn payload(from_a: bool, n: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(5)];
    v[0] = from_a as u8;
    v[1..5].copy_from_slice(&n.to_le_bytes());
    for (i, x) in v.iter_mut().enumerate().skip(5) {
        *x = (n as usize + i) as u8;
    }
    v
}

/// The invariants that hold whenever the harness is quiescent.
fn check_quiescent(p: &Pair) -> Result<(), TestCaseError> {
    for (tx, rx, name) in [(&p.a, &p.b, "a->b"), (&p.b, &p.a, "b->a")] {
        prop_assert!(tx.closed.is_none(), "{name}: closed: {:?}", tx.closed);
        let held_msgs = rx.held.iter().filter(|r| r.kind() == ReceivedKind::Message).count() as u32;
        let held_slots = rx.held.iter().filter(|r| r.kind() == ReceivedKind::Push).count();
        let window = u32::from(rx.conn.config().recv_depth);
        // Every receive buffer is posted or held by the application.
        prop_assert_eq!(rx.conn.recvs_posted() + held_msgs, window, "{}: receive buffers", name);
        // Every posted receive backs exactly one credit or one owed credit:
        // no Send without a posted buffer, no credit created or lost.
        prop_assert_eq!(
            tx.conn.credits() + rx.conn.owed(),
            rx.conn.recvs_posted(),
            "{}: credits",
            name
        );
        // Every slot is free at the sender, waiting to be returned, or held;
        // slots a grant has yet to name (it waits for a credit) are none
        // of these yet.
        let granted = if rx.conn.grant_slots {
            0
        } else {
            rx.conn.config().slot_count as usize
        };
        prop_assert_eq!(
            tx.conn.free_peer_slots() + rx.conn.released_pending() + held_slots,
            granted,
            "{}: slots",
            name
        );
        prop_assert_eq!(tx.conn.inflight(), 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_operations_keep_the_books(
        ops in proptest::collection::vec(op(), 1..120),
        separate in any::<bool>(),
        delay in 0u64..3,
        reorder_seed in proptest::option::of(any::<u64>()),
        b_opens_small in any::<bool>(),
    ) {
        let cfg = Config { separate_indication: separate, ..small() };
        let b_cfg = if b_opens_small { Config { separate_indication: separate, ..lobby() } } else { cfg.clone() };
        let mut p = Pair::new(cfg.clone(), b_cfg);
        let grow = |p: &mut Pair| -> Result<(), TestCaseError> {
            let domain = p.b.fabric.domain().clone();
            p.b.conn.grow(&domain, cfg.clone()).map_err(|e| TestCaseError::fail(format!("grow: {e}")))
        };
        // Held and interleaved operations make the two directions cross.
        p.fabric.set_faults(Faults { delay, reorder_seed, break_at: None });
        let mut sent: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        let mut counter = 0u32;
        for op in ops {
            match op {
                Op::Send { from_a, len } => {
                    counter += 1;
                    let data = payload(from_a, counter, len.min(p.side(from_a).conn.max_message()));
                    match p.side(from_a).send(&data) {
                        Ok(_) => sent[from_a as usize].push(data),
                        Err(SendError::Full) => {}
                        Err(e) => prop_assert!(false, "send failed: {e}"),
                    }
                }
                Op::Push { from_a, len } => {
                    counter += 1;
                    let data = payload(from_a, counter, len);
                    let granted = p.side(from_a).conn.max_push() > 0;
                    match p.side(from_a).push(&data) {
                        Ok(_) => sent[from_a as usize].push(data),
                        Err(SendError::Full) => {}
                        Err(SendError::BadBuffer(_)) if !granted => {}
                        Err(e) => prop_assert!(false, "push failed: {e}"),
                    }
                }
                Op::Release { on_a, index } => {
                    let side = p.side(on_a);
                    if !side.held.is_empty() {
                        let i = index % side.held.len();
                        let r = side.held.remove(i).expect("index in range");
                        side.conn.release(r);
                    }
                }
                Op::ReleaseAll { on_a } => p.side(on_a).release_all(),
                Op::Grow => grow(&mut p)?,
                Op::Drive => {
                    p.drive();
                    check_quiescent(&p)?;
                }
            }
        }
        grow(&mut p)?;
        p.drive();
        check_quiescent(&p)?;
        // Drain: release everything until nothing moves.
        for _ in 0..4 {
            p.a.release_all();
            p.b.release_all();
            p.drive();
        }
        check_quiescent(&p)?;
        // Exactly once, in order.
        for (rx, from_a) in [(&p.b, true), (&p.a, false)] {
            let got: Vec<&Vec<u8>> = rx.got.iter().map(|g| &g.1).collect();
            let want: Vec<&Vec<u8>> = sent[from_a as usize].iter().collect();
            prop_assert_eq!(got, want);
            let seqs: Vec<u32> = rx.got.iter().map(|g| g.2).collect();
            prop_assert_eq!(seqs, (0..rx.got.len() as u32).collect::<Vec<_>>());
        }
        // Every accepted send resolved successfully, once.
        prop_assert!(p.a.results.values().chain(p.b.results.values()).all(Result::is_ok));
        prop_assert_eq!(p.a.results.len(), sent[1].len());
        prop_assert_eq!(p.b.results.len(), sent[0].len());
        // After the drain both directions can send again: nothing leaked.
        prop_assert!(p.a.conn.can_send() && p.b.conn.can_send());
        prop_assert!(p.a.conn.free_peer_slots() + p.b.conn.released_pending() == 4);
    }
}

#[test]
fn exposure_tags_rotate_and_unexpose_returns_the_buffer() {
    let mut p = Pair::new(small(), small());
    let pool =
        p.b.fabric
            .domain()
            .register(64, 3, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .unwrap();
    let first = p.b.conn.expose(pool.checkout().unwrap()).unwrap();
    let buf = p.b.conn.unexpose(first.tag).expect("not pushed to: handed back");
    assert!(p.b.conn.unexpose(first.tag).is_none());
    let second = p.b.conn.expose(buf).unwrap();
    assert_ne!(second.tag, first.tag, "a freed tag is not reused at once");
    let third = p.b.conn.expose(pool.checkout().unwrap()).unwrap();
    assert_ne!(third.tag, second.tag);
}

/// A server's side opened small: the fewest receives, no slots.
fn lobby() -> Config {
    Config {
        recv_depth: MIN_RECV_DEPTH,
        send_depth: 2,
        slot_count: 0,
        ..small()
    }
}

#[test]
fn a_grant_deepens_the_receive_queue_and_grants_slots() {
    let mut p = Pair::new(small(), lobby());
    assert_eq!(p.a.conn.credits(), u32::from(MIN_RECV_DEPTH));
    assert_eq!(p.a.conn.max_push(), 0);
    assert_eq!(
        p.a.push(b"early"),
        Err(SendError::BadBuffer("the peer granted no push slots"))
    );
    let domain = p.b.fabric.domain().clone();
    p.b.conn.grow(&domain, small()).unwrap();
    p.drive();
    // Every receive B posts is A's credit; the grant spent one of B's.
    assert_eq!(p.a.conn.credits(), u32::from(small().recv_depth));
    assert_eq!(p.b.conn.recvs_posted(), u32::from(small().recv_depth));
    assert_eq!(p.a.conn.max_push(), small().slot_size as usize);
    assert_eq!(p.a.conn.free_peer_slots(), usize::from(small().slot_count));
    let mut sent = 0;
    while p.a.send(b"m").is_ok() {
        sent += 1;
    }
    assert_eq!(sent, small().recv_depth - 1, "all of the new window but the reserve");
    p.drive();
    p.b.release_all();
    p.drive();
    p.a.push(b"pushed").unwrap();
    p.drive();
    assert_eq!(p.b.got.last().map(|g| g.1.as_slice()), Some(&b"pushed"[..]));
    // B's send buffers grew too: it can answer with more than two at once.
    let mut answers = 0;
    while p.b.send(b"a").is_ok() {
        answers += 1;
    }
    assert!(answers > 2, "{answers}");
    p.drive();
    assert!(p.a.closed.is_none() && p.b.closed.is_none());
    assert!(p.a.results.values().chain(p.b.results.values()).all(Result::is_ok));
}

#[test]
fn a_grant_never_shrinks_or_regrants() {
    let mut p = Pair::new(small(), small());
    let domain = p.b.fabric.domain().clone();
    let refused = [
        Config {
            recv_depth: 4,
            ..small()
        },
        Config {
            slot_count: 8,
            ..small()
        },
        Config {
            msg_size: 512,
            ..small()
        },
    ];
    for cfg in refused {
        assert!(
            matches!(p.b.conn.grow(&domain, cfg.clone()), Err(ProtoError::InvalidConfig(_))),
            "{cfg:?}"
        );
    }
    // A refused grow changed nothing.
    assert_eq!(p.b.conn.config(), &small());
    assert_eq!(p.b.conn.poll_work().map(|_| ()), None);
    let mut closed = Connection::new(&domain, small()).unwrap();
    assert!(matches!(closed.grow(&domain, small()), Err(ProtoError::NotOpen)));
}

/// Sends a forged message of `kind` from A, with `credits` in its header
/// and `payload` after it, past A's connection (straight to its queue
/// pair), and runs both sides.
fn forge(p: &mut Pair, kind: Kind, credits: u16, payload: &[u8]) {
    let pool = p.a.fabric.domain().register(128, 1, Access::NONE).unwrap();
    let mut buf = pool.checkout().unwrap();
    let header = Header {
        kind,
        credits,
        releases: 0,
        seq: 0,
        len: payload.len() as u32,
    };
    header.encode(buf.spare_capacity());
    buf.spare_capacity()[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    buf.set_len(HEADER_LEN + payload.len());
    p.a.qp
        .post_send(&mut vec![SendWr {
            id: WrId(1 << 40),
            op: SendOp::Send { buf, imm: None },
        }])
        .unwrap();
    p.drive();
}

#[test]
fn forged_grants_are_violations() {
    let none = Grant {
        recv_depth: small().recv_depth,
        slot_count: 0,
        slot_size: 0,
        slot_rkey: crate::mr::RKey(0),
        slot_addr: 0,
    };
    let cases = [
        (Grant { recv_depth: 4, ..none }, 0, "lowers the receive depth"),
        (Grant { recv_depth: 9, ..none }, 5, "credits"),
        (
            Grant {
                slot_count: 2,
                slot_size: 1024,
                slot_rkey: crate::mr::RKey(1),
                slot_addr: 4096,
                ..none
            },
            0,
            "granted twice",
        ),
    ];
    for (grant, credits, why) in cases {
        let mut p = Pair::new(small(), small());
        forge(&mut p, Kind::Grant, credits, &grant.encode());
        assert!(
            matches!(&p.b.closed, Some(CloseReason::Violation(r)) if r.contains(why)),
            "{why}: {:?}",
            p.b.closed
        );
    }
    // A grant that adds receives (and their credits) is taken.
    let mut p = Pair::new(small(), small());
    forge(&mut p, Kind::Grant, 4, &Grant { recv_depth: 12, ..none }.encode());
    assert!(p.b.closed.is_none(), "{:?}", p.b.closed);
    assert_eq!(p.b.conn.peer_params().map(|pp| pp.recv_depth), Some(12));
}

#[test]
fn a_gathered_send_is_one_message_and_hands_back_what_it_refuses() {
    let mut p = Pair::new(small(), small());
    let pool = p.a.fabric.domain().register(200, 2, Access::LOCAL_WRITE).unwrap();
    let mut tail = pool.checkout().unwrap();
    tail.fill(&[9; 200]).unwrap();
    let t = p.a.token();
    p.a.conn.send_gather(t, &[b"head:", b"more:"], tail).unwrap();
    p.drive();
    let mut want = b"head:more:".to_vec();
    want.extend_from_slice(&[9; 200]);
    assert_eq!(p.b.got.last().map(|g| &g.1), Some(&want));
    assert_eq!(p.a.results.get(&t), Some(&Ok(())));
    assert_eq!(pool.available(), 2, "the tail is back once the Send completed");
    // Too long for a message: the tail comes back with the error.
    let mut tail = pool.checkout().unwrap();
    tail.fill(&[1; 200]).unwrap();
    let refused = p.a.conn.send_gather(p.a.next_token, &[&[0; 100]], tail).unwrap_err();
    assert!(matches!(refused.error, SendError::TooLarge { len: 300, max: 256 }));
    assert_eq!(refused.buf.len(), 200);
}
