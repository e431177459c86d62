//! Bad input on the tcp listener's port: refused with a clear log line,
//! closing only the offending connection; the listener keeps accepting.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use messaging::proto::Connection;
use messaging::provider::tcp::{TcpFabric, TcpOptions, FRAME_HEADER, HELLO_VERSION};
use messaging::provider::Fabric;
use messaging::{CloseReason, Config, Endpoint, Error};

const LONG: Duration = Duration::from_secs(20);

/// Log lines of the whole test binary (the listener logs from its own threads).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per test binary");
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        std::io::stderr().write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn wait_for_log(needle: &str) {
    let deadline = Instant::now() + LONG;
    loop {
        let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "log never said {needle:?}; log:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn hello(version: u16, kind: u16, params: &[u8], declared_len: u32) -> Vec<u8> {
    let mut b = b"CHIO".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&declared_len.to_le_bytes());
    b.extend_from_slice(params);
    b
}

/// Reads until the server closes; returns what it sent.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn fabric() -> TcpFabric {
    TcpFabric::with_options(TcpOptions {
        handshake_timeout: Duration::from_millis(300),
        ..TcpOptions::default()
    })
}

fn good_pair(fabric: &TcpFabric, listener: &dyn messaging::provider::Listener) -> (Endpoint, Endpoint) {
    let addr = listener.local_addr();
    std::thread::scope(|s| {
        let server = s.spawn(|| Endpoint::accept(fabric, listener, Config::default(), Some(LONG)).expect("accept"));
        let client = Endpoint::connect(fabric, &addr, Config::default()).expect("connect");
        (client, server.join().unwrap())
    })
}

#[test]
fn bad_hellos_are_refused_and_the_listener_keeps_accepting() {
    logs();
    let fabric = fabric();
    let listener = fabric.listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();

    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: chanio\r\n\r\n").unwrap();
    assert!(
        read_to_close(&mut garbage).is_empty(),
        "garbage gets no answer, only a close"
    );
    wait_for_log("refusing tcp connection: bad magic");

    let mut truncated = TcpStream::connect(&addr).unwrap();
    truncated.write_all(&hello(HELLO_VERSION, 1, &[], 0)[..6]).unwrap();
    truncated.shutdown(Shutdown::Write).unwrap();
    read_to_close(&mut truncated);
    wait_for_log("truncated hello header: connection closed after 6 of 16 bytes");

    let mut silent = TcpStream::connect(&addr).unwrap();
    read_to_close(&mut silent);
    wait_for_log("timed out reading hello header");

    let mut old = TcpStream::connect(&addr).unwrap();
    // A body the server does not understand: it is read before the reject
    // goes out, so the reject is not lost to a reset for unread data.
    old.write_all(&hello(99, 1, &[0x42; 40], 40)).unwrap();
    let answer = read_to_close(&mut old);
    assert_eq!(&answer[..4], b"CHIO");
    assert_eq!(u16::from_le_bytes([answer[6], answer[7]]), 3, "a reject");
    let reason = String::from_utf8_lossy(&answer[16..]).into_owned();
    assert!(reason.contains("unsupported hello version 99"), "{reason}");
    wait_for_log("refusing tcp connection: unsupported hello version 99 (this side speaks 2)");

    let mut huge = TcpStream::connect(&addr).unwrap();
    huge.write_all(&hello(HELLO_VERSION, 1, &[], 1 << 20)).unwrap();
    read_to_close(&mut huge);
    wait_for_log("hello parameters too long (1048576 > 4096 bytes)");

    // After all that, a well-behaved peer is served.
    let (a, b) = good_pair(&fabric, &*listener);
    a.send(b"still serving").unwrap().wait_timeout(LONG).unwrap();
    assert_eq!(&b.recv_timeout(LONG).unwrap()[..], b"still serving");
}

#[test]
fn a_malformed_frame_closes_only_its_own_connection() {
    logs();
    let fabric = fabric();
    let listener = fabric.listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let (good_client, good_server) = good_pair(&fabric, &*listener);

    // A peer that completes a valid hello, then sends a bogus frame.
    let params = Connection::new(fabric.domain(), Config::default())
        .unwrap()
        .local_params();
    let mut rogue = TcpStream::connect(&addr).unwrap();
    rogue
        .write_all(&hello(HELLO_VERSION, 1, &params, params.len() as u32))
        .unwrap();
    let victim = Endpoint::accept(&fabric, &*listener, Config::default(), Some(LONG)).expect("accept rogue");
    let mut answer = [0u8; 16];
    rogue.set_read_timeout(Some(LONG)).unwrap();
    rogue.read_exact(&mut answer).unwrap();
    assert_eq!(u16::from_le_bytes([answer[6], answer[7]]), 2, "accepted");
    let mut frame = [0u8; FRAME_HEADER];
    frame[0] = 200;
    rogue.write_all(&frame).unwrap();

    assert!(matches!(
        victim.recv_timeout(LONG),
        Err(Error::Closed(CloseReason::Disconnected))
    ));
    wait_for_log("malformed frame: unknown opcode 200");

    // The other connection and the listener carry on.
    good_client.send(b"unaffected").unwrap();
    assert_eq!(&good_server.recv_timeout(LONG).unwrap()[..], b"unaffected");
    let (c, d) = good_pair(&fabric, &*listener);
    d.send(b"new peer").unwrap();
    assert_eq!(&c.recv_timeout(LONG).unwrap()[..], b"new peer");
}

#[test]
fn one_address_holds_at_most_its_share_of_connections() {
    logs();
    let fabric = TcpFabric::with_options(TcpOptions {
        handshake_timeout: Duration::from_millis(300),
        max_connections_per_address: 3,
        ..TcpOptions::default()
    });
    let listener = fabric.listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    // Two channels and one connection that never says hello: three.
    let (a, a_server) = good_pair(&fabric, listener.as_ref());
    let (b, b_server) = good_pair(&fabric, listener.as_ref());
    let silent = TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // The fourth is refused with the reason, before any hello is read.
    match Endpoint::connect(&fabric, &addr, Config::default()) {
        Err(Error::Fabric(messaging::provider::FabricError::Rejected { reason, .. })) => {
            assert!(reason.contains("too many connections from 127.0.0.1"), "{reason}");
        }
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
    wait_for_log("connections from its address already");
    // Channels that go (and the silent one, at its hello deadline) give
    // their places back.
    drop((a, a_server, silent));
    let deadline = Instant::now() + LONG;
    loop {
        let attempt = std::thread::scope(|s| {
            let server = s.spawn(|| {
                Endpoint::accept(
                    &fabric,
                    listener.as_ref(),
                    Config::default(),
                    Some(Duration::from_secs(2)),
                )
            });
            let client = Endpoint::connect(&fabric, &addr, Config::default());
            (client, server.join().unwrap())
        });
        match attempt {
            (Ok(c), Ok(s)) => {
                drop((c, s));
                break;
            }
            _ => {
                assert!(Instant::now() < deadline, "the places never came back");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    drop((b, b_server));
}

#[test]
fn one_address_cannot_hold_every_hello() {
    logs();
    // Hellos may take their time here; the 17th silent socket from one
    // address is closed at once all the same.
    let fabric = TcpFabric::with_options(TcpOptions {
        handshake_timeout: LONG,
        ..TcpOptions::default()
    });
    let listener = fabric.listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let silent: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let mut over = TcpStream::connect(&addr).unwrap();
    over.set_read_timeout(Some(LONG / 4)).unwrap();
    let mut byte = [0u8; 1];
    match over.read(&mut byte) {
        Ok(0) => {}
        other => panic!("the 17th hello of one address was not refused: {other:?}"),
    }
    wait_for_log("hellos from its address already pending");
    drop(silent);
}

#[test]
fn slow_hellos_make_room_for_new_connections() {
    logs();
    // Every handshake is held by a socket that says nothing (slowloris);
    // hellos may take their time, yet a new client gets in, and the one
    // that waited longest is closed.
    let fabric = TcpFabric::with_options(TcpOptions {
        handshake_timeout: LONG,
        max_handshakes: 4,
        ..TcpOptions::default()
    });
    let listener = fabric.listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let mut silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (client, server) = good_pair(&fabric, listener.as_ref());
    wait_for_log("closing the hello waiting longest");
    let first = &mut silent[0];
    first.set_read_timeout(Some(LONG / 4)).unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(first.read(&mut byte), Ok(0) | Err(_)),
        "the oldest silent socket was closed"
    );
    client.send(b"through").unwrap().wait_timeout(LONG).unwrap();
    assert_eq!(&*server.recv_timeout(LONG).unwrap(), b"through");
}
