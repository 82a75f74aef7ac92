#!/usr/bin/env bash
# Runs every subway test: formatting, lints, unit tests, fuzz targets,
# interoperability tests, the end-to-end tests in network namespaces (those
# need root, as CI has), and the benchmark smoke runs.
# Usage: ./test.sh            all tests
#        ./test.sh --quick    unit tests only (no root needed)
set -euo pipefail
cd "$(dirname "$0")"
# Installs only what is missing; a no-op on a machine already set up.
./setup.sh
# libxdp (built by xsk-rs) and bpf-linker want LLVM 22's clang and tools.
export PATH="/usr/lib/llvm-22/bin:$HOME/.cargo/bin:$PATH"

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo build --bins

log=$(mktemp)
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
export SUBWAY_SKIP_LOG="$skips"
status=0
if [ "${1:-}" = "--quick" ]; then
  cargo test --no-fail-fast --lib --bins 2>&1 | tee "$log" || status=1
else
  # Every suite runs even when one fails (--no-fail-fast), so one failure
  # hides nothing. End-to-end tests each build their own namespaces; run
  # them two at a time so two cores are not starved.
  cargo test --no-fail-fast --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log" || status=1
  # Benchmark smoke tests: every contender must move packets (no speed is
  # asserted; see README "Benchmarks" for the real runs).
  if [ "$(id -u)" -eq 0 ]; then
    if target/debug/subway-bench all --quick --profile debug --out "${TMPDIR:-/tmp}/subway-bench-smoke"; then
      echo "test result: ok. 1 passed; 0 failed (bench smoke)" | tee -a "$log"
    else
      echo "bench smoke: 1 failed" | tee -a "$log"
      status=1
    fi
  fi
fi
# Tests that could not run here (no root outside CI) are listed in
# $SUBWAY_SKIP_LOG; in CI a missing privilege fails instead
# (tests/src/env.rs require_root).
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '(; |bench smoke: )[0-9]+ failed' "$log" | grep -Eo '[0-9]+' | awk '{s+=$1} END {print s+0}')
skipped=$(wc -l < "$skips")
echo "suites: $(grep -c 'test result:' "$log") run, exit status ${status}"
echo "tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
exit "$status"
