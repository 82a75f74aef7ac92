//! `subway route explain` as a trace of the real decisions (VPP's packet
//! trace is the model): a probe packet is built as bytes and handed to the
//! very functions the workers call ([`forward::route_frame`] for a LAN
//! frame, [`tx::Ready`] for a peer's send path, [`rx::deliver`] for what
//! comes out of the tunnel, [`slowpath::taker`] for what the fast path
//! hands on), so the answer cannot drift from what the fast path does:
//! TTL, MTU, VLAN, VNET and cryptokey-routing outcomes included. The XDP
//! program's part is run by the live instance on the same bytes
//! ([`crate::Dataplane::explain`]); this module is pure and side-effect
//! free (no counter is reserved, no packet is sent).
//!
//! About 360 lines of code; the rest is the agreement table test, which
//! belongs next to the trace it checks.

use crate::fib::{Target, VnetId};
use crate::forward::{Verdict, route_frame};
use crate::slowpath::{Taker, taker};
use crate::stats::Counter;
use crate::tables::Tables;
use crate::tunnel::rx::{Next, deliver};
use crate::tunnel::tx::Ready;
use crate::tunnel::{self, Inner};
use crate::wire::{EtherType, MacAddr, ethernet, ipv4, ipv6, udp};
use std::net::IpAddr;
use std::time::Duration;

/// The transport of a probe packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// An echo request (ICMP or ICMPv6).
    Icmp,
    /// A SYN with an MSS option of 1460, to this port.
    Tcp(u16),
    Udp(u16),
}

/// Where the probe enters the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// Received on LAN port `n`.
    Lan(u16),
    /// Came out of the tunnel from peer `id`, authenticated.
    Peer(u32),
}

/// The packet to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub vnet: VnetId,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    /// TTL or hop limit as it arrives.
    pub ttl: u8,
    /// IP total length; raised to the headers' length if smaller.
    pub size: usize,
    /// An 802.1Q tag on the LAN frame.
    pub vlan: Option<u16>,
    /// None: where the source lives in the VNET (its LAN, or the peer
    /// whose AllowedIPs hold it; else the VNET's first LAN).
    pub from: Option<Ingress>,
}

/// What becomes of the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Out of a LAN port by the fast path.
    Lan(u16),
    /// Sealed by the fast path and sent to a peer.
    Tunnel(u32),
    /// Handed on (a `slow_*` counter) to the kernel or the control thread.
    HandedOn(Counter, Taker),
    /// Dropped by a worker under this counter.
    Drop(Counter),
    /// The XDP program let the kernel have it (its counter).
    XdpPass(&'static str),
    /// The XDP program dropped it (its counter).
    XdpDrop(&'static str),
    /// Nowhere to enter from: the VNET has no LAN.
    NoIngress,
}

/// A probe's trace: the steps in order, and the outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub ingress: Option<Ingress>,
    pub steps: Vec<String>,
    pub outcome: Outcome,
}

impl Trace {
    /// The counter the packet would be counted under, if one.
    pub fn counter(&self) -> Option<&'static str> {
        match self.outcome {
            Outcome::Lan(_) | Outcome::NoIngress => None,
            Outcome::Tunnel(_) => Some(Counter::TunnelTx.name()),
            Outcome::HandedOn(c, _) | Outcome::Drop(c) => Some(c.name()),
            Outcome::XdpPass(c) | Outcome::XdpDrop(c) => Some(c),
        }
    }
}

/// Where a probe without `from` enters: the LAN holding its source, or
/// the peer whose AllowedIPs do, in its VNET; else the VNET's first LAN.
pub fn ingress_of(t: &Tables, vnet: VnetId, src: IpAddr) -> Option<Ingress> {
    let found = t.fib.lookup(vnet, src).map(|(_, out)| out);
    match found {
        Some(Target::Peer(id)) => return Some(Ingress::Peer(id)),
        Some(Target::Peers(s)) => return t.fib.peer_set(s)?.first().map(|id| Ingress::Peer(*id)),
        _ => {}
    }
    if let Some(p) = found.and_then(|out| t.fib.port_of(out)) {
        return Some(Ingress::Lan(p));
    }
    t.ports
        .iter()
        .position(|p| p.vnet == vnet && Some(p) != t.uplink.and_then(|u| t.ports.get(u as usize)))
        .or_else(|| t.ports.iter().position(|p| p.vnet == vnet))
        .map(|p| Ingress::Lan(p as u16))
}

/// The MAC the probe's frame comes from.
pub const PROBE_MAC: MacAddr = MacAddr([0x02, 0x70, 0x72, 0x6f, 0x62, 0x65]);

/// The probe as an Ethernet frame arriving at `to` (the port's MAC).
pub fn frame(p: &Probe, to: MacAddr) -> Vec<u8> {
    let ip = ip_packet(p);
    let tag = if p.vlan.is_some() { 4 } else { 0 };
    let mut f = vec![0u8; 14 + tag + ip.len()];
    let ethertype = if p.dst.is_ipv6() {
        EtherType::IPV6
    } else {
        EtherType::IPV4
    };
    match p.vlan {
        Some(id) => {
            ethernet::emit(&mut f, to, PROBE_MAC, EtherType::VLAN);
            f[14..16].copy_from_slice(&(id & 0x0fff).to_be_bytes());
            f[16..18].copy_from_slice(&ethertype.to_be_bytes());
        }
        None => ethernet::emit(&mut f, to, PROBE_MAC, ethertype),
    }
    f[14 + tag..].copy_from_slice(&ip);
    f
}

/// The probe as an IP packet (what comes out of the tunnel).
pub fn ip_packet(p: &Probe) -> Vec<u8> {
    let v6 = p.dst.is_ipv6();
    let l3 = if v6 { 40 } else { 20 };
    let l4_min = match p.proto {
        Proto::Tcp(_) => 24,
        Proto::Udp(_) | Proto::Icmp => 8,
    };
    let total = p.size.clamp(l3 + l4_min, u16::MAX as usize);
    let l4_len = total - l3;
    let mut b = vec![0u8; total];
    let proto = match p.proto {
        Proto::Tcp(_) => 6,
        Proto::Udp(_) => 17,
        Proto::Icmp if v6 => 58,
        Proto::Icmp => 1,
    };
    match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4::emit(&mut b, s, d, proto, p.ttl, l4_len),
        (s, d) => ipv6::emit(&mut b, v6_of(s), v6_of(d), proto, p.ttl, l4_len),
    }
    let l4 = &mut b[l3..];
    match p.proto {
        Proto::Tcp(port) => {
            l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
            l4[2..4].copy_from_slice(&port.to_be_bytes());
            l4[12] = 6 << 4;
            l4[13] = 0x02;
            l4[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
        }
        Proto::Udp(port) => udp::emit(l4, 40000, port, l4_len - 8),
        Proto::Icmp => l4[0] = if v6 { 128 } else { 8 },
    }
    b
}

fn v6_of(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// Follows `p` through the workers' decisions on the tables `t` at `now`.
/// `peer_name` names a peer in the steps (its public key, say).
pub fn trace(t: &Tables, p: &Probe, now: Duration, peer_name: &dyn Fn(u32) -> String) -> Trace {
    let ingress = p.from.or_else(|| ingress_of(t, p.vnet, p.src));
    let mut steps = Vec::new();
    let outcome = match ingress {
        None => {
            steps.push(format!("VNET {} has no LAN interface to receive the packet on", p.vnet));
            Outcome::NoIngress
        }
        Some(Ingress::Lan(port)) => from_lan(t, p, port, now, peer_name, &mut steps),
        Some(Ingress::Peer(peer)) => from_peer(t, p, peer, now, peer_name, &mut steps),
    };
    Trace {
        ingress,
        steps,
        outcome,
    }
}

fn port_name(t: &Tables, port: u16) -> &str {
    t.ports.get(port as usize).map_or("?", |p| p.name.as_str())
}

fn from_lan(
    t: &Tables,
    p: &Probe,
    port: u16,
    now: Duration,
    peer_name: &dyn Fn(u32) -> String,
    steps: &mut Vec<String>,
) -> Outcome {
    let mac = t.ports.get(port as usize).map_or(MacAddr([0; 6]), |p| p.mac);
    let mut f = frame(p, mac);
    steps.push(format!(
        "received on {} ({} bytes, TTL {}{})",
        port_name(t, port),
        f.len(),
        p.ttl,
        p.vlan.map(|v| format!(", VLAN {v}")).unwrap_or_default()
    ));
    let vnet = t.ports.get(port as usize).map_or(p.vnet, |p| p.vnet);
    let v = route_frame(&mut f, port, t);
    let ip = crate::policy::policed_ip(&v, &f);
    if let Some(refused) = police(t, vnet, crate::policy::Ingress::Lan(port), ip, now, steps) {
        return refused;
    }
    match v {
        Verdict::Tx(out) => {
            let mac = MacAddr([f[0], f[1], f[2], f[3], f[4], f[5]]);
            steps.push(format!(
                "route: {} {}; neighbour {mac}; Ethernet rewritten, TTL {} -> {}",
                p.dst,
                where_to(t, vnet, p, out),
                p.ttl,
                p.ttl - 1
            ));
            Outcome::Lan(out)
        }
        Verdict::Drop(c) => {
            steps.push(format!("route: dropped ({})", c.name()));
            Outcome::Drop(c)
        }
        Verdict::SlowPath(_, c) => handed_on(vnet, c, steps),
        Verdict::Tunnel { peer, ip_len, .. } => {
            steps.push(format!("route: {} belongs to peer {}", p.dst, peer_name(peer)));
            let vnet = t.peers.get(peer as usize).map_or(crate::slowpath::NO_VNET, |r| r.vnet);
            let Some(ready) = Ready::of(t, peer, now) else {
                steps.push(
                    "tunnel: no session that may send, or no path to the peer's endpoint yet: queued while a \
                     handshake starts"
                        .into(),
                );
                return handed_on(vnet, Counter::SlowNoSession, steps);
            };
            match ready.admits(ip_len) {
                Err(c) => {
                    steps.push(format!(
                        "tunnel: {ip_len} bytes exceed the tunnel MTU {}",
                        ready.tunnel_mtu
                    ));
                    handed_on(vnet, c, steps)
                }
                Ok(()) => {
                    let mut inner = ip_packet(p);
                    if tunnel::clamp_mss(&mut inner, ready.tunnel_mtu) {
                        steps.push(format!(
                            "tunnel: TCP SYN's MSS clamped to fit the tunnel MTU {}",
                            ready.tunnel_mtu
                        ));
                    }
                    steps.push(format!(
                        "tunnel: TTL {} -> {}, sealed for session {} and sent from {} to {} via {}",
                        p.ttl,
                        p.ttl - 1,
                        ready.session.local_index,
                        std::net::SocketAddr::new(ready.path.src.ip(), ready.source_port(&inner)),
                        ready.path.dst,
                        ready.path.dst_mac
                    ));
                    Outcome::Tunnel(peer)
                }
            }
        }
    }
}

fn from_peer(
    t: &Tables,
    p: &Probe,
    peer: u32,
    now: Duration,
    peer_name: &dyn Fn(u32) -> String,
    steps: &mut Vec<String>,
) -> Outcome {
    let vnet = t.peers.get(peer as usize).map_or(p.vnet, |r| r.vnet);
    let ip = ip_packet(p);
    let inner = Inner {
        src: p.src,
        dst: p.dst,
        len: ip.len(),
        ttl: p.ttl,
    };
    steps.push(format!(
        "opened from peer {} ({} bytes, TTL {})",
        peer_name(peer),
        inner.len,
        p.ttl
    ));
    let next = deliver(t, peer, vnet, &inner, &ip);
    let judged = match next {
        Next::Lan { .. } | Next::Kernel(Counter::SlowNeighUnknown | Counter::SlowNoRoute) => Some(&ip[..]),
        _ => None,
    };
    if let Some(refused) = police(t, vnet, crate::policy::Ingress::Peer(peer), judged, now, steps) {
        return refused;
    }
    match next {
        Next::Lan { port, dst_mac, .. } => {
            steps.push(format!(
                "cryptokey routing: {} is in the peer's AllowedIPs; route: {} {}; neighbour {dst_mac}; TTL {} -> {}",
                p.src,
                p.dst,
                where_to(t, vnet, p, port),
                p.ttl,
                p.ttl - 1
            ));
            Outcome::Lan(port)
        }
        Next::Drop(c) => {
            steps.push(match c {
                Counter::DropNotAllowed => format!(
                    "cryptokey routing: {} is not in the AllowedIPs of peer {}: dropped ({})",
                    p.src,
                    peer_name(peer),
                    c.name()
                ),
                c => format!("route: dropped ({})", c.name()),
            });
            Outcome::Drop(c)
        }
        Next::Kernel(c) => {
            steps.push(format!("cryptokey routing: {} is in the peer's AllowedIPs", p.src));
            handed_on(vnet, c, steps)
        }
    }
}

/// The VNET's [Policy] on a packet the route would forward (`ip`): the
/// workers' own check, without remembering the flow. Some(outcome) if it
/// refuses it.
fn police(
    t: &Tables,
    vnet: VnetId,
    ingress: crate::policy::Ingress,
    ip: Option<&[u8]>,
    now: Duration,
    steps: &mut Vec<String>,
) -> Option<Outcome> {
    use crate::policy::{DEFAULT_RULE, Decision, check};
    let pol = t.policies.of(vnet)?;
    let ip = ip?;
    let d = check(
        pol,
        t.policies.flows.as_deref(),
        vnet,
        ingress,
        ip,
        now.as_secs() as u32,
        true,
    );
    let rule = |r: u16| match pol.config.rules.get(r as usize) {
        Some(x) => format!("rule {} (line {}: {})", r + 1, x.line, x.text),
        None => "?".into(),
    };
    let default = match pol.config.default {
        crate::policy::Action::Allow => "allow",
        crate::policy::Action::Deny => "deny",
    };
    steps.push(match d {
        Decision::Established(Some(r)) => format!("policy: part of a known flow, allowed by {}", rule(r)),
        Decision::Established(None) => "policy: part of a known flow (allowed before the last reload)".into(),
        Decision::Related => "policy: an ICMP error about a known flow: passes".into(),
        Decision::Allowed(DEFAULT_RULE) => format!("policy: no rule matches; VNET default {default}"),
        Decision::Allowed(r) => format!("policy: {} allows", rule(r)),
        Decision::Denied(DEFAULT_RULE) => {
            format!("policy: no rule matches; VNET default {default}: dropped (drop_policy)")
        }
        Decision::Denied(r) => format!("policy: {} denies: dropped (drop_policy)", rule(r)),
        Decision::Unreadable => "policy: not an IP packet it can read: dropped (drop_policy)".into(),
    });
    (!d.passes()).then_some(Outcome::Drop(Counter::DropPolicy))
}

/// "is on lan0", or "via 10.1.0.254 on lan0 (kernel route)" for a route
/// through a LAN router.
fn where_to(t: &Tables, vnet: VnetId, p: &Probe, port: u16) -> String {
    match t.fib.lookup(vnet, p.dst) {
        Some((len, Target::Via(g))) => match t.fib.group(g) {
            Some(g) => format!(
                "matches /{len} via {} on {} ({} route{})",
                g.hop_for(&ip_packet(p)).map(|h| h.to_string()).unwrap_or_default(),
                port_name(t, port),
                g.source.name(),
                if g.hops.len() > 1 {
                    format!(", one of {} next hops by flow hash", g.hops.len())
                } else {
                    String::new()
                }
            ),
            None => format!("is on {}", port_name(t, port)),
        },
        _ => format!("is on {}", port_name(t, port)),
    }
}

/// What the fast path could not finish, and who takes it.
fn handed_on(vnet: VnetId, c: Counter, steps: &mut Vec<String>) -> Outcome {
    let why = match c {
        Counter::SlowNeighUnknown => "the next hop's MAC is not known yet",
        Counter::SlowTtlExpired => "the TTL would expire here",
        Counter::SlowTooBig => "too big for the next link",
        Counter::SlowVlan => "VLAN-tagged, and tags belong to the kernel's VLAN interfaces",
        Counter::SlowLocal => "addressed to the gateway itself",
        Counter::SlowNoRoute => "no route in the VNET",
        Counter::SlowNoSession => "the peer cannot be sent to from the fast path yet",
        _ => "",
    };
    let taker = taker(vnet, c);
    steps.push(match taker {
        Taker::Kernel => format!(
            "fast path: {why} ({}): handed to the kernel through the slow-path TUN, which {}",
            c.name(),
            match c {
                Counter::SlowNeighUnknown => "resolves it and forwards this packet; the next ones take the fast path",
                Counter::SlowTtlExpired => "answers ICMP time exceeded",
                Counter::SlowTooBig => "fragments it or answers fragmentation needed / packet too big",
                Counter::SlowNoSession => "routes it to the control thread: queued, a handshake starts",
                Counter::SlowLocal => "delivers it to the gateway",
                _ => "routes it by its own table",
            }
        ),
        Taker::ControlThread => format!(
            "fast path: {why} ({}): handed to the control thread, which {}",
            c.name(),
            match c {
                Counter::SlowNeighUnknown =>
                    "holds it (up to 3 per neighbour, 3 s) while the kernel resolves the neighbour, then sends it; the next ones take the fast path",
                Counter::SlowNoSession => "queues it and starts a handshake",
                _ => "answers the ICMP error inside the VNET",
            }
        ),
        Taker::Drop(d) => format!(
            "fast path: {why} ({}), and {}: dropped ({})",
            c.name(),
            if d == Counter::DropVnetNoKernel {
                "the kernel never sees a non-default VNET's packets"
            } else {
                "nobody can take it"
            },
            d.name()
        ),
    });
    match taker {
        Taker::Drop(d) => Outcome::Drop(d),
        taker => Outcome::HandedOn(c, taker),
    }
}

#[cfg(test)]
mod tests {
    //! Explain and the fast path agree: each probe of the table goes
    //! through the trace and through what the worker runs on the same
    //! bytes (route_frame, a real seal, a real open of a sealed datagram);
    //! both must land on the same counter.
    use super::*;
    use crate::stats::Tally;
    use crate::tunnel::fixture::{FAR, FAR_V6, Fixture, LAN_HOST, LAN_HOST_V6};
    use crate::tunnel::rx::decapsulate;
    use crate::tunnel::tx::{PeerRun, Sealed};

    const NOW: Duration = Duration::from_secs(1);

    fn probe(src: IpAddr, dst: IpAddr) -> Probe {
        Probe {
            vnet: 0,
            src,
            dst,
            proto: Proto::Udp(53),
            ttl: 64,
            size: 100,
            vlan: None,
            from: None,
        }
    }

    /// What the worker does with the probe's bytes, as the counter it adds.
    fn fast_path(fx: &Fixture, t: &Tables, p: &Probe) -> Option<&'static str> {
        let name = |c: Counter| Some(c.name());
        let slow = |vnet, c| match taker(vnet, c) {
            Taker::Drop(d) => name(d),
            _ => name(c),
        };
        match p.from.or_else(|| ingress_of(t, p.vnet, p.src)).unwrap() {
            Ingress::Lan(port) => {
                let mut f = frame(p, t.ports[port as usize].mac);
                match route_frame(&mut f, port, t) {
                    Verdict::Tx(_) => None,
                    Verdict::Drop(c) => name(c),
                    Verdict::SlowPath(_, c) => slow(t.ports[port as usize].vnet, c),
                    Verdict::Tunnel { peer, l3, ip_len } => {
                        let Some(mut run) = PeerRun::begin(t, peer, 1, NOW) else {
                            return slow(t.peers[peer as usize].vnet, Counter::SlowNoSession);
                        };
                        f.resize(f.len() + 200, 0);
                        match run.seal(0, &mut f, l3, ip_len, &mut Tally::default()) {
                            Sealed::Datagram(_) => name(Counter::TunnelTx),
                            Sealed::ToKernel(c) => slow(t.peers[peer as usize].vnet, c),
                            Sealed::Dropped(c) => name(c),
                        }
                    }
                }
            }
            Ingress::Peer(peer) => {
                let mut buf = vec![0u8; 2048];
                let ip = ip_packet(p);
                buf[14..14 + ip.len()].copy_from_slice(&ip);
                let back = tunnel::OuterPath {
                    src_mac: fx.path.dst_mac,
                    dst_mac: fx.path.src_mac,
                    src: fx.path.dst,
                    dst: fx.path.src,
                };
                let counter = fx.theirs.reserve(1).unwrap();
                let n =
                    tunnel::encapsulate(&mut buf, 14, ip.len(), &fx.theirs, counter, &back, back.src.port()).unwrap();
                match decapsulate(&mut buf, n, t, NOW).0 {
                    Verdict::Tx(_) => None,
                    Verdict::Drop(c) => name(c),
                    Verdict::SlowPath(_, c) => slow(t.peers[peer as usize].vnet, c),
                    Verdict::Tunnel { .. } => unreachable!("the tunnel's exit is never the tunnel"),
                }
            }
        }
    }

    #[test]
    fn explain_and_the_fast_path_agree_on_every_outcome() {
        let mut fx = Fixture::new();
        fx.lan_mtu = 1400;
        let unknown: IpAddr = "10.1.0.77".parse().unwrap();
        let stranger: IpAddr = "10.3.0.9".parse().unwrap();
        let table: Vec<(&str, Probe, Option<&str>)> = vec![
            ("LAN to peer, v4", probe(LAN_HOST, FAR), Some("tunnel_tx")),
            ("LAN to peer, v6", probe(LAN_HOST_V6, FAR_V6), Some("tunnel_tx")),
            (
                "LAN to peer, TTL 1",
                Probe {
                    ttl: 1,
                    ..probe(LAN_HOST, FAR)
                },
                Some("slow_ttl_expired"),
            ),
            (
                "LAN to peer, too big for the tunnel",
                Probe {
                    size: 1440,
                    ..probe(LAN_HOST, FAR)
                },
                Some("slow_too_big"),
            ),
            (
                "LAN to peer, VLAN-tagged",
                Probe {
                    vlan: Some(7),
                    ..probe(LAN_HOST, FAR)
                },
                Some("slow_vlan"),
            ),
            (
                "LAN to an unrouted address",
                probe(LAN_HOST, stranger),
                Some("slow_no_route"),
            ),
            ("peer to LAN host", probe(FAR, LAN_HOST), None),
            ("peer to LAN host, v6", probe(FAR_V6, LAN_HOST_V6), None),
            (
                "peer to LAN host, TTL 1",
                Probe {
                    ttl: 1,
                    ..probe(FAR, LAN_HOST)
                },
                Some("slow_ttl_expired"),
            ),
            (
                "peer to LAN host, too big for the LAN",
                Probe {
                    size: 1450,
                    ..probe(FAR, LAN_HOST)
                },
                Some("slow_too_big"),
            ),
            (
                "peer to an unresolved LAN host",
                probe(FAR, unknown),
                Some("slow_neigh_unknown"),
            ),
            (
                "peer sends from outside its AllowedIPs",
                Probe {
                    from: Some(Ingress::Peer(0)),
                    ..probe(stranger, LAN_HOST)
                },
                Some("drop_not_allowed"),
            ),
        ];
        let t = fx.tables();
        for (what, p, want) in &table {
            let tr = trace(&t, p, NOW, &|id| format!("#{id}"));
            assert_eq!(tr.counter(), *want, "{what}: explain said {tr:#?}");
            assert_eq!(fast_path(&fx, &t, p), *want, "{what}: the fast path disagrees");
        }
        // No session: both hand the packet on for a handshake.
        fx.session_known = false;
        let t = fx.tables();
        let p = probe(LAN_HOST, FAR);
        assert_eq!(
            trace(&t, &p, NOW, &|_| String::new()).counter(),
            Some("slow_no_session")
        );
        assert_eq!(fast_path(&fx, &t, &p), Some("slow_no_session"));
    }

    #[test]
    fn in_a_non_default_vnet_what_needs_the_kernel_is_dropped_or_punted() {
        let fx = Fixture::new();
        let mut t = fx.tables();
        // Move the LAN and the peer into VNET 3.
        let mut fib = crate::fib::Fib::new();
        fib.insert(3, "10.1.0.0/24".parse().unwrap(), Target::Port(1)).unwrap();
        fib.insert(3, "10.1.0.1/32".parse().unwrap(), Target::Local).unwrap();
        fib.insert(3, "10.2.0.0/24".parse().unwrap(), Target::Peer(0)).unwrap();
        t.fib = fib.into();
        t.ports[1].vnet = 3;
        t.peers[0].vnet = 3;
        t.allowed = crate::fib::AllowedIps::new([(0, 3, &["10.2.0.0/24".parse().unwrap()][..])]).into();
        let quiet = |_| String::new();
        let in3 = |p: Probe| Probe { vnet: 3, ..p };
        for (what, p, want) in [
            (
                "for the gateway's own address",
                in3(probe(LAN_HOST, "10.1.0.1".parse().unwrap())),
                "drop_vnet_no_kernel",
            ),
            (
                "wrong VNET: routed in the default VNET only",
                in3(probe(LAN_HOST, "10.9.0.5".parse().unwrap())),
                "drop_vnet_no_kernel",
            ),
            (
                "TTL 1 from the peer",
                in3(Probe {
                    ttl: 1,
                    ..probe(FAR, LAN_HOST)
                }),
                "slow_ttl_expired",
            ),
            (
                "to an unresolved LAN host",
                in3(probe(FAR, "10.1.0.9".parse().unwrap())),
                "slow_neigh_unknown",
            ),
        ] {
            let tr = trace(&t, &p, NOW, &quiet);
            assert_eq!(tr.counter(), Some(want), "{what}: explain said {tr:#?}");
            assert_eq!(fast_path(&fx, &t, &p), Some(want), "{what}: the fast path disagrees");
        }
        let ttl = trace(
            &t,
            &in3(Probe {
                ttl: 1,
                ..probe(FAR, LAN_HOST)
            }),
            NOW,
            &quiet,
        );
        assert_eq!(
            ttl.outcome,
            Outcome::HandedOn(Counter::SlowTtlExpired, Taker::ControlThread)
        );
        // VNET 0 has no LAN left: nothing enters there.
        assert_eq!(
            trace(&t, &probe(LAN_HOST, FAR), NOW, &quiet).outcome,
            Outcome::NoIngress
        );
    }
}
