//! The messaging layer across two operating-system processes over tcp: this
//! test binary starts a copy of itself as the server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use messaging::provider::tcp::TcpFabric;
use messaging::provider::Fabric;
use messaging::{Config, Endpoint, ReceivedKind};

const ROLE: &str = "CHANIO_TWO_PROCESS_SERVER";
const LONG: Duration = Duration::from_secs(30);

/// The server half, run only in the child process.
#[test]
#[ignore = "helper: runs as the server process of two_processes_over_tcp"]
fn server_process() {
    if std::env::var_os(ROLE).is_none() {
        return;
    }
    let fabric = TcpFabric::new();
    let listener = fabric.listen("127.0.0.1:0").expect("listen");
    println!("listening on {}", listener.local_addr());
    let ep = Endpoint::accept(&fabric, &*listener, Config::default(), Some(LONG)).expect("accept");
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
            ReceivedKind::Message => ep.send(&d).expect("echo send"),
            _ => ep.push(&d).expect("echo push"),
        };
    }
}

#[test]
fn two_processes_over_tcp() {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([
            "server_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start server process");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("server printed its address").expect("utf-8 line");
        // libtest may print "test server_process ... " on the same line.
        if let Some(at) = line.find("listening on ") {
            break line[at + "listening on ".len()..].trim().to_string();
        }
    };
    let fabric = TcpFabric::new();
    let ep = Endpoint::connect(&fabric, &addr, Config::default()).expect("connect to the other process");
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
