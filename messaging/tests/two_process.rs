//! The messaging layer across two operating-system processes over tcp, shm
//! and verbs: this test binary starts a copy of itself as the server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use messaging::provider::tcp::TcpFabric;
use messaging::provider::Fabric;
use messaging::{Config, Endpoint, ReceivedKind};

/// Set in the child; its value names the fabric ("tcp", "shm" or "verbs").
const ROLE: &str = "CHANIO_TWO_PROCESS_SERVER";
const LONG: Duration = Duration::from_secs(30);

/// The server half, run only in the child process.
#[test]
#[ignore = "helper: runs as the server process of two_processes_over_tcp and _over_shm"]
fn server_process() {
    let Some(role) = std::env::var_os(ROLE) else {
        return;
    };
    let (fabric, addr) = fabric(role.to_str().unwrap_or("tcp"));
    let listener = fabric.listen(addr).expect("listen");
    println!("listening on {}", listener.local_addr());
    let ep = Endpoint::accept(&*fabric, &*listener, Config::default(), Some(LONG)).expect("accept");
    // Echo every delivery back the way it came, until the peer says stop.
    loop {
        let d = ep.recv_timeout(LONG).expect("recv");
        if &d[..] == b"stop" {
            ep.send(b"bye")
                .expect("send")
                .wait_timeout(LONG)
                .expect("bye delivered");
            return;
        }
        match d.kind() {
            ReceivedKind::Message => ep.send(&d[..]).expect("echo send"),
            _ => ep.push(&d).expect("echo push"),
        };
    }
}

fn fabric(name: &str) -> (Box<dyn Fabric>, &'static str) {
    match name {
        #[cfg(target_os = "linux")]
        "shm" => (Box::new(messaging::provider::shm::ShmFabric::new()), ""),
        #[cfg(feature = "verbs")]
        "verbs" => (
            Box::new(messaging::provider::verbs::VerbsFabric::new().expect("the verbs fabric")),
            "127.0.0.1:0",
        ),
        _ => (Box::new(TcpFabric::new()), "127.0.0.1:0"),
    }
}

#[test]
fn two_processes_over_tcp() {
    two_processes("tcp");
}

#[cfg(target_os = "linux")]
#[test]
fn two_processes_over_shm() {
    two_processes("shm");
}

#[cfg(feature = "verbs")]
#[test]
fn two_processes_over_verbs() {
    if messaging::provider::conformance::verbs_for_tests().is_some() {
        two_processes("verbs");
    }
}

fn two_processes(name: &str) {
    let (mut child, addr) = spawn_server("server_process", ROLE, name);
    let (fabric, _) = fabric(name);
    let ep = Endpoint::connect(&*fabric, &addr, Config::default()).expect("connect to the other process");
    for i in 0..200u32 {
        let msg = vec![i as u8; (i as usize * 37) % 4000 + 1];
        if i % 2 == 0 {
            ep.send(&msg).expect("send");
        } else {
            ep.push(&msg).expect("push");
        }
        let echo = ep.recv_timeout(LONG).expect("echo");
        assert_eq!(&echo[..], &msg[..], "round trip {i}");
        let expected = if i % 2 == 0 {
            ReceivedKind::Message
        } else {
            ReceivedKind::Push
        };
        assert_eq!(echo.kind(), expected);
    }
    ep.send(b"stop").expect("stop");
    assert_eq!(&ep.recv_timeout(LONG).expect("bye")[..], b"bye");
    let status = child.wait().expect("server exit");
    assert!(status.success(), "server process failed: {status}");
}

const DIE_ROLE: &str = "CHANIO_TWO_PROCESS_DYING_SERVER";

/// The dying server half: takes one Send, then the process aborts.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "helper: runs as the server process of shm_peer_death_flushes"]
fn dying_server_process() {
    use messaging::provider::conformance::{pool, recvs, wait_for};
    if std::env::var_os(DIE_ROLE).is_none() {
        return;
    }
    let fabric = messaging::provider::shm::ShmFabric::new();
    let listener = fabric.listen("").expect("listen");
    println!("listening on {}", listener.local_addr());
    let p = pool(&fabric, 64, 4, messaging::mr::Access::ALL);
    let incoming = listener.accept(Some(LONG)).expect("accept");
    let qp = incoming
        .accept(fabric.domain(), b"", recvs(&p, 4, 0))
        .expect("accept queue pair");
    let got = wait_for(&*qp, 1);
    assert_eq!(&got[0].buf[..], b"last words");
    std::process::abort();
}

/// A peer process that dies flushes everything outstanding here, after the
/// requests it executed completed successfully.
#[cfg(target_os = "linux")]
#[test]
fn shm_peer_death_flushes() {
    use messaging::provider::conformance::{pool, recvs, wait_for};
    use messaging::provider::{RecvWr, SendOp, SendWr, WcStatus, WrId};
    let (mut child, addr) = spawn_server("dying_server_process", DIE_ROLE, "1");
    let fabric = messaging::provider::shm::ShmFabric::new();
    let p = pool(&fabric, 64, 8, messaging::mr::Access::ALL);
    let qp = fabric
        .connect(&addr, fabric.domain(), b"", recvs(&p, 3, 10))
        .expect("connect");
    let mut buf = p.checkout().expect("chunk");
    buf.fill(b"last words").expect("fits");
    qp.post_send(&mut vec![SendWr {
        id: WrId(1),
        op: SendOp::Send { buf, imm: None },
    }])
    .expect("post");
    let got = wait_for(&*qp, 4);
    assert_eq!((got[0].id, got[0].status), (WrId(1), WcStatus::Success));
    assert!(got[1..].iter().all(|c| c.status == WcStatus::Flushed));
    assert_eq!(got[1..].iter().map(|c| c.id.0).collect::<Vec<_>>(), vec![10, 11, 12]);
    assert!(qp.is_failed());
    qp.post_recv(RecvWr {
        id: WrId(99),
        buf: p.checkout().expect("chunk"),
    })
    .expect("post after failure");
    assert_eq!(wait_for(&*qp, 1)[0].status, WcStatus::Flushed);
    let status = child.wait().expect("server exit");
    assert!(!status.success(), "the server aborted");
}

/// Starts this test binary again running only the `#[ignore]`d helper test
/// `test` with `key=value` in its environment; returns the child and the
/// address it printed ("listening on ADDR").
fn spawn_server(test: &str, key: &str, value: &str) -> (std::process::Child, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(key, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start server process");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("server printed its address").expect("utf-8 line");
        // libtest may print "test NAME ... " on the same line.
        if let Some(at) = line.find("listening on ") {
            break line[at + "listening on ".len()..].trim().to_string();
        }
    };
    // Keep draining: a closed pipe would fail the child's later output.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}
