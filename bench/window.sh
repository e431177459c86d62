#!/usr/bin/env bash
# bench/window.sh: storage windows against commands, side by side: 4 KiB
# random reads at QD1 (latency) and QD32 (IOPS) through a window (one-sided
# RDMA Reads) and with Read commands, over shm and tcp, and the I/O unit's
# CPU time per read.
#
#   bench/window.sh [--time S] [--rounds N] [--transports "shm tcp"]
#
# One iounitd serves a 256 MiB RAM namespace on tcp and shm. Each round
# runs every (transport, mode, depth) for --time seconds (default 3) with
# hostctl bench; the daemon's CPU time (utime + stime from /proc) before
# and after each run, over the run's I/Os, is the I/O unit's CPU per I/O.
# Prints one line per run, then medians and the window/command ratios.
# Uses target/release binaries (build them first). Over verbs the same
# runs go in the soft-RoCE VM: scripts/rxe-vm.sh -- bench/window.sh
# --transports rdma (TCG: compare ratios, not absolute figures).
set -euo pipefail

TIME=3
ROUNDS=3
TRANSPORTS="shm tcp"
while [[ $# -gt 0 ]]; do
    case $1 in
        --time) TIME=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --transports) TRANSPORTS=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "window.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="${CHANIO_BIN:-$repo/target/release}"
for b in iounitd hostctl; do
    [[ -x "$bin/$b" ]] || { echo "window.sh: no $bin/$b: cargo build --release first" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "window.sh: python3 is not installed" >&2; exit 2; }
dir=$(mktemp -d)
pid=""
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT

listen=()
for t in $TRANSPORTS; do
    case $t in
        shm) listen+=(--listen "shm://bench-window-$$") ;;
        tcp) listen+=(--listen tcp://127.0.0.1:0) ;;
        rdma) listen+=(--listen rdma://127.0.0.1:0) ;;
        *) echo "window.sh: unknown transport $t" >&2; exit 2 ;;
    esac
done
"$bin/iounitd" "${listen[@]}" --ns ram:256MiB >"$dir/d.out" 2>"$dir/d.log" &
pid=$!
n=$(wc -w <<<"$TRANSPORTS")
for _ in $(seq 1 100); do (($(grep -c '^listening on' "$dir/d.out" || true) >= n)) && break; sleep 0.1; done
uri() { sed -n "s/^listening on \\($1:[^ ]*\\).*/\\1/p" "$dir/d.out" | head -n 1; }
ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)

declare -A lat iops cpu
run() { # round transport mode qd
    local flag=() line before after ios
    [[ $3 == window ]] && flag=(--window)
    before=$(ticks)
    line=$("$bin/hostctl" --target "$(uri "$2")" bench --ns 1 --rw randread --bs 4k --qd "$4" \
        --time "${TIME}s" --json "${flag[@]}")
    after=$(ticks)
    read -r ios p50 rate < <(python3 -c 'import json, sys
j = json.loads(sys.argv[1]); print(j["ios"], j["latency_us"]["p50"], round(j["iops"]))' "$line")
    local us_per_io
    us_per_io=$(python3 -c "print(round(($after - $before) / $hz * 1e6 / max($ios, 1), 3))")
    printf 'round %s  %-4s %-7s qd%-3s %9s IOPS  p50 %7s us  iounitd CPU %7s us/IO\n' \
        "$1" "$2" "$3" "$4" "$rate" "$p50" "$us_per_io"
    lat["$2 $3 $4"]+="$p50 "
    iops["$2 $3 $4"]+="$rate "
    cpu["$2 $3 $4"]+="$us_per_io "
}
for r in $(seq 1 "$ROUNDS"); do
    for t in $TRANSPORTS; do
        for qd in 1 32; do
            run "$r" "$t" command "$qd"
            run "$r" "$t" window "$qd"
        done
    done
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { python3 -c "print(round($1 / $2, 3) if $2 else 'n/a')"; }
echo
echo "medians of $ROUNDS rounds (4 KiB random reads, RAM namespace):"
for t in $TRANSPORTS; do
    for qd in 1 32; do
        c="$t command $qd" w="$t window $qd"
        printf '%-4s qd%-3s command: %9s IOPS p50 %7s us CPU %7s us/IO | window: %9s IOPS p50 %7s us CPU %7s us/IO\n' \
            "$t" "$qd" "$(median "${iops[$c]}")" "$(median "${lat[$c]}")" "$(median "${cpu[$c]}")" \
            "$(median "${iops[$w]}")" "$(median "${lat[$w]}")" "$(median "${cpu[$w]}")"
        printf '%-4s qd%-3s window/command: IOPS %s, p50 latency %s, iounitd CPU per IO %s\n' "$t" "$qd" \
            "$(ratio "$(median "${iops[$w]}")" "$(median "${iops[$c]}")")" \
            "$(ratio "$(median "${lat[$w]}")" "$(median "${lat[$c]}")")" \
            "$(ratio "$(median "${cpu[$w]}")" "$(median "${cpu[$c]}")")"
    done
done
