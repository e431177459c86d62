#!/usr/bin/env bash
# bench/replication.sh: what synchronous replication costs a writer: 4 KiB
# random writes at QD1 (latency) and QD32 (IOPS) to a namespace with no
# replica, one and two, side by side, over tcp and shm.
#
#   bench/replication.sh [--time S] [--rounds N] [--transports "tcp shm"]
#
# Starts an etcd on 127.0.0.1 and, per transport, three groups of iounitds
# with a 64 MiB RAM namespace: a plain one, a primary with one replica, a
# primary with two (the primary reaches its replicas over the same
# transport as the host reaches it). Each round runs hostctl bench for
# --time seconds (default 3) on each group in turn. Prints one line per
# run, then medians and the ratios to the plain namespace. Uses
# target/release binaries (build them first) and Debian's etcd-server.
set -euo pipefail

TIME=3
ROUNDS=3
TRANSPORTS="tcp shm"
while [[ $# -gt 0 ]]; do
    case $1 in
        --time) TIME=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --transports) TRANSPORTS=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "replication.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="${CHANIO_BIN:-$repo/target/release}"
for b in iounitd hostctl; do
    [[ -x "$bin/$b" ]] || { echo "replication.sh: no $bin/$b: cargo build --release first" >&2; exit 2; }
done
for t in etcd python3; do
    command -v "$t" >/dev/null || { echo "replication.sh: $t is not installed" >&2; exit 2; }
done
dir=$(mktemp -d)
# Daemons started in command substitutions (subshells) note their PIDs here.
pidfile="$dir/pids"
: >"$pidfile"
stop_all() {
    local p
    while read -r p; do kill "$p" 2>/dev/null || true; done <"$pidfile"
    while read -r p; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done <"$pidfile"
    : >"$pidfile"
}
etcd_pid=""
trap 'stop_all; [[ -n "$etcd_pid" ]] && kill "$etcd_pid" 2>/dev/null; rm -rf "$dir"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cport=$(free_port)
pport=$(free_port)
etcd_url="http://127.0.0.1:$cport"
etcd --data-dir "$dir/etcd" --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "default=http://127.0.0.1:$pport" >"$dir/etcd.log" 2>&1 &
etcd_pid=$!
sleep 2

# address TRANSPORT NAME: where member NAME listens.
address() {
    case $1 in
        tcp) echo "tcp://127.0.0.1:$(free_port)" ;;
        shm) echo "shm://bench-repl-$$-$2" ;;
    esac
}

# group TRANSPORT LABEL N: a primary and N replicas; prints the primary's URI.
group() {
    local t=$1 label=$2 n=$3 names=(p r1 r2) members=() uris=() i
    if ((n == 0)); then
        uris[0]=$(address "$t" "$label-p")
        "$bin/iounitd" --listen "${uris[0]}" --ns ram:64MiB >"$dir/$label-p.out" 2>"$dir/$label-p.log" &
        echo $! >>"$pidfile"
        for _ in $(seq 1 100); do grep -q '^listening on' "$dir/$label-p.out" && break; sleep 0.1; done
        echo "${uris[0]}"
        return
    fi
    for i in $(seq 0 "$n"); do
        uris[i]=$(address "$t" "$label-${names[i]}")
        members+=(--replica "1=${names[i]}@${uris[i]}")
    done
    for i in $(seq 0 "$n"); do
        RUST_LOG=info "$bin/iounitd" --listen "${uris[i]}" --ns ram:64MiB --node "${names[i]}" \
            --etcd "$etcd_url" --etcd-prefix "/bench/$label" "${members[@]}" \
            >"$dir/$label-${names[i]}.out" 2>"$dir/$label-${names[i]}.log" &
        echo $! >>"$pidfile"
        # The first is primary: the others start once it is.
        for _ in $(seq 1 100); do grep -q 'of a replicated namespace' "$dir/$label-${names[i]}.log" && break; sleep 0.1; done
    done
    for _ in $(seq 1 600); do
        (($(grep -c 'back in the in-sync set' "$dir/$label-p.log" || true) >= n)) && break
        sleep 0.1
    done
    (($(grep -c 'back in the in-sync set' "$dir/$label-p.log" || true) >= n)) \
        || { echo "replication.sh: $label did not get in sync: $(tail -5 "$dir/$label-p.log")" >&2; exit 1; }
    echo "${uris[0]}"
}

declare -A lat iops
for t in $TRANSPORTS; do
    declare -A uri=()
    for n in 0 1 2; do
        uri[$n]=$(group "$t" "$t-$n" "$n")
    done
    for r in $(seq 1 "$ROUNDS"); do
        for qd in 1 32; do
            for n in 0 1 2; do
                line=$("$bin/hostctl" --target "${uri[$n]}" bench --ns 1 --rw randwrite --bs 4k --qd "$qd" \
                    --time "${TIME}s" --json)
                read -r p50 rate < <(python3 -c 'import json, sys
j = json.loads(sys.argv[1]); print(j["latency_us"]["p50"], round(j["iops"]))' "$line")
                printf 'round %s  %-3s replicas %s qd%-3s %9s IOPS  p50 %8s us\n' "$r" "$t" "$n" "$qd" "$rate" "$p50"
                lat["$t $n $qd"]+="$p50 "
                iops["$t $n $qd"]+="$rate "
            done
        done
    done
    stop_all
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { python3 -c "print(round($1 / $2, 2) if $2 else 'n/a')"; }
echo
echo "medians of $ROUNDS rounds (4 KiB random writes, 64 MiB RAM namespaces):"
for t in $TRANSPORTS; do
    for n in 1 2; do
        printf '%-3s %s replica(s): QD1 p50 %s us vs %s us (%sx latency); QD32 %s vs %s IOPS (%sx)\n' "$t" "$n" \
            "$(median "${lat[$t $n 1]}")" "$(median "${lat[$t 0 1]}")" \
            "$(ratio "$(median "${lat[$t $n 1]}")" "$(median "${lat[$t 0 1]}")")" \
            "$(median "${iops[$t $n 32]}")" "$(median "${iops[$t 0 32]}")" \
            "$(ratio "$(median "${iops[$t $n 32]}")" "$(median "${iops[$t 0 32]}")")"
    done
done
