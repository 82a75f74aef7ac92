//! The forwarding information base (FIB): per VNET, longest-prefix match
//! from a destination address to where the packet goes.
//!
//! Built by the control thread, published as an immutable snapshot, read by
//! the workers once per packet. The structure is a hash table per prefix
//! length present, probed from the longest length down: a lookup costs one
//! hash probe per distinct prefix length in the VNET (usually a handful),
//! allocates nothing and takes no lock. `bench/` measures it.

use ipnet::IpNet;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A routing domain (VRF). Ids are dense, starting at 0 for `default`.
pub type VnetId = u32;

/// Where a route sends a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Out of a LAN interface, by its port index in the dataplane.
    Port(u16),
    /// Into the tunnel to a WireGuard peer, by peer id.
    Peer(u32),
    /// An address of the gateway itself: the kernel handles it.
    Local,
}

/// A route as it was inserted, for listings and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub vnet: VnetId,
    pub prefix: IpNet,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FibError {
    #[error("{prefix} is already routed in this VNET (to {existing:?})")]
    Duplicate { prefix: IpNet, existing: Target },
}

/// A small, fast, non-cryptographic hasher for integer keys (FxHash's
/// multiply-rotate). Route keys come from the operator, not the wire, so
/// flooding is not a concern.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

const FX_K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline(always)]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
}

pub type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// An address usable as an LPM key.
pub trait LpmKey: Copy + Eq + std::hash::Hash {
    const BITS: u8;
    fn masked(self, len: u8) -> Self;
}

impl LpmKey for u32 {
    const BITS: u8 = 32;
    #[inline(always)]
    fn masked(self, len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - len as u32))
        }
    }
}

impl LpmKey for u128 {
    const BITS: u8 = 128;
    #[inline(always)]
    fn masked(self, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - len as u32))
        }
    }
}

/// Longest-prefix match over one address family.
#[derive(Clone, Debug)]
pub struct Lpm<K: LpmKey> {
    /// Distinct prefix lengths, longest first, with their tables.
    levels: Vec<(u8, FxMap<K, Target>)>,
}

impl<K: LpmKey> Default for Lpm<K> {
    fn default() -> Self {
        Lpm { levels: Vec::new() }
    }
}

impl<K: LpmKey> Lpm<K> {
    fn insert(&mut self, key: K, len: u8, target: Target) -> Result<(), Target> {
        let key = key.masked(len);
        let pos = match self.levels.iter().position(|(l, _)| *l <= len) {
            Some(p) if self.levels[p].0 == len => p,
            Some(p) => {
                self.levels.insert(p, (len, FxMap::default()));
                p
            }
            None => {
                self.levels.push((len, FxMap::default()));
                self.levels.len() - 1
            }
        };
        let table = &mut self.levels[pos].1;
        if let Some(existing) = table.get(&key) {
            return Err(*existing);
        }
        table.insert(key, target);
        Ok(())
    }

    /// The longest matching prefix length and its target.
    #[inline]
    pub fn lookup(&self, addr: K) -> Option<(u8, Target)> {
        for (len, table) in &self.levels {
            if let Some(t) = table.get(&addr.masked(*len)) {
                return Some((*len, *t));
            }
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.levels.iter().all(|(_, t)| t.is_empty())
    }
}

#[derive(Clone, Debug, Default)]
struct VnetFib {
    v4: Lpm<u32>,
    v6: Lpm<u128>,
}

/// The FIB of every VNET.
#[derive(Clone, Debug, Default)]
pub struct Fib {
    vnets: Vec<VnetFib>,
    routes: Vec<Route>,
}

impl Fib {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route. Within one VNET an exact duplicate prefix is an error;
    /// overlapping prefixes are fine and resolve by longest match.
    pub fn insert(&mut self, vnet: VnetId, prefix: IpNet, target: Target) -> Result<(), FibError> {
        let prefix = prefix.trunc();
        let idx = vnet as usize;
        if self.vnets.len() <= idx {
            self.vnets.resize_with(idx + 1, VnetFib::default);
        }
        let v = &mut self.vnets[idx];
        let r = match prefix {
            IpNet::V4(n) => v.v4.insert(u32::from(n.addr()), n.prefix_len(), target),
            IpNet::V6(n) => v.v6.insert(u128::from(n.addr()), n.prefix_len(), target),
        };
        r.map_err(|existing| FibError::Duplicate { prefix, existing })?;
        self.routes.push(Route { vnet, prefix, target });
        Ok(())
    }

    #[inline]
    pub fn lookup_v4(&self, vnet: VnetId, dst: Ipv4Addr) -> Option<(u8, Target)> {
        self.vnets.get(vnet as usize)?.v4.lookup(u32::from(dst))
    }

    #[inline]
    pub fn lookup_v6(&self, vnet: VnetId, dst: Ipv6Addr) -> Option<(u8, Target)> {
        self.vnets.get(vnet as usize)?.v6.lookup(u128::from(dst))
    }

    pub fn lookup(&self, vnet: VnetId, dst: IpAddr) -> Option<(u8, Target)> {
        match dst {
            IpAddr::V4(a) => self.lookup_v4(vnet, a),
            IpAddr::V6(a) => self.lookup_v6(vnet, a),
        }
    }

    /// Every route, in insertion order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut f = Fib::new();
        f.insert(0, net("10.0.0.0/8"), Target::Port(1)).unwrap();
        f.insert(0, net("10.1.0.0/16"), Target::Port(2)).unwrap();
        f.insert(0, net("10.1.2.0/24"), Target::Peer(7)).unwrap();
        f.insert(0, net("0.0.0.0/0"), Target::Port(9)).unwrap();
        assert_eq!(f.lookup_v4(0, "10.1.2.3".parse().unwrap()), Some((24, Target::Peer(7))));
        assert_eq!(f.lookup_v4(0, "10.1.3.3".parse().unwrap()), Some((16, Target::Port(2))));
        assert_eq!(f.lookup_v4(0, "10.9.9.9".parse().unwrap()), Some((8, Target::Port(1))));
        assert_eq!(f.lookup_v4(0, "192.0.2.1".parse().unwrap()), Some((0, Target::Port(9))));
    }

    #[test]
    fn vnets_are_separate() {
        let mut f = Fib::new();
        f.insert(0, net("10.0.0.0/24"), Target::Port(1)).unwrap();
        f.insert(1, net("10.0.0.0/24"), Target::Port(2)).unwrap();
        assert_eq!(f.lookup_v4(0, "10.0.0.5".parse().unwrap()), Some((24, Target::Port(1))));
        assert_eq!(f.lookup_v4(1, "10.0.0.5".parse().unwrap()), Some((24, Target::Port(2))));
        assert_eq!(f.lookup_v4(2, "10.0.0.5".parse().unwrap()), None);
    }

    #[test]
    fn duplicate_in_one_vnet_is_refused() {
        let mut f = Fib::new();
        f.insert(0, net("10.0.0.0/24"), Target::Port(1)).unwrap();
        // Host bits are ignored: 10.0.0.7/24 is the same prefix.
        let e = f.insert(0, net("10.0.0.7/24"), Target::Port(2)).unwrap_err();
        assert_eq!(
            e,
            FibError::Duplicate {
                prefix: net("10.0.0.0/24"),
                existing: Target::Port(1)
            }
        );
    }

    #[test]
    fn ipv6_and_host_routes() {
        let mut f = Fib::new();
        f.insert(0, net("fd00::/8"), Target::Port(1)).unwrap();
        f.insert(0, net("fd02::/64"), Target::Port(2)).unwrap();
        f.insert(0, net("fd02::1/128"), Target::Local).unwrap();
        assert_eq!(f.lookup_v6(0, "fd02::1".parse().unwrap()), Some((128, Target::Local)));
        assert_eq!(f.lookup_v6(0, "fd02::2".parse().unwrap()), Some((64, Target::Port(2))));
        assert_eq!(f.lookup_v6(0, "fd99::2".parse().unwrap()), Some((8, Target::Port(1))));
        assert_eq!(f.lookup_v6(0, "2001:db8::1".parse().unwrap()), None);
        assert_eq!(f.lookup_v4(0, "10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn matches_a_naive_scan() {
        // Deterministic pseudo-random routes and probes against a linear scan.
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut f = Fib::new();
        let mut naive: Vec<(u32, u8, Target)> = Vec::new();
        for i in 0..400 {
            let len = (next() % 33) as u8;
            let addr = (next() as u32).masked(len);
            if naive.iter().any(|(a, l, _)| *a == addr && *l == len) {
                continue;
            }
            let t = Target::Peer(i);
            f.insert(0, IpNet::new(Ipv4Addr::from(addr).into(), len).unwrap(), t)
                .unwrap();
            naive.push((addr, len, t));
        }
        for _ in 0..5000 {
            let probe = next() as u32;
            let want = naive
                .iter()
                .filter(|(a, l, _)| probe.masked(*l) == *a)
                .max_by_key(|(_, l, _)| *l)
                .map(|(_, l, t)| (*l, *t));
            assert_eq!(f.lookup_v4(0, Ipv4Addr::from(probe)), want);
        }
    }
}
