//! The target at the capsule level: a bare-bones host written against the
//! transport binding drives it over tcp.

use std::time::Duration;

use iounit::nvme::{
    AsyncEvent, Cns, CommandId, Connect, ConnectData, ConnectResponse, Cqe, FeatureId, HostId, IdentifyController,
    IdentifyNamespace, KeepAliveTimer, NamespaceList, Nqn, Nsid, Sgl, Sqe, Status,
};
use iounit::target::{Target, TargetConfig, DEFAULT_NQN};
use iounit::transport;
use messaging::mr::{Access, Buf};
use messaging::provider::tcp::TcpFabric;
use messaging::{Endpoint, ReceivedKind};

const LONG: Duration = Duration::from_secs(20);
const HOST: &str = "nqn.2026-11.io.chanio:test-host";

fn target() -> Target {
    Target::start(TargetConfig {
        listen: vec!["tcp://127.0.0.1:0".into()],
        namespaces: vec!["ram:4MiB".parse().unwrap(), "ram:1MiB:4096".parse().unwrap()],
        ..TargetConfig::default()
    })
    .unwrap()
}

#[derive(Debug)]
struct RawHost {
    fabric: TcpFabric,
    ep: Endpoint,
    cid: u16,
    cntlid: u16,
}

impl RawHost {
    fn connect(t: &Target, qid: u16, cntlid: u16, fabric: Option<TcpFabric>) -> Result<RawHost, Status> {
        RawHost::connect_kato(t, qid, cntlid, fabric, 10_000)
    }

    fn connect_kato(
        t: &Target,
        qid: u16,
        cntlid: u16,
        fabric: Option<TcpFabric>,
        kato_ms: u32,
    ) -> Result<RawHost, Status> {
        RawHost::connect_as(t, qid, cntlid, fabric, kato_ms, HOST)
    }

    fn connect_as(
        t: &Target,
        qid: u16,
        cntlid: u16,
        fabric: Option<TcpFabric>,
        kato_ms: u32,
        hostnqn: &str,
    ) -> Result<RawHost, Status> {
        let fabric = fabric.unwrap_or_default();
        let addr = t.local_uris()[0].trim_start_matches("tcp://").to_string();
        let ep = Endpoint::connect(&fabric, &addr, transport::host_channel(32)).unwrap();
        let mut h = RawHost {
            fabric,
            ep,
            cid: 0,
            cntlid,
        };
        let sqe = Connect::new(qid, 32, kato_ms)
            .unwrap()
            .to_sqe(CommandId(0), &Sgl::DataBlockOffset { offset: 0, len: 1024 })
            .unwrap();
        let data = ConnectData {
            host_id: HostId([7; 16]),
            cntlid: if qid == 0 { ConnectData::CNTLID_DYNAMIC } else { cntlid },
            subnqn: Nqn::new(DEFAULT_NQN).unwrap(),
            hostnqn: Nqn::new(hostnqn).unwrap(),
        }
        .encode();
        let cqe = h.exchange(&sqe, &data);
        if !cqe.status().is_success() {
            return Err(cqe.status());
        }
        h.cntlid = ConnectResponse::from_dw0(cqe.dw0).cntlid;
        Ok(h)
    }

    fn exchange(&mut self, sqe: &Sqe, data: &[u8]) -> Cqe {
        let mut capsule = Vec::new();
        transport::encode_capsule(sqe, data, &mut capsule).unwrap();
        self.ep.send(&capsule).unwrap();
        let d = self.ep.recv_timeout(LONG).unwrap();
        assert_eq!(d.kind(), ReceivedKind::Message);
        transport::decode_response(&d).unwrap()
    }

    fn next(&mut self) -> CommandId {
        self.cid += 1;
        CommandId(self.cid)
    }

    /// A command that returns data into an exposed buffer.
    fn fetch(&mut self, sqe: Sqe, len: usize) -> (Cqe, Option<Buf>) {
        let (cqe, data) = self.fetch_as(sqe, len, false);
        (cqe.expect("a response capsule"), data)
    }

    /// As `fetch`; with `by_data` the command asks for completion by data,
    /// and a flagged push returns without a response capsule (`None`).
    fn fetch_as(&mut self, mut sqe: Sqe, len: usize, by_data: bool) -> (Option<Cqe>, Option<Buf>) {
        let pool = self
            .ep
            .domain()
            .register(len, 1, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .unwrap();
        let target = self.ep.expose(pool.checkout().unwrap()).unwrap();
        sqe.set_sgl(&Sgl::KeyedDataBlock {
            addr: target.remote.addr,
            len: len as u32,
            key: target.remote.rkey.0,
        })
        .unwrap();
        transport::set_transfer_tag(&mut sqe, target.tag);
        if by_data {
            transport::set_completes_by_data(&mut sqe);
        }
        let mut capsule = Vec::new();
        transport::encode_capsule(&sqe, &[], &mut capsule).unwrap();
        self.ep.send(&capsule).unwrap();
        let mut data = None;
        loop {
            let d = self.ep.recv_timeout(LONG).unwrap();
            match d.kind() {
                ReceivedKind::Direct { tag, completes_request } => {
                    assert_eq!(tag, target.tag);
                    assert_eq!(
                        completes_request, by_data,
                        "the push completes the command exactly when the host asked"
                    );
                    data = Some(d.into_buf().unwrap());
                    if completes_request {
                        return (None, data);
                    }
                }
                _ => return (Some(transport::decode_response(&d).unwrap()), data),
            }
        }
    }
}

#[test]
fn connect_identify_write_read() {
    let t = target();
    let mut h = RawHost::connect(&t, 0, 0, None).unwrap();
    assert!(h.cntlid > 0);
    let cid = h.next();
    let (cqe, data) = h.fetch(Sqe::identify(cid, Cns::Controller, Nsid(0)), 4096);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let id = IdentifyController::decode(&data.unwrap()).unwrap();
    assert_eq!(id.cntlid, h.cntlid);
    assert_eq!(id.subnqn.unwrap().as_str(), DEFAULT_NQN);
    let cid = h.next();
    let (cqe, data) = h.fetch(Sqe::identify(cid, Cns::Namespace, Nsid(2)), 4096);
    assert!(cqe.status().is_success());
    let ns = IdentifyNamespace::decode(&data.unwrap()).unwrap();
    assert_eq!((ns.nsze, ns.block_size().unwrap()), (256, 4096));

    // An I/O queue of the same controller.
    let mut io = RawHost::connect(&t, 1, h.cntlid, Some(h.fabric.clone())).unwrap();
    // Inline write, then a pushed write, then read both back.
    let cid = io.next();
    let mut sqe = Sqe::write(cid, Nsid(1), 10, 2).unwrap();
    sqe.set_sgl(&Sgl::DataBlockOffset { offset: 0, len: 1024 }).unwrap();
    assert!(io.exchange(&sqe, &[0x11; 1024]).status().is_success());
    let big: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    let cid = io.next();
    let mut sqe = Sqe::write(cid, Nsid(1), 100, 600).unwrap();
    sqe.set_sgl(&Sgl::TransportDataBlock { len: big.len() as u32 }).unwrap();
    let mut capsule = Vec::new();
    transport::encode_capsule(&sqe, &[], &mut capsule).unwrap();
    io.ep.send(&capsule).unwrap();
    for (off, len) in transport::push_chunks(big.len(), io.ep.max_push()) {
        io.ep.push(&big[off..off + len]).unwrap();
    }
    let cqe = transport::decode_response(&io.ep.recv_timeout(LONG).unwrap()).unwrap();
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let cid = io.next();
    let (cqe, data) = io.fetch(Sqe::read(cid, Nsid(1), 100, 600).unwrap(), big.len());
    assert!(cqe.status().is_success());
    assert_eq!(&data.unwrap()[..], &big[..]);
    let cid = io.next();
    let (cqe, data) = io.fetch(Sqe::read(cid, Nsid(1), 10, 2).unwrap(), 1024);
    assert!(cqe.status().is_success());
    assert_eq!(&data.unwrap()[..], &[0x11; 1024][..]);

    // Errors: out of range, unknown namespace, unknown opcode.
    let cid = io.next();
    let (cqe, data) = io.fetch(Sqe::read(cid, Nsid(1), 8191, 2).unwrap(), 1024);
    assert!(cqe.status().same_code(Status::LBA_OUT_OF_RANGE), "{}", cqe.status());
    assert!(data.is_none(), "no data pushed for a failed read");
    let cid = io.next();
    let (cqe, _) = io.fetch(Sqe::read(cid, Nsid(9), 0, 1).unwrap(), 512);
    assert!(cqe.status().same_code(Status::INVALID_NAMESPACE));
    let cid = io.next();
    let cqe = io.exchange(&Sqe::new(0x55, cid), &[]);
    assert!(cqe.status().same_code(Status::INVALID_OPCODE));
    t.shutdown();
}

#[test]
fn a_read_completes_by_its_data_when_the_host_allows() {
    let t = target();
    let admin = RawHost::connect(&t, 0, 0, None).unwrap();
    let mut io = RawHost::connect(&t, 1, admin.cntlid, Some(admin.fabric.clone())).unwrap();
    let cid = io.next();
    let mut sqe = Sqe::write(cid, Nsid(1), 40, 8).unwrap();
    sqe.set_sgl(&Sgl::DataBlockOffset { offset: 0, len: 4096 }).unwrap();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    assert!(io.exchange(&sqe, &pattern).status().is_success());

    // Success: the flagged push is the whole answer.
    let cid = io.next();
    let (cqe, data) = io.fetch_as(Sqe::read(cid, Nsid(1), 40, 8).unwrap(), 4096, true);
    assert!(cqe.is_none(), "no response capsule after a flagged push: {cqe:?}");
    assert_eq!(&data.unwrap()[..], &pattern[..]);
    // Failure: a response capsule with the status, and no data.
    let cid = io.next();
    let (cqe, data) = io.fetch_as(Sqe::read(cid, Nsid(1), 8191, 2).unwrap(), 1024, true);
    assert!(cqe.unwrap().status().same_code(Status::LBA_OUT_OF_RANGE));
    assert!(data.is_none());
    // Without the bit: data, then the response capsule. Its command ID
    // shows that nothing was left over from the flagged read.
    let cid = io.next();
    let (cqe, data) = io.fetch(Sqe::read(cid, Nsid(1), 40, 8).unwrap(), 4096);
    assert_eq!(cqe.command_id, cid);
    assert!(cqe.status().is_success());
    assert_eq!(&data.unwrap()[..], &pattern[..]);
    t.shutdown();
}

#[test]
fn bad_connects_are_refused() {
    let t = target();
    // An I/O queue for a controller that does not exist.
    assert!(RawHost::connect(&t, 1, 4242, None)
        .unwrap_err()
        .same_code(Status::CONNECT_INVALID_PARAMETERS));
    // Keep alive disabled, or longer than an I/O unit waits for a silent
    // host: the controller would outlive its host.
    for kato in [0, transport::KATO_MS.end() + 1] {
        let refused = RawHost::connect_kato(&t, 0, 0, None, kato).unwrap_err();
        assert!(
            refused.same_code(Status::CONNECT_INVALID_PARAMETERS),
            "KATO {kato}: {refused:?}"
        );
    }
    // Nor can Set Features turn it off afterwards.
    let mut host = RawHost::connect(&t, 0, 0, None).expect("a good admin connect");
    for kato in [0, transport::KATO_MS.end() + 1] {
        let cid = host.next();
        let set = Sqe::set_features(
            cid,
            FeatureId::KeepAliveTimer,
            KeepAliveTimer { timeout_ms: kato }.to_dword(),
            false,
        );
        let cqe = host.exchange(&set, &[]);
        assert!(
            cqe.status().same_code(Status::INVALID_FIELD),
            "KATO {kato}: {:?}",
            cqe.status()
        );
    }
    let cid = host.next();
    let set = Sqe::set_features(
        cid,
        FeatureId::KeepAliveTimer,
        KeepAliveTimer { timeout_ms: 5000 }.to_dword(),
        false,
    );
    assert!(host.exchange(&set, &[]).status().is_success());
    t.shutdown();
}

#[test]
fn malformed_capsule_closes_only_its_channel() {
    let t = target();
    let mut good = RawHost::connect(&t, 0, 0, None).unwrap();
    let bad = RawHost::connect(&t, 0, 0, None).unwrap();
    bad.ep.send(b"garbage, not a capsule").unwrap();
    assert!(matches!(bad.ep.recv_timeout(LONG), Err(messaging::Error::Closed(_))));
    let cid = good.next();
    let cqe = good.exchange(&Sqe::keep_alive(cid), &[]);
    assert!(cqe.status().is_success());
    t.shutdown();
}

#[test]
fn namespace_changes_complete_event_requests() {
    let t = target();
    let mut h = RawHost::connect(&t, 0, 0, None).unwrap();
    let cid = h.next();
    let mut capsule = Vec::new();
    transport::encode_capsule(&Sqe::async_event_request(cid), &[], &mut capsule).unwrap();
    h.ep.send(&capsule).unwrap();
    assert!(matches!(
        h.ep.recv_timeout(Duration::from_millis(100)),
        Err(messaging::Error::Timeout(_))
    ));
    t.registry().detach(2, LONG).unwrap();
    let cqe = transport::decode_response(&h.ep.recv_timeout(LONG).unwrap()).unwrap();
    assert_eq!(cqe.command_id, cid);
    assert_eq!(AsyncEvent::from_dw0(cqe.dw0), AsyncEvent::namespace_attribute_changed());
    let cid = h.next();
    let (cqe, data) = h.fetch(
        iounit::nvme::GetLogPage::new(iounit::nvme::LogPageId::ChangedNamespaceList, 4096)
            .unwrap()
            .to_sqe(cid, Nsid::BROADCAST),
        4096,
    );
    assert!(cqe.status().is_success());
    let list = iounit::nvme::ChangedNamespaceList::decode(&data.unwrap()).unwrap();
    assert_eq!(list.nsids(), &[Nsid(2)]);
    t.shutdown();
}

/// A target on 127.0.0.1 with one small RAM namespace, `limits` applied.
fn limited_target(limits: impl FnOnce(&mut TargetConfig)) -> Target {
    let mut cfg = TargetConfig {
        listen: vec!["tcp://127.0.0.1:0".into()],
        namespaces: vec!["ram:1MiB".parse().unwrap()],
        ..TargetConfig::default()
    };
    limits(&mut cfg);
    Target::start(cfg).unwrap()
}

#[test]
fn worker_limit_refuses_extra_queues_with_controller_busy() {
    let t = limited_target(|c| c.workers = 1);
    let first = RawHost::connect(&t, 0, 0, None).unwrap();
    let refused = RawHost::connect(&t, 0, 0, None).unwrap_err();
    assert!(refused.same_code(Status::CONNECT_CONTROLLER_BUSY), "{refused}");
    drop(first);
    let deadline = std::time::Instant::now() + LONG;
    loop {
        match RawHost::connect(&t, 0, 0, None) {
            Ok(_) => break,
            Err(s) if s.same_code(Status::CONNECT_CONTROLLER_BUSY) => {
                assert!(std::time::Instant::now() < deadline, "the worker never came free");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(s) => panic!("{s}"),
        }
    }
    t.shutdown();
}

#[test]
fn channels_that_never_connect_take_no_worker() {
    let t = limited_target(|c| c.workers = 1);
    // Three channels that complete the hello and then say nothing.
    let fabric = TcpFabric::default();
    let addr = t.local_uris()[0].trim_start_matches("tcp://").to_string();
    let silent: Vec<Endpoint> = (0..3)
        .map(|_| Endpoint::connect(&fabric, &addr, transport::host_channel(32)).unwrap())
        .collect();
    // The one worker is still there for a host that connects.
    let host = RawHost::connect(&t, 0, 0, None).expect("the worker was free");
    drop((host, silent));
    t.shutdown();
}

#[test]
fn one_host_holds_at_most_its_quota_of_controllers() {
    let t = limited_target(|c| c.max_controllers_per_host = 2);
    let greedy = "nqn.2026-12.io.chanio:greedy";
    let connect = |host| RawHost::connect_as(&t, 0, 0, None, 10_000, host);
    let held = [connect(greedy).unwrap(), connect(greedy).unwrap()];
    let refused = connect(greedy).unwrap_err();
    assert!(refused.same_code(Status::CONNECT_CONTROLLER_BUSY), "{refused}");
    assert!(refused.dnr(), "the same Connect fails the same way: {refused}");
    // Another host is not held back by the greedy one.
    let other = connect(HOST).expect("another host still gets a controller");
    // A controller given back makes room for the greedy host again.
    drop(held);
    let deadline = std::time::Instant::now() + LONG;
    while let Err(s) = connect(greedy) {
        assert!(s.same_code(Status::CONNECT_CONTROLLER_BUSY), "{s}");
        assert!(std::time::Instant::now() < deadline, "the controllers were never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(other);
    t.shutdown();
}

#[test]
fn refused_pushed_writes_complete_with_their_status_and_keep_the_channel() {
    let t = target();
    let h = RawHost::connect(&t, 0, 0, None).unwrap();
    let mut io = RawHost::connect(&t, 1, h.cntlid, Some(h.fabric.clone())).unwrap();
    let data = vec![7u8; 64 * 1024];
    for (nsid, slba, want) in [
        (1u32, 8190u64, Status::LBA_OUT_OF_RANGE),
        (9, 0, Status::INVALID_NAMESPACE),
    ] {
        let cid = io.next();
        let mut sqe = Sqe::write(cid, Nsid(nsid), slba, 128).unwrap();
        sqe.set_sgl(&Sgl::TransportDataBlock { len: data.len() as u32 })
            .unwrap();
        let mut capsule = Vec::new();
        transport::encode_capsule(&sqe, &[], &mut capsule).unwrap();
        io.ep.send(&capsule).unwrap();
        for (off, len) in transport::push_chunks(data.len(), io.ep.max_push()) {
            io.ep.push(&data[off..off + len]).unwrap();
        }
        let cqe = transport::decode_response(&io.ep.recv_timeout(LONG).unwrap()).unwrap();
        assert_eq!(cqe.command_id, cid);
        assert!(cqe.status().same_code(want), "{}", cqe.status());
    }
    // The channel is still in step: a good command works.
    let cid = io.next();
    let mut sqe = Sqe::write(cid, Nsid(1), 0, 1).unwrap();
    sqe.set_sgl(&Sgl::DataBlockOffset { offset: 0, len: 512 }).unwrap();
    assert!(io.exchange(&sqe, &[1; 512]).status().is_success());
    t.shutdown();
}

/// The namespaces host `h` sees (Identify, active namespace list).
fn active_namespaces(h: &mut RawHost) -> Vec<u32> {
    let cid = h.next();
    let (cqe, data) = h.fetch(Sqe::identify(cid, Cns::ActiveNamespaceList, Nsid(0)), 4096);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    let list = NamespaceList::decode(&data.expect("the list")).expect("a namespace list");
    list.nsids().iter().map(|n| n.0).collect()
}

#[test]
fn a_masked_namespace_is_seen_only_by_its_hosts() {
    const OTHER: &str = "nqn.2026-11.io.chanio:other-host";
    let t = target();
    t.set_namespace_hosts(2, &[HOST.to_string()]).unwrap();
    let mut mine = RawHost::connect(&t, 0, 0, None).unwrap();
    assert_eq!(active_namespaces(&mut mine), [1, 2]);
    let mut other = RawHost::connect_as(&t, 0, 0, None, 10_000, OTHER).unwrap();
    assert_eq!(active_namespaces(&mut other), [1]);
    // To the other host the masked namespace does not exist: Identify and
    // I/O get Invalid Namespace, and nothing is pushed.
    let cid = other.next();
    let (cqe, data) = other.fetch(Sqe::identify(cid, Cns::Namespace, Nsid(2)), 4096);
    assert!(cqe.status().same_code(Status::INVALID_NAMESPACE), "{}", cqe.status());
    assert!(data.is_none());
    let mut io = RawHost::connect_as(&t, 1, other.cntlid, Some(other.fabric.clone()), 10_000, OTHER).unwrap();
    let cid = io.next();
    let (cqe, data) = io.fetch(Sqe::read(cid, Nsid(2), 0, 1).unwrap(), 4096);
    assert!(cqe.status().same_code(Status::INVALID_NAMESPACE), "{}", cqe.status());
    assert!(data.is_none());
    let cid = io.next();
    let mut sqe = Sqe::write(cid, Nsid(2), 0, 1).unwrap();
    sqe.set_sgl(&Sgl::DataBlockOffset { offset: 0, len: 4096 }).unwrap();
    assert!(io
        .exchange(&sqe, &[0xaa; 4096])
        .status()
        .same_code(Status::INVALID_NAMESPACE));
    let cid = io.next();
    let (cqe, _) = io.fetch(Sqe::read(cid, Nsid(1), 0, 1).unwrap(), 512);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    // Unmasked: the same queue sees it now (its cache follows the masks).
    t.set_namespace_hosts(2, &[]).unwrap();
    assert_eq!(active_namespaces(&mut other), [1, 2]);
    let cid = io.next();
    let (cqe, data) = io.fetch(Sqe::read(cid, Nsid(2), 0, 1).unwrap(), 4096);
    assert!(cqe.status().is_success(), "{}", cqe.status());
    assert!(data.is_some());
    // Masked again, to someone else: both lose it at once.
    t.set_namespace_hosts(2, &["nqn.2026-11.io.chanio:third".to_string()])
        .unwrap();
    assert_eq!(active_namespaces(&mut mine), [1]);
    let cid = io.next();
    let (cqe, _) = io.fetch(Sqe::read(cid, Nsid(2), 0, 1).unwrap(), 4096);
    assert!(cqe.status().same_code(Status::INVALID_NAMESPACE), "{}", cqe.status());
    // A malformed host NQN is refused.
    assert!(t.set_namespace_hosts(2, &["not an NQN".to_string()]).is_err());
    // Refused hosts lose it whatever the hosts allowed (all, here), the
    // others keep it; an empty refusal list gives it back.
    t.set_namespace_hosts(2, &[]).unwrap();
    t.set_namespace_refused(2, &[OTHER.to_string()]).unwrap();
    assert_eq!(active_namespaces(&mut other), [1]);
    assert_eq!(active_namespaces(&mut mine), [1, 2]);
    let cid = io.next();
    let (cqe, _) = io.fetch(Sqe::read(cid, Nsid(2), 0, 1).unwrap(), 4096);
    assert!(cqe.status().same_code(Status::INVALID_NAMESPACE), "{}", cqe.status());
    t.set_namespace_refused(2, &[]).unwrap();
    assert_eq!(active_namespaces(&mut other), [1, 2]);
}
