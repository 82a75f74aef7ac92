#!/bin/sh
# Builds the Debian package: target/debian/subway_VERSION_ARCH.deb (the
# release binary, its man pages and shell completions, the systemd units,
# the example configs). Needs ./setup.sh's tools (cargo-deb among them).
# Extra arguments go to cargo-deb (e.g. --output DIR).
set -eu
cd "$(dirname "$0")/../.."
export PATH="/usr/lib/llvm-22/bin:$HOME/.cargo/bin:$PATH"
cargo build --release -p subway
rm -rf target/release/gen
target/release/subway gen-docs target/release/gen
# Debian policy: man pages compressed, reproducibly.
gzip -9n target/release/gen/man/*
cargo deb -p subway --no-build "$@"
