#!/usr/bin/env bash
# Storage windows across a power cut: what Window Commit promises, checked
# on a machine whose power can be cut (a QEMU guest, scripts/rxe-vm.sh).
#
# The guest's iounitd serves a raw virtio disk (/dev/vda, written through
# to a file here with no cache on this side) as a block-device namespace,
# on tcp, shm and rdma (soft-RoCE). Over each, hostctl writes data A
# through a window and commits it, then writes data B through another
# window without committing (over tcp the window is the device's page
# cache, over shm and rdma a cached extent; the guest's background
# writeback is off, so B sits only in memory). Then the guest's power is
# cut (sysrq b: no sync, no shutdown). Here the disk file must hold every
# A at its place (Commit promised it durable); whether each B is there is
# reported (nothing was promised).
#
# Exits 0 when A survived; 1 with the reason otherwise.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/window-power-vm.sh [--bin-dir DIR] [--timeout SECS]

Builds iounitd and hostctl with the verbs feature (debug, unless
--bin-dir names built ones), boots the soft-RoCE VM of scripts/rxe-vm.sh
with a 64 MiB disk, writes through storage windows there over tcp, shm
and rdma and cuts the guest's power, then checks the disk. Work files go
to target/window-power/.
USAGE
}

die() { printf 'window-power-vm.sh: %s\n' "$*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# --- in the guest -----------------------------------------------------------
if [[ "${1:-}" == "--in-guest" ]]; then
  work=$2 bin=$3
  say() { echo "$*" >>"$work/guest.log"; }
  modprobe virtio_blk || { say "modprobe virtio_blk failed"; exit 1; }
  for _ in $(seq 1 100); do [[ -b /dev/vda ]] && break; sleep 0.1; done
  [[ -b /dev/vda ]] || { say "no /dev/vda"; exit 1; }
  # No background writeback for an hour: what no commit made durable stays
  # in memory. (An interval of 0 is not "never": it wakes the flusher as
  # soon as anything is dirtied.)
  echo 360000 >/proc/sys/vm/dirty_writeback_centisecs
  echo 360000 >/proc/sys/vm/dirty_expire_centisecs
  RUST_LOG=warn "$bin/iounitd" --listen tcp://127.0.0.1:4520 --listen shm://window-power \
    --listen rdma://127.0.0.1:4521 --ns file:/dev/vda >"$work/iounitd.out" 2>>"$work/guest.log" &
  for _ in $(seq 1 300); do
    n=$(grep -c '^listening on ' "$work/iounitd.out" 2>/dev/null || true)
    ((${n:-0} >= 3)) && break
    sleep 0.1
  done
  i=0
  for t in tcp://127.0.0.1:4520 shm://window-power rdma://127.0.0.1:4521; do
    a=$((2048 + i * 256)) b=$((8192 + i * 256))
    say "over $t:"
    timeout 120 "$bin/hostctl" --target "$t" window write --ns 1 --lba "$a" --blocks 128 --input "$work/a$i.bin" \
      2>>"$work/guest.log" || { say "window write A over $t failed"; exit 1; }
    # (No command reads B: a direct read writes dirty pages back first.)
    timeout 120 "$bin/hostctl" --target "$t" window write --ns 1 --lba "$b" --blocks 128 --input "$work/b$i.bin" \
      --no-commit 2>>"$work/guest.log" || { say "window write B over $t failed"; exit 1; }
    i=$((i + 1))
  done
  say "written; cutting the power"
  echo b >/proc/sysrq-trigger
  sleep 10
  exit 1
fi

# --- on this machine --------------------------------------------------------
bindir=""
timeout_s=600
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --bin-dir) bindir=${2:?--bin-dir needs a directory}; shift ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
if [[ -z "$bindir" ]]; then
  (cd "$repo" && cargo build -q --locked --features chanio-iounit/verbs,chanio-host/verbs \
    -p chanio-iounit --bin iounitd -p chanio-host --bin hostctl)
  bindir="$repo/target/debug"
fi
bindir=$(cd "$bindir" && pwd)
[[ -x "$bindir/iounitd" && -x "$bindir/hostctl" ]] || die "no iounitd and hostctl in $bindir"
command -v python3 >/dev/null || die "python3 is not installed"

work="$repo/target/window-power"
rm -rf "$work"
mkdir -p "$work"
truncate -s 64M "$work/disk.img"
for i in 0 1 2; do
  head -c 65536 /dev/urandom >"$work/a$i.bin"
  head -c 65536 /dev/urandom >"$work/b$i.bin"
done

status=0
"$repo/scripts/rxe-vm.sh" --mem 1G --timeout "$timeout_s" --disk "$work/disk.img" \
  -- bash "$repo/scripts/window-power-vm.sh" --in-guest "$work" "$bindir" || status=$?
sed 's/^/  guest: /' "$work/guest.log" 2>/dev/null || true
((status == 124)) && die "the guest ran past ${timeout_s}s"
grep -q '^written; cutting the power' "$work/guest.log" 2>/dev/null \
  || die "the guest did not get to the power cut (rxe-vm.sh status $status)"

python3 - "$work" <<'PY' || exit 1
import sys
work = sys.argv[1]
disk = open(f"{work}/disk.img", "rb").read()
kept = []
for i, t in enumerate(["tcp", "shm", "rdma"]):
    a = open(f"{work}/a{i}.bin", "rb").read()
    b = open(f"{work}/b{i}.bin", "rb").read()
    at_a, at_b = (2048 + i * 256) * 512, (8192 + i * 256) * 512
    if disk[at_a:at_a + len(a)] != a:
        print(f"window-power-vm.sh: the window write committed over {t} is not on the disk after the power cut",
              file=sys.stderr)
        sys.exit(1)
    kept.append(f"{t}: {'survived' if disk[at_b:at_b + len(b)] == b else 'lost'}")
print("window-power: committed data survived the power cut over tcp, shm and rdma;",
      "the uncommitted writes (not promised):", ", ".join(kept))
PY
