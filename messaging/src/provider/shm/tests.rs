use std::time::Duration;

use super::sys::Socket;
use super::*;
use crate::mr::{Access, Buf};
use crate::provider::conformance::{connect_pair, pool, recvs, wait_for};
use crate::provider::{RemoteAddr, WrId};

const LONG: Duration = Duration::from_secs(10);

fn send(buf: Buf, id: u64) -> SendWr {
    SendWr {
        id: WrId(id),
        op: SendOp::Send { buf, imm: None },
    }
}

#[test]
fn bad_hellos_are_refused_and_the_listener_keeps_accepting() {
    let fabric = ShmFabric::new();
    let listener = fabric.listen("").expect("listen");
    let name = socket_name(&listener.local_addr()).expect("own address parses");
    std::thread::scope(|s| {
        let client = s.spawn(|| {
            // Not a chanio peer, then a chanio hello without descriptors,
            // then a hello whose length field lies.
            for bytes in [
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                hello_bytes(KIND_HELLO, b"no fds"),
                {
                    let mut h = hello_bytes(KIND_HELLO, b"abc");
                    h[12] = 200;
                    h
                },
            ] {
                let raw = Socket::connect(&name).expect("raw connect");
                raw.send(&bytes, &[]).expect("send junk");
                let end = raw.recv_until(64, Instant::now() + LONG);
                assert!(end.is_err(), "refused without an answer: {end:?}");
            }
            fabric
                .connect(&listener.local_addr(), fabric.domain(), b"good", vec![])
                .expect("real connect")
        });
        let incoming = listener.accept(Some(LONG)).expect("accept survives bad hellos");
        assert_eq!(incoming.peer_params(), b"good");
        let _server = incoming.accept(fabric.domain(), b"", vec![]).expect("accept");
        let _client = client.join().expect("client thread");
    });
}

#[test]
fn rejection_reaches_the_client_and_shutdown_stops_accepting() {
    let fabric = ShmFabric::new();
    let listener = fabric.listen("").expect("listen");
    std::thread::scope(|s| {
        let server = s.spawn(|| listener.accept(Some(LONG)).expect("accept").reject("go away"));
        match fabric.connect(&listener.local_addr(), fabric.domain(), b"", vec![]) {
            Err(FabricError::Rejected { reason, .. }) => assert_eq!(reason, "go away"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        server.join().expect("server thread");
    });
    listener.shutdown();
    assert!(matches!(listener.accept(Some(LONG)), Err(FabricError::Shutdown)));
    assert!(matches!(
        listener.accept(Some(Duration::ZERO)),
        Err(FabricError::Shutdown)
    ));
}

#[test]
fn accept_times_out() {
    let fabric = ShmFabric::new();
    let listener = fabric.listen("").expect("listen");
    assert!(matches!(
        listener.accept(Some(Duration::from_millis(20))),
        Err(FabricError::Timeout(_))
    ));
}

#[test]
fn bad_addresses_are_refused() {
    let fabric = ShmFabric::new();
    assert!(matches!(
        fabric.connect("shm://", fabric.domain(), b"", vec![]),
        Err(FabricError::BadAddress { .. })
    ));
    assert!(matches!(
        fabric.connect(&format!("shm://{}", "x".repeat(200)), fabric.domain(), b"", vec![]),
        Err(FabricError::BadAddress { .. })
    ));
    assert!(matches!(
        fabric.connect("shm://nobody-listens-here", fabric.domain(), b"", vec![]),
        Err(FabricError::Connect { .. })
    ));
}

#[test]
fn filesystem_path_addresses_work_and_are_removed() {
    let path = std::env::temp_dir().join(format!("chanio-shm-test-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let addr = format!("shm://{}", path.display());
    let fabric = ShmFabric::new();
    let p = pool(&fabric, 64, 4, Access::ALL);
    let (a, b) = connect_pair(&fabric, &addr, (b"", vec![]), (b"", recvs(&p, 1, 0)));
    let mut buf = p.checkout().expect("chunk");
    buf.fill(b"via a path").expect("fits");
    a.post_send(&mut vec![send(buf, 1)]).expect("post");
    assert_eq!(&wait_for(&*b, 1)[0].buf[..], b"via a path");
    assert!(!path.exists(), "the listener removed its socket file");
}

#[test]
fn buffers_of_another_domain_are_a_local_protection_error() {
    let fabric = ShmFabric::new();
    let other = ShmFabric::new();
    let p = pool(&fabric, 64, 4, Access::ALL);
    let foreign = pool(&other, 64, 1, Access::ALL);
    let heap = ProtectionDomain::new().register(64, 1, Access::ALL).expect("register");
    for bad in [foreign.checkout(), heap.checkout()] {
        let (a, _b) = connect_pair(&fabric, "", (b"", vec![]), (b"", recvs(&p, 1, 0)));
        let mut buf = bad.expect("chunk");
        buf.fill(b"x").expect("fits");
        a.post_send(&mut vec![send(buf, 1)]).expect("post");
        let got = wait_for(&*a, 1);
        assert_eq!(got[0].status, WcStatus::LocalProtectionError);
        assert!(a.is_failed());
    }
}

#[test]
fn registrations_come_and_go_while_connected() {
    // Each round posts from a fresh registration, whose memfd is exported,
    // then drops it, so the next export also unexports the dead one.
    let fabric = ShmFabric::new();
    let target = pool(&fabric, 4096, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let desc = target.remote();
    let (a, _b) = connect_pair(&fabric, "", (b"", vec![]), (b"", vec![]));
    for round in 0..50u8 {
        let src = pool(&fabric, 4096, 1, Access::LOCAL_WRITE);
        let mut buf = src.checkout().expect("chunk");
        buf.fill(&[round; 100]).expect("fits");
        a.post_send(&mut vec![SendWr {
            id: WrId(round.into()),
            op: SendOp::Write {
                buf,
                remote: RemoteAddr {
                    addr: desc.addr + u64::from(round),
                    rkey: desc.rkey,
                },
                imm: None,
            },
        }])
        .expect("post");
        let got = wait_for(&*a, 1);
        assert_eq!(got[0].status, WcStatus::Success, "round {round}");
    }
    assert_eq!(fabric.memory.live.lock().len(), 1, "dropped pools freed their memfds");
    let mut t = target.checkout().expect("chunk");
    t.set_len(200);
    assert_eq!(t[49], 49);
    assert_eq!(t[148], 49);
}

/// One ring's worth of shared memory (a sealed memfd, mapped).
fn ring_memory() -> Arc<Mapping> {
    let fd = sys::sealed_memfd("ring-test", RING_BYTES).expect("memfd");
    Arc::new(Mapping::new(&fd, RING_BYTES).expect("map"))
}

#[test]
fn ring_entries_round_trip() {
    let e = Entry {
        opcode: OP_WRITE_IMM,
        status: 3,
        inline: false,
        placed: false,
        len: 0xdead_beef,
        psn: u64::MAX - 1,
        serial: 7,
        offset: 1 << 40,
        addr: 0x7fff_0000_1234,
        rkey: 0x1234_5678,
        imm: 0x8000_0001,
    };
    let map = ring_memory();
    let (mut tx, mut rx) = (Ring::new(map.clone(), 0), Ring::new(map, 0));
    assert!(!rx.prepare_sleep(), "empty ring: sleep");
    tx.push(&[e, Entry::default()], &[]).expect("room");
    assert!(tx.consumer_sleeping());
    rx.woke();
    let mut out = Vec::new();
    assert_eq!(rx.pop(&mut out, 1).expect("sane"), 1);
    assert_eq!(out, vec![e]);
    assert!(rx.prepare_sleep(), "an entry is still there");
    assert_eq!(rx.pop(&mut out, 8).expect("sane"), 1);
    assert!(out.iter().all(|e| !e.inline), "no inline data in these");
    let full: Vec<Entry> = (0..RING_ENTRIES).map(|_| Entry::default()).collect();
    assert!(
        tx.push(&full, &[]).is_err(),
        "popped slots stay taken until the consumer releases them"
    );
    rx.release();
    tx.push(&full, &[]).expect("exactly a ring fits");
    assert!(tx.push(&[Entry::default()], &[]).is_err(), "a full ring refuses");
}

/// An inline Send of `len` bytes with psn `psn`.
fn inline_entry(len: usize, psn: u64) -> Entry {
    Entry {
        opcode: OP_SEND_IMM,
        inline: true,
        len: len as u32,
        psn,
        imm: 0xfeed_0000 | psn as u32,
        ..Entry::default()
    }
}

#[test]
fn inline_entries_carry_their_data_across_slots_and_the_ring_end() {
    let map = ring_memory();
    let (mut tx, mut rx) = (Ring::new(map.clone(), 0), Ring::new(map, 0));
    // Start three slots before the end so continuations wrap around it.
    let pad: Vec<Entry> = (0..RING_ENTRIES - 3).map(|_| Entry::default()).collect();
    tx.push(&pad, &[]).expect("room");
    let mut out = Vec::new();
    while out.len() < pad.len() {
        rx.pop(&mut out, 64).expect("sane");
    }
    rx.release();
    let lens = [0, 1, 40, 41, 96, 97, 152, 153, ring::MAX_INLINE];
    let mut entries = vec![Entry {
        opcode: OP_ACK,
        psn: 9,
        ..Entry::default()
    }];
    let mut bytes = Vec::new();
    for (i, len) in lens.iter().enumerate() {
        entries.push(inline_entry(*len, i as u64));
        bytes.extend((0..*len).map(|b| (b as u8).wrapping_mul(7).wrapping_add(i as u8)));
    }
    let slots: u64 = entries.iter().map(ring::slots).sum();
    assert_eq!(
        slots,
        1 + 1 + 1 + 1 + 2 + 2 + 3 + 3 + 4 + 4,
        "40 bytes in the entry, 56 per continuation"
    );
    tx.push(&entries, &bytes).expect("room");
    out.clear();
    assert_eq!(rx.pop(&mut out, 64).expect("sane"), entries.len());
    assert_eq!(out[0], entries[0]);
    let mut at = 0;
    for (i, len) in lens.iter().enumerate() {
        let got = out[i + 1];
        assert_eq!(
            (got.opcode, got.inline, got.len, got.psn, got.imm),
            (OP_SEND_IMM, true, *len as u32, i as u64, 0xfeed_0000 | i as u32)
        );
        let mut data = vec![0u8; *len];
        rx.inline_data(&got, &mut data);
        assert_eq!(&data[..], &bytes[at..at + len], "inline data of {len} bytes");
        at += len;
    }
    assert!(!rx.prepare_sleep(), "every slot consumed: the ring is empty");
}

#[test]
fn laps_wrap_around_after_255_passes() {
    // A ring's slots are reused every pass; the lap byte in word 0 runs
    // 1..=255 and round again, so a slot never looks published early.
    let map = ring_memory();
    let (mut tx, mut rx) = (Ring::new(map.clone(), 0), Ring::new(map, 0));
    let total = 256 * RING_ENTRIES + 100;
    let mut out = Vec::new();
    let mut next = 0u64;
    let mut batch = Vec::with_capacity(64);
    while next < total {
        batch.clear();
        batch.extend((next..total.min(next + 64)).map(|psn| Entry {
            opcode: OP_ACK,
            psn,
            ..Entry::default()
        }));
        tx.push(&batch, &[]).expect("room");
        out.clear();
        assert_eq!(rx.pop(&mut out, 64).expect("sane"), batch.len());
        assert_eq!(out, batch, "entries from {next}");
        assert_eq!(rx.pop(&mut out, 64).expect("sane"), 0, "nothing beyond them");
        rx.release();
        next += batch.len() as u64;
    }
}

#[test]
fn malformed_or_stale_entries_are_refused_or_left() {
    let map = ring_memory();
    // Raw words, as a hostile peer could write them in the first slot of a
    // fresh ring (first pass: lap 1), the second slot zeroed.
    let word0 = |flags: u64, len: u64, lap: u64| OP_SEND as u64 | flags << 16 | lap << 24 | len << 32;
    for (w0, why) in [
        (
            word0(1, ring::MAX_INLINE as u64 + 1, 1),
            Some("longer than the inline limit"),
        ),
        (word0(1, 100, 1), Some("without its continuation")),
        (word0(8, 8, 1), Some("unknown entry flags")),
        (word0(5, 8, 1), Some("both inline and placed")),
        (word0(2, 8, 1), Some("a continuation slot where an entry was due")),
        // Another pass's entry (lap 2), and an unpublished slot (lap 0):
        // not taken, and nothing wrong.
        (word0(0, 8, 2), None),
        (0, None),
    ] {
        let mut rx = Ring::new(map.clone(), 0);
        let base = map.ptr().as_ptr();
        // SAFETY: the test owns the mapping; both offsets are word 0 of the
        // first two slots, inside it and 8-aligned.
        unsafe {
            std::ptr::write_volatile(base.add(4096 + 64).cast::<u64>(), 0);
            (*base.add(4096).cast::<std::sync::atomic::AtomicU64>()).store(w0, Ordering::Release);
        }
        let mut out = Vec::new();
        match (rx.pop(&mut out, 8), why) {
            (Err(ring::Corrupt(reason)), Some(why)) => assert!(reason.contains(why), "{reason:?} should say {why:?}"),
            (Ok(0), None) => assert!(!rx.prepare_sleep() && out.is_empty(), "nothing published"),
            (got, why) => panic!("{why:?}: got {got:?}"),
        }
    }
}

#[test]
fn a_burst_of_inline_sends_deeper_than_half_a_ring_arrives_whole() {
    // 1000 Sends of the largest inline size in one batch: the first 512 fill
    // half the ring inline (4 slots each), the rest go by reference, so one
    // batch mixes both kinds and every byte must still land in order.
    let fabric = ShmFabric::new();
    const N: usize = 1000;
    let len = ring::MAX_INLINE;
    let src = pool(&fabric, len, N, Access::LOCAL_WRITE);
    let dst = pool(&fabric, len, N, Access::LOCAL_WRITE);
    let (a, b) = connect_pair(&fabric, "", (b"", vec![]), (b"", recvs(&dst, N, 0)));
    let mut wrs: Vec<SendWr> = (0..N)
        .map(|i| {
            let mut buf = src.checkout().expect("chunk");
            buf.fill(&[i as u8; ring::MAX_INLINE]).expect("fits");
            send(buf, i as u64)
        })
        .collect();
    a.post_send(&mut wrs).expect("post");
    let got = wait_for(&*b, N);
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.status, WcStatus::Success, "receive {i}");
        assert_eq!(c.id, WrId(i as u64), "in order");
        assert!(
            c.buf.iter().all(|&x| x == i as u8) && c.buf.len() == len,
            "receive {i} intact"
        );
    }
    let sent = wait_for(&*a, N);
    assert!(sent.iter().all(|c| c.status == WcStatus::Success));
    assert!(!a.is_failed() && !b.is_failed());
}

#[test]
fn a_silent_client_neither_blocks_others_nor_lives_forever() {
    let fabric = ShmFabric::with_options(ShmOptions {
        handshake_timeout: Duration::from_secs(2),
        ..ShmOptions::default()
    });
    let listener = fabric.listen("").expect("listen");
    let name = socket_name(&listener.local_addr()).expect("own address parses");
    let silent = Socket::connect(&name).expect("raw connect");
    std::thread::scope(|s| {
        let client = s.spawn(|| {
            fabric
                .connect(&listener.local_addr(), fabric.domain(), b"talks", vec![])
                .expect("connect")
        });
        let started = Instant::now();
        let incoming = listener.accept(Some(LONG)).expect("accept");
        assert_eq!(incoming.peer_params(), b"talks");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "not held up by the silent one"
        );
        let _qp = incoming.accept(fabric.domain(), b"", vec![]).expect("accept");
        let _client = client.join().expect("client thread");
    });
    // The silent connection is dropped once its hello deadline passes.
    assert!(matches!(
        listener.accept(Some(Duration::from_secs(3))),
        Err(FabricError::Timeout(_))
    ));
    let end = silent.recv_until(64, Instant::now() + LONG);
    assert!(end.is_err(), "closed without an answer: {end:?}");
}

/// Posts a Write (with immediate 1) of `byte` × `len` from a fresh buffer
/// of `a` into `remote` and waits for its completion on `a`.
fn write_into(fabric: &ShmFabric, a: &dyn QueuePair, remote: RemoteAddr, byte: u8, len: usize) -> WcStatus {
    let src = pool(fabric, 4096, 1, Access::LOCAL_WRITE);
    let mut buf = src.checkout().expect("chunk");
    buf.fill(&vec![byte; len]).expect("fits");
    a.post_send(&mut vec![SendWr {
        id: WrId(1),
        op: SendOp::Write {
            buf,
            remote,
            imm: Some(1),
        },
    }])
    .expect("post");
    wait_for(a, 1)[0].status
}

/// Places `byte` × `len` at `remote` through `a`, retrying while the grant
/// is on its way (its entry is executed by `a`'s progress); the placement.
fn place_soon(a: &dyn QueuePair, remote: RemoteAddr, byte: u8, len: usize) -> Option<u64> {
    let deadline = Instant::now() + LONG;
    while Instant::now() < deadline {
        if let Some(placement) = a
            .placement()
            .expect("shm places")
            .place(remote, len, &mut |dest| dest.fill(byte))
        {
            return Some(placement);
        }
        a.wait(Some(Duration::from_millis(1)));
    }
    None
}

/// The Write whose data `placement` put at `remote`, with its token.
fn placed(token: Buf, remote: RemoteAddr, imm: Option<u32>, placement: u64) -> (SendWr, Option<u64>) {
    let wr = SendWr {
        id: WrId(2),
        op: SendOp::Write {
            buf: token,
            remote,
            imm,
        },
    };
    (wr, Some(placement))
}

/// Posts a batch of which some Writes were placed.
fn post_placed(a: &dyn QueuePair, batch: Vec<(SendWr, Option<u64>)>) -> Result<(), FabricError> {
    let (mut wrs, mut placements): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    a.placement()
        .expect("shm places")
        .post_send_placed(&mut wrs, &mut placements)
}

/// A connected pair whose responder `b` has four receives posted (for
/// immediates) and one 4 KiB remote-write region at `remote`.
struct Placing {
    fabric: ShmFabric,
    _imm: crate::mr::BufPool,
    target: crate::mr::BufPool,
    remote: RemoteAddr,
    a: Box<dyn QueuePair>,
    b: Box<dyn QueuePair>,
}

fn placing_pair() -> Placing {
    let fabric = ShmFabric::new();
    let imm = pool(&fabric, 64, 4, Access::LOCAL_WRITE);
    let target = pool(&fabric, 4096, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let desc = target.remote();
    let remote = RemoteAddr {
        addr: desc.addr,
        rkey: desc.rkey,
    };
    let (a, b) = connect_pair(&fabric, "", (b"", vec![]), (b"", recvs(&imm, 4, 100)));
    Placing {
        fabric,
        _imm: imm,
        target,
        remote,
        a,
        b,
    }
}

#[test]
fn a_written_region_is_granted_and_later_writes_are_placed_by_the_initiator() {
    let fabric = ShmFabric::new();
    let target = pool(&fabric, 4096, 2, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let imm_bufs = pool(&fabric, 64, 4, Access::LOCAL_WRITE);
    let desc = target.remote();
    let chunk1 = RemoteAddr {
        addr: desc.addr + 4096,
        rkey: desc.rkey,
    };
    let (a, b) = connect_pair(&fabric, "", (b"", vec![]), (b"", recvs(&imm_bufs, 4, 100)));
    assert!(
        a.placement()
            .expect("shm places")
            .place(chunk1, 8, &mut |_| panic!("no grant yet"))
            .is_none(),
        "nothing is granted before a first Write"
    );
    assert_eq!(write_into(&fabric, &*a, chunk1, 0x11, 100), WcStatus::Success);
    assert_eq!(wait_for(&*b, 1)[0].opcode, WcOpcode::RecvRdmaWithImm);
    // The grant rides with the acknowledgement of that first Write.
    let placement = place_soon(&*a, chunk1, 0x5a, 300).expect("the region was granted");
    // Outside the grant, or under another key: not placed, fill never runs.
    let beyond = RemoteAddr {
        addr: desc.addr + 8000,
        rkey: desc.rkey,
    };
    assert!(a
        .placement()
        .expect("shm places")
        .place(beyond, 400, &mut |_| panic!("out of bounds"))
        .is_none());
    let below = RemoteAddr {
        addr: desc.addr - 1,
        rkey: desc.rkey,
    };
    assert!(a
        .placement()
        .expect("shm places")
        .place(below, 1, &mut |_| panic!("below the region"))
        .is_none());
    let other = RemoteAddr {
        addr: chunk1.addr,
        rkey: crate::mr::RKey(desc.rkey.0 ^ 1),
    };
    assert!(a
        .placement()
        .expect("shm places")
        .place(other, 1, &mut |_| panic!("unknown key"))
        .is_none());
    // The notification: only the immediate and the length travel.
    let src = pool(&fabric, 4096, 1, Access::LOCAL_WRITE);
    let mut token = src.checkout().expect("chunk");
    token.set_len(300);
    post_placed(&*a, vec![placed(token, chunk1, Some(77), placement)]).expect("post");
    let done = wait_for(&*a, 1);
    assert_eq!(
        (done[0].status, done[0].opcode),
        (WcStatus::Success, WcOpcode::RdmaWrite)
    );
    let got = wait_for(&*b, 1);
    assert_eq!(
        (got[0].status, got[0].opcode, got[0].byte_len, got[0].imm),
        (WcStatus::Success, WcOpcode::RecvRdmaWithImm, 300, Some(77))
    );
    let _chunk0 = target.checkout().expect("chunk 0");
    let mut t = target.checkout().expect("chunk 1");
    t.set_len(4096);
    assert!(t[..300].iter().all(|&x| x == 0x5a), "placed bytes landed");
    assert!(t[300..].iter().all(|&x| x == 0), "nothing beyond them");
}

#[test]
fn a_placed_write_names_a_granted_region_or_fails_the_queue_pair() {
    let fabric = ShmFabric::new();
    let target = pool(&fabric, 4096, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let desc = target.remote();
    let remote = RemoteAddr {
        addr: desc.addr,
        rkey: desc.rkey,
    };
    let (a, b) = connect_pair(&fabric, "", (b"", vec![]), (b"", vec![]));
    // Claiming a placement the peer never granted is a protocol violation.
    let src = pool(&fabric, 4096, 1, Access::LOCAL_WRITE);
    let mut token = src.checkout().expect("chunk");
    token.set_len(10);
    // (Placement 0: no memfd, as nothing was granted to place into.)
    post_placed(&*a, vec![placed(token, remote, None, 0)]).expect("post");
    assert_ne!(wait_for(&*a, 1)[0].status, WcStatus::Success);
    let deadline = Instant::now() + LONG;
    while !b.is_failed() {
        assert!(Instant::now() < deadline, "the responder failed the queue pair");
        b.wait(Some(Duration::from_millis(5)));
    }
}

#[test]
fn a_placement_into_a_region_the_peer_freed_is_refused_when_announced() {
    let Placing {
        fabric,
        _imm,
        target,
        remote,
        a,
        b,
    } = placing_pair();
    assert_eq!(write_into(&fabric, &*a, remote, 1, 64), WcStatus::Success);
    wait_for(&*b, 1);
    assert!(place_soon(&*a, remote, 2, 64).is_some());
    // The region goes (its memfd stays mapped on the initiator's side until
    // the unexport arrives, so a late placement only reaches orphaned pages)
    // and the notification of a placement into it is refused, as a Write
    // into a deregistered region is.
    drop(target);
    let placement = a
        .placement()
        .expect("shm places")
        .place(remote, 64, &mut |dest| dest.fill(3))
        .expect("still granted here");
    let src = pool(&fabric, 4096, 1, Access::LOCAL_WRITE);
    let mut token = src.checkout().expect("chunk");
    token.set_len(64);
    post_placed(&*a, vec![placed(token, remote, Some(5), placement)]).expect("post");
    assert_eq!(wait_for(&*a, 1)[0].status, WcStatus::RemoteAccessError);
}

#[test]
fn no_placement_starts_once_the_peer_closed() {
    let p = placing_pair();
    assert_eq!(write_into(&p.fabric, &*p.a, p.remote, 1, 64), WcStatus::Success);
    wait_for(&*p.b, 1);
    assert!(place_soon(&*p.a, p.remote, 2, 64).is_some());
    // The responder closes: from then on its memory is its own again, before
    // the initiator even learns of the close.
    p.b.disconnect();
    assert!(p
        .a
        .placement()
        .expect("shm places")
        .place(p.remote, 64, &mut |_| panic!("placed after the peer closed"))
        .is_none());
}

#[test]
fn placement_gate_makes_a_closing_side_wait_for_a_running_copy() {
    let map = ring_memory();
    let (producer, consumer) = (ring::Gate::new(map.clone(), 0), ring::Gate::new(map, 0));
    assert!(producer.begin_placing());
    // A copy is running: the consumer waits for it, up to its deadline.
    assert!(!consumer.close(Instant::now() + Duration::from_millis(20)));
    producer.end_placing();
    assert!(consumer.close(Instant::now() + LONG), "no copy runs");
    assert!(!producer.begin_placing(), "none starts after the close");
}

#[test]
fn placed_entries_round_trip_and_never_carry_inline_data() {
    let e = Entry {
        opcode: OP_WRITE_IMM,
        placed: true,
        len: 4096,
        psn: 9,
        addr: 0x1000,
        rkey: 42,
        imm: 7,
        ..Entry::default()
    };
    let map = ring_memory();
    let (mut tx, mut rx) = (Ring::new(map.clone(), 0), Ring::new(map, 0));
    tx.push(&[e], &[]).expect("room");
    let mut out = Vec::new();
    assert_eq!(rx.pop(&mut out, 1).expect("sane"), 1);
    assert_eq!(out, vec![e]);
    // Both flags at once is malformed.
    let both = Entry {
        inline: true,
        len: 0,
        ..e
    };
    tx.push(&[both], &[]).expect("room");
    assert!(
        rx.pop(&mut out, 1).is_err(),
        "an entry both inline and placed is refused"
    );
}

#[test]
fn a_placed_write_must_name_the_memfd_its_key_names_now() {
    // A Write and, before its grant arrived, a placed Write under the same
    // key: the responder has granted the key by the time it executes the
    // second, but the initiator named no memfd (it held no grant), as when
    // a key was reused for another registration since. Refused, never
    // completed as if the data had landed.
    // Bound, not `..`: the responder and its region must outlive the posts.
    let Placing {
        fabric,
        remote,
        a,
        b: _b,
        target: _target,
        _imm,
    } = placing_pair();
    let src = pool(&fabric, 4096, 2, Access::LOCAL_WRITE);
    let mut buf = src.checkout().expect("chunk");
    buf.fill(&[1; 64]).expect("fits");
    let mut token = src.checkout().expect("chunk");
    token.set_len(64);
    let plain = SendWr {
        id: WrId(1),
        op: SendOp::Write { buf, remote, imm: None },
    };
    // Placement 0: the initiator held no grant, so named no memfd.
    post_placed(&*a, vec![(plain, None), placed(token, remote, Some(3), 0)]).expect("post");
    let got = wait_for(&*a, 2);
    assert_eq!(got[0].status, WcStatus::Success, "the plain Write");
    assert_eq!(got[1].status, WcStatus::RemoteAccessError, "the placed one");
}

#[test]
fn only_allowed_users_get_in() {
    use crate::provider::shm::ShmAccess;
    let me = sys::effective_uid();
    let listen_with = |access: ShmAccess| {
        let fabric = ShmFabric::with_options(ShmOptions {
            access,
            ..ShmOptions::default()
        });
        let listener = fabric.listen("").expect("listen");
        (fabric, listener)
    };
    // The default lets this process's own user in.
    assert!(ShmAccess::default().uids.contains(&me));
    let fabric = ShmFabric::new();
    let (a, b) = connect_pair(&fabric, "", (b"", Vec::new()), (b"", Vec::new()));
    assert!(!a.is_failed() && !b.is_failed());
    // A listener that lets in only another user refuses us, and says why.
    let other = me.wrapping_add(1);
    let (fabric, listener) = listen_with(ShmAccess {
        uids: vec![other],
        gids: Vec::new(),
        any_user: false,
    });
    let addr = listener.local_addr();
    std::thread::scope(|s| {
        let server = s.spawn(|| listener.accept(Some(Duration::from_millis(500))).map(drop));
        match fabric.connect(&addr, &fabric.pd, b"", Vec::new()) {
            Err(FabricError::Rejected { reason, .. }) => {
                assert!(reason.contains(&format!("user {me}")), "{reason}");
                assert!(reason.contains(&format!("users [{other}]")), "{reason}");
            }
            other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
        }
        assert!(
            matches!(server.join().unwrap(), Err(FabricError::Timeout(_))),
            "the listener handed out nothing"
        );
    });
    // Groups and "any user" open it again.
    assert!(ShmAccess {
        uids: vec![],
        gids: vec![7],
        any_user: false
    }
    .allows(other, 7));
    assert!(ShmAccess {
        uids: vec![],
        gids: vec![],
        any_user: true
    }
    .allows(other, 9));
    assert!(!ShmAccess {
        uids: vec![],
        gids: vec![],
        any_user: false
    }
    .allows(me, 0));
}
