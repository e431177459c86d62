//! A small I/O benchmark: `queue_depth` commands kept in flight for a fixed
//! time by `threads` submitting threads (one by default, as a fio job), each
//! running its share of the commands as futures over the async API; latencies
//! go into an HDR histogram. With `window`, the I/Os are one-sided RDMA
//! Reads and Writes through one storage window over the namespace
//! ([`Host::open_window`]) instead of commands.
//!
//! ```no_run
//! use std::time::Duration;
//! use host::bench::{BenchConfig, Pattern};
//! # let host = host::Host::connect("127.0.0.1:4520", host::HostOptions::default())?;
//! let cfg = BenchConfig {
//!     nsid: host::Nsid(1),
//!     pattern: Pattern::RandRead,
//!     block_size: 4096,
//!     queue_depth: 32,
//!     threads: 1,
//!     duration: Duration::from_secs(10),
//!     window: false,
//! };
//! let report = host::bench::run(&host, &cfg, &|_, _| {})?;
//! println!("{:.0} IOPS", report.iops());
//! # Ok::<(), host::HostError>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nvme::Nsid;

use crate::{Host, HostError, IoBuf};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads (each thread its own stream).
    Read,
    /// Sequential writes.
    Write,
    /// Random mix of reads and writes, `read_percent` of them reads
    /// (`randrw` alone: half and half).
    RandRw {
        /// Share of reads, 0 to 100.
        read_percent: u8,
    },
}

impl Pattern {
    /// The name as `--rw` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRw { .. } => "randrw",
        }
    }

    /// Whether the I/O drawn with random number `r` writes. A mix looks
    /// at the high bits, unrelated to the block's (`r % slots`).
    fn writes(self, r: u64) -> bool {
        match self {
            Pattern::RandWrite | Pattern::Write => true,
            Pattern::RandRw { read_percent } => (r >> 32) % 100 >= u64::from(read_percent),
            Pattern::RandRead | Pattern::Read => false,
        }
    }

    fn random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw { .. })
    }
}

/// A pattern name [`Pattern`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pattern {0:?} (randread, randwrite, read, write, randrw)")]
pub struct UnknownPattern(pub String);

impl FromStr for Pattern {
    type Err = UnknownPattern;
    fn from_str(s: &str) -> Result<Pattern, UnknownPattern> {
        Ok(match s {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "randrw" => Pattern::RandRw { read_percent: 50 },
            _ => return Err(UnknownPattern(s.into())),
        })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Namespace.
    pub nsid: Nsid,
    /// Access pattern.
    pub pattern: Pattern,
    /// Bytes per I/O: a whole number of blocks.
    pub block_size: usize,
    /// I/Os kept in flight.
    pub queue_depth: usize,
    /// Submitting threads (at most `queue_depth`); the I/Os in flight are
    /// shared out among them.
    pub threads: usize,
    /// How long to run.
    pub duration: Duration,
    /// Read and write through a storage window over the namespace (its
    /// first 2^32 - 1 blocks at most) instead of with commands; writes are
    /// not committed (in memory at the I/O unit, not promised durable).
    pub window: bool,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// I/Os completed.
    pub ios: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Mean latency in microseconds (recorded in nanoseconds).
    pub mean_us: f64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// 99.9th percentile latency in microseconds.
    pub p999_us: f64,
    /// Largest latency in microseconds.
    pub max_us: f64,
}

impl BenchReport {
    /// I/Os per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Megabytes (10^6 bytes) per second.
    pub fn bandwidth_mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One JSON object:
    /// `{"iops":..,"bandwidth_mbps":..,"latency_us":{"mean":..,"p50":..,"p99":..,"p999":..}}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"iops\":{:.1},\"bandwidth_mbps\":{:.3},\"latency_us\":{{\"mean\":{:.2},\"p50\":{:.2},\"p99\":{:.2},\"p999\":{:.2}}}}}",
            self.iops(),
            self.bandwidth_mbps(),
            self.mean_us,
            self.p50_us,
            self.p99_us,
            self.p999_us
        )
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} I/Os in {:.2}s: {:.0} IOPS, {:.1} MB/s",
            self.ios,
            self.elapsed.as_secs_f64(),
            self.iops(),
            self.bandwidth_mbps()
        )?;
        write!(
            f,
            "latency (us): mean {:.1}, p50 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
            self.mean_us, self.p50_us, self.p99_us, self.p999_us, self.max_us
        )
    }
}

/// Runs the benchmark. `progress(elapsed, ios)` is called about five times
/// a second from the calling thread.
///
/// # Errors
/// [`HostError::InvalidArgument`] for a bad configuration; the first I/O
/// error stops the run and is returned.
//
// Long: the workload's set-up, its submitting threads and the report read
// best in one place.
pub fn run(host: &Host, cfg: &BenchConfig, progress: &dyn Fn(Duration, u64)) -> Result<BenchReport, HostError> {
    let ns = host
        .namespaces()?
        .into_iter()
        .find(|n| n.nsid == cfg.nsid)
        .ok_or_else(|| HostError::InvalidArgument(format!("namespace {} is not active", cfg.nsid.0)))?;
    let bs = ns.block_size as usize;
    if cfg.block_size == 0 || cfg.block_size % bs != 0 {
        return Err(HostError::InvalidArgument(format!(
            "I/O size {} is not a whole number of {bs}-byte blocks",
            cfg.block_size
        )));
    }
    if cfg.queue_depth == 0 || cfg.queue_depth > 1024 {
        return Err(HostError::InvalidArgument(format!(
            "queue depth {} is outside 1..=1024",
            cfg.queue_depth
        )));
    }
    let blocks_per_io = (cfg.block_size / bs) as u64;
    if blocks_per_io > ns.blocks {
        return Err(HostError::InvalidArgument(format!(
            "I/O size {} exceeds the namespace ({} blocks)",
            cfg.block_size, ns.blocks
        )));
    }
    let threads = cfg.threads.clamp(1, cfg.queue_depth);
    let window = match cfg.window {
        true => {
            let blocks = u32::try_from(ns.blocks).unwrap_or(u32::MAX);
            let writes = !matches!(cfg.pattern, Pattern::RandRead | Pattern::Read);
            Some(host.open_window(cfg.nsid, 0, blocks, writes)?)
        }
        false => None,
    };
    let window = window.as_ref();
    let span = match window {
        Some(w) => w.len() / bs as u64,
        None => ns.blocks,
    };
    let slots = span / blocks_per_io;
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    // Thread t runs streams t, t + threads, t + 2 * threads, ..., each with
    // its own registered buffer, registered before the clock starts (on a
    // slow machine registering takes long enough to eat a short run).
    let mut streams: Vec<Vec<(u64, IoBuf)>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..cfg.queue_depth {
        let mut buf = host.alloc(cfg.block_size)?;
        for (k, b) in buf.iter_mut().enumerate() {
            *b = (k as u64 ^ i as u64) as u8;
        }
        streams[i % threads].push((i as u64, buf));
    }
    let start = Instant::now();
    let end = start + cfg.duration;
    let results: Vec<Result<Histogram<u64>, HostError>> = std::thread::scope(|s| {
        let workers: Vec<_> = streams
            .into_iter()
            .map(|streams| {
                let (done, stop) = (&done, &stop);
                s.spawn(move || {
                    let runs = streams
                        .into_iter()
                        .map(|(i, buf)| {
                            let target = Target { host, window, bs };
                            worker(target, cfg, i, buf, slots, blocks_per_io, end, done, stop)
                        })
                        .collect();
                    let mut hist = new_histogram()?;
                    for h in crate::exec::block_on(crate::exec::join_all(runs)) {
                        hist.add(&h?)
                            .map_err(|e| HostError::InvalidArgument(format!("histogram: {e}")))?;
                    }
                    Ok(hist)
                })
            })
            .collect();
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200).min(end.saturating_duration_since(Instant::now())));
            progress(start.elapsed(), done.load(Ordering::Relaxed));
        }
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(HostError::Protocol("a benchmark thread panicked".into())))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut hist = new_histogram()?;
    for r in results {
        let h = r?;
        hist.add(&h)
            .map_err(|e| HostError::InvalidArgument(format!("histogram: {e}")))?;
    }
    let ios = hist.len();
    Ok(BenchReport {
        ios,
        bytes: ios * cfg.block_size as u64,
        elapsed,
        mean_us: hist.mean() / 1e3,
        p50_us: hist.value_at_quantile(0.5) as f64 / 1e3,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1e3,
        p999_us: hist.value_at_quantile(0.999) as f64 / 1e3,
        max_us: hist.max() as f64 / 1e3,
    })
}

/// Where a stream's I/Os go: commands to the host, or a window.
#[derive(Clone, Copy)]
struct Target<'a> {
    host: &'a Host,
    window: Option<&'a crate::Window>,
    bs: usize,
}

/// One stream of I/Os, one in flight at a time.
#[allow(clippy::too_many_arguments)]
async fn worker(
    target: Target<'_>,
    cfg: &BenchConfig,
    index: u64,
    mut buf: IoBuf,
    slots: u64,
    blocks_per_io: u64,
    end: Instant,
    done: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Histogram<u64>, HostError> {
    let mut hist = new_histogram()?;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (index + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut next_seq = index * (slots / cfg.queue_depth as u64).max(1) % slots;
    // The end of one I/O is the loop's clock for the next check, and the
    // start of the next: nothing but choosing its block runs in between (no
    // await), so one clock read per I/O does (the few nanoseconds of
    // choosing count as latency). Every stream does at least one I/O, even
    // when its thread first ran after the end (a loaded machine): a run
    // always measures something.
    let mut now = Instant::now();
    let mut first = true;
    while first || (now < end && !stop.load(Ordering::Relaxed)) {
        first = false;
        let r = xorshift(&mut rng);
        let slot = if cfg.pattern.random() {
            r % slots
        } else {
            let s = next_seq;
            next_seq = (next_seq + 1) % slots;
            s
        };
        let lba = slot * blocks_per_io;
        let write = cfg.pattern.writes(r);
        let t0 = now;
        let result = match (target.window, write) {
            (Some(w), true) => w.write_at_async(lba * target.bs as u64, &mut buf).await,
            (Some(w), false) => w.read_at_async(lba * target.bs as u64, &mut buf).await,
            (None, true) => target.host.write_from_async(cfg.nsid, lba, &mut buf, false).await,
            (None, false) => target.host.read_into_async(cfg.nsid, lba, &mut buf).await,
        };
        if let Err(e) = result {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
        now = Instant::now();
        let ns = u64::try_from(now.duration_since(t0).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        hist.saturating_record(ns);
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(hist)
}

fn new_histogram() -> Result<Histogram<u64>, HostError> {
    // Nanoseconds, up to a minute, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| HostError::InvalidArgument(format!("histogram: {e}")))
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse() {
        for p in [
            Pattern::RandRead,
            Pattern::RandWrite,
            Pattern::Read,
            Pattern::Write,
            Pattern::RandRw { read_percent: 50 },
        ] {
            assert_eq!(p.name().parse::<Pattern>(), Ok(p));
        }
        assert!("sideways".parse::<Pattern>().is_err());
    }

    #[test]
    fn a_mix_reads_its_share() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let draws: Vec<u64> = (0..20_000).map(|_| xorshift(&mut rng)).collect();
        let writes = |read_percent| {
            let p = Pattern::RandRw { read_percent };
            draws.iter().filter(|&&r| p.writes(r)).count()
        };
        assert_eq!(writes(100), 0);
        assert_eq!(writes(0), draws.len());
        let w = writes(70) as f64 / draws.len() as f64;
        assert!((0.28..0.32).contains(&w), "70/30 mix wrote {w:.3} of the I/Os");
        assert!(!Pattern::RandRead.writes(u64::MAX) && Pattern::Write.writes(0));
    }

    #[test]
    fn json_shape() {
        let r = BenchReport {
            ios: 1000,
            bytes: 4_096_000,
            elapsed: Duration::from_secs(1),
            mean_us: 12.5,
            p50_us: 10.0,
            p99_us: 40.25,
            p999_us: 90.0,
            max_us: 100.0,
        };
        assert_eq!(
            r.to_json(),
            "{\"iops\":1000.0,\"bandwidth_mbps\":4.096,\"latency_us\":{\"mean\":12.50,\"p50\":10.00,\"p99\":40.25,\"p999\":90.00}}"
        );
        assert!(r.to_string().contains("1000 IOPS"));
    }
}
