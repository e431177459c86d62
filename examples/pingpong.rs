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
//! for `--mode push`, into a buffer the peer exposed for `--mode write`).
//! Bandwidth streams `--iters` messages one way and stops the clock when the
//! receiver confirms the last one; with `--zero-copy` the pushes go straight
//! from registered memory (no copy-in on the sending side).
//!
//! `--mode write` is the one-sided write: the receiver exposes `--window`
//! buffers and, each time a write lands in one, exposes it again and sends
//! its target back (24 bytes). Over shm, once the receiver granted that
//! memory (after the first write into it), the writer copies its data
//! straight into the receiver's buffer: one copy, on the writer's core.

use std::collections::VecDeque;
use std::ops::Deref;
use std::time::{Duration, Instant};

use chanio::messaging::mr::{Access, Buf, BufPool};
use chanio::messaging::provider::loopback::LoopbackFabric;
use chanio::messaging::provider::tcp::TcpFabric;
use chanio::messaging::provider::Fabric;
use chanio::messaging::units;
use chanio::messaging::{Config, Delivery, DirectPush, DirectTarget, Endpoint, FillError, ReceivedKind};
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
    /// One-sided RDMA Write with immediate into a buffer the peer exposed
    /// (up to 1 MiB); the peer exposes it again after each write and sends
    /// its target back. Over shm, once the peer granted the region, the
    /// writer copies its data straight into the peer's buffer (placement).
    Write,
}

/// Messaging ping-pong over a chanio channel: one-way latency and bandwidth.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  pingpong --transport tcp\n  pingpong --mode push --size 1MiB --iters 2000\n  \
pingpong --transport shm --mode write --size 1MiB --iters 3000\n  \
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
    /// Write mode: buffers the receiver exposes at once (writes in flight).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    window: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

const SEND_MAX: usize = 64 * 1024;
const PUSH_MAX: usize = 1024 * 1024;
const HELLO_LEN: usize = 17;

fn parse_size(text: &str) -> Result<usize, String> {
    let n = units::parse_size(text).map_err(|e| e.to_string())?;
    usize::try_from(n).map_err(|_| format!("{text:?} is too large"))
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
        Mode::Push | Mode::Write => PUSH_MAX,
    };
    if args.zero_copy && args.mode != Mode::Push {
        return Err("--zero-copy streams pushes: it needs --mode push".into());
    }
    if args.size == 0 || args.size > max {
        let mode = format!("{:?}", args.mode).to_lowercase();
        return Err(format!("--size must be 1..={max} bytes for --mode {mode}").into());
    }
    if args.window != 1 && args.mode != Mode::Write {
        return Err("--window sets how many buffers write mode exposes: it needs --mode write".into());
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
        let start = Instant::now();
        let ep = Endpoint::connect(&*fabric, addr, config())?;
        return client(args, &ep, start.elapsed());
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
        let start = Instant::now();
        let outcome = Endpoint::connect(&*fabric, &addr, config())
            .map_err(Into::into)
            .and_then(|ep| client(args, &ep, start.elapsed()));
        let served = server.join().map_err(|_| "server thread panicked")?;
        if let Err(e) = &served {
            eprintln!("pingpong: server side: {e}");
        }
        outcome.and(served)
    })
}

/// Marks a message that offers the peer a target to write into.
const OFFER: &[u8; 4] = b"OFR1";

/// How one side moves payloads: the mode and, in write mode, the buffers it
/// exposes to the peer and the targets the peer exposed to it.
struct Way {
    mode: Mode,
    /// Write mode: the registration behind the exposed buffers.
    _exposed: Option<BufPool>,
    targets: VecDeque<DirectTarget>,
    arrived: VecDeque<Got>,
}

/// A payload received: a delivery, or in write mode the exposed buffer the
/// peer wrote.
enum Got {
    Delivery(Delivery),
    Written(Buf),
}

impl Deref for Got {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Got::Delivery(d) => d,
            Got::Written(b) => b,
        }
    }
}

impl Way {
    /// In write mode, registers `window` buffers of `size` bytes and offers
    /// each to the peer.
    fn new(ep: &Endpoint, mode: Mode, size: usize, window: u32) -> Res<Way> {
        let mut way = Way {
            mode,
            _exposed: None,
            targets: VecDeque::new(),
            arrived: VecDeque::new(),
        };
        if mode == Mode::Write {
            let pool = ep
                .domain()
                .register(size, window as usize, Access::LOCAL_WRITE | Access::REMOTE_WRITE)?;
            while let Some(buf) = pool.checkout() {
                way.offer(ep, buf)?;
            }
            way._exposed = Some(pool);
        }
        Ok(way)
    }

    fn offer(&self, ep: &Endpoint, buf: Buf) -> Res<()> {
        let target = ep.expose(buf)?;
        ep.send(&[OFFER, &target.encode()[..]])?;
        Ok(())
    }

    /// Takes one delivery: a target the peer offers, or a payload.
    fn pump(&mut self, ep: &Endpoint) -> Res<()> {
        let d = ep.recv()?;
        if self.mode != Mode::Write {
            self.arrived.push_back(Got::Delivery(d));
        } else if matches!(d.kind(), ReceivedKind::Direct { .. }) {
            let buf = d.into_buf().map_err(|_| "a written buffer could not be kept")?;
            self.arrived.push_back(Got::Written(buf));
        } else if d.len() == OFFER.len() + DirectTarget::ENCODED_LEN && d.starts_with(OFFER) {
            let target = DirectTarget::decode(&d[OFFER.len()..]).ok_or("malformed write target from the peer")?;
            self.targets.push_back(target);
        } else {
            self.arrived.push_back(Got::Delivery(d));
        }
        Ok(())
    }

    /// The next payload (or, in write mode, message) from the peer.
    fn recv(&mut self, ep: &Endpoint) -> Res<Got> {
        loop {
            if let Some(got) = self.arrived.pop_front() {
                return Ok(got);
            }
            self.pump(ep)?;
        }
    }

    /// Gives a payload back: a written buffer is exposed to the peer again.
    fn release(&self, ep: &Endpoint, got: Got) -> Res<()> {
        match got {
            Got::Written(buf) => self.offer(ep, buf),
            Got::Delivery(_) => Ok(()),
        }
    }

    /// Sends one payload the chosen way. Send and push copy it once into
    /// registered memory (a send buffer or a push staging buffer), as an
    /// application whose data is not in registered memory must; a write
    /// copies it once into the peer's exposed buffer where the fabric
    /// places (shm, after the first write into it), else into a staging
    /// buffer that is pushed there.
    fn transmit(&mut self, ep: &Endpoint, data: &[u8]) -> Res<()> {
        match self.mode {
            Mode::Send => drop(ep.send(data)?),
            Mode::Push => drop(ep.push(data)?),
            Mode::Write => {
                let target = loop {
                    if let Some(t) = self.targets.pop_front() {
                        break t;
                    }
                    self.pump(ep)?;
                };
                let stand_in = ep.alloc_push_buf()?;
                let fill = |dest: &mut [u8]| {
                    dest.copy_from_slice(data);
                    Ok::<(), std::convert::Infallible>(())
                };
                // Nobody waits for the write itself: the receiver's next
                // target says it landed.
                match ep.push_direct_fill(stand_in, DirectPush::to(target), data.len(), fill) {
                    Ok(ticket) => ticket.detach(),
                    Err(FillError::Push(e)) => return Err(e.into()),
                    Err(FillError::Fill(never)) => match never {},
                }
            }
        }
        Ok(())
    }
}

fn mode_code(mode: Mode) -> u8 {
    match mode {
        Mode::Send => 0,
        Mode::Push => 1,
        Mode::Write => 2,
    }
}

/// Server: learns the run's shape from the client's hello, echoes the
/// latency phase, counts the bandwidth phase and confirms its end.
fn serve(ep: &Endpoint) -> Res<()> {
    let hello = ep.recv()?;
    if hello.len() != HELLO_LEN {
        return Err("malformed pingpong hello".into());
    }
    let mode = match hello[0] {
        0 => Mode::Send,
        1 => Mode::Push,
        2 => Mode::Write,
        m => return Err(format!("unknown mode {m} in the pingpong hello").into()),
    };
    let rounds = u32::from_le_bytes(hello[1..5].try_into()?);
    let stream = u32::from_le_bytes(hello[5..9].try_into()?);
    let size = u32::from_le_bytes(hello[9..13].try_into()?) as usize;
    let window = u32::from_le_bytes(hello[13..17].try_into()?);
    drop(hello);
    if size == 0 || size > PUSH_MAX || !(1..=64).contains(&window) {
        return Err("pingpong hello out of range".into());
    }
    let mut way = Way::new(ep, mode, size, window)?;
    for _ in 0..rounds {
        let got = way.recv(ep)?;
        way.transmit(ep, &got)?;
        way.release(ep, got)?;
    }
    let mut bytes = 0usize;
    for _ in 0..stream {
        let got = way.recv(ep)?;
        bytes += got.len();
        way.release(ep, got)?;
    }
    ep.send(&(bytes as u64).to_le_bytes())?.wait()?;
    // Wait for the client to finish reading before the channel goes away.
    let _ = ep.recv_timeout(Duration::from_secs(10));
    Ok(())
}

/// The client side; `connected` is how long `Endpoint::connect` took.
fn client(args: &Args, ep: &Endpoint, connected: Duration) -> Res<()> {
    let mut hello = [0u8; HELLO_LEN];
    hello[0] = mode_code(args.mode);
    hello[1..5].copy_from_slice(&(args.warmup + args.iters).to_le_bytes());
    hello[5..9].copy_from_slice(&args.iters.to_le_bytes());
    hello[9..13].copy_from_slice(&(args.size as u32).to_le_bytes());
    hello[13..17].copy_from_slice(&args.window.to_le_bytes());
    ep.send(&hello)?;
    let mut way = Way::new(ep, args.mode, args.size, 1)?;
    let data: Vec<u8> = (0..args.size).map(|i| i as u8).collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for i in 0..args.warmup + args.iters {
        let start = Instant::now();
        way.transmit(ep, &data)?;
        let echo = way.recv(ep)?;
        let rtt = start.elapsed();
        if echo.len() != data.len() {
            return Err(format!("echo of {} bytes for {}", echo.len(), data.len()).into());
        }
        if (i < args.warmup || i < 2) && *echo != data[..] {
            return Err("the echo differs from what was sent".into());
        }
        way.release(ep, echo)?;
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
            way.transmit(ep, &data)?;
        }
    }
    let confirm = way.recv(ep)?;
    let elapsed = start.elapsed();
    let counted = u64::from_le_bytes(confirm.get(..8).ok_or("short confirmation")?.try_into()?);
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
             \"one_way_us\":{{\"p50\":{:.3},\"p99\":{:.3},\"p999\":{:.3},\"mean\":{:.3}}},\"bandwidth_mbps\":{:.1},\
             \"connect_ms\":{:.3}}}",
            args.size,
            args.iters,
            us(0.5),
            us(0.99),
            us(0.999),
            hist.mean() / 1000.0,
            mbps,
            connected.as_secs_f64() * 1e3
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
        println!("connect:         {:.2} ms", connected.as_secs_f64() * 1e3);
    }
    Ok(())
}
