#!/usr/bin/env bash
# bench/rxe-write-ab.sh DIR_A DIR_B [ROUNDS]: 4 KiB random writes over rdma
# at QD1 and QD32 (`hostctl bench --rw randwrite --bs 4k`, 3 s each), each
# build against its own iounitd, builds alternating, in one soft-RoCE
# guest. Each DIR holds an iounitd and a hostctl built with the verbs
# feature, inside the repository.
#
#   scripts/rxe-vm.sh -- bench/rxe-write-ab.sh target/ab-old target/ab-new
set -euo pipefail
a=${1:?usage: bench/rxe-write-ab.sh DIR_A DIR_B [ROUNDS]}
b=${2:?usage: bench/rxe-write-ab.sh DIR_A DIR_B [ROUNDS]}
rounds=${3:-3}
ip=192.0.2.1
port=4800
for ((round = 1; round <= rounds; round++)); do
  for dir in "$a" "$b"; do
    port=$((port + 1))
    "$dir/iounitd" --listen "rdma://$ip:$port" --ns ram:64MiB >/tmp/wr.out 2>/tmp/wr.err &
    d=$!
    for _ in $(seq 1 300); do grep -q '^listening on' /tmp/wr.out && break; sleep 0.1; done
    for qd in 1 32; do
      # JSON parsed only after the run ended: a parser started beside the
      # measured command takes the guest's CPU (docs/performance.md).
      if "$dir/hostctl" --target "rdma://$ip:$port" bench --ns 1 --rw randwrite --bs 4k --qd "$qd" \
        --time 3s --json >/tmp/wr.json 2>/tmp/wr.bench; then
        python3 - "$round" "$dir" "$qd" <<'PY'
import json, sys
d = json.load(open("/tmp/wr.json"))
lat = d["latency_us"]
print(f"round {sys.argv[1]} {sys.argv[2]} QD{sys.argv[3]}: {d['iops']:.0f} IOPS, p50 {lat['p50']} us, p99 {lat.get('p99')} us")
PY
      else
        echo "round $round $dir QD$qd: failed: $(tail -1 /tmp/wr.bench)"
      fi
    done
    kill "$d" 2>/dev/null || true
    wait "$d" 2>/dev/null || true
  done
done
