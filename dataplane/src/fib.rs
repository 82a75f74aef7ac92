//! The forwarding information base (FIB): per VNET, longest-prefix match
//! from a destination address to where the packet goes.
//!
//! Built by the control thread, published as an immutable snapshot, read by
//! the workers once per packet. Each VNET holds a tree bitmap per address
//! family (ip_network_table, the structure boringtun uses for AllowedIPs):
//! a lookup allocates nothing, takes no lock, and costs a few cache lines
//! whatever the number of routes. `cargo bench --bench fib` measures it
//! against the hash-per-prefix-length design it replaced (2.5x to 80x
//! slower, the gap growing with the table).

use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A routing domain (VRF). Ids are dense, starting at 0 for `default`.
pub type VnetId = u32;

/// An address as one number (IPv4 in the low 32 bits): prefixes sort and
/// compare as plain numbers.
#[inline]
pub fn addr_num(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Where a route sends a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Out of a LAN interface, by its port index in the dataplane.
    Port(u16),
    /// Into the tunnel to a WireGuard peer, by peer id.
    Peer(u32),
    /// An address of the gateway itself: the kernel handles it.
    Local,
    /// Out of a LAN interface through a router on it: the next-hop group
    /// of this id ([`Fib::group`]).
    Via(u32),
    /// Into the tunnel to one of several peers of a route group sharing
    /// the prefix with equal priority: the peer set of this id
    /// ([`Fib::peer_set`]), one peer per flow ([`Fib::peer_for`]).
    Peers(u32),
}

impl Target {
    /// Into the tunnel (one peer, or one of a set).
    #[inline]
    pub fn is_tunnel(self) -> bool {
        matches!(self, Target::Peer(_) | Target::Peers(_))
    }
}

/// The peer of a flow among a set: rendezvous hashing (the peer with the
/// highest hash of flow and peer), so that a peer leaving or joining the
/// set moves only its own flows, never another peer's.
#[inline]
pub fn rendezvous(set: &[u32], flow: u64) -> Option<u32> {
    set.iter().copied().max_by_key(|p| {
        let mut z = flow ^ (*p as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Where a route's next hops come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteSource {
    /// The kernel's routing table (the operator's `ip route`, a routing
    /// daemon), followed by netlink events.
    Kernel,
    /// A `Route =` line of a [Lan] in the config.
    Config,
}

impl RouteSource {
    pub fn name(self) -> &'static str {
        match self {
            RouteSource::Kernel => "kernel",
            RouteSource::Config => "config",
        }
    }
}

/// Routers on one LAN port that a route goes through: one next hop, or
/// several (ECMP: each flow hashed to one of them, so it stays on it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HopGroup {
    pub port: u16,
    pub hops: Vec<IpAddr>,
    pub source: RouteSource,
}

impl HopGroup {
    /// The next hop of the packet `ip` (an IPv4 or IPv6 packet): the only
    /// one, or one chosen by a hash of its flow (addresses, protocol,
    /// ports), the same for every packet of the flow.
    #[inline]
    pub fn hop_for(&self, ip: &[u8]) -> Option<IpAddr> {
        match self.hops.len() {
            0 => None,
            1 => Some(self.hops[0]),
            n => Some(self.hops[(crate::wire::ip::flow_hash(ip) % n as u64) as usize]),
        }
    }
}

/// Changes to a FIB planned against one version of it, to be applied to
/// that version ([`Fib::patch`]): peer sets to add (their ids follow the
/// existing ones), then prefixes to route to a new target or to remove
/// (None). A live change applies it to the spare copy of the published
/// FIB instead of building 100,000 routes anew.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FibPatch {
    pub sets: Vec<Vec<u32>>,
    pub routes: Vec<(VnetId, IpNet, Option<Target>)>,
}

impl FibPatch {
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty() && self.routes.is_empty()
    }
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

struct VnetFib {
    table: IpNetworkTable<Target>,
}

impl Default for VnetFib {
    fn default() -> Self {
        VnetFib {
            table: IpNetworkTable::new(),
        }
    }
}

impl Clone for VnetFib {
    fn clone(&self) -> Self {
        let mut table = IpNetworkTable::new();
        for (net, t) in self.table.iter() {
            table.insert(net, *t);
        }
        VnetFib { table }
    }
}

impl std::fmt::Debug for VnetFib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VnetFib({:?} v4/v6 prefixes)", self.table.len())
    }
}

/// The FIB of every VNET.
#[derive(Clone, Debug, Default)]
pub struct Fib {
    vnets: Vec<VnetFib>,
    routes: Vec<Route>,
    groups: Vec<HopGroup>,
    peer_sets: Vec<Vec<u32>>,
    /// The ids of `groups` and `peer_sets` by content, for building: a
    /// config with thousands of route groups finds each in one lookup.
    group_ids: std::collections::HashMap<HopGroup, u32>,
    set_ids: std::collections::HashMap<Vec<u32>, u32>,
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
        let net = IpNetwork::new(prefix.addr(), prefix.prefix_len()).expect("a truncated prefix is a valid network");
        let v = &mut self.vnets[idx];
        // One walk of the tree: insert, and put back what was there.
        if let Some(existing) = v.table.insert(net, target) {
            v.table.insert(net, existing);
            return Err(FibError::Duplicate { prefix, existing });
        }
        self.routes.push(Route { vnet, prefix, target });
        Ok(())
    }

    /// The same routes (in any order: a patched FIB lists its changes
    /// last), next-hop groups and peer sets.
    pub fn same_as(&self, other: &Fib) -> bool {
        if self.routes.len() != other.routes.len() || self.groups != other.groups || self.peer_sets != other.peer_sets {
            return false;
        }
        if self.routes == other.routes {
            return true;
        }
        let sorted = |f: &Fib| {
            let mut v: Vec<(VnetId, IpNet, Target)> = f.routes.iter().map(|r| (r.vnet, r.prefix, r.target)).collect();
            v.sort_by_key(|r| (r.0, r.1));
            v
        };
        sorted(self) == sorted(other)
    }

    /// The target of exactly this prefix (not a longest match).
    pub fn exact(&self, vnet: VnetId, prefix: IpNet) -> Option<Target> {
        let prefix = prefix.trunc();
        let net = IpNetwork::new(prefix.addr(), prefix.prefix_len()).ok()?;
        self.vnets.get(vnet as usize)?.table.exact_match(net).copied()
    }

    /// The id [`Fib::peers`] gives `set` (sorted, no duplicates) once the
    /// sets in `added` are added after the existing ones, in that order;
    /// a set neither has is pushed onto `added`. For planning a
    /// [`FibPatch`] against this FIB without changing it.
    pub fn set_id(&self, set: Vec<u32>, added: &mut Vec<Vec<u32>>) -> u32 {
        if let Some(id) = self.set_ids.get(&set) {
            return *id;
        }
        let at = match added.iter().position(|s| *s == set) {
            Some(i) => i,
            None => {
                added.push(set);
                added.len() - 1
            }
        };
        (self.peer_sets.len() + at) as u32
    }

    /// Applies `patch` (planned against a FIB equal to this one): the new
    /// peer sets get the ids the plan gave them, then each prefix is set to
    /// its new target or removed. The tree changes in place; the route
    /// list by a scan per prefix (a pass when many). Applied to two equal
    /// FIBs, it leaves them equal.
    pub fn patch(&mut self, patch: &FibPatch) {
        for set in &patch.sets {
            let _ = self.peers(set.clone());
        }
        // Prefixes that were routed before: their entries in `routes`
        // change in one pass; new ones are appended.
        let mut existing: crate::fxhash::FxMap<(VnetId, IpNet), Option<Target>> = Default::default();
        for (vnet, prefix, target) in &patch.routes {
            let prefix = prefix.trunc();
            let idx = *vnet as usize;
            if self.vnets.len() <= idx {
                self.vnets.resize_with(idx + 1, VnetFib::default);
            }
            let net =
                IpNetwork::new(prefix.addr(), prefix.prefix_len()).expect("a truncated prefix is a valid network");
            let table = &mut self.vnets[idx].table;
            let was = match target {
                Some(t) => table.insert(net, *t),
                None => table.remove(net),
            };
            match (was, target) {
                (Some(_), _) => {
                    existing.insert((*vnet, prefix), *target);
                }
                (None, Some(t)) => self.routes.push(Route {
                    vnet: *vnet,
                    prefix,
                    target: *t,
                }),
                (None, None) => {}
            }
        }
        if existing.len() <= 16 {
            // A few: a scan each costs less than hashing every route.
            for ((vnet, prefix), target) in existing {
                if let Some(i) = self.routes.iter().position(|r| r.vnet == vnet && r.prefix == prefix) {
                    match target {
                        Some(t) => self.routes[i].target = t,
                        None => {
                            self.routes.swap_remove(i);
                        }
                    }
                }
            }
        } else {
            self.routes.retain_mut(|r| match existing.get(&(r.vnet, r.prefix)) {
                Some(Some(t)) => {
                    r.target = *t;
                    true
                }
                Some(None) => false,
                None => true,
            });
        }
    }

    /// Adds a route through a LAN router (`target` a [`Target::Via`]),
    /// taking the place of a LAN route of the same prefix (a Subnet that
    /// is behind the router); a peer's or the gateway's own prefix is
    /// refused.
    pub fn insert_via(&mut self, vnet: VnetId, prefix: IpNet, target: Target) -> Result<(), FibError> {
        match self.insert(vnet, prefix, target) {
            Err(FibError::Duplicate {
                existing: Target::Port(_) | Target::Via(_),
                ..
            }) => {
                let prefix = prefix.trunc();
                let net =
                    IpNetwork::new(prefix.addr(), prefix.prefix_len()).expect("a truncated prefix is a valid network");
                self.vnets[vnet as usize].table.insert(net, target);
                if let Some(r) = self.routes.iter_mut().find(|r| r.vnet == vnet && r.prefix == prefix) {
                    r.target = target;
                }
                Ok(())
            }
            other => other,
        }
    }

    /// The longest matching prefix length and its target.
    #[inline]
    pub fn lookup_v4(&self, vnet: VnetId, dst: Ipv4Addr) -> Option<(u8, Target)> {
        let (net, t) = self.vnets.get(vnet as usize)?.table.longest_match_ipv4(dst)?;
        Some((net.netmask(), *t))
    }

    #[inline]
    pub fn lookup_v6(&self, vnet: VnetId, dst: Ipv6Addr) -> Option<(u8, Target)> {
        let (net, t) = self.vnets.get(vnet as usize)?.table.longest_match_ipv6(dst)?;
        Some((net.netmask(), *t))
    }

    pub fn lookup(&self, vnet: VnetId, dst: IpAddr) -> Option<(u8, Target)> {
        match dst {
            IpAddr::V4(a) => self.lookup_v4(vnet, a),
            IpAddr::V6(a) => self.lookup_v6(vnet, a),
        }
    }

    /// Whether `dst`, matched by a LAN route of length `len`, is that
    /// subnet's broadcast address (IPv4, prefixes up to /30: /31 and /32
    /// have no broadcast address). Routers do not forward such directed
    /// broadcasts (RFC 2644).
    #[inline]
    pub fn is_directed_broadcast(dst: IpAddr, len: u8) -> bool {
        match dst {
            IpAddr::V4(a) if len <= 30 => {
                let host = u32::MAX >> len;
                u32::from(a) & host == host
            }
            _ => false,
        }
    }

    /// Every route, in insertion order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The target for routes through `g`: an existing identical group's,
    /// or a new one.
    pub fn via(&mut self, g: HopGroup) -> Target {
        let next = self.groups.len() as u32;
        let id = *self.group_ids.entry(g.clone()).or_insert(next);
        if id == next {
            self.groups.push(g);
        }
        Target::Via(id)
    }

    /// The next-hop group of a [`Target::Via`].
    #[inline]
    pub fn groups(&self) -> &[HopGroup] {
        &self.groups
    }

    pub fn group(&self, id: u32) -> Option<&HopGroup> {
        self.groups.get(id as usize)
    }

    /// Where a LAN target sends the packet `ip` (to `dst`): its port, and
    /// the neighbour on it, the destination itself or the router of a
    /// `Via` route ([`HopGroup::hop_for`]). None for other targets.
    #[inline]
    pub fn next_hop(&self, t: Target, dst: IpAddr, ip: &[u8]) -> Option<(u16, IpAddr)> {
        match t {
            Target::Port(p) => Some((p, dst)),
            Target::Via(g) => {
                let g = self.group(g)?;
                Some((g.port, g.hop_for(ip)?))
            }
            _ => None,
        }
    }

    /// The target for routes shared by the peers `set` (sorted): an
    /// existing identical set's, or a new one.
    pub fn peers(&mut self, mut set: Vec<u32>) -> Target {
        set.sort_unstable();
        set.dedup();
        let next = self.peer_sets.len() as u32;
        let id = *self.set_ids.entry(set.clone()).or_insert(next);
        if id == next {
            self.peer_sets.push(set);
        }
        Target::Peers(id)
    }

    /// The peers of a [`Target::Peers`].
    pub fn peer_set(&self, id: u32) -> Option<&[u32]> {
        self.peer_sets.get(id as usize).map(|s| s.as_slice())
    }

    /// The peer a tunnel target sends the packet `ip` to: its peer, or the
    /// flow's peer of a set ([`rendezvous`]). None for other targets.
    #[inline]
    pub fn peer_for(&self, t: Target, ip: &[u8]) -> Option<u32> {
        match t {
            Target::Peer(p) => Some(p),
            Target::Peers(s) => rendezvous(self.peer_set(s)?, crate::wire::ip::flow_hash(ip)),
            _ => None,
        }
    }

    /// The LAN port a target leaves through, if it is a LAN's.
    #[inline]
    pub fn port_of(&self, t: Target) -> Option<u16> {
        match t {
            Target::Port(p) => Some(p),
            Target::Via(g) => self.group(g).map(|g| g.port),
            _ => None,
        }
    }
}

/// Cryptokey routing, written once: which peer's AllowedIPs own an
/// address, by longest prefix within a VNET, over peers only (LAN routes
/// play no part, as in every WireGuard). The workers check a decrypted
/// packet's source with it (published in the tables) and the WireGuard
/// device checks the packets it opens itself with its own copy.
#[derive(Clone, Debug, Default)]
pub struct AllowedIps(Fib);

impl AllowedIps {
    /// From each peer's (id, VNET, AllowedIPs). A prefix several peers
    /// list is theirs together (a route group: a packet from it may come
    /// through any of them).
    pub fn new<'a>(peers: impl IntoIterator<Item = (u32, VnetId, &'a [IpNet])>) -> AllowedIps {
        // Sorted by prefix: the owners of one prefix are a run, and
        // 100,000 prefixes cost one sort.
        let mut claims: Vec<((VnetId, IpNet), u32)> = peers
            .into_iter()
            .flat_map(|(id, vnet, nets)| nets.iter().map(move |n| ((vnet, n.trunc()), id)))
            .collect();
        claims.sort_unstable();
        let mut fib = Fib::new();
        for run in claims.chunk_by(|a, b| a.0 == b.0) {
            let ((vnet, n), _) = run[0];
            let mut ids: Vec<u32> = run.iter().map(|c| c.1).collect();
            ids.dedup();
            let t = match ids.as_slice() {
                [id] => Target::Peer(*id),
                _ => fib.peers(ids),
            };
            let _ = fib.insert(vnet, n, t);
        }
        AllowedIps(fib)
    }

    /// The peers that list exactly `prefix` in `vnet` (sorted).
    pub fn claimants(&self, vnet: VnetId, prefix: IpNet) -> Vec<u32> {
        match self.0.exact(vnet, prefix) {
            Some(Target::Peer(p)) => vec![p],
            Some(Target::Peers(s)) => self.0.peer_set(s).map(<[u32]>::to_vec).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The table of claims, for planning a [`FibPatch`] against it.
    pub fn table(&self) -> &Fib {
        &self.0
    }

    /// See [`Fib::patch`].
    pub fn patch(&mut self, patch: &FibPatch) {
        self.0.patch(patch)
    }

    /// The only peer owning `ip` in `vnet` (None as well when a route
    /// group shares it: see [`AllowedIps::allows`]).
    #[inline]
    pub fn owner(&self, vnet: VnetId, ip: IpAddr) -> Option<u32> {
        match self.0.lookup(vnet, ip)? {
            (_, Target::Peer(p)) => Some(p),
            _ => None,
        }
    }

    /// May a packet from `src` arrive through `peer`?
    #[inline]
    pub fn allows(&self, vnet: VnetId, src: IpAddr, peer: u32) -> bool {
        match self.0.lookup(vnet, src) {
            Some((_, Target::Peer(p))) => p == peer,
            Some((_, Target::Peers(s))) => self.0.peer_set(s).is_some_and(|s| s.contains(&peer)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn directed_broadcasts_are_the_all_ones_host_of_v4_subnets_up_to_30() {
        let b = |a: &str, len| Fib::is_directed_broadcast(a.parse().unwrap(), len);
        assert!(b("10.1.0.255", 24) && b("10.1.255.255", 16) && b("10.1.0.3", 30));
        assert!(!b("10.1.0.254", 24) && !b("10.1.0.1", 31) && !b("10.1.0.1", 32));
        assert!(!b("fd01::ffff:ffff:ffff:ffff", 64), "IPv6 has no broadcast");
    }

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn allowed_ips_own_sources_by_longest_prefix_per_vnet_and_a_shared_prefix_is_every_sharers() {
        let a = [net("10.1.0.0/16"), net("fd01::/48")];
        let b = [net("10.1.2.0/24")];
        let c = [net("10.1.2.0/24")];
        let allowed = AllowedIps::new([(0, 0, &a[..]), (1, 0, &b[..]), (2, 1, &a[..])]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(allowed.owner(0, ip("10.1.9.9")), Some(0));
        assert_eq!(allowed.owner(0, ip("10.1.2.9")), Some(1));
        assert_eq!(allowed.owner(0, ip("fd01::1")), Some(0));
        assert_eq!(allowed.owner(1, ip("10.1.2.9")), Some(2), "VNETs are separate");
        assert_eq!(allowed.owner(0, ip("10.2.0.1")), None);
        assert!(allowed.allows(0, ip("10.1.2.9"), 1) && !allowed.allows(0, ip("10.1.2.9"), 0));
        // A route group: both peers may send from it, no other.
        let dup = AllowedIps::new([(0, 0, &b[..]), (1, 0, &c[..]), (2, 0, &a[..])]);
        assert_eq!(dup.owner(0, ip("10.1.2.1")), None, "no single owner");
        assert!(dup.allows(0, ip("10.1.2.1"), 0) && dup.allows(0, ip("10.1.2.1"), 1));
        assert!(!dup.allows(0, ip("10.1.2.1"), 2) && dup.allows(0, ip("10.1.3.1"), 2));
    }

    #[test]
    fn a_flow_keeps_its_peer_of_a_set_and_a_peer_leaving_moves_only_its_own_flows() {
        let flows: Vec<u64> = (0..2000u64).map(|i| i.wrapping_mul(0x2545_f491_4f6c_dd1d)).collect();
        let before: Vec<u32> = flows.iter().map(|f| rendezvous(&[1, 2, 3], *f).unwrap()).collect();
        // Spread: every peer carries a fair share.
        for p in [1, 2, 3] {
            let n = before.iter().filter(|x| **x == p).count();
            assert!((500..=830).contains(&n), "peer {p} has {n} of 2000 flows");
        }
        // Peer 2 leaves: its flows move, the others' stay where they were.
        let after: Vec<u32> = flows.iter().map(|f| rendezvous(&[1, 3], *f).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 2 {
                assert_eq!(a, b, "a flow of a healthy peer moved");
            }
        }
        assert_eq!(rendezvous(&[], 7), None);
    }

    #[test]
    fn a_patched_fib_is_the_same_as_one_built_with_its_routes_in_another_order() {
        let mut a = Fib::new();
        a.insert(0, net("10.1.0.0/24"), Target::Peer(1)).unwrap();
        a.insert(0, net("10.2.0.0/24"), Target::Peer(2)).unwrap();
        let mut b = Fib::new();
        b.insert(0, net("10.1.0.0/24"), Target::Peer(1)).unwrap();
        b.insert(0, net("10.3.0.0/24"), Target::Peer(2)).unwrap();
        assert!(!a.same_as(&b));
        // 10.2 goes, 10.3 comes: appended after 10.1, as built.
        a.patch(&FibPatch {
            sets: Vec::new(),
            routes: vec![
                (0, net("10.2.0.0/24"), None),
                (0, net("10.3.0.0/24"), Some(Target::Peer(2))),
            ],
        });
        assert!(a.same_as(&b) && b.same_as(&a));
        let mut c = Fib::new();
        c.insert(0, net("10.3.0.0/24"), Target::Peer(2)).unwrap();
        c.insert(0, net("10.1.0.0/24"), Target::Peer(1)).unwrap();
        assert!(a.same_as(&c), "the order of the routes does not count");
        a.patch(&FibPatch {
            sets: Vec::new(),
            routes: vec![(0, net("10.3.0.0/24"), Some(Target::Peer(3)))],
        });
        assert!(!a.same_as(&c), "a route's target does");
        assert_eq!(a.routes().len(), 2);
        assert_eq!(a.lookup(0, "10.3.0.1".parse().unwrap()), Some((24, Target::Peer(3))));
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
        // The refused route left the first one in place.
        assert_eq!(f.lookup_v4(0, "10.0.0.5".parse().unwrap()), Some((24, Target::Port(1))));
        assert_eq!(f.routes().len(), 1);
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

    fn mask(a: u32, len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            a & (u32::MAX << (32 - len as u32))
        }
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
            let addr = mask(next() as u32, len);
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
                .filter(|(a, l, _)| mask(probe, *l) == *a)
                .max_by_key(|(_, l, _)| *l)
                .map(|(_, l, t)| (*l, *t));
            assert_eq!(f.lookup_v4(0, Ipv4Addr::from(probe)), want);
        }
    }
}
