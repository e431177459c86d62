#!/usr/bin/env bash
# bench/rxe-compare.sh — chanio over soft-RoCE against perftest and the
# kernel's NVMe-oF, side by side in one guest of scripts/rxe-vm.sh.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bench/rxe-compare.sh [--repeats N] [--time S] [--markdown FILE]
                            [--no-build] [--no-install]

Boots the soft-RoCE VM (scripts/rxe-vm.sh: Debian's stock kernel in QEMU,
rxe0 over a dummy interface) and measures, alternating chanio and its peer
in every repeat, medians of N repeats:

  messaging  chanio pingpong --transport verbs (one process, both ends):
               send 8 B one-way p50      vs ib_send_lat -s 8   (t_typical)
               push 8 B one-way p50      vs ib_write_lat -s 8  (t_typical)
               push --zero-copy 1 MiB MB/s  vs ib_write_bw -s 1MiB (BW average)
               channel set-up time over verbs vs over tcp (Endpoint::connect)
  block      chanio iounitd --ns ram:256MiB + hostctl bench, against the
             kernel's nvmet serving a brd RAM disk of the same size through
             nvme connect and fio (io_uring, --direct=1) on /dev/nvmeXn1:
               rdma://  vs nvmet-rdma / nvme-rdma: 4 KiB randread QD1
                        latency (mean, p50) and QD32 IOPS
               tcp://   vs nvmet-tcp / nvme-tcp: the same rows
  daemon     iounitd VmRSS per connected queue (4 hosts x (admin + 1 I/O
             queue)), over rdma (all of it registered) and over tcp

Ratios only: the guest's processor is emulated (TCG), so absolute figures
say little about hardware; each ratio compares two runs made minutes apart
in the same guest. Prints one markdown table (and writes it to FILE).

Options:
  --repeats N      repeats of every measurement (default 3)
  --time S         seconds per block run (default 5)
  --markdown FILE  also write the table to FILE
  --no-build       use the binaries already in target/release
  --no-install     do not apt-get install perftest, nvme-cli and fio
  --only PARTS     run only these parts, comma-separated: messaging, block,
                   memory (default: all three)
EOF
}

die() { printf 'rxe-compare.sh: %s\n' "$*" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

repeats=3
secs=5
markdown=""
build=1
install=1
in_vm=0
parts=messaging,block,memory
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --repeats) repeats=${2:?}; shift ;;
    --time) secs=${2:?}; shift ;;
    --markdown) markdown=${2:?}; shift ;;
    --no-build) build=0 ;;
    --no-install) install=0 ;;
    --only) parts=${2:?--only needs parts}; shift ;;
    --in-vm) in_vm=1 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

if ((!in_vm)); then
  cd "$repo"
  if ((install)); then
    missing=()
    for t in ib_send_lat:perftest nvme:nvme-cli fio:fio; do
      command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
    done
    if ((${#missing[@]})); then
      echo "rxe-compare: installing ${missing[*]}" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  fi
  if ((build)); then
    cargo build --release --locked --features chanio/verbs --workspace --bins --examples
  fi
  out=${markdown:-$repo/target/rxe-vm/compare.md}
  mkdir -p "$(dirname "$out")"
  out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
  "$repo/scripts/rxe-vm.sh" --timeout 3000 --mem 6G -- \
    "$repo/bench/rxe-compare.sh" --in-vm --repeats "$repeats" --time "$secs" --markdown "$out" --only "$parts"
  exit
fi

# ---------------------------------------------------------------------------
# Inside the guest.
# ---------------------------------------------------------------------------
cd "$repo"
bin=target/release
ip=192.0.2.1
work=$(mktemp -d)
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# Parses JSON on stdin with a Python expression over `d`. Python starts only
# once its input is complete: under TCG its start-up takes seconds of one of
# the guest's two CPUs, and started beside a measured command (at the other
# end of a pipe) it cut chanio's rdma QD1 IOPS to a fifth.
jq_py() {
  local input
  input=$(cat)
  python3 -c "import json,sys; d=json.load(sys.stdin); print($1)" <<<"$input"
}
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

# perftest's lines: "#bytes #iterations t_min t_max t_typical t_avg ..."
# (latency, usec) and "#bytes #iterations BW_peak BW_average MsgRate"
# (bandwidth, MB/sec with MB = 2^20 bytes).
perftest() { # tool args... -> the result line's fields
  local tool=$1
  shift
  "$tool" -d rxe0 -x 1 "$@" >"$work/srv.txt" 2>&1 &
  local srv=$!
  sleep 1
  "$tool" -d rxe0 -x 1 "$@" 127.0.0.1 >"$work/cli.txt" 2>&1 || { cat "$work/cli.txt" >&2; kill $srv 2>/dev/null; return 1; }
  wait $srv || true
  awk '$1 ~ /^[0-9]+$/ && NF >= 5 { line = $0 } END { print line }' "$work/cli.txt"
}

pp() { "$bin/examples/pingpong" --transport verbs --json "$@"; }

declare -A r=()
add() { r[$1]+="$2"$'\n'; }

want() { [[ ",$parts," == *",$1,"* ]]; }

for i in $(seq 1 "$repeats"); do
  want messaging || break
  log "messaging repeat $i/$repeats"
  j=$(pp --mode send --size 8 --iters 3000 --warmup 300)
  add send8 "$(jq_py 'd["one_way_us"]["p50"]' <<<"$j")"
  add conn_verbs "$(jq_py 'd["connect_ms"]' <<<"$j")"
  add conn_tcp "$("$bin/examples/pingpong" --transport tcp --json --size 8 --iters 300 --warmup 30 | jq_py 'd["connect_ms"]')"
  add ib_send_lat "$(perftest ib_send_lat -s 8 -n 3000 | awk '{ print $5 }')"
  add push8 "$(pp --mode push --size 8 --iters 3000 --warmup 300 | jq_py 'd["one_way_us"]["p50"]')"
  add ib_write_lat "$(perftest ib_write_lat -s 8 -n 3000 | awk '{ print $5 }')"
  add push1m "$(pp --mode push --zero-copy --size 1MiB --iters 300 --warmup 30 | jq_py 'd["bandwidth_mbps"]')"
  add ib_write_bw "$(perftest ib_write_bw -s 1048576 -n 300 | awk '{ printf "%.1f\n", $4 * 1.048576 }')"
done

# --- block ------------------------------------------------------------------
size_mib=256
if want block; then
modprobe brd rd_nr=1 rd_size=$((size_mib * 1024))
modprobe configfs
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
modprobe nvmet
modprobe nvmet-rdma
modprobe nvmet-tcp
modprobe nvme-rdma
modprobe nvme-tcp
nqn=nqn.2026-12.io.chanio:bench
hostnqn=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001
cfs=/sys/kernel/config/nvmet
mkdir "$cfs/subsystems/$nqn"
echo 1 >"$cfs/subsystems/$nqn/attr_allow_any_host"
mkdir "$cfs/subsystems/$nqn/namespaces/1"
echo /dev/ram0 >"$cfs/subsystems/$nqn/namespaces/1/device_path"
echo 1 >"$cfs/subsystems/$nqn/namespaces/1/enable"
port() { # id trtype svcid
  mkdir "$cfs/ports/$1"
  echo "$2" >"$cfs/ports/$1/addr_trtype"
  echo ipv4 >"$cfs/ports/$1/addr_adrfam"
  echo "$ip" >"$cfs/ports/$1/addr_traddr"
  echo "$3" >"$cfs/ports/$1/addr_trsvcid"
  ln -s "$cfs/subsystems/$nqn" "$cfs/ports/$1/subsystems/$nqn"
}
port 1 rdma 4420
port 2 tcp 4421

kernel_dev() { # trtype svcid -> the /dev/nvmeXnY that nvme connect adds
  local before after
  before=$(ls /dev/nvme*n* 2>/dev/null | sort || true)
  nvme connect -t "$1" -a "$ip" -s "$2" -n "$nqn" --hostnqn "$hostnqn" >/dev/null
  for _ in $(seq 1 100); do
    after=$(ls /dev/nvme*n* 2>/dev/null | grep -E '^/dev/nvme[0-9]+n[0-9]+$' | sort || true)
    new=$(comm -13 <(echo "$before") <(echo "$after") | head -1)
    [[ -n "$new" ]] && { echo "$new"; return; }
    sleep 0.1
  done
  die "nvme connect -t $1 made no block device"
}
fio_run() { # dev qd -> "iops mean_us p50_us"
  fio --name=r --filename="$1" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
    --iodepth="$2" --runtime="$secs" --time_based --size="${size_mib}M" --output-format=json 2>/dev/null |
    jq_py '"%f %f %f" % (d["jobs"][0]["read"]["iops"], d["jobs"][0]["read"]["lat_ns"]["mean"] / 1000, d["jobs"][0]["read"]["clat_ns"]["percentile"]["50.000000"] / 1000)'
}
hostctl_run() { # uri qd -> "iops mean_us p50_us"
  "$bin/hostctl" --target "$1" bench --ns 1 --rw randread --bs 4k --qd "$2" --time "${secs}s" --json 2>/dev/null |
    jq_py '"%f %f %f" % (d["iops"], d["latency_us"]["mean"], d["latency_us"]["p50"])'
}

"$bin/iounitd" --listen "rdma://$ip:4520" --listen "tcp://$ip:4530" --ns "ram:${size_mib}MiB" >"$work/iounitd.out" 2>"$work/iounitd.err" &
iounitd=$!
for _ in $(seq 1 300); do
  [[ $(grep -c '^listening on' "$work/iounitd.out" || true) -ge 2 ]] && break
  sleep 0.1
done
[[ $(grep -c '^listening on' "$work/iounitd.out" || true) -ge 2 ]] || { cat "$work/iounitd.err" >&2; die "iounitd did not start"; }
# Fill both RAM disks once, so that reads touch memory that exists.
dd if=/dev/zero of=/dev/ram0 bs=1M count=$size_mib oflag=direct status=none
"$bin/hostctl" --target "tcp://$ip:4530" bench --ns 1 --rw write --bs 128k --qd 8 --time 2s >/dev/null 2>&1

for t in rdma tcp; do
  case $t in rdma) svc=4420; uri="rdma://$ip:4520" ;; tcp) svc=4421; uri="tcp://$ip:4530" ;; esac
  dev=$(kernel_dev "$t" "$svc")
  log "block over $t: kernel device $dev"
  for i in $(seq 1 "$repeats"); do
    log "block $t repeat $i/$repeats"
    read -r _ mean p50 < <(hostctl_run "$uri" 1)
    add "c_${t}_qd1_mean" "$mean"
    add "c_${t}_qd1_p50" "$p50"
    read -r _ mean p50 < <(fio_run "$dev" 1)
    add "k_${t}_qd1_mean" "$mean"
    add "k_${t}_qd1_p50" "$p50"
    read -r iops _ _ < <(hostctl_run "$uri" 32)
    add "c_${t}_qd32" "$iops"
    read -r iops _ _ < <(fio_run "$dev" 32)
    add "k_${t}_qd32" "$iops"
  done
  nvme disconnect -n "$nqn" >/dev/null
done
kill "$iounitd" 2>/dev/null || true
wait "$iounitd" 2>/dev/null || true
fi

# --- memory per connected queue ----------------------------------------------
# iounitd's VmRSS with 4 hosts connected (hostctl watch: admin + 1 I/O queue
# each), less with none, over 8 queues. Over rdma every byte of it is also
# registered (pinned) with the device.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
for t in rdma tcp; do
  want memory || break
  svc=$([[ $t == rdma ]] && echo 4540 || echo 4550)
  "$bin/iounitd" --listen "$t://$ip:$svc" --ns ram:1MiB >"$work/mem.out" 2>"$work/mem.err" &
  d=$!
  for _ in $(seq 1 300); do grep -q '^listening on' "$work/mem.out" && break; sleep 0.1; done
  sleep 1
  rss0=$(rss_kb "$d")
  watchers=()
  for h in 1 2 3 4; do
    "$bin/hostctl" --target "$t://$ip:$svc" --hostnqn "nqn.2026-12.io.chanio:mem-$h" watch --timeout 120s \
      >/dev/null 2>&1 &
    watchers+=($!)
  done
  for _ in $(seq 1 600); do
    [[ $(ss -Htn state established "( sport = :$svc )" | wc -l) -ge 8 ]] && break
    sleep 0.1
  done
  sleep 2
  rss8=$(rss_kb "$d")
  add "mem_$t" "$(awk -v a="$rss0" -v b="$rss8" 'BEGIN { printf "%.2f", (b - a) / 8 / 1024 }')"
  kill "${watchers[@]}" "$d" 2>/dev/null || true
  wait 2>/dev/null || true
done

m() { printf '%s' "${r[$1]:-}" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
row() { # label chanio-key peer-key unit target
  local a b
  a=$(m "$2")
  b=$(m "$3")
  printf '| %s | %s %s | %s %s | %s | %s |\n' "$1" "$a" "$4" "$b" "$4" "$(ratio "$a" "$b")" "$5"
}
{
  echo "chanio over soft-RoCE (rxe in QEMU $(uname -r), TCG), medians of $repeats, block runs ${secs}s, $(date -u '+%F %H:%M UTC')"
  echo
  echo "| measure | chanio | peer | chanio / peer | target |"
  echo "|---|---|---|---|---|"
  row "8 B one-way p50: pingpong send vs ib_send_lat" send8 ib_send_lat us "<= 1.2x"
  row "8 B one-way p50: pingpong push vs ib_write_lat" push8 ib_write_lat us ""
  row "1 MiB push bandwidth vs ib_write_bw" push1m ib_write_bw MB/s ">= 0.9x"
  row "channel set-up (Endpoint::connect): verbs vs tcp" conn_verbs conn_tcp ms ""
  row "rdma 4 KiB randread QD1 mean vs nvme-rdma" c_rdma_qd1_mean k_rdma_qd1_mean us "<= 1.0x"
  row "rdma 4 KiB randread QD1 p50 vs nvme-rdma" c_rdma_qd1_p50 k_rdma_qd1_p50 us "<= 1.0x"
  row "rdma 4 KiB randread QD32 IOPS vs nvme-rdma" c_rdma_qd32 k_rdma_qd32 IOPS ">= 1.0x"
  row "tcp 4 KiB randread QD1 mean vs nvme-tcp" c_tcp_qd1_mean k_tcp_qd1_mean us ""
  row "tcp 4 KiB randread QD1 p50 vs nvme-tcp" c_tcp_qd1_p50 k_tcp_qd1_p50 us ""
  row "tcp 4 KiB randread QD32 IOPS vs nvme-tcp" c_tcp_qd32 k_tcp_qd32 IOPS ""
  row "iounitd memory per connected queue: rdma vs tcp" mem_rdma mem_tcp MiB ""
} | tee "$markdown"
rm -rf "$work"
