//! Windows against an in-process I/O unit, over tcp and shm: the data
//! paths both ways, each access violation, each revocation trigger, the
//! limit. (`tests/e2e.rs` runs the data paths and violations against the
//! daemon over every fabric, verbs over soft-RoCE included.)

use iounit::target::{Target, TargetConfig};

use super::*;
use crate::HostOptions;

/// A listen address on each fabric (a fresh shm name per call).
fn fabrics() -> [String; 2] {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    [
        "tcp://127.0.0.1:0".into(),
        format!("shm://window-test-{}-{n}", std::process::id()),
    ]
}

fn target(listen: &str, limit: usize) -> Target {
    Target::start(TargetConfig {
        listen: vec![listen.into()],
        namespaces: vec!["ram:4MiB".parse().unwrap(), "ram:1MiB:4096".parse().unwrap()],
        max_windows_per_host: limit,
        ..TargetConfig::default()
    })
    .unwrap()
}

fn host(t: &Target, hostnqn: &str) -> Host {
    let opts = HostOptions {
        hostnqn: hostnqn.into(),
        ..HostOptions::default()
    };
    Host::connect(&t.local_uris()[0], opts).unwrap()
}

const NQN: &str = "nqn.2026-12.io.chanio:window-test";

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn filled(h: &Host, data: &[u8]) -> IoBuf {
    let mut b = h.alloc(data.len()).unwrap();
    b.copy_from_slice(data);
    b
}

fn is_gone(r: Result<(), HostError>) -> bool {
    matches!(r, Err(HostError::WindowClosed(_)))
}

#[test]
fn data_crosses_between_windows_and_commands_both_ways() {
    for fabric in fabrics() {
        let t = target(&fabric, 8);
        let h = host(&t, NQN);
        // Written by command, read through a read-only window.
        let by_command = pattern(8 * 512, 1);
        h.write(Nsid(1), 100, &by_command, false).unwrap();
        let w = h.open_window(Nsid(1), 96, 64, false).unwrap();
        assert_eq!((w.len(), w.writable(), w.start()), (64 * 512, false, (Nsid(1), 96)));
        let mut back = h.alloc(by_command.len()).unwrap();
        w.read_at(4 * 512, &mut back).unwrap();
        assert!(back[..] == by_command[..], "{fabric}: window read of command data");
        // Any alignment, within the window.
        let mut odd = h.alloc(7).unwrap();
        w.read_at(4 * 512 + 3, &mut odd).unwrap();
        assert_eq!(&odd[..], &by_command[3..10], "{fabric}");
        // Over shm the I/O unit (this process's user) shares the memory and
        // the host copies; the RDMA path still serves the same bytes.
        assert_eq!(w.shared_memory(), fabric.starts_with("shm"), "{fabric}");
        let (stag, addr) = w.stag();
        let mut rdma = h.alloc(by_command.len()).unwrap();
        w.transfer_unchecked(addr + 4 * 512, stag, &mut rdma, false).unwrap();
        assert!(rdma[..] == by_command[..], "{fabric}: an RDMA Read of the window");

        // Written through a writable window, committed, read by command.
        let rw = h.open_window(Nsid(1), 1000, 16, true).unwrap();
        let by_window = pattern(2048 + 5, 2);
        rw.write_at(512, &mut filled(&h, &by_window)).unwrap();
        rw.commit().unwrap();
        rw.write_at(0, &mut filled(&h, &[9; 512])).unwrap();
        block_on(rw.commit_range_async(0, 1)).unwrap();
        let seen = h.read(Nsid(1), 1000, 6).unwrap();
        assert_eq!(&seen[..512], &[9; 512][..], "{fabric}");
        assert!(
            seen[512..512 + by_window.len()] == by_window[..],
            "{fabric}: command read of window data"
        );
        // A window sees a command's later write, and its own.
        let later = pattern(512, 3);
        h.write(Nsid(1), 1001, &later, false).unwrap();
        let mut b = h.alloc(512).unwrap();
        rw.read_at(512, &mut b).unwrap();
        assert!(b[..] == later[..], "{fabric}");
        // A 4 KiB-block namespace: the window is in its blocks.
        let w4 = h.open_window(Nsid(2), 3, 2, false).unwrap();
        assert_eq!(w4.len(), 8192);

        // Local checks: outside the window, writes to a read-only one.
        let mut big = h.alloc(513).unwrap();
        assert!(matches!(
            w.read_at(64 * 512 - 512, &mut big),
            Err(HostError::InvalidArgument(_))
        ));
        assert!(matches!(w.write_at(0, &mut b), Err(HostError::InvalidArgument(_))));
        assert!(matches!(
            block_on(rw.commit_range_async(1, 1)),
            Err(HostError::InvalidArgument(_))
        ));
        // What the I/O unit refuses: out of range, an unwindowable size.
        let status = |r: Result<Window, HostError>| r.err().and_then(|e| e.status());
        assert!(
            status(h.open_window(Nsid(1), 8192 - 4, 8, false)).is_some_and(|s| s.same_code(Status::LBA_OUT_OF_RANGE))
        );
        assert!(status(h.open_window(Nsid(9), 0, 1, false)).is_some_and(|s| s.same_code(Status::INVALID_NAMESPACE)));
        assert!(matches!(
            h.open_window(Nsid(1), 0, 0, false),
            Err(HostError::InvalidArgument(_))
        ));
        w.close().unwrap();
        h.close();
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    exec::block_on(f)
}

/// Where a probe aims: an address and key, from a window.
type Aim = fn(&Window) -> (u64, u32);

#[test]
fn every_access_violation_closes_only_that_connection() {
    for fabric in fabrics() {
        let t = target(&fabric, 8);
        let h = host(&t, NQN);
        let bystander = host(&t, "nqn.2026-12.io.chanio:bystander");
        h.write(Nsid(1), 0, &pattern(4096, 4), false).unwrap();
        let cases: [(&str, Aim, bool, bool); 4] = [
            (
                "past the window's end",
                |w| (w.stag().1 + w.len() - 4, w.stag().0),
                false,
                true,
            ),
            ("before its start", |w| (w.stag().1 - 1, w.stag().0), false, true),
            (
                "under a wrong key",
                |w| (w.stag().1, w.stag().0 ^ 0x5a5a_0001),
                false,
                true,
            ),
            (
                "a write into a read-only window",
                |w| (w.stag().1, w.stag().0),
                true,
                false,
            ),
        ];
        for (what, at, write, writable) in cases {
            let w = h.open_window(Nsid(1), 8, 8, writable).unwrap();
            let mut b = filled(&h, &[0xee; 16]);
            let (addr, stag) = at(&w);
            assert!(
                is_gone(w.transfer_unchecked(addr, stag, &mut b, write)),
                "{fabric}: {what} was not refused"
            );
            // The window went with its connection; the host reconnects and
            // the I/O unit serves it and everyone else.
            assert!(
                is_gone(w.read_at(0, &mut b)),
                "{fabric}: {what}: the window outlived its connection"
            );
            assert!(
                h.read(Nsid(1), 0, 8).unwrap() == pattern(4096, 4),
                "{fabric}: {what}: data changed"
            );
            assert!(
                bystander.read(Nsid(1), 0, 1).is_ok(),
                "{fabric}: {what}: the bystander lost service"
            );
        }
        h.close();
        bystander.close();
    }
}

#[test]
fn windows_are_revoked_on_close_detach_masking_and_disconnect_and_limited_per_host() {
    for fabric in fabrics() {
        let t = target(&fabric, 2);
        let h = host(&t, NQN);
        let mut b = h.alloc(512).unwrap();

        // Close: the old key is refused at the I/O unit.
        let w = h.open_window(Nsid(1), 0, 8, false).unwrap();
        let (stag, addr) = w.stag();
        let probe = h.open_window(Nsid(1), 0, 8, false).unwrap();
        w.close().unwrap();
        assert!(
            is_gone(probe.transfer_unchecked(addr, stag, &mut b, false)),
            "{fabric}: a closed window's key still works"
        );

        // The limit: two per host NQN, whatever its controllers.
        let h2 = host(&t, NQN);
        let a = h.open_window(Nsid(1), 0, 1, false).unwrap();
        let b2 = h2.open_window(Nsid(1), 0, 1, false).unwrap();
        let refused = h2.open_window(Nsid(1), 0, 1, false).unwrap_err();
        assert!(
            refused
                .status()
                .is_some_and(|s| s.same_code(nvme::window::status::LIMIT_EXCEEDED)),
            "{fabric}: {refused}"
        );
        // Disconnect: a host whose connection ends gives its windows back.
        h2.close();
        drop(b2);
        let again =
            wait_for(|| h.open_window(Nsid(1), 0, 1, false).ok()).expect("the closed host's window was not revoked");
        drop((a, again));

        // Detach: the key goes, commands then fail, and so does the window.
        let w = h.open_window(Nsid(2), 0, 1, false).unwrap();
        let (stag, addr) = w.stag();
        t.registry().detach(2, Duration::from_secs(5)).unwrap();
        let probe = h.open_window(Nsid(1), 0, 1, false).unwrap();
        assert!(
            is_gone(probe.transfer_unchecked(addr, stag, &mut b, false)),
            "{fabric}: a detached namespace's window"
        );
        assert!(is_gone(w.commit()) || is_gone(w.read_at(0, &mut b)), "{fabric}");
        drop(w);

        // Masking: a host that may no longer see the namespace loses its
        // windows on it, and cannot open new ones.
        let w = h.open_window(Nsid(1), 0, 1, false).unwrap();
        let (stag, addr) = w.stag();
        t.set_namespace_hosts(1, &["nqn.2026-12.io.chanio:someone-else".into()])
            .unwrap();
        let refused = h.open_window(Nsid(1), 0, 1, false).unwrap_err();
        assert!(
            refused.status().is_some_and(|s| s.same_code(Status::INVALID_NAMESPACE)),
            "{fabric}: {refused}"
        );
        t.set_namespace_hosts(1, &[]).unwrap();
        let probe = h.open_window(Nsid(1), 0, 1, false).unwrap();
        assert!(
            is_gone(probe.transfer_unchecked(addr, stag, &mut b, false)),
            "{fabric}: a masked namespace's window"
        );
        drop(w);
        h.close();
    }
}

/// Retries for a few seconds: the I/O unit notices a closed host's
/// connection on its own time.
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file namespace's windows are coherent with commands both ways, at
/// once, and reach the file at Commit: over tcp the window is the file's
/// page cache mapped shared (committed with an fdatasync; command writes
/// go O_DIRECT where the file system allows it), over shm a cached extent.
#[test]
fn a_file_namespace_is_windowed_coherently_with_commands() {
    let dir = std::env::temp_dir().join(format!("chanio-window-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for fabric in fabrics() {
        let path = dir.join("ns.img");
        let _ = std::fs::remove_file(&path);
        let t = Target::start(TargetConfig {
            listen: vec![fabric.clone()],
            namespaces: vec![format!("file:{}:2MiB", path.display()).parse().unwrap()],
            ..TargetConfig::default()
        })
        .unwrap();
        let h = host(&t, NQN);
        let w = h.open_window(Nsid(1), 64, 64, true).unwrap();
        // Command first (a direct write drops the pages it covers), then
        // read through the window.
        let by_command = pattern(8192, 11);
        h.write(Nsid(1), 72, &by_command, false).unwrap();
        let mut b = h.alloc(by_command.len()).unwrap();
        w.read_at(8 * 512, &mut b).unwrap();
        assert!(
            b[..] == by_command[..],
            "{fabric}: a command write seen through the window"
        );
        // Window first, then read by command (a direct read writes the
        // dirty pages back first).
        let by_window = pattern(3 * 4096, 12);
        w.write_at(16 * 512, &mut filled(&h, &by_window)).unwrap();
        assert!(
            h.read(Nsid(1), 80, 24).unwrap() == by_window,
            "{fabric}: a window write seen by a command"
        );
        w.commit().unwrap();
        block_on(w.commit_range_async(4096, 8)).unwrap();
        w.close().unwrap();
        h.close();
        t.shutdown();
        // In the file itself, at the window's place.
        let file = std::fs::read(&path).unwrap();
        let at = (64 + 16) * 512;
        assert!(
            file[at..at + by_window.len()] == by_window[..],
            "{fabric}: the file holds the window's write"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `window_file_cache` (what a window over verbs always
/// gets anyway), a file window is a cached extent: a copy of its blocks
/// that commands keep coherent both ways, written to the file at Commit
/// and only then.
#[test]
fn a_cached_extent_is_coherent_with_commands_and_reaches_the_file_at_commit() {
    let dir = std::env::temp_dir().join(format!("chanio-window-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for fabric in fabrics() {
        let path = dir.join("ns.img");
        let big = dir.join("big.img");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&big);
        let t = Target::start(TargetConfig {
            listen: vec![fabric.clone()],
            namespaces: vec![
                format!("file:{}:2MiB", path.display()).parse().unwrap(),
                format!("file:{}:80MiB", big.display()).parse().unwrap(),
            ],
            window_file_cache: true,
            ..TargetConfig::default()
        })
        .unwrap();
        let h = host(&t, NQN);
        let file_at = |at: usize, len: usize| std::fs::read(&path).unwrap()[at..at + len].to_vec();
        // What the file held before the window is in it.
        let before = pattern(4096, 21);
        h.write(Nsid(1), 64, &before, false).unwrap();
        let w = h.open_window(Nsid(1), 64, 64, true).unwrap();
        assert_eq!(
            w.shared_memory(),
            fabric.starts_with("shm"),
            "{fabric}: a cached extent is shared over shm"
        );
        let mut b = h.alloc(4096).unwrap();
        w.read_at(0, &mut b).unwrap();
        assert!(b[..] == before[..], "{fabric}: the cache was filled from the file");
        // A window write: commands see it at once, the file only after
        // Commit.
        let by_window = pattern(3000, 22);
        w.write_at(8192 + 7, &mut filled(&h, &by_window)).unwrap();
        let seen = h.read(Nsid(1), 64 + 16, 8).unwrap();
        assert!(
            seen[7..7 + 3000] == by_window[..],
            "{fabric}: a command read of a cached window write"
        );
        assert!(
            file_at((64 + 16) * 512 + 7, 3000) != by_window,
            "{fabric}: in the file before Commit"
        );
        w.commit().unwrap();
        assert!(
            file_at((64 + 16) * 512 + 7, 3000) == by_window,
            "{fabric}: not in the file after Commit"
        );
        // A command write and a zeroing reach the window.
        let by_command = pattern(1024, 23);
        h.write(Nsid(1), 100, &by_command, false).unwrap();
        let mut c = h.alloc(1024).unwrap();
        w.read_at(36 * 512, &mut c).unwrap();
        assert!(c[..] == by_command[..], "{fabric}: a window read of a command write");
        h.write_zeroes(Nsid(1), 100, 1).unwrap();
        w.read_at(36 * 512, &mut c).unwrap();
        assert!(
            c[..512].iter().all(|&x| x == 0) && c[512..] == by_command[512..],
            "{fabric}: zeroes"
        );
        // Extents never overlap; they are bounded.
        let refused = h.open_window(Nsid(1), 100, 8, false).unwrap_err();
        assert!(
            refused
                .status()
                .is_some_and(|s| s.same_code(nvme::window::status::OVERLAPS)),
            "{fabric}: {refused}"
        );
        let refused = h.open_window(Nsid(2), 0, (65 << 20) / 512, false).unwrap_err();
        assert!(
            refused
                .status()
                .is_some_and(|s| s.same_code(nvme::window::status::CACHE_LIMIT)),
            "{fabric}: {refused}"
        );
        // Uncommitted window writes go with the window.
        let lost = pattern(512, 24);
        w.write_at(0, &mut filled(&h, &lost)).unwrap();
        w.close().unwrap();
        assert!(
            h.read(Nsid(1), 64, 1).unwrap() == before[..512],
            "{fabric}: an uncommitted write outlived its window"
        );
        h.close();
        t.shutdown();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
