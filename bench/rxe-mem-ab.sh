#!/usr/bin/env bash
# bench/rxe-mem-ab.sh DIR_A DIR_B [ROUNDS]: iounitd's VmRSS per connected
# queue over rdma and tcp for two builds, alternating, in one soft-RoCE
# guest. Each DIR holds an iounitd and a hostctl built with the verbs
# feature, inside the repository (the guest sees only the repository and
# this machine's root read-only). Four `hostctl watch` hosts hold an admin
# and an I/O queue each: (RSS with 8 queues - RSS with none) / 8. Over
# rdma every registered byte is pinned, so it counts whether touched or not.
#
#   scripts/rxe-vm.sh -- bench/rxe-mem-ab.sh target/ab-old target/ab-new
set -euo pipefail
a=${1:?usage: bench/rxe-mem-ab.sh DIR_A DIR_B [ROUNDS]}
b=${2:?usage: bench/rxe-mem-ab.sh DIR_A DIR_B [ROUNDS]}
rounds=${3:-2}
ip=192.0.2.1
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
port=4700
for ((round = 1; round <= rounds; round++)); do
  for dir in "$a" "$b"; do
    for t in rdma tcp; do
      port=$((port + 1))
      "$dir/iounitd" --listen "$t://$ip:$port" --ns ram:1MiB >/tmp/mem.out 2>/tmp/mem.err &
      d=$!
      for _ in $(seq 1 300); do grep -q '^listening on' /tmp/mem.out && break; sleep 0.1; done
      sleep 1
      rss0=$(rss_kb "$d")
      w=()
      for h in 1 2 3 4; do
        "$dir/hostctl" --target "$t://$ip:$port" --hostnqn "nqn.2026-12.io.chanio:mem-$h" \
          watch --timeout 120s >/dev/null 2>&1 &
        w+=($!)
      done
      for _ in $(seq 1 600); do
        [[ $(ss -Htn state established "( sport = :$port )" | wc -l) -ge 8 ]] && break
        sleep 0.1
      done
      sleep 2
      rss8=$(rss_kb "$d")
      awk -v r="$round" -v dir="$dir" -v t="$t" -v a="$rss0" -v b="$rss8" \
        'BEGIN { printf "round %d %s %s: VmRSS %d -> %d kB with 8 queues, %.2f MiB per queue\n", r, dir, t, a, b, (b - a) / 8 / 1024 }'
      kill "${w[@]}" "$d" 2>/dev/null || true
      wait 2>/dev/null || true
    done
  done
done
