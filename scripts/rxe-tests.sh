#!/usr/bin/env bash
# Builds chanio with the verbs feature and runs its verbs tests over
# soft-RoCE inside the QEMU guest of scripts/rxe-vm.sh: the provider
# conformance suite, the endpoint tests, two processes, the storage
# end-to-end tests (iounitd and hostctl), and the pingpong and storage demos.
# Inside the guest a missing device fails the tests (CHANIO_REQUIRE_VERBS=1),
# so a pass here means every one of them ran over verbs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/rxe-tests.sh [--debug] [--timeout SECS] [--no-build]

Builds the workspace's tests, iounitd, hostctl and the examples with
`--features verbs` (release by default: TCG runs every guest instruction
in software, so optimised code saves most of the run), then boots the
soft-RoCE VM (scripts/rxe-vm.sh) and runs, over verbs only:

  conformance verbs::*          the provider conformance suite
  endpoint                      every Endpoint operation
  two_process                   two processes over verbs
  messaging provider::verbs     the provider's unit tests
  e2e rdma                      iounitd and hostctl over rdma://, auto://
  alloc                         nothing allocated or registered per I/O
  pingpong                      send, push, push --zero-copy and write modes,
                                in one process and in two
  loopback --transport rdma     the storage demo
  and again endpoint, e2e and pingpong with CHANIO_VERBS_IMMEDIATE=0: transfer
  indications as separate messages, as on iWARP devices

Prints a line per step and ends with "N passed, M failed"; exits non-zero
when any step failed. Needs what scripts/rxe-vm.sh needs (see its --help).
USAGE
}

die() { printf 'rxe-tests.sh: %s\n' "$*" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------------------
# Inside the guest: run every step from the plan, count, report.
# ---------------------------------------------------------------------------
if [[ "${1:-}" == "--in-vm" ]]; then
  plan=$2
  passed=0
  failed=0
  failures=()
  while IFS=$'\t' read -r name cmd; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    echo "=== $name"
    start=$SECONDS
    if bash -c "$cmd"; then
      passed=$((passed + 1))
      echo "=== $name: ok ($((SECONDS - start)) s)"
    else
      failed=$((failed + 1))
      failures+=("$name")
      echo "=== $name: FAILED ($((SECONDS - start)) s)"
    fi
  done <"$plan"
  echo
  echo "rxe steps: ${#failures[@]} failed${failures[*]:+: ${failures[*]}}"
  echo "$passed passed, $failed failed"
  ((failed == 0))
  exit
fi

profile=release
timeout_s=2400
build=1
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --debug) profile=debug ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift ;;
    --no-build) build=0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

cd "$repo"
cargo_profile=()
[[ "$profile" == release ]] && cargo_profile=(--release)
features=(--features chanio/verbs)
if ((build)); then
  echo "rxe-tests: building with the verbs feature ($profile)" >&2
  cargo build --locked "${cargo_profile[@]}" "${features[@]}" --workspace --bins --examples
fi
# The test executables, by target name (cargo prints them as JSON; a
# build already made only reports them).
declare -A exe=()
while IFS=$'\t' read -r name path; do
  exe[$name]=$path
done < <(cargo test --locked "${cargo_profile[@]}" "${features[@]}" --workspace --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = m["target"]["name"] if kind != "lib" else "lib:" + m["target"]["name"]
        print(name + "\t" + m["executable"])
')
for t in conformance endpoint two_process e2e alloc lib:messaging; do
  [[ -n "${exe[$t]:-}" ]] || die "cargo built no test executable '$t'"
done
bin="target/$profile"
for b in iounitd hostctl examples/pingpong examples/loopback; do
  [[ -x "$bin/$b" ]] || die "$bin/$b is missing (run without --no-build)"
done

# Two processes of pingpong: a server on a fixed port of the guest (the
# guest is empty, so the port is free), which serves until it is stopped,
# then a client; the step is the client's status.
pp="$bin/examples/pingpong --transport verbs"
two() { # mode extra...
  local mode=$1
  shift
  printf '%s --listen 127.0.0.1:4521 & s=$!; sleep 2; %s --connect 127.0.0.1:4521 --mode %s --iters 300 --warmup 30 %s; rc=$?; kill $s; exit $rc' \
    "$pp" "$pp" "$mode" "$*"
}

plan="$repo/target/rxe-vm/plan.tsv"
mkdir -p "$(dirname "$plan")"
{
  printf 'conformance\t%s verbs::\n' "${exe[conformance]}"
  printf 'endpoint\t%s\n' "${exe[endpoint]}"
  printf 'two_process\t%s two_processes_over_verbs\n' "${exe[two_process]}"
  printf 'provider unit tests\t%s provider::verbs\n' "${exe[lib:messaging]}"
  printf 'e2e over rdma\t%s rdma\n' "${exe[e2e]}"
  printf 'nothing allocated or registered per I/O\t%s\n' "${exe[alloc]}"
  printf 'pingpong send\t%s --mode send --iters 300 --warmup 30\n' "$pp"
  printf 'pingpong push 64KiB\t%s --mode push --size 64KiB --iters 300 --warmup 30\n' "$pp"
  printf 'pingpong push --zero-copy 1MiB\t%s --mode push --zero-copy --size 1MiB --iters 100 --warmup 10\n' "$pp"
  printf 'pingpong write 1MiB\t%s --mode write --size 1MiB --iters 100 --warmup 10\n' "$pp"
  printf 'pingpong two processes send\t%s\n' "$(two send)"
  printf 'pingpong two processes push\t%s\n' "$(two push --size 4KiB)"
  printf 'pingpong two processes write\t%s\n' "$(two write --size 64KiB)"
  printf 'storage demo over rdma\t%s/examples/loopback --transport rdma --size 8MiB --data 2MiB --ops 500\n' "$bin"
  # The same paths with transfer indications as separate messages, as on
  # iWARP (rxe forced to offer no immediate data).
  sep='CHANIO_VERBS_IMMEDIATE=0'
  printf 'separate indications: endpoint\t%s %s\n' "$sep" "${exe[endpoint]}"
  printf 'separate indications: e2e over rdma\t%s %s rdma::\n' "$sep" "${exe[e2e]}"
  printf 'separate indications: pingpong push\t%s %s --mode push --size 64KiB --iters 300 --warmup 30\n' "$sep" "$pp"
  printf 'separate indications: pingpong write\t%s %s --mode write --size 64KiB --iters 300 --warmup 30\n' "$sep" "$pp"
} >"$plan"

exec "$repo/scripts/rxe-vm.sh" --timeout "$timeout_s" \
  --env CHANIO_TEST_FABRICS=verbs --env CHANIO_REQUIRE_VERBS=1 \
  -- "$repo/scripts/rxe-tests.sh" --in-vm "$plan"
