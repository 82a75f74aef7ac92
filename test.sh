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
trap 'rm -f "$log"' EXIT
if [ "${1:-}" = "--quick" ]; then
  cargo test --lib --bins 2>&1 | tee "$log"
else
  # End-to-end tests each build their own namespaces; run them two at a
  # time so two cores are not starved.
  cargo test --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
  # Benchmark smoke tests: every contender must move packets (no speed is
  # asserted; see README "Benchmarks" for the real runs).
  if [ "$(id -u)" -eq 0 ]; then
    target/debug/subway-bench all --quick --profile debug --out "${TMPDIR:-/tmp}/subway-bench-smoke"
  fi
fi
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
