//! Replays the fuzzing corpus (`fuzz/corpus/TARGET/*`, kept from the
//! cargo-afl runs, see `fuzz/README.md`) through the same entry points the
//! fuzzer drives: every input that ever found a new path, and every crash
//! fixed since (`fuzz/corpus/TARGET/crash-*`), must decode without a panic.

use std::path::Path;

type Target = fn(&[u8]);

fn targets() -> Vec<(&'static str, Target)> {
    vec![
        ("tcp", chanio::messaging::fuzz::tcp),
        ("shm", chanio::messaging::fuzz::shm),
        ("wire", chanio::messaging::fuzz::wire),
        ("capsule", chanio::iounit::fuzz::capsule),
        ("host_data", chanio::iounit::fuzz::host_data),
        ("nbd", chanio::host::nbd::fuzz),
    ]
}

#[test]
fn every_kept_input_decodes_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, run) in targets() {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut replayed = 0;
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} panicked on {}", name, path.display());
            replayed += 1;
        }
        // A target whose corpus went missing would pass by testing nothing.
        assert!(replayed >= 5, "{name}: only {replayed} inputs in {}", dir.display());
    }
}
