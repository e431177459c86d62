#!/usr/bin/env bash
# bench/ab.sh: two builds of chanio side by side on this machine, the way
# docs/performance.md's "before -> after" figures were measured.
#
#   bench/ab.sh [--rounds N] [--time S] DIR_A DIR_B
#
# DIR_A and DIR_B each hold an iounitd, a hostctl and a pingpong binary
# (copy them out of target/release and target/release/examples after
# building each commit). Each build gets its own iounitd (tcp on 127.0.0.1,
# shm under a name unique to this run, a 1 GiB RAM namespace written once
# before anything is timed); then, N rounds (default 3), A and B alternate
# through the same workloads, so that a noisy machine hits both alike:
#   4 KiB random read QD32 and QD1 and random write QD32 over tcp,
#   4 KiB random read QD32 and QD1 over shm, pingpong 8 B over shm and tcp.
# It prints one line per run: round, build, workload, figures. Every daemon
# it started is stopped by PID when it exits.
set -euo pipefail

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

ROUNDS=3
TIME=2
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --time) TIME=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --*) echo "ab.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) break ;;
    esac
done
if [[ $# -ne 2 ]]; then
    usage >&2
    exit 2
fi
DIRS=("$1" "$2")
for d in "${DIRS[@]}"; do
    for b in iounitd hostctl pingpong; do
        [[ -x $d/$b ]] || { echo "ab.sh: $d/$b is missing or not executable" >&2; exit 2; }
    done
done
if ! [[ $ROUNDS =~ ^[1-9][0-9]*$ && $TIME =~ ^[1-9][0-9]*$ ]]; then
    echo "ab.sh: --rounds and --time take whole numbers >= 1" >&2
    exit 2
fi

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

PORTS=()
NAMES=()
for i in 0 1; do
    port=$(free_port)
    name="chanio-ab-$$-$i"
    "${DIRS[$i]}/iounitd" --listen "tcp://127.0.0.1:$port" --listen "shm://$name" --ns ram:1GiB \
        >"/tmp/chanio-ab-$$-$i.log" 2>&1 &
    PIDS+=($!)
    PORTS+=("$port")
    NAMES+=("$name")
done
for i in 0 1; do
    for _ in $(seq 50); do
        "${DIRS[$i]}/hostctl" --target "tcp://127.0.0.1:${PORTS[$i]}" list >/dev/null 2>&1 && break
        sleep 0.1
    done
    # First touch of the namespace, outside every measurement.
    "${DIRS[$i]}/hostctl" --target "tcp://127.0.0.1:${PORTS[$i]}" bench --ns 1 --rw write --bs 512k --qd 4 \
        --time 3s >/dev/null
done

block() { # I TARGET RW QD
    "${DIRS[$1]}/hostctl" --target "$2" bench --ns 1 --rw "$3" --qd "$4" --time "${TIME}s" --json |
        python3 -c 'import json, sys; r = json.load(sys.stdin); l = r["latency_us"]
print("iops=%.0f mean_us=%.2f p50_us=%.2f" % (r["iops"], l["mean"], l["p50"]))'
}
ping() { # I TRANSPORT
    "${DIRS[$1]}/pingpong" --transport "$2" --size 8 --iters 20000 --json |
        python3 -c 'import json, sys; r = json.load(sys.stdin)["one_way_us"]
print("p50_us=%.3f mean_us=%.3f p99_us=%.3f" % (r["p50"], r["mean"], r["p99"]))'
}

for r in $(seq "$ROUNDS"); do
    for i in 0 1; do
        tcp="tcp://127.0.0.1:${PORTS[$i]}" shm="shm://${NAMES[$i]}" who=${DIRS[$i]}
        echo "$r $who tcp-randread-qd32 $(block "$i" "$tcp" randread 32)"
        echo "$r $who tcp-randwrite-qd32 $(block "$i" "$tcp" randwrite 32)"
        echo "$r $who tcp-randread-qd1 $(block "$i" "$tcp" randread 1)"
        echo "$r $who shm-randread-qd32 $(block "$i" "$shm" randread 32)"
        echo "$r $who shm-randread-qd1 $(block "$i" "$shm" randread 1)"
        echo "$r $who pingpong-shm-8B $(ping "$i" shm)"
        echo "$r $who pingpong-tcp-8B $(ping "$i" tcp)"
    done
done
