//! Replication end to end: an etcd the test starts, a primary `iounitd`
//! replicating a namespace to another `iounitd`, a host writing through
//! the primary. Without `etcd` (Debian's etcd-server) the tests skip,
//! saying so, unless `CHANIO_REQUIRE_ETCD=1` (as `.ci/run` sets).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chanio::host::{Host, HostOptions, Nsid, Status};
use chanio::iounit::replica::membership::Membership;
use common::{pattern, Daemon, Scratch};

const BLOCK: usize = 512;

/// An etcd on two free ports of 127.0.0.1, its data in a scratch
/// directory; killed on drop.
struct Etcd {
    child: Child,
    url: String,
    _dir: Scratch,
}

impl Etcd {
    /// Starts one, or returns `None` (the test skips) where etcd is not
    /// installed and the run does not require it.
    fn start(tag: &str) -> Option<Etcd> {
        if Command::new("etcd").arg("--version").output().is_err() {
            assert!(
                std::env::var("CHANIO_REQUIRE_ETCD").as_deref() != Ok("1"),
                "etcd is not installed (Debian package etcd-server) and CHANIO_REQUIRE_ETCD=1"
            );
            eprintln!("skipping: etcd is not installed (Debian package etcd-server)");
            return None;
        }
        let dir = Scratch::new(&format!("etcd-{tag}"));
        let port = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port")
        };
        let (client, peer) = (port(), port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--name")
            .arg(tag)
            .arg("--data-dir")
            .arg(dir.path("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .arg("--initial-cluster")
            .arg(format!("{tag}={peer_url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let etcd = Etcd { child, url, _dir: dir };
        // Ready once a client gets a lease from it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if Membership::join(
                std::slice::from_ref(&etcd.url),
                "/ready",
                "probe",
                Duration::from_secs(2),
            )
            .is_ok()
            {
                return Some(etcd);
            }
            assert!(Instant::now() < deadline, "etcd did not start at {}", etcd.url);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} etcd failed");
    }

    /// The in-sync set etcd holds for namespace 1 under `prefix`.
    fn in_sync(&self, prefix: &str) -> Vec<String> {
        let m = Membership::join(
            std::slice::from_ref(&self.url),
            prefix,
            "observer",
            Duration::from_secs(2),
        )
        .expect("join etcd");
        m.in_sync(1).expect("read the in-sync set")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A replica `iounitd` (a plain one) and a primary replicating its
/// namespace 1 to it.
fn pair(etcd: &Etcd, prefix: &str, ttl: &str) -> (Daemon, Daemon) {
    let replica = Daemon::start(&["--ns", "ram:16MiB"]);
    let spec = format!("1=b@{}", replica.uri);
    let primary = Daemon::start(&[
        "--ns",
        "ram:16MiB",
        "--etcd",
        &etcd.url,
        "--etcd-prefix",
        prefix,
        "--node",
        "a",
        "--lease-ttl",
        ttl,
        "--replica",
        &spec,
    ]);
    primary.wait_log("primary of a replicated namespace", Duration::from_secs(20));
    (primary, replica)
}

fn connect(uri: &str) -> Host {
    let opts = HostOptions {
        command_timeout: Duration::from_secs(20),
        ..HostOptions::default()
    };
    Host::connect(uri, opts).expect("connect")
}

#[test]
fn a_killed_replica_leaves_the_in_sync_set_and_no_acknowledged_write_is_lost() {
    let Some(etcd) = Etcd::start("kill-replica") else {
        return;
    };
    let prefix = "/test/kill-replica";
    let (primary, mut replica) = pair(&etcd, prefix, "5");
    assert_eq!(etcd.in_sync(prefix), ["a", "b"]);
    let host = connect(&primary.uri);
    let ns = Nsid(1);

    // In sync: what the primary acknowledged is on the replica too.
    let first = pattern(64 * BLOCK, 1);
    host.write(ns, 0, &first, false).expect("write while in sync");
    let on_replica = connect(&replica.uri).read(ns, 0, 64).expect("read the replica");
    assert!(on_replica == first, "the replica does not hold the acknowledged write");

    // A stream of writes, the replica killed in its middle: every write is
    // acknowledged, and each acknowledged one is on the primary.
    let mut acknowledged = Vec::new();
    for i in 0..200u64 {
        if i == 60 {
            replica.child.kill().expect("kill -9 the replica");
            let _ = replica.child.wait();
        }
        let lba = 64 + i * 8;
        let data = pattern(8 * BLOCK, (i % 251) as u8);
        host.write(ns, lba, &data, i % 10 == 0)
            .unwrap_or_else(|e| panic!("write {i} failed after the replica died: {e}"));
        acknowledged.push((lba, data));
    }
    host.flush(ns).expect("flush, degraded");
    for (lba, data) in &acknowledged {
        let back = host.read(ns, *lba, 8).expect("read back");
        assert!(
            back == *data,
            "acknowledged write at LBA {lba} is missing on the primary"
        );
    }
    assert_eq!(
        etcd.in_sync(prefix),
        ["a"],
        "etcd still lists the dead replica as in sync"
    );
    primary.wait_log("replica left the in-sync set", Duration::from_secs(5));
}

#[test]
fn a_primary_that_cannot_renew_its_lease_acknowledges_nothing_after_it_ends() {
    let Some(etcd) = Etcd::start("fence") else { return };
    let prefix = "/test/fence";
    let ttl = Duration::from_secs(2);
    let (primary, _replica) = pair(&etcd, prefix, "2");
    let host = connect(&primary.uri);
    let ns = Nsid(1);
    host.write(ns, 0, &pattern(8 * BLOCK, 3), false)
        .expect("write with the lease held");

    // etcd stops answering: the primary's lease ends at most `ttl` after
    // its last renewal, which came before this instant.
    etcd.signal("-STOP");
    let stopped = Instant::now();
    let mut refused = 0;
    while stopped.elapsed() < ttl + Duration::from_secs(2) {
        let attempt = Instant::now();
        match host.write(ns, 8, &pattern(8 * BLOCK, 4), false) {
            Ok(()) => assert!(
                attempt.elapsed() + (attempt - stopped) < ttl,
                "a write was acknowledged {:?} after etcd stopped answering, past the lease",
                stopped.elapsed()
            ),
            Err(e) if e.status() == Some(Status::NAMESPACE_NOT_READY) => refused += 1,
            Err(e) => panic!("unexpected error while fenced: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    etcd.signal("-CONT");
    assert!(
        refused > 0,
        "the primary never refused a write while its lease was lapsed"
    );
}

#[test]
fn a_second_node_cannot_take_a_namespace_another_is_primary_of() {
    let Some(etcd) = Etcd::start("second") else { return };
    let prefix = "/test/second";
    let (_primary, replica) = pair(&etcd, prefix, "5");
    let spec = format!("1=a@{}", replica.uri);
    let claim = |node: &str| {
        let out = Command::new(common::binary("iounitd"))
            .args([
                "--listen",
                "tcp://127.0.0.1:0",
                "--ns",
                "ram:16MiB",
                "--etcd",
                &etcd.url,
            ])
            .args(["--etcd-prefix", prefix, "--node", node, "--replica", &spec])
            .stdin(Stdio::null())
            .output()
            .expect("run iounitd");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "node {node} became a second primary: {stderr}");
        stderr
    };
    // b is in sync, but a holds the primary key under its live lease.
    let refused = claim("b");
    assert!(
        refused.contains("node \"a\" is its primary"),
        "the refusal does not name the primary: {refused}"
    );
    // c may miss acknowledged writes: it may never become primary.
    let refused = claim("c");
    assert!(
        refused.contains("this node is not in the in-sync set"),
        "the refusal does not say c is out of sync: {refused}"
    );
    assert_eq!(etcd.in_sync(prefix), ["a", "b"]);
}
