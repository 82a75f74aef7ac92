//! The tunnel's receive direction (kernel WireGuard's receive.c): a
//! WireGuard data datagram from the uplink is opened in place, checked
//! (replay, cryptokey routing), routed in its peer's VNET and turned into
//! a LAN frame, or handed to the kernel, or dropped under a named counter.
//! Pure logic over a frame buffer and a table snapshot: unit-tested below
//! without sockets; the worker calls it once per frame.

use super::{TUNNEL_OVERHEAD, clamp_mss, parse_inner, parse_outer, to_lan_frame};
use crate::fib::{Fib, Target};
use crate::forward::Verdict;
use crate::stats::Counter;
use crate::tables::Tables;
use crate::wg::WgError;
use crate::wg::messages::{DATA_HEADER_LEN, DATA_MIN_LEN, TYPE_DATA};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A UDP datagram to one of our uplink addresses and our listen port (or
/// one of the `SourcePorts` after it)?
#[inline]
pub fn is_wireguard(frame: &[u8], t: &Tables) -> bool {
    t.listen_port != 0
        && parse_outer(frame).is_some_and(|r| {
            let l4 = r.msg_start - 8;
            let port = u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]);
            port.wrapping_sub(t.listen_port) < t.source_ports.max(1) && t.uplink_addrs.contains(&r.dst)
        })
}

/// Opens a data message and turns it into a LAN frame in place.
/// Returns the verdict, the frame's new length, and the peer and inner
/// bytes to count (the caller adds them up per batch).
pub fn decapsulate(buf: &mut [u8], len: usize, t: &Tables, now: Duration) -> (Verdict, usize, Option<(u32, u64)>) {
    let drop = |c| (Verdict::Drop(c), len, None);
    let Some(r) = parse_outer(&buf[..len]) else {
        return drop(Counter::DropOuterMalformed);
    };
    let msg = &mut buf[r.msg_start..r.msg_end];
    if msg.len() < DATA_MIN_LEN || msg[0] != TYPE_DATA {
        return drop(Counter::DropWgNotData);
    }
    let receiver = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
    let Some(session) = t.sessions.get(&receiver) else {
        return drop(Counter::DropWgUnknownIndex);
    };
    let plain_len = match session.open(msg, now) {
        Ok(p) => p.len(),
        Err(WgError::Replayed) => return drop(Counter::DropWgReplayed),
        Err(WgError::Expired) => return drop(Counter::DropWgExpired),
        Err(_) => return drop(Counter::DropWgDecryptFailed),
    };
    let Some(peer) = t.peers.get(session.peer as usize) else {
        return drop(Counter::DropWgUnknownIndex);
    };
    // Authenticated: if it came from elsewhere than the published
    // endpoint, the peer roamed; tell the control thread (IPv4; IPv6
    // roaming is followed on handshakes). The first new source since the
    // control thread looked is kept: a peer spreading its source ports
    // costs a load per datagram, not a store on a shared line.
    if let Some(path) = &peer.path {
        if path.dst == r.src {
            if !peer.stats.at_endpoint.load(Ordering::Relaxed) {
                peer.stats.at_endpoint.store(true, Ordering::Relaxed);
            }
        } else if let std::net::SocketAddr::V4(src) = r.src
            && peer.stats.roamed_v4.load(Ordering::Relaxed) == 0
        {
            peer.stats
                .roamed_v4
                .store(crate::tables::PeerStats::pack_v4(src), Ordering::Relaxed);
            peer.stats.mark.set();
        }
    }
    if plain_len == 0 {
        peer.stats.rx_keepalives.fetch_add(1, Ordering::Relaxed);
        peer.stats.mark.set();
        return drop(Counter::RxKeepalives);
    }
    let start = r.msg_start + DATA_HEADER_LEN;
    let Some(inner) = parse_inner(&buf[start..start + plain_len]) else {
        return drop(Counter::DropInnerMalformed);
    };
    let counted = Some((session.peer, inner.len as u64));
    let next = deliver(t, session.peer, peer.vnet, &inner, &buf[start..start + inner.len]);
    if next == Next::Drop(Counter::DropNotAllowed) {
        return drop(Counter::DropNotAllowed);
    }
    if let Some(up) = t.uplink.and_then(|u| t.ports.get(u as usize)) {
        let _ = clamp_mss(
            &mut buf[start..start + inner.len],
            up.mtu.saturating_sub(TUNNEL_OVERHEAD),
        );
    }
    match next {
        Next::Lan {
            port: p,
            dst_mac,
            src_mac,
        } => (
            Verdict::Tx(p),
            to_lan_frame(buf, start, inner.len, dst_mac, src_mac),
            counted,
        ),
        Next::Drop(c) => (Verdict::Drop(c), len, counted),
        Next::Kernel(c) => {
            // Hand the inner packet, untouched, to the kernel.
            buf.copy_within(start..start + inner.len, 0);
            (Verdict::SlowPath(0, c), inner.len, counted)
        }
    }
}

/// Where a packet that came out of the tunnel goes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Out of LAN port `port` by the fast path, to `dst_mac` from `src_mac`.
    Lan {
        port: u16,
        dst_mac: crate::wire::MacAddr,
        src_mac: crate::wire::MacAddr,
    },
    /// To the kernel (or, in a non-default VNET, the control thread).
    Kernel(Counter),
    Drop(Counter),
}

/// The decisions for an authenticated inner packet from `peer` (in VNET
/// `vnet`): cryptokey routing (its source must be in the peer's
/// AllowedIPs), then the route in the peer's VNET, TTL, the egress MTU and
/// the neighbour. The worker and `route explain` both call this.
#[inline]
pub fn deliver(t: &Tables, peer: u32, vnet: crate::fib::VnetId, inner: &super::Inner, packet: &[u8]) -> Next {
    if !t.allowed.allows(vnet, inner.src, peer) {
        return Next::Drop(Counter::DropNotAllowed);
    }
    let (p, hop) = match t.fib.lookup(vnet, inner.dst) {
        Some((len, Target::Port(_))) if Fib::is_directed_broadcast(inner.dst, len) => {
            return Next::Drop(Counter::DropDirectedBroadcast);
        }
        Some((_, Target::Local)) => return Next::Kernel(Counter::SlowLocal),
        Some((_, out)) => match t.fib.next_hop(out, inner.dst, packet) {
            Some(next) => next,
            None => return Next::Kernel(Counter::SlowNoRoute),
        },
        None => return Next::Kernel(Counter::SlowNoRoute),
    };
    match t.ports.get(p as usize) {
        None => Next::Kernel(Counter::SlowNoRoute),
        Some(_) if inner.ttl <= 1 => Next::Kernel(Counter::SlowTtlExpired),
        Some(out) if inner.len > out.mtu as usize => Next::Kernel(Counter::SlowTooBig),
        Some(out) => match t.neigh.get(out.ifindex, hop) {
            Some(mac) => Next::Lan {
                port: p,
                dst_mac: mac,
                src_mac: out.mac,
            },
            None => Next::Kernel(Counter::SlowNeighUnknown),
        },
    }
}

/// Received-from-peer counts gathered during a batch: the peer counters
/// are shared by every worker, so they get one add per run of packets from
/// the same peer instead of one per packet.
#[derive(Default)]
pub struct PeerRx {
    peer: Option<u32>,
    packets: u64,
    bytes: u64,
}

impl PeerRx {
    #[inline]
    pub fn add(&mut self, peer: u32, bytes: u64, t: &Tables) {
        if self.peer != Some(peer) {
            self.flush(t);
            self.peer = Some(peer);
        }
        self.packets += 1;
        self.bytes += bytes;
    }

    pub fn flush(&mut self, t: &Tables) {
        if let Some(p) = self.peer.take()
            && let Some(rt) = t.peers.get(p as usize)
        {
            rt.stats.rx_packets.fetch_add(self.packets, Ordering::Relaxed);
            rt.stats.rx_bytes.fetch_add(self.bytes, Ordering::Relaxed);
            rt.stats.mark.set();
        }
        self.packets = 0;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{FAR, FAR_V6, Fixture, HOST_MAC, LAN_HOST, LAN_HOST_V6, LAN_MAC};
    use super::*;
    use crate::wire::{EthernetFrame, IpPacket};
    use std::net::{IpAddr, SocketAddr};

    const PEER: &str = "192.0.2.2:51820";

    /// A frame buffer and the datagram's length in it.
    type Datagram = (Vec<u8>, usize);

    fn from_peer() -> SocketAddr {
        PEER.parse().unwrap()
    }

    /// Decapsulates `(buf, len)` as the worker does (the whole capacity).
    fn rx(t: &Tables, (mut buf, len): Datagram) -> (Verdict, Vec<u8>, Option<(u32, u64)>) {
        assert!(is_wireguard(&buf[..len], t), "steered as WireGuard to us");
        let (v, n, counted) = decapsulate(&mut buf, len, t, Duration::ZERO);
        buf.truncate(n);
        (v, buf, counted)
    }

    #[test]
    fn a_data_message_becomes_a_lan_frame_one_hop_later_ipv4_and_ipv6() {
        let f = Fixture::new();
        let t = f.tables();
        for (src, dst) in [(FAR, LAN_HOST), (FAR_V6, LAN_HOST_V6)] {
            let (v, frame, counted) = rx(&t, f.datagram(from_peer(), Some((src, dst, 64, 100))));
            assert_eq!(v, Verdict::Tx(1), "{dst}");
            let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
            assert_eq!((eth.dst(), eth.src()), (HOST_MAC, LAN_MAC));
            let ip = IpPacket::new_checked(&frame[14..]).unwrap();
            assert_eq!((ip.src(), ip.dst(), ip.ttl()), (src, dst, 63));
            assert_eq!(counted, Some((0, ip.total_len() as u64)));
        }
    }

    #[test]
    fn every_refusal_has_its_counter() {
        let f = Fixture::new();
        let t = f.tables();
        let other = |a: &str| Some((FAR, a.parse::<IpAddr>().unwrap(), 64, 40));
        let cases: Vec<(&str, Datagram, Verdict)> = vec![
            (
                "a source outside the peer's AllowedIPs",
                f.datagram(from_peer(), Some(("10.3.0.2".parse().unwrap(), LAN_HOST, 64, 40))),
                Verdict::Drop(Counter::DropNotAllowed),
            ),
            (
                "TTL 1",
                f.datagram(from_peer(), Some((FAR, LAN_HOST, 1, 40))),
                Verdict::SlowPath(0, Counter::SlowTtlExpired),
            ),
            (
                "a LAN host with no neighbour entry",
                f.datagram(from_peer(), other("10.1.0.9")),
                Verdict::SlowPath(0, Counter::SlowNeighUnknown),
            ),
            (
                "the gateway itself",
                f.datagram(from_peer(), other("10.1.0.1")),
                Verdict::SlowPath(0, Counter::SlowLocal),
            ),
            (
                "no route",
                f.datagram(from_peer(), other("10.9.9.9")),
                Verdict::SlowPath(0, Counter::SlowNoRoute),
            ),
            (
                "a directed broadcast",
                f.datagram(from_peer(), other("10.1.0.255")),
                Verdict::Drop(Counter::DropDirectedBroadcast),
            ),
            (
                "a keepalive",
                f.datagram(from_peer(), None),
                Verdict::Drop(Counter::RxKeepalives),
            ),
        ];
        for (what, d, want) in cases {
            let (v, buf, _) = rx(&t, d);
            assert_eq!(v, want, "{what}");
            if let Verdict::SlowPath(0, _) = v {
                // The kernel gets the inner packet, untouched (TTL too).
                let ip = IpPacket::new_checked(&buf[..]).unwrap();
                assert_eq!((ip.src(), ip.total_len()), (FAR, buf.len()), "{what}");
            }
        }
        assert_eq!(f.peer_stats().rx_keepalives.load(Ordering::Relaxed), 1);

        // Too big for the LAN: the kernel answers with frag-needed.
        let mut small = Fixture::new();
        small.lan_mtu = 1000;
        let t = small.tables();
        let (v, _, _) = rx(&t, small.datagram(from_peer(), Some((FAR, LAN_HOST, 64, 1200))));
        assert_eq!(v, Verdict::SlowPath(0, Counter::SlowTooBig));
    }

    #[test]
    fn replays_tampering_unknown_indices_and_garbage_are_dropped() {
        let f = Fixture::new();
        let t = f.tables();
        let d = f.datagram(from_peer(), Some((FAR, LAN_HOST, 64, 40)));
        let copy = d.clone();
        assert_eq!(rx(&t, d).0, Verdict::Tx(1));
        assert_eq!(rx(&t, copy).0, Verdict::Drop(Counter::DropWgReplayed));

        let (mut buf, len) = f.datagram(from_peer(), Some((FAR, LAN_HOST, 64, 40)));
        buf[len - 1] ^= 1;
        assert_eq!(rx(&t, (buf, len)).0, Verdict::Drop(Counter::DropWgDecryptFailed));

        let (mut buf, len) = f.datagram(from_peer(), Some((FAR, LAN_HOST, 64, 40)));
        let r = parse_outer(&buf[..len]).unwrap();
        buf[r.msg_start + 4] = 99; // receiver index 99: no such session
        assert_eq!(rx(&t, (buf, len)).0, Verdict::Drop(Counter::DropWgUnknownIndex));

        let (mut buf, len) = f.datagram(from_peer(), Some((FAR, LAN_HOST, 64, 40)));
        let r = parse_outer(&buf[..len]).unwrap();
        buf[r.msg_start] = 1; // an initiation's type: not for the fast path
        assert_eq!(rx(&t, (buf, len)).0, Verdict::Drop(Counter::DropWgNotData));

        let mut junk = vec![0u8; 60];
        assert_eq!(
            decapsulate(&mut junk, 60, &t, Duration::ZERO).0,
            Verdict::Drop(Counter::DropOuterMalformed)
        );
    }

    #[test]
    fn only_our_address_and_port_are_wireguard_and_a_new_source_is_a_roam() {
        let f = Fixture::new();
        let mut t = f.tables();
        let (buf, len) = f.datagram(from_peer(), Some((FAR, LAN_HOST, 64, 40)));
        assert!(is_wireguard(&buf[..len], &t));
        t.listen_port = 51821;
        assert!(!is_wireguard(&buf[..len], &t));
        // SourcePorts: 51818 .. 51820 receive, 51818 .. 51819 do not
        // include 51820.
        t.listen_port = 51818;
        t.source_ports = 3;
        assert!(is_wireguard(&buf[..len], &t));
        t.source_ports = 2;
        assert!(!is_wireguard(&buf[..len], &t));
        t.source_ports = 1;
        t.listen_port = 51820;
        t.uplink_addrs = vec!["192.0.2.9".parse().unwrap()];
        assert!(!is_wireguard(&buf[..len], &t));

        let t = f.tables();
        let roamed: SocketAddr = "198.51.100.7:4000".parse().unwrap();
        let (v, _, _) = rx(&t, f.datagram(roamed, Some((FAR, LAN_HOST, 64, 40))));
        assert_eq!(v, Verdict::Tx(1));
        let got = || crate::tables::PeerStats::unpack_v4(f.peer_stats().roamed_v4.load(Ordering::Relaxed));
        assert_eq!(got().map(SocketAddr::V4), Some(roamed));
        assert!(!f.peer_stats().at_endpoint.load(Ordering::Relaxed));
        // Until the control thread looks, the first new source is kept
        // (a peer spreading its ports costs no store per datagram).
        let other: SocketAddr = "198.51.100.7:4001".parse().unwrap();
        rx(&t, f.datagram(other, Some((FAR, LAN_HOST, 64, 40))));
        assert_eq!(got().map(SocketAddr::V4), Some(roamed));
        // From the published endpoint: heard there.
        rx(&t, f.datagram(from_peer(), Some((FAR, LAN_HOST, 64, 40))));
        assert!(f.peer_stats().at_endpoint.load(Ordering::Relaxed));
    }
}
