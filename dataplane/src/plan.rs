//! Pure planning, shared by start, live changes and the route questions:
//! the FIB from the config (LAN subnets, peers' AllowedIPs, the gateway's
//! own addresses), the workers' view of the peers, how the XDP program
//! steers each route, and the fail-safe table as far as the file tells.

use crate::config::{DataplaneConfig, LanConfig, PeerRoutes, RouteChanges, UPLINK_VNET};
use crate::error::{Error, Result};
use crate::failsafe;
use crate::fib::{Fib, Target, VnetId};
use crate::host::tun_name;
use crate::netlink::Netlink;
use crate::tables::{self, Port};
use ipnet::IpNet;
use std::sync::Arc;
use subway_common::{STEER_LOCAL, STEER_REDIRECT, Steer};

/// The prefixes that something other than a peer routes, or would if no
/// peer listed them: LAN subnets, the gateway's own addresses, configured
/// `Route`s and the kernel's routes through LAN routers. A live change
/// whose peers touch none of them can be patched in ([`peer_patch`]);
/// one that does is built anew, where the precedence between them lives.
pub(crate) type FixedKeys = std::collections::HashSet<(VnetId, IpNet)>;

/// The FIB for these LANs (their Subnets, or the prefixes of their
/// addresses) and peers, with the gateway's own addresses as local routes;
/// and the prefixes not the peers' ([`FixedKeys`]).
pub(crate) fn build_fib(
    netlink: &mut Netlink,
    lans: &[LanConfig],
    ports: &[Port],
    peers: &[PeerRoutes],
) -> Result<(Fib, FixedKeys)> {
    let mut subnets_of = Vec::new();
    let mut locals = Vec::new();
    for (i, lan) in lans.iter().enumerate() {
        let port = ports
            .get(i)
            .ok_or_else(|| Error::config(format!("{} has no port", lan.ifname)))?;
        let addrs = netlink
            .addresses(port.ifindex)
            .map_err(|e| Error::io(format!("addresses of {}", lan.ifname), e))?;
        let subnets: Vec<IpNet> = if lan.subnets.is_empty() {
            addrs.iter().map(|a| a.trunc()).collect()
        } else {
            lan.subnets.clone()
        };
        if subnets.is_empty() {
            return Err(Error::config(format!(
                "{} has no address and no Subnets: give it an address or list the subnets behind it",
                lan.ifname
            )));
        }
        subnets_of.push((lan.ifname.clone(), lan.vnet, subnets));
        for a in addrs {
            locals.push((lan.vnet, IpNet::from(a.addr())));
        }
    }
    let mut fib = fib_from(&subnets_of, &locals, peers)?;
    let default_lans: Vec<u32> = lans
        .iter()
        .zip(ports)
        .filter(|(l, _)| l.vnet == 0)
        .map(|(_, p)| p.ifindex)
        .collect();
    let kernel = netlink
        .gateway_routes(&default_lans)
        .map_err(|e| Error::io("dumping the kernel's routes", e))?;
    add_vias(&mut fib, lans, ports, &subnets_of, &kernel)?;
    let fixed = subnets_of
        .iter()
        .flat_map(|(_, vnet, nets)| nets.iter().map(move |n| (*vnet, n.trunc())))
        .chain(locals.iter().map(|(v, n)| (*v, n.trunc())))
        .chain(
            lans.iter()
                .flat_map(|l| l.routes.iter().map(move |r| (l.vnet, r.prefix.trunc()))),
        )
        .chain(kernel.iter().map(|r| (0, r.prefix.trunc())))
        .collect();
    Ok((fib, fixed))
}

/// The default VNET's LAN prefixes in `fib`: those it sends out of a LAN
/// port, directly or through a router (a kernel route followed inside a
/// subnet takes the subnet's place when it is the same prefix). The
/// kernel's routes inside them are followed ([`add_vias`]), so their
/// events matter to the FIB.
pub(crate) fn default_lan_subnets(fib: &Fib) -> Vec<IpNet> {
    fib.routes()
        .iter()
        .filter(|r| r.vnet == 0 && matches!(r.target, Target::Port(_) | Target::Via(_)))
        .map(|r| r.prefix)
        .collect()
}

/// Routes through LAN routers: each [Lan]'s `Route =` lines, and in the
/// default VNET the kernel's routes through a router on a [Lan] whose
/// prefix lies inside that LAN's Subnets (the Subnets say what subway
/// steers; the rest stays the kernel's). A configured route that cannot be
/// added is refused; a kernel route that clashes with a peer's prefix is
/// left to the kernel, with a warning.
pub fn add_vias(
    fib: &mut Fib,
    lans: &[LanConfig],
    ports: &[Port],
    subnets_of: &[(String, VnetId, Vec<IpNet>)],
    kernel: &[crate::netlink::GatewayRoute],
) -> Result<()> {
    use crate::fib::{HopGroup, RouteSource};
    for (i, lan) in lans.iter().enumerate() {
        for r in &lan.routes {
            let t = fib.via(HopGroup {
                port: i as u16,
                hops: r.hops.clone(),
                source: RouteSource::Config,
            });
            fib.insert_via(lan.vnet, r.prefix, t)
                .map_err(|e| Error::config(format!("{}: Route {}: {e}", lan.ifname, r.prefix)))?;
        }
    }
    // The default VNET's configured routes are in the kernel too: theirs
    // is the config's answer.
    let configured = default_vnet_routes(lans);
    for r in kernel
        .iter()
        .filter(|r| !configured.iter().any(|c| c.0.trunc() == r.prefix))
    {
        let Some(i) = (0..lans.len()).find(|i| {
            lans[*i].vnet == 0
                && ports
                    .get(*i)
                    .is_some_and(|p| r.hops.iter().all(|(oif, _)| *oif == p.ifindex))
        }) else {
            continue;
        };
        if !subnets_of
            .get(i)
            .is_some_and(|s| s.2.iter().any(|s| s.contains(&r.prefix)))
        {
            continue;
        }
        let t = fib.via(HopGroup {
            port: i as u16,
            hops: r.hops.iter().map(|h| h.1).collect(),
            source: RouteSource::Kernel,
        });
        if let Err(e) = fib.insert_via(0, r.prefix, t) {
            tracing::warn!(
                "the kernel's route {} through a router on {} is not followed: {e}",
                r.prefix,
                lans[i].ifname
            );
        }
    }
    Ok(())
}

/// The default VNET's configured `Route`s, as the kernel's routes
/// ([`crate::host::KernelUndo::lan_routes_add`]).
pub(crate) fn default_vnet_routes(lans: &[LanConfig]) -> Vec<crate::host::LanRoute> {
    lans.iter()
        .filter(|l| l.vnet == 0)
        .flat_map(|l| l.routes.iter().map(|r| (r.prefix, l.ifname.clone(), r.hops.clone())))
        .collect()
}

/// The FIB from each LAN's (name, VNET, subnets), the gateway's own
/// addresses and the peers' AllowedIPs: what a running instance builds,
/// without asking the kernel (the route queries' tests use it too).
pub fn fib_from(
    lans: &[(String, VnetId, Vec<IpNet>)],
    locals: &[(VnetId, IpNet)],
    peers: &[PeerRoutes],
) -> Result<Fib> {
    let mut fib = Fib::new();
    for (i, (name, vnet, subnets)) in lans.iter().enumerate() {
        for s in subnets {
            fib.insert(*vnet, *s, Target::Port(i as u16))
                .map_err(|e| Error::config(format!("{name}: {e}")))?;
        }
    }
    // Claims sorted by prefix (then by the peers' order): a group is a run
    // of equal prefixes, and 100,000 prefixes cost one sort.
    let mut claims: Vec<((VnetId, IpNet), usize)> = peers
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.allowed_ips.iter().map(move |net| ((p.vnet, net.trunc()), i)))
        .collect();
    claims.sort_unstable();
    for run in claims.chunk_by(|a, b| a.0 == b.0) {
        let (vnet, net) = run[0].0;
        let group: Vec<&PeerRoutes> = run.iter().map(|c| &peers[c.1]).collect();
        let target = match carriers(&group) {
            Carriers::One(id) => Target::Peer(id),
            Carriers::Set(set) => fib.peers(set),
        };
        fib.insert(vnet, net, target)
            .map_err(|e| Error::config(format!("peer AllowedIPs {net}: {e}")))?;
    }
    for (vnet, host) in locals {
        // Two interfaces with one address is odd but harmless.
        let _ = fib.insert(*vnet, *host, Target::Local);
    }
    Ok(fib)
}

/// Who carries a prefix that `group` (one or more peers) lists.
enum Carriers {
    One(u32),
    Set(Vec<u32>),
}

/// A prefix of one peer routes to it; one several peers list (a route
/// group) to the healthy ones of the highest priority (all of them if
/// none is healthy), shared by flow if there are several.
fn carriers(group: &[&PeerRoutes]) -> Carriers {
    if let [p] = group {
        return Carriers::One(p.id);
    }
    let up: Vec<&&PeerRoutes> = group.iter().filter(|p| p.up).collect();
    let live = if up.is_empty() { group.iter().collect() } else { up };
    let best = live.iter().map(|p| p.priority.unwrap_or(0)).max().unwrap_or(0);
    let mut chosen: Vec<u32> = live
        .iter()
        .filter(|p| p.priority.unwrap_or(0) == best)
        .map(|p| p.id)
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    match chosen.as_slice() {
        [id] => Carriers::One(*id),
        _ => Carriers::Set(chosen),
    }
}

/// A live change of peers planned as patches to the running FIB and
/// AllowedIPs ([`peer_patch`]), with what it changes.
#[derive(Debug, Default)]
pub(crate) struct PeerPatch {
    pub fib: crate::fib::FibPatch,
    pub allowed: crate::fib::FibPatch,
    pub diff: RouteDiff,
    /// Routes added and removed per family (IPv4, IPv6), for the capacity.
    pub added: [usize; 2],
    pub removed: [usize; 2],
}

/// A change from the peers `old` to `new` (same ids: same peer) as
/// patches to the running `fib` and `allowed`, touching only the prefixes
/// the changed peers list or listed: one peer among 10,000 costs its own
/// prefixes, not 100,000. None when it cannot be patched and must be
/// built anew: a prefix of `fixed` is touched (the precedence between a
/// peer and a LAN, a router or the gateway's own address lives in
/// [`build_fib`]), or so much changed that a build is as cheap. The
/// result equals what [`build_fib`] and [`allowed_ips`] would build,
/// except for peer set ids (kept stable instead of renumbered).
pub(crate) fn peer_patch(
    fib: &Fib,
    allowed: &crate::fib::AllowedIps,
    old: &[PeerRoutes],
    new: &[PeerRoutes],
    fixed: &FixedKeys,
) -> Option<PeerPatch> {
    use crate::fxhash::{FxMap as HashMap, FxSet as HashSet};
    type Key = (VnetId, IpNet);
    let by_id = |v: &[PeerRoutes]| -> HashMap<u32, usize> { v.iter().enumerate().map(|(i, p)| (p.id, i)).collect() };
    let (old_ids, new_ids) = (by_id(old), by_id(new));
    let claims = |p: &PeerRoutes| p.allowed_ips.iter().map(|n| (p.vnet, n.trunc())).collect::<Vec<Key>>();
    let mut changed: HashSet<u32> = HashSet::default();
    let mut keys: Vec<Key> = Vec::new();
    // The changed peers' new claims, by prefix.
    let mut listed: HashMap<Key, Vec<u32>> = HashMap::default();
    for p in old {
        if new_ids.get(&p.id).is_none_or(|i| new[*i] != *p) {
            changed.insert(p.id);
            keys.extend(claims(p));
        }
    }
    for p in new {
        if old_ids.get(&p.id).is_none_or(|i| old[*i] != *p) {
            changed.insert(p.id);
            for k in claims(p) {
                keys.push(k);
                listed.entry(k).or_default().push(p.id);
            }
        }
    }
    let total: usize = new.iter().map(|p| p.allowed_ips.len()).sum();
    if keys.len() > 1024.max(total / 8) {
        return None;
    }
    keys.sort_unstable();
    keys.dedup();
    let mut out = PeerPatch::default();
    let family = |k: &Key| k.1.addr().is_ipv6() as usize;
    for k in keys {
        if fixed.contains(&k) {
            return None;
        }
        let was = fib.exact(k.0, k.1);
        if was.is_some_and(|t| !t.is_tunnel()) {
            return None;
        }
        let mut claimants: Vec<u32> = allowed.claimants(k.0, k.1);
        claimants.retain(|id| !changed.contains(id));
        claimants.extend(listed.get(&k).into_iter().flatten());
        claimants.sort_unstable();
        claimants.dedup();
        let claim = match claimants.as_slice() {
            [] => None,
            [id] => Some(Target::Peer(*id)),
            _ => Some(Target::Peers(
                allowed.table().set_id(claimants.clone(), &mut out.allowed.sets),
            )),
        };
        if claim != allowed.table().exact(k.0, k.1) {
            out.allowed.routes.push((k.0, k.1, claim));
        }
        let group: Vec<&PeerRoutes> = claimants
            .iter()
            .filter_map(|id| new_ids.get(id).map(|i| &new[*i]))
            .collect();
        let now = match group.is_empty() {
            true => None,
            false => Some(match carriers(&group) {
                Carriers::One(id) => Target::Peer(id),
                Carriers::Set(set) => Target::Peers(fib.set_id(set, &mut out.fib.sets)),
            }),
        };
        if now == was {
            continue;
        }
        out.fib.routes.push((k.0, k.1, now));
        let d = &mut out.diff;
        match (was, now) {
            (None, Some(t)) => {
                d.changes.added.push(k);
                d.steer.push(SteerStep {
                    key: k,
                    target: t,
                    old: None,
                });
                if k.0 == 0 {
                    d.tun_add.push(k.1);
                }
                out.added[family(&k)] += 1;
            }
            (Some(o), Some(t)) => {
                d.changes.retargeted.push(k);
                d.steer.push(SteerStep {
                    key: k,
                    target: t,
                    old: Some(o),
                });
            }
            (Some(_), None) => {
                d.changes.removed.push(k);
                d.unsteer.push(k);
                if k.0 == 0 {
                    d.tun_del.push(k.1);
                }
                out.removed[family(&k)] += 1;
            }
            (None, None) => {}
        }
    }
    Some(out)
}

/// Cryptokey routing's table for the workers: the peers' AllowedIPs.
pub fn allowed_ips(peers: &[PeerRoutes]) -> crate::fib::AllowedIps {
    crate::fib::AllowedIps::new(peers.iter().map(|p| (p.id, p.vnet, &p.allowed_ips[..])))
}

/// The fail-safe table for `cfg` as far as the config alone tells (at
/// boot, before subway starts: `subway fence`). LANs without `Subnets`
/// contribute no holes, so a LAN prefix inside a peer's prefix is refused
/// too until subway starts and reads the interface's addresses: closed,
/// never open. `subway run` replaces it with the exact table.
pub fn fence_for_config(cfg: &DataplaneConfig) -> Result<failsafe::Fence> {
    let lans: Vec<(String, VnetId, Vec<IpNet>)> = cfg
        .lans
        .iter()
        .map(|l| (l.ifname.clone(), l.vnet, l.subnets.clone()))
        .collect();
    let fib = fib_from(&lans, &[], &cfg.peers)?;
    Ok(failsafe::Fence {
        table: failsafe::table_name(&cfg.name),
        tun: tun_name(&cfg.name),
        listen_port: cfg.listen_port,
        tunnelled: failsafe::tunnelled(fib.routes()),
        vnet_ifaces: cfg
            .lans
            .iter()
            .filter(|l| l.vnet != 0 && l.vnet != UPLINK_VNET)
            .map(|l| l.ifname.clone())
            .collect(),
        vnet_only_addrs: Vec::new(),
    })
}

/// The workers' view of the peers, indexed by id: what `old` knew about
/// peers that stay (sessions, paths, counters), fresh entries for `fresh`
/// ids and new ones, empty entries for ids no peer holds.
pub(crate) fn peer_rts(
    old: &[tables::PeerRt],
    peers: &[PeerRoutes],
    fresh: &[u32],
    marks: &mut tables::TrafficMarks,
) -> Vec<tables::PeerRt> {
    let len = peers
        .iter()
        .map(|p| p.id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(old.len());
    let mut v: Vec<tables::PeerRt> = (0..len)
        .map(|_| tables::PeerRt {
            vnet: 0,
            session: None,
            path: None,
            stats: Arc::default(),
        })
        .collect();
    // (A set: a reload may add thousands of peers.)
    let fresh: std::collections::HashSet<u32> = fresh.iter().copied().collect();
    for p in peers {
        let slot = &mut v[p.id as usize];
        match old.get(p.id as usize).filter(|_| !fresh.contains(&p.id)) {
            Some(o) => *slot = o.clone(),
            None => {
                slot.stats = Arc::new(tables::PeerStats {
                    mark: marks.mark_of(p.id),
                    ..Default::default()
                })
            }
        }
        slot.vnet = p.vnet;
    }
    v
}

/// How the XDP program steers a route's packets.
pub(crate) fn steer(target: Target, ports: &[Port], fib: &Fib) -> Steer {
    match target {
        Target::Port(_) | Target::Via(_) => Steer {
            action: STEER_REDIRECT,
            egress_ifindex: fib
                .port_of(target)
                .and_then(|p| ports.get(p as usize))
                .map_or(0, |p| p.ifindex),
        },
        Target::Peer(_) | Target::Peers(_) => Steer {
            action: STEER_REDIRECT,
            egress_ifindex: 0,
        },
        Target::Local => Steer {
            action: STEER_LOCAL,
            egress_ifindex: 0,
        },
    }
}

/// One steering entry a live change writes before the switch: the route's
/// new target, and the old one it replaces (None: the route is new).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteerStep {
    pub key: (VnetId, IpNet),
    pub target: Target,
    pub old: Option<Target>,
}

/// What a live change does to the kernel and the XDP program, worked out
/// from the old and new FIB alone (pure: unit-tested below). Before the
/// switch: steer what is new or retargeted ([`RouteDiff::steer`]) and
/// point the kernel's routes of prefixes that become a default-VNET peer's
/// at the TUN ([`RouteDiff::tun_add`]); if one of those fails, undo with
/// [`RouteDiff::rollback`]. After the switch (nothing may fail then):
/// remove the steering of what is gone ([`RouteDiff::unsteer`]) and take
/// the prefixes that stopped being a default-VNET peer's off the TUN
/// ([`RouteDiff::tun_del`]). Unchanged routes are never touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    pub changes: RouteChanges,
    pub steer: Vec<SteerStep>,
    pub tun_add: Vec<IpNet>,
    pub unsteer: Vec<(VnetId, IpNet)>,
    pub tun_del: Vec<IpNet>,
}

impl RouteDiff {
    pub fn between(old: &Fib, new: &Fib) -> RouteDiff {
        // A route through LAN routers compares as its port: what the XDP
        // program and the kernel see (the routers are the workers' business,
        // published with the new FIB); new routers only count as a change.
        type Entry = ((VnetId, IpNet), (Target, Target));
        let sorted = |f: &Fib| -> Vec<Entry> {
            let mut v: Vec<Entry> = f
                .routes()
                .iter()
                .map(|r| {
                    let seen = match r.target {
                        Target::Via(_) => Target::Port(f.port_of(r.target).unwrap_or(u16::MAX)),
                        t => t,
                    };
                    ((r.vnet, r.prefix), (seen, r.target))
                })
                .collect();
            v.sort_unstable_by_key(|e| e.0);
            v
        };
        fn routers(f: &Fib, t: Target) -> Option<&[std::net::IpAddr]> {
            match t {
                Target::Via(g) => f.group(g).map(|g| g.hops.as_slice()),
                _ => None,
            }
        }
        let (old_fib, new_fib) = (old, new);
        let (old, new) = (sorted(old), sorted(new));
        // The kernel routes only the default VNET, and only its peer
        // prefixes go to the TUN.
        let tunnelled = |k: &(VnetId, IpNet), t: Option<&Target>| k.0 == 0 && t.is_some_and(|t| t.is_tunnel());
        let mut d = RouteDiff::default();
        // One walk over both in key order (each list comes out sorted):
        // 100,000 routes cost two sorts, not 200,000 tree lookups.
        let (mut i, mut j) = (0, 0);
        loop {
            let (was, now) = match (old.get(i), new.get(j)) {
                (None, None) => break,
                (Some(o), Some(n)) if o.0 == n.0 => (Some(o), Some(n)),
                (Some(o), Some(n)) if o.0 < n.0 => (Some(o), None),
                (Some(o), None) => (Some(o), None),
                (_, Some(n)) => (None, Some(n)),
            };
            i += was.is_some() as usize;
            j += now.is_some() as usize;
            let k = &was.or(now).expect("one side has the key").0;
            let was_seen = was.map(|w| &w.1.0);
            let now_seen = now.map(|n| &n.1.0);
            if let Some((_, (seen, t))) = now {
                let changed = match was {
                    None => {
                        d.changes.added.push(*k);
                        true
                    }
                    Some((_, (o, _))) if o != seen => {
                        d.changes.retargeted.push(*k);
                        true
                    }
                    Some((_, (_, o))) => {
                        if routers(old_fib, *o) != routers(new_fib, *t) {
                            d.changes.retargeted.push(*k);
                        }
                        false
                    }
                };
                if changed {
                    d.steer.push(SteerStep {
                        key: *k,
                        target: *t,
                        old: was.map(|w| w.1.1),
                    });
                    if tunnelled(k, now_seen) && !tunnelled(k, was_seen) {
                        d.tun_add.push(k.1);
                    }
                }
            }
            if was.is_some() {
                if now.is_none() {
                    d.changes.removed.push(*k);
                    d.unsteer.push(*k);
                }
                if tunnelled(k, was_seen) && !tunnelled(k, now_seen) {
                    d.tun_del.push(k.1);
                }
            }
        }
        d
    }

    /// How to undo the first `done` steering writes, last first: each key
    /// back to its old target, or removed if it was new.
    pub fn rollback(&self, done: usize) -> impl Iterator<Item = ((VnetId, IpNet), Option<Target>)> + '_ {
        self.steer[..done.min(self.steer.len())]
            .iter()
            .rev()
            .map(|s| (s.key, s.old))
    }
}

/// Refuses a FIB the XDP program's tables cannot hold.
pub(crate) fn check_capacity(fib: &Fib) -> Result<()> {
    let per_family = |v4: bool| fib.routes().iter().filter(|r| r.prefix.addr().is_ipv4() == v4).count();
    capacity(per_family(true), per_family(false))
}

/// Refuses more IPv4 or IPv6 routes than the XDP program's tables hold.
pub(crate) fn capacity(v4: usize, v6: usize) -> Result<()> {
    if v4.max(v6) > subway_common::MAX_ROUTES as usize {
        return Err(Error::config(format!(
            "more than {} routes of one family: the XDP program's tables hold no more",
            subway_common::MAX_ROUTES
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn fib(routes: &[(VnetId, &str, Target)]) -> Fib {
        let mut f = Fib::new();
        for (v, p, t) in routes {
            f.insert(*v, p.parse().unwrap(), *t).unwrap();
        }
        f
    }

    fn k(v: VnetId, p: &str) -> (VnetId, IpNet) {
        (v, p.parse().unwrap())
    }

    const LAN: Target = Target::Port(0);
    const P1: Target = Target::Peer(1);
    const P2: Target = Target::Peer(2);

    fn old() -> Fib {
        fib(&[
            (0, "10.1.0.0/24", LAN),
            (0, "10.2.0.0/24", P1),
            (0, "10.3.0.0/24", P1),
            (0, "10.4.0.0/24", P1),
            (2, "10.2.0.0/24", P1),
        ])
    }

    fn new() -> Fib {
        fib(&[
            (0, "10.1.0.0/24", LAN), // unchanged
            (0, "10.2.0.0/24", P2),  // peer to peer: stays on the TUN
            (0, "10.4.0.0/24", LAN), // peer to LAN: leaves the TUN
            (0, "10.5.0.0/24", P2),  // new peer prefix: onto the TUN
            (2, "10.6.0.0/24", P2),  // new, non-default VNET: never the kernel's
                                     // 10.3.0.0/24 and VNET 2's 10.2.0.0/24 are gone
        ])
    }

    #[test]
    fn the_diff_classifies_every_route_and_touches_the_kernel_for_the_default_vnet_only() {
        let d = RouteDiff::between(&old(), &new());
        assert_eq!(d.changes.added, vec![k(0, "10.5.0.0/24"), k(2, "10.6.0.0/24")]);
        assert_eq!(d.changes.retargeted, vec![k(0, "10.2.0.0/24"), k(0, "10.4.0.0/24")]);
        assert_eq!(d.changes.removed, vec![k(0, "10.3.0.0/24"), k(2, "10.2.0.0/24")]);
        let steered: Vec<_> = d.steer.iter().map(|s| s.key).collect();
        assert!(
            !steered.contains(&k(0, "10.1.0.0/24")),
            "unchanged routes are not rewritten"
        );
        assert_eq!(d.tun_add, vec!["10.5.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(
            d.tun_del,
            vec!["10.3.0.0/24".parse::<IpNet>().unwrap(), "10.4.0.0/24".parse().unwrap()]
        );
        assert_eq!(d.unsteer, d.changes.removed);
        assert_eq!(RouteDiff::between(&new(), &new()), RouteDiff::default());
    }

    #[test]
    fn a_route_group_goes_to_its_healthy_peers_of_the_highest_priority() {
        let peer = |id: u32, priority: u8, up: bool| PeerRoutes {
            id,
            vnet: 0,
            allowed_ips: vec!["10.2.0.0/24".parse().unwrap()],
            priority: Some(priority),
            up,
        };
        let target = |peers: &[PeerRoutes]| {
            let f = fib_from(&[], &[], peers).unwrap();
            let t = f.lookup(0, "10.2.0.1".parse().unwrap()).unwrap().1;
            match t {
                Target::Peers(s) => f.peer_set(s).unwrap().to_vec(),
                Target::Peer(p) => vec![p],
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            target(&[peer(0, 200, true), peer(1, 100, true)]),
            vec![0],
            "active/standby"
        );
        assert_eq!(
            target(&[peer(0, 200, false), peer(1, 100, true)]),
            vec![1],
            "failed over"
        );
        assert_eq!(
            target(&[peer(0, 200, false), peer(1, 100, false)]),
            vec![0],
            "all down: the preferred"
        );
        assert_eq!(
            target(&[peer(0, 100, true), peer(1, 100, true), peer(2, 50, true)]),
            vec![0, 1],
            "ECMP"
        );
        assert_eq!(
            target(&[peer(0, 100, true), peer(1, 100, false), peer(2, 50, true)]),
            vec![0]
        );
    }

    #[test]
    fn new_routers_for_a_prefix_are_a_change_that_steers_nothing() {
        use crate::fib::{HopGroup, RouteSource};
        let with = |groups: &[&[&str]]| {
            let mut f = Fib::new();
            f.insert(0, "10.1.0.0/24".parse().unwrap(), LAN).unwrap();
            for (i, hops) in groups.iter().enumerate() {
                let g = f.via(HopGroup {
                    port: 0,
                    hops: hops.iter().map(|h| h.parse().unwrap()).collect(),
                    source: RouteSource::Config,
                });
                f.insert(0, format!("10.1.{}.0/24", i + 5).parse().unwrap(), g).unwrap();
            }
            f
        };
        let a = with(&[&["10.1.0.3"], &["10.1.0.3", "10.1.0.4"]]);
        // The first prefix moves to r2; the second keeps its routers (in
        // another group slot of the new FIB).
        let b = with(&[&["10.1.0.4"], &["10.1.0.3", "10.1.0.4"]]);
        let d = RouteDiff::between(&a, &b);
        assert_eq!(d.changes.retargeted, vec![k(0, "10.1.5.0/24")]);
        assert!(d.steer.is_empty() && d.unsteer.is_empty(), "{d:?}");
        let c = with(&[&["10.1.0.3", "10.1.0.4"], &["10.1.0.3"]]);
        assert_eq!(RouteDiff::between(&c, &c), RouteDiff::default());
    }

    /// The XDP program's steering as a map, changed the way `apply` does.
    fn steering(f: &Fib) -> BTreeMap<(VnetId, IpNet), Target> {
        f.routes().iter().map(|r| ((r.vnet, r.prefix), r.target)).collect()
    }

    fn write(m: &mut BTreeMap<(VnetId, IpNet), Target>, key: (VnetId, IpNet), t: Option<Target>) {
        match t {
            Some(t) => m.insert(key, t),
            None => m.remove(&key),
        };
    }

    #[test]
    fn steering_then_unsteering_reaches_the_new_fib_and_a_rollback_at_any_step_the_old_one() {
        for (a, b) in [(old(), new()), (new(), old()), (old(), Fib::new()), (Fib::new(), new())] {
            let d = RouteDiff::between(&a, &b);
            // The change carried through.
            let mut m = steering(&a);
            for s in &d.steer {
                write(&mut m, s.key, Some(s.target));
            }
            for key in &d.unsteer {
                write(&mut m, *key, None);
            }
            assert_eq!(m, steering(&b));
            // A failure after any number of writes (including none, and
            // all of them, as when the kernel route or the fence fails).
            for done in 0..=d.steer.len() {
                let mut m = steering(&a);
                for s in &d.steer[..done] {
                    write(&mut m, s.key, Some(s.target));
                }
                for (key, t) in d.rollback(done) {
                    write(&mut m, key, t);
                }
                assert_eq!(m, steering(&a), "rollback after {done} of {} writes", d.steer.len());
            }
        }
    }

    #[test]
    fn a_fib_larger_than_the_xdp_tables_is_refused() {
        let mut f = Fib::new();
        for i in 0..=subway_common::MAX_ROUTES {
            f.insert(
                0,
                IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))),
                P1,
            )
            .unwrap();
        }
        assert!(
            check_capacity(&f)
                .unwrap_err()
                .to_string()
                .contains("routes of one family")
        );
        assert!(check_capacity(&old()).is_ok());
    }

    /// A FIB as a comparable list: each route with its peer set spelled
    /// out (a patch keeps set ids stable, a build renumbers them).
    fn canonical(f: &Fib) -> Vec<((VnetId, IpNet), String)> {
        let mut v: Vec<_> = f
            .routes()
            .iter()
            .map(|r| {
                let t = match r.target {
                    Target::Peers(s) => format!("{:?}", f.peer_set(s).unwrap()),
                    t => format!("{t:?}"),
                };
                ((r.vnet, r.prefix), t)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn patched_tables_equal_built_ones_over_chains_of_random_peer_changes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // A LAN (10.0.0.0/16 in VNET 0, the gateway at 10.0.0.1) and a
        // pool of prefixes that peers share (route groups), one of them
        // the LAN's and one the gateway's own address.
        let lans = [("lan0".to_string(), 0, vec![k(0, "10.0.0.0/16").1])];
        let locals = [k(0, "10.0.0.1/32")];
        let fixed: FixedKeys = [k(0, "10.0.0.0/16"), k(0, "10.0.0.1/32")].into();
        let mut pool: Vec<IpNet> = (0..40)
            .map(|i| format!("10.{}.{}.0/24", 1 + i % 3, i).parse().unwrap())
            .collect();
        pool.push("10.0.0.0/16".parse().unwrap());
        pool.push("10.0.0.1/32".parse().unwrap());
        pool.push("fd00:1::/64".parse().unwrap());
        // Around the LAN and the others: the fence has holes and nesting.
        pool.push("10.0.0.0/8".parse().unwrap());
        // 10.1.0.0/24 with host bits: the same prefix, written otherwise.
        pool.push("10.1.0.7/24".parse().unwrap());
        let mut next_id = 0u32;
        let mut peer = |rnd: &mut dyn FnMut(u64) -> u64, id: Option<u32>| -> PeerRoutes {
            let id = id.unwrap_or_else(|| {
                next_id += 1;
                next_id - 1
            });
            let mut nets: Vec<IpNet> = (0..rnd(5)).map(|_| pool[rnd(pool.len() as u64) as usize]).collect();
            nets.sort();
            nets.dedup();
            PeerRoutes {
                id,
                vnet: rnd(2) as VnetId,
                allowed_ips: nets,
                priority: [None, Some(1), Some(2)][rnd(3) as usize],
                up: rnd(4) != 0,
            }
        };
        let (mut patched_steps, mut built_steps) = (0, 0);
        for _chain in 0..40 {
            let mut peers: Vec<PeerRoutes> = (0..12).map(|_| peer(&mut rnd, None)).collect();
            let Ok(mut fib) = fib_from(&lans, &locals, &peers) else {
                continue;
            };
            let mut allowed = allowed_ips(&peers);
            let mut pieces = failsafe::Pieces::build(fib.routes());
            for _step in 0..15 {
                let mut new = peers.clone();
                for _ in 0..1 + rnd(3) {
                    let i = rnd(new.len() as u64) as usize;
                    match rnd(5) {
                        0 => {
                            new.remove(i);
                        }
                        1 => new.push(peer(&mut rnd, None)),
                        2 => new[i].up = !new[i].up,
                        _ => new[i] = peer(&mut rnd, Some(new[i].id)),
                    }
                }
                let built = fib_from(&lans, &locals, &new);
                let Some(p) = peer_patch(&fib, &allowed, &peers, &new, &fixed) else {
                    built_steps += 1;
                    if let Ok(b) = built {
                        pieces = failsafe::Pieces::build(b.routes());
                        (fib, allowed, peers) = (b, allowed_ips(&new), new);
                    }
                    continue;
                };
                let built = built.expect("a patch where a build fails");
                patched_steps += 1;
                let before = canonical(&fib);
                fib.patch(&p.fib);
                allowed.patch(&p.allowed);
                assert_eq!(canonical(&fib), canonical(&built), "FIB after {peers:?} -> {new:?}");
                // The fence's pieces follow the patch's prefixes.
                for n in &p.diff.tun_del {
                    pieces.remove(*n);
                }
                for n in &p.diff.tun_add {
                    pieces.add(*n);
                }
                assert_eq!(
                    pieces.folded(),
                    failsafe::tunnelled(built.routes()),
                    "fence after {peers:?} -> {new:?}"
                );
                assert_eq!(
                    canonical(allowed.table()),
                    canonical(allowed_ips(&new).table()),
                    "AllowedIPs after {peers:?} -> {new:?}"
                );
                for ip in ["10.1.0.9", "10.2.4.1", "10.0.0.1", "10.0.7.7", "fd00:1::5"] {
                    let ip: std::net::IpAddr = ip.parse().unwrap();
                    for v in 0..2 {
                        let peers_of = |f: &Fib| {
                            f.lookup(v, ip).map(|(len, t)| match t {
                                Target::Peers(s) => (len, format!("{:?}", f.peer_set(s).unwrap())),
                                t => (len, format!("{t:?}")),
                            })
                        };
                        assert_eq!(peers_of(&fib), peers_of(&built), "lookup of {ip} in VNET {v}");
                    }
                }
                // What the patch says it changed is what changed.
                let after = canonical(&fib);
                let keys = |v: &[((VnetId, IpNet), String)]| v.iter().map(|e| e.0).collect::<Vec<_>>();
                let (was, now) = (keys(&before), keys(&after));
                let mut added: Vec<_> = now.iter().filter(|k| !was.contains(k)).copied().collect();
                let mut removed: Vec<_> = was.iter().filter(|k| !now.contains(k)).copied().collect();
                let mut moved: Vec<_> = after
                    .iter()
                    .filter(|e| before.iter().any(|b| b.0 == e.0 && b.1 != e.1))
                    .map(|e| e.0)
                    .collect();
                added.sort();
                removed.sort();
                moved.sort();
                assert_eq!(p.diff.changes.added, added);
                assert_eq!(p.diff.changes.removed, removed);
                assert_eq!(p.diff.changes.retargeted, moved);
                assert_eq!(p.diff.unsteer, removed);
                assert_eq!(p.diff.steer.len(), added.len() + moved.len());
                assert_eq!(
                    p.diff.tun_add,
                    added.iter().filter(|k| k.0 == 0).map(|k| k.1).collect::<Vec<_>>()
                );
                peers = new;
            }
        }
        // Both kinds happened: the property was tested, not skipped.
        assert!(
            patched_steps > 300 && built_steps > 20,
            "{patched_steps} patched, {built_steps} built"
        );
    }
}
