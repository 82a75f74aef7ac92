#!/usr/bin/env bash
# Runs every subway test: unit tests, the XDP program build, and the
# end-to-end tests in network namespaces (those need root, as CI has).
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
if [ "${1:-}" = "--quick" ]; then
  cargo test --lib --bins
else
  # End-to-end tests each build their own namespaces; run them a few at a
  # time so two cores are not starved.
  cargo test -- --test-threads=2
fi

# Benchmark smoke test: every contender must move packets (no speed is
# asserted; see README "Benchmarks" for the real run).
if [ "${1:-}" != "--quick" ] && [ "$(id -u)" -eq 0 ]; then
  target/debug/subway-bench routed --quick --profile debug --out "${TMPDIR:-/tmp}/subway-bench-smoke"
  target/debug/subway-bench tunnel --quick --profile debug --out "${TMPDIR:-/tmp}/subway-bench-smoke"
fi
