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
use std::sync::atomic::AtomicU64;

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
