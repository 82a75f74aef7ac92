#!/usr/bin/env bash
# One-time machine set-up for building and testing subway.
# Installs the system packages, the nightly rust-src component, bpf-linker,
# boringtun-cli (a reference peer) and cargo-deb (the Debian package).
# Safe to run twice: every step checks before it installs.
set -euo pipefail

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(
  # build chain for the eBPF program (bpf-linker) and libxdp (xsk-rs)
  llvm-22-dev libpolly-22-dev clang-22 libelf-dev zlib1g-dev libzstd-dev libpcap-dev m4 pkg-config
  # namespaces, veths and the tests' tools; nftables fences VNETs off from the kernel
  iproute2 ethtool iputils-ping netcat-openbsd nftables
  # real WireGuard peers for the interop tests, iperf3 for the TCP benchmark,
  # gnuplot for the benchmark plots
  wireguard-tools wireguard-go iperf3 gnuplot-nox
  # tcpdump: the fail-safe tests capture the uplink to prove nothing leaves in clear
  tcpdump
  # keepalived: VRRP for an active/standby pair; bird2: BGP + BFD for
  # active/active gateways (the tests run both in namespaces)
  keepalived bird2
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  say "Debian packages already installed"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  say "installing the nightly toolchain (the eBPF crate is built with -Z build-std)"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
else
  say "nightly rust-src already installed"
fi

if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  say "building bpf-linker against LLVM 22 (about 2 minutes)"
  PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --locked \
    --no-default-features --features llvm-22
else
  say "bpf-linker already installed"
fi

if ! command -v boringtun-cli >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/boringtun-cli" ]; then
  say "building boringtun-cli, a reference WireGuard peer for the interop tests (about 2 minutes)"
  cargo install boringtun-cli --locked
else
  say "boringtun-cli already installed"
fi

if ! command -v cargo-deb >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-deb" ]; then
  say "building cargo-deb, which makes the Debian package (about 1 minute)"
  cargo install cargo-deb --locked
else
  say "cargo-deb already installed"
fi

# bpffs is where aya may pin maps; mount it if the machine has not.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  say "mounting bpffs on /sys/fs/bpf"
  $SUDO mount -t bpf bpf /sys/fs/bpf || say "could not mount bpffs (not fatal)"
fi

say "done. Build and test with: ./test.sh"
