#!/usr/bin/env bash
# bench/compare.sh — chanio against established peers on one machine.
# Run with --help for what it measures; bench/README.md has the background.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/compare.sh [OPTIONS]

Compares chanio with established peers on this machine, everything over
127.0.0.1, and prints ONE table (medians of N repeats, chanio and peer runs
alternating):

  block      chanio: iounitd --ns ram:1GiB + hostctl bench over tcp
             peer:   fio ioengine=nbd -> nbdkit memory 1G (TCP, 127.0.0.1)
             floor:  fio on a file in /dev/shm (psync for QD1, io_uring
                     iodepth=QD for QD8/QD32; psync numjobs=QD if io_uring fails)
             4 KiB randread/randwrite QD1 latency (mean/p50/p99),
             4 KiB randread/randwrite QD32 IOPS, 128 KiB read/write QD8 MB/s,
             CPU seconds per million I/Os (client + server) at 4 KiB QD32
  block shm  chanio: the same block workloads with iounitd --listen shm://NAME
                     (a second iounitd, unique NAME per run) + hostctl --target
                     shm://NAME bench; rows "... (shm)", compared with the same
                     fio nbd -> nbdkit results of the same repeat
  messaging  chanio: examples/pingpong (send mode 8 B/4 KiB, push mode
                     --zero-copy 64 KiB/1 MiB) over tcp, and over shm if built;
                     over shm also write mode 1 MiB (one-sided writes into a
                     buffer the receiver exposes again after each)
             peers:  ucx_perftest tag_lat (latency), ucp_am_bw (bandwidth) and
                     ucp_put_bw (one-sided writes), UCX_TLS=tcp / UCX_TLS=shm;
                     fi_pingpong -p tcp -e msg / -p shm -e rdm (latency; it
                     has no streaming test)
  memcpy     chanio: pingpong --transport shm --mode write --size 1MiB MB/s
                     (the one-sided write)
             peer:   bench/memcpy.c (cc -O2, built in the work directory):
                     single-thread memcpy of a 1 MiB buffer (cache-hot), and
                     of 1 MiB chunks across 64 MiB areas (cache-cold), MB/s
  tcp floor  chanio: pingpong --transport tcp --mode push --zero-copy --size 1MiB
             floor:  bench/tcpbw.c (cc -O2 -pthread): plain blocking write(2)
                     of 1 MiB messages and read(2) into a 1 MiB buffer over
                     127.0.0.1, one thread each: what the kernel alone allows;
                     and the same from a never-written source (the kernel's
                     zero page, always cached), as ucx_perftest sends
  tcp 8 B    chanio: pingpong --transport tcp --size 8 (one-way p50)
             floor:  bench/tcplat.c (cc -O2 -pthread): plain 8-byte ping-pong
                     over 127.0.0.1, both threads spinning on a non-blocking
                     recv(2): the lowest latency the socket API allows here
  machine    bench/stalls.c (cc -O2): 2 s of a thread reading the clock in a
             loop, counting gaps > 1 us (the machine's noise under latency)
  daemon     iounitd idle CPU over 10 s with 4 hosts connected (hostctl watch),
             iounitd VmRSS with 0 hosts and per connected queue
             (4 hosts x (admin + 1 I/O queue) = 8 queues)
  storage    real storage: a 1 GiB file on the disk (CHANIO_BENCH_DIR, default
             target/bench-storage; O_DIRECT), one iounitd --ns file:IMG
             listening on shm and tcp; rows "file ..." over shm, "file tcp ..."
             peer:   fio ioengine=nbd -> nbdkit file IMG cache=none
             floor:  fio io_uring --direct=1 on the same file (the device's
                     own limit); the page cache of the file is dropped
                     before every run of every side
             4 KiB randread/randwrite QD1 latency, QD32 and QD128 IOPS,
             128 KiB sequential read/write QD8 MB/s, 4 KiB 70/30 randrw QD32
             IOPS, and iounitd CPU per I/O on the file against a RAM
             namespace (4 KiB randread QD32, shm)

Options:
  --repeats N      repeats of every measurement, medians reported (default 3)
  --time S         seconds per block run (default 5)
  --quick          smoke run: 1 repeat, 2 s block runs, 1/4 messaging iterations
  --markdown FILE  also write the table as markdown to FILE
  --no-install     do not apt-get install missing peers
  --no-build       do not run cargo build (use the binaries in target/release)
  --keep           keep the work directory (raw JSON, logs) and print its path
  --only LIST      run only these sections, comma-separated: block, storage,
                   messaging, daemon (default: all of them)
  -h, --help       this help

Peers that cannot be installed or do not work show "n/a (why)" in the table;
the run goes on. ucx_perftest and fi_pingpong have no option to bind their
rendezvous sockets to 127.0.0.1, so they run in a private network namespace
(unshare -n) that only has lo; without one they are skipped.
Needs: bash, python3, iproute2 (ss), util-linux (unshare), cargo, cc (for
bench/memcpy.c, bench/tcpbw.c and bench/tcplat.c; build-essential is installed with apt
when cc is missing).
EOF
}

# ---------------------------------------------------------------- options
REPEATS=3
BLOCK_TIME=5
QUICK=0
MARKDOWN=""
DO_INSTALL=1
DO_BUILD=1
KEEP=0
ONLY="block,storage,messaging,daemon"
FLOOR_ENGINE=io_uring
CMDLINE="$(printf '%q ' "$0" "$@")"
CMDLINE="${CMDLINE% }"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --repeats) REPEATS="${2:?--repeats needs N}"; shift 2 ;;
        --repeats=*) REPEATS="${1#*=}"; shift ;;
        --time) BLOCK_TIME="${2:?--time needs seconds}"; shift 2 ;;
        --time=*) BLOCK_TIME="${1#*=}"; shift ;;
        --quick) QUICK=1; shift ;;
        --markdown) MARKDOWN="${2:?--markdown needs FILE}"; shift 2 ;;
        --markdown=*) MARKDOWN="${1#*=}"; shift ;;
        --no-install) DO_INSTALL=0; shift ;;
        --no-build) DO_BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --only) ONLY="${2:?--only needs a list}"; shift 2 ;;
        --only=*) ONLY="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done
BLOCK_TIME="${BLOCK_TIME%s}"
for sec in ${ONLY//,/ }; do
    case "$sec" in block|storage|messaging|daemon) ;; *) echo "compare.sh: --only: unknown section $sec (block, storage, messaging, daemon)" >&2; exit 2 ;; esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
[[ "$REPEATS" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --repeats must be a positive integer" >&2; exit 2; }
[[ "$BLOCK_TIME" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --time must be whole seconds (e.g. 5)" >&2; exit 2; }

# Messaging iteration counts: a few seconds per chanio run on a 2-core box.
LAT_ITERS=20000      # 8 B and 4 KiB ping-pong round trips
BW64K_ITERS=20000    # 64 KiB messages streamed
BW1M_ITERS=2000      # 1 MiB messages streamed
MEMCPY_ITERS=10000   # 1 MiB copies timed by bench/memcpy.c (well under 1 s)
MEMCPY_COLD_ITERS=3000   # the same over a 64 MiB working set (cache-cold)
IDLE_SECS=10
if [[ $QUICK == 1 ]]; then
    REPEATS=1; BLOCK_TIME=2
    LAT_ITERS=5000; BW64K_ITERS=5000; BW1M_ITERS=500; MEMCPY_ITERS=2500
fi
if [[ -n "$MARKDOWN" ]]; then
    MARKDOWN="$(cd "$(dirname "$MARKDOWN")" && pwd)/$(basename "$MARKDOWN")"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IOUNITD="$ROOT/target/release/iounitd"
HOSTCTL="$ROOT/target/release/hostctl"
PINGPONG="$ROOT/target/release/examples/pingpong"

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
command -v python3 >/dev/null || die "python3 is needed to read JSON"

WORK="$(mktemp -d /tmp/chanio-compare.XXXXXX)"
FLOOR_FILE="/dev/shm/chanio-compare-floor.$$"
PIDS=()

cleanup() {
    local rc=$? pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$FLOOR_FILE"
    if [[ $KEEP == 1 ]]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stop one process we started, by PID: SIGTERM, wait up to 5 s, then SIGKILL.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

port_listening() { # PORT
    ss -Htln "sport = :$1" 2>/dev/null | grep -q .
}

# Wait until FILE contains PATTERN or PORT listens, up to SECS; fail if PID dies.
wait_ready() { # PID SECS PORT [FILE PATTERN]
    local pid=$1 secs=$2 port=$3 file=${4:-} pat=${5:-} i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if [[ -n "$file" ]] && grep -q "$pat" "$file" 2>/dev/null; then return 0; fi
        if [[ -z "$file" ]] && port_listening "$port"; then return 0; fi
        sleep 0.1
    done
    return 1
}

CLK_TCK="$(getconf CLK_TCK)"
# utime+stime (ticks) of a running process, all threads.
proc_ticks() { # PID
    local s
    s="$(cat "/proc/$1/stat")"; s="${s##*) }"
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} ))
}
proc_rss_kb() { # PID
    awk '/^VmRSS:/ {print $2}' "/proc/$1/status"
}
# Run a command in a subshell; afterwards write the CPU ticks it (and all its
# waited-for descendants) used to CPUFILE, read from the subshell's cutime+cstime.
run_cpu() { # CPUFILE OUT ERR CMD...
    local cpuf=$1 out=$2 err=$3
    shift 3
    (
        rc=0 me=$BASHPID   # read before any $(...): BASHPID there is the substitution's own PID
        "$@" >"$out" 2>"$err" || rc=$?
        s="$(cat "/proc/$me/stat")"; s="${s##*) }"
        # shellcheck disable=SC2086
        set -- $s
        echo $(( ${14} + ${15} )) >"$cpuf"
        exit $rc
    )
}

short_err() { # FILE -> last meaningful line, table-safe
    local f=$1
    { grep -v '^[[:space:]]*$' "$f" 2>/dev/null || true; } | tail -n 1 |
        sed -e 's/\x1b\[[0-9;]*m//g' -e 's/|/\//g' | cut -c1-90
}

# ---------------------------------------------------------------- results
ROWS="$WORK/rows.tsv"; SAMPLES="$WORK/samples.tsv"; NAS="$WORK/na.tsv"
: >"$ROWS"; : >"$SAMPLES"; : >"$NAS"
# Rows of the sections not run (--only) are left out of the table.
SECTION=all
defrow() { # KEY KIND(lower|higher|info) LABEL PEER HASFLOOR
    [[ $SECTION == all ]] || want "$SECTION" || return 0
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$ROWS"
}
rec()    { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$SAMPLES"; } # KEY SIDE VALUE
na()     { printf '%s\t%s\t%s\n' "$1" "$2" "$(printf '%s' "$3" | tr '\t\n|' '  /')" >>"$NAS"; }

HELPER="$WORK/helper.py"
cat >"$HELPER" <<'PY'
import json, statistics, sys

def load_json(path):
    text = open(path).read()
    # Some tools print banners before the JSON object: start at the first '{'.
    return json.loads(text[text.index("{"):])

def block(kind, path):
    """-> iops mbps(1e6 B/s) lat_mean_us lat_p50_us lat_p99_us total_ios"""
    d = load_json(path)
    if kind == "hostctl":
        l = d["latency_us"]
        print(d["iops"], d["bandwidth_mbps"], l["mean"], l["p50"], l["p99"], -1)
        return
    j = d["jobs"][0]
    if j.get("error"):
        raise SystemExit("fio job error %s" % j["error"])
    r = j["read"] if j["read"]["total_ios"] else j["write"]
    lat = r["lat_ns"]
    pct = lat.get("percentile") or r["clat_ns"].get("percentile", {})
    # A mix (randrw) counts its reads and writes together; latency is the reads'.
    both = [j[d] for d in ("read", "write") if j[d]["total_ios"]]
    print(sum(d["iops"] for d in both), sum(d["bw_bytes"] for d in both) / 1e6, lat["mean"] / 1e3,
          pct.get("50.000000", 0) / 1e3, pct.get("99.000000", 0) / 1e3, sum(d["total_ios"] for d in both))

def pingpong(path):
    """-> p50_us mean_us mbps"""
    d = load_json(path)
    print(d["one_way_us"]["p50"], d["one_way_us"]["mean"], d["bandwidth_mbps"])

def ucx(path):
    """ucx_perftest -f: last numeric line: iters p50 avg overall MiB/s(avg,overall) msg/s(avg,overall)
    -> p50_us avg_us MB/s(1e6 B/s, overall)"""
    rows = []
    for line in open(path):
        t = line.split()
        if t and t[0] == "Final:":
            t = t[1:]
        try:
            rows.append([float(x) for x in t])
        except ValueError:
            continue
    rows = [r for r in rows if len(r) == 8]
    if not rows:
        raise SystemExit("no result line")
    r = rows[-1]
    print(r[1], r[2], r[5] * 1048576 / 1e6)

def fi(path):
    """fi_pingpong: 'bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec' -> usec_per_xfer (one way, mean)"""
    for line in open(path):
        t = line.split()
        if len(t) == 8 and t[5].replace(".", "", 1).isdigit():
            try:
                print(float(t[6]))
                return
            except ValueError:
                pass
    raise SystemExit("no result line")

def memcpy(path):
    """bench/memcpy.c or bench/tcpbw.c JSON line -> MB/s (1e6 B/s)"""
    print(load_json(path)["mbps"])

def stalls(path):
    """bench/stalls.c JSON line -> every_us stalled_pct"""
    j = load_json(path)
    print(j["every_us"], j["stalled_pct"])

def tcplat(path):
    """bench/tcplat.c JSON line -> one-way p50 (us)"""
    print(load_json(path)["one_way_us"]["p50"])

def fmt(v, kind_label):
    if v is None:
        return None
    a = abs(v)
    if a >= 10000:
        return "%.0f" % v
    if a >= 100:
        return "%.0f" % v if "IOPS" in kind_label else "%.1f" % v
    if a >= 10:
        return "%.1f" % v
    return "%.2f" % v

def table(rows_f, samples_f, na_f, meta_f, md_f, targets_f=""):
    samples, nas = {}, {}
    for line in open(samples_f):
        k, s, v = line.rstrip("\n").split("\t")
        samples.setdefault((k, s), []).append(float(v))
    for line in open(na_f):
        k, s, why = line.rstrip("\n").split("\t", 2)
        nas.setdefault((k, s), why)
    meta = [l.rstrip("\n") for l in open(meta_f)]
    out, ratios, fratios, whys = [], {}, {}, {}
    for line in open(rows_f):
        key, kind, label, peer, has_floor = line.rstrip("\n").split("\t")
        def val(side):
            v = samples.get((key, side))
            if v:
                m = statistics.median(v)
                return m, fmt(m, label)
            if side == "floor" and (key, side) in nas:
                return None, "n/a (%s)" % nas[(key, side)]
            return None, "n/a"   # the reason goes in the ratio column
        cv, cs = val("chanio")
        pv, ps = val("peer") if peer != "-" else (None, "-")
        fv, fs = val("floor") if has_floor == "1" else (None, "-")
        if cv is not None and fv:
            fratios[key] = cv / fv
        if kind == "info":
            ratio, better = "n/a (chanio only)", ""
        elif cv is not None and pv is not None and pv != 0:
            r = cv / pv
            ratios[key] = r
            ratio = "%.2fx" % r
            if abs(r - 1) < 0.05:
                better = "even"
            elif (r < 1) == (kind == "lower"):
                better = "chanio"
            else:
                better = "peer"
        else:
            why = (nas.get((key, "chanio")) if cv is None else None) or nas.get((key, "peer")) or "no result"
            ratio, better = "n/a (%s)" % why, ""
            whys[key] = why
        out.append([label, cs, peer, ps, ratio, better, fs])
    # Targets: KEY OP(ge|le) FACTOR TEXT -> one note line each, met / missed / n/a.
    if targets_f:
        tl = []
        for line in open(targets_f):
            key, op, factor, text = line.rstrip("\n").split("\t", 3)
            factor = float(factor)
            r = (fratios if op.endswith("f") else ratios).get(key)
            if r is None:
                verdict = "n/a (%s)" % whys.get(key, "no result")
            else:
                ok = r >= factor if op.startswith("ge") else r <= factor
                verdict = "%.2fx, %s" % (r, "met" if ok else "missed")
            tl.append("  %s %s %gx: %s" % (text, ">=" if op.startswith("ge") else "<=", factor, verdict))
        if tl:
            meta = ["Targets (ratio = chanio / peer, or / floor where the target says so):"] + tl + meta
    hdr = ["workload", "chanio", "peer", "peer value", "ratio", "better", "floor"]
    widths = [max(len(r[i]) for r in out + [hdr]) for i in range(len(hdr))]
    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    text = [line(hdr), line(["-" * w for w in widths])] + [line(r) for r in out]
    print("\n".join(text))
    print()
    for m in meta:
        print(m)
    if md_f:
        with open(md_f, "w") as f:
            f.write("| " + " | ".join(hdr) + " |\n")
            f.write("|" + "|".join(["---"] * len(hdr)) + "|\n")
            for r in out:
                f.write("| " + " | ".join(c.replace("|", "/") for c in r) + " |\n")
            f.write("\n")
            for m in meta:
                f.write(("  - " + m[2:] if m.startswith("  ") else "- " + m) + "\n")

cmd = sys.argv[1]
if cmd == "block":
    block(sys.argv[2], sys.argv[3])
elif cmd == "pingpong":
    pingpong(sys.argv[2])
elif cmd == "ucx":
    ucx(sys.argv[2])
elif cmd == "fi":
    fi(sys.argv[2])
elif cmd == "memcpy":
    memcpy(sys.argv[2])
elif cmd == "tcplat":
    tcplat(sys.argv[2])
elif cmd == "stalls":
    stalls(sys.argv[2])
elif cmd == "table":
    table(*sys.argv[2:6], *sys.argv[6:8])
PY
py() { python3 "$HELPER" "$@"; }

# ---------------------------------------------------------------- 1. peers
need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v nbdkit >/dev/null || need_pkgs+=(nbdkit)   # Debian 12: the memory plugin is in nbdkit itself
command -v ucx_perftest >/dev/null || need_pkgs+=(ucx-utils)
command -v fi_pingpong >/dev/null || need_pkgs+=(libfabric-bin)
command -v cc >/dev/null || need_pkgs+=(build-essential)   # for bench/memcpy.c
INSTALL_NOTE=""
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    if [[ $DO_INSTALL == 0 ]]; then
        INSTALL_NOTE="not installed (--no-install): ${need_pkgs[*]}"
    elif ! command -v apt-get >/dev/null; then
        INSTALL_NOTE="no apt-get here; missing: ${need_pkgs[*]}"
    else
        SUDO=""
        if [[ $(id -u) != 0 ]]; then
            if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; fi
        fi
        if [[ $(id -u) != 0 && -z "$SUDO" ]]; then
            INSTALL_NOTE="not root and no sudo; missing: ${need_pkgs[*]}"
        else
            log "installing ${need_pkgs[*]} with apt"
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$WORK/apt.log" 2>&1 ||
                log "apt-get update failed (see below); trying the install anyway"
            for p in "${need_pkgs[@]}"; do   # one at a time: one failure must not block the rest
                $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" \
                    >>"$WORK/apt.log" 2>&1 || { log "apt-get install $p failed"; INSTALL_NOTE+="apt-get install $p failed; "; }
            done
        fi
    fi
    [[ -n "$INSTALL_NOTE" ]] && log "$INSTALL_NOTE"
fi

HAVE_NBD=1; NBD_WHY=""
if ! command -v fio >/dev/null; then HAVE_NBD=0; NBD_WHY="fio not installed"
elif ! command -v nbdkit >/dev/null; then HAVE_NBD=0; NBD_WHY="nbdkit not installed"
elif ! nbdkit memory --dump-plugin >/dev/null 2>&1; then HAVE_NBD=0; NBD_WHY="nbdkit memory plugin missing"
elif ! fio --enghelp=nbd 2>/dev/null | grep -q uri; then HAVE_NBD=0; NBD_WHY="fio built without the nbd engine"
fi
HAVE_FLOOR=1; FLOOR_WHY=""
command -v fio >/dev/null || { HAVE_FLOOR=0; FLOOR_WHY="fio not installed"; }
HAVE_NETNS=1; NETNS_WHY=""
if ! command -v unshare >/dev/null || ! command -v ip >/dev/null; then
    HAVE_NETNS=0; NETNS_WHY="needs unshare and ip to confine its 0.0.0.0 listener to lo"
elif ! unshare -n sh -c 'ip link set lo up' >/dev/null 2>&1; then
    HAVE_NETNS=0; NETNS_WHY="unshare -n not permitted; its listener binds 0.0.0.0"
fi
HAVE_UCX=1; UCX_WHY=""
if ! command -v ucx_perftest >/dev/null; then HAVE_UCX=0; UCX_WHY="ucx_perftest not installed"
elif [[ $HAVE_NETNS == 0 ]]; then HAVE_UCX=0; UCX_WHY="$NETNS_WHY"; fi
HAVE_FI=1; FI_WHY=""
if ! command -v fi_pingpong >/dev/null; then HAVE_FI=0; FI_WHY="fi_pingpong not installed"
elif [[ $HAVE_NETNS == 0 ]]; then HAVE_FI=0; FI_WHY="$NETNS_WHY"; fi
FI_TCP_PROV=tcp
if [[ $HAVE_FI == 1 ]] && command -v fi_info >/dev/null && ! fi_info -l 2>/dev/null | grep -q '^tcp:'; then
    FI_TCP_PROV=sockets
fi
# The C baselines of bench/, built into the work directory. build_c NAME
# CFLAGS...: builds bench/NAME.c into $WORK/NAME; on failure returns 1 with
# the reason in BUILD_WHY.
build_c() {
    local name=$1; shift
    local src="$ROOT/bench/$name.c"
    BUILD_WHY=""
    if ! command -v cc >/dev/null; then BUILD_WHY="no cc to build bench/$name.c"
    elif [[ ! -f $src ]]; then BUILD_WHY="bench/$name.c missing"
    elif ! cc "$@" -o "$WORK/$name" "$src" >"$WORK/$name-build.log" 2>&1; then
        BUILD_WHY="cc $* bench/$name.c failed: $(short_err "$WORK/$name-build.log")"
    fi
    [[ -z $BUILD_WHY ]]
}
# Single-thread memcpy baseline (bench/memcpy.c).
HAVE_MEMCPY=1; MEMCPY_BIN="$WORK/memcpy"
build_c memcpy -O2 || HAVE_MEMCPY=0; MEMCPY_WHY=$BUILD_WHY
[[ $HAVE_MEMCPY == 0 ]] && log "memcpy baseline: $MEMCPY_WHY"
# Plain TCP streaming (bench/tcpbw.c): the kernel floor under a tcp stream.
HAVE_TCPBW=1; TCPBW_BIN="$WORK/tcpbw"
build_c tcpbw -O2 -pthread || HAVE_TCPBW=0; TCPBW_WHY=$BUILD_WHY
[[ $HAVE_TCPBW == 0 ]] && log "tcp floor: $TCPBW_WHY"
# Plain TCP ping-pong (bench/tcplat.c): the kernel floor under tcp latency.
HAVE_TCPLAT=1; TCPLAT_BIN="$WORK/tcplat"
build_c tcplat -O2 -pthread || HAVE_TCPLAT=0; TCPLAT_WHY=$BUILD_WHY
[[ $HAVE_TCPLAT == 0 ]] && log "tcp latency floor: $TCPLAT_WHY"
# CPU stalls seen by a spinning thread (bench/stalls.c): the machine's noise.
HAVE_STALLS=1; STALLS_BIN="$WORK/stalls"
build_c stalls -O2 || HAVE_STALLS=0; STALLS_WHY=$BUILD_WHY

# ---------------------------------------------------------------- 2. build
if [[ $DO_BUILD == 1 ]]; then
    command -v cargo >/dev/null || die "cargo not found (or use --no-build)"
    log "building chanio (release)"
    cargo build --release -p chanio-iounit -p chanio-host --bins >"$WORK/build.log" 2>&1 &&
        cargo build --release --example pingpong >>"$WORK/build.log" 2>&1 ||
        { tail -n 30 "$WORK/build.log" >&2; die "cargo build failed (use --no-build to bench existing binaries)"; }
fi
for b in "$IOUNITD" "$HOSTCTL" "$PINGPONG"; do
    [[ -x "$b" ]] || die "missing $b (build it, or drop --no-build)"
done
HAVE_PP_SHM=0
"$PINGPONG" --help 2>&1 | grep -q shm && HAVE_PP_SHM=1

# ---------------------------------------------------------------- table rows
# Block rows: KEY KIND LABEL PEER HASFLOOR
SECTION=block
NBD_PEER="fio nbd->nbdkit memory"
defrow b.rr1.mean  lower  "4k randread QD1 lat mean (us)"   "$NBD_PEER" 1
defrow b.rr1.p50   lower  "4k randread QD1 lat p50 (us)"    "$NBD_PEER" 1
defrow b.rr1.p99   lower  "4k randread QD1 lat p99 (us)"    "$NBD_PEER" 1
defrow b.rw1.mean  lower  "4k randwrite QD1 lat mean (us)"  "$NBD_PEER" 1
defrow b.rw1.p50   lower  "4k randwrite QD1 lat p50 (us)"   "$NBD_PEER" 1
defrow b.rw1.p99   lower  "4k randwrite QD1 lat p99 (us)"   "$NBD_PEER" 1
defrow b.rr32.iops higher "4k randread QD32 IOPS"           "$NBD_PEER" 1
defrow b.rw32.iops higher "4k randwrite QD32 IOPS"          "$NBD_PEER" 1
defrow b.sr128.mbps higher "128k read QD8 MB/s"             "$NBD_PEER" 1
defrow b.sw128.mbps higher "128k write QD8 MB/s"            "$NBD_PEER" 1
defrow cpu.rr32    lower  "CPU s/1M IO 4k randread QD32 (client+server)"  "$NBD_PEER" 0
defrow cpu.rw32    lower  "CPU s/1M IO 4k randwrite QD32 (client+server)" "$NBD_PEER" 0
defrow cpu.rr32.srv lower "CPU s/1M IO 4k randread QD32 (server only)"    "iounitd vs nbdkit" 0
# Block over shm: same workloads, same peer (and floor) samples as the tcp rows.
defrow bs.rr1.mean  lower  "4k randread QD1 lat mean (us) (shm)"   "$NBD_PEER" 1
defrow bs.rr1.p50   lower  "4k randread QD1 lat p50 (us) (shm)"    "$NBD_PEER" 1
defrow bs.rr1.p99   lower  "4k randread QD1 lat p99 (us) (shm)"    "$NBD_PEER" 1
defrow bs.rw1.mean  lower  "4k randwrite QD1 lat mean (us) (shm)"  "$NBD_PEER" 1
defrow bs.rw1.p50   lower  "4k randwrite QD1 lat p50 (us) (shm)"   "$NBD_PEER" 1
defrow bs.rw1.p99   lower  "4k randwrite QD1 lat p99 (us) (shm)"   "$NBD_PEER" 1
defrow bs.rr32.iops higher "4k randread QD32 IOPS (shm)"           "$NBD_PEER" 1
defrow bs.rw32.iops higher "4k randwrite QD32 IOPS (shm)"          "$NBD_PEER" 1
defrow bs.sr128.mbps higher "128k read QD8 MB/s (shm)"             "$NBD_PEER" 1
defrow bs.sw128.mbps higher "128k write QD8 MB/s (shm)"            "$NBD_PEER" 1
SECTION=messaging
for t in tcp shm; do
    if [[ $t == tcp ]]; then fip="fi_pingpong -p $FI_TCP_PROV -e msg"; else fip="fi_pingpong -p shm -e rdm"; fi
    defrow "m.$t.8.p50"   lower  "msg $t 8 B one-way p50 (us)"      "ucx_perftest tag_lat UCX_TLS=$t" 0
    defrow "m.$t.8.mean"  lower  "msg $t 8 B one-way mean (us)"     "$fip" 0
    defrow "m.$t.4k.p50"  lower  "msg $t 4 KiB one-way p50 (us)"    "ucx_perftest tag_lat UCX_TLS=$t" 0
    defrow "m.$t.4k.mean" lower  "msg $t 4 KiB one-way mean (us)"   "$fip" 0
    defrow "m.$t.64k.bw"  higher "msg $t 64 KiB stream MB/s"        "ucx_perftest ucp_am_bw UCX_TLS=$t" 0
    defrow "m.$t.1m.bw"   higher "msg $t 1 MiB stream MB/s"         "ucx_perftest ucp_am_bw UCX_TLS=$t" 0
done
defrow m.shm.1mw.bw higher "msg shm 1 MiB one-sided write MB/s" "ucx_perftest ucp_put_bw UCX_TLS=shm" 0
defrow memcpy.1m higher "shm 1 MiB one-sided write vs single-thread memcpy" "memcpy 1 MiB, 1 thread (MB/s)" 0
defrow memcpy.1m.cold higher "shm 1 MiB one-sided write vs cache-cold memcpy" "memcpy 1 MiB chunks over 64 MiB, 1 thread (MB/s)" 0
defrow tcp.1m.floor higher "tcp 1 MiB stream vs plain TCP write/read" "bench/tcpbw.c 1 MiB, 1 thread each (MB/s)" 0
defrow tcp.1m.zero higher "tcp 1 MiB stream vs plain TCP from a never-written source" "bench/tcpbw.c ... untouched (zero page, as ucx_perftest)" 0
defrow tcp.8.floor lower "msg tcp 8 B one-way p50 vs plain TCP ping-pong" "bench/tcplat.c 8 B, spinning recv(2) (us)" 0

# Storage rows (section storage): chanio over shm (and tcp) on a file.
SECTION=storage
FILE_PEER="fio nbd->nbdkit file"
defrow f.rr1.p50    lower  "file 4k randread QD1 lat p50 (us)"    "$FILE_PEER" 1
defrow f.rr1.mean   lower  "file 4k randread QD1 lat mean (us)"   "$FILE_PEER" 1
defrow f.rw1.p50    lower  "file 4k randwrite QD1 lat p50 (us)"   "$FILE_PEER" 1
defrow f.rr32.iops  higher "file 4k randread QD32 IOPS"           "$FILE_PEER" 1
defrow f.rw32.iops  higher "file 4k randwrite QD32 IOPS"          "$FILE_PEER" 1
defrow f.rr128.iops higher "file 4k randread QD128 IOPS"          "$FILE_PEER" 1
defrow f.rw128.iops higher "file 4k randwrite QD128 IOPS"         "$FILE_PEER" 1
defrow f.mix32.iops higher "file 4k randrw 70/30 QD32 IOPS"       "$FILE_PEER" 1
defrow f.sr128.mbps higher "file 128k read QD8 MB/s"              "$FILE_PEER" 1
defrow f.sw128.mbps higher "file 128k write QD8 MB/s"             "$FILE_PEER" 1
defrow ft.rr1.p50   lower  "file tcp 4k randread QD1 lat p50 (us)" "$FILE_PEER" 1
defrow ft.rr32.iops higher "file tcp 4k randread QD32 IOPS"       "$FILE_PEER" 1
defrow ft.rw32.iops higher "file tcp 4k randwrite QD32 IOPS"      "$FILE_PEER" 1
defrow f.cpu.rr32   lower  "iounitd CPU s/1M IO 4k randread QD32, file vs RAM (shm)" "iounitd --ns ram:1GiB, same workload" 0

# Targets the table is read against: KEY OP FACTOR TEXT; OP ge / le compare
# chanio / peer, gef / lef chanio / floor.
TARGETS="$WORK/targets.tsv"
{
    if want block; then
        printf '%s\t%s\t%s\t%s\n' bs.rr32.iops ge 5    "shm 4k randread QD32 IOPS vs fio nbd"
        printf '%s\t%s\t%s\t%s\n' bs.rr1.mean  le 0.1  "shm 4k randread QD1 lat mean vs fio nbd"
        printf '%s\t%s\t%s\t%s\n' bs.rr1.p50   le 0.1  "shm 4k randread QD1 lat p50 vs fio nbd"
    fi
    if want messaging; then
        printf '%s\t%s\t%s\t%s\n' memcpy.1m    ge 0.75 "shm 1 MiB one-sided write vs single-thread memcpy"
    fi
    if want storage; then
        printf '%s\t%s\t%s\t%s\n' f.rr32.iops  gef 0.85 "file shm 4k randread QD32 IOPS vs the local floor"
        printf '%s\t%s\t%s\t%s\n' f.rr32.iops  ge 2     "file shm 4k randread QD32 IOPS vs fio nbd->nbdkit file"
        printf '%s\t%s\t%s\t%s\n' ft.rr32.iops ge 2     "file tcp 4k randread QD32 IOPS vs fio nbd->nbdkit file"
        printf '%s\t%s\t%s\t%s\n' f.cpu.rr32   le 1     "iounitd CPU per I/O, file vs RAM namespace"
    fi
} >"$TARGETS"
SECTION=daemon
defrow idle.cpu  info "iounitd idle CPU, 4 hosts (ms CPU/s)" "-" 0
SECTION=all
defrow stall.every info "machine: a spinning thread stalled > 1 us every (us)" "-" 0
defrow stall.pct   info "machine: share of a spinning thread's time lost to stalls (%)" "-" 0
SECTION=daemon
defrow rss.base  info "iounitd VmRSS, 0 hosts (MiB)"         "-" 0
defrow rss.perq  info "iounitd VmRSS per connected queue (MiB)" "-" 0

# Peer-wide n/a reasons (recorded once; the table shows them in every row of that peer).
if [[ $HAVE_NBD == 0 ]]; then
    for k in b.rr1.mean b.rr1.p50 b.rr1.p99 b.rw1.mean b.rw1.p50 b.rw1.p99 b.rr32.iops b.rw32.iops \
             b.sr128.mbps b.sw128.mbps cpu.rr32 cpu.rw32 cpu.rr32.srv; do na "$k" peer "$NBD_WHY"; done
    for k in rr1.mean rr1.p50 rr1.p99 rw1.mean rw1.p50 rw1.p99 rr32.iops rw32.iops \
             sr128.mbps sw128.mbps; do na "bs.$k" peer "$NBD_WHY"; done
fi
if [[ $HAVE_FLOOR == 0 ]]; then
    for k in rr1.mean rr1.p50 rr1.p99 rw1.mean rw1.p50 rw1.p99 rr32.iops rw32.iops \
             sr128.mbps sw128.mbps; do na "b.$k" floor "$FLOOR_WHY"; na "bs.$k" floor "$FLOOR_WHY"; done
fi
for t in tcp shm; do
    [[ $HAVE_UCX == 0 ]] && for k in 8.p50 4k.p50 64k.bw 1m.bw; do na "m.$t.$k" peer "$UCX_WHY"; done
    [[ $HAVE_UCX == 0 && $t == shm ]] && na m.shm.1mw.bw peer "$UCX_WHY"
    [[ $HAVE_FI == 0 ]] && for k in 8.mean 4k.mean; do na "m.$t.$k" peer "$FI_WHY"; done
done
if [[ $HAVE_PP_SHM == 0 ]]; then
    log "shm: not built yet"
    for k in 8.p50 8.mean 4k.p50 4k.mean 64k.bw 1m.bw 1mw.bw; do na "m.shm.$k" chanio "shm: not built yet"; done
    na memcpy.1m chanio "shm: not built yet"
    na memcpy.1m.cold chanio "shm: not built yet"
fi
[[ $HAVE_MEMCPY == 0 ]] && na memcpy.1m peer "$MEMCPY_WHY" && na memcpy.1m.cold peer "$MEMCPY_WHY"
[[ $HAVE_TCPBW == 0 ]] && na tcp.1m.floor peer "$TCPBW_WHY" && na tcp.1m.zero peer "$TCPBW_WHY"
[[ $HAVE_TCPLAT == 0 ]] && na tcp.8.floor peer "$TCPLAT_WHY"

# The machine's noise, measured once before anything is timed.
if [[ $HAVE_STALLS == 1 ]]; then
    o="$WORK/stalls.json"
    if timeout 30 "$STALLS_BIN" 2 >"$o" 2>"$o.err" && r="$(py stalls "$o" 2>"$o.perr")"; then
        read -r every pct <<<"$r"
        rec stall.every chanio "$every"; rec stall.pct chanio "$pct"
        log "machine noise: a spinning thread is stalled > 1 us every $every us ($pct % of its time)"
    else
        na stall.every chanio "stalls failed: $(short_err "$o.err")"; na stall.pct chanio "stalls failed: $(short_err "$o.err")"
    fi
else
    na stall.every chanio "$STALLS_WHY"; na stall.pct chanio "$STALLS_WHY"
fi

# ---------------------------------------------------------------- 3a. block
if want block; then
# workload table: ID RW BS QD (run order: writes first so both RAM targets are populated)
BLOCK_WORKLOADS=(
    "sw128 write 128k 8"
    "sr128 read 128k 8"
    "rw1 randwrite 4k 1"
    "rr1 randread 4k 1"
    "rw32 randwrite 4k 32"
    "rr32 randread 4k 32"
)
FLOOR_ENGINE=io_uring
if [[ $HAVE_FLOOR == 1 ]]; then
    log "laying out the floor file $FLOOR_FILE (1 GiB, tmpfs)"
    if fio --name=probe --ioengine=io_uring --filename="$FLOOR_FILE" --size=1G --rw=randread --bs=4k \
           --iodepth=4 --time_based --runtime=1 --output-format=json --output="$WORK/floor-probe.json" \
           >"$WORK/floor-probe.log" 2>&1 && py block fio "$WORK/floor-probe.json" >/dev/null 2>&1; then
        FLOOR_ENGINE=io_uring
    else
        FLOOR_ENGINE=psync
        log "io_uring does not work on tmpfs here; floor uses psync numjobs=QD"
    fi
fi

# record IOPS/MB/s/latency of one block run: ID SIDE "iops mbps mean p50 p99 total" [PREFIX]
# PREFIX: b = the tcp rows (default), bs = the "(shm)" rows.
rec_block() {
    local id=$1 side=$2 k="${4:-b}.$1" iops mbps mean p50 p99 total
    read -r iops mbps mean p50 p99 total <<<"$3"
    case $id in
        rr1|rw1) rec "$k.mean" "$side" "$mean"; rec "$k.p50" "$side" "$p50"; rec "$k.p99" "$side" "$p99" ;;
        rr32|rw32) rec "$k.iops" "$side" "$iops" ;;
        sr128|sw128) rec "$k.mbps" "$side" "$mbps" ;;
    esac
}
na_block() { # ID SIDE WHY [PREFIX]
    local id=$1 side=$2 why=$3 k="${4:-b}.$1"
    case $id in
        rr1|rw1) na "$k.mean" "$side" "$why"; na "$k.p50" "$side" "$why"; na "$k.p99" "$side" "$why" ;;
        rr32|rw32) na "$k.iops" "$side" "$why" ;;
        sr128|sw128) na "$k.mbps" "$side" "$why" ;;
    esac
}

IOU_PID=""; NBD_PID=""
IOU_PORT="$(free_port)"
log "starting iounitd on tcp://127.0.0.1:$IOU_PORT (ram:1GiB)"
"$IOUNITD" --listen "tcp://127.0.0.1:$IOU_PORT" --ns ram:1GiB >"$WORK/iounitd.out" 2>"$WORK/iounitd.err" &
IOU_PID=$!; PIDS+=("$IOU_PID")
wait_ready "$IOU_PID" 30 "$IOU_PORT" "$WORK/iounitd.out" "listening on" ||
    { cat "$WORK/iounitd.err" >&2; die "iounitd did not come up"; }
# A second iounitd for the "(shm)" rows; if it cannot start, those rows say why.
SHM_NAME="chanio-bench-$$-1"; SHM_PID=""; HAVE_BSHM=1; BSHM_WHY=""
log "starting iounitd on shm://$SHM_NAME (ram:1GiB)"
"$IOUNITD" --listen "shm://$SHM_NAME" --ns ram:1GiB >"$WORK/iounitd-shm.out" 2>"$WORK/iounitd-shm.err" &
SHM_PID=$!; PIDS+=("$SHM_PID")
if ! wait_ready "$SHM_PID" 30 - "$WORK/iounitd-shm.out" "listening on"; then
    HAVE_BSHM=0; BSHM_WHY="shm iounitd did not start: $(short_err "$WORK/iounitd-shm.err")"
    log "$BSHM_WHY"; stop_pid "$SHM_PID"; SHM_PID=""
fi
if [[ $HAVE_NBD == 1 ]]; then
    NBD_PORT="$(free_port)"
    log "starting nbdkit memory 1G on 127.0.0.1:$NBD_PORT"
    nbdkit -f -i 127.0.0.1 -p "$NBD_PORT" memory 1G >"$WORK/nbdkit.log" 2>&1 &
    NBD_PID=$!; PIDS+=("$NBD_PID")
    if ! wait_ready "$NBD_PID" 30 "$NBD_PORT"; then
        NBD_WHY="nbdkit did not start: $(short_err "$WORK/nbdkit.log")"; HAVE_NBD=0
        for w in "${BLOCK_WORKLOADS[@]}"; do na_block "${w%% *}" peer "$NBD_WHY"; na_block "${w%% *}" peer "$NBD_WHY" bs; done
        for k in cpu.rr32 cpu.rw32 cpu.rr32.srv; do na "$k" peer "$NBD_WHY"; done
    fi
fi

# Every RAM namespace is written once, whole, before anything is timed: on a
# VM the first touch of fresh memory is slow (the hypervisor backs the page),
# for chanio and nbdkit alike, and the first timed workload would pay for it.
log "prefilling the RAM namespaces (1 GiB each, sequential writes)"
"$HOSTCTL" --target "tcp://127.0.0.1:$IOU_PORT" bench --ns 1 --rw write --bs 512k --qd 4 --time 4s --json \
    >"$WORK/prefill-tcp.json" 2>&1 || log "prefill of the tcp namespace failed: $(short_err "$WORK/prefill-tcp.json")"
if [[ $HAVE_BSHM == 1 ]]; then
    "$HOSTCTL" --target "shm://$SHM_NAME" bench --ns 1 --rw write --bs 512k --qd 4 --time 4s --json \
        >"$WORK/prefill-shm.json" 2>&1 || log "prefill of the shm namespace failed: $(short_err "$WORK/prefill-shm.json")"
fi
if [[ $HAVE_NBD == 1 ]]; then
    fio --name=prefill --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT" --rw=write --bs=1M --size=1G \
        --iodepth=4 --output="$WORK/prefill-nbd.log" >/dev/null 2>&1 || log "prefill of nbdkit failed: $(short_err "$WORK/prefill-nbd.log")"
fi

run=0
for ((rep = 1; rep <= REPEATS; rep++)); do
    for w in "${BLOCK_WORKLOADS[@]}"; do
        read -r id rw bs qd <<<"$w"
        run=$((run + 1))
        summary="[$rep/$REPEATS] block $bs $rw QD$qd:"
        # chanio
        j="$WORK/chanio-$id-$rep.json"
        s0="$(proc_ticks "$IOU_PID")"
        if run_cpu "$WORK/cpu" "$j" "$j.err" timeout $((BLOCK_TIME + 60)) \
               "$HOSTCTL" --target "tcp://127.0.0.1:$IOU_PORT" bench --ns 1 --rw "$rw" --bs "$bs" \
               --qd "$qd" --time "${BLOCK_TIME}s" --json &&
           r="$(py block hostctl "$j" 2>"$j.perr")"; then
            s1="$(proc_ticks "$IOU_PID")"
            rec_block "$id" chanio "$r"
            summary+=" chanio {$r}"
            if [[ $id == rr32 || $id == rw32 ]]; then
                read -r iops _ <<<"$r"
                ios="$(python3 -c "print($iops * $BLOCK_TIME)")"
                rec "cpu.$id" chanio "$(python3 -c "print(($(cat "$WORK/cpu") + $s1 - $s0) / $CLK_TCK / $ios * 1e6)")"
                [[ $id == rr32 ]] && rec cpu.rr32.srv chanio "$(python3 -c "print(($s1 - $s0) / $CLK_TCK / $ios * 1e6)")"
            fi
        else
            why="hostctl failed: $(short_err "$j.err")"
            na_block "$id" chanio "$why"; summary+=" chanio FAILED ($why)"
            [[ $id == rr32 || $id == rw32 ]] && na "cpu.$id" chanio "$why"
        fi
        # chanio over shm (same workload, second iounitd)
        if [[ $HAVE_BSHM == 1 ]] && ! kill -0 "$SHM_PID" 2>/dev/null; then
            HAVE_BSHM=0; BSHM_WHY="iounitd shm exited: $(short_err "$WORK/iounitd-shm.err")"; log "$BSHM_WHY"
        fi
        if [[ $HAVE_BSHM == 1 ]]; then
            j="$WORK/chanio-shm-$id-$rep.json"
            if timeout $((BLOCK_TIME + 60)) "$HOSTCTL" --target "shm://$SHM_NAME" bench --ns 1 --rw "$rw" --bs "$bs" \
                   --qd "$qd" --time "${BLOCK_TIME}s" --json >"$j" 2>"$j.err" &&
               r="$(py block hostctl "$j" 2>"$j.perr")"; then
                rec_block "$id" chanio "$r" bs
                summary+=" shm {$r}"
            else
                why="hostctl shm failed: $(short_err "$j.err")"
                na_block "$id" chanio "$why" bs; summary+=" shm FAILED ($why)"
            fi
        else
            na_block "$id" chanio "$BSHM_WHY" bs
        fi
        # peer: fio nbd -> nbdkit
        if [[ $HAVE_NBD == 1 ]]; then
            j="$WORK/nbd-$id-$rep.json"
            s0="$(proc_ticks "$NBD_PID")"
            if run_cpu "$WORK/cpu" "$j.stdout" "$j.err" timeout $((BLOCK_TIME + 60)) \
                   fio --name=nbd --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT" --rw="$rw" --bs="$bs" \
                   --iodepth="$qd" --size=1G --time_based --runtime="$BLOCK_TIME" --lat_percentiles=1 \
                   --output-format=json --output="$j" &&
               r="$(py block fio "$j" 2>"$j.perr")"; then
                s1="$(proc_ticks "$NBD_PID")"
                rec_block "$id" peer "$r"; rec_block "$id" peer "$r" bs   # the shm rows compare with the same run
                summary+=" nbd {$r}"
                if [[ $id == rr32 || $id == rw32 ]]; then
                    read -r _ _ _ _ _ total <<<"$r"
                    rec "cpu.$id" peer "$(python3 -c "print(($(cat "$WORK/cpu") + $s1 - $s0) / $CLK_TCK / $total * 1e6)")"
                    [[ $id == rr32 ]] && rec cpu.rr32.srv peer "$(python3 -c "print(($s1 - $s0) / $CLK_TCK / $total * 1e6)")"
                fi
            else
                why="fio nbd failed: $(short_err "$j.err")"
                na_block "$id" peer "$why"; na_block "$id" peer "$why" bs; summary+=" nbd FAILED"
                [[ $id == rr32 || $id == rw32 ]] && na "cpu.$id" peer "$why"
            fi
        fi
        # floor: fio on tmpfs
        if [[ $HAVE_FLOOR == 1 ]]; then
            j="$WORK/floor-$id-$rep.json"
            if [[ $qd == 1 ]]; then
                eng=(--ioengine=psync)
            elif [[ $FLOOR_ENGINE == io_uring ]]; then
                eng=(--ioengine=io_uring --iodepth="$qd")
            else
                eng=(--ioengine=psync --numjobs="$qd" --group_reporting)
            fi
            if timeout $((BLOCK_TIME + 60)) fio --name=floor "${eng[@]}" --filename="$FLOOR_FILE" --size=1G \
                   --rw="$rw" --bs="$bs" --time_based --runtime="$BLOCK_TIME" --lat_percentiles=1 \
                   --output-format=json --output="$j" >"$j.stdout" 2>"$j.err" &&
               r="$(py block fio "$j" 2>"$j.perr")"; then
                rec_block "$id" floor "$r"; rec_block "$id" floor "$r" bs; summary+=" floor {$r}"
            else
                why="fio on tmpfs failed: $(short_err "$j.err")"
                na_block "$id" floor "$why"; na_block "$id" floor "$why" bs; summary+=" floor FAILED"
            fi
        fi
        log "$summary"
    done
done
[[ -n "$NBD_PID" ]] && stop_pid "$NBD_PID"
[[ -n "$SHM_PID" ]] && stop_pid "$SHM_PID"
stop_pid "$IOU_PID"
rm -f "$FLOOR_FILE"

fi # block

# ---------------------------------------------------------------- 3b. messaging
if want messaging; then
# A client/server pair inside a private network namespace that only has lo:
# the peers' rendezvous sockets bind 0.0.0.0, which there means loopback only.
NETPAIR="$WORK/netpair.sh"
cat >"$NETPAIR" <<'EOF'
# netpair.sh PORT SRVLOG CLILOG SERVER... ::: CLIENT...   (run under unshare -n)
set -u
port=$1 srvlog=$2 clilog=$3; shift 3
srv=(); while [[ $# -gt 0 && $1 != ::: ]]; do srv+=("$1"); shift; done; shift
ip link set lo up || exit 90
timeout 300 "${srv[@]}" >"$srvlog" 2>&1 &
spid=$!
trap 'kill $spid 2>/dev/null' EXIT
trap 'exit 143' TERM INT
for ((i = 0; i < 100; i++)); do
    ss -Htln "sport = :$port" | grep -q . && break
    kill -0 $spid 2>/dev/null || { echo "server exited early: $(grep -v '^[[:space:]]*$' "$srvlog" | tail -n 1)" >"$clilog"; exit 91; }
    sleep 0.1
done
timeout 240 "$@" >"$clilog" 2>&1
rc=$?
for ((i = 0; i < 50; i++)); do kill -0 $spid 2>/dev/null || break; sleep 0.1; done
exit $rc
EOF

ucx_run() { # TLS TEST SIZE ITERS OUT
    local tls=$1 test=$2 size=$3 iters=$4 out=$5
    UCX_TLS="$tls" UCX_WARN_UNUSED_ENV_VARS=n timeout 300 unshare -n bash "$NETPAIR" 13337 "$out.srv" "$out" \
        ucx_perftest -p 13337 -t "$test" -s "$size" -n "$iters" -w 1000 -f ::: \
        ucx_perftest 127.0.0.1 -p 13337 -t "$test" -s "$size" -n "$iters" -w 1000 -f
}
fi_run() { # PROV EPTYPE SIZE ITERS OUT
    local prov=$1 ep=$2 size=$3 iters=$4 out=$5
    timeout 300 unshare -n bash "$NETPAIR" 47592 "$out.srv" "$out" \
        fi_pingpong -p "$prov" -e "$ep" -I "$iters" -S "$size" -B 47592 ::: \
        fi_pingpong -p "$prov" -e "$ep" -I "$iters" -S "$size" -P 47592 127.0.0.1
}

# baseline KEY PARSER LABEL UNIT OUT CMD...: runs one C baseline of bench/
# (timeout 120 s), parses OUT with the helper's PARSER and records the figure
# as KEY's peer value, or why there is none; notes it in $summary.
baseline() {
    local key=$1 parser=$2 label=$3 unit=$4 o=$5 r
    shift 5
    if timeout 120 "$@" >"$o" 2>"$o.err" && r="$(py "$parser" "$o" 2>"$o.perr")"; then
        rec "$key" peer "$r"; summary+=" $label {$unit $r}"
    else
        na "$key" peer "$label failed: $(short_err "$o.err")"; summary+=" $label FAILED"
    fi
}

# MSG_WORKLOADS: ID MODE SIZE(pingpong) BYTES ITERS
MSG_WORKLOADS=(
    "8 send 8 8 $LAT_ITERS"
    "4k send 4KiB 4096 $LAT_ITERS"
    "64k push 64KiB 65536 $BW64K_ITERS"
    "1m push 1MiB 1048576 $BW1M_ITERS"
    "1mw write 1MiB 1048576 $BW1M_ITERS"
)
for ((rep = 1; rep <= REPEATS; rep++)); do
    for t in tcp shm; do
        for w in "${MSG_WORKLOADS[@]}"; do
            read -r id mode size bytes iters <<<"$w"
            [[ $mode == write && $t != shm ]] && continue   # the one-sided write is measured over shm
            summary="[$rep/$REPEATS] msg $t $mode $size:"
            # chanio pingpong (server and client in one process)
            if [[ $t == tcp || $HAVE_PP_SHM == 1 ]]; then
                j="$WORK/pp-$t-$id-$rep.json"
                zc=(); [[ $mode == push ]] && zc=(--zero-copy)
                if timeout 300 "$PINGPONG" --transport "$t" --mode "$mode" --size "$size" --iters "$iters" "${zc[@]}" --json \
                       >"$j" 2>"$j.err" && r="$(py pingpong "$j" 2>"$j.perr")"; then
                    read -r p50 mean mbps <<<"$r"
                    if [[ $mode == send ]]; then
                        rec "m.$t.$id.p50" chanio "$p50"; rec "m.$t.$id.mean" chanio "$mean"
                        [[ $t == tcp && $id == 8 ]] && rec tcp.8.floor chanio "$p50"
                    else
                        rec "m.$t.$id.bw" chanio "$mbps"
                        [[ $t == shm && $id == 1mw ]] && rec memcpy.1m chanio "$mbps" && rec memcpy.1m.cold chanio "$mbps"
                        [[ $t == tcp && $id == 1m ]] && rec tcp.1m.floor chanio "$mbps" && rec tcp.1m.zero chanio "$mbps"
                    fi
                    summary+=" chanio {p50 $p50 mean $mean MB/s $mbps}"
                else
                    why="pingpong failed: $(short_err "$j.err")"; summary+=" chanio FAILED"
                    if [[ $mode == send ]]; then na "m.$t.$id.p50" chanio "$why"; na "m.$t.$id.mean" chanio "$why"
                    else na "m.$t.$id.bw" chanio "$why"; fi
                    [[ $t == tcp && $id == 8 ]] && na tcp.8.floor chanio "$why"
                    [[ $t == shm && $id == 1mw ]] && na memcpy.1m chanio "$why" && na memcpy.1m.cold chanio "$why"
                    [[ $t == tcp && $id == 1m ]] && na tcp.1m.floor chanio "$why" && na tcp.1m.zero chanio "$why"
                fi
            else
                summary+=" chanio: shm not built yet"
            fi
            # ucx_perftest
            if [[ $HAVE_UCX == 1 ]]; then
                o="$WORK/ucx-$t-$id-$rep.txt"
                case $mode in send) test=tag_lat ;; push) test=ucp_am_bw ;; *) test=ucp_put_bw ;; esac
                if ucx_run "$t" "$test" "$bytes" "$iters" "$o" >/dev/null 2>&1 && r="$(py ucx "$o" 2>/dev/null)"; then
                    read -r p50 avg mbps <<<"$r"
                    if [[ $mode == send ]]; then rec "m.$t.$id.p50" peer "$p50"; else rec "m.$t.$id.bw" peer "$mbps"; fi
                    summary+=" ucx $test {p50 $p50 avg $avg MB/s $mbps}"
                else
                    why="ucx_perftest $test UCX_TLS=$t failed: $(short_err "$o")"; summary+=" ucx FAILED"
                    if [[ $mode == send ]]; then na "m.$t.$id.p50" peer "$why"; else na "m.$t.$id.bw" peer "$why"; fi
                fi
            fi
            # fi_pingpong (latency only: it has no streaming test)
            if [[ $HAVE_FI == 1 && $mode == send ]]; then
                o="$WORK/fi-$t-$id-$rep.txt"
                if [[ $t == tcp ]]; then prov=$FI_TCP_PROV; ep=msg; else prov=shm; ep=rdm; fi
                if fi_run "$prov" "$ep" "$bytes" "$iters" "$o" >/dev/null 2>&1 && r="$(py fi "$o" 2>/dev/null)"; then
                    rec "m.$t.$id.mean" peer "$r"; summary+=" fi_pingpong {mean $r}"
                else
                    na "m.$t.$id.mean" peer "fi_pingpong -p $prov failed: $(short_err "$o")"; summary+=" fi FAILED"
                fi
            fi
            # plain TCP ping-pong of 8 bytes, next to the tcp 8 B latency
            if [[ $HAVE_TCPLAT == 1 && $t == tcp && $id == 8 ]]; then
                baseline tcp.8.floor tcplat "plain tcp ping-pong" p50 "$WORK/tcplat-$rep.json" \
                    "$TCPLAT_BIN" "$bytes" "$iters"
            fi
            # plain TCP streaming of 1 MiB messages, next to the tcp 1 MiB stream
            if [[ $HAVE_TCPBW == 1 && $t == tcp && $id == 1m ]]; then
                baseline tcp.1m.floor memcpy "plain tcp" MB/s "$WORK/tcpbw-$rep.json" \
                    "$TCPBW_BIN" "$bytes" "$iters"
                baseline tcp.1m.zero memcpy "plain tcp untouched" MB/s "$WORK/tcpbw-zero-$rep.json" \
                    "$TCPBW_BIN" "$bytes" "$iters" "$bytes" untouched
            fi
            # single-thread memcpy of 1 MiB, next to the shm 1 MiB one-sided write
            if [[ $HAVE_MEMCPY == 1 && $t == shm && $id == 1mw ]]; then
                baseline memcpy.1m memcpy memcpy MB/s "$WORK/memcpy-$rep.json" \
                    "$MEMCPY_BIN" "$bytes" "$MEMCPY_ITERS"
                baseline memcpy.1m.cold memcpy "cold memcpy" MB/s "$WORK/memcpy-cold-$rep.json" \
                    "$MEMCPY_BIN" "$bytes" "$MEMCPY_COLD_ITERS" $((64 * 1048576))
            fi
            log "$summary"
        done
    done
done

fi # messaging

# ---------------------------------------------------------------- 3c. daemon idle CPU and RSS
if want daemon; then
for ((rep = 1; rep <= REPEATS; rep++)); do
    port="$(free_port)"
    "$IOUNITD" --listen "tcp://127.0.0.1:$port" --ns ram:1GiB >"$WORK/idle.out" 2>"$WORK/idle.err" &
    ipid=$!; PIDS+=("$ipid")
    if ! wait_ready "$ipid" 30 "$port" "$WORK/idle.out" "listening on"; then
        na idle.cpu chanio "iounitd did not start"; na rss.base chanio "iounitd did not start"
        na rss.perq chanio "iounitd did not start"; stop_pid "$ipid"; continue
    fi
    sleep 1
    rss0="$(proc_rss_kb "$ipid")"
    wpids=()
    for h in 1 2 3 4; do
        "$HOSTCTL" --target "tcp://127.0.0.1:$port" --hostnqn "nqn.2026-11.io.chanio:bench-idle-$h" \
            watch --timeout 30s >"$WORK/watch-$h.log" 2>&1 &
        wpids+=($!); PIDS+=($!)
    done
    # wait for 8 established queues (4 hosts x admin + 1 I/O queue)
    nq=0
    for ((i = 0; i < 150; i++)); do
        nq="$(ss -Htn state established "( sport = :$port )" 2>/dev/null | wc -l)"
        [[ $nq -ge 8 ]] && break
        sleep 0.1
    done
    if [[ $nq -lt 8 ]]; then
        why="only $nq of 8 queues connected: $(short_err "$WORK/watch-1.log")"
        na idle.cpu chanio "$why"; na rss.perq chanio "$why"
    else
        sleep 1
        rss8="$(proc_rss_kb "$ipid")"
        t0="$(proc_ticks "$ipid")"; sleep "$IDLE_SECS"; t1="$(proc_ticks "$ipid")"
        idle="$(python3 -c "print(($t1 - $t0) / $CLK_TCK * 1000 / $IDLE_SECS)")"
        rec idle.cpu chanio "$idle"
        rec rss.perq chanio "$(python3 -c "print(($rss8 - $rss0) / 8 / 1024)")"
        log "[$rep/$REPEATS] iounitd: idle ${idle} ms CPU/s with 4 hosts; VmRSS ${rss0} kB -> ${rss8} kB with 8 queues"
    fi
    rec rss.base chanio "$(python3 -c "print($rss0 / 1024)")"
    for p in "${wpids[@]}"; do stop_pid "$p"; done
    stop_pid "$ipid"
done

fi # daemon

# ---------------------------------------------------------------- 3d. storage (a file on the disk)
if want storage; then
STORE_DIR="${CHANIO_BENCH_DIR:-$ROOT/target/bench-storage}"
STORE_IMG="$STORE_DIR/ns.img"
STORE_KEYS=(f.rr1.p50 f.rr1.mean f.rw1.p50 f.rr32.iops f.rw32.iops f.rr128.iops f.rw128.iops f.mix32.iops
            f.sr128.mbps f.sw128.mbps ft.rr1.p50 ft.rr32.iops ft.rw32.iops)
# workload table: ID RW BS QD; tcp runs too for the ids with "ft." rows
STORE_WORKLOADS=(
    "sw128 write 128k 8"
    "sr128 read 128k 8"
    "rw1 randwrite 4k 1"
    "rr1 randread 4k 1"
    "rw32 randwrite 4k 32"
    "rr32 randread 4k 32"
    "rw128 randwrite 4k 128"
    "rr128 randread 4k 128"
    "mix32 randrw 4k 32"
)
HAVE_STORE=1; STORE_WHY=""
if ! mkdir -p "$STORE_DIR" 2>/dev/null; then
    HAVE_STORE=0; STORE_WHY="cannot create $STORE_DIR"
elif [[ ! -f "$STORE_IMG" || "$(stat -c %s "$STORE_IMG")" != 1073741824 ]]; then
    log "laying out $STORE_IMG (1 GiB of random data, once; kept for later runs)"
    head -c 1G /dev/urandom >"$STORE_IMG.tmp" 2>"$WORK/layout.err" && mv "$STORE_IMG.tmp" "$STORE_IMG" ||
        { HAVE_STORE=0; STORE_WHY="cannot write $STORE_IMG: $(short_err "$WORK/layout.err")"; rm -f "$STORE_IMG.tmp"; }
fi
if [[ $HAVE_STORE == 1 ]] &&
   ! python3 -c 'import os,sys; os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT))' "$STORE_IMG" 2>/dev/null; then
    HAVE_STORE=0; STORE_WHY="$STORE_DIR refuses O_DIRECT (tmpfs?); set CHANIO_BENCH_DIR to a directory on a disk"
fi
# Writes out and drops the file's page cache, so that no side reads what
# another left there.
drop_cache() {
    python3 -c 'import os,sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.fdatasync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)' "$STORE_IMG" 2>/dev/null || true
}
# record one run: ID SIDE "iops mbps mean p50 p99 total" PREFIX
rec_store() {
    local id=$1 side=$2 k="$4.$1" iops mbps mean p50 p99 total
    read -r iops mbps mean p50 p99 total <<<"$3"
    rec "$k.p50" "$side" "$p50"; rec "$k.mean" "$side" "$mean"
    rec "$k.iops" "$side" "$iops"; rec "$k.mbps" "$side" "$mbps"
}
na_store() { # ID SIDE WHY PREFIX...
    local id=$1 side=$2 why=$3 p k; shift 3
    for p in "$@"; do for k in p50 mean iops mbps; do na "$p.$id.$k" "$side" "$why"; done; done
}
STORE_NBD=$HAVE_NBD; STORE_NBD_WHY="$NBD_WHY"
if [[ $STORE_NBD == 1 ]] && ! nbdkit file --dump-plugin >/dev/null 2>&1; then
    STORE_NBD=0; STORE_NBD_WHY="nbdkit file plugin missing"
fi
if [[ $HAVE_STORE == 0 ]]; then
    log "storage: $STORE_WHY"
    for k in "${STORE_KEYS[@]}" f.cpu.rr32; do na "$k" chanio "$STORE_WHY"; done
else
    SPORT="$(free_port)"; SNAME="chanio-bench-$$-file"
    log "starting iounitd on tcp://127.0.0.1:$SPORT and shm://$SNAME (file:$STORE_IMG)"
    "$IOUNITD" --listen "tcp://127.0.0.1:$SPORT" --listen "shm://$SNAME" --ns "file:$STORE_IMG:1GiB:4096" \
        >"$WORK/iounitd-file.out" 2>"$WORK/iounitd-file.err" &
    SPID=$!; PIDS+=("$SPID")
    wait_ready "$SPID" 30 "$SPORT" || { cat "$WORK/iounitd-file.err" >&2; die "iounitd (file) did not come up"; }
    RNAME="chanio-bench-$$-ram"
    "$IOUNITD" --listen "shm://$RNAME" --ns ram:1GiB:4096 >"$WORK/iounitd-ram.out" 2>"$WORK/iounitd-ram.err" &
    RPID=$!; PIDS+=("$RPID")
    HAVE_RAMCMP=1
    if wait_ready "$RPID" 30 - "$WORK/iounitd-ram.out" "listening on"; then
        "$HOSTCTL" --target "shm://$RNAME" bench --ns 1 --rw write --bs 512k --qd 4 --time 4s --json \
            >"$WORK/prefill-ram.json" 2>&1 || log "prefill of the RAM namespace failed"
    else
        HAVE_RAMCMP=0; na f.cpu.rr32 peer "RAM iounitd did not start: $(short_err "$WORK/iounitd-ram.err")"
    fi
    NPID=""
    if [[ $STORE_NBD == 1 ]]; then
        NPORT="$(free_port)"
        nbdkit -f -i 127.0.0.1 -p "$NPORT" file "$STORE_IMG" cache=none >"$WORK/nbdkit-file.log" 2>&1 &
        NPID=$!; PIDS+=("$NPID")
        wait_ready "$NPID" 30 "$NPORT" || { STORE_NBD=0; STORE_NBD_WHY="nbdkit file did not start: $(short_err "$WORK/nbdkit-file.log")"; }
    fi
    if [[ $STORE_NBD == 0 ]]; then
        for w in "${STORE_WORKLOADS[@]}"; do na_store "${w%% *}" peer "$STORE_NBD_WHY" f ft; done
    fi
    for ((rep = 1; rep <= REPEATS; rep++)); do
        for w in "${STORE_WORKLOADS[@]}"; do
            read -r id rw bs qd <<<"$w"
            mix=(); fmix=()
            [[ $rw == randrw ]] && mix=(--rwmixread 70) && fmix=(--rwmixread=70)
            summary="[$rep/$REPEATS] file $bs $rw QD$qd:"
            # chanio over shm, then tcp (for the ft. rows)
            for t in shm tcp; do
                p=f; target="shm://$SNAME"
                if [[ $t == tcp ]]; then
                    [[ $id == rr1 || $id == rr32 || $id == rw32 ]] || continue
                    p=ft; target="tcp://127.0.0.1:$SPORT"
                fi
                drop_cache
                j="$WORK/file-$t-$id-$rep.json"
                s0="$(proc_ticks "$SPID")"
                if timeout $((BLOCK_TIME + 60)) "$HOSTCTL" --target "$target" bench --ns 1 --rw "$rw" "${mix[@]}" \
                       --bs "$bs" --qd "$qd" --time "${BLOCK_TIME}s" --json >"$j" 2>"$j.err" &&
                   r="$(py block hostctl "$j" 2>"$j.perr")"; then
                    s1="$(proc_ticks "$SPID")"
                    rec_store "$id" chanio "$r" "$p"; summary+=" $t {$r}"
                    if [[ $t == shm && $id == rr32 ]]; then
                        read -r iops _ <<<"$r"
                        rec f.cpu.rr32 chanio "$(python3 -c "print(($s1 - $s0) / $CLK_TCK / ($iops * $BLOCK_TIME) * 1e6)")"
                    fi
                else
                    why="hostctl $t failed: $(short_err "$j.err")"
                    na_store "$id" chanio "$why" "$p"; summary+=" $t FAILED ($why)"
                fi
            done
            # iounitd on RAM, same workload: its CPU per I/O
            if [[ $id == rr32 && $HAVE_RAMCMP == 1 ]]; then
                j="$WORK/ram-$id-$rep.json"
                s0="$(proc_ticks "$RPID")"
                if timeout $((BLOCK_TIME + 60)) "$HOSTCTL" --target "shm://$RNAME" bench --ns 1 --rw "$rw" \
                       --bs "$bs" --qd "$qd" --time "${BLOCK_TIME}s" --json >"$j" 2>"$j.err" &&
                   r="$(py block hostctl "$j" 2>"$j.perr")"; then
                    s1="$(proc_ticks "$RPID")"
                    read -r iops _ <<<"$r"
                    rec f.cpu.rr32 peer "$(python3 -c "print(($s1 - $s0) / $CLK_TCK / ($iops * $BLOCK_TIME) * 1e6)")"
                    summary+=" ram {$r}"
                else
                    na f.cpu.rr32 peer "hostctl on RAM failed: $(short_err "$j.err")"
                fi
            fi
            # peer: fio nbd -> nbdkit file
            if [[ $STORE_NBD == 1 ]]; then
                drop_cache
                j="$WORK/nbdfile-$id-$rep.json"
                if timeout $((BLOCK_TIME + 60)) fio --name=nbd --ioengine=nbd --uri="nbd://127.0.0.1:$NPORT" \
                       --rw="$rw" "${fmix[@]}" --bs="$bs" --iodepth="$qd" --size=1G --time_based \
                       --runtime="$BLOCK_TIME" --lat_percentiles=1 --output-format=json --output="$j" \
                       >"$j.stdout" 2>"$j.err" &&
                   r="$(py block fio "$j" 2>"$j.perr")"; then
                    rec_store "$id" peer "$r" f; rec_store "$id" peer "$r" ft; summary+=" nbd {$r}"
                else
                    why="fio nbd failed: $(short_err "$j.err")"
                    na_store "$id" peer "$why" f ft; summary+=" nbd FAILED"
                fi
            fi
            # floor: fio io_uring O_DIRECT on the same file
            if [[ $HAVE_FLOOR == 1 ]]; then
                drop_cache
                j="$WORK/filefloor-$id-$rep.json"
                if timeout $((BLOCK_TIME + 60)) fio --name=floor --ioengine=io_uring --direct=1 --iodepth="$qd" \
                       --filename="$STORE_IMG" --size=1G --rw="$rw" "${fmix[@]}" --bs="$bs" --time_based \
                       --runtime="$BLOCK_TIME" --lat_percentiles=1 --output-format=json --output="$j" \
                       >"$j.stdout" 2>"$j.err" &&
                   r="$(py block fio "$j" 2>"$j.perr")"; then
                    rec_store "$id" floor "$r" f; rec_store "$id" floor "$r" ft; summary+=" floor {$r}"
                else
                    why="fio io_uring --direct=1 failed: $(short_err "$j.err")"
                    na_store "$id" floor "$why" f ft; summary+=" floor FAILED"
                fi
            else
                na_store "$id" floor "$FLOOR_WHY" f ft
            fi
            log "$summary"
        done
    done
    [[ -n "$NPID" ]] && stop_pid "$NPID"
    stop_pid "$RPID"
    stop_pid "$SPID"
fi
fi # storage

# ---------------------------------------------------------------- 4. table
META="$WORK/meta.txt"
cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
{
    echo "Ratio = chanio / peer (median of $REPEATS). Latency and CPU rows: lower is better, ratio < 1 favours chanio."
    echo "Throughput rows (IOPS, MB/s): higher is better, ratio > 1 favours chanio. MB/s = 10^6 bytes/s everywhere."
    echo "Notes:"
    if want block; then
        echo "  block: iounitd --ns ram:1GiB + hostctl bench --json over tcp (--qd I/Os in flight from one submitting thread, as one fio job), ${BLOCK_TIME} s per run;"
        echo "  peer: fio 3 ioengine=nbd uri=nbd://127.0.0.1:PORT iodepth=QD, one connection, against nbdkit memory 1G; latency = fio lat_ns (submit to completion);"
        if [[ $FLOOR_ENGINE == io_uring ]]; then
            echo "  floor: fio on a 1 GiB file in /dev/shm (tmpfs, buffered): psync 1 job for QD1, io_uring iodepth=QD 1 job for QD8/QD32."
        else
            echo "  floor: fio on a 1 GiB file in /dev/shm (tmpfs, buffered): psync 1 job for QD1, psync numjobs=QD (group_reporting) for QD8/QD32."
        fi
        echo "  block (shm): the same workloads with a second iounitd --listen shm://NAME --ns ram:1GiB and hostctl --target shm://NAME, run right after"
        echo "  the tcp run of each workload; peer and floor are the same fio runs as the tcp rows."
        echo "  CPU s/1M IO: utime+stime of client (hostctl / fio, incl. children) + server (iounitd / nbdkit, /proc/PID/stat delta) per 10^6 I/Os."
    fi
    if want messaging; then
        echo "  messaging: pingpong --transport tcp|shm (server and client in one process; send mode 8 B/4 KiB, ${LAT_ITERS} round trips;"
        echo "  push mode = RDMA Write with immediate from registered memory (--zero-copy), 64 KiB x ${BW64K_ITERS} / 1 MiB x ${BW1M_ITERS} streamed). ucx_perftest -w 1000 -n same:"
        echo "  tag_lat = UCP tagged send/recv ping-pong, p50 of one-way (RTT/2); ucp_am_bw = UCP active messages streamed, overall MiB/s converted to MB/s."
        echo "  write mode (shm, 1 MiB x ${BW1M_ITERS}) = one-sided RDMA Write with immediate into one 1 MiB buffer the receiver exposes, and exposes again"
        echo "  (a 24-byte Send back) after each write lands; shm places it: the writer copies its source straight into that buffer (ADR 5)."
        echo "  ucp_put_bw = UCP one-sided puts of the same size into one remote buffer, streamed with no per-put notification."
        echo "  fi_pingpong ($FI_TCP_PROV: msg endpoint; shm: rdm endpoint) reports only mean one-way usec/xfer and has no streaming test, so it is compared on mean latency."
        echo "  ucx_perftest and fi_pingpong ran in a private network namespace with only lo (their listeners bind 0.0.0.0)."
        echo "  memcpy: bench/memcpy.c (cc -O2), one thread copying a touched 1 MiB buffer to another ${MEMCPY_ITERS} times (cache-hot), and 1 MiB chunks"
        echo "  across two 64 MiB areas ${MEMCPY_COLD_ITERS} times (cache-cold, as a stream through many buffers), MB/s; run right after"
        echo "  pingpong --transport shm --mode write --size 1MiB, whose MB/s is the chanio value (the same sample as msg shm 1 MiB one-sided write)."
        echo "  plain tcp: bench/tcpbw.c (cc -O2 -pthread), blocking write(2) of 1 MiB messages x ${BW1M_ITERS} and read(2) into a 1 MiB buffer,"
        echo "  one thread each, over 127.0.0.1 (no framing, no acknowledgements), MB/s; run right after the tcp 1 MiB pingpong stream."
        echo "  plain tcp untouched: the same from a never-written mapping (every page the kernel's zero page, always cached), as ucx_perftest"
        echo "  sends (its send buffer stays unwritten); chanio and the touched row send data a producer wrote."
        echo "  plain tcp ping-pong: bench/tcplat.c (cc -O2 -pthread), 8 B x ${LAT_ITERS} round trips between two threads over 127.0.0.1,"
        echo "  both spinning on recv(2) with MSG_DONTWAIT (no poll, no framing), one-way p50; run right after the tcp 8 B pingpong."
    fi
    echo "  machine: bench/stalls.c (cc -O2), one thread reading CLOCK_MONOTONIC in a loop for 2 s before the runs; a gap > 1 us is a stall"
    echo "  (interrupts, hypervisor, other tenants): every latency figure above carries this noise."
    if want daemon; then
        echo "  daemon: VmRSS per queue = (RSS with 4 hosts x (admin + 1 I/O queue) - RSS with 0 hosts) / 8; idle CPU over ${IDLE_SECS} s."
    fi
    if want storage; then
        echo "  file: one iounitd --listen tcp://... --listen shm://... --ns file:IMG:1GiB:4096 (IMG: 1 GiB of random data in ${STORE_DIR:-?},"
        echo "  read with O_DIRECT; 4 KiB writes travel in the capsule, unaligned, so they go through the page cache; larger ones O_DIRECT);"
        echo "  hostctl bench over shm (rows \"file ...\") and tcp (\"file tcp ...\"), ${BLOCK_TIME} s per run; peer: fio nbd -> nbdkit file IMG cache=none;"
        echo "  floor: fio io_uring --direct=1 iodepth=QD on IMG; the file's page cache is written back and dropped before every run."
        echo "  randrw: 70 % reads (hostctl --rwmixread 70, fio --rwmixread=70), IOPS of reads and writes together."
        echo "  iounitd CPU per I/O: /proc/PID/stat ticks of the file iounitd over a 4 KiB randread QD32 shm run, against a second"
        echo "  iounitd --ns ram:1GiB:4096 (prefilled) running the same workload right after."
    fi
    [[ $HAVE_PP_SHM == 0 ]] && echo "  shm: not built yet (pingpong --help lists no shm transport)."
    [[ -n "$INSTALL_NOTE" ]] && echo "  install: $INSTALL_NOTE"
    echo "Machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, Linux $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "Command: $CMDLINE"
} >"$META"
echo
py table "$ROWS" "$SAMPLES" "$NAS" "$META" "$MARKDOWN" "$TARGETS"
[[ -n "$MARKDOWN" ]] && log "markdown table written to $MARKDOWN"
exit 0
