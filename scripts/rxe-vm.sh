#!/usr/bin/env bash
# Runs a command inside a QEMU guest that has a soft-RoCE (rdma_rxe) device.
#
# The guest boots Debian's stock kernel (linux-image-amd64, which ships
# rdma_rxe, nvmet-rdma, nvme-rdma, nvmet-tcp, nvme-tcp, nbd and brd) with an
# initramfs made here from busybox. Its root filesystem is this machine's own
# root, shared read-only over 9p, so the guest runs the binaries, libraries
# and tools installed here; the repository is shared read-write at its own
# path, and /tmp, /run and /dev/shm are the guest's own tmpfs. The guest has
# no network device (-nic none): the rxe device sits on a dummy interface
# whose address exists only inside it. The script returns CMD's exit status.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/rxe-vm.sh [OPTIONS] [--] CMD [ARG...]

Boots Debian's stock kernel in QEMU (KVM where /dev/kvm works, TCG
otherwise), creates the soft-RoCE device rxe0 over a dummy interface
(address 192.0.2.1/24, inside the guest only), and runs CMD there in the
current directory, as root, with this machine's root filesystem (read-only)
and the repository (read-write) shared into the guest. Exits with CMD's
status; 124 when the guest ran past --timeout, 125 when it died before CMD
finished.

  scripts/rxe-vm.sh ibv_devinfo
  scripts/rxe-vm.sh -- ./target/debug/examples/pingpong --transport verbs

Options:
  --mem SIZE        guest memory (QEMU's -m; default 4G)
  --cpus N          guest CPUs (default: this machine's, at most 4)
  --timeout SECS    stop the guest after SECS seconds (default 3600)
  --env NAME=VALUE  set a variable for CMD (repeatable); PATH, RUST_LOG,
                    RUST_BACKTRACE and every CHANIO_* variable pass through
  --no-rxe          boot without creating rxe0 (rdma_rxe is still loaded)
  --link PATH       give the guest a virtio network device (eth0) on a
                    QEMU-internal link: QEMU listens on the unix socket
                    PATH, where one other QEMU (scripts/boot-vm.sh) can
                    join; nothing else is on it. rxe0 then sits on eth0,
                    with address 192.0.2.1/24, instead of a dummy device
  --disk FILE       attach FILE as a raw virtio disk (the guest's /dev/vda
                    once CMD runs `modprobe virtio_blk`), written through
                    to FILE with no cache on this side (cache=directsync):
                    what the guest wrote and flushed is in FILE whenever
                    the guest stops, a power cut included
  --kernel-only     fetch the kernel and build the initramfs, then exit
  -h, --help        this text

Needs: qemu-system-x86, busybox-static, kmod, cpio and apt-get (the kernel
package is downloaded once into target/rxe-vm/, or $CHANIO_VM_DIR). Inside
the guest, the RDMA user space is this machine's: install rdma-core,
ibverbs-providers and ibverbs-utils here.
  apt-get install qemu-system-x86 busybox-static kmod cpio rdma-core \
      ibverbs-providers ibverbs-utils iproute2
USAGE
}

die() { printf 'rxe-vm.sh: %s\n' "$*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------------------
# Inside the guest (PID 1 after switch_root): set up soft-RoCE, run the
# command, record its status, power off.
# ---------------------------------------------------------------------------
if [[ "${1:-}" == "--in-guest" ]]; then
  ctl=/run/rxe-vm
  # shellcheck source=/dev/null
  . "$ctl/env.sh"
  # The guest kernel's modules live in the downloaded package, not in
  # /lib/modules: modprobe, the command's and the kernel's own requests,
  # goes through this wrapper.
  mkdir -p /run/rxe-vm-bin
  printf '#!/bin/sh\nexec /sbin/modprobe -d %q "$@"\n' "$RXE_VM_KROOT" >/run/rxe-vm-bin/modprobe
  chmod +x /run/rxe-vm-bin/modprobe
  echo /run/rxe-vm-bin/modprobe >/proc/sys/kernel/modprobe
  export PATH="/run/rxe-vm-bin:$PATH"
  ulimit -l unlimited
  ulimit -n 65536
  guest_fail() {
    echo "rxe-vm (guest): $*" >&2
    echo 125 >"$ctl/status"
    sync
    echo o >/proc/sysrq-trigger
    sleep 10
  }
  ip link set lo up
  # rdma_rxe computes its ICRC with the kernel's crc32, which it does not
  # pull in itself.
  modprobe crc32_generic || guest_fail "modprobe crc32_generic failed"
  modprobe rdma_rxe || guest_fail "modprobe rdma_rxe failed"
  if [[ "$RXE_VM_RXE" == 1 ]]; then
    if [[ "$RXE_VM_LINK" == 1 ]]; then
      modprobe virtio_net || guest_fail "modprobe virtio_net failed"
      for _ in $(seq 1 100); do
        [[ -e /sys/class/net/eth0 ]] && break
        sleep 0.1
      done
      netdev=eth0
      ip link set eth0 up || guest_fail "the link's interface eth0 did not appear"
    else
      netdev=dummy0
      ip link add dummy0 type dummy || guest_fail "ip link add dummy0 failed"
      ip link set dummy0 mtu 9000 up
    fi
    ip addr add 192.0.2.1/24 dev "$netdev"
    rdma link add rxe0 type rxe netdev "$netdev" || guest_fail "rdma link add rxe0 failed"
    for _ in $(seq 1 100); do
      rdma link show rxe0/1 2>/dev/null | grep -q 'state ACTIVE' && break
      sleep 0.1
    done
    rdma link show rxe0/1 | grep -q 'state ACTIVE' || guest_fail "rxe0 did not become ACTIVE"
  fi
  status=0
  cd "$RXE_VM_CWD" || guest_fail "no directory $RXE_VM_CWD in the guest"
  "$ctl/cmd.sh" </dev/null || status=$?
  echo "$status" >"$ctl/status"
  sync
  echo o >/proc/sysrq-trigger
  sleep 10
  exit "$status"
fi

# ---------------------------------------------------------------------------
# On the host: options, the kernel, the initramfs, QEMU.
# ---------------------------------------------------------------------------
mem=4G
cpus=$(nproc)
((cpus > 4)) && cpus=4
timeout_s=3600
rxe=1
kernel_only=0
extra_env=()
disk=()
link=()
link_on=0
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --mem) mem=${2:?--mem needs a size}; shift ;;
    --cpus) cpus=${2:?--cpus needs a number}; shift ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift ;;
    --env) [[ "${2:-}" == *=* ]] || die "--env takes NAME=VALUE"; extra_env+=("$2"); shift ;;
    --no-rxe) rxe=0 ;;
    --disk)
      [[ -f "${2:-}" ]] || die "--disk needs an existing file"
      disk=(-drive "file=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"),if=virtio,format=raw,cache=directsync")
      shift ;;
    --link)
      [[ -n "${2:-}" ]] || die "--link needs a socket path"
      link=(-netdev "stream,id=link,server=on,addr.type=unix,addr.path=$2"
        -device virtio-net-pci,netdev=link,mac=52:54:00:c4:a1:01)
      link_on=1
      shift ;;
    --kernel-only) kernel_only=1 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
  shift
done
((kernel_only)) || (($#)) || die "no command given (see --help)"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "--timeout takes whole seconds, not '$timeout_s'"

need() { # tool package
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package $2 (see --help)"
}
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need depmod kmod
need cpio cpio
need apt-get apt
busybox_bin=$(command -v busybox)
file -L "$busybox_bin" 2>/dev/null | grep -q 'statically linked' \
  || ldd "$busybox_bin" 2>&1 | grep -q 'not a dynamic' \
  || die "$busybox_bin is not statically linked: install busybox-static"

vmdir=${CHANIO_VM_DIR:-$repo/target/rxe-vm}
mkdir -p "$vmdir"
vmdir=$(cd "$vmdir" && pwd)

# The kernel: Debian's linux-image-amd64, unpacked (not installed) once.
kroot="$vmdir/kernel"
kver=$(cat "$kroot/version" 2>/dev/null || true)
if [[ -z "$kver" || ! -f "$kroot/boot/vmlinuz-$kver" ]]; then
  kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'; }
  pkg=$(kernel_pkg)
  if [[ -z "$pkg" && $(id -u) -eq 0 ]]; then
    apt-get update -qq >&2 || true
    pkg=$(kernel_pkg)
  fi
  [[ -n "$pkg" ]] || die "apt knows no linux-image-amd64: run apt-get update first"
  echo "rxe-vm: fetching $pkg (once, into $kroot)" >&2
  rm -rf "$kroot" "$vmdir"/linux-image-*.deb
  (cd "$vmdir" && apt-get download "$pkg" 2>&1 | { grep -v '^W: Download is performed unsandboxed' || true; } >&2) \
    || die "apt-get download $pkg failed"
  dpkg-deb -x "$vmdir"/linux-image-*.deb "$kroot"
  rm -f "$vmdir"/linux-image-*.deb
  kver=${pkg#linux-image-}
  [[ -f "$kroot/boot/vmlinuz-$kver" ]] || die "$pkg holds no boot/vmlinuz-$kver"
  depmod -b "$kroot" "$kver"
  echo "$kver" >"$kroot/version"
fi

# The initramfs: busybox and the modules that reach the 9p root.
initrd="$vmdir/initrd-$kver.cpio"
if [[ ! -f "$initrd" || "$0" -nt "$initrd" || "$repo/scripts/vm-modules.sh" -nt "$initrd" ]]; then
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage"/{bin,dev,proc,sys,newroot,modules}
  cp "$busybox_bin" "$stage/bin/busybox"
  # shellcheck source=scripts/vm-modules.sh
  . "$repo/scripts/vm-modules.sh"
  collect_modules "$stage" "$kroot" "$kver" virtio_pci 9pnet_virtio 9p
  cat >"$stage/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "rxe-vm init: insmod $m failed"; done
fail() { echo "rxe-vm init: $*"; echo o > /proc/sysrq-trigger; sleep 10; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /newroot || fail "cannot mount the host's root"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
ln -s /proc/self/fd /newroot/dev/fd
ln -s /proc/self/fd/0 /newroot/dev/stdin
ln -s /proc/self/fd/1 /newroot/dev/stdout
ln -s /proc/self/fd/2 /newroot/dev/stderr
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs tmpfs /newroot/var/tmp 2>/dev/null
mkdir -p /newroot/run/rxe-vm
mount -t 9p -o trans=virtio,version=9p2000.L,cache=mmap,msize=512000 ctl /newroot/run/rxe-vm || fail "cannot mount the control share"
repo=$(cat /newroot/run/rxe-vm/repo)
# A repository (or kernel folder) under /tmp or /run lies in the guest's
# own tmpfs: make the mount point there (elsewhere it exists already).
mkdir -p "/newroot$repo" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,cache=mmap,msize=512000 work "/newroot$repo" || fail "cannot mount the repository"
kroot=$(cat /newroot/run/rxe-vm/kroot)
mkdir -p "/newroot$kroot" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 kernel "/newroot$kroot" || fail "cannot mount the kernel's modules"
exec switch_root /newroot /bin/bash "$repo/scripts/rxe-vm.sh" --in-guest
INIT
  chmod +x "$stage/init"
  (cd "$stage" && find . | cpio -o -H newc --quiet) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  rm -rf "$stage"
  trap - EXIT
fi
((kernel_only)) && { echo "rxe-vm: kernel $kver and initramfs ready in $vmdir"; exit 0; }

# The control share: the command, its environment, and its status.
ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
echo "$repo" >"$ctl/repo"
echo "$kroot" >"$ctl/kroot"
{
  printf 'export RXE_VM_KROOT=%q RXE_VM_RXE=%q RXE_VM_LINK=%q RXE_VM_CWD=%q\n' "$kroot" "$rxe" "$link_on" "$PWD"
  printf 'export HOME=/root TERM=dumb\n'
  printf 'export PATH=%q\n' "$PATH"
  while IFS='=' read -r name _; do
    case "$name" in
      RUST_LOG|RUST_BACKTRACE|RUST_TEST_THREADS|CHANIO_*) printf 'export %s=%q\n' "$name" "${!name}" ;;
    esac
  done < <(env)
  for kv in "${extra_env[@]}"; do
    printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
  done
} >"$ctl/env.sh"
{
  echo '#!/bin/bash'
  printf 'exec'
  printf ' %q' "$@"
  echo
} >"$ctl/cmd.sh"
chmod +x "$ctl/cmd.sh"

accel=(-accel tcg,thread=multi)
if [[ -w /dev/kvm ]] && grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
  accel=(-accel kvm -cpu host)
else
  accel+=(-cpu max)
fi

share() { # id path mount_tag [readonly]
  local ro=""
  [[ -n "${4:-}" ]] && ro=",readonly=on"
  printf -- '-fsdev local,id=%s,path=%s,security_model=none,multidevs=remap%s\0' "$1" "$2" "$ro"
  printf -- '-device virtio-9p-pci,fsdev=%s,mount_tag=%s\0' "$1" "$3"
}
mapfile -d '' -t shares < <(share root / hostroot ro; share work "$repo" work; share ctl "$ctl" ctl; share kern "$kroot" kernel ro)
qemu_args=()
for s in "${shares[@]}"; do
  qemu_args+=("${s%% *}" "${s#* }")
done

status=0
timeout --foreground -k 10 "$timeout_s" \
  qemu-system-x86_64 -machine q35 "${accel[@]}" -smp "$cpus" -m "$mem" \
    -nic none -display none -no-reboot -monitor none \
    -chardev stdio,id=con,signal=off -serial chardev:con \
    -kernel "$kroot/boot/vmlinuz-$kver" -initrd "$initrd" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init" \
    "${qemu_args[@]}" "${disk[@]}" "${link[@]}" </dev/null || status=$?
if ((status == 124 || status == 137)); then
  echo "rxe-vm: the guest ran past --timeout ${timeout_s}s" >&2
  exit 124
fi
if [[ ! -s "$ctl/status" ]]; then
  echo "rxe-vm: the guest stopped before the command finished (qemu exit status $status)" >&2
  exit 125
fi
exit "$(cat "$ctl/status")"
