use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use super::*;
use crate::backend::{conformance, uring, BackendSpec};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("chanio-clone-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn base_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 512 * 7 + i % 251) as u8).collect()
}

/// A base image of `len` bytes with known contents.
fn base(dir: &Dir, len: usize) -> (PathBuf, Vec<u8>) {
    let p = dir.path("base.img");
    let data = base_bytes(len);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn read_all(b: &CloneBackend) -> Vec<u8> {
    let mut v = vec![0u8; b.geometry().bytes() as usize];
    b.read(0, &mut v).unwrap();
    v
}

#[test]
fn a_clone_passes_the_block_layer_conformance() {
    let dir = Dir::new("conformance");
    let (b, _) = base(&dir, 2 << 20);
    let c = CloneBackend::open(&b, &dir.path("c.img"), 512).unwrap();
    conformance::run(&c);
    let c4 = CloneBackend::open(&b, &dir.path("c4.img"), 4096).unwrap();
    conformance::run(&c4);
}

#[test]
fn reads_go_through_to_the_base_until_written_and_the_base_stays_as_it_was() {
    let dir = Dir::new("through");
    let (b, mut want) = base(&dir, 1 << 20);
    let c = CloneBackend::open(&b, &dir.path("c.img"), 512).unwrap();
    assert!(read_all(&c) == want, "a fresh clone reads as its base");
    assert_eq!(c.clusters_held(), 0);
    // 512 bytes inside cluster 3, and a write across clusters 5 and 6.
    let at = 3 * CLUSTER + 1024;
    c.write(at, &[0xaa; 512], false).unwrap();
    let across = 6 * CLUSTER - 2048;
    c.write(across, &[0xbb; 4096], false).unwrap();
    want[at as usize..at as usize + 512].fill(0xaa);
    want[across as usize..across as usize + 4096].fill(0xbb);
    assert!(
        read_all(&c) == want,
        "writes land; the rest of their clusters still read the base"
    );
    assert_eq!(c.clusters_held(), 3);
    assert!(
        std::fs::read(&b).unwrap() == base_bytes(1 << 20),
        "the base is never written"
    );
    // A whole cluster is written without reading the base.
    c.write(8 * CLUSTER, &vec![0xcc; CLUSTER as usize], false).unwrap();
    assert_eq!(c.clusters_held(), 4);
    assert!(c.describe().contains("4 of 16 clusters"), "{}", c.describe());
}

#[test]
fn a_clone_is_made_in_constant_space() {
    let dir = Dir::new("sparse");
    let b = dir.path("big.img");
    File::create(&b).unwrap().set_len(4 << 30).unwrap();
    let path = dir.path("c.img");
    let c = CloneBackend::open(&b, &path, 4096).unwrap();
    assert_eq!(c.geometry().bytes(), 4 << 30);
    let used = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    assert_eq!(used(&path), 0, "the data file is all hole");
    // 65536 clusters: an 8 KiB bitmap, left a hole until written.
    assert!(used(&with_ext(&path, ".map")) <= 16 << 10);
    assert!(used(&with_ext(&path, ".log")) <= 4 << 10);
}

#[test]
fn a_clone_keeps_its_writes_across_a_restart_and_a_daemon_crash() {
    let dir = Dir::new("restart");
    let (b, mut want) = base(&dir, 1 << 20);
    let path = dir.path("c.img");
    let c = CloneBackend::open(&b, &path, 512).unwrap();
    c.write(0, &[1; 512], false).unwrap();
    c.flush().unwrap();
    drop(c);
    want[..512].fill(1);
    let c = CloneBackend::open(&b, &path, 512).unwrap();
    assert!(read_all(&c) == want, "flushed writes survive a restart");
    // Written, never flushed, and the daemon dies (no drop, no flush): the
    // same kernel still holds the data, and the log brings it back.
    c.write(5 * CLUSTER, &[2; 4096], false).unwrap();
    c.crash();
    want[5 * CLUSTER as usize..5 * CLUSTER as usize + 4096].fill(2);
    let c = CloneBackend::open(&b, &path, 512).unwrap();
    assert!(read_all(&c) == want, "unflushed writes survive a crash of the daemon");
    assert_eq!(c.clusters_held(), 2);
}

#[test]
fn after_a_reboot_unflushed_clusters_read_from_the_base_again() {
    let dir = Dir::new("reboot");
    let (b, mut want) = base(&dir, 1 << 20);
    let path = dir.path("c.img");
    let c = CloneBackend::open(&b, &path, 512).unwrap();
    c.write(0, &[1; 512], true).unwrap(); // FUA: durable
    c.write(7 * CLUSTER + 512, &[9; 512], false).unwrap();
    c.crash();
    // As if the machine rebooted: the log was written under another boot.
    let log = OpenOptions::new().write(true).open(with_ext(&path, ".log")).unwrap();
    log.write_all_at(&[b'x'; BOOT_ID_LEN], 8).unwrap();
    drop(log);
    want[..512].fill(1);
    let c = CloneBackend::open(&b, &path, 512).unwrap();
    assert!(
        read_all(&c) == want,
        "the durable write stays; the cluster never flushed reads the base, whole"
    );
    assert_eq!(c.clusters_held(), 1);
}

#[test]
fn a_changed_base_or_a_damaged_map_is_refused() {
    let dir = Dir::new("changed");
    let (b, _) = base(&dir, 1 << 20);
    let path = dir.path("c.img");
    drop(CloneBackend::open(&b, &path, 512).unwrap());
    std::fs::write(&b, base_bytes(2 << 20)).unwrap();
    let e = CloneBackend::open(&b, &path, 512).unwrap_err().to_string();
    assert!(e.contains("changed since the clone"), "{e}");
    let map = with_ext(&path, ".map");
    std::fs::write(&map, b"garbage").unwrap();
    let e = CloneBackend::open(&b, &path, 512).unwrap_err().to_string();
    assert!(e.contains(".map"), "{e}");
    let e = CloneBackend::open(&dir.path("none.img"), &dir.path("d.img"), 512)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot open the base image"), "{e}");
    assert!(!dir.path("d.img").exists(), "no clone is made of a missing base");
}

#[test]
fn an_interrupted_creation_is_made_anew() {
    let dir = Dir::new("interrupted");
    let (b, want) = base(&dir, 1 << 20);
    let path = dir.path("c.img");
    // What a crash during creation may leave: a map and a data file under
    // its temporary name, but no PATH.
    std::fs::write(with_ext(&path, ".map"), b"half").unwrap();
    std::fs::write(with_ext(&path, ".new"), b"partial").unwrap();
    let c = CloneBackend::open(&b, &path, 512).unwrap();
    assert!(read_all(&c) == want, "a fresh clone of the base");
    c.write(0, &[4; 512], false).unwrap();
    drop(c);
    assert!(!with_ext(&path, ".new").exists());
    let c = CloneBackend::open(&b, &path, 512).unwrap();
    assert_eq!(c.clusters_held(), 1, "and it keeps what it was given since");
}

#[test]
fn writers_racing_into_one_new_cluster_all_land() {
    let dir = Dir::new("race");
    let (b, mut want) = base(&dir, 1 << 20);
    let c = Arc::new(CloneBackend::open(&b, &dir.path("c.img"), 512).unwrap());
    for round in 0..8u64 {
        let cluster = 2 + round;
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    c.write(cluster * CLUSTER + i * 4096, &[0x10 + i as u8; 512], false)
                        .unwrap()
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        for i in 0..8u64 {
            let at = (cluster * CLUSTER + i * 4096) as usize;
            want[at..at + 512].fill(0x10 + i as u8);
        }
    }
    assert!(read_all(&c) == want, "a copy of the base overwrote a racing write");
}

#[test]
fn clones_share_a_base_that_no_writable_namespace_may_take() {
    let dir = Dir::new("share");
    let (b, want) = base(&dir, 1 << 20);
    let one = CloneBackend::open(&b, &dir.path("one.img"), 512).unwrap();
    let two = CloneBackend::open(&b, &dir.path("two.img"), 512).unwrap();
    one.write(0, &[7; 512], false).unwrap();
    assert!(read_all(&two) == want, "one clone's write is its own");
    let e = uring::FileBackend::open(&b, None, 512).unwrap_err().to_string();
    assert!(e.contains("in use"), "{e}");
    let e = CloneBackend::open(&b, &dir.path("one.img"), 512)
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use"), "a clone is served once: {e}");
}

#[test]
fn clone_specs_parse_and_print() {
    assert_eq!(
        "clone:/g/base.img:/c/vm1.img".parse::<BackendSpec>(),
        Ok(BackendSpec::Clone {
            base: "/g/base.img".into(),
            path: "/c/vm1.img".into(),
            block_size: 512
        })
    );
    let s: BackendSpec = "clone:/b:/c:4096".parse().unwrap();
    assert_eq!(s.to_string(), "clone:/b:/c:4096");
    for bad in ["clone:/b", "clone::/c", "clone:/b:/c:4096:x", "clone:/b:/c:1000"] {
        assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
    }
}
