#!/usr/bin/env bash
# bench/clone.sh: what a thin clone costs against a plain file namespace
# holding the same image, side by side in one iounitd on this machine.
#
#   bench/clone.sh [--size MiB] [--time S] [--rounds N] [--dir DIR]
#
# Makes a random image of --size MiB (default 256) in --dir (default
# target/bench-clone, on this machine's disk), a plain copy of it, and an
# empty clone of it; serves the copy as namespace 1 and the clone as
# namespace 2 over tcp on 127.0.0.1, and runs hostctl bench on each, in
# alternation for --rounds (default 3):
#   4 KiB random reads QD32 and QD1 (the clone reads through to the base),
#   4 KiB random writes QD32 (the clone's first write to a 64 KiB cluster
#   copies it from the base).
# Prints one line per run and, at the end, clone/plain ratios of the
# medians. Uses target/release binaries (build them first).
#
# Where fio and nbdkit are installed, the same image is then measured
# through NBD with fio's nbd engine, the anchor the clones answer to:
# chanio's clone (and plain file) behind `hostctl serve-nbd`, against
# nbdkit's cow filter over its file plugin (and the file plugin alone), in
# alternation, with the same fio job (4 KiB, QD32, --time seconds).
set -euo pipefail

SIZE=256
TIME=5
ROUNDS=3
DIR=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --size) SIZE=$2; shift 2 ;;
        --time) TIME=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "clone.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="$repo/target/release"
for b in iounitd hostctl; do
    [[ -x "$bin/$b" ]] || { echo "clone.sh: no $bin/$b: cargo build --release first" >&2; exit 2; }
done
DIR=${DIR:-$repo/target/bench-clone}
rm -rf "$DIR"
mkdir -p "$DIR"
pid=""
pids=()
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null; for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$DIR"' EXIT

head -c "$((SIZE << 20))" /dev/urandom >"$DIR/base.img"
cp "$DIR/base.img" "$DIR/plain.img"
sync
"$bin/iounitd" --listen tcp://127.0.0.1:0 --ns "file:$DIR/plain.img" \
    --ns "clone:$DIR/base.img:$DIR/clone.img" >"$DIR/out" 2>"$DIR/log" &
pid=$!
for _ in $(seq 1 100); do grep -q '^listening on' "$DIR/out" && break; sleep 0.1; done
uri=$(sed -n 's/^listening on //p' "$DIR/out")

declare -A runs
run() { # round ns label rw qd
    local line iops p50
    line=$("$bin/hostctl" --target "$uri" bench --ns "$2" --rw "$4" --bs 4k --qd "$5" --time "${TIME}s" --json)
    iops=$(sed -n 's/.*"iops":\([0-9.]*\).*/\1/p' <<<"$line")
    p50=$(sed -n 's/.*"p50":\([0-9.]*\).*/\1/p' <<<"$line")
    printf 'round %s  %-5s  %-9s qd%-3s  %10.0f IOPS  p50 %8.1f us\n' "$1" "$3" "$4" "$5" "$iops" "$p50"
    runs["$3 $4 $5"]+="$iops "
}
for r in $(seq 1 "$ROUNDS"); do
    for w in "randread 32" "randread 1" "randwrite 32"; do
        set -- $w
        run "$r" 1 plain "$1" "$2"
        run "$r" 2 clone "$1" "$2"
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
echo
for w in "randread 32" "randread 1" "randwrite 32"; do
    p=$(median <<<"${runs["plain $w"]}")
    c=$(median <<<"${runs["clone $w"]}")
    awk -v w="$w" -v p="$p" -v c="$c" 'BEGIN { printf "%-13s plain %8.0f  clone %8.0f IOPS  clone/plain %.2f\n", w, p, c, c / p }'
done

# --- through NBD, against nbdkit's cow filter ---------------------------------
if ! command -v fio >/dev/null || ! command -v nbdkit >/dev/null; then
    echo "(fio or nbdkit missing: the NBD comparison is skipped)"
    exit 0
fi
"$bin/hostctl" --target "$uri" --queues 2 serve-nbd --listen 127.0.0.1:0 >"$DIR/bridge.out" 2>"$DIR/bridge.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^serving NBD' "$DIR/bridge.out" && break; sleep 0.1; done
bridge=$(awk '/^serving NBD/ { print $4 }' "$DIR/bridge.out")
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cow_port=$(port)
nbdkit -f -i 127.0.0.1 -p "$cow_port" --filter=cow file "$DIR/base.img" 2>"$DIR/nbdkit-cow.log" &
pids+=($!)
file_port=$(port)
nbdkit -f -i 127.0.0.1 -p "$file_port" file "$DIR/plain.img" 2>"$DIR/nbdkit-file.log" &
pids+=($!)
sleep 1
fio_run() { # round label uri rw
    local iops
    iops=$(fio --name=clone --ioengine=nbd --uri="$3" --rw="$4" --bs=4k --iodepth=32 \
        --time_based --runtime="$TIME" --size="$((SIZE << 20))" --output-format=json 2>/dev/null |
        python3 -c 'import json, sys; t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]; print(j["read"]["iops"] + j["write"]["iops"])')
    printf 'round %s  %-17s %-9s qd32  %10.0f IOPS\n' "$1" "$2" "$4" "$iops"
    runs["nbd $2 $4"]+="$iops "
}
echo
for r in $(seq 1 "$ROUNDS"); do
    for rw in randread randwrite; do
        fio_run "$r" "chanio-plain" "$bridge/1" "$rw"
        fio_run "$r" "chanio-clone" "$bridge/2" "$rw"
        fio_run "$r" "nbdkit-file" "nbd://127.0.0.1:$file_port" "$rw"
        fio_run "$r" "nbdkit-cow" "nbd://127.0.0.1:$cow_port" "$rw"
    done
done
echo
for rw in randread randwrite; do
    cp=$(median <<<"${runs["nbd chanio-plain $rw"]}")
    cc=$(median <<<"${runs["nbd chanio-clone $rw"]}")
    kp=$(median <<<"${runs["nbd nbdkit-file $rw"]}")
    kc=$(median <<<"${runs["nbd nbdkit-cow $rw"]}")
    awk -v w="$rw" -v cp="$cp" -v cc="$cc" -v kp="$kp" -v kc="$kc" 'BEGIN {
        printf "fio nbd %-9s chanio clone %7.0f (plain %7.0f, %.2f)  nbdkit cow %7.0f (file %7.0f, %.2f)  chanio clone/nbdkit cow %.2f\n",
            w, cc, cp, cc / cp, kc, kp, kc / kp, cc / kc }'
done
