//! Per-frame routing decision for frames that arrive on a LAN port: parse,
//! look up the FIB of the port's VNET, resolve the next hop's MAC, rewrite
//! Ethernet, decrement TTL / hop limit. Pure logic over a byte slice, so it
//! is unit-tested without sockets; the worker calls it once per frame.

use crate::fib::{Fib, Target};
use crate::stats::Counter;
use crate::tables::Tables;
use crate::wire::{EtherType, EthernetFrame, Ipv4Packet, Ipv6Packet};
use std::net::IpAddr;

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit (already rewritten) on this port.
    Tx(u16),
    /// Give the IP packet starting at this offset to the kernel, unchanged.
    SlowPath(usize, Counter),
    /// Drop and count.
    Drop(Counter),
    /// Into the tunnel to `peer`: the IP packet is `frame[l3..l3 + ip_len]`.
    Tunnel { peer: u32, l3: usize, ip_len: usize },
}

/// Decides and, for `Tx`, rewrites the frame in place.
#[inline]
pub fn route_frame(frame: &mut [u8], ingress: u16, t: &Tables) -> Verdict {
    let Some(in_port) = t.ports.get(ingress as usize) else {
        return Verdict::Drop(Counter::DropNotIp);
    };
    let eth = match EthernetFrame::new_checked(&*frame) {
        Ok(e) => e,
        Err(_) => return Verdict::Drop(Counter::DropEthTruncated),
    };
    let l3 = eth.header_len();
    let ethertype = eth.ethertype();
    let tagged = eth.vlan_count() > 0;
    let vnet = in_port.vnet;

    let (dst, ip_len) = match ethertype {
        EtherType::IPV4 => {
            let ip = match Ipv4Packet::new_checked(&frame[l3..]) {
                Ok(p) => p,
                Err(_) => return Verdict::Drop(Counter::DropIpv4Malformed),
            };
            if !ip.verify_checksum() {
                return Verdict::Drop(Counter::DropIpv4BadChecksum);
            }
            if tagged {
                return Verdict::SlowPath(l3, Counter::SlowVlan);
            }
            if ip.ttl() <= 1 {
                return Verdict::SlowPath(l3, Counter::SlowTtlExpired);
            }
            (IpAddr::V4(ip.dst()), ip.total_len())
        }
        EtherType::IPV6 => {
            let ip = match Ipv6Packet::new_checked(&frame[l3..]) {
                Ok(p) => p,
                Err(_) => return Verdict::Drop(Counter::DropIpv6Malformed),
            };
            if tagged {
                return Verdict::SlowPath(l3, Counter::SlowVlan);
            }
            if ip.hop_limit() <= 1 {
                return Verdict::SlowPath(l3, Counter::SlowTtlExpired);
            }
            (IpAddr::V6(ip.dst()), ip.total_len())
        }
        _ => return Verdict::Drop(Counter::DropNotIp),
    };

    // The port, and the neighbour to send to: the destination itself on
    // a LAN's subnet, or the router a `Via` route goes through.
    let (out, hop) = match t.fib.lookup(vnet, dst) {
        Some((len, Target::Port(_))) if Fib::is_directed_broadcast(dst, len) => {
            return Verdict::Drop(Counter::DropDirectedBroadcast);
        }
        Some((_, Target::Local)) => return Verdict::SlowPath(l3, Counter::SlowLocal),
        Some((_, to)) if to.is_tunnel() => {
            return match t.fib.peer_for(to, &frame[l3..]) {
                Some(peer) => Verdict::Tunnel { peer, l3, ip_len },
                None => Verdict::SlowPath(l3, Counter::SlowNoRoute),
            };
        }
        Some((_, out)) => match t.fib.next_hop(out, dst, &frame[l3..]) {
            Some(next) => next,
            None => return Verdict::SlowPath(l3, Counter::SlowNoRoute),
        },
        None => return Verdict::SlowPath(l3, Counter::SlowNoRoute),
    };
    let Some(out_port) = t.ports.get(out as usize) else {
        return Verdict::SlowPath(l3, Counter::SlowNoRoute);
    };
    if ip_len > out_port.mtu as usize {
        // The kernel fragments it or answers "fragmentation needed" /
        // "packet too big".
        return Verdict::SlowPath(l3, Counter::SlowTooBig);
    }
    let Some(mac) = t.neigh.get(out_port.ifindex, hop) else {
        return Verdict::SlowPath(l3, Counter::SlowNeighUnknown);
    };

    // Commit: nothing below can fail, the headers were validated above.
    frame[0..6].copy_from_slice(&mac.0);
    frame[6..12].copy_from_slice(&out_port.mac.0);
    crate::wire::ip::decrement_ttl(&mut frame[l3..]);
    Verdict::Tx(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fib::Fib;
    use crate::tables::{NeighTable, Port};
    use crate::wire::{MacAddr, ethernet, ipv4, ipv6, udp};
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa]);
    const B_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb]);
    const GW0: MacAddr = MacAddr([2, 0, 0, 0, 1, 0]);
    const GW1: MacAddr = MacAddr([2, 0, 0, 0, 1, 1]);

    fn tables(with_neigh: bool) -> Tables {
        let mut fib = Fib::new();
        fib.insert(0, "10.1.0.0/24".parse().unwrap(), Target::Port(0)).unwrap();
        fib.insert(0, "10.2.0.0/24".parse().unwrap(), Target::Port(1)).unwrap();
        fib.insert(0, "10.2.0.1/32".parse().unwrap(), Target::Local).unwrap();
        fib.insert(0, "fd02::/64".parse().unwrap(), Target::Port(1)).unwrap();
        fib.insert(0, "10.9.0.0/16".parse().unwrap(), Target::Peer(3)).unwrap();
        let mut neigh = NeighTable::default();
        if with_neigh {
            neigh.insert(20, "10.2.0.2".parse().unwrap(), B_MAC);
            neigh.insert(20, "fd02::2".parse().unwrap(), B_MAC);
        }
        Tables {
            fib: fib.into(),
            allowed: Default::default(),
            neigh,
            ports: vec![
                Port {
                    name: "lan0".into(),
                    ifindex: 10,
                    mac: GW0,
                    vnet: 0,
                    mtu: 1500,
                },
                Port {
                    name: "lan1".into(),
                    ifindex: 20,
                    mac: GW1,
                    vnet: 0,
                    mtu: 1500,
                },
            ],
            ..Default::default()
        }
    }

    fn v4_frame(dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8 + 18];
        ethernet::emit(&mut f, GW0, A_MAC, EtherType::IPV4);
        ipv4::emit(&mut f[14..], Ipv4Addr::new(10, 1, 0, 2), dst, 17, ttl, 8 + 18);
        udp::emit(&mut f[34..], 1000, 2000, 18);
        f
    }

    fn v6_frame(dst: Ipv6Addr, hops: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 40 + 8];
        ethernet::emit(&mut f, GW0, A_MAC, EtherType::IPV6);
        ipv6::emit(&mut f[14..], "fd01::2".parse().unwrap(), dst, 17, hops, 8);
        udp::emit(&mut f[54..], 1000, 2000, 0);
        f
    }

    #[test]
    fn forwards_v4_and_rewrites() {
        let t = tables(true);
        let mut f = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::Tx(1));
        let e = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!((e.dst(), e.src()), (B_MAC, GW1));
        let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
        assert_eq!(ip.ttl(), 63);
        assert!(ip.verify_checksum());
    }

    #[test]
    fn forwards_v6() {
        let t = tables(true);
        let mut f = v6_frame("fd02::2".parse().unwrap(), 64);
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::Tx(1));
        assert_eq!(Ipv6Packet::new_checked(&f[14..]).unwrap().hop_limit(), 63);
        assert_eq!(&f[0..6], &B_MAC.0);
    }

    #[test]
    fn unknown_neighbour_goes_to_the_kernel_untouched() {
        let t = tables(false);
        let mut f = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        let before = f.clone();
        assert_eq!(
            route_frame(&mut f, 0, &t),
            Verdict::SlowPath(14, Counter::SlowNeighUnknown)
        );
        assert_eq!(f, before);
    }

    #[test]
    fn expiring_ttl_local_and_unrouted_go_to_the_kernel() {
        let t = tables(true);
        assert_eq!(
            route_frame(&mut v4_frame(Ipv4Addr::new(10, 2, 0, 2), 1), 0, &t),
            Verdict::SlowPath(14, Counter::SlowTtlExpired)
        );
        assert_eq!(
            route_frame(&mut v6_frame("fd02::2".parse().unwrap(), 1), 0, &t),
            Verdict::SlowPath(14, Counter::SlowTtlExpired)
        );
        assert_eq!(
            route_frame(&mut v4_frame(Ipv4Addr::new(10, 2, 0, 1), 64), 0, &t),
            Verdict::SlowPath(14, Counter::SlowLocal)
        );
        assert_eq!(
            route_frame(&mut v4_frame(Ipv4Addr::new(192, 0, 2, 1), 64), 0, &t),
            Verdict::SlowPath(14, Counter::SlowNoRoute)
        );
        assert_eq!(
            route_frame(&mut v4_frame(Ipv4Addr::new(10, 9, 1, 1), 64), 0, &t),
            Verdict::Tunnel {
                peer: 3,
                l3: 14,
                ip_len: 46
            }
        );
    }

    #[test]
    fn malformed_frames_are_dropped_by_reason() {
        let t = tables(true);
        assert_eq!(
            route_frame(&mut [0u8; 10], 0, &t),
            Verdict::Drop(Counter::DropEthTruncated)
        );
        let mut f = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        f[14] = 0x43; // IHL 3
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::Drop(Counter::DropIpv4Malformed));
        let mut f = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        f[16..18].copy_from_slice(&9000u16.to_be_bytes()); // total length past the frame
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::Drop(Counter::DropIpv4Malformed));
        let mut f = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        f[24] ^= 0xff; // corrupt the header checksum
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::Drop(Counter::DropIpv4BadChecksum));
        let mut f = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        f.truncate(30);
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::Drop(Counter::DropIpv4Malformed));
        let mut f = v6_frame("fd02::2".parse().unwrap(), 64);
        f.truncate(50);
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::Drop(Counter::DropIpv6Malformed));
        let mut f = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        f[12..14].copy_from_slice(&EtherType::ARP.to_be_bytes());
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::Drop(Counter::DropNotIp));
    }

    #[test]
    fn too_big_for_the_egress_mtu_goes_to_the_kernel() {
        let mut t = tables(true);
        t.ports[1].mtu = 40;
        let mut f = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::SlowPath(14, Counter::SlowTooBig));
    }

    #[test]
    fn vlan_tagged_frames_take_the_slow_path() {
        let t = tables(true);
        let inner = v4_frame(Ipv4Addr::new(10, 2, 0, 2), 64);
        let mut f = Vec::new();
        f.extend_from_slice(&inner[..12]);
        f.extend_from_slice(&EtherType::VLAN.to_be_bytes());
        f.extend_from_slice(&[0, 5]);
        f.extend_from_slice(&inner[12..]);
        assert_eq!(route_frame(&mut f, 0, &t), Verdict::SlowPath(18, Counter::SlowVlan));
    }

    #[test]
    fn random_bytes_never_panic() {
        let t = tables(true);
        let mut seed = 42u64;
        let mut buf = [0u8; 128];
        for i in 0..20_000 {
            for b in buf.iter_mut() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                *b = (seed >> 56) as u8;
            }
            // Make most frames look like IPv4/IPv6 so the deeper parsers run.
            match i % 3 {
                0 => buf[12..14].copy_from_slice(&EtherType::IPV4.to_be_bytes()),
                1 => buf[12..14].copy_from_slice(&EtherType::IPV6.to_be_bytes()),
                _ => {}
            }
            let len = (seed as usize) % buf.len();
            let _ = route_frame(&mut buf[..len], (i % 3) as u16, &t);
        }
    }
}
