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
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null; rm -rf "$DIR"' EXIT

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
