//! The server against an in-process I/O unit, driven by a small NBD
//! client written from the spec (the real clients run in the end-to-end
//! tests).

use std::collections::HashMap;

use iounit::target::{Target, TargetConfig};

use super::proto::{IHAVEOPT, NBDMAGIC, REQUEST_MAGIC};
use super::*;
use crate::HostOptions;

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const WRITE_ZEROES: u16 = 6;
const FUA: u16 = 1;

fn target(namespaces: &[&str]) -> Target {
    Target::start(TargetConfig {
        listen: vec!["tcp://127.0.0.1:0".into()],
        namespaces: namespaces.iter().map(|n| n.parse().unwrap()).collect(),
        ..TargetConfig::default()
    })
    .unwrap()
}

/// A server on 127.0.0.1 running on its own thread; stopped on drop.
struct Running {
    addr: SocketAddr,
    stopper: NbdStopper,
    thread: Option<JoinHandle<Result<(), NbdError>>>,
}

impl Running {
    fn start(host: Host, config: NbdConfig) -> Running {
        let server = NbdServer::bind(host, &"127.0.0.1:0".parse().unwrap(), config).unwrap();
        let addr = server.uri().trim_start_matches("nbd://").parse().unwrap();
        let stopper = server.stopper().unwrap();
        let thread = std::thread::spawn(move || server.run());
        Running {
            addr,
            stopper,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> Result<(), NbdError> {
        self.stopper.stop();
        self.thread.take().map_or(Ok(()), |t| t.join().unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A reply: the cookie, then the data or (errno, message).
type Reply = (u64, Result<Vec<u8>, (u32, String)>);

struct Client {
    s: TcpStream,
    structured: bool,
    /// Read lengths by cookie, for simple replies.
    reads: HashMap<u64, usize>,
    size: u64,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

impl Client {
    fn raw(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    fn option(s: &mut TcpStream, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        s.write_all(&b).unwrap();
    }

    /// One option reply: (type, data).
    fn option_reply(s: &mut TcpStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let len = be32(&h[16..]) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).unwrap();
        (be32(&h[12..]), d)
    }

    fn greet(addr: SocketAddr) -> TcpStream {
        let mut s = Client::raw(addr);
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s
    }

    /// Negotiates `name` with NBD_OPT_GO.
    fn go(addr: SocketAddr, name: &str, structured: bool) -> Client {
        let mut s = Client::greet(addr);
        if structured {
            Client::option(&mut s, 8, &[]);
            assert_eq!(Client::option_reply(&mut s).0, 1);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        Client::option(&mut s, 7, &d);
        let mut size = 0;
        loop {
            let (kind, data) = Client::option_reply(&mut s);
            match kind {
                1 => break,
                3 if data[..2] == [0, 0] => size = u64::from_be_bytes(data[2..10].try_into().unwrap()),
                3 => {}
                e => panic!("GO {name:?} failed: {e:#x} {}", String::from_utf8_lossy(&data)),
            }
        }
        Client {
            s,
            structured,
            reads: HashMap::new(),
            size,
        }
    }

    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
        if kind == READ {
            self.reads.insert(cookie, len as usize);
        }
    }

    fn reply(&mut self) -> Reply {
        if !self.structured {
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(be32(&h), 0x6744_6698);
            let cookie = u64::from_be_bytes(h[8..].try_into().unwrap());
            let errno = be32(&h[4..]);
            let len = self.reads.remove(&cookie).unwrap_or(0);
            if errno != 0 {
                return (cookie, Err((errno, String::new())));
            }
            let mut d = vec![0u8; len];
            self.s.read_exact(&mut d).unwrap();
            return (cookie, Ok(d));
        }
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), 0x668e_33ef);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]) & 1, 1, "one chunk per reply");
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        self.s.read_exact(&mut d).unwrap();
        self.reads.remove(&cookie);
        match kind {
            0 => (cookie, Ok(Vec::new())),
            1 => (cookie, Ok(d[8..].to_vec())),
            0x8001 => {
                let n = u16::from_be_bytes([d[4], d[5]]) as usize;
                (
                    cookie,
                    Err((be32(&d), String::from_utf8_lossy(&d[6..6 + n]).into_owned())),
                )
            }
            k => panic!("chunk type {k:#x}"),
        }
    }

    fn call(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<Vec<u8>, (u32, String)> {
        self.send(kind, flags, 1, offset, len, data);
        let (cookie, r) = self.reply();
        assert_eq!(cookie, 1);
        r
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(31) ^ seed) as u8).collect()
}

#[test]
fn many_requests_in_flight_complete_and_read_back_what_was_written() {
    let t = target(&["ram:16MiB", "ram:8MiB:4096"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let server = Running::start(host, NbdConfig::default());
    for (name, structured) in [("1", true), ("2", false)] {
        let mut c = Client::go(server.addr, name, structured);
        assert_eq!(c.size, if name == "1" { 16 << 20 } else { 8 << 20 });
        // Eight writes of 4 KiB to 512 KiB, all sent before any reply is
        // read (FUA on every other one); then eight reads likewise.
        let sizes: Vec<usize> = (0..8).map(|i| 4096 << i).collect();
        let offsets: Vec<u64> = (0..8u64).map(|i| i * (1 << 20)).collect();
        let mut expect = HashMap::new();
        for (i, (&len, &off)) in sizes.iter().zip(&offsets).enumerate() {
            let data = pattern(i as u64, len);
            c.send(
                WRITE,
                if i % 2 == 0 { FUA } else { 0 },
                i as u64,
                off,
                len as u32,
                &data,
            );
            expect.insert(i as u64, data);
        }
        for _ in 0..8 {
            let (cookie, r) = c.reply();
            assert_eq!(r, Ok(Vec::new()), "write {cookie}");
        }
        for i in 0..8u64 {
            c.send(READ, 0, 100 + i, offsets[i as usize], sizes[i as usize] as u32, &[]);
        }
        for _ in 0..8 {
            let (cookie, r) = c.reply();
            assert!(
                r.as_ref() == Ok(&expect[&(cookie - 100)]),
                "read {cookie} came back different"
            );
        }
        // A pipeline deeper than the connection's limit, of 4 KiB reads.
        for i in 0..200u64 {
            c.send(READ, 0, 1000 + i, i * 4096, 4096, &[]);
        }
        let mut seen: Vec<u64> = (0..200)
            .map(|_| c.reply())
            .map(|(k, r)| {
                assert!(r.is_ok(), "{k}: {r:?}");
                k
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (1000..1200).collect::<Vec<_>>());
        c.send(DISC, 0, 9, 0, 0, &[]);
        let mut rest = Vec::new();
        assert_eq!(
            c.s.read_to_end(&mut rest).unwrap(),
            0,
            "disconnect closes the connection"
        );
    }
}

#[test]
fn flush_trim_and_write_zeroes_do_what_they_say() {
    let t = target(&["ram:4MiB"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let server = Running::start(host, NbdConfig::default());
    let mut c = Client::go(server.addr, "", true);
    let data = pattern(5, 65536);
    assert_eq!(c.call(WRITE, 0, 0, 65536, &data), Ok(Vec::new()));
    assert_eq!(c.call(FLUSH, 0, 0, 0, &[]), Ok(Vec::new()));
    assert_eq!(c.call(WRITE_ZEROES, FUA, 4096, 8192, &[]), Ok(Vec::new()));
    let back = c.call(READ, 0, 0, 65536, &[]).unwrap();
    assert_eq!(back[..4096], data[..4096]);
    assert!(back[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(back[12288..], data[12288..]);
    assert_eq!(c.call(TRIM, 0, 0, 65536, &[]), Ok(Vec::new()));
    assert_eq!(c.call(TRIM, 0, 0, 0, &[]), Ok(Vec::new()));
}

#[test]
fn refused_requests_get_errors_with_reasons_and_the_connection_goes_on() {
    let t = target(&["ram:4MiB:4096"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let server = Running::start(
        host,
        NbdConfig {
            max_payload: 64 << 10,
            ..NbdConfig::default()
        },
    );
    let mut c = Client::go(server.addr, "1", true);
    let (errno, msg) = c.call(WRITE, 0, 512, 4096, &[0u8; 4096]).unwrap_err();
    assert_eq!(errno, proto::EINVAL);
    assert!(msg.contains("whole 4096-byte blocks"), "{msg}");
    let (errno, msg) = c.call(WRITE, 0, 4 << 20, 4096, &[0u8; 4096]).unwrap_err();
    assert_eq!(errno, proto::ENOSPC, "{msg}");
    let big = vec![1u8; 128 << 10];
    let (errno, _) = c.call(WRITE, 0, 0, big.len() as u32, &big).unwrap_err();
    assert_eq!(errno, proto::EINVAL);
    assert_eq!(c.call(99, 0, 0, 0, &[]).unwrap_err().0, proto::EINVAL);
    // The refused payloads were consumed: the stream is still in step.
    assert_eq!(c.call(WRITE, 0, 0, 4096, &[7u8; 4096]), Ok(Vec::new()));
    assert_eq!(c.call(READ, 0, 0, 4096, &[]), Ok(vec![7u8; 4096]));
    // Simple replies carry the errno alone.
    let mut s = Client::go(server.addr, "1", false);
    assert_eq!(s.call(READ, 0, 4 << 20, 4096, &[]), Err((proto::EINVAL, String::new())));
    assert_eq!(s.call(READ, 0, 0, 4096, &[]), Ok(vec![7u8; 4096]));
}

#[test]
fn a_read_only_bridge_refuses_changes() {
    let t = target(&["ram:1MiB"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let server = Running::start(
        host,
        NbdConfig {
            read_only: true,
            ..NbdConfig::default()
        },
    );
    let mut c = Client::go(server.addr, "1", true);
    for kind in [WRITE, TRIM, WRITE_ZEROES] {
        let data = if kind == WRITE { vec![0u8; 512] } else { Vec::new() };
        assert_eq!(c.call(kind, 0, 0, 512, &data).unwrap_err().0, proto::EPERM, "{kind}");
    }
    assert!(c.call(READ, 0, 0, 512, &[]).is_ok());
}

#[test]
fn a_broken_client_loses_only_its_own_connection() {
    let t = target(&["ram:1MiB"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let server = Running::start(host, NbdConfig::default());
    let mut good = Client::go(server.addr, "1", true);
    let mut bad = Client::go(server.addr, "1", true);
    bad.s.write_all(&[0xde; 28]).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        bad.s.read_to_end(&mut rest).unwrap(),
        0,
        "a bad magic closes the connection"
    );
    // A bad option magic in the negotiation, likewise.
    let mut s = Client::greet(server.addr);
    s.write_all(&[0u8; 16]).unwrap();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    // Unknown client flags, likewise.
    let mut s = Client::raw(server.addr);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert!(good.call(READ, 0, 0, 512, &[]).is_ok());
}

#[test]
fn a_silent_client_is_dropped_at_the_handshake_deadline_and_connections_are_capped() {
    let t = target(&["ram:1MiB"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let server = Running::start(
        host,
        NbdConfig {
            handshake_timeout: Duration::from_millis(300),
            max_connections: 2,
            ..NbdConfig::default()
        },
    );
    let start = Instant::now();
    let mut silent = Client::greet(server.addr);
    let mut rest = Vec::new();
    assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    let mut a = Client::go(server.addr, "1", true);
    let _b = Client::go(server.addr, "1", true);
    // A third is closed at once, without a greeting.
    let mut c = Client::raw(server.addr);
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
    assert!(rest.is_empty());
    assert!(a.call(READ, 0, 0, 512, &[]).is_ok());
}

#[test]
fn a_client_that_never_reads_its_replies_loses_its_connection() {
    let t = target(&["ram:64MiB"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let server = Running::start(
        host,
        NbdConfig {
            reply_timeout: Duration::from_millis(300),
            ..NbdConfig::default()
        },
    );
    let mut greedy = Client::go(server.addr, "1", true);
    // 64 reads of 1 MiB: far more than the sockets buffer.
    for i in 0..64u64 {
        greedy.send(READ, 0, i, i << 20, 1 << 20, &[]);
    }
    std::thread::sleep(Duration::from_secs(2));
    // What the sockets held comes, then the end: not all 64 MiB, since the
    // server gave up on a client that did not read.
    let mut sink = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        match greedy.s.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection stayed open ({e}) after {got} bytes"),
        }
    }
    assert!(got < 64 << 20, "every reply was sent: {got} bytes");
    // The server goes on serving others.
    let mut c = Client::go(server.addr, "1", true);
    assert!(c.call(READ, 0, 0, 512, &[]).is_ok());
}

#[test]
fn stopping_closes_every_connection() {
    let t = target(&["ram:1MiB"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let mut server = Running::start(host, NbdConfig::default());
    let mut c = Client::go(server.addr, "1", true);
    assert!(c.call(READ, 0, 0, 512, &[]).is_ok());
    server.stop().unwrap();
    let mut rest = Vec::new();
    assert_eq!(c.s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn a_lost_io_unit_fails_requests_then_the_bridge_serves_again() {
    let t = target(&["ram:1MiB"]);
    let uri = t.local_uris()[0].clone();
    let host = Host::connect(
        &uri,
        HostOptions {
            reconnect_deadline: Duration::from_millis(500),
            command_timeout: Duration::from_secs(2),
            ..HostOptions::default()
        },
    )
    .unwrap();
    let server = Running::start(host, NbdConfig::default());
    let mut c = Client::go(server.addr, "1", true);
    assert!(c.call(READ, 0, 0, 512, &[]).is_ok());
    t.shutdown();
    drop(t);
    let start = Instant::now();
    let (errno, msg) = c.call(READ, 0, 0, 512, &[]).unwrap_err();
    assert_eq!(errno, proto::EIO, "{msg}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "failed after {:?}",
        start.elapsed()
    );
    // The same address again: the host reconnects and the same NBD
    // connection works again.
    let t2 = Target::start(TargetConfig {
        listen: vec![uri],
        namespaces: vec!["ram:1MiB".parse().unwrap()],
        ..TargetConfig::default()
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.call(WRITE, 0, 0, 512, &[3u8; 512]) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never served again: {e:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.call(READ, 0, 0, 512, &[]), Ok(vec![3u8; 512]));
    t2.shutdown();
}

#[test]
fn listen_addresses_parse_or_say_what_is_expected() {
    assert_eq!(
        "127.0.0.1:10809".parse::<Listen>().unwrap(),
        Listen::Tcp("127.0.0.1:10809".parse().unwrap())
    );
    assert_eq!(
        "unix:/tmp/x.sock".parse::<Listen>().unwrap(),
        Listen::Unix("/tmp/x.sock".into())
    );
    for bad in ["unix:", "localhost", "10809", ""] {
        let e = bad.parse::<Listen>().unwrap_err().to_string();
        assert!(e.contains("HOST:PORT") || e.contains("needs a path"), "{bad}: {e}");
    }
}

#[test]
fn a_unix_socket_replaces_a_stale_one_and_refuses_a_live_one() {
    let t = target(&["ram:1MiB"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("chanio-nbd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nbd.sock");
    drop(UnixListener::bind(&path).unwrap()); // stale: nobody listens
    let listen = Listen::Unix(path.clone());
    let server = NbdServer::bind(host.clone(), &listen, NbdConfig::default()).unwrap();
    assert!(server.uri().starts_with("nbd+unix:///?socket="));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let e = NbdServer::bind(host.clone(), &listen, NbdConfig::default()).unwrap_err();
    assert!(e.to_string().contains("another server"), "{e}");
    drop(server);
    assert!(!path.exists(), "the socket is removed when the server goes");
    let e = NbdServer::bind(
        host,
        &listen,
        NbdConfig {
            default_ns: Some(Nsid(9)),
            ..NbdConfig::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, NbdError::NoNamespace(9)), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn reads_go_through_a_window_and_see_every_write() {
    let t = target(&["ram:8MiB"]);
    let host = Host::connect(&t.local_uris()[0], HostOptions::default()).unwrap();
    let server = Running::start(
        host.clone(),
        NbdConfig {
            windows: true,
            ..NbdConfig::default()
        },
    );
    let reads = || host.smart_log().unwrap().host_read_commands;
    let mut c = Client::go(server.addr, "1", true);
    for round in 0..3u64 {
        let data = pattern(round, 64 << 10);
        let at = round * (1 << 20) + 4096;
        assert!(c.call(WRITE, 0, at, data.len() as u32, &data).is_ok());
        let before = reads();
        assert_eq!(
            c.call(READ, 0, at, data.len() as u32, &[]).unwrap(),
            data,
            "round {round}"
        );
        // Through the window: no Read command reached the I/O unit.
        assert_eq!(reads(), before, "round {round}: the read went by command");
    }
    // A window the I/O unit revokes: the read still succeeds, by command,
    // and a new window comes later.
    t.set_namespace_hosts(1, &[crate::default_hostnqn()]).unwrap();
    let data = pattern(9, 4096);
    assert!(c.call(WRITE, 0, 0, 4096, &data).is_ok());
    assert_eq!(c.call(READ, 0, 0, 4096, &[]).unwrap(), data);
}
