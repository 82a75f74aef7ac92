//! The read-mostly state the workers use: FIB, neighbours and ports. The
//! control thread builds a new [`Tables`] and publishes it whole; a worker
//! loads the current one once per batch (RCU style, no lock).

use crate::fib::{Fib, VnetId};
use crate::fxhash::FxMap;
use crate::wire::MacAddr;
use arc_swap::ArcSwap;
use std::net::IpAddr;
use std::sync::Arc;

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

/// One published snapshot.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub fib: Fib,
    pub neigh: NeighTable,
    pub ports: Vec<Port>,
}

/// The publication point shared by the control thread and the workers.
pub type SharedTables = Arc<ArcSwap<Tables>>;

pub fn shared(t: Tables) -> SharedTables {
    Arc::new(ArcSwap::from_pointee(t))
}
