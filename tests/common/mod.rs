//! Shared scaffolding for the end-to-end tests: real `iounitd` and `hostctl`
//! processes, bounded in time, cleaned up on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A generous limit for one CLI call; a call that takes longer has hung.
pub const CALL_LIMIT: Duration = Duration::from_secs(60);

/// Path of a workspace binary, building it if `cargo test` did not.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = dir.join(name);
    if !path.exists() {
        let package = if name == "iounitd" {
            "chanio-iounit"
        } else {
            "chanio-host"
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("chanio-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh listen address of `transport`: a free tcp port, or a shared
/// memory name unique to this test process.
pub fn listen_address(transport: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    match transport {
        "shm" => format!(
            "shm://e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ),
        "auto" => "auto://127.0.0.1:0".into(),
        // The verbs exchange's tcp port; the data goes between the device's GIDs.
        "rdma" => "rdma://127.0.0.1:0".into(),
        _ => "tcp://127.0.0.1:0".into(),
    }
}

/// Whether this run covers the fabric `name` (`CHANIO_TEST_FABRICS`).
pub fn covers(name: &str) -> bool {
    chanio::messaging::provider::conformance::selected(name)
}

/// Whether the rdma tests run: the run covers verbs and a device is there
/// (without one they skip, saying so, unless `CHANIO_REQUIRE_VERBS=1`).
#[cfg(feature = "verbs")]
pub fn rdma_usable() -> bool {
    chanio::messaging::provider::conformance::verbs_usable()
}

/// A running `iounitd`, killed on drop. Its stderr is collected for checks.
pub struct Daemon {
    pub child: Child,
    pub uri: String,
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `iounitd` listening on a free port with `args`.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_on("tcp", args)
    }

    /// Starts `iounitd` listening on a fresh address of `transport`
    /// (`tcp`, `shm` or `auto`) with `args`.
    pub fn start_on(transport: &str, args: &[&str]) -> Daemon {
        let listen = listen_address(transport);
        let mut cmd = Command::new(binary("iounitd"));
        cmd.args(["--listen", &listen])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Daemon::spawn(cmd)
    }

    /// Starts `iounitd` with its config file `cfg` (reloaded on SIGHUP),
    /// listening on `transport`.
    pub fn with_config(transport: &str, cfg: &Path) -> Daemon {
        let mut cmd = Command::new(binary("iounitd"));
        cmd.arg("--config")
            .arg(cfg)
            .args(["--listen", &listen_address(transport)])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Daemon::spawn(cmd)
    }

    /// Starts `iounitd` with a full command (no listen address added).
    pub fn spawn(mut cmd: Command) -> Daemon {
        let mut child = cmd.spawn().expect("start iounitd");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                eprint!("[iounitd] {text}");
                sink.lock().unwrap().push_str(&text);
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(uri) = line.strip_prefix("listening on ") {
                    let _ = tx.send(uri.to_string());
                }
            }
        });
        let uri = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(uri) => uri,
            Err(_) => {
                let _ = child.kill();
                panic!("iounitd did not print 'listening on': {}", log.lock().unwrap());
            }
        };
        Daemon { child, uri, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log.lock().unwrap().contains(needle) {
            assert!(Instant::now() < deadline, "iounitd never logged {needle:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "iounitd did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `hostctl --target URI args...` with optional stdin, bounded by
/// [`CALL_LIMIT`]; returns its output and how long it took.
pub fn hostctl(uri: &str, args: &[&str], stdin: Option<&[u8]>) -> (Output, Duration) {
    let mut cmd = Command::new(binary("hostctl"));
    cmd.arg("--target")
        .arg(uri)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_bounded(cmd, stdin)
}

/// Runs a command with a time limit; a command past it is killed and the
/// test fails as hung.
pub fn run_bounded(mut cmd: Command, stdin: Option<&[u8]>) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    // Fed from a thread, while the output is drained: a command that
    // exits early (its stdin then breaks) still shows why, and one that
    // writes much before it reads cannot deadlock the test.
    let feeder = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || match pipe.write_all(&data) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
                _ => {}
            }))
        }
        _ => None,
    };
    let out = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = s.read_to_end(&mut v);
            v
        })
    });
    let err = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = s.read_to_end(&mut v);
            v
        })
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > CALL_LIMIT {
            let _ = child.kill();
            panic!("{cmd:?} hung for {CALL_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let output = Output {
        status,
        stdout: out.map(|t| t.join().unwrap_or_default()).unwrap_or_default(),
        stderr: err.map(|t| t.join().unwrap_or_default()).unwrap_or_default(),
    };
    (output, started.elapsed())
}

/// Asserts success and returns stdout.
pub fn ok(out: &Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "command failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout.clone()
}

/// A deterministic pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8)
        .collect()
}

/// Starts `hostctl --target URI --timeout T bench ...` in the background
/// (random reads for a minute) and waits until the daemon has its queue.
pub fn background_bench(d: &Daemon, timeout: &str, rw: &str) -> Child {
    let child = Command::new(binary("hostctl"))
        .args([
            "--target",
            &d.uri,
            "--timeout",
            timeout,
            "bench",
            "--ns",
            "1",
            "--rw",
            rw,
            "--qd",
            "8",
            "--time",
            "60s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hostctl bench");
    d.wait_log("queue connected", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    child
}

/// Waits up to `limit` for `child` to exit; a child still running then has
/// hung: it is killed and the test fails.
pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
