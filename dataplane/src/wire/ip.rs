//! An IP packet of either version: the one place that reads the version
//! nibble, and the one TTL / hop-limit decrement every forwarding path
//! (LAN to LAN, tunnel in, tunnel out, the control thread's hop) uses.

use super::{Ipv4Packet, Ipv6Packet, WireError};
use std::net::IpAddr;

/// The IP version of a packet, from its first nibble (4, 6, or anything
/// else as `None`), without validating the rest.
#[inline(always)]
pub fn version(p: &[u8]) -> Option<u8> {
    match p.first()? >> 4 {
        v @ (4 | 6) => Some(v),
        _ => None,
    }
}

/// A checked IPv4 or IPv6 packet.
#[derive(Debug)]
pub enum IpPacket<T: AsRef<[u8]>> {
    V4(Ipv4Packet<T>),
    V6(Ipv6Packet<T>),
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Checks the header of whichever version the first nibble says.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        match version(buf.as_ref()) {
            Some(4) => Ipv4Packet::new_checked(buf).map(IpPacket::V4),
            Some(6) => Ipv6Packet::new_checked(buf).map(IpPacket::V6),
            _ if buf.as_ref().is_empty() => Err(WireError::Truncated),
            _ => Err(WireError::BadVersion),
        }
    }

    pub fn is_v6(&self) -> bool {
        matches!(self, IpPacket::V6(_))
    }

    pub fn src(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => p.src().into(),
            IpPacket::V6(p) => p.src().into(),
        }
    }

    pub fn dst(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => p.dst().into(),
            IpPacket::V6(p) => p.dst().into(),
        }
    }

    /// TTL (IPv4) or hop limit (IPv6).
    pub fn ttl(&self) -> u8 {
        match self {
            IpPacket::V4(p) => p.ttl(),
            IpPacket::V6(p) => p.hop_limit(),
        }
    }

    /// Header plus payload, as the header says (the buffer may be longer:
    /// WireGuard pads its plaintext).
    pub fn total_len(&self) -> usize {
        match self {
            IpPacket::V4(p) => p.total_len(),
            IpPacket::V6(p) => p.total_len(),
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IpPacket<T> {
    /// A router's hop: TTL or hop limit minus one (the IPv4 checksum is
    /// updated incrementally). Callers check `ttl() > 1` first.
    #[inline]
    pub fn decrement_ttl(&mut self) {
        match self {
            IpPacket::V4(p) => p.decrement_ttl(),
            IpPacket::V6(p) => p.decrement_hop_limit(),
        }
    }
}

/// Decrements the TTL / hop limit of the IP packet at the start of `p`, if
/// it is one; returns whether it was.
#[inline]
pub fn decrement_ttl(p: &mut [u8]) -> bool {
    match IpPacket::new_checked(p) {
        Ok(mut ip) => {
            ip.decrement_ttl();
            true
        }
        Err(_) => false,
    }
}

/// A hash of the flow of the IP packet `p`: addresses, protocol and, for
/// TCP, UDP and SCTP, the ports. IPv4 fragments after the first carry no
/// ports and hash on the first three alone, as in Linux's L4 multipath
/// hash. Spreads flows over next hops (ECMP) and keeps each flow on one.
#[inline]
pub fn flow_hash(p: &[u8]) -> u64 {
    let (addrs, proto, l4) = match version(p) {
        Some(4) if p.len() >= 20 => {
            let frag = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            let l4 = if frag == 0 {
                Some((p[0] & 0x0f) as usize * 4)
            } else {
                None
            };
            (&p[12..20], p[9], l4)
        }
        Some(6) if p.len() >= 40 => (&p[8..40], p[6], Some(40)),
        _ => return 0,
    };
    let mut h = crate::fxhash::FxHasher::default();
    use std::hash::Hasher;
    h.write(addrs);
    h.write_u8(proto);
    if matches!(proto, 6 | 17 | 132)
        && let Some(ports) = l4.and_then(|o| p.get(o..o + 4))
    {
        h.write(ports);
    }
    // FxHash's low bits are weak: fold the high half in.
    let v = h.finish();
    v ^ (v >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ipv4, ipv6};

    #[test]
    fn one_view_for_both_versions() {
        let mut v4 = vec![0u8; 28];
        ipv4::emit(
            &mut v4,
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            17,
            64,
            8,
        );
        let mut v6 = vec![0u8; 48];
        ipv6::emit(
            &mut v6,
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            17,
            9,
            8,
        );
        for (buf, src, dst, ttl, is_v6) in [
            (&mut v4, "10.0.0.1", "10.0.0.2", 64u8, false),
            (&mut v6, "fd00::1", "fd00::2", 9, true),
        ] {
            let ip = IpPacket::new_checked(&buf[..]).unwrap();
            assert_eq!(ip.src(), src.parse::<IpAddr>().unwrap());
            assert_eq!(ip.dst(), dst.parse::<IpAddr>().unwrap());
            assert_eq!((ip.ttl(), ip.is_v6(), ip.total_len()), (ttl, is_v6, buf.len()));
            assert!(decrement_ttl(buf));
            assert_eq!(IpPacket::new_checked(&buf[..]).unwrap().ttl(), ttl - 1);
        }
        assert!(Ipv4Packet::new_checked(&v4[..]).unwrap().verify_checksum());
        assert_eq!(IpPacket::new_checked(&[][..]).unwrap_err(), WireError::Truncated);
        assert_eq!(
            IpPacket::new_checked(&[0x55; 40][..]).unwrap_err(),
            WireError::BadVersion
        );
        assert!(!decrement_ttl(&mut [0x45, 0, 0]));
        assert_eq!(version(&[0x60]), Some(6));
        assert_eq!(version(&[0x10]), None);
    }

    #[test]
    fn a_flow_hashes_alike_and_flows_spread() {
        let pkt = |sport: u16| {
            let mut b = vec![0u8; 28];
            crate::wire::ipv4::emit(
                &mut b,
                "10.1.0.2".parse().unwrap(),
                "10.5.0.9".parse().unwrap(),
                17,
                64,
                8,
            );
            b[20..22].copy_from_slice(&sport.to_be_bytes());
            b
        };
        assert_eq!(super::flow_hash(&pkt(1000)), super::flow_hash(&pkt(1000)));
        let mut ttl_changed = pkt(1000);
        ttl_changed[8] = 3;
        assert_eq!(
            super::flow_hash(&pkt(1000)),
            super::flow_hash(&ttl_changed),
            "TTL is not part of a flow"
        );
        let on_first = (0..1000u16)
            .filter(|p| super::flow_hash(&pkt(*p)).is_multiple_of(2))
            .count();
        assert!(
            (350..650).contains(&on_first),
            "{on_first} of 1000 flows on one of two hops"
        );
    }
}
