//! The tunnel's send direction (kernel WireGuard's send.c): a LAN packet
//! routed to a peer becomes a WireGuard datagram on the uplink. The worker
//! groups a batch's frames by peer; each group is one [`PeerRun`]: one
//! counter reservation on the session for the whole run (one atomic add),
//! then per frame the MSS clamp, the router's hop and the seal, in place.
//! Peer counters get one add per run. Pure logic over frame buffers and a
//! table snapshot: unit-tested below without sockets.

use super::{OuterPath, TUNNEL_OVERHEAD, clamp_mss, encapsulate};
use crate::stats::{Counter, Tally};
use crate::tables::{PeerRt, Tables};
use crate::wg::session::Session;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What became of one frame of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sealed {
    /// A datagram of this many bytes, ready for the uplink.
    Datagram(usize),
    /// Too big for the tunnel: the kernel answers it (its route to the
    /// peer goes through the TUN, whose MTU is the tunnel's: it fragments,
    /// or answers "fragmentation needed" / "packet too big").
    ToKernel(Counter),
    Dropped(Counter),
}

/// A peer the fast path can send to now: a session that may send, a
/// known path to its endpoint, and the uplink's tunnel MTU. The worker
/// starts its runs from it and `route explain` asks it the same questions.
pub struct Ready<'t> {
    pub rt: &'t PeerRt,
    pub session: &'t Session,
    pub path: &'t OuterPath,
    /// Largest inner packet the tunnel carries.
    pub tunnel_mtu: u32,
    /// `SourcePorts`: ports from the path's source port on to spread the
    /// peer's flows over (1: that port alone).
    pub source_ports: u16,
}

impl<'t> Ready<'t> {
    /// None when the peer cannot be sent to from the fast path (no session
    /// that may send, no known path to its endpoint, no uplink): its
    /// packets go to the kernel, whose route sends them to the control
    /// thread (counted as `slow_no_session`), which queues them and starts
    /// a handshake.
    pub fn of(t: &'t Tables, peer: u32, now: Duration) -> Option<Ready<'t>> {
        let up = t.ports.get(t.uplink? as usize)?;
        let rt = t.peers.get(peer as usize)?;
        Some(Ready {
            rt,
            session: rt.session.as_deref().filter(|s| s.can_send(now))?,
            path: rt.path.as_ref()?,
            tunnel_mtu: up.mtu.saturating_sub(TUNNEL_OVERHEAD),
            source_ports: t.source_ports.max(1),
        })
    }

    /// The UDP port the inner packet `ip` leaves from: the listen port, or
    /// with `SourcePorts = N` one of N chosen by its flow, so that the
    /// peer's RSS spreads the tunnel over its queues while each flow stays
    /// on one (in order).
    #[inline]
    pub fn source_port(&self, ip: &[u8]) -> u16 {
        let base = self.path.src.port();
        match self.source_ports {
            0 | 1 => base,
            n => base.wrapping_add((crate::wire::ip::flow_hash(ip) % n as u64) as u16),
        }
    }

    /// Whether an inner packet of `ip_len` bytes fits the tunnel; if not,
    /// the kernel answers it (its route to the peer goes through the TUN,
    /// whose MTU is the tunnel's: it fragments, or answers "fragmentation
    /// needed" / "packet too big").
    #[inline]
    pub fn admits(&self, ip_len: usize) -> Result<(), Counter> {
        if ip_len as u32 > self.tunnel_mtu {
            Err(Counter::SlowTooBig)
        } else {
            Ok(())
        }
    }
}

/// One peer's frames in one batch, with counters reserved for all of them.
pub struct PeerRun<'t> {
    ready: Ready<'t>,
    /// The counter of the run's first frame.
    first: u64,
    packets: u64,
    bytes: u64,
}

impl<'t> PeerRun<'t> {
    /// Starts a run of `n` frames to `peer`: None when it is not
    /// [`Ready`], or its session's counters are exhausted.
    pub fn begin(t: &'t Tables, peer: u32, n: usize, now: Duration) -> Option<PeerRun<'t>> {
        let ready = Ready::of(t, peer, now)?;
        let first = ready.session.reserve(n as u64).ok()?;
        Some(PeerRun {
            ready,
            first,
            packets: 0,
            bytes: 0,
        })
    }

    /// Seals the `k`-th frame of the run: the inner packet is
    /// `buf[l3..l3 + ip_len]` and `buf` is the frame's whole capacity.
    #[inline]
    pub fn seal(&mut self, k: usize, buf: &mut [u8], l3: usize, ip_len: usize, tally: &mut Tally) -> Sealed {
        if let Err(reason) = self.ready.admits(ip_len) {
            return Sealed::ToKernel(reason);
        }
        let Some(inner) = buf.get_mut(l3..l3 + ip_len) else {
            return Sealed::Dropped(Counter::DropTooBigForTunnel);
        };
        if clamp_mss(inner, self.ready.tunnel_mtu) {
            tally.inc(Counter::MssClamped);
        }
        crate::wire::ip::decrement_ttl(inner);
        let sport = self.ready.source_port(inner);
        match encapsulate(
            buf,
            l3,
            ip_len,
            self.ready.session,
            self.first + k as u64,
            self.ready.path,
            sport,
        ) {
            Ok(n) => {
                self.packets += 1;
                self.bytes += ip_len as u64;
                tally.inc(Counter::TunnelTx);
                Sealed::Datagram(n)
            }
            // The counter is spent; the peer tolerates the gap.
            Err(_) => Sealed::Dropped(Counter::DropTooBigForTunnel),
        }
    }

    /// Adds the run's packets to the peer's counters (shared by the
    /// workers: one add per run, not per packet).
    pub fn finish(self) {
        if self.packets > 0 {
            self.ready
                .rt
                .stats
                .tx_packets
                .fetch_add(self.packets, Ordering::Relaxed);
            self.ready.rt.stats.tx_bytes.fetch_add(self.bytes, Ordering::Relaxed);
            self.ready.rt.stats.mark.set();
        }
    }
}

/// A batch's frames grouped by peer, each peer's run in turn for a
/// [`PeerRun`]: the peer, and its frames in the order they arrived (so a
/// flow's packets get rising counters and leave in order). The grouping
/// is an insertion sort by peer, in place and stable, linear when the
/// batch is already grouped (one peer, or many in rising id order).
pub fn peer_runs<T>(v: &mut [T], peer: impl Fn(&T) -> u32) -> impl Iterator<Item = (u32, &[T])> {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && peer(&v[j - 1]) > peer(&v[j]) {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
    let mut rest = &*v;
    std::iter::from_fn(move || {
        let p = peer(rest.first()?);
        let (run, after) = rest.split_at(rest.iter().take_while(|f| peer(f) == p).count());
        rest = after;
        Some((p, run))
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{self, FAR, LAN_HOST, ip_frame};
    use super::*;
    use crate::wire::{IpPacket, ip};

    #[test]
    fn a_run_reserves_once_clamps_counts_a_hop_and_seals_what_the_peer_opens() {
        let f = fixture::Fixture::new();
        let t = f.tables();
        let now = Duration::ZERO;
        let mut tally = Tally::default();
        let mut run = PeerRun::begin(&t, 0, 3, now).expect("a session and a path");
        assert_eq!(f.ours.sent(), 3, "one reservation for the whole run");
        let mut sealed = Vec::new();
        for k in 0..3 {
            let mut buf = vec![0u8; 2048];
            let len = ip_frame(&mut buf, LAN_HOST, FAR, 64, 100, k == 1);
            match run.seal(k, &mut buf, 14, len - 14, &mut tally) {
                Sealed::Datagram(n) => sealed.push((buf, n)),
                other => panic!("frame {k}: {other:?}"),
            }
        }
        run.finish();
        assert_eq!(tally.0[Counter::TunnelTx as usize], 3);
        assert_eq!(tally.0[Counter::MssClamped as usize], 1, "the SYN's MSS was lowered");
        assert_eq!(f.peer_stats().tx_packets.load(Ordering::Relaxed), 3);
        for (k, (mut buf, n)) in sealed.into_iter().enumerate() {
            let r = super::super::parse_outer(&buf[..n]).unwrap();
            assert_eq!(r.src, f.path.src);
            let counter = u64::from_le_bytes(buf[r.msg_start + 8..r.msg_start + 16].try_into().unwrap());
            assert_eq!(counter, k as u64, "consecutive counters");
            let plain = f.theirs.open(&mut buf[r.msg_start..r.msg_end], now).unwrap();
            let ip = IpPacket::new_checked(&plain[..]).unwrap();
            assert_eq!((ip.src(), ip.dst(), ip.ttl()), (LAN_HOST, FAR, 63), "one hop taken");
            if let IpPacket::V4(v4) = &ip {
                assert!(v4.verify_checksum());
            }
            if k == 1 {
                let l4 = 20;
                let mss = u16::from_be_bytes([plain[l4 + 22], plain[l4 + 23]]);
                assert_eq!(mss, 1500 - 80 - 40, "clamped to the tunnel's MTU");
            }
        }
    }

    #[test]
    fn with_source_ports_each_flow_keeps_one_port_and_flows_spread_over_them() {
        let mut f = fixture::Fixture::new();
        f.source_ports = 4;
        let t = f.tables();
        let now = Duration::ZERO;
        let mut tally = Tally::default();
        let mut run = PeerRun::begin(&t, 0, 64, now).unwrap();
        let mut port_of = std::collections::HashMap::new();
        for k in 0..64 {
            // 32 flows (UDP source ports 1000..1031), each sent twice.
            let flow = 1000 + (k % 32) as u16;
            let mut buf = vec![0u8; 2048];
            let len = ip_frame(&mut buf, LAN_HOST, FAR, 64, 100, false);
            buf[14 + 20..14 + 22].copy_from_slice(&flow.to_be_bytes());
            let Sealed::Datagram(n) = run.seal(k, &mut buf, 14, len - 14, &mut tally) else {
                panic!("frame {k} not sealed");
            };
            let r = super::super::parse_outer(&buf[..n]).unwrap();
            assert_eq!(r.src.ip(), f.path.src.ip());
            let port = r.src.port();
            assert!((51820..51824).contains(&port), "port {port} outside 51820-51823");
            assert_eq!(*port_of.entry(flow).or_insert(port), port, "flow {flow} changed port");
            assert!(f.theirs.open(&mut buf[r.msg_start..r.msg_end], now).is_ok());
        }
        run.finish();
        let used: std::collections::HashSet<_> = port_of.values().collect();
        assert_eq!(used.len(), 4, "32 flows over 4 ports use them all: {port_of:?}");
        // Without SourcePorts, the listen port alone.
        f.source_ports = 1;
        let t = f.tables();
        let ready = Ready::of(&t, 0, now).unwrap();
        let mut buf = vec![0u8; 2048];
        let len = ip_frame(&mut buf, LAN_HOST, FAR, 64, 100, false);
        assert_eq!(ready.source_port(&buf[14..len]), 51820);
    }

    #[test]
    fn too_big_goes_to_the_kernel_and_no_session_or_path_means_no_run() {
        let mut f = fixture::Fixture::new();
        let t = f.tables();
        let mut tally = Tally::default();
        let mut run = PeerRun::begin(&t, 0, 1, Duration::ZERO).unwrap();
        let mut buf = vec![0u8; 2048];
        let len = ip_frame(&mut buf, LAN_HOST, FAR, 64, 1500 - 80 - 20 - 8 + 1, false);
        assert_eq!(
            run.seal(0, &mut buf, 14, len - 14, &mut tally),
            Sealed::ToKernel(Counter::SlowTooBig)
        );
        assert!(
            ip::version(&buf[14..]).is_some(),
            "the packet is left as it was for the kernel"
        );
        assert!(PeerRun::begin(&t, 7, 1, Duration::ZERO).is_none(), "no such peer");
        f.path_known = false;
        assert!(PeerRun::begin(&f.tables(), 0, 1, Duration::ZERO).is_none(), "no path");
        f.path_known = true;
        f.session_known = false;
        assert!(
            PeerRun::begin(&f.tables(), 0, 1, Duration::ZERO).is_none(),
            "no session"
        );
        f.session_known = true;
        let expired = crate::wg::REJECT_AFTER_TIME;
        assert!(
            PeerRun::begin(&f.tables(), 0, 1, expired).is_none(),
            "an expired session"
        );
    }

    #[test]
    fn frames_are_grouped_by_peer_each_peers_in_arrival_order() {
        // The runs of a batch, concatenated: (peer, arrival).
        fn grouped(v: &mut [(u32, u32)]) -> Vec<(u32, u32)> {
            peer_runs(v, |f| f.0)
                .flat_map(|(p, run)| {
                    assert!(run.iter().all(|f| f.0 == p), "a run of one peer");
                    run.to_vec()
                })
                .collect()
        }
        // Peer 2's frames 1 and 2 must stay in that order when peer 1's
        // later frame moves in front of them.
        let mut v = [(1, 0), (2, 1), (2, 2), (1, 3), (0, 4), (2, 5)];
        assert_eq!(grouped(&mut v), [(0, 4), (1, 0), (1, 3), (2, 1), (2, 2), (2, 5)]);
        assert_eq!(peer_runs(&mut v, |f| f.0).count(), 3, "a run per peer");
        // Already grouped: unchanged.
        let mut one = [(7, 0), (7, 1), (7, 2)];
        assert_eq!(grouped(&mut one), [(7, 0), (7, 1), (7, 2)]);
        assert!(grouped(&mut []).is_empty());
    }
}
