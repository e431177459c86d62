//! The progress engine: tcp and shm queue pairs cost no thread of their
//! own, and a channel nobody waits on still makes progress (the engine
//! drives it and wakes the registered waker).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use messaging::{Config, Endpoint, Fabrics, Scheme};

const LONG: Duration = Duration::from_secs(10);
const CHANNELS: usize = 48;

fn schemes() -> Vec<(Scheme, &'static str)> {
    let mut schemes = vec![(Scheme::Tcp, "127.0.0.1:0")];
    if cfg!(target_os = "linux") {
        schemes.push((Scheme::Shm, ""));
    }
    schemes
}

/// The threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// `n` connected pairs over `scheme`.
fn pairs(fabrics: &Fabrics, scheme: Scheme, addr: &str, n: usize) -> Vec<(Endpoint, Endpoint)> {
    let fabric = fabrics.fabric(scheme).expect("fabric");
    let listener = fabric.listen(addr).expect("listen");
    let at = listener.local_addr();
    (0..n)
        .map(|_| {
            std::thread::scope(|s| {
                let server = s.spawn(|| Endpoint::accept(fabric, &*listener, Config::default(), Some(LONG)));
                let client = Endpoint::connect(fabric, &at, Config::default()).expect("connect");
                (client, server.join().expect("accept thread").expect("accept"))
            })
        })
        .collect()
}

struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn channels_cost_no_thread_of_their_own() {
    for (scheme, addr) in schemes() {
        let fabrics = Fabrics::new();
        // The engine's threads start with the first queue pair.
        let warm = pairs(&fabrics, scheme, addr, 1);
        let before = threads();
        let many = pairs(&fabrics, scheme, addr, CHANNELS);
        let grown = threads().saturating_sub(before);
        // Two queue pairs per pair: a thread each would be 96 more.
        assert!(
            grown <= 4,
            "{scheme:?}: {CHANNELS} more channel pairs took {grown} more threads"
        );
        for (a, b) in &many {
            a.send(b"ping").expect("send");
            let got = b.recv_timeout(LONG).expect("recv");
            assert_eq!(&got[..], b"ping");
        }
        drop(many);
        drop(warm);
    }
}

#[test]
fn a_channel_nobody_waits_on_is_driven_and_its_waker_woken() {
    for (scheme, addr) in schemes() {
        let fabrics = Fabrics::new();
        let many = pairs(&fabrics, scheme, addr, 8);
        let counts: Vec<Arc<Count>> = many.iter().map(|_| Arc::new(Count(AtomicUsize::new(0)))).collect();
        // Each receiver registers its waker once and then nobody calls in:
        // only the engine reads their transports.
        for ((_, b), count) in many.iter().zip(&counts) {
            let waker = Waker::from(count.clone());
            let mut cx = Context::from_waker(&waker);
            let polled = std::pin::pin!(b.recv_async()).poll(&mut cx);
            assert!(
                matches!(polled, Poll::Pending),
                "{scheme:?}: a message before any was sent"
            );
        }
        for (a, _) in &many {
            // Detached: the sender does not wait for the acknowledgement
            // either.
            a.send(b"news").expect("send").detach();
        }
        let deadline = Instant::now() + LONG;
        while counts.iter().any(|c| c.0.load(Ordering::SeqCst) == 0) {
            assert!(
                Instant::now() < deadline,
                "{scheme:?}: {} of 8 wakers never woken",
                counts.iter().filter(|c| c.0.load(Ordering::SeqCst) == 0).count()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for (_, b) in &many {
            let got = b.try_recv_taken().expect("the engine received it");
            assert_eq!(&got[..], b"news");
        }
    }
}
