//! The NBD bridge (`hostctl serve-nbd`) against the NBD clients people
//! have: nbdinfo, nbdcopy, fio's nbd engine, qemu-img, and QEMU booting
//! from a namespace. Every server binds 127.0.0.1 or a socket in a scratch
//! directory; QEMU runs with no network device.
//!
//! A missing tool skips its test, saying so, unless
//! `CHANIO_REQUIRE_NBD_TOOLS=1` (set by `.ci/run`, which installs them).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, hostctl, ok, pattern, run_bounded, wait_exit, Daemon, Scratch};

/// Whether `tool` is on PATH; a missing one fails the test when the run
/// requires the NBD tools.
fn have(tool: &str) -> bool {
    let found =
        std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    if !found {
        assert!(
            std::env::var("CHANIO_REQUIRE_NBD_TOOLS").as_deref() != Ok("1"),
            "{tool} is missing and CHANIO_REQUIRE_NBD_TOOLS=1"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// A running `hostctl serve-nbd`, killed on drop.
struct Bridge {
    child: Child,
    /// `nbd://127.0.0.1:PORT` or `nbd+unix:///?socket=PATH`.
    uri: String,
}

impl Bridge {
    fn start(target: &str, listen: &str, extra: &[&str]) -> Bridge {
        let mut child = Command::new(binary("hostctl"))
            .args(["--target", target, "--queues", "2", "serve-nbd", "--listen", listen])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hostctl serve-nbd");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("serving NBD on ") {
                    let uri = rest.split_whitespace().next().unwrap_or_default().to_string();
                    let _ = tx.send(uri);
                }
            }
        });
        let uri = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(uri) => uri,
            Err(_) => {
                let _ = child.kill();
                panic!("hostctl serve-nbd did not say where it serves");
            }
        };
        Bridge { child, uri }
    }

    /// The URI of export `name` (a namespace ID).
    fn export(&self, name: &str) -> String {
        match self.uri.split_once("/?") {
            Some((base, query)) => format!("{base}/{name}?{query}"),
            None => format!("{}/{name}", self.uri),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tool to completion within the call limit; returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (out, _) = run_bounded(cmd, None);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn file_of(path: &Path, data: &[u8]) -> String {
    std::fs::write(path, data).expect("write scratch file");
    path.to_str().expect("utf-8 scratch path").to_string()
}

#[test]
fn nbdinfo_lists_every_namespace_with_its_size_and_block_size() {
    if !have("nbdinfo") {
        return;
    }
    let d = Daemon::start(&["--ns", "ram:64MiB", "--ns", "ram:16MiB:4096"]);
    let scratch = Scratch::new("nbdinfo");
    let sock = scratch.path("nbd.sock");
    for listen in ["127.0.0.1:0".to_string(), format!("unix:{}", sock.display())] {
        let b = Bridge::start(&d.uri, &listen, &[]);
        let list = run("nbdinfo", &["--list", &b.uri]);
        for needle in [
            "export=\"1\"",
            "export-size: 67108864",
            "export=\"2\"",
            "export-size: 16777216",
            "block_size_minimum: 4096",
            "block_size_minimum: 512",
            "can_multi_conn: true",
            "chanio namespace 2: 4096 blocks of 4096 bytes",
        ] {
            assert!(list.contains(needle), "{listen}: no {needle:?} in:\n{list}");
        }
        let json = run("nbdinfo", &["--json", &b.export("2")]);
        assert!(json.contains("\"export-size\": 16777216"), "{json}");
        assert!(json.contains("\"block_size_minimum\": 4096"), "{json}");
        // The empty name is the first namespace; --ns picks another.
        let size = run("nbdinfo", &["--size", &b.uri]);
        assert_eq!(size.trim(), "67108864");
        drop(b);
        // A bridge that stopped took its unix socket with it (killed: it
        // is stale, and the next bridge replaces it).
    }
    let b = Bridge::start(&d.uri, "127.0.0.1:0", &["--ns", "2", "--read-only"]);
    assert_eq!(run("nbdinfo", &["--size", &b.uri]).trim(), "16777216");
    let json = run("nbdinfo", &["--json", &b.uri]);
    assert!(json.contains("\"is_read_only\": true"), "{json}");
}

#[test]
fn nbdcopy_copies_an_image_in_and_out_over_several_connections() {
    if !have("nbdcopy") {
        return;
    }
    let d = Daemon::start(&["--ns", "ram:16MiB:4096"]);
    let b = Bridge::start(&d.uri, "127.0.0.1:0", &[]);
    let scratch = Scratch::new("nbdcopy");
    let image = pattern(16 << 20, 7);
    let src = file_of(&scratch.path("in.img"), &image);
    let dst = scratch.path("out.img");
    // Four connections, 16 requests of 256 KiB in flight on each.
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            "--request-size=262144",
            &src,
            &b.export("1"),
        ],
    );
    // What landed is what the I/O unit has, read by the host library.
    let (out, _) = hostctl(&d.uri, &["read", "--ns", "1", "--lba", "0", "--blocks", "4096"], None);
    assert!(ok(&out) == image, "the namespace differs from the image copied in");
    run("nbdcopy", &[&b.export("1"), dst.to_str().expect("utf-8")]);
    let back = std::fs::read(&dst).expect("read the copy");
    assert!(back == image, "the image copied out differs");
}

#[test]
fn fio_writes_and_verifies_through_the_nbd_engine() {
    if !have("fio") {
        return;
    }
    let d = Daemon::start(&["--ns", "ram:32MiB"]);
    let b = Bridge::start(&d.uri, "127.0.0.1:0", &[]);
    let uri = format!("--uri={}", b.export("1"));
    let out = run(
        "fio",
        &[
            "--name=chanio-nbd",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    // fio prints a line about its connection before the JSON.
    let json = &out[out.find('{').expect("fio printed JSON")..];
    for needle in ["\"error\" : 0", "\"io_bytes\" : 8388608"] {
        assert!(json.contains(needle), "no {needle:?} in fio's report:\n{json}");
    }
}

#[test]
fn qemu_img_converts_and_compares_images() {
    if !have("qemu-img") {
        return;
    }
    let d = Daemon::start(&["--ns", "ram:8MiB"]);
    let scratch = Scratch::new("qemu-img");
    let sock = scratch.path("nbd.sock");
    let b = Bridge::start(&d.uri, &format!("unix:{}", sock.display()), &[]);
    let image = pattern(8 << 20, 3);
    let src = file_of(&scratch.path("in.img"), &image);
    let target = b.export("1");
    // -n: the target exists; qemu-img only writes to it.
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &src, &target]);
    let same = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &src, &target]);
    assert!(same.contains("identical"), "{same}");
    let out = scratch.path("out.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &target,
            out.to_str().expect("utf-8"),
        ],
    );
    assert!(std::fs::read(&out).expect("read the copy") == image);
    // One changed block is a difference, and compare says so (exit 1).
    let (o, _) = hostctl(&d.uri, &["write", "--ns", "1", "--lba", "100"], Some(&[0xee; 512]));
    ok(&o);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["compare", "-f", "raw", "-F", "raw", &src, &target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (o, _) = run_bounded(cmd, None);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("offset 51200"));
}

/// A boot sector that prints `message` on the first serial port and halts.
fn boot_sector(message: &str) -> Vec<u8> {
    // 16-bit real mode, loaded at 0x7c00:
    //   cli; cld; xor ax,ax; mov ds,ax; mov si,msg; mov dx,0x3f8
    //   next: lodsb; test al,al; jz done; out dx,al; jmp next
    //   done: hlt; jmp done
    //   msg:  the message, NUL-terminated
    let mut s = vec![
        0xfa, 0xfc, 0x31, 0xc0, 0x8e, 0xd8, 0xbe, 0x17, 0x7c, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee,
        0xeb, 0xf8, 0xf4, 0xeb, 0xfd,
    ];
    assert_eq!(s.len(), 0x17, "the message starts at 0x7c17");
    s.extend_from_slice(message.as_bytes());
    s.push(0);
    assert!(s.len() <= 510, "the message fits the sector");
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xaa]);
    s
}

/// Boots QEMU's BIOS (TCG, no NIC) from the NBD export `drive` and
/// returns whether `message` appeared on its serial port within 90 s (and
/// what it printed otherwise).
fn boots_and_prints(drive: &str, message: &str, scratch: &Scratch) -> Result<(), String> {
    let serial = scratch.path(&format!("serial-{}.txt", message.len()));
    let _ = std::fs::remove_file(&serial);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc,accel=tcg",
            "-m",
            "64",
            "-display",
            "none",
            "-nic",
            "none",
        ])
        .args(["-monitor", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!("file={drive},format=raw,if=ide"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let started = Instant::now();
    let printed = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains(message) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(90) || qemu.try_wait().ok().flatten().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = qemu.kill();
    let _ = wait_exit(&mut qemu, Duration::from_secs(10), "qemu");
    if printed {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = qemu.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    Err(format!(
        "the machine did not print {message:?} on its serial port; serial: {:?}; qemu: {err}",
        std::fs::read_to_string(&serial).unwrap_or_default()
    ))
}

#[test]
fn qemu_bios_boots_from_a_namespace_written_with_hostctl() {
    if !have("qemu-system-x86_64") {
        return;
    }
    let d = Daemon::start(&["--ns", "ram:4MiB"]);
    let message = format!("chanio booted {}", std::process::id());
    let (o, _) = hostctl(
        &d.uri,
        &["write", "--ns", "1", "--lba", "0"],
        Some(&boot_sector(&message)),
    );
    ok(&o);
    let b = Bridge::start(&d.uri, "127.0.0.1:0", &[]);
    let scratch = Scratch::new("qemu-boot");
    boots_and_prints(&b.export("1"), &message, &scratch).unwrap_or_else(|e| panic!("{e}"));
}

/// Many machines, one golden image: each boots from its own thin clone,
/// and what one machine's clone changes is its own.
#[test]
fn machines_boot_from_thin_clones_of_one_golden_image() {
    if !have("qemu-system-x86_64") {
        return;
    }
    let scratch = Scratch::new("golden");
    let golden = format!("golden image {}", std::process::id());
    let mut image = boot_sector(&golden);
    image.resize(4 << 20, 0);
    let base = scratch.path("golden.img");
    std::fs::write(&base, &image).expect("write the golden image");
    let clone = |n: u32| {
        format!(
            "clone:{}:{}",
            base.display(),
            scratch.path(&format!("vm{n}.img")).display()
        )
    };
    let d = Daemon::start(&["--ns", &clone(1), "--ns", &clone(2)]);
    let b = Bridge::start(&d.uri, "127.0.0.1:0", &[]);
    for ns in ["1", "2"] {
        boots_and_prints(&b.export(ns), &golden, &scratch).unwrap_or_else(|e| panic!("clone {ns}: {e}"));
    }
    // Machine 1 installs its own boot sector; machine 2 still boots the
    // golden one, and the golden image is untouched.
    let own = format!("machine one {}", std::process::id());
    let (o, _) = hostctl(&d.uri, &["write", "--ns", "1", "--lba", "0"], Some(&boot_sector(&own)));
    ok(&o);
    boots_and_prints(&b.export("1"), &own, &scratch).unwrap_or_else(|e| panic!("clone 1: {e}"));
    boots_and_prints(&b.export("2"), &golden, &scratch).unwrap_or_else(|e| panic!("clone 2: {e}"));
    assert!(std::fs::read(&base).expect("read the golden image") == image);
}

#[test]
fn serve_nbd_stops_on_sigterm_and_removes_its_socket() {
    let d = Daemon::start(&["--ns", "ram:1MiB"]);
    let scratch = Scratch::new("nbd-sigterm");
    let sock = scratch.path("nbd.sock");
    let mut b = Bridge::start(&d.uri, &format!("unix:{}", sock.display()), &[]);
    assert!(sock.exists(), "the bridge listens on its socket");
    let pid = b.child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(sent.success());
    let status = wait_exit(&mut b.child, Duration::from_secs(20), "hostctl serve-nbd after SIGTERM");
    assert!(status.success(), "a stop on SIGTERM is a clean exit: {status}");
    assert!(!sock.exists(), "the socket is removed when the bridge stops");
}
