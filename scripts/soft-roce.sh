#!/usr/bin/env bash
# Creates a soft-RoCE (rxe) RDMA device over a network interface, checks it,
# and runs chanio's storage demo (examples/loopback) and pingpong example
# over the verbs provider on it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/soft-roce.sh [--help] [--no-pingpong] [INTERFACE]

Creates the soft-RoCE device rxe_<INTERFACE> over INTERFACE (default: the
interface of the default route), unless an rxe device already sits on it,
verifies it with `rdma link` and `ibv_devices`, then runs the storage demo
and the messaging ping-pong over it:

  cargo run --release --features verbs --example loopback -- --transport rdma
  cargo run --release --features verbs --example pingpong -- --transport verbs

with CHANIO_VERBS_DEVICE set to that device (--no-pingpong skips both).

Needs root (modprobe, rdma link add) and the Debian packages rdma-core,
ibverbs-providers, ibverbs-utils and iproute2, and a kernel with the
rdma_rxe module. Remove the device later with: sudo rdma link delete <name>
USAGE
}

die() { printf 'soft-roce.sh: %s\n' "$*" >&2; exit 1; }

run_pingpong=1
iface=""
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-pingpong) run_pingpong=0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$iface" ]] || die "only one interface may be given"; iface="$1" ;;
  esac
  shift
done

[[ $(id -u) -eq 0 ]] || die "must run as root (it loads rdma_rxe and adds an RDMA link): sudo $0 $*"

need_tool() { # tool package
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package $2 (apt-get install $2)"
}
need_tool ip iproute2
need_tool rdma iproute2
need_tool ibv_devices ibverbs-utils
need_tool modprobe kmod
ls /usr/lib/*/libibverbs/librxe-rdmav*.so >/dev/null 2>&1 \
  || die "the rxe user-space driver is missing: install the Debian packages rdma-core and ibverbs-providers"

if [[ -z "$iface" ]]; then
  iface=$(ip -o route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit }}')
  [[ -n "$iface" ]] || die "no default route: name the interface (ip -br link lists them)"
fi
ip link show dev "$iface" >/dev/null 2>&1 || die "no network interface named '$iface' (ip -br link lists them)"

if ! modprobe rdma_rxe 2>/dev/null; then
  die "the kernel has no rdma_rxe module (soft-RoCE): use a kernel built with CONFIG_RDMA_RXE (most distribution kernels are; some cloud/container kernels are not)"
fi

# An rxe device already on this interface? (`rdma link` prints "... netdev IFACE")
dev=$(rdma link show 2>/dev/null | awk -v ifc="$iface" '$0 ~ ("netdev " ifc "( |$)") { split($2, a, "/"); print a[1]; exit }')
if [[ -z "$dev" ]]; then
  dev="rxe_${iface}"
  echo "creating soft-RoCE device $dev over $iface"
  rdma link add "$dev" type rxe netdev "$iface" || die "rdma link add $dev type rxe netdev $iface failed"
else
  echo "soft-RoCE device $dev already exists over $iface"
fi

echo "--- rdma link"
rdma link show | grep -E "^link $dev/" || die "rdma link does not show $dev"
rdma link show | grep -E "^link $dev/" | grep -q "state ACTIVE" \
  || echo "warning: $dev is not ACTIVE yet (is $iface up? ip link set $iface up)" >&2
echo "--- ibv_devices"
ibv_devices | tee /dev/stderr | grep -qw "$dev" || die "ibv_devices does not list $dev (is ibverbs-providers installed?)"

if ((run_pingpong)); then
  need_tool cargo "rustup (https://rustup.rs), or cargo"
  cd "$(dirname "$0")/.."
  echo "--- storage demo (I/O unit and host) over verbs on $dev"
  CHANIO_VERBS_DEVICE="$dev" cargo run --release --features verbs --example loopback -- --transport rdma
  echo "--- pingpong over verbs on $dev"
  CHANIO_VERBS_DEVICE="$dev" cargo run --release --features verbs --example pingpong -- --transport verbs
fi
