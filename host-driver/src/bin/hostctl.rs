//! `hostctl`: reach NVMe namespaces on a chanio I/O unit from the command
//! line. Parses arguments and calls the `host` library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use host::bench::{BenchConfig, Pattern};
use host::describe::{Bytes, ControllerSummary, NamespaceSummary};
use host::messaging::units;
use host::{Host, HostEvent, HostOptions, Nsid};

const EXAMPLES: &str = "\
Examples:
  # Start an I/O unit with a 64 MiB RAM namespace, then look at it:
  iounitd --listen tcp://127.0.0.1:4520 --ns ram:64MiB
  hostctl --target tcp://127.0.0.1:4520 list
  hostctl --target 127.0.0.1:4520 identify
  hostctl --target 127.0.0.1:4520 identify --ns 1

  # Write a file at LBA 0 (padding the last block), read it back:
  hostctl --target 127.0.0.1:4520 write --ns 1 --lba 0 --input notes.txt --pad
  hostctl --target 127.0.0.1:4520 read --ns 1 --lba 0 --blocks 8 --output back.bin

  # Pipe data through stdin and stdout:
  head -c 4096 /dev/urandom | hostctl --target 127.0.0.1:4520 write --ns 1 --lba 100
  hostctl --target 127.0.0.1:4520 read --ns 1 --lba 100 --blocks 8 | xxd | head

  # Measure 4 KiB random reads with 32 in flight for 10 seconds:
  hostctl --target 127.0.0.1:4520 bench --ns 1 --rw randread --bs 4k --qd 32 --time 10s
  hostctl --target 127.0.0.1:4520 bench --ns 1 --rw randwrite --bs 64k --qd 8 --time 5s --json

  # Machine-readable results (and failures, on stderr):
  hostctl --target 127.0.0.1:4520 --json list
  hostctl --target 127.0.0.1:4520 --json identify --ns 1

  # A storage window over 64 blocks of a RAM namespace: data moves by
  # one-sided RDMA, without a command per access; a write is committed:
  hostctl --target 127.0.0.1:4520 window info --ns 1 --lba 0 --blocks 64
  head -c 8192 /dev/urandom | hostctl --target 127.0.0.1:4520 window write --ns 1 --lba 0 --blocks 64
  hostctl --target 127.0.0.1:4520 window read --ns 1 --lba 0 --blocks 64 --offset 100 --len 16 | xxd

  # Print namespace changes as namespaces are attached or detached:
  hostctl --target 127.0.0.1:4520 watch --count 1 --timeout 60s

  # Serve the namespaces over NBD (export names are the namespace IDs),
  # then use them with the usual tools:
  hostctl --target 127.0.0.1:4520 --queues 4 serve-nbd --listen 127.0.0.1:10809
  nbdinfo --list nbd://127.0.0.1:10809
  qemu-img convert -O raw nbd://127.0.0.1:10809/1 copy.img
  hostctl --target 127.0.0.1:4520 serve-nbd --listen unix:/run/chanio-nbd.sock --read-only

Logs go to stderr; set RUST_LOG=debug for more.

Exit status:
  0  success
  1  any other failure (a local file, a malformed answer, ...)
  2  usage error: bad arguments or options, refused before connecting
  3  the I/O unit could not be reached, or the connection was lost or
     timed out
  4  the I/O unit completed a command with an NVMe error status (printed
     in words)
With --json a failure is one JSON object on stderr: error, causes,
exit_status, and nvme_status (sct, sc, text) for status 4.";

/// Exit statuses, as `--help` documents them.
const EXIT_OTHER: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CONNECTION: u8 = 3;
const EXIT_NVME: u8 = 4;

/// The exit status for `e` (see [`EXAMPLES`], "Exit status").
fn exit_status(e: &(dyn std::error::Error + 'static)) -> u8 {
    if e.is::<UsageError>() {
        return EXIT_USAGE;
    }
    match e.downcast_ref::<host::HostError>() {
        Some(host::HostError::Nvme { .. }) => EXIT_NVME,
        Some(host::HostError::InvalidUri { .. } | host::HostError::InvalidArgument(_)) => EXIT_USAGE,
        Some(
            host::HostError::Connect { .. }
            | host::HostError::ConnectionLost { .. }
            | host::HostError::Timeout { .. }
            | host::HostError::WindowClosed(_)
            | host::HostError::Messaging(_),
        ) => EXIT_CONNECTION,
        _ => EXIT_OTHER,
    }
}

/// Arguments refused before anything is sent.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Read and write NVMe namespaces on a chanio I/O unit.
#[derive(Debug, Parser)]
#[command(name = "hostctl", version, after_help = EXAMPLES)]
struct Cli {
    /// The I/O unit: tcp://HOST:PORT, rdma://HOST:PORT, shm://NAME, or auto://HOST:PORT (also plain HOST:PORT: the best transport both ends have). Alternates may follow, comma-separated, with the same transport (tcp://A:4520,B:4520): the other members of a replicated namespace, to which the host fails over, re-issuing its commands, when the connection is lost.
    #[arg(long, short = 't', value_name = "URI")]
    target: String,
    /// Transport to use, replacing the scheme of --target: tcp, rdma, shm or auto.
    #[arg(long, value_name = "NAME", value_parser = ["tcp", "rdma", "shm", "auto"])]
    transport: Option<String>,
    /// This host's NQN (default: /etc/nvme/hostnqn, as nvme-cli keeps it;
    /// without it, one derived from the hostname).
    #[arg(long, value_name = "NQN")]
    hostnqn: Option<String>,
    /// The subsystem NQN to connect to.
    #[arg(long, value_name = "NQN")]
    subnqn: Option<String>,
    /// Per-command timeout, e.g. 30s, 500ms, 2m.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = units::parse_duration)]
    timeout: Duration,
    /// I/O queues to ask for.
    #[arg(long, value_name = "N", default_value_t = 1)]
    queues: u16,
    /// Print results as JSON on stdout (one object, or one per line for
    /// watch and serve-nbd), and a failure as a JSON object on stderr.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List namespaces (ID, size, block size) and the transport in use.
    List,
    /// Show Identify Controller, or Identify Namespace with --ns.
    Identify {
        /// Namespace to identify instead of the controller.
        #[arg(long, value_name = "NSID")]
        ns: Option<u32>,
    },
    /// One look at the connection and the I/O unit: transport, controller,
    /// queues, namespaces, the SMART counters, and where the I/O unit
    /// replicates namespaces, each one's role, in-sync set, replicas and
    /// resync progress.
    Status,
    /// Show the SMART / Health log: data read and written, commands, errors,
    /// hours powered on (as nvme-cli's smart-log).
    SmartLog,
    /// Read blocks to stdout or a file (raw bytes).
    Read {
        #[command(flatten)]
        at: BlockRange,
        /// Write the data here instead of stdout.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Write stdin or a file at an LBA; its length must be whole blocks.
    Write {
        #[command(flatten)]
        at: Lba,
        /// Read the data from here instead of stdin.
        #[arg(long, short = 'i', value_name = "FILE")]
        input: Option<PathBuf>,
        /// Zero-pad the last block instead of refusing a partial block.
        #[arg(long)]
        pad: bool,
        /// Force Unit Access: durable before it completes.
        #[arg(long)]
        fua: bool,
    },
    /// Flush the namespace's volatile write cache.
    Flush {
        /// Namespace ID.
        #[arg(long, value_name = "NSID")]
        ns: u32,
    },
    /// Deallocate (trim) blocks.
    Trim {
        #[command(flatten)]
        at: BlockRange,
    },
    /// Write zeroes to blocks.
    WriteZeroes {
        #[command(flatten)]
        at: BlockRange,
    },
    /// Try a storage window: open one over --blocks blocks of a namespace
    /// from --lba, then print it (info), read from it (to stdout or
    /// --output) or write to it (from stdin or --input, then commit), and
    /// close it. The data moves by one-sided RDMA Reads and Writes that the
    /// I/O unit's command threads take no part in (over shm, to a daemon of
    /// this user, by copies into memory it shares). RAM and file namespaces
    /// can be windowed.
    Window(WindowArgs),
    /// Measure IOPS, bandwidth and latency.
    Bench(BenchArgs),
    /// Serve the namespaces over NBD until SIGINT or SIGTERM, for nbdinfo,
    /// nbdcopy, qemu-img, QEMU, fio's nbd engine or the kernel's NBD client.
    /// Export names are the namespace IDs ("1", "2", ...); the empty name is
    /// --ns. Prints "serving NBD on URI" on stdout once listening. NBD has no
    /// authentication here: listen on a unix socket or a loopback address.
    ServeNbd(ServeNbdArgs),
    /// Print asynchronous events (namespace changes) as they arrive. Says
    /// "watching for events" on stderr once connected and listening: what
    /// happens from then on is printed.
    Watch {
        /// Exit after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Exit (with an error) if nothing arrives for this long.
        #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
        timeout: Option<Duration>,
    },
}

#[derive(Debug, Args)]
struct Lba {
    /// Namespace ID.
    #[arg(long, value_name = "NSID")]
    ns: u32,
    /// Starting logical block address.
    #[arg(long, value_name = "LBA")]
    lba: u64,
}

#[derive(Debug, Args)]
struct WindowArgs {
    /// info: open the window and print its steering tag, address and
    /// length; read: copy window bytes out; write: copy bytes in, commit.
    #[arg(value_enum)]
    action: WindowAction,
    /// The window: namespace, first block and number of blocks.
    #[command(flatten)]
    at: BlockRange,
    /// With info: ask for a writable window.
    #[arg(long)]
    writable: bool,
    /// Byte offset in the window where the read or write starts (any
    /// alignment).
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    offset: u64,
    /// Bytes to read (default: to the window's end).
    #[arg(long, value_name = "BYTES")]
    len: Option<u64>,
    /// With read: write the data here instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// With write: read the data from here instead of stdin.
    #[arg(long, short = 'i', value_name = "FILE")]
    input: Option<PathBuf>,
    /// With write: do not commit. The data is in the I/O unit's memory
    /// (commands see it) but not promised durable: a power cut may lose it.
    #[arg(long)]
    no_commit: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WindowAction {
    Info,
    Read,
    Write,
}

#[derive(Debug, Args)]
struct BlockRange {
    #[command(flatten)]
    at: Lba,
    /// Number of blocks.
    #[arg(long, value_name = "COUNT")]
    blocks: u64,
}

#[derive(Debug, Args)]
struct ServeNbdArgs {
    /// Where to listen: HOST:PORT (port 0 picks a free one) or unix:PATH
    /// (created with mode 0600).
    #[arg(long, value_name = "ADDR")]
    listen: host::nbd::Listen,
    /// The namespace the empty export name selects (default: the first).
    #[arg(long, value_name = "NSID")]
    ns: Option<u32>,
    /// Refuse writes, trims and write zeroes.
    #[arg(long)]
    read_only: bool,
    /// Client connections served at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_connections: usize,
    /// Requests in flight per client connection.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_in_flight: usize,
    /// Serve reads through a read-only storage window over each namespace
    /// (one-sided RDMA under a steering tag, no Read command per request;
    /// RAM and file namespaces), falling back to commands where none can
    /// be opened. Writes stay commands.
    #[arg(long)]
    window: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Namespace ID.
    #[arg(long, value_name = "NSID")]
    ns: u32,
    /// Access pattern: randread, randwrite, read, write or randrw.
    #[arg(long, default_value = "randread")]
    rw: Pattern,
    /// With --rw randrw: the share of reads, in percent (as fio's
    /// rwmixread; 70 is the usual database-like mix).
    #[arg(long, value_name = "PCT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Bytes per I/O (4k, 64k, 1m, ...).
    #[arg(long, default_value = "4k", value_parser = parse_nonzero_size)]
    bs: u64,
    /// I/Os in flight.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Submitting threads; the I/Os in flight are shared out among them
    /// (one thread keeps all of them in flight with the async API, as fio).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    time: Duration,
    /// Read and write through a storage window over the namespace (one-sided
    /// RDMA, no command per I/O; RAM and file namespaces) instead of with
    /// commands.
    /// Window writes are not committed.
    #[arg(long)]
    window: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server says what it serves; a command speaks only when it fails.
    let default_level = match cli.command {
        Command::ServeNbd(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let status = exit_status(e.as_ref());
            let mut causes = Vec::new();
            let mut source = e.source();
            while let Some(s) = source {
                causes.push(s.to_string());
                source = s.source();
            }
            if json {
                let nvme = e.downcast_ref::<host::HostError>().and_then(host::HostError::status);
                let value = serde_json::json!({
                    "error": e.to_string(),
                    "causes": causes,
                    "exit_status": status,
                    "nvme_status": nvme.map(|s| serde_json::json!({
                        "sct": s.sct().value(),
                        "sc": s.sc(),
                        "text": s.to_string(),
                    })),
                });
                eprintln!("{value}");
            } else {
                let mut msg = format!("hostctl: {e}");
                for c in causes {
                    msg.push_str(&format!("\n  caused by: {c}"));
                }
                eprintln!("{msg}");
            }
            ExitCode::from(status)
        }
    }
}

type CliError = Box<dyn std::error::Error + Send + Sync>;

fn run(cli: Cli) -> Result<(), CliError> {
    let mut opts = HostOptions {
        io_queues: cli.queues,
        command_timeout: cli.timeout,
        ..HostOptions::default()
    };
    if let Some(n) = cli.hostnqn {
        opts.hostnqn = n;
    }
    if let Some(n) = cli.subnqn {
        opts.subnqn = n;
    }
    if let Command::Bench(b) = &cli.command {
        opts.queue_depth = u16::try_from(b.qd.clamp(2, 1024)).unwrap_or(1024);
        // Checked before connecting: bad arguments cost no connection.
        if b.rwmixread != 50 && !matches!(b.rw, Pattern::RandRw { .. }) {
            return Err(Box::new(UsageError("--rwmixread applies to --rw randrw only".into())));
        }
    }
    let target = match &cli.transport {
        Some(t) => {
            let addr = cli.target.split_once("://").map_or(cli.target.as_str(), |(_, a)| a);
            format!("{t}://{addr}")
        }
        None => cli.target.clone(),
    };
    if cli.json {
        if let Command::Read { output: None, .. } = &cli.command {
            return Err(Box::new(UsageError(
                "--json with read needs --output FILE: the data goes to stdout otherwise".into(),
            )));
        }
        if let Command::Window(WindowArgs {
            action: WindowAction::Read,
            output: None,
            ..
        }) = &cli.command
        {
            return Err(Box::new(UsageError(
                "--json with window read needs --output FILE: the data goes to stdout otherwise".into(),
            )));
        }
    }
    let host = Host::connect(&target, opts)?;
    let result = if cli.json {
        command_json(&host, cli.command)
    } else {
        command(&host, cli.command)
    };
    host.close();
    result
}

/// Runs one subcommand and prints its result as JSON (serde_json values
/// with the same fields the text shows).
fn command_json(host: &Host, command: Command) -> Result<(), CliError> {
    use serde_json::json;
    let mut out = std::io::stdout().lock();
    let value = match command {
        Command::List => {
            let namespaces: Vec<_> = host
                .namespaces()?
                .iter()
                .map(|ns| {
                    json!({
                        "nsid": ns.nsid.0,
                        "bytes": ns.bytes(),
                        "block_size": ns.block_size,
                        "blocks": ns.blocks,
                    })
                })
                .collect();
            json!({ "transport": host.transport(), "uri": host.uri(), "namespaces": namespaces })
        }
        Command::Identify { ns: None } => controller_json(&host.identify_controller()?),
        Command::Status => {
            let id = host.identify_controller()?;
            let s = host.smart_log()?;
            let n = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
            let namespaces: Vec<_> = host
                .namespaces()?
                .iter()
                .map(|ns| json!({ "nsid": ns.nsid.0, "bytes": ns.bytes(), "block_size": ns.block_size }))
                .collect();
            json!({
                "uri": host.uri(),
                "transport": host.transport(),
                "controller_id": host.controller_id(),
                "serial": id.sn.text(),
                "model": id.mn.text(),
                "io_queues": host.io_queues(),
                "namespaces": namespaces,
                "host_read_commands": n(s.host_read_commands),
                "host_write_commands": n(s.host_write_commands),
                "data_units_read": n(s.data_units_read),
                "data_units_written": n(s.data_units_written),
                "media_errors": n(s.media_errors),
                "error_log_entries": n(s.error_log_entries),
                "power_on_hours": n(s.power_on_hours),
                "replication": host.replication_status()?,
            })
        }
        Command::SmartLog => {
            let s = host.smart_log()?;
            // The page's counters are 128-bit; JSON numbers here are u64
            // (saturating, which no daemon's lifetime reaches).
            let n = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
            json!({
                "critical_warning": s.critical_warning,
                "available_spare": s.available_spare,
                "spare_threshold": s.spare_threshold,
                "percentage_used": s.percentage_used,
                "data_units_read": n(s.data_units_read),
                "data_units_written": n(s.data_units_written),
                "host_read_commands": n(s.host_read_commands),
                "host_write_commands": n(s.host_write_commands),
                "power_on_hours": n(s.power_on_hours),
                "media_errors": n(s.media_errors),
                "error_log_entries": n(s.error_log_entries),
            })
        }
        Command::Identify { ns: Some(n) } => {
            let id = host.identify_namespace(Nsid(n))?;
            let ids = host.namespace_ids(Nsid(n))?;
            json!({
                "nsid": n,
                "blocks": id.nsze,
                "block_size": id.block_size().ok(),
                "capacity_blocks": id.ncap,
                "utilization_blocks": id.nuse,
                "thin_provisioning": id.nsfeat & host::IdentifyNamespace::NSFEAT_THIN_PROVISIONING != 0,
                "nguid": id.nguid.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                "uuid": host::describe::uuid_text(&ids.uuid),
            })
        }
        Command::Read { at, output } => {
            let path = output.ok_or_else(|| UsageError("--json with read needs --output FILE".into()))?;
            let mut file = std::fs::File::create(&path).map_err(|e| format!("writing {}: {e}", path.display()))?;
            read_stream(host, Nsid(at.at.ns), at.at.lba, at.blocks, &mut file)?;
            json!({ "nsid": at.at.ns, "lba": at.at.lba, "blocks": at.blocks, "output": path })
        }
        Command::Write { at, input, pad, fua } => {
            let blocks = write_command(host, &at, input.as_deref(), pad, fua)?;
            json!({ "nsid": at.ns, "lba": at.lba, "blocks": blocks, "fua": fua })
        }
        Command::Flush { ns } => {
            host.flush(Nsid(ns))?;
            json!({ "nsid": ns, "flushed": true })
        }
        Command::Trim { at } => {
            host.trim(Nsid(at.at.ns), at.at.lba, at.blocks)?;
            json!({ "nsid": at.at.ns, "lba": at.at.lba, "blocks": at.blocks, "trimmed": true })
        }
        Command::WriteZeroes { at } => {
            host.write_zeroes(Nsid(at.at.ns), at.at.lba, at.blocks)?;
            json!({ "nsid": at.at.ns, "lba": at.at.lba, "blocks": at.blocks, "zeroed": true })
        }
        Command::Window(args) => return window(host, args, true, &mut out),
        Command::Bench(b) => return bench(host, b, true, &mut out),
        Command::ServeNbd(args) => return serve_nbd(host, args, true, &mut out),
        Command::Watch { count, timeout } => return watch(host, count, timeout, true, &mut out),
    };
    writeln!(out, "{value}")?;
    Ok(())
}

/// Identify Controller as JSON.
fn controller_json(id: &host::IdentifyController) -> serde_json::Value {
    let ver = id.ver;
    serde_json::json!({
        "cntlid": id.cntlid,
        "model": id.mn.text(),
        "serial": id.sn.text(),
        "firmware": id.fr.text(),
        "version": format!("{}.{}.{}", ver >> 16, (ver >> 8) & 0xff, ver & 0xff),
        "subnqn": id.subnqn.as_ref().map(ToString::to_string),
        "max_transfer_bytes": (id.mdts != 0).then(|| 4096u64 << id.mdts.min(40)),
        "namespaces_max": id.nn,
        "max_commands": id.maxcmd,
        "write_zeroes": id.oncs & host::IdentifyController::ONCS_WRITE_ZEROES != 0,
        "deallocate": id.oncs & host::IdentifyController::ONCS_DATASET_MANAGEMENT != 0,
        "volatile_write_cache": id.vwc & host::IdentifyController::VWC_PRESENT != 0,
    })
}

/// Runs one subcommand. Long: one arm per subcommand, each a few lines.
fn command(host: &Host, command: Command) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::List => {
            writeln!(out, "transport: {} ({})", host.transport(), host.uri())?;
            writeln!(out, "{:>6}  {:>12}  {:>10}  {:>14}", "NSID", "SIZE", "BLOCK", "BLOCKS")?;
            for ns in host.namespaces()? {
                writeln!(
                    out,
                    "{:>6}  {:>12}  {:>10}  {:>14}",
                    ns.nsid.0,
                    Bytes(ns.bytes()).to_string(),
                    ns.block_size,
                    ns.blocks
                )?;
            }
        }
        Command::Identify { ns: None } => {
            writeln!(out, "{}", ControllerSummary(&host.identify_controller()?))?;
        }
        Command::Status => {
            let id = host.identify_controller()?;
            let namespaces = host.namespaces()?;
            let s = host.smart_log()?;
            let bytes: u64 = namespaces.iter().map(|n| n.bytes()).sum();
            writeln!(out, "target:         {} ({})", host.uri(), host.transport())?;
            writeln!(
                out,
                "controller:     {} (serial {}, model {})",
                host.controller_id(),
                id.sn.text(),
                id.mn.text()
            )?;
            writeln!(out, "I/O queues:     {}", host.io_queues())?;
            writeln!(out, "namespaces:     {} ({})", namespaces.len(), Bytes(bytes))?;
            writeln!(
                out,
                "reads:          {} commands, {} data units",
                s.host_read_commands, s.data_units_read
            )?;
            writeln!(
                out,
                "writes:         {} commands, {} data units",
                s.host_write_commands, s.data_units_written
            )?;
            writeln!(
                out,
                "errors:         {} media, {} logged for this controller",
                s.media_errors, s.error_log_entries
            )?;
            writeln!(out, "powered on:     {} hours", s.power_on_hours)?;
            if let Some(text) = host.replication_status()? {
                writeln!(out, "replication:")?;
                for line in text.lines() {
                    writeln!(out, "  {line}")?;
                }
            }
        }
        Command::SmartLog => {
            let s = host.smart_log()?;
            writeln!(out, "critical warning:      {:#04x}", s.critical_warning)?;
            writeln!(
                out,
                "available spare:       {}% (threshold {}%)",
                s.available_spare, s.spare_threshold
            )?;
            writeln!(out, "percentage used:       {}%", s.percentage_used)?;
            writeln!(
                out,
                "data units read:       {} (units of 512,000 bytes)",
                s.data_units_read
            )?;
            writeln!(out, "data units written:    {}", s.data_units_written)?;
            writeln!(out, "host read commands:    {}", s.host_read_commands)?;
            writeln!(out, "host write commands:   {}", s.host_write_commands)?;
            writeln!(out, "power on hours:        {}", s.power_on_hours)?;
            writeln!(out, "media errors:          {}", s.media_errors)?;
            writeln!(out, "error log entries:     {}", s.error_log_entries)?;
        }
        Command::Identify { ns: Some(n) } => {
            writeln!(out, "namespace:          {n}")?;
            writeln!(out, "{}", NamespaceSummary(&host.identify_namespace(Nsid(n))?))?;
            let ids = host.namespace_ids(Nsid(n))?;
            writeln!(out, "UUID:               {}", host::describe::uuid_text(&ids.uuid))?;
        }
        Command::Read { at, output } => {
            let mut file;
            let sink: &mut dyn Write = match &output {
                Some(path) => {
                    file = std::fs::File::create(path).map_err(|e| format!("writing {}: {e}", path.display()))?;
                    &mut file
                }
                None => &mut out,
            };
            read_stream(host, Nsid(at.at.ns), at.at.lba, at.blocks, sink)?;
        }
        Command::Write { at, input, pad, fua } => {
            let blocks = write_command(host, &at, input.as_deref(), pad, fua)?;
            eprintln!("wrote {blocks} blocks at LBA {}", at.lba);
        }
        Command::Flush { ns } => host.flush(Nsid(ns))?,
        Command::Trim { at } => host.trim(Nsid(at.at.ns), at.at.lba, at.blocks)?,
        Command::WriteZeroes { at } => host.write_zeroes(Nsid(at.at.ns), at.at.lba, at.blocks)?,
        Command::Window(args) => window(host, args, false, &mut out)?,
        Command::Bench(b) => bench(host, b, false, &mut out)?,
        Command::ServeNbd(args) => serve_nbd(host, args, false, &mut out)?,
        Command::Watch { count, timeout } => watch(host, count, timeout, false, &mut out)?,
    }
    Ok(())
}

/// `watch`: events as they arrive, as text or one JSON object a line.
fn watch(
    host: &Host,
    count: Option<u64>,
    timeout: Option<Duration>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let events = host.events();
    eprintln!("watching for events from {}", host.uri());
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        let event = match timeout {
            Some(t) => events
                .recv_timeout(t)
                .map_err(|_| format!("no event within {}", humantime(t)))?,
            None => events.recv().map_err(|_| "the connection closed")?,
        };
        if let HostEvent::NamespacesChanged { .. } | HostEvent::AsyncEvent(_) = event {
            seen += 1;
        }
        if json {
            writeln!(out, "{}", event_json(&event))?;
        } else {
            writeln!(out, "{event}")?;
        }
        out.flush()?;
    }
    Ok(())
}

/// A host event as JSON.
fn event_json(event: &HostEvent) -> serde_json::Value {
    use serde_json::json;
    match event {
        HostEvent::NamespacesChanged { nsids, all } => json!({
            "event": "namespaces_changed",
            "nsids": nsids.iter().map(|n| n.0).collect::<Vec<_>>(),
            "all": all,
        }),
        HostEvent::AsyncEvent(_) => json!({ "event": "async_event", "text": event.to_string() }),
        HostEvent::Disconnected { reason } => json!({ "event": "disconnected", "reason": reason }),
        HostEvent::Reconnected { controller_id } => json!({ "event": "reconnected", "controller_id": controller_id }),
        _ => json!({ "event": "other", "text": event.to_string() }),
    }
}

/// `write`: stdin or `input` at `at`; returns the blocks written.
fn write_command(
    host: &Host,
    at: &Lba,
    input: Option<&std::path::Path>,
    pad: bool,
    fua: bool,
) -> Result<u64, CliError> {
    let nsid = Nsid(at.ns);
    let bs = host.identify_namespace(nsid)?.block_size()? as u64;
    let mut file;
    let mut stdin;
    let source: &mut dyn Read = match input {
        Some(path) => {
            file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            // A file's length is known: refused before anything is written.
            let len = file
                .metadata()
                .map_err(|e| format!("reading {}: {e}", path.display()))?
                .len();
            check_length(len, bs, pad)?;
            &mut file
        }
        None => {
            stdin = std::io::stdin().lock();
            &mut stdin
        }
    };
    let blocks = write_stream(host, nsid, at.lba, bs as usize, pad, fua, source)?;
    Ok(blocks)
}

/// Bytes a window read or write moves per RDMA operation.
const WINDOW_CHUNK: u64 = 1 << 20;

/// `window`: opens a window, does the one action, closes it.
fn window(host: &Host, args: WindowArgs, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let blocks = u32::try_from(args.at.blocks).map_err(|_| {
        UsageError(format!(
            "--blocks {}: a window has at most {} blocks",
            args.at.blocks,
            u32::MAX
        ))
    })?;
    let (ns, lba) = (Nsid(args.at.at.ns), args.at.at.lba);
    if args.input.is_some() && args.action != WindowAction::Write {
        return Err(Box::new(UsageError("--input applies to window write only".into())));
    }
    if args.output.is_some() && args.action != WindowAction::Read {
        return Err(Box::new(UsageError("--output applies to window read only".into())));
    }
    if args.no_commit && args.action != WindowAction::Write {
        return Err(Box::new(UsageError("--no-commit applies to window write only".into())));
    }
    let writable = args.writable || args.action == WindowAction::Write;
    let w = host.open_window(ns, lba, blocks, writable)?;
    let (stag, addr) = w.stag();
    if args.offset > w.len() {
        return Err(Box::new(UsageError(format!(
            "--offset {} is past the window's {} bytes",
            args.offset,
            w.len()
        ))));
    }
    let moved = match args.action {
        WindowAction::Info => 0,
        WindowAction::Read => {
            let len = args.len.unwrap_or(w.len() - args.offset);
            let mut file;
            let mut stdout;
            let sink: &mut dyn Write = match &args.output {
                Some(path) => {
                    file = std::fs::File::create(path).map_err(|e| format!("writing {}: {e}", path.display()))?;
                    &mut file
                }
                None => {
                    stdout = std::io::stdout().lock();
                    &mut stdout
                }
            };
            let mut buf = host.alloc(len.clamp(1, WINDOW_CHUNK) as usize)?;
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(WINDOW_CHUNK) as usize;
                buf.set_len(n)?;
                w.read_at(args.offset + done, &mut buf)?;
                sink.write_all(&buf)?;
                done += n as u64;
            }
            sink.flush()?;
            len
        }
        WindowAction::Write => {
            if args.len.is_some() {
                return Err(Box::new(UsageError(
                    "--len applies to window read; a write writes all its input".into(),
                )));
            }
            let mut file;
            let mut stdin;
            let source: &mut dyn Read = match &args.input {
                Some(path) => {
                    file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                    &mut file
                }
                None => {
                    stdin = std::io::stdin().lock();
                    &mut stdin
                }
            };
            let mut chunk = vec![0u8; WINDOW_CHUNK as usize];
            let mut buf = host.alloc(WINDOW_CHUNK as usize)?;
            let mut done = 0u64;
            loop {
                let n = read_full(source, &mut chunk)?;
                if n == 0 {
                    break;
                }
                if args.offset + done + n as u64 > w.len() {
                    return Err(format!(
                        "the input is longer than the {} bytes from --offset {} to the window's end",
                        w.len() - args.offset,
                        args.offset
                    )
                    .into());
                }
                buf.set_len(n)?;
                buf.copy_from_slice(&chunk[..n]);
                w.write_at(args.offset + done, &mut buf)?;
                done += n as u64;
            }
            if !args.no_commit {
                w.commit()?;
            }
            done
        }
    };
    let value = serde_json::json!({
        "nsid": ns.0, "lba": lba, "blocks": blocks, "writable": w.writable(),
        "stag": format!("{stag:#010x}"), "addr": format!("{addr:#x}"), "len": w.len(),
        "action": format!("{:?}", args.action).to_lowercase(), "bytes": moved,
        "committed": args.action == WindowAction::Write && !args.no_commit,
        "shared_memory": w.shared_memory(),
    });
    w.close()?;
    match (json, args.action) {
        (true, _) => writeln!(out, "{value}")?,
        (false, WindowAction::Info) => {
            writeln!(
                out,
                "window:        namespace {} blocks {lba}..{}",
                ns.0,
                lba + u64::from(blocks)
            )?;
            writeln!(out, "steering tag:  {stag:#010x}")?;
            writeln!(out, "address:       {addr:#x}")?;
            writeln!(out, "length:        {} bytes", value["len"])?;
            writeln!(
                out,
                "access:        {}",
                if writable { "read-write" } else { "read-only" }
            )?;
            let path = match value["shared_memory"].as_bool() {
                Some(true) => "copies into memory the I/O unit shared (shm)",
                _ => "one-sided RDMA",
            };
            writeln!(out, "data path:     {path}")?;
        }
        (false, WindowAction::Read) => {}
        (false, WindowAction::Write) if args.no_commit => {
            eprintln!("wrote {moved} bytes through the window, not committed (not promised durable)")
        }
        (false, WindowAction::Write) => eprintln!("wrote {moved} bytes through the window and committed them"),
    }
    Ok(())
}

/// Fills `buf` from `source` as far as it goes; the bytes read (fewer only
/// at the end of the input).
fn read_full(source: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn serve_nbd(host: &Host, args: ServeNbdArgs, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    use host::nbd::{NbdConfig, NbdServer};
    let config = NbdConfig {
        default_ns: args.ns.map(Nsid),
        read_only: args.read_only,
        max_connections: args.max_connections,
        max_in_flight: args.max_in_flight,
        windows: args.window,
        ..NbdConfig::default()
    };
    let server = NbdServer::bind(host.clone(), &args.listen, config)?;
    let stopper = server.stopper()?;
    // SIGINT and SIGTERM each write a byte here; a thread turns it into a
    // stop, so that connections close and a unix socket is removed.
    let (mut wake_rx, wake_tx) = std::os::unix::net::UnixStream::pair()?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::low_level::pipe::register(sig, wake_tx.try_clone()?)?;
    }
    std::thread::Builder::new()
        .name("hostctl-signals".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            if wake_rx.read(&mut b).is_ok() {
                tracing::info!("stopping on a signal");
                stopper.stop();
            }
        })?;
    let exports: Vec<String> = host.namespaces()?.iter().map(|n| n.nsid.0.to_string()).collect();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "serving": server.uri(), "exports": exports })
        )?;
    } else {
        writeln!(out, "serving NBD on {} (exports: {})", server.uri(), exports.join(", "))?;
    }
    out.flush()?;
    server.run()?;
    Ok(())
}

fn bench(host: &Host, b: BenchArgs, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let pattern = match b.rw {
        Pattern::RandRw { .. } => Pattern::RandRw {
            read_percent: b.rwmixread,
        },
        other => other,
    };
    let cfg = BenchConfig {
        nsid: Nsid(b.ns),
        pattern,
        block_size: usize::try_from(b.bs).map_err(|_| "--bs is too large")?,
        queue_depth: b.qd,
        threads: b.threads,
        duration: b.time,
        window: b.window,
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(b.time.as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let progress = |elapsed: Duration, ios: u64| {
        if let Some(bar) = &bar {
            bar.set_position(elapsed.as_millis() as u64);
            let iops = ios as f64 / elapsed.as_secs_f64().max(1e-9);
            bar.set_message(format!("{iops:.0} IOPS"));
        }
    };
    let report = host::bench::run(host, &cfg, &progress);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report?;
    if json {
        let value = serde_json::json!({
            "rw": b.rw.to_string(),
            "bs": b.bs,
            "qd": b.qd,
            "window": b.window,
            "ios": report.ios,
            "elapsed_s": report.elapsed.as_secs_f64(),
            "iops": report.iops(),
            "bandwidth_mbps": report.bandwidth_mbps(),
            "latency_us": {
                "mean": report.mean_us,
                "p50": report.p50_us,
                "p99": report.p99_us,
                "p999": report.p999_us,
                "max": report.max_us,
            },
        });
        writeln!(out, "{value}")?;
    } else {
        writeln!(
            out,
            "{} {} qd={} on {} ({}){}",
            b.rw,
            Bytes(b.bs),
            b.qd,
            host.uri(),
            host.transport(),
            if b.window { ", through a window" } else { "" }
        )?;
        writeln!(out, "{report}")?;
    }
    Ok(())
}

/// Bytes per command while streaming: the largest transfer of one
/// command, so that `read` and `write` hold one such buffer, never the
/// whole transfer.
const STREAM_CHUNK: usize = host::nvme::transport::MAX_TRANSFER;

/// Reads `blocks` blocks from `lba` into `sink`, one chunk at a time.
fn read_stream(host: &Host, nsid: Nsid, lba: u64, blocks: u64, sink: &mut dyn Write) -> Result<(), CliError> {
    let bs = host.identify_namespace(nsid)?.block_size()? as usize;
    let per = (STREAM_CHUNK / bs).max(1);
    let mut buf = host.alloc(per * bs)?;
    let (mut lba, mut left) = (lba, blocks);
    while left > 0 {
        let n = left.min(per as u64);
        buf.set_len(n as usize * bs)?;
        host.read_into(nsid, lba, &mut buf)?;
        sink.write_all(&buf)?;
        lba += n;
        left -= n;
    }
    sink.flush()?;
    Ok(())
}

/// Whether `len` bytes may be written as blocks of `bs`: not empty, and
/// whole blocks unless `pad`.
fn check_length(len: u64, bs: u64, pad: bool) -> Result<(), CliError> {
    if len == 0 {
        return Err(Box::new(UsageError("no data to write (empty input)".into())));
    }
    if len % bs != 0 && !pad {
        return Err(Box::new(UsageError(format!(
            "{len} bytes is not a whole number of {bs}-byte blocks (use --pad to zero-pad the last block)"
        ))));
    }
    Ok(())
}

/// Writes what `source` holds at `lba`, one chunk at a time (the last one
/// zero-padded to a whole block with `pad`); the blocks written. From a
/// stream whose length is not whole blocks, the chunks before the last are
/// written before that is known: the error says how much.
fn write_stream(
    host: &Host,
    nsid: Nsid,
    lba: u64,
    bs: usize,
    pad: bool,
    fua: bool,
    source: &mut dyn Read,
) -> Result<u64, CliError> {
    let per = (STREAM_CHUNK / bs).max(1) * bs;
    let mut buf = host.alloc(per)?;
    let (mut at, mut total) = (lba, 0u64);
    loop {
        buf.set_len(per)?;
        let n = fill(source, &mut buf)?;
        if n == 0 {
            break;
        }
        let mut len = n;
        if n % bs != 0 {
            if let Err(e) = check_length(total + n as u64, bs as u64, pad) {
                if total == 0 {
                    return Err(e);
                }
                return Err(format!("{e}; the first {total} bytes were written").into());
            }
            len = n.div_ceil(bs) * bs;
            buf[n..len].fill(0);
        }
        buf.set_len(len)?;
        host.write_from(nsid, at, &mut buf, fua)?;
        at += (len / bs) as u64;
        total += n as u64;
        if n < per {
            break;
        }
    }
    check_length(total, bs as u64, true)?;
    Ok(at - lba)
}

/// Reads into `buf` until it is full or the source ends; the bytes read.
fn fill(source: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut have = 0;
    while have < buf.len() {
        match source.read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(have)
}

/// A size of at least one byte ([`units::parse_size`]).
fn parse_nonzero_size(text: &str) -> Result<u64, String> {
    match units::parse_size(text) {
        Ok(0) => Err(format!("{text:?}: size must be more than zero")),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn humantime(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hostctl").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands() {
        let cli = parse(&[
            "--target",
            "127.0.0.1:4520",
            "read",
            "--ns",
            "1",
            "--lba",
            "8",
            "--blocks",
            "2",
        ])
        .unwrap();
        assert_eq!(cli.target, "127.0.0.1:4520");
        assert_eq!(cli.timeout, Duration::from_secs(30));
        match cli.command {
            Command::Read { at, output } => {
                assert_eq!((at.at.ns, at.at.lba, at.blocks), (1, 8, 2));
                assert!(output.is_none());
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&[
            "-t",
            "x:1",
            "--timeout",
            "500ms",
            "write",
            "--ns",
            "2",
            "--lba",
            "0",
            "--pad",
            "--fua",
            "-i",
            "f",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Duration::from_millis(500));
        assert!(matches!(
            cli.command,
            Command::Write {
                pad: true,
                fua: true,
                ..
            }
        ));
        let cli = parse(&[
            "-t", "x:1", "bench", "--ns", "1", "--rw", "randrw", "--bs", "64k", "--qd", "4", "--time", "2s", "--json",
        ])
        .unwrap();
        assert!(cli.json, "--json after the subcommand is the global flag");
        match cli.command {
            Command::Bench(b) => {
                assert_eq!(
                    (b.rw, b.bs, b.qd, b.time, cli.json),
                    (
                        Pattern::RandRw { read_percent: 50 },
                        65536,
                        4,
                        Duration::from_secs(2),
                        true
                    )
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["-t", "x:1", "watch", "--count", "1"]).unwrap().command,
            Command::Watch {
                count: Some(1),
                timeout: None
            }
        ));
        assert!(matches!(
            parse(&["-t", "x:1", "write-zeroes", "--ns", "1", "--lba", "0", "--blocks", "9"])
                .unwrap()
                .command,
            Command::WriteZeroes { .. }
        ));
        assert!(matches!(
            parse(&["-t", "x:1", "identify", "--ns", "3"]).unwrap().command,
            Command::Identify { ns: Some(3) }
        ));
        match parse(&["-t", "x:1", "serve-nbd", "--listen", "unix:/tmp/n.sock", "--read-only"])
            .unwrap()
            .command
        {
            Command::ServeNbd(a) => {
                assert_eq!(a.listen, host::nbd::Listen::Unix("/tmp/n.sock".into()));
                assert!(a.read_only);
                assert_eq!((a.ns, a.max_connections, a.max_in_flight), (None, 16, 64));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_input() {
        for bad in [
            &["list"][..],
            &["-t", "x:1"],
            &["-t", "x:1", "read", "--ns", "1", "--lba", "0"],
            &["-t", "x:1", "read", "--ns", "x", "--lba", "0", "--blocks", "1"],
            &["-t", "x:1", "bench", "--ns", "1", "--rw", "sideways"],
            &["-t", "x:1", "bench", "--ns", "1", "--bs", "4q"],
            &["-t", "x:1", "--timeout", "soon", "list"],
            &["-t", "x:1", "frobnicate"],
            &["-t", "x:1", "serve-nbd"],
            &["-t", "x:1", "serve-nbd", "--listen", "localhost"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn sizes_are_more_than_zero() {
        assert_eq!(parse_nonzero_size("4k"), Ok(4096));
        assert!(parse_nonzero_size("0").is_err());
        assert!(parse_nonzero_size("k").is_err());
    }

    #[test]
    fn help_teaches_with_examples() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Examples:"));
        assert!(help.contains("bench --ns 1 --rw randread"));
    }
}
