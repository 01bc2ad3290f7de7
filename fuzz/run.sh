#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20), one after the other; fails on the first
# crash, leaving the input in fuzz/artifacts/<target>/. Installs cargo-fuzz if it is missing.
#
#   bash fuzz/run.sh 20            # CI: a short run of each target
#   bash fuzz/run.sh 600 checkpoint   # one target, longer
#
# cargo-fuzz passes nightly-only compiler flags (-Zsanitizer=address, coverage); on a stable
# toolchain RUSTC_BOOTSTRAP=1 allows them, so this script sets it. The first build compiles every
# dependency with the sanitizer: several minutes on two cores.
set -euo pipefail
seconds="${1:-20}"
shift || true
cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
  echo "fuzz: $target for ${seconds}s"
  mkdir -p "corpus/$target"
  # Seeds committed in seeds/<target> (if any) start the corpus; the corpus itself is not
  # committed.
  if [ -d "seeds/$target" ]; then
    cp -n "seeds/$target"/* "corpus/$target"/ 2>/dev/null || true
  fi
  log="$(mktemp)"
  status=0
  cargo fuzz run -O -a "$target" "corpus/$target" -- -max_total_time="$seconds" -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
    echo "fuzz: $target FAILED (exit $status); the input is in fuzz/artifacts/$target/"
    exit 1
  fi
  rm -f "$log"
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
