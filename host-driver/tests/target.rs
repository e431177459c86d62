//! End-to-end tests of the host library against an in-process I/O-unit
//! target over tcp on 127.0.0.1.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use host::{Host, HostError, HostEvent, HostOptions, Nsid, Status};
use iounit::target::{Target, TargetConfig, DEFAULT_NQN};

fn start_target(namespaces: &[&str], max_io_queues: u16) -> (Target, String) {
    start_target_on("tcp://127.0.0.1:0", namespaces, max_io_queues)
}

/// A target listening on `listen` (a fixed address to restart one on).
fn start_target_on(listen: &str, namespaces: &[&str], max_io_queues: u16) -> (Target, String) {
    let target = Target::start(TargetConfig {
        nqn: DEFAULT_NQN.into(),
        listen: vec![listen.into()],
        namespaces: namespaces.iter().map(|s| s.parse().unwrap()).collect(),
        allowed_hosts: vec![],
        max_io_queues,
        max_queue_depth: 128,
        workers: 256,
        ..TargetConfig::default()
    })
    .expect("target starts");
    let uri = target.local_uris()[0].clone();
    (target, uri)
}

fn opts() -> HostOptions {
    HostOptions {
        command_timeout: Duration::from_secs(10),
        reconnect_deadline: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        ..HostOptions::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A minimal executor: no runtime, just park and unpark.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

#[test]
fn connects_and_lists_namespaces() {
    let (target, uri) = start_target(&["ram:64MiB", "ram:1MiB:4096"], 8);
    let host = Host::connect(&uri, opts()).unwrap();
    assert_eq!(host.transport(), "tcp");
    assert_eq!(host.io_queues(), 1);
    let ns = host.namespaces().unwrap();
    assert_eq!(ns.len(), 2, "{ns:?}");
    assert_eq!(ns[0].nsid, Nsid(1));
    assert_eq!(ns[0].bytes(), 64 << 20);
    let id = host.identify_controller().unwrap();
    assert_eq!(id.cntlid, host.controller_id());
    assert_eq!(id.subnqn.as_ref().map(|n| n.as_str()), Some(DEFAULT_NQN));
    host.close();
    target.shutdown();
}

#[test]
fn round_trips_of_many_sizes() {
    let (target, uri) = start_target(&["ram:64MiB"], 8);
    let host = Host::connect(&uri, HostOptions { io_queues: 3, ..opts() }).unwrap();
    assert_eq!(host.io_queues(), 3);
    let info = host.namespaces().unwrap()[0];
    let bs = info.block_size as usize;
    let last = info.blocks - 1;
    for (i, &len) in [
        bs,
        4096,
        8192,
        4096 + bs,
        128 * 1024,
        512 * 1024,
        512 * 1024 + bs,
        3 << 20,
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(len, i as u8);
        let blocks = (len / bs) as u64;
        for slba in [0, info.blocks - blocks] {
            host.write(Nsid(1), slba, &data, i % 2 == 0).unwrap();
            let back = host.read(Nsid(1), slba, blocks as u32).unwrap();
            assert!(back == data, "{len} bytes at LBA {slba}");
        }
    }
    // Last LBA on its own.
    host.write(Nsid(1), last, &pattern(bs, 9), false).unwrap();
    assert_eq!(host.read(Nsid(1), last, 1).unwrap(), pattern(bs, 9));
    host.flush(Nsid(1)).unwrap();
    host.close();
    target.shutdown();
}

#[test]
fn zero_copy_buffers_and_zeroing() {
    let (target, uri) = start_target(&["ram:8MiB"], 8);
    let host = Host::connect(&uri, opts()).unwrap();
    let mut buf = host.alloc(64 * 1024).unwrap();
    buf.copy_from_slice(&pattern(64 * 1024, 3));
    host.write_from(Nsid(1), 16, &mut buf, false).unwrap();
    let mut into = host.alloc(64 * 1024).unwrap();
    host.read_into(Nsid(1), 16, &mut into).unwrap();
    assert!(into[..] == pattern(64 * 1024, 3)[..]);
    // Again, into the same buffer (its memory came back).
    host.read_into(Nsid(1), 16, &mut into).unwrap();
    assert!(into[..] == pattern(64 * 1024, 3)[..]);

    host.write_zeroes(Nsid(1), 16, 8).unwrap();
    let back = host.read(Nsid(1), 16, 16).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..], &pattern(64 * 1024, 3)[4096..8192]);
    host.trim(Nsid(1), 24, 8).unwrap();
    host.close();
    target.shutdown();
}

#[test]
fn errors_carry_nvme_statuses() {
    let (target, uri) = start_target(&["ram:1MiB"], 8);
    let host = Host::connect(&uri, opts()).unwrap();
    let blocks = host.namespaces().unwrap()[0].blocks;
    let e = host.read(Nsid(1), blocks, 1).unwrap_err();
    assert!(e.status().is_some_and(|s| s.same_code(Status::LBA_OUT_OF_RANGE)), "{e}");
    assert!(
        e.to_string()
            .starts_with("Read failed: LBA Out of Range (SCT 0h, SC 80h"),
        "{e}"
    );
    let e = host.write(Nsid(1), blocks - 1, &[0; 1024], false).unwrap_err();
    assert!(e.status().is_some_and(|s| s.same_code(Status::LBA_OUT_OF_RANGE)), "{e}");
    let e = host.read(Nsid(7), 0, 1).unwrap_err();
    assert!(
        e.status().is_some_and(|s| s.same_code(Status::INVALID_NAMESPACE)),
        "{e}"
    );
    assert!(
        e.to_string().starts_with("Read failed: Invalid Namespace or Format"),
        "{e}"
    );
    let e = host.flush(Nsid(7)).unwrap_err();
    assert!(
        e.status().is_some_and(|s| s.same_code(Status::INVALID_NAMESPACE)),
        "{e}"
    );
    // Refused locally, before sending.
    assert!(matches!(host.read(Nsid(1), 0, 0), Err(HostError::InvalidArgument(_))));
    assert!(matches!(
        host.write(Nsid(1), 0, &[0; 100], false),
        Err(HostError::InvalidArgument(_))
    ));
    assert!(matches!(host.read(Nsid(0), 0, 1), Err(HostError::InvalidArgument(_))));
    // Many failing reads leave the queue usable (exposed buffers are reused).
    for _ in 0..200 {
        assert!(host.read(Nsid(1), blocks, 8).is_err());
    }
    host.write(Nsid(1), 0, &pattern(4096, 1), false).unwrap();
    assert_eq!(host.read(Nsid(1), 0, 8).unwrap(), pattern(4096, 1));
    host.close();
    target.shutdown();
}

#[test]
fn async_api_without_a_runtime() {
    let (target, uri) = start_target(&["ram:8MiB"], 8);
    let host = Host::connect(&uri, opts()).unwrap();
    let data = pattern(3 * 4096, 5);
    block_on(host.write_async(Nsid(1), 100, &data, false)).unwrap();
    block_on(host.flush_async(Nsid(1))).unwrap();
    let futs: Vec<_> = (0..4).map(|_| host.read_async(Nsid(1), 100, 24)).collect();
    for f in futs {
        assert_eq!(block_on(f).unwrap(), data);
    }
    fn assert_send<T: Send>(_: &T) {}
    let f = host.read_async(Nsid(1), 0, 1);
    assert_send(&f);
    drop(f);
    host.close();
    target.shutdown();
}

#[test]
fn namespace_attach_raises_an_event() {
    let (target, uri) = start_target(&["ram:1MiB"], 8);
    let host = Host::connect(&uri, opts()).unwrap();
    let events = host.events();
    // Let the event thread post its Asynchronous Event Request.
    std::thread::sleep(Duration::from_millis(200));
    let backend = iounit::backend::open(&"ram:2MiB".parse().unwrap()).unwrap();
    let nsid = target.registry().attach(None, backend).unwrap();
    match events
        .recv_timeout(Duration::from_secs(10))
        .expect("an event within 10 s")
    {
        HostEvent::NamespacesChanged { nsids, .. } => assert_eq!(nsids, vec![Nsid(nsid)]),
        other => panic!("unexpected event {other:?}"),
    }
    assert_eq!(
        events.recv_timeout(Duration::from_secs(1)).ok(),
        None,
        "one event per change"
    );
    // The event was re-armed: a detach is seen too.
    target.registry().detach(nsid, Duration::from_secs(5)).unwrap();
    match events.recv_timeout(Duration::from_secs(10)).expect("a second event") {
        HostEvent::NamespacesChanged { nsids, .. } => assert_eq!(nsids, vec![Nsid(nsid)]),
        other => panic!("unexpected event {other:?}"),
    }
    let backend = iounit::backend::open(&"ram:2MiB".parse().unwrap()).unwrap();
    let nsid = target.registry().attach(Some(nsid), backend).unwrap();
    assert!(events.recv_timeout(Duration::from_secs(10)).is_ok());
    assert_eq!(host.namespaces().unwrap().len(), 2);
    host.write(Nsid(nsid), 0, &pattern(512, 1), false).unwrap();
    host.close();
    target.shutdown();
}

#[test]
fn target_shutdown_fails_calls_in_time() {
    let (target, uri) = start_target(&["ram:8MiB"], 8);
    let host = Host::connect(
        &uri,
        HostOptions {
            reconnect_deadline: Duration::from_millis(500),
            command_timeout: Duration::from_secs(3),
            ..opts()
        },
    )
    .unwrap();
    host.write(Nsid(1), 0, &pattern(4096, 2), false).unwrap();
    target.shutdown();
    let t0 = Instant::now();
    let mut last = None;
    for _ in 0..5 {
        let r = host.read(Nsid(1), 0, 8);
        if let Err(e) = r {
            last = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = last.expect("reads fail once the target is gone");
    assert!(t0.elapsed() < Duration::from_secs(5), "failed in {:?}", t0.elapsed());
    assert!(
        matches!(e, HostError::ConnectionLost { .. } | HostError::Timeout { .. }),
        "{e}"
    );
    // Later calls fail fast.
    let t1 = Instant::now();
    assert!(host.flush(Nsid(1)).is_err());
    assert!(t1.elapsed() < Duration::from_secs(4));
    host.close();
    assert!(matches!(host.read(Nsid(1), 0, 1), Err(HostError::Closed)));
}

#[test]
fn wrong_subsystem_is_refused() {
    let (target, uri) = start_target(&["ram:1MiB"], 8);
    let e = Host::connect(
        &uri,
        HostOptions {
            subnqn: "nqn.2026-11.io.chanio:nope".into(),
            ..opts()
        },
    )
    .unwrap_err();
    assert!(matches!(e, HostError::Connect { .. }), "{e}");
    assert!(e.status().is_some(), "{e:?}");
    let e = Host::connect("rdma://127.0.0.1:1", opts()).unwrap_err();
    assert!(matches!(e, HostError::InvalidUri { .. }));
    target.shutdown();
}

#[test]
fn reconnects_to_a_restarted_target() {
    let (target, uri) = start_target(&["ram:1MiB"], 8);
    let host = Host::connect(
        &uri,
        HostOptions {
            reconnect_deadline: Duration::from_secs(10),
            ..opts()
        },
    )
    .unwrap();
    let events = host.events();
    host.write(Nsid(1), 0, &pattern(4096, 4), false).unwrap();
    let first = host.controller_id();
    target.shutdown();
    // Same address, fresh (empty) namespace.
    let (again, _) = start_target_on(&uri, &["ram:1MiB"], 8);
    let t0 = Instant::now();
    let back = host.read(Nsid(1), 0, 8).expect("re-issued after reconnect");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(back, vec![0u8; 4096], "a new RAM namespace");
    let mut seen = Vec::new();
    while let Ok(e) = events.recv_timeout(Duration::from_millis(500)) {
        seen.push(e);
    }
    assert!(matches!(seen.first(), Some(HostEvent::Disconnected { .. })), "{seen:?}");
    assert!(
        seen.iter().any(|e| matches!(e, HostEvent::Reconnected { .. })),
        "{seen:?}"
    );
    let _ = first;
    host.close();
    again.shutdown();
}

#[test]
fn keep_alive_holds_an_idle_connection() {
    let (target, uri) = start_target(&["ram:1MiB"], 8);
    let host = Host::connect(
        &uri,
        HostOptions {
            keep_alive: Duration::from_millis(400),
            ..opts()
        },
    )
    .unwrap();
    let events = host.events();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(events.try_recv().is_err(), "no disconnect while idle");
    host.flush(Nsid(1)).unwrap();
    host.close();
    target.shutdown();
}

#[test]
fn concurrent_threads_share_a_host() {
    let (target, uri) = start_target(&["ram:16MiB"], 8);
    let host = Host::connect(
        &uri,
        HostOptions {
            io_queues: 2,
            queue_depth: 4,
            ..opts()
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let host = host.clone();
            s.spawn(move || {
                for i in 0..20u64 {
                    let lba = (u64::from(t) * 100 + i) * 16;
                    let data = pattern(8192, t ^ i as u8);
                    host.write(Nsid(1), lba, &data, false).unwrap();
                    assert_eq!(host.read(Nsid(1), lba, 16).unwrap(), data);
                }
            });
        }
    });
    host.close();
    target.shutdown();
}

/// File namespaces run many commands at once on the I/O unit's ring, and
/// complete them as the file finishes them: 16 threads share one I/O queue
/// of depth 32, with writes of every path (512-byte blocks through the page
/// cache, in-capsule 4 KiB, pushed in one chunk and in several, FUA or
/// not), then flush and read everything back, concurrently again.
#[test]
fn file_namespaces_serve_many_commands_at_once() {
    let dir = std::env::temp_dir().join(format!("chanio-target-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let small = dir.join("small.img");
    let large = dir.join("large.img");
    let _ = std::fs::remove_file(&small);
    let _ = std::fs::remove_file(&large);
    let specs = [
        format!("file:{}:32MiB", small.display()),
        format!("file:{}:32MiB:4096", large.display()),
    ];
    let (target, uri) = start_target(&[specs[0].as_str(), specs[1].as_str()], 8);
    let host = Host::connect(
        &uri,
        HostOptions {
            io_queues: 1,
            queue_depth: 32,
            ..opts()
        },
    )
    .unwrap();
    let sizes = [512usize, 4096, 8192, 128 * 1024, 300 * 1024];
    let region = 512 * 1024u64;
    let io = |t: u64, i: u64, verify: bool| {
        let nsid = Nsid(1 + (t % 2) as u32);
        let bs = if nsid == Nsid(1) { 512 } else { 4096 };
        let len = sizes[((t + i) % sizes.len() as u64) as usize].max(bs);
        let lba = (t * 4 * region + i * region) / bs as u64;
        let data = pattern(len, (t * 7 + i) as u8);
        if verify {
            let back = host.read(nsid, lba, (len / bs) as u32).unwrap();
            assert!(
                back == data,
                "thread {t}, write {i}: {len} bytes at LBA {lba} of {nsid:?}"
            );
        } else {
            host.write(nsid, lba, &data, i % 2 == 1).unwrap();
        }
    };
    for verify in [false, true] {
        std::thread::scope(|s| {
            for t in 0..16u64 {
                s.spawn(move || (0..4).for_each(|i| io(t, i, verify)));
            }
        });
        host.flush(Nsid(1)).unwrap();
        host.flush(Nsid(2)).unwrap();
    }
    host.close();
    target.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

mod hostctl {
    use std::process::{Command, Output, Stdio};

    use super::*;

    fn hostctl(uri: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hostctl"))
            .args(["--target", uri, "--timeout", "10s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("hostctl runs")
    }

    #[test]
    fn commands_end_to_end() {
        let (target, uri) = start_target(&["ram:4MiB"], 8);
        let dir = std::env::temp_dir().join(format!("hostctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.bin");
        let output = dir.join("out.bin");

        let out = hostctl(&uri, &["list"]);
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("transport: tcp"), "{text}");
        assert!(text.contains("4 MiB"), "{text}");

        std::fs::write(&input, pattern(1000, 7)).unwrap();
        let out = hostctl(
            &uri,
            &["write", "--ns", "1", "--lba", "3", "--input", input.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(2), "partial block refused: a usage error");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--pad"));
        let out = hostctl(
            &uri,
            &[
                "write",
                "--ns",
                "1",
                "--lba",
                "3",
                "--input",
                input.to_str().unwrap(),
                "--pad",
                "--fua",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let out = hostctl(
            &uri,
            &[
                "read",
                "--ns",
                "1",
                "--lba",
                "3",
                "--blocks",
                "2",
                "--output",
                output.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let back = std::fs::read(&output).unwrap();
        assert_eq!(&back[..1000], &pattern(1000, 7)[..]);
        assert!(back[1000..].iter().all(|&b| b == 0));
        let out = hostctl(&uri, &["read", "--ns", "1", "--lba", "3", "--blocks", "1"]);
        assert_eq!(out.stdout, &pattern(1000, 7)[..512]);

        let out = hostctl(&uri, &["read", "--ns", "1", "--lba", "8192", "--blocks", "1"]);
        assert_eq!(out.status.code(), Some(4), "an NVMe error status");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("hostctl: Read failed: LBA Out of Range (SCT 0h, SC 80h"),
            "{err}"
        );

        for args in [
            &["flush", "--ns", "1"][..],
            &["trim", "--ns", "1", "--lba", "0", "--blocks", "8"],
            &["write-zeroes", "--ns", "1", "--lba", "0", "--blocks", "8"],
            &["identify"],
            &["identify", "--ns", "1"],
        ] {
            let out = hostctl(&uri, args);
            assert!(out.status.success(), "{args:?}: {out:?}");
        }
        let out = hostctl(
            &uri,
            &[
                "bench", "--ns", "1", "--rw", "randrw", "--bs", "4k", "--qd", "4", "--time", "1s", "--json",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let json = String::from_utf8_lossy(&out.stdout);
        for key in ["\"iops\":", "\"bandwidth_mbps\":", "\"p50\":", "\"p999\":"] {
            assert!(json.contains(key), "{json}");
        }
        let out = hostctl(&uri, &["read", "--ns", "1"]);
        assert_eq!(out.status.code(), Some(2), "usage error");
        let out = hostctl("udp://127.0.0.1:1", &["list"]);
        assert_eq!(out.status.code(), Some(2), "a bad target URI is a usage error");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("hostctl: invalid target URI"));
        std::fs::remove_dir_all(&dir).ok();
        target.shutdown();
    }

    #[test]
    fn watch_prints_events() {
        let (target, uri) = start_target(&["ram:1MiB"], 8);
        let child = Command::new(env!("CARGO_BIN_EXE_hostctl"))
            .args(["--target", &uri, "watch", "--count", "1", "--timeout", "20s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let backend = iounit::backend::open(&"ram:1MiB".parse().unwrap()).unwrap();
        target.registry().attach(None, backend).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "namespace attribute changed: nsids [2]"
        );
        target.shutdown();
    }
}

/// A backend whose I/O waits until its gate opens: a hung I/O unit queue.
#[derive(Debug, Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

#[derive(Debug)]
struct GatedBackend(Arc<Gate>);

impl iounit::backend::BlockIo for GatedBackend {
    fn describe(&self) -> String {
        "gated:1MiB".into()
    }
    fn geometry(&self) -> iounit::backend::Geometry {
        iounit::backend::Geometry {
            block_size: 512,
            blocks: 2048,
        }
    }
    fn read(&self, _offset: u64, _buf: &mut [u8]) -> Result<(), iounit::backend::BlockError> {
        self.0.wait();
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), iounit::backend::BlockError> {
        self.0.wait();
        Ok(())
    }
    fn flush(&self) -> Result<(), iounit::backend::BlockError> {
        self.0.wait();
        Ok(())
    }
}

impl iounit::backend::WriteZeroes for GatedBackend {
    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<(), iounit::backend::BlockError> {
        self.0.wait();
        Ok(())
    }
}

impl iounit::backend::Discard for GatedBackend {
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), iounit::backend::BlockError> {
        self.0.wait();
        Ok(())
    }
}

/// A target with `ram:8MiB` as namespace 1 and a closed [`Gate`] as 2.
fn start_gated_target() -> (Target, String, Arc<Gate>) {
    let (target, uri) = start_target(&["ram:8MiB"], 8);
    let gate = Arc::new(Gate::default());
    target
        .registry()
        .attach(Some(2), Arc::new(GatedBackend(gate.clone())))
        .unwrap();
    (target, uri, gate)
}

#[test]
fn timeouts_on_a_hung_queue_do_not_fill_it_for_good() {
    let (target, uri, gate) = start_gated_target();
    let depth = 4;
    let host = Host::connect(
        &uri,
        HostOptions {
            queue_depth: depth,
            command_timeout: Duration::from_millis(300),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(host.namespaces().unwrap().len(), 2);
    for _ in 0..depth {
        match host.read(Nsid(2), 0, 1) {
            Err(HostError::Timeout { .. }) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    // Every CID of the first queue went to a command that never answers;
    // the host must have reset the queue rather than leave it full.
    host.write(Nsid(1), 0, &pattern(4096, 1), false).unwrap();
    assert_eq!(host.read(Nsid(1), 0, 8).unwrap(), pattern(4096, 1));
    gate.open();
    host.close();
    target.shutdown();
}

#[test]
fn read_into_after_a_cancelled_read_into() {
    let (target, uri, gate) = start_gated_target();
    let host = Host::connect(&uri, opts()).unwrap();
    assert_eq!(host.namespaces().unwrap().len(), 2);
    let big = 1 << 20;
    host.write(Nsid(1), 0, &pattern(big, 4), false).unwrap();
    let mut buf = host.alloc(big).unwrap();
    buf.set_len(4096).unwrap();
    {
        // Started, then dropped while the I/O unit holds the read.
        let mut fut = std::pin::pin!(host.read_into_async(Nsid(2), 0, &mut buf));
        struct Noop;
        impl Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let waker = Waker::from(Arc::new(Noop));
        assert!(fut.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
    }
    assert_eq!(buf.len(), 4096);
    assert_eq!(buf[..].len(), 4096, "the buffer still has memory");
    // The queue runs commands in order: let the abandoned read finish.
    gate.open();
    // Above the transfer limit: read in parts and copied in.
    buf.set_len(big).unwrap();
    host.read_into(Nsid(1), 0, &mut buf).unwrap();
    assert!(buf[..] == pattern(big, 4)[..]);
    host.close();
    target.shutdown();
}

#[test]
fn write_from_sends_from_the_buffer_and_gives_it_back() {
    for listen in [
        "tcp://127.0.0.1:0".to_string(),
        format!("shm://chanio-wf-{}", std::process::id()),
    ] {
        let (target, uri) = start_target_on(&listen, &["ram:8MiB"], 2);
        let host = Host::connect(&uri, opts()).unwrap();
        // In the capsule (gathered from the buffer), one push from the
        // buffer itself, two pushes of pieces of it, and several commands.
        for (i, len) in [512usize, 4096, 64 * 1024, 128 * 1024, 256 * 1024, 3 << 20]
            .into_iter()
            .enumerate()
        {
            let data = pattern(len, 20 + i as u8);
            let mut buf = host.alloc(len).unwrap();
            buf.copy_from_slice(&data);
            for lba in [0u64, 8192] {
                host.write_from(Nsid(1), lba, &mut buf, false)
                    .unwrap_or_else(|e| panic!("{listen}: write_from of {len} bytes: {e}"));
                assert_eq!(buf.len(), len);
                assert!(
                    buf[..] == data[..],
                    "{listen}: {len} bytes: the buffer came back changed"
                );
                assert!(
                    host.read(Nsid(1), lba, (len / 512) as u32).unwrap() == data,
                    "{listen}: {len} bytes at LBA {lba} read back wrong"
                );
            }
        }
        host.close();
        target.shutdown();
    }
}

#[test]
fn write_from_that_times_out_leaves_the_buffer_usable() {
    let (target, uri, gate) = start_gated_target();
    let host = Host::connect(
        &uri,
        HostOptions {
            command_timeout: Duration::from_millis(300),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(host.namespaces().unwrap().len(), 2);
    let mut buf = host.alloc(64 * 1024).unwrap();
    buf.copy_from_slice(&pattern(64 * 1024, 7));
    match host.write_from(Nsid(2), 0, &mut buf, false) {
        Err(HostError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Its contents are unspecified now, but it has memory and works.
    assert_eq!(buf[..].len(), 64 * 1024);
    gate.open();
    buf.copy_from_slice(&pattern(64 * 1024, 8));
    host.write_from(Nsid(1), 0, &mut buf, false).unwrap();
    assert_eq!(host.read(Nsid(1), 0, 128).unwrap(), pattern(64 * 1024, 8));
    host.close();
    target.shutdown();
}

/// A TCP forwarder between a host and a target whose connections a test
/// can cut, so that a channel fails with a command in flight while the
/// target lives on. It binds 127.0.0.1 and stops with the test process.
struct CutProxy {
    addr: std::net::SocketAddr,
    live: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl CutProxy {
    fn start(target: std::net::SocketAddr) -> CutProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let live: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let registry = live.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut live = registry.lock().unwrap();
                    live.push(client.try_clone().unwrap());
                    live.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CutProxy { addr, live }
    }

    /// Cuts every connection made so far.
    fn cut(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn write_from_lost_with_its_channel_is_reissued_after_reconnect() {
    let (target, uri, gate) = start_gated_target();
    let target_addr: std::net::SocketAddr = uri.trim_start_matches("tcp://").parse().unwrap();
    let proxy = CutProxy::start(target_addr);
    let host = Host::connect(
        &format!("tcp://{}", proxy.addr),
        HostOptions {
            reconnect_deadline: Duration::from_secs(10),
            command_timeout: Duration::from_secs(10),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(host.namespaces().unwrap().len(), 2);
    let data = pattern(64 * 1024, 9);
    let mut buf = host.alloc(64 * 1024).unwrap();
    buf.copy_from_slice(&data);
    let events = host.events();
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let r = host.write_from(Nsid(2), 0, &mut buf, false);
            (r, buf[..] == data[..])
        });
        // The write (capsule and data) reached the gated namespace: its
        // channel fails under it, the I/O unit lives on.
        std::thread::sleep(Duration::from_millis(300));
        proxy.cut();
        // The host reconnects through the proxy and re-issues the write,
        // which waits at the gate like the first one; let both through.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(
            events.recv_timeout(Duration::from_millis(100)),
            Ok(HostEvent::Reconnected { .. })
        ) {
            assert!(Instant::now() < deadline, "no reconnect");
        }
        gate.open();
        let (result, intact) = writer.join().unwrap();
        result.expect("re-issued after the reconnect");
        assert!(intact, "the buffer came back with its contents");
    });
    host.close();
    target.shutdown();
}
