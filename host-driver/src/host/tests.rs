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

#[test]
fn write_from_pushes_pieces_of_the_buffer_and_copies_nothing() {
    let target = Target::start(TargetConfig {
        listen: vec!["tcp://127.0.0.1:0".into()],
        namespaces: vec!["ram:8MiB".parse().unwrap()],
        max_io_queues: 1,
        ..TargetConfig::default()
    })
    .unwrap();
    let host = Host::connect(&target.local_uris()[0], HostOptions::default()).unwrap();
    let staged = || match &*host.handle.inner.state.lock() {
        ConnState::Connected(s) => s.io[0].staged_pushes(),
        _ => panic!("not connected"),
    };
    // Up to one command's transfer limit (512 KiB): four slot-sized pieces
    // at most, all pushed from the buffer itself.
    for len in [4096usize, 128 * 1024, 300 * 1024, 512 * 1024] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut buf = host.alloc(len).unwrap();
        buf.copy_from_slice(&data);
        host.write_from(Nsid(1), 0, &mut buf, false).unwrap();
        assert!(buf[..] == data[..], "{len}: the buffer came back changed");
        assert!(
            host.read(Nsid(1), 0, (len / 512) as u32).unwrap() == data,
            "{len}: read back wrong"
        );
        assert!(!staged(), "{len}: a write from a registered buffer was copied");
    }
    host.close();
    target.shutdown();
}
