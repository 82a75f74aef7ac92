//! Pure planning, shared by start, live changes and the route questions:
//! the FIB from the config (LAN subnets, peers' AllowedIPs, the gateway's
//! own addresses), the workers' view of the peers, how the XDP program
//! steers each route, and the fail-safe table as far as the file tells.

use crate::config::{DataplaneConfig, LanConfig, PeerRoutes, UPLINK_VNET};
use crate::error::{Error, Result};
use crate::failsafe;
use crate::fib::{Fib, Target, VnetId};
use crate::host::tun_name;
use crate::netlink::Netlink;
use crate::tables::{self, Port};
use ipnet::IpNet;
use std::sync::Arc;
use subway_common::{STEER_LOCAL, STEER_REDIRECT, Steer};

/// The FIB for these LANs (their Subnets, or the prefixes of their
/// addresses) and peers, with the gateway's own addresses as local routes.
pub(crate) fn build_fib(
    netlink: &mut Netlink,
    lans: &[LanConfig],
    ports: &[Port],
    peers: &[PeerRoutes],
) -> Result<Fib> {
    let mut subnets_of = Vec::new();
    let mut locals = Vec::new();
    for (i, lan) in lans.iter().enumerate() {
        let port = ports
            .get(i)
            .ok_or_else(|| Error::msg(format!("{} has no port", lan.ifname)))?;
        let addrs = netlink
            .addresses(port.ifindex)
            .map_err(|e| Error::io(format!("addresses of {}", lan.ifname), e))?;
        let subnets: Vec<IpNet> = if lan.subnets.is_empty() {
            addrs.iter().map(|a| a.trunc()).collect()
        } else {
            lan.subnets.clone()
        };
        if subnets.is_empty() {
            return Err(Error::msg(format!(
                "{} has no address and no Subnets: give it an address or list the subnets behind it",
                lan.ifname
            )));
        }
        subnets_of.push((lan.ifname.clone(), lan.vnet, subnets));
        for a in addrs {
            locals.push((lan.vnet, IpNet::from(a.addr())));
        }
    }
    fib_from(&subnets_of, &locals, peers)
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
                .map_err(|e| Error::msg(format!("{name}: {e}")))?;
        }
    }
    for p in peers {
        for net in &p.allowed_ips {
            fib.insert(p.vnet, *net, Target::Peer(p.id))
                .map_err(|e| Error::msg(format!("peer {} AllowedIPs: {e}", p.id)))?;
        }
    }
    for (vnet, host) in locals {
        // Two interfaces with one address is odd but harmless.
        let _ = fib.insert(*vnet, *host, Target::Local);
    }
    Ok(fib)
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
pub(crate) fn peer_rts(old: &[tables::PeerRt], peers: &[PeerRoutes], fresh: &[u32]) -> Vec<tables::PeerRt> {
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
    for p in peers {
        let slot = &mut v[p.id as usize];
        if let Some(o) = old.get(p.id as usize).filter(|_| !fresh.contains(&p.id)) {
            *slot = o.clone();
        }
        slot.vnet = p.vnet;
    }
    v
}

/// How the XDP program steers a route's packets.
pub(crate) fn steer(target: Target, ports: &[Port]) -> Steer {
    match target {
        Target::Port(p) => Steer {
            action: STEER_REDIRECT,
            egress_ifindex: ports.get(p as usize).map_or(0, |p| p.ifindex),
        },
        Target::Peer(_) => Steer {
            action: STEER_REDIRECT,
            egress_ifindex: 0,
        },
        Target::Local => Steer {
            action: STEER_LOCAL,
            egress_ifindex: 0,
        },
    }
}
