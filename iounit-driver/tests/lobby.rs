//! Channels that completed the hello and have not sent their Connect yet
//! cost the target no thread, and leave by their deadline or when their
//! Connect is refused, while hosts that do connect are served by the
//! fixed set of workers (no thread per queue either).

use std::time::{Duration, Instant};

use iounit::nvme::{CommandId, Connect, ConnectData, HostId, Nqn, Sgl, Status};
use iounit::target::{Target, TargetConfig, DEFAULT_NQN};
use iounit::transport;
use messaging::provider::tcp::TcpFabric;
use messaging::Endpoint;

const LONG: Duration = Duration::from_secs(20);

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
    let sqe = Connect::new(0, 32, 10_000)
        .unwrap()
        .to_sqe(CommandId(1), &Sgl::DataBlockOffset { offset: 0, len: 1024 })
        .unwrap();
    let data = ConnectData {
        host_id: HostId([3; 16]),
        cntlid: ConnectData::CNTLID_DYNAMIC,
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
