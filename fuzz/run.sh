#!/usr/bin/env bash
# fuzz/run.sh [EXECS] [TARGET...] — fuzzes each target for about EXECS
# executions (default 1000000) with cargo-afl, two at a time, then prints
# each target's executions, paths found and crashes from AFL's stats.
# Needs: cargo install cargo-afl (builds AFL++ once); see README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
EXECS="${1:-1000000}"; shift || true
TARGETS=("$@"); [[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(tcp shm wire capsule host_data nbd)
command -v cargo-afl >/dev/null || { echo "run.sh: cargo-afl missing: cargo install cargo-afl" >&2; exit 2; }
cargo afl build --release >/dev/null
[[ -d seeds ]] || ./target/release/seeds
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_QUIET=1
run_one() {
    local t=$1
    rm -rf "out/$t"; mkdir -p out
    # Seeds plus the corpus kept from earlier runs.
    mkdir -p "in/$t"; cp seeds/"$t"/* "in/$t/"; cp corpus/"$t"/* "in/$t/" 2>/dev/null || true
    timeout 1800 cargo afl fuzz -i "in/$t" -o "out/$t" -E "$EXECS" -- "./target/release/$t" >"out-$t.log" 2>&1 || true
}
pids=()
for t in "${TARGETS[@]}"; do
    run_one "$t" & pids+=($!)
    if [[ ${#pids[@]} -ge 2 ]]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
wait
printf '%-10s %12s %8s %8s %8s\n' target execs paths crashes hangs
for t in "${TARGETS[@]}"; do
    s="out/$t/default/fuzzer_stats"
    if [[ -f $s ]]; then
        v() { awk -F' : ' -v k="$1" '$1 ~ "^"k" *$" {print $2}' "$s"; }
        printf '%-10s %12s %8s %8s %8s\n' "$t" "$(v execs_done)" "$(v corpus_count)" "$(v saved_crashes)" "$(v saved_hangs)"
    else
        printf '%-10s did not run: %s\n' "$t" "$(tail -n 3 "out-$t.log" | tr '\n' ' ')"
    fi
done
