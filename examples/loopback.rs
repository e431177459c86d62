//! The storage demo: an I/O unit and a host in one program.
//!
//! ```text
//! cargo run --release --example loopback
//! cargo run --release --example loopback -- --size 64MiB --io-size 128KiB
//! ```
//!
//! It starts an I/O unit serving a RAM namespace on 127.0.0.1, connects a
//! host to it over the chosen transport, writes a pattern over the first
//! `--data` bytes, reads it back and verifies every byte, then measures
//! 4 KiB reads and writes at queue depth 1 over those bytes and prints a
//! table.

use std::time::Instant;

use chanio::host::{Host, HostOptions};
use chanio::iounit::target::{Target, TargetConfig};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// TCP with RDMA semantics emulated (runs everywhere).
    Tcp,
    /// Shared memory (both ends are on this host).
    Shm,
    /// The best fabric both ends have (verbs, shm, then tcp).
    Auto,
    /// RDMA through the verbs provider (build with `--features verbs`).
    Rdma,
}

impl Transport {
    fn listen_uri(self) -> String {
        match self {
            Transport::Tcp => "tcp://127.0.0.1:0".into(),
            Transport::Shm => format!("shm://chanio-demo-{}", std::process::id()),
            Transport::Auto => "auto://127.0.0.1:0".into(),
            Transport::Rdma => "rdma://127.0.0.1:0".into(),
        }
    }
}

/// Storage demo: an I/O unit with a RAM namespace and a host, in one process.
#[derive(Debug, Parser)]
struct Args {
    /// Fabric between host and I/O unit.
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    /// Size of the RAM namespace, e.g. 64MiB.
    #[arg(long, default_value = "64MiB")]
    size: String,
    /// How much to write and verify, e.g. 16MiB.
    #[arg(long, default_value = "16MiB")]
    data: String,
    /// Size of each write and read while verifying.
    #[arg(long, default_value = "128KiB")]
    io_size: String,
    /// 4 KiB operations timed for the latency table.
    #[arg(long, default_value_t = 5000)]
    ops: u32,
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("loopback: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(1);
    }
}

fn size(text: &str, what: &str) -> Res<u64> {
    chanio::messaging::units::parse_size(text).map_err(|e| format!("--{what}: {e}").into())
}

fn run(args: Args) -> Res<()> {
    let ns_size = size(&args.size, "size")?;
    let data_len = size(&args.data, "data")?.min(ns_size);
    let io_size = size(&args.io_size, "io-size")?;
    if io_size == 0 || io_size % 512 != 0 || io_size > 512 * 1024 {
        return Err("--io-size must be a multiple of 512 bytes, at most 512KiB".into());
    }
    let spec: chanio::iounit::backend::BackendSpec = format!("ram:{ns_size}").parse()?;
    let target = Target::start(TargetConfig {
        listen: vec![args.transport.listen_uri()],
        namespaces: vec![spec],
        ..TargetConfig::default()
    })?;
    let uri = target.local_uris().remove(0);
    let host = Host::connect(&uri, HostOptions::default())?;
    let ns = host
        .namespaces()?
        .into_iter()
        .next()
        .ok_or("the I/O unit serves no namespace")?;
    let bs = u64::from(ns.block_size);
    println!(
        "I/O unit at {uri} ({}), {}: {} blocks of {bs} B",
        host.transport(),
        ns.nsid,
        ns.blocks
    );

    // Write a pattern, read it back, verify.
    let started = Instant::now();
    let mut offset = 0u64;
    while offset < data_len {
        let len = io_size.min(data_len - offset);
        host.write(ns.nsid, offset / bs, &pattern(offset, len as usize), false)?;
        offset += len;
    }
    host.flush(ns.nsid)?;
    let wrote = started.elapsed();
    let started = Instant::now();
    let mut offset = 0u64;
    while offset < data_len {
        let len = io_size.min(data_len - offset);
        let back = host.read(ns.nsid, offset / bs, u32::try_from(len / bs)?)?;
        if back != pattern(offset, len as usize) {
            return Err(format!("verification failed at byte {offset}").into());
        }
        offset += len;
    }
    let read = started.elapsed();
    println!(
        "wrote and verified {} MiB in {} KiB I/Os: write {:.0} MB/s, read+verify {:.0} MB/s",
        data_len >> 20,
        io_size >> 10,
        data_len as f64 / wrote.as_secs_f64() / 1e6,
        data_len as f64 / read.as_secs_f64() / 1e6
    );

    // Latency of 4 KiB I/O at queue depth 1, over the range written above:
    // the I/O unit's memory there is in place, so the table shows the
    // channel and the namespace, not the first touch of fresh pages (a RAM
    // namespace is allocated lazily, and on a VM a first-touched 2 MiB page
    // can take milliseconds).
    let blocks4k = 4096 / bs;
    let span = (data_len.min(ns.blocks * bs) / 4096).max(1);
    let block = vec![0x5au8; 4096];
    let mut rows = Vec::new();
    for write in [false, true] {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let started = Instant::now();
        for i in 0..args.ops {
            let lba = (u64::from(i).wrapping_mul(2_654_435_761) % span) * blocks4k;
            let t = Instant::now();
            if write {
                host.write(ns.nsid, lba, &block, false)?;
            } else {
                host.read(ns.nsid, lba, u32::try_from(blocks4k)?)?;
            }
            hist.record(t.elapsed().as_micros().max(1) as u64)?;
        }
        rows.push((
            if write { "4 KiB write, QD1" } else { "4 KiB read, QD1" },
            hist,
            started.elapsed(),
        ));
    }
    println!();
    println!(
        "{:<18} {:>9} {:>10} {:>10} {:>10}",
        "workload", "IOPS", "p50 us", "p99 us", "p99.9 us"
    );
    for (name, hist, took) in &rows {
        println!(
            "{name:<18} {:>9.0} {:>10} {:>10} {:>10}",
            f64::from(args.ops) / took.as_secs_f64(),
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99),
            hist.value_at_quantile(0.999)
        );
    }
    host.close();
    target.shutdown();
    Ok(())
}

/// The byte at absolute offset `at` of the demo pattern.
fn pattern(at: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = at + i;
            (x ^ (x >> 9) ^ (x >> 17)) as u8
        })
        .collect()
}
