//! End-to-end tests of the whole system: real `iounitd` and `hostctl`
//! processes over tcp on 127.0.0.1, shm, and verbs where a device is there.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{hostctl, ok, pattern, Daemon, Scratch};

fn write_blocks(uri: &str, ns: u32, lba: u64, data: &[u8]) {
    let (out, _) = hostctl(
        uri,
        &["write", "--ns", &ns.to_string(), "--lba", &lba.to_string()],
        Some(data),
    );
    ok(&out);
}

fn read_blocks(uri: &str, ns: u32, lba: u64, blocks: u64) -> Vec<u8> {
    let (out, _) = hostctl(
        uri,
        &[
            "read",
            "--ns",
            &ns.to_string(),
            "--lba",
            &lba.to_string(),
            "--blocks",
            &blocks.to_string(),
        ],
        None,
    );
    ok(&out)
}

fn data_written_is_data_read_at_every_size_and_edge(t: &str) {
    let d = Daemon::start_on(t, &["--ns", "ram:8MiB", "--ns", "ram:4MiB:4096"]);
    let last_512 = 8 * 1024 * 1024 / 512 - 1;
    for (ns, bs, lba, blocks) in [
        (1u32, 512usize, 0u64, 1u64),
        (1, 512, 0, 8),
        (1, 512, 100, 9),
        (1, 512, 1000, 300),
        (1, 512, 4000, 2048), // 1 MiB: several commands of the largest transfer
        (1, 512, last_512, 1),
        (2, 4096, 0, 1),
        (2, 4096, 1023, 1),
        (2, 4096, 10, 40),
    ] {
        let data = pattern(bs * blocks as usize, (lba as u8) ^ (ns as u8));
        write_blocks(&d.uri, ns, lba, &data);
        let back = read_blocks(&d.uri, ns, lba, blocks);
        assert!(back == data, "ns {ns} lba {lba} blocks {blocks}: data differs");
    }
    // The list shows both namespaces and the transport.
    let (out, _) = hostctl(&d.uri, &["list"], None);
    let text = String::from_utf8_lossy(&ok(&out)).into_owned();
    assert!(text.contains(&format!("transport: {t}")), "{text}");
    assert!(
        text.lines().filter(|l| l.contains("512") || l.contains("4096")).count() >= 2,
        "{text}"
    );
    assert!(d.stop().success());
}

fn errors_name_the_nvme_status_and_exit_non_zero(t: &str) {
    let d = Daemon::start_on(t, &["--ns", "ram:1MiB"]);
    let (out, _) = hostctl(&d.uri, &["read", "--ns", "1", "--lba", "2047", "--blocks", "2"], None);
    assert_eq!(out.status.code(), Some(4), "an NVMe status exits 4");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LBA Out of Range"), "{err}");
    let (out, _) = hostctl(&d.uri, &["read", "--ns", "7", "--lba", "0", "--blocks", "1"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Invalid Namespace"), "{err}");
    // A length that is not whole blocks is refused unless padded: a usage
    // error, as are bad options.
    let (out, _) = hostctl(&d.uri, &["write", "--ns", "1", "--lba", "0"], Some(&[1u8; 700]));
    assert_eq!(out.status.code(), Some(2), "a usage error exits 2");
    let (out, _) = hostctl(&d.uri, &["read", "--ns", "1", "--frobnicate"], None);
    assert_eq!(out.status.code(), Some(2));
    let (out, _) = hostctl(
        &d.uri,
        &[
            "bench",
            "--ns",
            "1",
            "--rw",
            "randread",
            "--rwmixread",
            "70",
            "--time",
            "1s",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "--rwmixread without randrw");
    // Nobody listening: a connection failure exits 3.
    let (out, _) = hostctl("tcp://127.0.0.1:1", &["--timeout", "2s", "list"], None);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let (out, _) = hostctl(
        &d.uri,
        &["write", "--ns", "1", "--lba", "0", "--pad"],
        Some(&[1u8; 700]),
    );
    ok(&out);
    let back = read_blocks(&d.uri, 1, 0, 2);
    assert_eq!(&back[..700], &[1u8; 700][..]);
    assert!(back[700..].iter().all(|&b| b == 0), "padding is zeros");
}

#[test]
fn garbage_and_malformed_capsules_close_only_their_connection() {
    let d = Daemon::start(&["--ns", "ram:1MiB"]);
    let addr = d.uri.trim_start_matches("tcp://").to_string();
    // Garbage bytes on the port.
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.write_all(b"\x00\x01garbage that is no hello at all").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    // A valid channel carrying a malformed capsule.
    let fabric = chanio::messaging::provider::tcp::TcpFabric::new();
    let ep = chanio::messaging::Endpoint::connect(&fabric, &addr, chanio::iounit::transport::host_channel(8)).unwrap();
    ep.send(b"not an NVMe capsule").unwrap();
    assert!(matches!(
        ep.recv_timeout(Duration::from_secs(20)),
        Err(chanio::messaging::Error::Closed(_))
    ));
    d.wait_log("malformed", Duration::from_secs(20));
    // Everyone else is served.
    write_blocks(&d.uri, 1, 5, &pattern(512, 9));
    assert_eq!(read_blocks(&d.uri, 1, 5, 1), pattern(512, 9));
}

fn a_host_killed_mid_io_frees_its_resources(t: &str) {
    let d = Daemon::start_on(t, &["--ns", "ram:16MiB"]);
    let mut bench = common::background_bench(&d, "30s", "randwrite");
    bench.kill().unwrap();
    bench.wait().unwrap();
    d.wait_log("controller freed", Duration::from_secs(30));
    write_blocks(&d.uri, 1, 0, &pattern(4096, 3));
    assert_eq!(read_blocks(&d.uri, 1, 0, 8), pattern(4096, 3));
}

fn a_killed_daemon_makes_hostctl_fail_within_its_timeout(t: &str) {
    let d = Daemon::start_on(t, &["--ns", "ram:1MiB"]);
    let uri = d.uri.clone();
    drop(d); // SIGKILL
    let (out, took) = hostctl(
        &uri,
        &["--timeout", "3s", "read", "--ns", "1", "--lba", "0", "--blocks", "1"],
        None,
    );
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(20), "took {took:?}");
    // And against a daemon that dies while the host is connected.
    let d = Daemon::start_on(t, &["--ns", "ram:16MiB"]);
    let mut bench = common::background_bench(&d, "3s", "randread");
    drop(d);
    let status = common::wait_exit(&mut bench, Duration::from_secs(30), "hostctl after the daemon died");
    assert!(!status.success(), "hostctl reports the failure");
}

fn file_backed_data_survives_a_restart(t: &str) {
    let scratch = Scratch::new(&format!("restart-{t}"));
    let img = scratch.path("disk.img");
    let spec = format!("file:{}:4MiB", img.display());
    let data = pattern(64 * 1024, 77);
    {
        let d = Daemon::start_on(t, &["--ns", &spec]);
        let (out, _) = hostctl(&d.uri, &["write", "--ns", "1", "--lba", "64", "--fua"], Some(&data));
        ok(&out);
        assert!(d.stop().success(), "clean shutdown");
    }
    let d = Daemon::start_on(t, &["--ns", &format!("file:{}", img.display())]);
    assert_eq!(read_blocks(&d.uri, 1, 64, 128), data);
}

fn four_hosts_write_disjoint_ranges_concurrently(t: &str) {
    let d = Daemon::start_on(t, &["--ns", "ram:16MiB"]);
    std::thread::scope(|s| {
        for host in 0..4u64 {
            let uri = d.uri.clone();
            s.spawn(move || {
                for round in 0..3u64 {
                    let lba = host * 4096 + round * 1024;
                    let data = pattern(256 * 1024, (host * 10 + round) as u8);
                    write_blocks(&uri, 1, lba, &data);
                }
            });
        }
    });
    for host in 0..4u64 {
        for round in 0..3u64 {
            let lba = host * 4096 + round * 1024;
            assert_eq!(
                read_blocks(&d.uri, 1, lba, 512),
                pattern(256 * 1024, (host * 10 + round) as u8),
                "host {host} round {round}"
            );
        }
    }
}

fn namespace_hot_detach_and_attach_deliver_events(t: &str) {
    let scratch = Scratch::new(&format!("hotplug-{t}"));
    let cfg = scratch.path("iounit.toml");
    let with_two = "[[namespace]]\nbackend = \"ram:1MiB\"\n[[namespace]]\nbackend = \"ram:2MiB\"\n";
    let with_one = "[[namespace]]\nbackend = \"ram:1MiB\"\n";
    std::fs::write(&cfg, with_two).unwrap();
    let d = Daemon::with_config(t, &cfg);
    // A watcher that has said it is listening: it hears every later event.
    let watch = |count: &str| {
        let mut child = Command::new(common::binary("hostctl"))
            .args(["--target", &d.uri, "watch", "--count", count, "--timeout", "60s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(line.starts_with("watching for events"), "hostctl watch said: {line}");
        child
    };
    // Detach: the watcher hears of namespace 2.
    let watcher = watch("1");
    std::fs::write(&cfg, with_one).unwrap();
    d.signal("-HUP");
    let out = watcher.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "hostctl watch failed");
    assert!(text.contains('2'), "event names namespace 2: {text}");
    let (out, _) = hostctl(&d.uri, &["read", "--ns", "2", "--lba", "0", "--blocks", "1"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Invalid Namespace"));
    // Attach it again: another event, and it serves I/O.
    let watcher = watch("1");
    std::fs::write(&cfg, with_two).unwrap();
    d.signal("-HUP");
    let out = watcher.wait_with_output().unwrap();
    assert!(out.status.success(), "hostctl watch failed");
    write_blocks(&d.uri, 2, 0, &pattern(512, 1));
    assert_eq!(read_blocks(&d.uri, 2, 0, 1), pattern(512, 1));
}

fn a_stalled_daemon_makes_hostctl_time_out_not_hang(t: &str) {
    let d = Daemon::start_on(t, &["--ns", "ram:16MiB"]);
    // A host connected and busy when the I/O unit stops answering (SIGSTOP):
    // its commands time out and it reports the failure.
    let mut bench = common::background_bench(&d, "2s", "randread");
    d.signal("-STOP");
    let status = common::wait_exit(&mut bench, Duration::from_secs(40), "hostctl on a stalled I/O unit");
    assert!(!status.success(), "the stall is reported as a failure");
    // A new host against the stalled unit fails too, within its limits.
    let (out, took) = hostctl(&d.uri, &["--timeout", "2s", "list"], None);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(40), "took {took:?}");
    d.signal("-CONT");
}

fn every_command_works(t: &str) {
    let d = Daemon::start_on(t, &["--ns", "ram:1MiB"]);
    let (out, _) = hostctl(&d.uri, &["identify"], None);
    assert!(String::from_utf8_lossy(&ok(&out)).contains("subsystem NQN:"));
    let (out, _) = hostctl(&d.uri, &["identify", "--ns", "1"], None);
    assert!(String::from_utf8_lossy(&ok(&out)).contains("2048 blocks"));
    write_blocks(&d.uri, 1, 0, &pattern(4 * 512, 3));
    let (out, _) = hostctl(
        &d.uri,
        &["write-zeroes", "--ns", "1", "--lba", "1", "--blocks", "1"],
        None,
    );
    ok(&out);
    let (out, _) = hostctl(&d.uri, &["trim", "--ns", "1", "--lba", "3", "--blocks", "1"], None);
    ok(&out);
    let (out, _) = hostctl(&d.uri, &["flush", "--ns", "1"], None);
    ok(&out);
    let mut want = pattern(4 * 512, 3);
    want[512..1024].fill(0);
    want[1536..].fill(0);
    assert_eq!(read_blocks(&d.uri, 1, 0, 4), want);
    let (out, _) = hostctl(
        &d.uri,
        &[
            "bench", "--ns", "1", "--rw", "randrw", "--qd", "4", "--time", "1s", "--json",
        ],
        None,
    );
    let json = String::from_utf8_lossy(&ok(&out)).into_owned();
    let iops: f64 = json
        .split("\"iops\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no iops in {json}"));
    assert!(iops > 0.0, "{json}");
    let (out, _) = hostctl(&d.uri, &["list"], None);
    let text = String::from_utf8_lossy(&ok(&out)).into_owned();
    assert!(text.contains(&format!("transport: {t}")), "{text}");
}

/// The library's zero-copy write (`Host::write_from`) at every size class:
/// in the capsule (gathered from the buffer: the Send's second scatter
/// entry over rdma), one push from the buffer itself (an RDMA Write with
/// immediate over rdma), several pushes of pieces of it, several commands. The data
/// lands and the buffer comes back intact.
fn write_from_lands_at_every_size(t: &str) {
    use chanio::host::{Host, HostOptions, Nsid};
    let d = Daemon::start_on(t, &["--ns", "ram:8MiB"]);
    let host = Host::connect(&d.uri, HostOptions::default()).unwrap_or_else(|e| panic!("{t}: connect: {e}"));
    for (i, len) in [512usize, 4096, 64 << 10, 128 << 10, 256 << 10, 3 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, 40 + i as u8);
        let mut buf = host.alloc(len).unwrap_or_else(|e| panic!("{t}: alloc {len}: {e}"));
        buf.copy_from_slice(&data);
        for lba in [0u64, 8192] {
            host.write_from(Nsid(1), lba, &mut buf, false)
                .unwrap_or_else(|e| panic!("{t}: write_from of {len} bytes: {e}"));
            assert!(buf[..] == data[..], "{t}: {len} bytes: the buffer came back changed");
            let back = host
                .read(Nsid(1), lba, (len / 512) as u32)
                .unwrap_or_else(|e| panic!("{t}: read {len}: {e}"));
            assert!(back == data, "{t}: {len} bytes at LBA {lba} read back wrong");
        }
    }
    host.close();
}

/// Storage windows (issue 18): data written by command is read through a
/// window and the reverse, with RDMA Reads and Writes the I/O unit's
/// threads take no part in (on rdma, the NIC's); a closed window's key,
/// an address outside a window, a wrong key and a write into a read-only
/// window are each refused by the responder (the NIC on rdma) and cost the
/// host that connection only, after which it reconnects.
fn storage_windows_reach_namespace_data_and_refuse_violations(t: &str) {
    use chanio::host::{Host, HostError, HostOptions, Nsid};
    let scratch = Scratch::new(&format!("windows-{t}"));
    let file_ns = format!("file:{}:4MiB", scratch.path("ns.img").display());
    // A file on the disk (in the soft-RoCE VM the repository is a 9p
    // share); over rdma a file window is a cached extent.
    let disk_dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("windows-{t}-{}", std::process::id()));
    std::fs::create_dir_all(&disk_dir).unwrap();
    let disk_ns = format!("file:{}:4MiB", disk_dir.join("ns.img").display());
    let d = Daemon::start_on(t, &["--ns", "ram:8MiB", "--ns", &file_ns, "--ns", &disk_ns]);
    let host = Host::connect(&d.uri, HostOptions::default()).unwrap_or_else(|e| panic!("{t}: connect: {e}"));
    let other = Host::connect(&d.uri, HostOptions::default()).unwrap_or_else(|e| panic!("{t}: connect: {e}"));
    let data = pattern(64 << 10, 61);
    host.write(Nsid(1), 256, &data, false).unwrap();
    let ro = host
        .open_window(Nsid(1), 128, 1024, false)
        .unwrap_or_else(|e| panic!("{t}: open: {e}"));
    let mut buf = host.alloc(data.len()).unwrap();
    ro.read_at(128 * 512, &mut buf)
        .unwrap_or_else(|e| panic!("{t}: window read: {e}"));
    assert!(buf[..] == data[..], "{t}: a window read of command data");

    let rw = host.open_window(Nsid(1), 4096, 256, true).unwrap();
    let written = pattern(100 << 10, 62);
    let mut src = host.alloc(written.len()).unwrap();
    src.copy_from_slice(&written);
    rw.write_at(1000, &mut src)
        .unwrap_or_else(|e| panic!("{t}: window write: {e}"));
    rw.commit().unwrap_or_else(|e| panic!("{t}: commit: {e}"));
    let back = host.read(Nsid(1), 4096, 256).unwrap();
    assert!(
        back[1000..1000 + written.len()] == written[..],
        "{t}: a command read of window data"
    );

    // A file namespace: over tcp its windows are the file's pages, mapped
    // shared; over shm and rdma cached extents (over rdma the log says so).
    let fw = host
        .open_window(Nsid(2), 16, 256, true)
        .unwrap_or_else(|e| panic!("{t}: open on a file: {e}"));
    fw.write_at(512, &mut src)
        .unwrap_or_else(|e| panic!("{t}: file window write: {e}"));
    fw.commit().unwrap_or_else(|e| panic!("{t}: file window commit: {e}"));
    let back = host.read(Nsid(2), 17, 200).unwrap();
    assert!(
        back[..written.len()] == written[..],
        "{t}: a command read of file window data"
    );
    host.write(Nsid(2), 40, &data, false).unwrap();
    let mut seen = host.alloc(data.len()).unwrap();
    fw.read_at(24 * 512, &mut seen).unwrap();
    assert!(seen[..] == data[..], "{t}: a file window read of command data");
    fw.close().unwrap();
    if t == "rdma" {
        d.wait_log("window as a cached extent", Duration::from_secs(10));
    }
    // The same on the disk file.
    let dw = host
        .open_window(Nsid(3), 16, 256, true)
        .unwrap_or_else(|e| panic!("{t}: open on a disk file: {e}"));
    dw.write_at(512, &mut src)
        .unwrap_or_else(|e| panic!("{t}: disk window write: {e}"));
    let back = host.read(Nsid(3), 17, 200).unwrap();
    assert!(
        back[..written.len()] == written[..],
        "{t}: a command read of disk window data"
    );
    dw.commit().unwrap_or_else(|e| panic!("{t}: disk window commit: {e}"));
    host.write(Nsid(3), 40, &data, false).unwrap();
    fw_read_check(&dw, &host, &data, t);
    dw.close().unwrap();
    let on_disk = std::fs::read(disk_dir.join("ns.img")).unwrap();
    // The window's write up to LBA 40, the command's from there (written
    // later, over it).
    assert!(
        on_disk[17 * 512..40 * 512] == written[..23 * 512],
        "{t}: the disk file holds the window's write"
    );
    assert!(
        on_disk[40 * 512..40 * 512 + data.len()] == data[..],
        "{t}: the disk file holds the command's write"
    );
    let _ = std::fs::remove_dir_all(&disk_dir);

    let gone = |r: Result<(), HostError>| matches!(r, Err(HostError::WindowClosed(_)));
    let mut probe = host.alloc(64).unwrap();
    // Each violation is probed on a fresh window's connection (the one
    // before closed the last), against that window's own key and bounds.
    type Aim = fn(u32, u64, u64) -> (u32, u64);
    let violations: [(&str, Aim, bool); 5] = [
        ("a closed window's key", |stag, addr, _| (stag, addr), false),
        ("past a window's end", |stag, addr, len| (stag, addr + len - 8), false),
        ("before a window's start", |stag, addr, _| (stag, addr - 1), false),
        ("a wrong key", |stag, addr, _| (stag ^ 0x0101_0101, addr), false),
        ("a write into a read-only window", |stag, addr, _| (stag, addr), true),
    ];
    for (i, (what, aim, write)) in violations.into_iter().enumerate() {
        let w = host
            .open_window(Nsid(1), 8, 8, false)
            .unwrap_or_else(|e| panic!("{t}: {what}: open: {e}"));
        let (mut stag, mut addr) = w.stag();
        if i == 0 {
            let closed = host.open_window(Nsid(1), 8, 8, false).unwrap();
            (stag, addr) = closed.stag();
            closed.close().unwrap();
        }
        let (stag, addr) = aim(stag, addr, w.len());
        assert!(
            gone(w.transfer_unchecked(addr, stag, &mut probe, write)),
            "{t}: {what} was not refused"
        );
        if i == 0 {
            // Every window of that connection went with it.
            assert!(gone(rw.read_at(0, &mut probe)), "{t}: a window outlived its connection");
            assert!(gone(ro.read_at(0, &mut probe)), "{t}: a window outlived its connection");
        }
        assert!(
            other.read(Nsid(1), 256, 1).is_ok(),
            "{t}: {what}: another host lost service"
        );
        assert!(
            host.read(Nsid(1), 256, 128).unwrap() == data,
            "{t}: {what}: the host did not recover"
        );
    }
    host.close();
    other.close();
}

/// `hostctl window`: writes through a window land in the namespace,
/// reads through one give what commands wrote, and what cannot be
/// windowed or lies outside the window is refused with the reason.
#[test]
fn hostctl_window_reads_writes_and_explains_refusals() {
    let scratch = Scratch::new("window-cli");
    // A thin clone cannot be windowed (its blocks are in two files).
    let base = scratch.path("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let clone_ns = format!("clone:{}:{}", base.display(), scratch.path("clone.img").display());
    let d = Daemon::start(&["--ns", "ram:4MiB", "--ns", &clone_ns]);
    let data = pattern(3 * 512 + 17, 71);
    let (out, _) = hostctl(
        &d.uri,
        &[
            "window", "write", "--ns", "1", "--lba", "40", "--blocks", "8", "--offset", "100",
        ],
        Some(&data),
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("committed"));
    let back = read_blocks(&d.uri, 1, 40, 8);
    assert!(
        back[100..100 + data.len()] == data[..],
        "window write read back by command"
    );
    let (out, _) = hostctl(
        &d.uri,
        &[
            "window",
            "read",
            "--ns",
            "1",
            "--lba",
            "40",
            "--blocks",
            "8",
            "--offset",
            "100",
            "--len",
            &data.len().to_string(),
        ],
        None,
    );
    assert!(ok(&out) == data, "window read");
    let (out, _) = hostctl(
        &d.uri,
        &["--json", "window", "info", "--ns", "1", "--lba", "0", "--blocks", "2"],
        None,
    );
    let text = String::from_utf8_lossy(&ok(&out)).into_owned();
    assert!(
        text.contains("\"len\":1024") && text.contains("\"writable\":false"),
        "{text}"
    );

    let refused = |args: &[&str], input: Option<&[u8]>, want: &str, code: i32| {
        let (out, _) = hostctl(&d.uri, args, input);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    refused(
        &["window", "info", "--ns", "2", "--lba", "0", "--blocks", "1"],
        None,
        "Cannot Be Windowed",
        4,
    );
    refused(
        &["window", "info", "--ns", "1", "--lba", "8190", "--blocks", "4"],
        None,
        "LBA Out of Range",
        4,
    );
    refused(
        &["window", "write", "--ns", "1", "--lba", "0", "--blocks", "1"],
        Some(&[0u8; 513]),
        "longer than the 512 bytes",
        1,
    );
    refused(
        &[
            "window", "read", "--ns", "1", "--lba", "0", "--blocks", "1", "--len", "513",
        ],
        None,
        "513 bytes",
        2,
    );
}

/// A window read of `data` at LBA 40 through a window from LBA 16.
fn fw_read_check(w: &chanio::host::Window, host: &chanio::host::Host, data: &[u8], t: &str) {
    let mut seen = host.alloc(data.len()).unwrap();
    w.read_at(24 * 512, &mut seen).unwrap();
    assert!(seen[..] == data[..], "{t}: a window read of command data");
}

/// Storage windows revoked by the I/O unit itself: a namespace detached by
/// a reload, and one whose host list changed. The old key is then refused
/// by the responder (the NIC on rdma): the probe costs that connection.
fn storage_windows_are_revoked_by_detach_and_masking(t: &str) {
    use chanio::host::{Host, HostError, HostOptions, Nsid};
    let scratch = Scratch::new(&format!("window-revoke-{t}"));
    let cfg = scratch.path("iounit.toml");
    let hostnqn = "nqn.2026-12.io.chanio:window-revoke";
    let two = "[[namespace]]\nbackend = \"ram:1MiB\"\n[[namespace]]\nbackend = \"ram:2MiB\"\n";
    std::fs::write(&cfg, two).unwrap();
    let d = Daemon::with_config(t, &cfg);
    let opts = || HostOptions {
        hostnqn: hostnqn.into(),
        ..HostOptions::default()
    };
    let host = Host::connect(&d.uri, opts()).unwrap_or_else(|e| panic!("{t}: connect: {e}"));
    let gone = |r: Result<(), HostError>| matches!(r, Err(HostError::WindowClosed(_)));
    let mut probe = host.alloc(512).unwrap();
    // Polls until `f` holds: a reload is applied on the daemon's own time.
    let eventually = |what: &str, f: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "{t}: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // Detach: namespace 2 leaves the config.
    let w = host
        .open_window(Nsid(2), 0, 8, false)
        .unwrap_or_else(|e| panic!("{t}: open: {e}"));
    let (stag, addr) = w.stag();
    std::fs::write(&cfg, "[[namespace]]\nbackend = \"ram:1MiB\"\n").unwrap();
    d.signal("-HUP");
    eventually("namespace 2 was not detached", &mut || {
        host.identify_namespace(Nsid(2)).map(|n| n.nsze == 0).unwrap_or(true)
    });
    let p = host.open_window(Nsid(1), 0, 8, false).unwrap();
    assert!(
        gone(p.transfer_unchecked(addr, stag, &mut probe, false)),
        "{t}: a detached namespace's window"
    );
    drop((w, p));

    // Masking: namespace 1 is given to another host only.
    let w = host
        .open_window(Nsid(1), 0, 8, false)
        .unwrap_or_else(|e| panic!("{t}: open: {e}"));
    let (stag, addr) = w.stag();
    std::fs::write(
        &cfg,
        "[[namespace]]\nbackend = \"ram:1MiB\"\nhosts = [\"nqn.2026-12.io.chanio:someone-else\"]\n",
    )
    .unwrap();
    d.signal("-HUP");
    eventually("namespace 1 was not masked", &mut || host.read(Nsid(1), 0, 1).is_err());
    let refused = host.open_window(Nsid(1), 0, 8, false).unwrap_err();
    assert!(refused.to_string().contains("Invalid Namespace"), "{t}: {refused}");
    // Unmasked again: a fresh window works, the old key does not.
    std::fs::write(&cfg, "[[namespace]]\nbackend = \"ram:1MiB\"\n").unwrap();
    d.signal("-HUP");
    eventually("namespace 1 was not unmasked", &mut || host.read(Nsid(1), 0, 1).is_ok());
    let p = host.open_window(Nsid(1), 0, 8, false).unwrap();
    assert!(
        gone(p.transfer_unchecked(addr, stag, &mut probe, false)),
        "{t}: a masked namespace's window"
    );
    drop((w, p));
    host.close();
}

// Every scenario runs over tcp and shm, and over rdma (verbs) in a build
// with the `verbs` feature. `CHANIO_TEST_FABRICS` narrows the fabrics; the
// rdma tests skip without an RDMA device unless `CHANIO_REQUIRE_VERBS=1`
// (scripts/rxe-vm.sh runs them over soft-RoCE).
macro_rules! on_every_fabric {
    ($($scenario:ident),* $(,)?) => {
        mod tcp {
            $(
                #[test]
                fn $scenario() {
                    if super::common::covers("tcp") {
                        super::$scenario("tcp");
                    }
                }
            )*
        }
        mod shm {
            $(
                #[test]
                fn $scenario() {
                    if super::common::covers("shm") {
                        super::$scenario("shm");
                    }
                }
            )*
        }
        #[cfg(feature = "verbs")]
        mod rdma {
            $(
                #[test]
                fn $scenario() {
                    if super::common::rdma_usable() {
                        super::$scenario("rdma");
                    }
                }
            )*
        }
    };
}

on_every_fabric!(
    data_written_is_data_read_at_every_size_and_edge,
    errors_name_the_nvme_status_and_exit_non_zero,
    a_host_killed_mid_io_frees_its_resources,
    a_killed_daemon_makes_hostctl_fail_within_its_timeout,
    file_backed_data_survives_a_restart,
    four_hosts_write_disjoint_ranges_concurrently,
    a_stalled_daemon_makes_hostctl_time_out_not_hang,
    namespace_hot_detach_and_attach_deliver_events,
    every_command_works,
    write_from_lands_at_every_size,
    storage_windows_reach_namespace_data_and_refuse_violations,
    storage_windows_are_revoked_by_detach_and_masking,
);

/// The line of `hostctl identify` output that starts with `label`.
fn identify_line(uri: &str, args: &[&str], label: &str) -> String {
    let (out, _) = hostctl(uri, args, None);
    let text = String::from_utf8_lossy(&ok(&out)).into_owned();
    text.lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
        .to_string()
}

#[test]
fn the_serial_number_and_nguids_survive_a_restart_with_their_state_file() {
    let scratch = Scratch::new("identity");
    let state = scratch.path("iounitd.state");
    let img = scratch.path("disk.img");
    let first = format!("file:{}:1MiB", img.display());
    let again = format!("file:{}", img.display());
    let seen = |ns: &str| {
        let d = Daemon::start(&["--state", state.to_str().unwrap(), "--ns", ns, "--ns", "ram:1MiB"]);
        let serial = identify_line(&d.uri, &["identify"], "serial:");
        let file = identify_line(&d.uri, &["identify", "--ns", "1"], "NGUID:")
            + &identify_line(&d.uri, &["identify", "--ns", "1"], "UUID:");
        let ram = identify_line(&d.uri, &["identify", "--ns", "2"], "NGUID:");
        assert!(d.stop().success(), "clean shutdown");
        (serial, file, ram)
    };
    let (serial, file, ram) = seen(&first);
    assert!(
        !file.ends_with(&"0".repeat(32)),
        "a file namespace has an NGUID: {file}"
    );
    let (serial2, file2, ram2) = seen(&again);
    assert_eq!(serial2, serial, "the serial number is kept");
    assert_eq!(file2, file, "the file namespace's NGUID is kept");
    assert_ne!(ram2, ram, "a RAM namespace, whose data is gone, is a new device");
    let kept = std::fs::read_to_string(&state).unwrap();
    assert!(
        kept.contains("[namespace.1]") && !kept.contains("[namespace.2]"),
        "{kept}"
    );
    // Without a state file every start is a new identity.
    let ephemeral = || {
        let d = Daemon::start(&["--ns", "ram:1MiB"]);
        identify_line(&d.uri, &["identify"], "serial:")
    };
    assert_ne!(ephemeral(), ephemeral());
    // A damaged state file stops the daemon with the reason.
    std::fs::write(&state, "serial = 7\n").unwrap();
    let out = std::process::Command::new(common::binary("iounitd"))
        .args([
            "--listen",
            "tcp://127.0.0.1:0",
            "--state",
            state.to_str().unwrap(),
            "--ns",
            "ram:1MiB",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("damaged") && err.contains("iounitd.state"), "{err}");
}

#[test]
fn auto_picks_shm_between_two_local_processes() {
    let d = Daemon::start_on("auto", &["--ns", "ram:1MiB"]);
    assert!(d.uri.starts_with("auto://"), "{}", d.uri);
    let (out, _) = hostctl(&d.uri, &["list"], None);
    let text = String::from_utf8_lossy(&ok(&out)).into_owned();
    assert!(text.contains("transport: shm"), "{text}");
    // A bare HOST:PORT means auto too.
    let bare = d.uri.trim_start_matches("auto://").to_string();
    let (out, _) = hostctl(&bare, &["list"], None);
    assert!(String::from_utf8_lossy(&ok(&out)).contains("transport: shm"));
    // And the tcp side of the same listener still serves tcp hosts.
    let tcp = format!("tcp://{bare}");
    let (out, _) = hostctl(&tcp, &["list"], None);
    assert!(String::from_utf8_lossy(&ok(&out)).contains("transport: tcp"));
    write_blocks(&d.uri, 1, 0, &pattern(512, 4));
    assert_eq!(read_blocks(&tcp, 1, 0, 1), pattern(512, 4));
}

#[test]
fn malformed_capsule_over_shm_closes_only_its_channel() {
    let d = Daemon::start_on("shm", &["--ns", "ram:1MiB"]);
    let fabrics = chanio::messaging::Fabrics::new();
    let uri = chanio::messaging::TransportUri::parse(&d.uri).unwrap();
    let ep = fabrics
        .connect(&uri, chanio::iounit::transport::host_channel(8))
        .unwrap();
    assert_eq!(ep.fabric(), "shm");
    ep.send(b"not an NVMe capsule").unwrap();
    assert!(matches!(
        ep.recv_timeout(Duration::from_secs(20)),
        Err(chanio::messaging::Error::Closed(_))
    ));
    d.wait_log("malformed", Duration::from_secs(20));
    write_blocks(&d.uri, 1, 5, &pattern(512, 9));
    assert_eq!(read_blocks(&d.uri, 1, 5, 1), pattern(512, 9));
}

#[test]
fn hostctl_transport_flag_picks_the_fabric() {
    let d = Daemon::start_on("auto", &["--ns", "ram:1MiB"]);
    for (flag, want) in [("tcp", "transport: tcp"), ("auto", "transport: shm")] {
        let (out, _) = hostctl(&d.uri, &["--transport", flag, "list"], None);
        let text = String::from_utf8_lossy(&ok(&out)).into_owned();
        assert!(text.contains(want), "--transport {flag}: {text}");
    }
}

/// The shm listener lets in only the users it is told to: by default
/// iounitd's own (ours, here); told another user only, it refuses us with
/// a reason hostctl shows.
#[test]
fn shm_lets_in_only_the_allowed_users() {
    if !common::covers("shm") {
        return;
    }
    // SAFETY: `geteuid` takes nothing and cannot fail.
    let me = unsafe { libc::geteuid() };
    let d = Daemon::start_on("shm", &["--ns", "ram:1MiB"]);
    ok(&hostctl(&d.uri, &["list"], None).0);
    let other = me.wrapping_add(1).to_string();
    let d = Daemon::start_on("shm", &["--ns", "ram:1MiB", "--shm-allow-uid", &other]);
    let (out, _) = hostctl(&d.uri, &["list"], None);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a user not allowed got in: {err}");
    assert!(
        err.contains(&format!("user {me}")) && err.contains(&format!("users [{other}]")),
        "{err}"
    );
    d.wait_log("its user is not allowed", Duration::from_secs(20));
    let d = Daemon::start_on(
        "shm",
        &[
            "--ns",
            "ram:1MiB",
            "--shm-allow-uid",
            &other,
            "--shm-allow-gid",
            &{
                // SAFETY: `getegid` takes nothing and cannot fail.
                unsafe { libc::getegid() }
            }
            .to_string(),
        ],
    );
    ok(&hostctl(&d.uri, &["list"], None).0);
}

#[cfg(feature = "verbs")]
#[test]
fn auto_picks_rdma_when_both_ends_have_a_device() {
    if !common::rdma_usable() {
        return;
    }
    let d = Daemon::start_on("auto", &["--ns", "ram:1MiB"]);
    let (out, _) = hostctl(&d.uri, &["list"], None);
    let text = String::from_utf8_lossy(&ok(&out)).into_owned();
    assert!(text.contains("transport: rdma"), "{text}");
    write_blocks(&d.uri, 1, 0, &pattern(512, 6));
    assert_eq!(read_blocks(&d.uri, 1, 0, 1), pattern(512, 6));
}

/// Runs `iounitd` with `args`, expecting it to refuse to start: its exit
/// status and stderr. A daemon that starts serving instead is killed after
/// 30 s and the test fails.
fn iounitd_refuses(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(common::binary("iounitd"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iounitd runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for iounitd") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("iounitd {args:?} started serving instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err)
        .expect("stderr");
    (status, err)
}

#[test]
fn a_reload_that_would_resize_a_ram_namespace_keeps_its_data() {
    let scratch = Scratch::new("ram-resize");
    let cfg = scratch.path("iounit.toml");
    std::fs::write(&cfg, "[[namespace]]\nbackend = \"ram:1MiB\"\n").unwrap();
    let mut cmd = Command::new(common::binary("iounitd"));
    cmd.args(["--config", cfg.to_str().unwrap(), "--listen", "tcp://127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let d = Daemon::spawn(cmd);
    write_blocks(&d.uri, 1, 0, &pattern(4 * 512, 9));
    // Namespace 1 grown to 4 MiB (which would re-create it empty), and a
    // new namespace 5, whose arrival shows the reload was applied.
    std::fs::write(
        &cfg,
        "[[namespace]]\nbackend = \"ram:4MiB\"\n[[namespace]]\nnsid = 5\nbackend = \"ram:1MiB\"\n",
    )
    .unwrap();
    d.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hostctl(&d.uri, &["identify", "--ns", "5"], None).0.status.success() {
        assert!(Instant::now() < deadline, "the reload never attached namespace 5");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (out, _) = hostctl(&d.uri, &["identify", "--ns", "1"], None);
    assert!(
        String::from_utf8_lossy(&ok(&out)).contains("2048 blocks"),
        "namespace 1 kept its size"
    );
    assert_eq!(read_blocks(&d.uri, 1, 0, 4), pattern(4 * 512, 9), "and its data");
}

#[test]
fn one_backing_file_serves_one_namespace() {
    let scratch = Scratch::new("locked");
    let img = scratch.path("disk.img");
    let spec = format!("file:{}:1MiB", img.display());
    // Twice in one daemon: refused at start, naming the file.
    let (status, err) = iounitd_refuses(&["--listen", "tcp://127.0.0.1:0", "--ns", &spec, "--ns", &spec]);
    assert!(!status.success());
    assert!(err.contains("in use") && err.contains("disk.img"), "{err}");
    // A second daemon on a file the first one serves: refused as well.
    let d = Daemon::start(&["--ns", &spec]);
    let (status, err) = iounitd_refuses(&["--listen", "tcp://127.0.0.1:0", "--ns", &spec]);
    assert!(!status.success());
    assert!(err.contains("in use"), "{err}");
    assert!(d.stop().success(), "the first daemon still runs and stops cleanly");
}

#[test]
fn masked_namespaces_follow_the_configuration_across_reloads() {
    const A: &str = "nqn.2026-12.io.chanio:e2e-host-a";
    const B: &str = "nqn.2026-12.io.chanio:e2e-host-b";
    let scratch = Scratch::new("masking");
    let cfg = scratch.path("iounit.toml");
    let masked = |hosts: &str| {
        format!("[[namespace]]\nbackend = \"ram:1MiB\"\n[[namespace]]\nbackend = \"ram:1MiB\"\nhosts = [{hosts}]\n")
    };
    std::fs::write(&cfg, masked(&format!("\"{A}\""))).unwrap();
    let mut cmd = Command::new(common::binary("iounitd"));
    cmd.args(["--config", cfg.to_str().unwrap(), "--listen", "tcp://127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let d = Daemon::spawn(cmd);
    let sees = |host: &str, nsid: &str| {
        hostctl(&d.uri, &["--hostnqn", host, "identify", "--ns", nsid], None)
            .0
            .status
            .success()
    };
    assert!(sees(A, "1") && sees(A, "2"), "host A sees both namespaces");
    assert!(sees(B, "1"), "host B sees the unmasked namespace");
    let (out, _) = hostctl(&d.uri, &["--hostnqn", B, "identify", "--ns", "2"], None);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Invalid Namespace"),
        "to host B the masked namespace does not exist"
    );
    // The mask moves to B by a reload, without re-creating the namespace.
    let data = pattern(512, 4);
    let (out, _) = hostctl(
        &d.uri,
        &["--hostnqn", A, "write", "--ns", "2", "--lba", "0"],
        Some(&data),
    );
    ok(&out);
    std::fs::write(&cfg, masked(&format!("\"{B}\""))).unwrap();
    d.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sees(B, "2") {
        assert!(
            Instant::now() < deadline,
            "the reload never showed namespace 2 to host B"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!sees(A, "2"), "host A lost it");
    let (out, _) = hostctl(
        &d.uri,
        &["--hostnqn", B, "read", "--ns", "2", "--lba", "0", "--blocks", "1"],
        None,
    );
    assert_eq!(ok(&out), data, "the data stayed");
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal_and_json_on_request() {
    // stderr is a pipe here: the default writes plain text.
    let d = Daemon::start(&["--ns", "ram:1MiB"]);
    d.wait_log("namespace attached", Duration::from_secs(10));
    let log = d.log.lock().unwrap().clone();
    assert!(!log.contains('\u{1b}'), "colour codes in a piped log: {log:?}");
    drop(d);
    // --log-format json: one JSON object per line; --pidfile: the PID,
    // removed when the daemon stops.
    let scratch = Scratch::new("json-log");
    let pidfile = scratch.path("iounitd.pid");
    let d = Daemon::start(&[
        "--ns",
        "ram:1MiB",
        "--log-format",
        "json",
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    d.wait_log("namespace attached", Duration::from_secs(10));
    let pid = std::fs::read_to_string(&pidfile).expect("the pidfile exists once it listens");
    assert_eq!(pid.trim(), d.pid().to_string());
    let log = d.log.lock().unwrap().clone();
    for line in log.lines().filter(|l| !l.is_empty()) {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains("\"level\":\"INFO\""),
            "not a JSON log line: {line}"
        );
    }
    assert!(d.stop().success());
    assert!(!pidfile.exists(), "the pidfile goes with a clean stop");
}

/// Runs hostctl under `/usr/bin/time` and returns its peak RSS in KiB.
fn hostctl_peak_rss_kib(uri: &str, args: &[&str]) -> u64 {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kib %M"])
        .arg(common::binary("hostctl"))
        .args(["--target", uri])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("/usr/bin/time (Debian package time; .ci/run installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss-kib "))
        .expect("time's line");
    line.trim().parse().expect("a number")
}

#[test]
fn read_and_write_stream_without_holding_the_transfer() {
    let d = Daemon::start(&["--ns", "ram:80MiB"]);
    let scratch = Scratch::new("stream");
    // 64 MiB and 100 bytes, through stdin: the last block zero-padded.
    let data = pattern((64 << 20) + 100, 3);
    let (out, _) = hostctl(&d.uri, &["write", "--ns", "1", "--lba", "0", "--pad"], Some(&data));
    ok(&out);
    let blocks = data.len().div_ceil(512);
    let (out, _) = hostctl(
        &d.uri,
        &["read", "--ns", "1", "--lba", "0", "--blocks", &blocks.to_string()],
        None,
    );
    let back = ok(&out);
    assert_eq!(back.len(), blocks * 512);
    assert!(back[..data.len()] == data[..], "the data read back");
    assert!(back[data.len()..].iter().all(|&b| b == 0), "the padding is zeros");
    // A file that is not whole blocks is refused before anything is written.
    let odd = scratch.path("odd.bin");
    std::fs::write(&odd, pattern(1000, 9)).unwrap();
    let (out, _) = hostctl(
        &d.uri,
        &["write", "--ns", "1", "--lba", "0", "--input", odd.to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(read_blocks(&d.uri, 1, 0, 1), data[..512], "nothing was written");
    // Memory: a 64 MiB transfer costs hostctl no more than a 4 KiB one does,
    // but a chunk (the transfer is never held whole).
    let small = scratch.path("small.bin");
    let big = scratch.path("big.bin");
    std::fs::write(&small, pattern(4096, 1)).unwrap();
    std::fs::write(&big, &data[..64 << 20]).unwrap();
    let write = |f: &std::path::Path| {
        hostctl_peak_rss_kib(
            &d.uri,
            &["write", "--ns", "1", "--lba", "0", "--input", f.to_str().unwrap()],
        )
    };
    let (small_kib, big_kib) = (write(&small), write(&big));
    assert!(
        big_kib < small_kib + 16 * 1024,
        "writing 64 MiB peaked at {big_kib} KiB against {small_kib} KiB for 4 KiB"
    );
    let read = |blocks: &str| hostctl_peak_rss_kib(&d.uri, &["read", "--ns", "1", "--lba", "0", "--blocks", blocks]);
    let (small_kib, big_kib) = (read("8"), read("131072"));
    assert!(
        big_kib < small_kib + 16 * 1024,
        "reading 64 MiB peaked at {big_kib} KiB against {small_kib} KiB for 4 KiB"
    );
}

#[test]
fn a_service_manager_hears_ready_reloading_and_stopping() {
    // A systemd Type=notify unit: the manager's socket is named in
    // NOTIFY_SOCKET; each state is one datagram.
    let scratch = Scratch::new("sd-notify");
    let socket_path = scratch.path("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    manager.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let next = || {
        let mut buf = [0u8; 1024];
        let n = manager.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let cfg = scratch.path("iounit.toml");
    std::fs::write(&cfg, "[[namespace]]\nbackend = \"ram:1MiB\"\n").unwrap();
    let mut cmd = Command::new(common::binary("iounitd"));
    cmd.args(["--config", cfg.to_str().unwrap(), "--listen", "tcp://127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let d = Daemon::spawn(cmd);
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains(&format!("MAINPID={}\n", d.pid())), "{ready:?}");
    assert!(
        ready.contains("STATUS=serving 1 namespaces on tcp://127.0.0.1:"),
        "{ready:?}"
    );
    // Ready means served: a host gets in at once.
    ok(&hostctl(&d.uri, &["list"], None).0);

    std::fs::write(
        &cfg,
        "[[namespace]]\nbackend = \"ram:1MiB\"\n[[namespace]]\nbackend = \"ram:1MiB\"\n",
    )
    .unwrap();
    d.signal("-HUP");
    let reloading = next();
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading:?}");
    let ready = next();
    assert!(ready.contains("STATUS=serving 2 namespaces"), "{ready:?}");

    d.signal("-TERM");
    assert_eq!(next(), "STOPPING=1\n");
    assert!(d.stop().success());
}

#[test]
fn thin_clones_are_made_at_run_time_and_keep_their_writes_across_a_restart() {
    let scratch = Scratch::new("clones");
    let base = scratch.path("golden.img");
    let golden = pattern(4 << 20, 21);
    std::fs::write(&base, &golden).unwrap();
    let clone = |n: u32| {
        format!(
            "[[namespace]]\nnsid = {n}\nbackend = \"clone:{}:{}\"\n",
            base.display(),
            scratch.path(&format!("vm{n}.img")).display()
        )
    };
    let cfg = scratch.path("iounit.toml");
    std::fs::write(&cfg, clone(1)).unwrap();
    let start = || {
        let mut cmd = Command::new(common::binary("iounitd"));
        cmd.args(["--config", cfg.to_str().unwrap(), "--listen", "tcp://127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Daemon::spawn(cmd)
    };
    let d = start();
    let blocks = (golden.len() / 512) as u64;
    assert!(
        read_blocks(&d.uri, 1, 0, blocks) == golden,
        "a new clone reads as its base"
    );
    let mine = pattern(4 * 512, 1);
    write_blocks(&d.uri, 1, 10, &mine);
    // A second clone of the same base, made by a reload while the first
    // is in use.
    std::fs::write(&cfg, clone(1) + &clone(2)).unwrap();
    d.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hostctl(&d.uri, &["identify", "--ns", "2"], None).0.status.success() {
        assert!(Instant::now() < deadline, "the reload never attached the clone");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        read_blocks(&d.uri, 2, 0, blocks) == golden,
        "the first clone's write is its own"
    );
    let theirs = pattern(512, 2);
    write_blocks(&d.uri, 2, 8191, &theirs);
    assert!(d.stop().success());
    // Restarted: each clone holds its writes, the base is untouched.
    let d = start();
    let mut want1 = golden.clone();
    want1[10 * 512..14 * 512].copy_from_slice(&mine);
    let mut want2 = golden.clone();
    want2[8191 * 512..].copy_from_slice(&theirs);
    assert!(read_blocks(&d.uri, 1, 0, blocks) == want1, "clone 1 after the restart");
    assert!(read_blocks(&d.uri, 2, 0, blocks) == want2, "clone 2 after the restart");
    assert!(std::fs::read(&base).unwrap() == golden, "the base was never written");
    let used: u64 = ["vm1.img", "vm2.img"]
        .iter()
        .map(|f| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(scratch.path(f)).unwrap()) * 512)
        .sum();
    assert!(
        used <= 2 * 64 * 1024 + 2 * 4096,
        "the clones hold one cluster each, not copies: {used} bytes"
    );
}

/// Parses one JSON object from a command's stdout (or stderr).
fn json_of(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

#[test]
fn every_command_answers_in_json_with_json() {
    let d = Daemon::start(&["--ns", "ram:1MiB"]);
    let scratch = Scratch::new("json");
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        hostctl(&d.uri, &full, stdin).0
    };
    let list = json_of(&ok(&run(&["list"], None)));
    assert_eq!(list["transport"], "tcp");
    assert_eq!(list["namespaces"][0]["nsid"], 1);
    assert_eq!(list["namespaces"][0]["bytes"], 1 << 20);
    assert_eq!(list["namespaces"][0]["block_size"], 512);
    let ctrl = json_of(&ok(&run(&["identify"], None)));
    assert!(
        ctrl["serial"].as_str().is_some_and(|s| s.starts_with("CHANIO")),
        "{ctrl}"
    );
    assert_eq!(ctrl["write_zeroes"], true);
    let ns = json_of(&ok(&run(&["identify", "--ns", "1"], None)));
    assert_eq!(
        (ns["blocks"].as_u64(), ns["block_size"].as_u64()),
        (Some(2048), Some(512))
    );
    let data = pattern(1024, 5);
    let w = json_of(&ok(&run(&["write", "--ns", "1", "--lba", "4"], Some(&data))));
    assert_eq!((w["blocks"].as_u64(), w["lba"].as_u64()), (Some(2), Some(4)));
    let out = scratch.path("back.bin");
    let r = json_of(&ok(&run(
        &[
            "read",
            "--ns",
            "1",
            "--lba",
            "4",
            "--blocks",
            "2",
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    )));
    assert_eq!(r["blocks"], 2);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    for (args, key) in [
        (&["flush", "--ns", "1"][..], "flushed"),
        (&["trim", "--ns", "1", "--lba", "0", "--blocks", "1"][..], "trimmed"),
        (
            &["write-zeroes", "--ns", "1", "--lba", "0", "--blocks", "1"][..],
            "zeroed",
        ),
    ] {
        assert_eq!(json_of(&ok(&run(args, None)))[key], true, "{args:?}");
    }
    let b = json_of(&ok(&run(&["bench", "--ns", "1", "--qd", "2", "--time", "1s"], None)));
    assert!(b["iops"].as_f64().is_some_and(|i| i > 0.0), "{b}");
    assert!(b["latency_us"]["p99"].as_f64().is_some(), "{b}");
    // A failure: JSON on stderr, with the exit status and the NVMe status.
    let o = run(
        &[
            "read",
            "--ns",
            "1",
            "--lba",
            "4096",
            "--blocks",
            "1",
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(4));
    let e = json_of(&o.stderr);
    assert_eq!(e["exit_status"], 4);
    assert_eq!(e["nvme_status"]["sc"], 0x80, "{e}");
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("LBA Out of Range")),
        "{e}"
    );
    // Raw data and JSON cannot share stdout: a usage error, before connecting.
    let o = run(&["read", "--ns", "1", "--lba", "0", "--blocks", "1"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(json_of(&o.stderr)["error"]
        .as_str()
        .is_some_and(|m| m.contains("--output")));
}

#[test]
fn the_smart_log_and_status_count_what_hosts_read_and_wrote() {
    let d = Daemon::start(&["--ns", "ram:1MiB"]);
    for lba in [0, 8, 16] {
        write_blocks(&d.uri, 1, lba, &pattern(4096, 1));
    }
    for _ in 0..2 {
        read_blocks(&d.uri, 1, 0, 8);
    }
    // Refused by its range check: not a command the device executed.
    let (o, _) = hostctl(&d.uri, &["read", "--ns", "1", "--lba", "4096", "--blocks", "1"], None);
    assert_eq!(o.status.code(), Some(4));
    let s = json_of(&ok(&hostctl(&d.uri, &["--json", "smart-log"], None).0));
    assert_eq!(s["host_write_commands"], 3, "{s}");
    assert_eq!(s["host_read_commands"], 2, "{s}");
    // 12 KiB written and 8 KiB read: one unit of 512,000 bytes each, rounded up.
    assert_eq!(
        (s["data_units_written"].as_u64(), s["data_units_read"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(s["available_spare"], 100);
    let text = String::from_utf8_lossy(&ok(&hostctl(&d.uri, &["smart-log"], None).0)).into_owned();
    assert!(text.contains("host write commands:   3"), "{text}");
    // `status` shows the same counters with the connection.
    let st = json_of(&ok(&hostctl(&d.uri, &["--json", "status"], None).0));
    assert_eq!(
        (st["host_write_commands"].as_u64(), st["host_read_commands"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(st["transport"], "tcp");
    assert_eq!(st["namespaces"][0]["bytes"], 1 << 20);
    let text = String::from_utf8_lossy(&ok(&hostctl(&d.uri, &["status"], None).0)).into_owned();
    assert!(text.contains("writes:         3 commands, 1 data units"), "{text}");
}
