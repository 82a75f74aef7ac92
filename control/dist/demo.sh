#!/bin/bash
# subway demo: two sites on this machine, each a host behind a subway
# gateway, joined over an "internet" link, in network namespaces that this
# script creates and removes. Traffic goes both ways through the tunnel,
# then `subway show` says what the gateway saw, then everything is
# removed. About 15 seconds. Needs root, after ./setup.sh and a build.
#
#   control/dist/demo.sh            # uses target/release/subway, else target/debug/subway
#   SUBWAY=/usr/sbin/subway control/dist/demo.sh
#
#   hostA 10.1.0.2 ─ [gwA] 192.0.2.1 ══ WireGuard ══ 192.0.2.2 [gwB] ─ hostB 10.2.0.2
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${SUBWAY:-}"
if [ -z "$bin" ]; then
  for b in "$here/target/release/subway" "$here/target/debug/subway"; do
    if [ -x "$b" ]; then bin="$b"; break; fi
  done
fi
[ -x "${bin:-}" ] || { echo "demo: no subway binary (cargo build --release, or SUBWAY=...)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (namespaces, XDP)" >&2; exit 1; }
command -v wg >/dev/null || { echo "demo: needs wg (wireguard-tools; ./setup.sh installs it)" >&2; exit 1; }

# Unique names: this script's pid in every namespace and instance name.
p="sd$$"
dir="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for n in a ga gb b; do ip netns del "${p}$n" 2>/dev/null || true; done
  for i in ga gb; do "$bin" down "${p}$i" >/dev/null 2>&1 || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
nsx() { local ns="$1"; shift; ip netns exec "${p}$ns" "$@"; }

say "two sites in namespaces ${p}{a,ga,gb,b}"
for n in a ga gb b; do ip netns add "${p}$n"; nsx "$n" ip link set lo up; done
ip link add eth0 netns "${p}a" type veth peer name lan0 netns "${p}ga"
ip link add wan0 netns "${p}ga" type veth peer name wan0 netns "${p}gb"
ip link add eth0 netns "${p}b" type veth peer name lan0 netns "${p}gb"
for n in a ga gb b; do for i in $(nsx "$n" ls /sys/class/net); do nsx "$n" ip link set "$i" up; done; done
nsx a  ip addr add 10.1.0.2/24 dev eth0;  nsx a ip route add default via 10.1.0.1
nsx b  ip addr add 10.2.0.2/24 dev eth0;  nsx b ip route add default via 10.2.0.1
nsx ga ip addr add 10.1.0.1/24 dev lan0;  nsx ga ip addr add 192.0.2.1/24 dev wan0
nsx gb ip addr add 10.2.0.1/24 dev lan0;  nsx gb ip addr add 192.0.2.2/24 dev wan0
# veths hand on partial checksums that a userspace forwarder copies as is.
for n in a ga gb b; do for i in $(nsx "$n" ls /sys/class/net | grep -v lo); do nsx "$n" ethtool -K "$i" tx off >/dev/null 2>&1 || true; done; done

say "keys and configs (wg-quick style, plus [Lan])"
ka="$(wg genkey)"; kb="$(wg genkey)"
pa="$(echo "$ka" | wg pubkey)"; pb="$(echo "$kb" | wg pubkey)"
cat > "$dir/${p}ga.conf" <<EOF
[Interface]
PrivateKey = $ka
ListenPort = 51820
Uplink = wan0

[Lan]
Interface = lan0

[Peer]
PublicKey = $pb
Endpoint = 192.0.2.2:51820
AllowedIPs = 10.2.0.0/24
EOF
cat > "$dir/${p}gb.conf" <<EOF
[Interface]
PrivateKey = $kb
ListenPort = 51820
Uplink = wan0

[Lan]
Interface = lan0

[Peer]
PublicKey = $pa
Endpoint = 192.0.2.1:51820
AllowedIPs = 10.1.0.0/24
EOF
chmod 600 "$dir"/*.conf
sed 's/^PrivateKey = .*/PrivateKey = (hidden)/' "$dir/${p}ga.conf"

say "starting subway on both gateways"
for g in ga gb; do
  ip netns exec "${p}$g" "$bin" run --config "$dir/${p}$g.conf" > "$dir/$g.log" 2>&1 &
  pids+=($!)
done
for k in 0 1; do
  g=$([ "$k" = 0 ] && echo ga || echo gb)
  for _ in $(seq 1 200); do
    grep -q "subway is running" "$dir/$g.log" && break
    kill -0 "${pids[$k]}" 2>/dev/null || { cat "$dir/$g.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "subway is running" "$dir/$g.log" || { echo "demo: $g did not start:" >&2; cat "$dir/$g.log" >&2; exit 1; }
  grep "subway is running\|worker 0" "$dir/$g.log" | sed 's/^[^ ]* *//' | cut -c1-160
done

say "host A pings host B through the tunnel, and back (real source addresses, no NAT)"
nsx a ping -c 5 -i 0.2 -W 2 10.2.0.2 | tail -2
nsx b ping -c 5 -i 0.2 -W 2 10.1.0.2 | tail -2

if command -v iperf3 >/dev/null; then
  say "one TCP stream, host A to host B, 3 seconds"
  ip netns exec "${p}b" iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
  srv=$!
  sleep 0.5
  nsx a iperf3 -c 10.2.0.2 -p 5201 -t 3 -f m | grep -E "sender|receiver"
  wait "$srv" 2>/dev/null || true
fi

say "subway show ${p}ga"
"$bin" show "${p}ga"

say "removing everything"
cleanup
trap - EXIT
echo "demo: done"
