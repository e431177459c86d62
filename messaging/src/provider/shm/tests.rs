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
                .connect(&listener.local_addr(), b"good", vec![])
                .expect("real connect")
        });
        let incoming = listener.accept(Some(LONG)).expect("accept survives bad hellos");
        assert_eq!(incoming.peer_params(), b"good");
        let _server = incoming.accept(b"", vec![]).expect("accept");
        let _client = client.join().expect("client thread");
    });
}

#[test]
fn rejection_reaches_the_client_and_shutdown_stops_accepting() {
    let fabric = ShmFabric::new();
    let listener = fabric.listen("").expect("listen");
    std::thread::scope(|s| {
        let server = s.spawn(|| listener.accept(Some(LONG)).expect("accept").reject("go away"));
        match fabric.connect(&listener.local_addr(), b"", vec![]) {
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
        fabric.connect("shm://", b"", vec![]),
        Err(FabricError::BadAddress { .. })
    ));
    assert!(matches!(
        fabric.connect(&format!("shm://{}", "x".repeat(200)), b"", vec![]),
        Err(FabricError::BadAddress { .. })
    ));
    assert!(matches!(
        fabric.connect("shm://nobody-listens-here", b"", vec![]),
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

#[test]
fn ring_entries_round_trip() {
    let e = Entry {
        opcode: OP_WRITE_IMM,
        status: 3,
        len: 0xdead_beef,
        psn: u64::MAX - 1,
        serial: 7,
        offset: 1 << 40,
        addr: 0x7fff_0000_1234,
        rkey: 0x1234_5678,
        imm: 0x8000_0001,
    };
    let fd = sys::sealed_memfd("ring-test", RING_BYTES).expect("memfd");
    let map = Arc::new(Mapping::new(&fd, RING_BYTES).expect("map"));
    let mut tx = Ring::new(map.clone(), 0);
    let mut rx = Ring::new(map, 0);
    assert!(!rx.prepare_sleep(), "empty ring: sleep");
    tx.push(&[e, Entry::default()]).expect("room");
    assert!(tx.consumer_sleeping());
    rx.woke();
    let mut out = Vec::new();
    assert_eq!(rx.pop(&mut out, 1).expect("sane"), 1);
    assert_eq!(out, vec![e]);
    assert!(rx.prepare_sleep(), "an entry is still there");
    assert_eq!(rx.pop(&mut out, 8).expect("sane"), 1);
    let full: Vec<Entry> = (0..ring::RING_ENTRIES).map(|_| Entry::default()).collect();
    tx.push(&full).expect("exactly a ring fits");
    assert!(tx.push(&[Entry::default()]).is_err(), "a full ring refuses");
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
                .connect(&listener.local_addr(), b"talks", vec![])
                .expect("connect")
        });
        let started = Instant::now();
        let incoming = listener.accept(Some(LONG)).expect("accept");
        assert_eq!(incoming.peer_params(), b"talks");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "not held up by the silent one"
        );
        let _qp = incoming.accept(b"", vec![]).expect("accept");
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
