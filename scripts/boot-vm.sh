#!/usr/bin/env bash
# Remote boot, operating-system stage: a Linux machine boots with its root
# filesystem on a chanio namespace, checked end to end.
#
# On this machine: iounitd serves a file namespace on 127.0.0.1, and
# hostctl writes an ext4 root image into it. The booting machine is a QEMU
# guest (Debian's stock kernel, the one scripts/rxe-vm.sh fetches) whose
# only network device is QEMU's user-mode stack with restrict=on and one
# guestfwd rule: each connection to 10.0.2.100:4520 in the guest gets a
# `busybox nc` to iounitd's port on 127.0.0.1 here, and nothing else goes
# anywhere. Its initramfs holds busybox, hostctl and
# nbd-client: hostctl connects to the I/O unit over tcp and serves the
# namespace over NBD on a unix socket (reads through a read-only storage
# window, under a steering tag; writes by command), the kernel's NBD client attaches it
# as /dev/nbd0, and the initramfs switches root to it. The root's init
# prints where / is mounted, writes a file, remounts / read-only and powers
# off; the script then reads the namespace back with hostctl, checks the
# filesystem clean with e2fsck, and finds the file in the image.
#
# With --transport rdma the I/O unit is a second QEMU guest instead
# (scripts/rxe-vm.sh --link): it runs iounitd on a RAM namespace over
# soft-RoCE, and the two guests share one QEMU-internal link (a unix
# socket between the two QEMUs, nothing else on it). The booting guest's
# initramfs adds rdma_rxe and the RDMA user space, makes its own rxe
# device on that link, and chanio-boot connects over rdma: the window its
# reads go through is the I/O unit's memory under a steering tag, read by
# RDMA Read. The I/O unit's guest reads the namespace back for the checks.
#
# Exits 0 when all of that held; 1 with the reason otherwise.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/boot-vm.sh [--transport tcp|rdma] [--bin-dir DIR]
                          [--timeout SECS] [--keep]

Builds iounitd and hostctl (unless --bin-dir names built ones), makes a
root image and an initramfs, boots a QEMU guest from a namespace served
by iounitd (TCG where KVM is unusable), and checks what the guest did.
Work files go to target/boot-vm/ (kept with --keep).

  --transport tcp   (default) iounitd runs here on 127.0.0.1; the guest
                    reaches it through one QEMU user-network forward
  --transport rdma  iounitd runs in a second guest with soft-RoCE; the two
                    guests share a QEMU-internal link and the boot goes
                    over rdma. Binaries need the verbs feature: without
                    --bin-dir, a release build with it is made

Needs: qemu-system-x86, busybox-static, kmod, cpio, e2fsprogs, nbd-client,
and the kernel that scripts/rxe-vm.sh --kernel-only fetches; for rdma also
rdma-core, ibverbs-providers and iproute2 (their files go into the guest).
USAGE
}

die() { printf 'boot-vm.sh: %s\n' "$*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bindir=""
timeout_s=900
keep=0
transport=tcp
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --bin-dir) bindir=${2:?--bin-dir needs a directory}; shift ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift ;;
    --keep) keep=1 ;;
    --transport) transport=${2:?--transport needs tcp or rdma}; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

[[ "$transport" == tcp || "$transport" == rdma ]] || die "--transport is tcp or rdma, not '$transport'"
rdma_tools=()
[[ "$transport" == rdma ]] && rdma_tools=(rdma:iproute2)
for t in "${rdma_tools[@]}" qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio mkfs.ext4:e2fsprogs \
  debugfs:e2fsprogs nbd-client:nbd-client modprobe:kmod; do
  command -v "${t%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "${t%%:*}" >/dev/null 2>&1 \
    || die "'${t%%:*}' not found: install the Debian package ${t#*:}"
done
export PATH="$PATH:/usr/sbin:/sbin"
busybox_bin=$(command -v busybox)

if [[ -z "$bindir" && "$transport" == tcp ]]; then
  (cd "$repo" && cargo build -q --locked -p chanio-iounit --bin iounitd -p chanio-host --bin hostctl)
  bindir="$repo/target/debug"
elif [[ -z "$bindir" ]]; then
  # The build scripts/rxe-tests.sh makes (TCG runs release code far faster).
  (cd "$repo" && cargo build -q --locked --release --features chanio/verbs --workspace --bins)
  bindir="$repo/target/release"
fi
bindir=$(cd "$bindir" && pwd)
iounitd="$bindir/iounitd"
hostctl="$bindir/hostctl"
[[ -x "$iounitd" && -x "$hostctl" ]] || die "no iounitd and hostctl in $bindir"

# The kernel and its modules (shared with the soft-RoCE VM).
"$repo/scripts/rxe-vm.sh" --kernel-only >/dev/null
kroot="${CHANIO_VM_DIR:-$repo/target/rxe-vm}/kernel"
kver=$(cat "$kroot/version")

work="$repo/target/boot-vm"
rm -rf "$work"
mkdir -p "$work"
daemon_pid=""
iounit_pid=""
cleanup() {
  [[ -n "$daemon_pid" ]] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  # The I/O unit's guest runs in its own process group (setsid below).
  [[ -n "$iounit_pid" ]] && kill -- "-$iounit_pid" 2>/dev/null && wait "$iounit_pid" 2>/dev/null
  ((keep)) || rm -rf "$work"
}
trap cleanup EXIT
token="chanio-$$-$RANDOM"

# --- the root filesystem: busybox and an init that reports and stops ------
root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp}
cp "$busybox_bin" "$root/bin/busybox"
echo "$token" >"$root/etc/chanio-token"
cat >"$root/sbin/init" <<'INIT'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
rootdev=$($B awk '$2 == "/" && $1 != "rootfs" { print $1, $3 }' /proc/mounts | $B tail -n 1)
echo "chanio-root: / is $rootdev"
echo "booted $($B cat /etc/chanio-token)" >/booted
$B sync
# Read-only, ext4 checkpoints its journal: the file is then in its home
# blocks and the filesystem clean, as after an orderly shutdown. (After a
# sync alone it may sit only in the journal, which a power-off leaves to
# the next mount to replay.)
if $B mount -o remount,ro /; then
  echo "chanio-root: wrote /booted"
else
  echo "chanio-root: cannot remount / read-only"
fi
# The console drains before the power goes: a power-off right after the
# echo has cut its line short on the serial port.
$B sleep 1
echo o >/proc/sysrq-trigger
$B sleep 10
INIT
chmod +x "$root/sbin/init"
mkfs.ext4 -q -F -L chanio-root -d "$root" "$work/root.img" 32M

# --- the I/O unit, and the image written into its namespace ---------------
if [[ "$transport" == tcp ]]; then
  RUST_LOG=warn "$iounitd" --listen tcp://127.0.0.1:0 --ns "file:$work/ns.img:64MiB" \
    >"$work/iounitd.out" 2>"$work/iounitd.log" &
  daemon_pid=$!
  for _ in $(seq 1 300); do
    grep -q '^listening on ' "$work/iounitd.out" 2>/dev/null && break
    kill -0 "$daemon_pid" 2>/dev/null || die "iounitd exited: $(cat "$work/iounitd.log")"
    sleep 0.1
  done
  uri=$(sed -n 's/^listening on //p' "$work/iounitd.out" | head -n 1)
  [[ -n "$uri" ]] || die "iounitd did not start: $(cat "$work/iounitd.log")"
  port=${uri##*:}
  "$hostctl" --target "$uri" write --ns 1 --lba 0 --input "$work/root.img" >/dev/null 2>&1 \
    || die "hostctl could not write the root image"
  echo "boot-vm: root image ($(du -k "$work/root.img" | cut -f1) KiB) written to $uri namespace 1"
else
  # The I/O unit's guest: iounitd over rdma on its end of the link, the
  # image written into a RAM namespace by hostctl over rdma; it says
  # "ready", waits for "booted" (the other guest is done), reads the
  # namespace back and stops. Its files are in $work, shared over 9p.
  uri=rdma://192.0.2.1:4520
  cat >"$work/iounit.sh" <<EOF
#!/bin/bash
set -u
cd "$work"
RUST_LOG=warn "$iounitd" --listen $uri --ns ram:64MiB >iounitd.out 2>iounitd.log &
pid=\$!
for _ in \$(seq 1 600); do
  grep -q '^listening on ' iounitd.out 2>/dev/null && break
  kill -0 \$pid 2>/dev/null || { echo "iounitd exited: \$(cat iounitd.log)" >&2; exit 1; }
  sleep 0.1
done
"$hostctl" --target $uri write --ns 1 --lba 0 --input root.img >/dev/null \
  || { echo "hostctl could not write the root image over rdma" >&2; exit 1; }
echo ready >ready
for _ in \$(seq 1 $((timeout_s * 10))); do
  [ -e booted ] && break
  kill -0 \$pid 2>/dev/null || { echo "iounitd exited: \$(cat iounitd.log)" >&2; exit 1; }
  sleep 0.1
done
[ -e booted ] || { echo "the booting guest never finished" >&2; exit 1; }
"$hostctl" --target $uri read --ns 1 --lba 0 --blocks $(($(stat -c %s "$work/root.img") / 512)) \
  --output back.img >/dev/null || { echo "hostctl could not read the namespace back" >&2; exit 1; }
kill \$pid
wait \$pid
exit 0
EOF
  chmod +x "$work/iounit.sh"
  setsid "$repo/scripts/rxe-vm.sh" --mem 2G --timeout "$timeout_s" --link "$work/link.sock" -- "$work/iounit.sh" \
    >"$work/iounit-vm.log" 2>&1 &
  iounit_pid=$!
  for _ in $(seq 1 $((timeout_s * 2))); do
    [[ -e "$work/ready" ]] && break
    kill -0 "$iounit_pid" 2>/dev/null || die "the I/O unit's guest stopped: $(cat "$work/iounit-vm.log")"
    sleep 0.5
  done
  [[ -e "$work/ready" ]] || die "the I/O unit's guest was not ready in ${timeout_s}s"
  echo "boot-vm: root image ($(du -k "$work/root.img" | cut -f1) KiB) written to $uri namespace 1 in the I/O unit's guest"
fi

# --- the initramfs: busybox, hostctl, nbd-client, their libraries, modules --
stage="$work/initramfs"
mkdir -p "$stage"/{bin,dev,proc,sys,run,newroot,modules}
cp "$busybox_bin" "$stage/bin/busybox"
copy_with_libs() { # binary [directory in the initramfs, default /bin]
  mkdir -p "$stage${2:-/bin}"
  cp "$1" "$stage${2:-/bin}/"
  ldd "$1" | awk '/=> \// { print $3 } /^[ \t]*\/lib/ { print $1 }' | while read -r lib; do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
  done
}
copy_with_libs "$hostctl"
copy_with_libs "$(command -v nbd-client)"
cp "$repo/packaging/chanio-boot/chanio-boot" "$stage/bin/"
# shellcheck source=scripts/vm-modules.sh
. "$repo/scripts/vm-modules.sh"
modules=(virtio_pci virtio_net nbd ext4)
if [[ "$transport" == tcp ]]; then
  # QEMU's user network: the I/O unit is at 10.0.2.100:4520 (a forward).
  target=10.0.2.100:4520
  net_setup='ip addr add 10.0.2.15/24 dev eth0'
else
  # The link to the I/O unit's guest: soft-RoCE on it, as there. rdma_rxe
  # computes its ICRC with crc32, which it does not pull in itself;
  # libibverbs finds its rxe provider through /etc/libibverbs.d.
  modules+=(crc32_generic rdma_rxe)
  copy_with_libs "$(command -v rdma)"
  verbs_lib=/usr/lib/x86_64-linux-gnu/libibverbs
  [[ -f "$verbs_lib/librxe-rdmav34.so" && -f /etc/libibverbs.d/rxe.driver ]] \
    || die "no rxe provider for libibverbs: install the Debian packages rdma-core and ibverbs-providers"
  copy_with_libs "$verbs_lib/librxe-rdmav34.so" "$verbs_lib"
  mkdir -p "$stage/etc/libibverbs.d"
  cp /etc/libibverbs.d/rxe.driver "$stage/etc/libibverbs.d/"
  target=192.0.2.1:4520
  net_setup='ip addr add 192.0.2.2/24 dev eth0
rdma link add rxe0 type rxe netdev eth0 || fail "rdma link add rxe0 failed"
for _ in $(seq 1 100); do
  rdma link show rxe0/1 2>/dev/null | grep -q "state ACTIVE" && break
  sleep 0.1
done
rdma link show rxe0/1 | grep -q "state ACTIVE" || fail "rxe0 did not become ACTIVE"
echo "chanio-boot: rxe0 is up on the link to the I/O unit"'
fi
collect_modules "$stage" "$kroot" "$kver" "${modules[@]}"
cat >"$stage/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
fail() { echo "chanio-boot: $*"; echo o >/proc/sysrq-trigger; sleep 10; }
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "chanio-boot: insmod $m failed"; done
ip link set lo up
for _ in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up
INIT
echo "$net_setup" >>"$stage/init"
cat >>"$stage/init" <<'INIT'
# The hook this repository ships (packaging/chanio-boot, docs/boot.md):
# reads through a read-only storage window, writes by command.
chanio-boot /newroot || fail "chanio-boot could not mount the root"
echo "chanio-boot: switching root to /dev/nbd0"
exec switch_root /newroot /sbin/init
INIT
chmod +x "$stage/init"
(cd "$stage" && find . | cpio -o -H newc --quiet) >"$work/initrd.cpio"

# --- boot -------------------------------------------------------------------
accel=(-accel tcg,thread=multi -cpu max)
if [[ -w /dev/kvm ]] && grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
  accel=(-accel kvm -cpu host)
fi
echo "boot-vm: booting (serial log: $work/serial.log)"
if [[ "$transport" == tcp ]]; then
  nic=(-nic "user,model=virtio-net-pci,restrict=on,guestfwd=tcp:$target-cmd:$busybox_bin nc 127.0.0.1 $port")
else
  nic=(-netdev "stream,id=link,server=off,addr.type=unix,addr.path=$work/link.sock"
    -device virtio-net-pci,netdev=link,mac=52:54:00:c4:a1:02)
fi
status=0
timeout -k 10 "$timeout_s" \
  qemu-system-x86_64 -machine q35 "${accel[@]}" -smp 2 -m 1G \
    -display none -no-reboot -monitor none -serial "file:$work/serial.log" "${nic[@]}" \
    -kernel "$kroot/boot/vmlinuz-$kver" -initrd "$work/initrd.cpio" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init chanio.target=$target chanio.transport=$transport chanio.ns=1" \
    </dev/null &
qemu_pid=$!
# Under TCG on a loaded machine the guest's power-off has been seen to
# stall (soft lockups, QEMU never exits). Once the guest said its file is
# written and / is read-only, nothing it does later changes the image: it
# gets 60 s to power off, then is stopped. The verdict rests on the serial
# log and on what the I/O unit holds, checked below.
written_at=""
while kill -0 "$qemu_pid" 2>/dev/null; do
  if [[ -z "$written_at" ]] && grep -q '^chanio-root: wrote /booted' "$work/serial.log" 2>/dev/null; then
    written_at=$SECONDS
  fi
  if [[ -n "$written_at" ]] && ((SECONDS - written_at > 60)); then
    echo "boot-vm: the guest wrote its file but did not power off within 60 s; stopping it" >&2
    kill "$qemu_pid" 2>/dev/null || true
    break
  fi
  sleep 0.5
done
wait "$qemu_pid" || status=$?
[[ -n "$written_at" ]] && status=0
serial=$(tr -d '\r' <"$work/serial.log")
grep '^chanio-' <<<"$serial" | sed 's/^/  guest: /' || true
((status == 124 || status == 137)) && die "the guest ran past ${timeout_s}s"
grep -q '^chanio-root: / is /dev/nbd0 ext4' <<<"$serial" \
  || die "the guest did not report its root on /dev/nbd0; serial log:
$serial"
grep -q '^chanio-root: wrote /booted' <<<"$serial" || die "the guest did not write /booted"
grep -q '^chanio-boot: reads go through a storage window' <<<"$serial" \
  || die "the guest's reads did not go through a storage window"

# --- what the guest wrote is on the I/O unit --------------------------------
if [[ "$transport" == tcp ]]; then
  blocks=$(($(stat -c %s "$work/root.img") / 512))
  "$hostctl" --target "$uri" read --ns 1 --lba 0 --blocks "$blocks" --output "$work/back.img" 2>/dev/null \
    || die "hostctl could not read the namespace back"
else
  # The I/O unit's guest reads it back over rdma, then stops.
  touch "$work/booted"
  wait "$iounit_pid" || die "the I/O unit's guest failed: $(cat "$work/iounit-vm.log")"
  iounit_pid=""
  [[ -f "$work/back.img" ]] || die "the I/O unit's guest read nothing back"
fi
fsck_out=$(e2fsck -fn "$work/back.img" 2>&1) \
  || die "the image read back is not a clean filesystem (e2fsck -fn):
$fsck_out"
got=$(debugfs -R 'cat /booted' "$work/back.img" 2>/dev/null)
[[ "$got" == "booted $token" ]] || die "the image read back holds '$got' in /booted, not 'booted $token'"
echo "boot-vm: the guest booted from the namespace over $transport, and its write is on the I/O unit"
