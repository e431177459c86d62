use iounit::target::{Target, TargetConfig, DEFAULT_NQN};

use super::*;

#[test]
fn push_tickets_stay_bounded() {
    let target = Target::start(TargetConfig {
        nqn: DEFAULT_NQN.into(),
        listen: vec!["tcp://127.0.0.1:0".into()],
        namespaces: vec!["ram:8MiB".parse().unwrap()],
        allowed_hosts: vec![],
        max_io_queues: 1,
        max_queue_depth: 32,
        workers: 4,
        ..TargetConfig::default()
    })
    .unwrap();
    let host = Host::connect(&target.local_uris()[0], HostOptions::default()).unwrap();
    let data = vec![0x5a; 512 * 1024];
    for _ in 0..16 {
        host.write(Nsid(1), 0, &data, false).unwrap();
    }
    let held = match &*host.handle.inner.state.lock() {
        ConnState::Connected(s) => s.io[0].held_push_tickets(),
        _ => panic!("not connected"),
    };
    assert!(held <= crate::queue::PUSH_BUFFERS, "{held} push tickets held");
    assert_eq!(host.read(Nsid(1), 0, 1024).unwrap(), data);
    host.close();
    target.shutdown();
}
