//! A connect gives up after the connect timeout of its `Fabrics`, on every
//! provider: a listener that never answers the hello cannot hold a
//! connecting side longer.

use std::time::{Duration, Instant};

use messaging::{Config, Endpoint, Fabrics, Scheme};

#[test]
fn connects_give_up_after_the_connect_timeout_on_every_fabric() {
    let mut schemes = vec![(Scheme::Tcp, "127.0.0.1:0")];
    if cfg!(target_os = "linux") {
        schemes.push((Scheme::Shm, ""));
    }
    for (scheme, addr) in schemes {
        // A listener nobody accepts on: the hello is never answered.
        let server = Fabrics::new();
        let listener = server.fabric(scheme).expect("fabric").listen(addr).expect("listen");
        let client = Fabrics::new().with_connect_timeout(Duration::from_millis(300));
        let fabric = client.fabric(scheme).expect("fabric");
        let started = Instant::now();
        let outcome = Endpoint::connect(fabric, &listener.local_addr(), Config::default());
        let took = started.elapsed();
        let Err(e) = outcome else {
            panic!("{scheme:?}: connected to a listener that never answered");
        };
        // The providers' own defaults are 5 s and more.
        assert!(
            took < Duration::from_secs(3),
            "{scheme:?}: gave up after {took:?} ({e}), not after the 300 ms connect timeout"
        );
        drop(listener);
    }
}
