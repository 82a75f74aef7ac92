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

use crate::fib::{Target, VnetId};
use crate::netlink::Netlink;
use crate::slowpath::SlowPath;
use crate::tables::Tables;
use crate::tunnel::parse_inner;
use crate::wire::{Ipv4Packet, Ipv6Packet};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Packets waiting for a neighbour, in all.
const MAX_HELD: usize = 256;
/// Packets waiting for one neighbour (the kernel keeps 3 too).
const MAX_HELD_PER_NEIGHBOUR: usize = 3;
/// How long a packet waits for its neighbour.
const HOLD_FOR: Duration = Duration::from_secs(3);
/// How often resolution of one neighbour is asked for.
const RESOLVE_EVERY: Duration = Duration::from_millis(500);

struct Held {
    port: u16,
    next_hop: IpAddr,
    since: Instant,
    packet: Vec<u8>,
}

/// Outcomes, for `subway show`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PuntStats {
    /// Handed to the caller for a peer without a session.
    pub to_peer: u64,
    /// Sent to a LAN host once its neighbour entry appeared.
    pub sent_after_resolve: u64,
    /// Dropped: the neighbour did not answer in time.
    pub unresolved: u64,
    /// Dropped: too many packets waiting.
    pub overflow: u64,
    /// Dropped: no route in the VNET any more, or malformed.
    pub no_route: u64,
    /// Resolution requests (ARP / NDP) made.
    pub resolutions: u64,
}

impl PuntStats {
    pub fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("to_peer", self.to_peer),
            ("sent_after_resolve", self.sent_after_resolve),
            ("unresolved", self.unresolved),
            ("overflow", self.overflow),
            ("no_route", self.no_route),
            ("resolutions", self.resolutions),
        ]
    }
}

#[derive(Default)]
pub struct PuntServer {
    held: Vec<Held>,
    asked: BTreeMap<(u32, IpAddr), Instant>,
    raw: Option<OwnedFd>,
    pub stats: PuntStats,
}

impl PuntServer {
    /// Drains the workers' queue and sends what waited for a neighbour that
    /// is now known. `to_peer(peer, packet)` takes packets for peers.
    pub fn serve(&mut self, slow: &SlowPath, t: &Tables, nl: &mut Netlink, mut to_peer: impl FnMut(u32, &[u8])) {
        let now = Instant::now();
        for _ in 0..1024 {
            let Some(p) = slow.take_punted() else { break };
            match route(t, p.vnet, &p.packet) {
                Some((Target::Peer(peer), _)) => {
                    self.stats.to_peer += 1;
                    to_peer(peer, &p.packet);
                }
                Some((Target::Port(port), next_hop)) => {
                    let waiting = self
                        .held
                        .iter()
                        .filter(|h| h.port == port && h.next_hop == next_hop)
                        .count();
                    if self.held.len() >= MAX_HELD || waiting >= MAX_HELD_PER_NEIGHBOUR {
                        self.stats.overflow += 1;
                        continue;
                    }
                    self.held.push(Held {
                        port,
                        next_hop,
                        since: now,
                        packet: p.packet,
                    });
                }
                _ => self.stats.no_route += 1,
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
                self.stats.no_route += 1;
                continue;
            };
            if let Some(mac) = t.neigh.get(port.ifindex, h.next_hop) {
                let h = self.held.swap_remove(i);
                if self.send(port.ifindex, mac.0, port.mac.0, h.packet).is_ok() {
                    self.stats.sent_after_resolve += 1;
                } else {
                    self.stats.no_route += 1;
                }
                continue;
            }
            if now.duration_since(h.since) > HOLD_FOR {
                self.held.swap_remove(i);
                self.stats.unresolved += 1;
                continue;
            }
            let key = (port.ifindex, h.next_hop);
            if self
                .asked
                .get(&key)
                .is_none_or(|t| now.duration_since(*t) >= RESOLVE_EVERY)
            {
                self.asked.insert(key, now);
                self.stats.resolutions += 1;
                if let Err(e) = nl.resolve(port.ifindex, h.next_hop) {
                    tracing::debug!("resolving {} on {}: {e}", h.next_hop, port.name);
                }
            }
            i += 1;
        }
        self.asked.retain(|_, t| now.duration_since(*t) < HOLD_FOR);
    }

    /// Sends an IP packet in an Ethernet frame on `ifindex`, with its TTL or
    /// hop limit decremented (it is being forwarded).
    fn send(&mut self, ifindex: u32, dst: [u8; 6], src: [u8; 6], mut packet: Vec<u8>) -> std::io::Result<()> {
        let ethertype: u16 = if packet.first().is_some_and(|b| b >> 4 == 6) {
            if let Ok(mut ip) = Ipv6Packet::new_checked(&mut packet[..]) {
                ip.decrement_hop_limit();
            }
            0x86dd
        } else {
            if let Ok(mut ip) = Ipv4Packet::new_checked(&mut packet[..]) {
                ip.decrement_ttl();
            }
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

/// Where a packet of `vnet` goes: a peer, or a port and the next hop on it.
fn route(t: &Tables, vnet: VnetId, packet: &[u8]) -> Option<(Target, IpAddr)> {
    let dst = parse_inner(packet)?.dst;
    match t.fib.lookup(vnet, dst)? {
        (_, Target::Port(p)) => Some((Target::Port(p), dst)),
        (_, Target::Peer(p)) => Some((Target::Peer(p), dst)),
        (_, Target::Local) => None,
    }
}
