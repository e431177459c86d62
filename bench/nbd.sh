#!/usr/bin/env bash
# bench/nbd.sh: the NBD bridge (hostctl serve-nbd) against nbdkit, with the
# same NBD client (fio's nbd engine), side by side on this machine.
#
#   bench/nbd.sh [--time S] [--rounds N]
#
# Serves a 256 MiB RAM namespace from one iounitd, reached by two bridges
# (the host library over tcp, and over shm), and nbdkit's memory plugin of
# the same size; then, for --rounds (default 3), runs each fio job on each
# in turn: 4 KiB random reads QD32 and QD1, 4 KiB random writes QD32, for
# --time seconds (default 3). For reference it also runs hostctl bench
# straight against iounitd (no NBD hop). Prints one line per run and the
# medians with ratios. Uses target/release binaries (build them first).
set -euo pipefail

TIME=3
ROUNDS=3
while [[ $# -gt 0 ]]; do
    case $1 in
        --time) TIME=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "nbd.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="$repo/target/release"
for b in iounitd hostctl; do
    [[ -x "$bin/$b" ]] || { echo "nbd.sh: no $bin/$b: cargo build --release first" >&2; exit 2; }
done
for t in fio nbdkit python3; do
    command -v "$t" >/dev/null || { echo "nbd.sh: $t is not installed" >&2; exit 2; }
done
dir=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$dir"' EXIT
shm="shm://bench-nbd-$$"

"$bin/iounitd" --listen tcp://127.0.0.1:0 --listen "$shm" --ns ram:256MiB >"$dir/d.out" 2>"$dir/d.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^listening on tcp' "$dir/d.out" && break; sleep 0.1; done
tcp=$(sed -n 's/^listening on \(tcp:[^ ]*\).*/\1/p' "$dir/d.out" | head -n 1)
bridge() { # name target
    "$bin/hostctl" --target "$2" --queues 2 serve-nbd --listen 127.0.0.1:0 >"$dir/$1.out" 2>"$dir/$1.log" &
    pids+=($!)
    for _ in $(seq 1 100); do grep -q '^serving NBD' "$dir/$1.out" && break; sleep 0.1; done
}
bridge tcp "$tcp"
bridge shm "$shm"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
nbdkit -f -i 127.0.0.1 -p "$port" memory 256M 2>"$dir/nbdkit.log" &
pids+=($!)
sleep 1
declare -A uris=(
    [bridge-tcp]="$(awk '/^serving NBD/ { print $4 }' "$dir/tcp.out")/1"
    [bridge-shm]="$(awk '/^serving NBD/ { print $4 }' "$dir/shm.out")/1"
    [nbdkit-memory]="nbd://127.0.0.1:$port"
)
declare -A runs
fio_run() { # round label rw qd
    local out
    out=$(fio --name=nbd --ioengine=nbd --uri="${uris[$2]}" --rw="$3" --bs=4k --iodepth="$4" \
        --time_based --runtime="$TIME" --size=256M --output-format=json 2>/dev/null |
        python3 -c 'import json, sys
t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
print(round(d["iops"]), round(d["clat_ns"]["percentile"]["50.000000"] / 1000, 1))')
    printf 'round %s  %-13s %-9s qd%-3s  %8s IOPS  p50 %6s us\n' "$1" "$2" "$3" "$4" ${out}
    runs["$2 $3 $4"]+="${out%% *} "
}
for r in $(seq 1 "$ROUNDS"); do
    for w in "randread 32" "randread 1" "randwrite 32"; do
        set -- $w
        for label in bridge-tcp bridge-shm nbdkit-memory; do
            fio_run "$r" "$label" "$1" "$2"
        done
        line=$("$bin/hostctl" --target "$tcp" bench --ns 1 --rw "$1" --bs 4k --qd "$2" --time "${TIME}s" --json)
        iops=$(sed -n 's/.*"iops":\([0-9]*\).*/\1/p' <<<"$line")
        printf 'round %s  %-13s %-9s qd%-3s  %8s IOPS  (hostctl bench, no NBD)\n' "$r" direct-tcp "$1" "$2" "$iops"
        runs["direct-tcp $1 $2"]+="$iops "
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
echo
for w in "randread 32" "randread 1" "randwrite 32"; do
    k=$(median <<<"${runs["nbdkit-memory $w"]}")
    line="$w:"
    for label in bridge-tcp bridge-shm direct-tcp; do
        v=$(median <<<"${runs["$label $w"]}")
        line+=$(awk -v l="$label" -v v="$v" -v k="$k" 'BEGIN { printf "  %s %.0f (%.2fx nbdkit)", l, v, v / k }')
    done
    echo "$line  nbdkit-memory $k IOPS"
done
