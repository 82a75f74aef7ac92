//! The control thread's side of the non-default VNETs' slow path.
//!
//! The kernel routes the default VNET's first packets (see [`crate::slowpath`]);
//! for other VNETs the workers hand the control thread the two kinds of
//! packet it can finish: packets for a peer without a session (the caller
//! queues them on the WireGuard device, which starts a handshake) and
//! packets for a LAN host whose MAC is not known yet. Those wait here while
//! the kernel resolves the neighbour on that very interface (its neighbour
//! tables are per interface, so they serve every VNET), then leave through
//! an AF_PACKET socket on that interface. Bounded in count and time, like
//! the kernel's own ARP queue.
//!
//! For the packets only a router's own stack would answer (too big for the
//! next link, TTL expiring), the control thread sends the ICMP error itself
//! ("fragmentation needed" / "packet too big", "time exceeded"), from the
//! gateway's address in that VNET, routed back to the source within the
//! VNET, rate-limited like the kernel's: path MTU discovery works across
//! the tunnel in every VNET.

use crate::fib::{Target, VnetId};
use crate::netlink::Netlink;
use crate::slowpath::SlowPath;
use crate::stats::Counter;
use crate::tables::Tables;
use crate::tunnel::parse_inner;
use crate::wire::icmp::{self, IcmpPacket};
use crate::wire::{Ipv4Packet, Ipv6Packet, ipv4, ipv6};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Packets waiting for a neighbour, in all.
const MAX_HELD: usize = 256;
/// Packets waiting for one neighbour (the kernel's `unres_qlen_bytes`
/// holds about a hundred; a few milliseconds of a busy flow fit in 32).
const MAX_HELD_PER_NEIGHBOUR: usize = 32;
/// How long a packet waits for its neighbour.
const HOLD_FOR: Duration = Duration::from_secs(3);
/// How often resolution of one neighbour is asked for.
pub const RESOLVE_EVERY: Duration = Duration::from_millis(500);
/// ICMP errors per second at most (the kernel's default is similar).
const ICMP_PER_SEC: u32 = 200;

/// The ICMP error a router sends about a packet it cannot forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// Too big for the next link, whose MTU this is (IPv4: only with DF).
    TooBig(u32),
    /// TTL or hop limit would reach zero.
    TimeExceeded,
}

/// Builds the ICMP (v4) or ICMPv6 error about `orig` from address `from`,
/// quoting as much of `orig` as the minimum MTU allows. None when no error
/// may be sent: `orig` is itself an ICMP error, a non-first fragment, from
/// an unspecified or multicast source, an IPv4 packet without DF for
/// TooBig (it could be fragmented; it is dropped), or `from` is of the
/// other family.
pub fn icmp_error(orig: &[u8], kind: IcmpError, from: IpAddr) -> Option<Vec<u8>> {
    match (crate::wire::ip::version(orig)?, from) {
        (4, IpAddr::V4(from)) => {
            let ip = Ipv4Packet::new_checked(orig).ok()?;
            let src = ip.src();
            if src.is_unspecified() || src.is_multicast() || src.is_broadcast() || ip.frag_offset() != 0 {
                return None;
            }
            if matches!(kind, IcmpError::TooBig(_)) && !ip.dont_fragment() {
                return None;
            }
            let hl = ((orig[0] & 0x0f) as usize) * 4;
            if ip.protocol() == icmp::PROTOCOL_V4
                && orig
                    .get(hl)
                    .is_some_and(|t| ![icmp::v4::ECHO_REQUEST, icmp::v4::ECHO_REPLY].contains(t))
            {
                return None;
            }
            let quote = &orig[..orig.len().min(ip.total_len()).min(576 - 28)];
            let mut out = vec![0u8; 20 + 8 + quote.len()];
            ipv4::emit(&mut out, from, src, icmp::PROTOCOL_V4, 64, 8 + quote.len());
            let mut m = IcmpPacket::new_checked(&mut out[20..]).ok()?;
            match kind {
                IcmpError::TooBig(mtu) => {
                    let mtu = (mtu.min(u16::MAX as u32) as u16).to_be_bytes();
                    m.set_header(
                        icmp::v4::DEST_UNREACHABLE,
                        icmp::v4::CODE_FRAG_NEEDED,
                        [0, 0, mtu[0], mtu[1]],
                    )
                }
                IcmpError::TimeExceeded => m.set_header(icmp::v4::TIME_EXCEEDED, 0, [0; 4]),
            }
            out[28..].copy_from_slice(quote);
            IcmpPacket::new_checked(&mut out[20..]).ok()?.fill_checksum_v4();
            Some(out)
        }
        (6, IpAddr::V6(from)) => {
            let ip = Ipv6Packet::new_checked(orig).ok()?;
            let src = ip.src();
            if src.is_unspecified() || src.is_multicast() {
                return None;
            }
            if ip.next_header() == icmp::PROTOCOL_V6 && orig.get(40).is_some_and(|t| *t < 128) {
                return None;
            }
            let quote = &orig[..orig.len().min(1280 - 48)];
            let mut out = vec![0u8; 40 + 8 + quote.len()];
            ipv6::emit(&mut out, from, src, icmp::PROTOCOL_V6, 64, 8 + quote.len());
            let mut m = IcmpPacket::new_checked(&mut out[40..]).ok()?;
            match kind {
                IcmpError::TooBig(mtu) => m.set_header(icmp::v6::PACKET_TOO_BIG, 0, mtu.to_be_bytes()),
                IcmpError::TimeExceeded => m.set_header(icmp::v6::TIME_EXCEEDED, 0, [0; 4]),
            }
            out[48..].copy_from_slice(quote);
            IcmpPacket::new_checked(&mut out[40..])
                .ok()?
                .fill_checksum_v6(from, src);
            Some(out)
        }
        _ => None,
    }
}

struct Held {
    port: u16,
    next_hop: IpAddr,
    since: Instant,
    packet: Vec<u8>,
}

subway_common::named_counters! {
    /// The control thread's outcomes for non-default VNETs' punted
    /// packets, for `subway show` and metrics.
    #[repr(usize)]
    pub enum PuntCounter {
        /// ICMP errors sent (too big, time exceeded).
        IcmpErrors = "icmp_errors",
        /// Dropped without an ICMP error: rate limit, IPv4 without DF too
        /// big, an error about an error, or no gateway address in the VNET.
        IcmpSuppressed = "icmp_suppressed",
        /// Handed to the caller for a peer without a session.
        ToPeer = "to_peer",
        /// Sent to a LAN host once its neighbour entry appeared.
        SentAfterResolve = "sent_after_resolve",
        /// Dropped: the neighbour did not answer in time.
        Unresolved = "unresolved",
        /// Dropped: too many packets waiting.
        Overflow = "overflow",
        /// Dropped: no route in the VNET any more, or malformed.
        NoRoute = "no_route",
        /// Resolution requests (ARP / NDP) made.
        Resolutions = "resolutions",
    }
}

/// The punt server's counts, by [`PuntCounter`].
pub type PuntStats = crate::stats::Counts<PuntCounter>;

#[derive(Default)]
pub struct PuntServer {
    held: Vec<Held>,
    asked: BTreeMap<(u32, IpAddr), Instant>,
    raw: Option<OwnedFd>,
    /// ICMP error budget: the second it counts, and what is left of it.
    icmp_budget: (u64, u32),
    pub stats: PuntStats,
}

impl PuntServer {
    /// Packets wait for a neighbour: the caller should serve again within
    /// [`RESOLVE_EVERY`] (to ask again, or give up after [`HOLD_FOR`]).
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Drains the workers' queue and sends what waited for a neighbour that
    /// is now known. `to_peer(peer, packet)` takes packets for peers.
    pub fn serve(&mut self, slow: &SlowPath, t: &Tables, nl: &mut Netlink, mut to_peer: impl FnMut(u32, &[u8])) {
        let now = Instant::now();
        for _ in 0..1024 {
            let Some(p) = slow.take_punted() else { break };
            match p.reason {
                Counter::SlowTooBig | Counter::SlowTtlExpired => {
                    if let Some(err) = self.icmp_for(t, nl, p.vnet, &p.packet, p.reason) {
                        self.stats.inc(PuntCounter::IcmpErrors);
                        self.dispatch(t, p.vnet, err, now, &mut to_peer);
                    } else {
                        self.stats.inc(PuntCounter::IcmpSuppressed);
                    }
                }
                _ => {
                    // Forwarded by the control thread: a router's hop, as
                    // the workers make it (a packet at its last hop is
                    // answered, never sent on with TTL 0).
                    let mut packet = p.packet;
                    if forward_hop(&mut packet) {
                        self.dispatch(t, p.vnet, packet, now, &mut to_peer);
                    } else if let Some(err) = self.icmp_for(t, nl, p.vnet, &packet, Counter::SlowTtlExpired) {
                        self.stats.inc(PuntCounter::IcmpErrors);
                        self.dispatch(t, p.vnet, err, now, &mut to_peer);
                    } else {
                        self.stats.inc(PuntCounter::IcmpSuppressed);
                    }
                }
            }
        }
        if self.held.is_empty() {
            self.asked.clear();
            return;
        }
        let mut i = 0;
        while i < self.held.len() {
            let h = &self.held[i];
            let Some(port) = t.ports.get(h.port as usize) else {
                self.held.swap_remove(i);
                self.stats.inc(PuntCounter::NoRoute);
                continue;
            };
            if let Some(mac) = t.neigh.get(port.ifindex, h.next_hop) {
                let h = self.held.swap_remove(i);
                if self.send(port.ifindex, mac.0, port.mac.0, h.packet).is_ok() {
                    self.stats.inc(PuntCounter::SentAfterResolve);
                } else {
                    self.stats.inc(PuntCounter::NoRoute);
                }
                continue;
            }
            if now.duration_since(h.since) > HOLD_FOR {
                self.held.swap_remove(i);
                self.stats.inc(PuntCounter::Unresolved);
                continue;
            }
            let key = (port.ifindex, h.next_hop);
            if self
                .asked
                .get(&key)
                .is_none_or(|t| now.duration_since(*t) >= RESOLVE_EVERY)
            {
                self.asked.insert(key, now);
                self.stats.inc(PuntCounter::Resolutions);
                if let Err(e) = nl.resolve(port.ifindex, h.next_hop) {
                    tracing::debug!("resolving {} on {}: {e}", h.next_hop, port.name);
                }
            }
            i += 1;
        }
        self.asked.retain(|_, t| now.duration_since(*t) < HOLD_FOR);
    }

    /// Sends `packet` where its VNET routes it: to a peer (the caller seals
    /// it), or to a LAN host once its neighbour is known.
    fn dispatch(
        &mut self,
        t: &Tables,
        vnet: VnetId,
        packet: Vec<u8>,
        now: Instant,
        to_peer: &mut impl FnMut(u32, &[u8]),
    ) {
        match route(t, vnet, &packet) {
            Some((Target::Peer(peer), _)) => {
                self.stats.inc(PuntCounter::ToPeer);
                to_peer(peer, &packet);
            }
            Some((Target::Port(port), next_hop)) => {
                let waiting = self
                    .held
                    .iter()
                    .filter(|h| h.port == port && h.next_hop == next_hop)
                    .count();
                if self.held.len() >= MAX_HELD || waiting >= MAX_HELD_PER_NEIGHBOUR {
                    self.stats.inc(PuntCounter::Overflow);
                    return;
                }
                self.held.push(Held {
                    port,
                    next_hop,
                    since: now,
                    packet,
                });
            }
            _ => self.stats.inc(PuntCounter::NoRoute),
        }
    }

    /// The ICMP error about `packet` (of `vnet`, punted for `reason`), from
    /// the gateway's address in that VNET, within the rate limit.
    fn icmp_for(
        &mut self,
        t: &Tables,
        nl: &mut Netlink,
        vnet: VnetId,
        packet: &[u8],
        reason: Counter,
    ) -> Option<Vec<u8>> {
        let sec = crate::wg::Now::system().mono.as_secs();
        if self.icmp_budget.0 != sec {
            self.icmp_budget = (sec, ICMP_PER_SEC);
        }
        if self.icmp_budget.1 == 0 {
            return None;
        }
        let inner = parse_inner(packet)?;
        let kind = if reason == Counter::SlowTtlExpired {
            IcmpError::TimeExceeded
        } else {
            // The MTU of the link it did not fit: the tunnel's or a LAN's.
            let mtu = match t.fib.port_of(t.fib.lookup(vnet, inner.dst)?.1) {
                Some(p) => t.ports.get(p as usize)?.mtu,
                None => t
                    .uplink
                    .and_then(|u| t.ports.get(u as usize))?
                    .mtu
                    .saturating_sub(crate::tunnel::TUNNEL_OVERHEAD),
            };
            IcmpError::TooBig(mtu)
        };
        // The gateway's address in this VNET, of the packet's family.
        let from = t.ports.iter().filter(|p| p.vnet == vnet).find_map(|p| {
            nl.addresses(p.ifindex)
                .ok()?
                .into_iter()
                .map(|a| a.addr())
                .find(|a| a.is_ipv4() == inner.src.is_ipv4())
        })?;
        let err = icmp_error(packet, kind, from)?;
        self.icmp_budget.1 -= 1;
        Some(err)
    }

    /// Sends an IP packet in an Ethernet frame on `ifindex` (its hop was
    /// counted when it was taken in: [`forward_hop`]).
    fn send(&mut self, ifindex: u32, dst: [u8; 6], src: [u8; 6], packet: Vec<u8>) -> std::io::Result<()> {
        let ethertype: u16 = if crate::wire::ip::version(&packet) == Some(6) {
            0x86dd
        } else {
            0x0800
        };
        if self.raw.is_none() {
            // SAFETY: plain socket(2); protocol 0 receives nothing.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh fd we own.
            self.raw = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let fd = self.raw.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        let mut frame = Vec::with_capacity(14 + packet.len());
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(&packet);
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ethertype.to_be();
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&dst);
        // SAFETY: valid buffer and address of the stated sizes.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A router's hop for a packet the control thread forwards: false if its
/// TTL or hop limit would reach zero (it is answered with time exceeded),
/// else true with the TTL decremented (and the IPv4 checksum updated).
fn forward_hop(packet: &mut [u8]) -> bool {
    match crate::wire::IpPacket::new_checked(packet) {
        Ok(mut ip) if ip.ttl() > 1 => {
            ip.decrement_ttl();
            true
        }
        _ => false,
    }
}

/// Where a packet of `vnet` goes: a peer, or a port and the next hop on
/// it (the destination itself, or the router of a `Via` route).
fn route(t: &Tables, vnet: VnetId, packet: &[u8]) -> Option<(Target, IpAddr)> {
    let dst = parse_inner(packet)?.dst;
    match t.fib.lookup(vnet, dst)? {
        (_, to) if to.is_tunnel() => Some((Target::Peer(t.fib.peer_for(to, packet)?), dst)),
        (_, Target::Local) => None,
        (_, out) => {
            let (port, hop) = t.fib.next_hop(out, dst, packet)?;
            Some((Target::Port(port), hop))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::icmp::IcmpPacket;

    #[test]
    fn the_control_thread_counts_a_hop_and_never_forwards_ttl_zero() {
        let mut p = v4(true, 17, 40);
        p[8] = 2;
        Ipv4Packet::new_checked(&mut p[..]).unwrap().fill_checksum();
        assert!(forward_hop(&mut p));
        assert_eq!(p[8], 1);
        assert!(
            Ipv4Packet::new_checked(&p[..]).is_ok_and(|_| crate::wire::checksum::checksum(&p[..20]) == 0),
            "header checksum updated"
        );
        assert!(!forward_hop(&mut p), "TTL 1 is answered, not forwarded");
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[5] = 8;
        v6[7] = 1;
        assert!(!forward_hop(&mut v6), "hop limit 1");
        v6[7] = 64;
        assert!(forward_hop(&mut v6));
        assert_eq!(v6[7], 63);
        assert!(!forward_hop(&mut [0x45, 0, 0]), "malformed");
    }

    fn v4(df: bool, proto: u8, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        ipv4::emit(
            &mut p,
            "192.168.1.10".parse().unwrap(),
            "10.0.0.5".parse().unwrap(),
            proto,
            64,
            len - 20,
        );
        if !df {
            p[6] = 0;
            let c = crate::wire::checksum::checksum(&{
                let mut h = p[..20].to_vec();
                h[10] = 0;
                h[11] = 0;
                h
            });
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        p
    }

    #[test]
    fn frag_needed_quotes_the_packet_and_says_the_mtu() {
        let orig = v4(true, 17, 1500);
        let e = icmp_error(&orig, IcmpError::TooBig(1420), "192.168.1.1".parse().unwrap()).unwrap();
        let ip = Ipv4Packet::new_checked(&e[..]).unwrap();
        assert_eq!(
            (ip.src().to_string(), ip.dst().to_string()),
            ("192.168.1.1".into(), "192.168.1.10".into())
        );
        assert!(ip.verify_checksum());
        assert_eq!(e.len(), 576, "quote bounded by the minimum MTU");
        let m = IcmpPacket::new_checked(&e[20..]).unwrap();
        assert_eq!((m.msg_type(), m.code(), m.rest()), (3, 4, [0, 0, 0x05, 0x8c]));
        assert!(m.verify_checksum_v4());
        assert_eq!(&e[28..48], &orig[..20], "the original header is quoted");
    }

    #[test]
    fn no_error_about_errors_fragments_or_packets_that_may_be_fragmented() {
        let gw: IpAddr = "192.168.1.1".parse().unwrap();
        assert!(
            icmp_error(&v4(false, 17, 1500), IcmpError::TooBig(1420), gw).is_none(),
            "no DF"
        );
        assert!(
            icmp_error(&v4(false, 17, 100), IcmpError::TimeExceeded, gw).is_some(),
            "TTL: DF or not"
        );
        let mut err = v4(true, 1, 100);
        err[20] = 3; // an ICMP destination unreachable
        assert!(icmp_error(&err, IcmpError::TimeExceeded, gw).is_none());
        let mut echo = v4(true, 1, 100);
        echo[20] = 8;
        assert!(
            icmp_error(&echo, IcmpError::TimeExceeded, gw).is_some(),
            "pings get errors (traceroute)"
        );
        let v6gw: IpAddr = "fd00:1::1".parse().unwrap();
        assert!(
            icmp_error(&v4(true, 17, 100), IcmpError::TimeExceeded, v6gw).is_none(),
            "family"
        );
    }

    #[test]
    fn packet_too_big_v6() {
        let mut p = vec![0u8; 1500];
        ipv6::emit(
            &mut p,
            "fd00:1::10".parse().unwrap(),
            "fd10::5".parse().unwrap(),
            17,
            64,
            1460,
        );
        let from: std::net::Ipv6Addr = "fd00:1::1".parse().unwrap();
        let e = icmp_error(&p, IcmpError::TooBig(1420), from.into()).unwrap();
        assert_eq!(e.len(), 1280);
        let m = IcmpPacket::new_checked(&e[40..]).unwrap();
        assert_eq!((m.msg_type(), m.rest()), (2, 1420u32.to_be_bytes()));
        assert!(m.verify_checksum_v6(from, "fd00:1::10".parse().unwrap()));
    }
}
