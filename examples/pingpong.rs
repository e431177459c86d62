//! Messaging ping-pong: one-way latency and bandwidth of a chanio channel.
//!
//! By default one command runs both ends (server on a thread):
//!
//! ```text
//! cargo run --release --example pingpong -- --transport tcp
//! cargo run --release --features verbs --example pingpong -- --transport verbs
//! cargo run --release --example pingpong -- --mode push --size 1MiB --iters 2000
//! ```
//!
//! Or as two processes:
//!
//! ```text
//! cargo run --release --example pingpong -- --listen 127.0.0.1:4521
//! cargo run --release --example pingpong -- --connect 127.0.0.1:4521 --size 4KiB
//! ```
//!
//! Latency is half the round trip of a message echoed back the same way
//! (Send for `--mode send`, RDMA Write with immediate into a granted slot
//! for `--mode push`). Bandwidth streams `--iters` messages one way and
//! stops the clock when the receiver confirms the last one; with
//! `--zero-copy` the pushes go straight from registered memory (the
//! one-sided write alone, no copy-in on the sending side).

use std::time::{Duration, Instant};

use chanio::messaging::provider::loopback::LoopbackFabric;
use chanio::messaging::provider::tcp::TcpFabric;
use chanio::messaging::provider::Fabric;
use chanio::messaging::{Config, Endpoint};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// TCP with RDMA semantics emulated (runs everywhere).
    Tcp,
    /// In-process loopback (both ends in this process only).
    Loopback,
    /// Shared memory between processes of one host (`--listen NAME`).
    Shm,
    /// RDMA verbs (NIC or soft-RoCE; needs `--features verbs`, and
    /// CHANIO_VERBS_DEVICE to pick a device).
    Verbs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Two-sided Send into pre-posted receive buffers (up to 64 KiB).
    Send,
    /// RDMA Write with immediate into slots the peer granted (up to 1 MiB).
    Push,
}

/// Messaging ping-pong over a chanio channel: one-way latency and bandwidth.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  pingpong --transport tcp\n  pingpong --mode push --size 1MiB --iters 2000\n  \
pingpong --listen 127.0.0.1:4521   (then, elsewhere)   pingpong --connect 127.0.0.1:4521"
)]
struct Args {
    /// Fabric provider.
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    /// Run only the server, listening here (e.g. 127.0.0.1:4521).
    #[arg(long, conflicts_with = "connect")]
    listen: Option<String>,
    /// Run only the client, connecting here.
    #[arg(long)]
    connect: Option<String>,
    /// Message size, e.g. 8, 4KiB, 1MiB.
    #[arg(long, default_value = "8", value_parser = parse_size)]
    size: usize,
    /// Round trips measured (and messages streamed for bandwidth).
    #[arg(long, default_value_t = 10_000)]
    iters: u32,
    /// Round trips before measuring.
    #[arg(long, default_value_t = 1_000)]
    warmup: u32,
    /// How messages travel.
    #[arg(long, value_enum, default_value_t = Mode::Send)]
    mode: Mode,
    /// Push mode: stream from registered memory filled once (a one-sided
    /// write, zero-copy on the sending side), instead of copying each
    /// payload into a staging buffer first.
    #[arg(long)]
    zero_copy: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

const SEND_MAX: usize = 64 * 1024;
const PUSH_MAX: usize = 1024 * 1024;
const HELLO_LEN: usize = 13;

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 8, 4KiB, 1MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        other => return Err(format!("unknown unit {other:?} (use B, KiB or MiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

fn config() -> Config {
    Config {
        recv_depth: 64,
        send_depth: 128,
        msg_size: SEND_MAX as u32,
        slot_size: PUSH_MAX as u32,
        slot_count: 16,
        separate_indication: false,
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("pingpong: {e}");
        let mut source = std::error::Error::source(&*e);
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(1);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[cfg(feature = "verbs")]
fn verbs_fabric() -> Res<Box<dyn Fabric>> {
    Ok(Box::new(chanio::messaging::provider::verbs::VerbsFabric::new()?))
}

#[cfg(not(feature = "verbs"))]
fn verbs_fabric() -> Res<Box<dyn Fabric>> {
    Err("this pingpong was built without the verbs provider: run it with \
         `cargo run --release --features verbs --example pingpong -- --transport verbs`"
        .into())
}

fn run(args: &Args) -> Res<()> {
    let max = match args.mode {
        Mode::Send => SEND_MAX,
        Mode::Push => PUSH_MAX,
    };
    if args.zero_copy && args.mode != Mode::Push {
        return Err("--zero-copy streams pushes: it needs --mode push".into());
    }
    if args.size == 0 || args.size > max {
        return Err(format!("--size must be 1..={max} bytes for --mode {:?}", args.mode).into());
    }
    if args.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    let fabric: Box<dyn Fabric> = match args.transport {
        Transport::Tcp => Box::new(TcpFabric::new()),
        Transport::Loopback => {
            if args.listen.is_some() || args.connect.is_some() {
                return Err("the loopback transport runs both ends in one process: drop --listen/--connect".into());
            }
            Box::new(LoopbackFabric::new())
        }
        Transport::Shm => Box::new(chanio::messaging::provider::shm::ShmFabric::new()),
        Transport::Verbs => verbs_fabric()?,
    };
    if let Some(addr) = &args.listen {
        let listener = fabric.listen(addr)?;
        eprintln!("listening on {}", listener.local_addr());
        loop {
            match Endpoint::accept(&*fabric, &*listener, config(), None) {
                Ok(ep) => {
                    if let Err(e) = serve(&ep) {
                        eprintln!("pingpong: client {}: {e}", ep.peer_addr());
                    }
                }
                Err(e) => eprintln!("pingpong: refused a client: {e}"),
            }
        }
    }
    if let Some(addr) = &args.connect {
        let ep = Endpoint::connect(&*fabric, addr, config())?;
        return client(args, &ep);
    }
    let listener = fabric.listen(match args.transport {
        Transport::Tcp | Transport::Verbs => "127.0.0.1:0",
        Transport::Loopback | Transport::Shm => "",
    })?;
    let addr = listener.local_addr();
    std::thread::scope(|s| {
        let server = s.spawn(|| -> Res<()> {
            let ep = Endpoint::accept(&*fabric, &*listener, config(), Some(Duration::from_secs(30)))?;
            serve(&ep)
        });
        let outcome = Endpoint::connect(&*fabric, &addr, config())
            .map_err(Into::into)
            .and_then(|ep| client(args, &ep));
        let served = server.join().map_err(|_| "server thread panicked")?;
        if let Err(e) = &served {
            eprintln!("pingpong: server side: {e}");
        }
        outcome.and(served)
    })
}

/// Sends one payload the chosen way. Both ways copy it once into registered
/// memory (a send buffer or a push staging buffer), as an application whose
/// data is not in registered memory must.
fn transmit(ep: &Endpoint, mode: Mode, data: &[u8]) -> Res<()> {
    match mode {
        Mode::Send => drop(ep.send(data)?),
        Mode::Push => drop(ep.push(data)?),
    }
    Ok(())
}

/// Server: learns the run's shape from the client's hello, echoes the
/// latency phase, counts the bandwidth phase and confirms its end.
fn serve(ep: &Endpoint) -> Res<()> {
    let hello = ep.recv()?;
    if hello.len() != HELLO_LEN {
        return Err("malformed pingpong hello".into());
    }
    let mode = if hello[0] == 1 { Mode::Push } else { Mode::Send };
    let rounds = u32::from_le_bytes(hello[1..5].try_into()?);
    let stream = u32::from_le_bytes(hello[5..9].try_into()?);
    drop(hello);
    for _ in 0..rounds {
        let d = ep.recv()?;
        transmit(ep, mode, &d)?;
    }
    let mut bytes = 0usize;
    for _ in 0..stream {
        bytes += ep.recv()?.len();
    }
    ep.send(&(bytes as u64).to_le_bytes())?.wait()?;
    // Wait for the client to finish reading before the channel goes away.
    let _ = ep.recv_timeout(Duration::from_secs(10));
    Ok(())
}

fn client(args: &Args, ep: &Endpoint) -> Res<()> {
    let mut hello = [0u8; HELLO_LEN];
    hello[0] = u8::from(args.mode == Mode::Push);
    hello[1..5].copy_from_slice(&(args.warmup + args.iters).to_le_bytes());
    hello[5..9].copy_from_slice(&args.iters.to_le_bytes());
    ep.send(&hello)?;
    let data: Vec<u8> = (0..args.size).map(|i| i as u8).collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for i in 0..args.warmup + args.iters {
        let start = Instant::now();
        transmit(ep, args.mode, &data)?;
        let echo = ep.recv()?;
        let rtt = start.elapsed();
        if echo.len() != data.len() {
            return Err(format!("echo of {} bytes for {}", echo.len(), data.len()).into());
        }
        if i >= args.warmup {
            hist.record((rtt.as_nanos() / 2).max(1) as u64)?;
        }
    }
    let start = Instant::now();
    for _ in 0..args.iters {
        if args.zero_copy {
            // The staging buffers were filled by the latency phase: only
            // the length is set, no byte is copied on this side.
            let mut buf = ep.alloc_push_buf()?;
            buf.set_len(data.len());
            drop(ep.push_buf(buf)?);
        } else {
            transmit(ep, args.mode, &data)?;
        }
    }
    let confirm = ep.recv()?;
    let elapsed = start.elapsed();
    let counted = u64::from_le_bytes(confirm[..8].try_into()?);
    let expected = args.size as u64 * u64::from(args.iters);
    if counted != expected {
        return Err(format!("receiver counted {counted} bytes, expected {expected}").into());
    }
    drop(confirm);
    ep.send(b"done")?.wait()?;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let mbps = expected as f64 / elapsed.as_secs_f64() / 1e6;
    let transport = format!("{:?}", args.transport).to_lowercase();
    let mode = format!("{:?}", args.mode).to_lowercase();
    if args.json {
        println!(
            "{{\"transport\":\"{transport}\",\"mode\":\"{mode}\",\"size\":{},\"iters\":{},\
             \"one_way_us\":{{\"p50\":{:.3},\"p99\":{:.3},\"p999\":{:.3},\"mean\":{:.3}}},\"bandwidth_mbps\":{:.1}}}",
            args.size,
            args.iters,
            us(0.5),
            us(0.99),
            us(0.999),
            hist.mean() / 1000.0,
            mbps
        );
    } else {
        println!(
            "chanio pingpong: transport={transport} mode={mode} size={} B iters={}",
            args.size, args.iters
        );
        println!(
            "one-way latency: p50 {:.2} us  p99 {:.2} us  p99.9 {:.2} us  (RTT/2 over {} round trips)",
            us(0.5),
            us(0.99),
            us(0.999),
            args.iters
        );
        println!(
            "bandwidth:       {mbps:.1} MB/s  ({} x {} B one way in {:.3} s)",
            args.iters,
            args.size,
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
