//! Channels that completed the hello and have not sent their Connect yet
//! cost the target no thread, and leave by their deadline or when their
//! Connect is refused, while hosts that do connect are served by the
//! fixed set of workers (no thread per queue either).

use std::time::{Duration, Instant};

use iounit::nvme::features::{FeatureId, NumberOfQueues};
use iounit::nvme::{CommandId, Connect, ConnectData, HostId, Nqn, Sgl, Sqe, Status};
use iounit::target::{Target, TargetConfig, DEFAULT_NQN};
use iounit::transport;
use messaging::provider::tcp::TcpFabric;
use messaging::Endpoint;

const LONG: Duration = Duration::from_secs(20);

/// The tests count this process's threads: one target at a time.
static ONE_TARGET: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_target() -> std::sync::MutexGuard<'static, ()> {
    ONE_TARGET.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits until `count` threads of this process have a name starting with
/// `prefix` (a new thread names itself once it runs); the count then.
fn settled(prefix: &str, count: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = threads_named(prefix);
        if n == count || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

fn connect_capsule(subnqn: &str) -> Vec<u8> {
    queue_connect_capsule(subnqn, 0, ConnectData::CNTLID_DYNAMIC)
}

fn queue_connect_capsule(subnqn: &str, qid: u16, cntlid: u16) -> Vec<u8> {
    let sqe = Connect::new(qid, 32, 10_000)
        .unwrap()
        .to_sqe(CommandId(1), &Sgl::DataBlockOffset { offset: 0, len: 1024 })
        .unwrap();
    let data = ConnectData {
        host_id: HostId([3; 16]),
        cntlid,
        subnqn: Nqn::new(subnqn).unwrap(),
        hostnqn: Nqn::new("nqn.2026-12.io.chanio:lobby-test").unwrap(),
    }
    .encode();
    let mut capsule = Vec::new();
    transport::encode_capsule(&sqe, &data, &mut capsule).unwrap();
    capsule
}

#[test]
fn channels_waiting_for_their_connect_hold_no_thread() {
    let _one = one_target();
    let t = Target::start(TargetConfig {
        listen: vec!["tcp://127.0.0.1:0".into()],
        namespaces: vec!["ram:1MiB".parse().unwrap()],
        threads: 2,
        ..TargetConfig::default()
    })
    .unwrap();
    assert_eq!(settled("iounit-worker", 2), 2);
    let before = threads_named("");
    let addr = t.local_uris()[0].trim_start_matches("tcp://").to_string();
    let fabric = TcpFabric::default();
    let silent: Vec<Endpoint> = (0..40)
        .map(|_| Endpoint::connect(&fabric, &addr, transport::host_channel(32)).unwrap())
        .collect();
    assert_eq!(
        threads_named("iounit-"),
        2 + 2,
        "two workers, a lobby and an accept thread, whatever waits"
    );

    // A refused Connect gets its answer and no thread either.
    let wrong = Endpoint::connect(&fabric, &addr, transport::host_channel(32)).unwrap();
    wrong
        .send(&connect_capsule("nqn.2026-12.io.chanio:no-such-subsystem"))
        .unwrap();
    let answer = transport::decode_response(&wrong.recv_timeout(LONG).unwrap()).unwrap();
    assert!(
        answer.status().same_code(Status::CONNECT_INVALID_HOST),
        "{}",
        answer.status()
    );
    assert!(answer.status().dnr());

    // Admitted ones are served by the workers: no thread of their own.
    let good: Vec<Endpoint> = (0..8)
        .map(|_| {
            let ep = Endpoint::connect(&fabric, &addr, transport::host_channel(32)).unwrap();
            ep.send(&connect_capsule(DEFAULT_NQN)).unwrap();
            let answer = transport::decode_response(&ep.recv_timeout(LONG).unwrap()).unwrap();
            assert!(answer.status().is_success(), "{}", answer.status());
            ep
        })
        .collect();
    assert_eq!(t.controllers(), 8);
    assert_eq!(threads_named("iounit-"), 2 + 2, "no thread per queue");

    // The silent ones are closed at their deadline (10 s).
    let deadline = Instant::now() + LONG;
    for ep in &silent {
        loop {
            match ep.recv_timeout(Duration::from_millis(50)) {
                Err(messaging::Error::Closed(_)) => break,
                Err(messaging::Error::Timeout(_)) => {}
                other => panic!("a silent channel got {other:?}"),
            }
            assert!(
                Instant::now() < deadline,
                "a channel without Connect outlived its deadline"
            );
        }
    }
    drop((good, wrong, silent));
    t.shutdown();
    assert_eq!(
        threads_named("iounit-"),
        0,
        "shut down, every thread of the target ended"
    );
    assert!(threads_named("") <= before, "threads left behind");
}

/// Sends `capsule` on `ep` and returns the answer's DW0, asserting success.
fn exchange(ep: &Endpoint, capsule: &[u8]) -> u32 {
    ep.send(capsule).unwrap();
    let answer = transport::decode_response(&ep.recv_timeout(LONG).unwrap()).unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    answer.dw0
}

#[test]
fn a_channel_gets_its_depth_and_slots_only_once_its_connect_is_admitted() {
    let _one = one_target();
    let t = Target::start(TargetConfig {
        listen: vec!["tcp://127.0.0.1:0".into()],
        namespaces: vec!["ram:1MiB".parse().unwrap()],
        threads: 1,
        ..TargetConfig::default()
    })
    .unwrap();
    let addr = t.local_uris()[0].trim_start_matches("tcp://").to_string();
    let fabric = TcpFabric::default();
    let lobby = transport::lobby_channel();

    // Before its Connect a channel is granted the lobby's few receives and
    // no slots: all a peer that never connects costs.
    let admin = Endpoint::connect(&fabric, &addr, transport::host_channel(32)).unwrap();
    assert_eq!(admin.credits(), u32::from(lobby.recv_depth));
    assert_eq!(admin.max_push(), 0);
    let cntlid = exchange(&admin, &connect_capsule(DEFAULT_NQN)) as u16;
    // The admin queue grew to its depth (the Connect took one credit, the
    // Grant's header returned it); it has no slots.
    let grown = transport::iounit_admin_channel(32);
    assert_eq!(admin.credits(), u32::from(grown.recv_depth));
    assert_eq!(admin.max_push(), 0);

    let queues = NumberOfQueues::new(1, 1).unwrap();
    let set = Sqe::set_features(CommandId(2), FeatureId::NumberOfQueues, queues.to_dword(), false);
    let mut capsule = Vec::new();
    transport::encode_capsule(&set, &[], &mut capsule).unwrap();
    exchange(&admin, &capsule);

    let io = Endpoint::connect(&fabric, &addr, transport::host_channel(32)).unwrap();
    assert_eq!(io.max_push(), 0);
    exchange(&io, &queue_connect_capsule(DEFAULT_NQN, 1, cntlid));
    let grown = transport::iounit_channel(32);
    assert_eq!(io.credits(), u32::from(grown.recv_depth));
    assert_eq!(
        io.max_push(),
        grown.slot_size as usize,
        "an I/O queue's slots arrive with the answer"
    );
    // The slots take pushes: a push lands (nothing asked for it, so the
    // I/O unit may refuse it later; the fabric accepted it).
    io.push(&[7; 8192]).unwrap().wait().unwrap();
    drop((io, admin));
    t.shutdown();
}
