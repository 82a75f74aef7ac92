//! The read-mostly state the workers use: FIB, neighbours and ports. The
//! control thread builds a new [`Tables`] and publishes it whole; a worker
//! loads the current one once per batch (RCU style, no lock).

use crate::fib::{Fib, VnetId};
use crate::fxhash::FxMap;
use crate::tunnel::OuterPath;
use crate::wg::session::Session;
use crate::wire::MacAddr;
use arc_swap::ArcSwap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A LAN interface the dataplane sends and receives on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub ifindex: u32,
    pub mac: MacAddr,
    pub vnet: VnetId,
    pub mtu: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct NeighKey {
    ifindex: u32,
    ip: u128,
}

#[inline(always)]
fn ip_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Mirror of the kernel's neighbour table: (interface, IP) -> MAC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NeighTable {
    map: FxMap<NeighKey, MacAddr>,
}

impl NeighTable {
    pub fn insert(&mut self, ifindex: u32, ip: IpAddr, mac: MacAddr) {
        self.map.insert(
            NeighKey {
                ifindex,
                ip: ip_key(ip),
            },
            mac,
        );
    }
    /// Forgets an entry; returns whether there was one.
    pub fn remove(&mut self, ifindex: u32, ip: IpAddr) -> bool {
        self.map
            .remove(&NeighKey {
                ifindex,
                ip: ip_key(ip),
            })
            .is_some()
    }
    #[inline]
    pub fn get(&self, ifindex: u32, ip: IpAddr) -> Option<MacAddr> {
        self.map
            .get(&NeighKey {
                ifindex,
                ip: ip_key(ip),
            })
            .copied()
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Peers per [`MarkChunk`].
const PEERS_PER_CHUNK: usize = 64 * 64;

/// One bit per peer: set by the workers when they carry the peer's
/// traffic, taken by the control thread ([`TrafficMarks::drain`]), so that
/// a round looks at the peers that moved, not at every peer.
#[derive(Debug)]
pub struct MarkChunk([AtomicU64; 64]);

impl Default for MarkChunk {
    fn default() -> Self {
        MarkChunk(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// A peer's bit in its chunk. Chunks never move, so a peer's stats keep
/// theirs however many peers come after it.
#[derive(Debug, Clone)]
pub struct PeerMark {
    chunk: Arc<MarkChunk>,
    word: usize,
    bit: u64,
}

impl Default for PeerMark {
    /// A bit nobody reads (a slot no peer holds, tests).
    fn default() -> Self {
        static NOBODY: std::sync::LazyLock<Arc<MarkChunk>> = std::sync::LazyLock::new(Arc::default);
        PeerMark {
            chunk: Arc::clone(&NOBODY),
            word: 0,
            bit: 1,
        }
    }
}

impl PeerMark {
    /// Once per batch and peer: a load, and a write only when the bit is
    /// clear (the control thread clears it at most once a round), so the
    /// line stays shared between the workers.
    #[inline]
    pub fn set(&self) {
        let w = &self.chunk.0[self.word];
        if w.load(Ordering::Relaxed) & self.bit == 0 {
            w.fetch_or(self.bit, Ordering::Release);
        }
    }
}

/// The chunks of bits of every peer id (the control thread's side).
#[derive(Debug, Default)]
pub struct TrafficMarks {
    chunks: Vec<Arc<MarkChunk>>,
}

impl TrafficMarks {
    /// The bit of peer `id` (chunks are added as ids grow).
    pub fn mark_of(&mut self, id: u32) -> PeerMark {
        let c = id as usize / PEERS_PER_CHUNK;
        while self.chunks.len() <= c {
            self.chunks.push(Arc::default());
        }
        let in_chunk = id as usize % PEERS_PER_CHUNK;
        PeerMark {
            chunk: Arc::clone(&self.chunks[c]),
            word: in_chunk / 64,
            bit: 1 << (in_chunk % 64),
        }
    }

    /// Calls `f` with every marked peer id and clears the marks: 64 ids a
    /// word, so 10,000 peers are 157 loads. A worker's counters added
    /// before it found its bit already set may be seen a round later (the
    /// caller looks at last round's peers once more).
    pub fn drain(&self, mut f: impl FnMut(u32)) {
        for (c, chunk) in self.chunks.iter().enumerate() {
            for (w, word) in chunk.0.iter().enumerate() {
                if word.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let mut v = word.swap(0, Ordering::Acquire);
                while v != 0 {
                    f((c * PEERS_PER_CHUNK + w * 64 + v.trailing_zeros() as usize) as u32);
                    v &= v - 1;
                }
            }
        }
    }
}

/// Per-peer traffic counters, shared by the workers (one atomic add per
/// peer per batch) and kept across table publications.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_keepalives: AtomicU64,
    /// The latest authenticated source of the peer's datagrams when it is
    /// not the published endpoint (IPv4 packed as 1<<63 | addr<<16 | port;
    /// 0: none). The control thread follows the peer there (roaming).
    pub roamed_v4: AtomicU64,
    /// A datagram came from the published endpoint since the control
    /// thread last looked: a peer that spreads its source ports
    /// (`SourcePorts`) is followed to another port only when its current
    /// one has gone quiet.
    pub at_endpoint: std::sync::atomic::AtomicBool,
    /// Set with every change above.
    pub mark: PeerMark,
}

impl PeerStats {
    /// Packs an IPv4 endpoint for `roamed_v4`.
    pub fn pack_v4(a: std::net::SocketAddrV4) -> u64 {
        1 << 63 | (u32::from(*a.ip()) as u64) << 16 | a.port() as u64
    }

    pub fn unpack_v4(v: u64) -> Option<std::net::SocketAddrV4> {
        (v >> 63 == 1).then(|| std::net::SocketAddrV4::new(((v >> 16) as u32).into(), v as u16))
    }
}

/// What the workers know about a WireGuard peer.
#[derive(Clone)]
pub struct PeerRt {
    pub vnet: VnetId,
    /// The session to send on (current, or a next one the peer confirmed).
    pub session: Option<Arc<Session>>,
    /// How to reach the peer's endpoint on the uplink; None until the
    /// endpoint and its next hop are known (the kernel path sends then).
    pub path: Option<OuterPath>,
    pub stats: Arc<PeerStats>,
}

impl std::fmt::Debug for PeerRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerRt")
            .field("vnet", &self.vnet)
            .field("session", &self.session.as_ref().map(|s| s.local_index))
            .field("path", &self.path)
            .finish()
    }
}

/// One published snapshot.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub fib: Arc<Fib>,
    /// Cryptokey routing: the peers' AllowedIPs only.
    pub allowed: Arc<crate::fib::AllowedIps>,
    pub neigh: NeighTable,
    pub ports: Vec<Port>,
    /// WireGuard peers, by peer id.
    pub peers: Vec<PeerRt>,
    /// Sessions by our receiver index.
    pub sessions: FxMap<u32, Arc<Session>>,
    /// The port WireGuard datagrams leave from and arrive on.
    pub uplink: Option<u16>,
    /// Our WireGuard listen port (0: none).
    pub listen_port: u16,
    /// Ports from `listen_port` on that the tunnel sends from and receives
    /// on (`SourcePorts`; at least 1).
    pub source_ports: u16,
    /// The uplink's own addresses: WireGuard is what is sent to them.
    pub uplink_addrs: Vec<IpAddr>,
    /// [Policy]: each VNET's rules and the flow table.
    pub policies: crate::policy::Policies,
}

/// The publication point shared by the control thread and the workers.
pub type SharedTables = Arc<ArcSwap<Tables>>;

pub fn shared(t: Tables) -> SharedTables {
    Arc::new(ArcSwap::from_pointee(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_peers_are_drained_once_across_chunks() {
        let mut m = TrafficMarks::default();
        let ids = [0u32, 63, 64, 4095, 4096, 10_000];
        let marks: Vec<PeerMark> = ids.iter().map(|id| m.mark_of(*id)).collect();
        for k in &marks {
            k.set();
            k.set();
        }
        let mut got = Vec::new();
        m.drain(|id| got.push(id));
        assert_eq!(got, ids);
        let mut again = Vec::new();
        m.drain(|id| again.push(id));
        assert!(again.is_empty(), "{again:?}");
        // A slot no peer holds marks nothing anybody reads.
        PeerMark::default().set();
        m.drain(|id| again.push(id));
        assert!(again.is_empty());
    }
}
