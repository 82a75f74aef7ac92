//! The tunnel: LAN packets to WireGuard datagrams and back, in place in
//! one frame buffer. This file is the framing both directions share (outer
//! Ethernet, IPv4 or IPv6, UDP around the sealed message; the inner packet
//! moves once, a memmove of its bytes, and is sealed or opened where it
//! lands; the MSS clamp). The two directions have a file each, as kernel
//! WireGuard's send.c and receive.c: [`tx`] seals a peer's run of frames
//! from a batch, [`rx`] opens a datagram and routes its inner packet.

pub mod rx;
pub mod tx;

use crate::wg::WgError;
use crate::wg::messages::DATA_HEADER_LEN;
use crate::wg::session::Session;
use crate::wire::{
    EtherType, EthernetFrame, IpPacket, Ipv4Packet, Ipv6Packet, MacAddr, UdpPacket, ethernet, ip, ipv4, ipv6, udp,
};
use std::net::{IpAddr, SocketAddr};

/// Outer headers before the WireGuard message.
pub const OUTER_V4: usize = 14 + 20 + 8;
pub const OUTER_V6: usize = 14 + 40 + 8;

/// Where a peer's datagrams go on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OuterPath {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl OuterPath {
    pub fn header_len(&self) -> usize {
        if self.dst.is_ipv4() { OUTER_V4 } else { OUTER_V6 }
    }
}

/// Bytes a frame needs to carry an inner packet of `ip_len` bytes.
pub fn encapsulated_len(path: &OuterPath, ip_len: usize) -> usize {
    path.header_len() + Session::message_len(ip_len)
}

/// Seals the inner IP packet `buf[l3..l3 + ip_len]` with `counter` and
/// builds the outer frame around it at the start of `buf`, from UDP port
/// `sport` (the path's own, or one of `SourcePorts`). Returns the frame's
/// length. `buf` is the frame's whole capacity.
pub fn encapsulate(
    buf: &mut [u8],
    l3: usize,
    ip_len: usize,
    session: &Session,
    counter: u64,
    path: &OuterPath,
    sport: u16,
) -> Result<usize, WgError> {
    let hdr = path.header_len();
    if buf.len() < encapsulated_len(path, ip_len) || l3 + ip_len > buf.len() {
        return Err(WgError::BufferTooSmall);
    }
    buf.copy_within(l3..l3 + ip_len, hdr + DATA_HEADER_LEN);
    let n = session.seal(counter, &mut buf[hdr..], ip_len)?;
    udp::emit(&mut buf[hdr - 8..], sport, path.dst.port(), n);
    match (path.src.ip(), path.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // IPv4 allows "no UDP checksum", and WireGuard authenticates
            // every byte of the payload anyway.
            ipv4::emit(&mut buf[14..], s, d, udp::PROTOCOL, 64, 8 + n);
            ethernet::emit(buf, path.dst_mac, path.src_mac, EtherType::IPV4);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ipv6::emit(&mut buf[14..], s, d, udp::PROTOCOL, 64, 8 + n);
            if let Ok(mut u) = UdpPacket::new_checked(&mut buf[54..54 + 8 + n]) {
                u.fill_checksum_v6(s, d);
            }
            ethernet::emit(buf, path.dst_mac, path.src_mac, EtherType::IPV6);
        }
        _ => return Err(WgError::BadLength),
    }
    Ok(hdr + n)
}

/// A datagram received on the uplink: its source and where the WireGuard
/// message lies in the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub src: SocketAddr,
    /// The outer destination address (ours, for WireGuard to us).
    pub dst: IpAddr,
    pub msg_start: usize,
    pub msg_end: usize,
}

/// Parses Ethernet / IP / UDP around a WireGuard message. Checksums are
/// not checked: a veth may hand on partial ones, and WireGuard
/// authenticates the message itself.
pub fn parse_outer(frame: &[u8]) -> Option<Received> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.vlan_count() != 0 {
        return None;
    }
    let l3 = eth.header_len();
    match eth.ethertype() {
        EtherType::IPV4 => {
            let ip = Ipv4Packet::new_checked(&frame[l3..]).ok()?;
            if ip.protocol() != udp::PROTOCOL || ip.is_fragment() {
                return None;
            }
            let l4 = l3 + ip.header_len();
            let u = UdpPacket::new_checked(&frame[l4..l3 + ip.total_len()]).ok()?;
            let src = SocketAddr::new(IpAddr::V4(ip.src()), u.src_port());
            Some(Received {
                src,
                dst: IpAddr::V4(ip.dst()),
                msg_start: l4 + 8,
                msg_end: l4 + u.len(),
            })
        }
        EtherType::IPV6 => {
            let ip = Ipv6Packet::new_checked(&frame[l3..]).ok()?;
            if ip.next_header() != udp::PROTOCOL {
                return None;
            }
            let l4 = l3 + 40;
            let u = UdpPacket::new_checked(&frame[l4..l3 + ip.total_len()]).ok()?;
            let src = SocketAddr::new(IpAddr::V6(ip.src()), u.src_port());
            Some(Received {
                src,
                dst: IpAddr::V6(ip.dst()),
                msg_start: l4 + 8,
                msg_end: l4 + u.len(),
            })
        }
        _ => None,
    }
}

/// The inner packet after decryption: version, source, destination, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inner {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub len: usize,
    pub ttl: u8,
}

/// Validates a decrypted inner packet (the padded plaintext).
pub fn parse_inner(p: &[u8]) -> Option<Inner> {
    let ip = IpPacket::new_checked(p).ok()?;
    Some(Inner {
        src: ip.src(),
        dst: ip.dst(),
        len: ip.total_len(),
        ttl: ip.ttl(),
    })
}

/// Moves the inner packet at `buf[start..start + len]` to just after a new
/// Ethernet header, decrements its TTL / hop limit, and returns the frame
/// length.
pub fn to_lan_frame(buf: &mut [u8], start: usize, len: usize, dst_mac: MacAddr, src_mac: MacAddr) -> usize {
    buf.copy_within(start..start + len, 14);
    let v6 = ip::version(&buf[14..]) == Some(6);
    ethernet::emit(
        buf,
        dst_mac,
        src_mac,
        if v6 { EtherType::IPV6 } else { EtherType::IPV4 },
    );
    ip::decrement_ttl(&mut buf[14..14 + len]);
    14 + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::noise::SessionKeys;
    use std::time::Duration;

    fn sessions() -> (Session, Session) {
        let k = |i: bool| SessionKeys {
            send: if i { [1; 32] } else { [2; 32] }.into(),
            recv: if i { [2; 32] } else { [1; 32] }.into(),
            local_index: if i { 5 } else { 6 },
            remote_index: if i { 6 } else { 5 },
            initiator: i,
        };
        (
            Session::new(&k(true), 0, Duration::ZERO),
            Session::new(&k(false), 0, Duration::ZERO),
        )
    }

    fn round_trip(path: OuterPath) {
        let (a, b) = sessions();
        let mut frame = vec![0u8; 2048];
        ethernet::emit(&mut frame, MacAddr([1; 6]), MacAddr([2; 6]), EtherType::IPV4);
        ipv4::emit(
            &mut frame[14..],
            "10.1.0.2".parse().unwrap(),
            "10.2.0.2".parse().unwrap(),
            17,
            63,
            100,
        );
        let inner: Vec<u8> = frame[14..134].to_vec();
        let n = encapsulate(&mut frame, 14, 120, &a, 0, &path, path.src.port()).unwrap();
        assert_eq!(n, encapsulated_len(&path, 120));
        let r = parse_outer(&frame[..n]).unwrap();
        assert_eq!(r.src, path.src);
        if path.dst.is_ipv6() {
            let u = UdpPacket::new_checked(&frame[54..n]).unwrap();
            assert!(u.verify_checksum_v6(
                match path.src.ip() {
                    IpAddr::V6(s) => s,
                    _ => unreachable!(),
                },
                match path.dst.ip() {
                    IpAddr::V6(d) => d,
                    _ => unreachable!(),
                }
            ));
        }
        let plain_len = b
            .open(&mut frame[r.msg_start..r.msg_end], Duration::ZERO)
            .unwrap()
            .len();
        let start = r.msg_start + DATA_HEADER_LEN;
        let info = parse_inner(&frame[start..start + plain_len]).unwrap();
        assert_eq!(info.len, 120);
        assert_eq!(&frame[start..start + 120], &inner[..]);
        let len = to_lan_frame(&mut frame, start, info.len, MacAddr([9; 6]), MacAddr([8; 6]));
        assert_eq!(len, 134);
        let ip = Ipv4Packet::new_checked(&frame[14..len]).unwrap();
        assert_eq!(ip.ttl(), 62);
        assert!(ip.verify_checksum());
    }

    #[test]
    fn round_trips_over_ipv4_and_ipv6() {
        round_trip(OuterPath {
            src_mac: MacAddr([3; 6]),
            dst_mac: MacAddr([4; 6]),
            src: "192.0.2.1:51820".parse().unwrap(),
            dst: "192.0.2.2:51820".parse().unwrap(),
        });
        round_trip(OuterPath {
            src_mac: MacAddr([3; 6]),
            dst_mac: MacAddr([4; 6]),
            src: "[2001:db8::1]:51820".parse().unwrap(),
            dst: "[2001:db8::2]:51820".parse().unwrap(),
        });
    }

    #[test]
    fn refuses_small_buffers_and_bad_outer() {
        let (a, _) = sessions();
        let path = OuterPath {
            src_mac: MacAddr([3; 6]),
            dst_mac: MacAddr([4; 6]),
            src: "192.0.2.1:51820".parse().unwrap(),
            dst: "192.0.2.2:51820".parse().unwrap(),
        };
        let mut small = vec![0u8; 100];
        assert_eq!(
            encapsulate(&mut small, 14, 80, &a, 0, &path, path.src.port()),
            Err(WgError::BufferTooSmall)
        );
        assert_eq!(parse_outer(&[0u8; 20]), None);
        assert_eq!(parse_inner(&[0x45]), None);
    }
}

/// Bytes of outer headers and WireGuard framing to budget for, whichever
/// the outer family: IPv6 (40) + UDP (8) + data header (16) + tag (16),
/// as wg-quick's default MTU of 1420 does for a 1500-byte link.
pub const TUNNEL_OVERHEAD: u32 = 80;

/// Lowers the MSS option of a TCP SYN in `ip` (an IPv4 or IPv6 packet) so
/// that segments fit a tunnel of `tunnel_mtu`, patching the checksum.
/// Returns whether it changed anything.
pub fn clamp_mss(ip: &mut [u8], tunnel_mtu: u32) -> bool {
    let (l4, ip_hdr) = match ip::version(ip) {
        Some(4) if ip.len() >= 20 => {
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            if ip[9] != 6 || frag != 0 {
                return false;
            }
            ((ip[0] & 0x0f) as usize * 4, 20u32)
        }
        Some(6) if ip.len() >= 40 => {
            if ip[6] != 6 {
                return false;
            }
            (40, 40u32)
        }
        _ => return false,
    };
    let Some(tcp) = ip.get_mut(l4..) else { return false };
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return false;
    }
    let max = tunnel_mtu.saturating_sub(ip_hdr + 20).min(u16::MAX as u32) as u16;
    let doff = ((tcp[12] >> 4) as usize * 4).min(tcp.len());
    let mut i = 20;
    while i < doff {
        match tcp[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = tcp.get(i + 1) else { break };
                let len = len as usize;
                if len < 2 || i + len > doff {
                    break;
                }
                if kind == 2 && len == 4 {
                    let mss = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if mss <= max {
                        return false;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&max.to_be_bytes());
                    let csum = u16::from_be_bytes([tcp[16], tcp[17]]);
                    let new = crate::wire::checksum::update16(csum, mss, max);
                    tcp[16..18].copy_from_slice(&new.to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

#[cfg(test)]
mod mss_tests {
    use super::*;
    use crate::wire::checksum;

    fn syn_v4(mss: u16) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 24];
        ipv4::emit(
            &mut p,
            "10.1.0.2".parse().unwrap(),
            "10.2.0.2".parse().unwrap(),
            6,
            64,
            24,
        );
        let t = &mut p[20..];
        t[12] = 6 << 4; // 24-byte header
        t[13] = 0x02; // SYN
        t[20..24].copy_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
        let ps = checksum::pseudo_v4("10.1.0.2".parse().unwrap(), "10.2.0.2".parse().unwrap(), 6, 24);
        let c = !checksum::fold(checksum::add(ps, checksum::sum(t)));
        t[16..18].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn clamps_and_keeps_the_checksum_valid() {
        let mut p = syn_v4(1460);
        assert!(clamp_mss(&mut p, 1420));
        assert_eq!(u16::from_be_bytes([p[42], p[43]]), 1380);
        let ps = checksum::pseudo_v4("10.1.0.2".parse().unwrap(), "10.2.0.2".parse().unwrap(), 6, 24);
        assert_eq!(checksum::fold(checksum::add(ps, checksum::sum(&p[20..]))), 0xffff);
        // Already small enough, or not a SYN: untouched.
        let mut q = syn_v4(1200);
        assert!(!clamp_mss(&mut q, 1420));
        let mut r = syn_v4(1460);
        r[33] = 0x10; // ACK only
        assert!(!clamp_mss(&mut r, 1420));
        // Garbage does not panic.
        let mut junk = vec![0x45u8; 30];
        junk[9] = 6;
        junk[0] = 0x45;
        let _ = clamp_mss(&mut junk, 1420);
    }
}

/// A tunnel between us and one peer, with both ends' sessions, and the
/// tables a worker would see: what the rx and tx tests run on.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;
    use crate::fib::{AllowedIps, Fib, Target};
    use crate::tables::{NeighTable, PeerRt, PeerStats, Port, Tables};
    use crate::wg::noise::SessionKeys;
    use ipnet::IpNet;
    use std::sync::Arc;
    use std::time::Duration;

    /// A host on our LAN (port 1), and one behind the peer.
    pub const LAN_HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 2));
    pub const FAR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 0, 2));
    pub const LAN_HOST_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 2));
    pub const FAR_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, 2));
    pub const HOST_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x22]);
    pub const LAN_MAC: MacAddr = MacAddr([2, 0, 0, 0, 1, 1]);
    pub const UPLINK_MAC: MacAddr = MacAddr([2, 0, 0, 0, 1, 0]);
    pub const FAR_MAC: MacAddr = MacAddr([2, 0, 0, 0, 2, 0]);

    pub struct Fixture {
        /// Our session with the peer (receiver index 5).
        pub ours: Arc<Session>,
        /// The peer's end of it.
        pub theirs: Session,
        /// Our path to the peer.
        pub path: OuterPath,
        pub session_known: bool,
        pub path_known: bool,
        pub lan_mtu: u32,
        /// `SourcePorts` (1: the listen port alone).
        pub source_ports: u16,
        stats: Arc<PeerStats>,
    }

    impl Fixture {
        pub fn new() -> Fixture {
            let k = |i: bool| SessionKeys {
                send: if i { [1; 32] } else { [2; 32] }.into(),
                recv: if i { [2; 32] } else { [1; 32] }.into(),
                local_index: if i { 5 } else { 6 },
                remote_index: if i { 6 } else { 5 },
                initiator: i,
            };
            Fixture {
                ours: Arc::new(Session::new(&k(true), 0, Duration::ZERO)),
                theirs: Session::new(&k(false), 0, Duration::ZERO),
                path: OuterPath {
                    src_mac: UPLINK_MAC,
                    dst_mac: FAR_MAC,
                    src: "192.0.2.1:51820".parse().unwrap(),
                    dst: "192.0.2.2:51820".parse().unwrap(),
                },
                session_known: true,
                path_known: true,
                lan_mtu: 1500,
                source_ports: 1,
                stats: Default::default(),
            }
        }

        pub fn peer_stats(&self) -> &PeerStats {
            &self.stats
        }

        /// The workers' snapshot: port 0 is the uplink, port 1 the LAN
        /// (10.1.0.0/24, fd01::/64, the gateway at .1); peer 0 owns
        /// 10.2.0.0/24 and fd02::/64.
        pub fn tables(&self) -> Tables {
            let mut fib = Fib::new();
            let lan = [("10.1.0.0/24", Target::Port(1)), ("fd01::/64", Target::Port(1))];
            let peer: [IpNet; 2] = ["10.2.0.0/24".parse().unwrap(), "fd02::/64".parse().unwrap()];
            for (n, t) in lan {
                fib.insert(0, n.parse().unwrap(), t).unwrap();
            }
            for n in peer {
                fib.insert(0, n, Target::Peer(0)).unwrap();
            }
            fib.insert(0, "10.1.0.1/32".parse().unwrap(), Target::Local).unwrap();
            let mut neigh = NeighTable::default();
            neigh.insert(20, LAN_HOST, HOST_MAC);
            neigh.insert(20, LAN_HOST_V6, HOST_MAC);
            let port = |name: &str, ifindex, mac, vnet, mtu| Port {
                name: name.into(),
                ifindex,
                mac,
                vnet,
                mtu,
            };
            let mut sessions = crate::fxhash::FxMap::default();
            sessions.insert(5, self.ours.clone());
            Tables {
                fib: Arc::new(fib),
                allowed: Arc::new(AllowedIps::new([(0, 0, &peer[..])])),
                neigh,
                ports: vec![
                    port("wan0", 10, UPLINK_MAC, crate::config::UPLINK_VNET, 1500),
                    port("lan0", 20, LAN_MAC, 0, self.lan_mtu),
                ],
                peers: vec![PeerRt {
                    vnet: 0,
                    session: self.session_known.then(|| self.ours.clone()),
                    path: self.path_known.then_some(self.path),
                    stats: self.stats.clone(),
                }],
                sessions,
                policies: Default::default(),
                uplink: Some(0),
                listen_port: 51820,
                source_ports: self.source_ports,
                uplink_addrs: vec![self.path.src.ip()],
            }
        }

        /// A datagram from the peer (from `from`) carrying an IP packet
        /// (see [`ip_frame`]); `None` as the packet sends a keepalive.
        pub fn datagram(&self, from: SocketAddr, packet: Option<(IpAddr, IpAddr, u8, usize)>) -> (Vec<u8>, usize) {
            let mut buf = vec![0u8; 2048];
            let ip_len = match packet {
                Some((src, dst, ttl, payload)) => ip_frame(&mut buf, src, dst, ttl, payload, false) - 14,
                None => 0,
            };
            let back = OuterPath {
                src_mac: FAR_MAC,
                dst_mac: UPLINK_MAC,
                src: from,
                dst: self.path.src,
            };
            let counter = self.theirs.reserve(1).unwrap();
            let n = encapsulate(&mut buf, 14, ip_len, &self.theirs, counter, &back, back.src.port()).unwrap();
            (buf, n)
        }
    }

    /// Writes an Ethernet frame with an IP packet from `src` to `dst` at
    /// the start of `buf`: a TCP SYN with an MSS option of 1460, or UDP
    /// with `payload` bytes. Returns the frame's length.
    pub fn ip_frame(buf: &mut [u8], src: IpAddr, dst: IpAddr, ttl: u8, payload: usize, syn: bool) -> usize {
        let l4_len = if syn { 24 } else { 8 + payload };
        let (proto, ethertype, l3_len) = (
            if syn { 6 } else { 17 },
            src.is_ipv6(),
            if src.is_ipv6() { 40 } else { 20 },
        );
        ethernet::emit(
            buf,
            LAN_MAC,
            HOST_MAC,
            if ethertype { EtherType::IPV6 } else { EtherType::IPV4 },
        );
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ipv4::emit(&mut buf[14..], s, d, proto, ttl, l4_len),
            (IpAddr::V6(s), IpAddr::V6(d)) => ipv6::emit(&mut buf[14..], s, d, proto, ttl, l4_len),
            _ => panic!("one family"),
        }
        let l4 = 14 + l3_len;
        buf[l4..l4 + l4_len].fill(0);
        if syn {
            buf[l4 + 12] = 6 << 4;
            buf[l4 + 13] = 0x02;
            buf[l4 + 20..l4 + 24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
        } else {
            buf[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }
        l4 + l4_len
    }
}
