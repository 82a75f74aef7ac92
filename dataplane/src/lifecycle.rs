//! The running dataplane: start (ports, the fail-safe table, host
//! changes, the TUN, XDP maps, workers, attach), live changes (`apply`),
//! the housekeeping the control thread drives (neighbours, punted packets,
//! the uplink's addresses), and stop.

use crate::config::{DataplaneConfig, LanConfig, RouteChanges, UPLINK_VNET};
use crate::error::{Error, Result};
use crate::fib::{Target, VnetId};
use crate::host::{KernelUndo, kernel_routes, tun_name, tun_sysctls};
use crate::netlink::{self, Neighbour, Netlink};
use crate::plan::{allowed_ips, build_fib, peer_rts, steer};
use crate::slowpath::SlowPath;
use crate::stats::WorkerStats;
use crate::tables::{self, NeighTable, Port, SharedTables, Tables};
use crate::worker::{Worker, WorkerInfo};
use crate::xdp::XdpSteering;
use crate::xsk;
use crate::{failsafe, punt, trace, tunnel};
use ipnet::IpNet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use subway_common::{IfaceConf, XdpCounter};

/// A started worker as the control thread sees it.
pub struct WorkerHandle {
    pub info: WorkerInfo,
    pub xdp_mode: String,
    pub stats: Arc<WorkerStats>,
    /// (interface, socket fd), valid while the dataplane runs.
    pub sockets: Vec<(String, std::os::fd::RawFd)>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// The kernel's AF_XDP counters of each of this worker's sockets.
    pub fn xsk_stats(&self) -> Vec<(String, xsk::XskStats)> {
        if self.thread.is_none() {
            return Vec::new();
        }
        self.sockets
            .iter()
            .map(|(n, fd)| (n.clone(), xsk::XskStats::read(*fd).unwrap_or_default()))
            .collect()
    }
}

/// The running packet path. Dropping it stops the workers, closes the
/// sockets and detaches XDP.
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    workers: Vec<WorkerHandle>,
    tables: SharedTables,
    lans: Vec<LanConfig>,
    netlink: Netlink,
    neigh_scratch: Vec<Neighbour>,
    /// The kernel's neighbour and route changes, followed as they come
    /// (None if the subscription failed: then the table is re-read).
    events: Option<netlink::RoutingEvents>,
    neigh_changes: Vec<netlink::NeighbourChange>,
    /// The kernel's answers to route lookups toward peers' endpoints,
    /// until a route or an uplink address changes.
    route_cache: std::collections::HashMap<std::net::IpAddr, Option<netlink::RouteInfo>>,
    slow: Arc<SlowPath>,
    punt: punt::PuntServer,
    undo: KernelUndo,
    // Dropped last: detaching XDP after the sockets close is harmless
    // (the redirect falls back to XDP_PASS).
    xdp: XdpSteering,
}

impl Dataplane {
    pub fn start(cfg: &DataplaneConfig) -> Result<Dataplane> {
        if cfg.lans.is_empty() {
            return Err(Error::msg("no [Lan] interface configured"));
        }
        let mut netlink = Netlink::open().map_err(|e| Error::io("opening rtnetlink", e))?;

        // Ports, their prefixes and the gateway's own addresses.
        let mut ports = Vec::new();
        for lan in &cfg.lans {
            let link = netlink::link_by_name(&lan.ifname)
                .map_err(|e| Error::io(format!("reading interface {}", lan.ifname), e))?
                .ok_or_else(|| Error::msg(format!("interface {} does not exist", lan.ifname)))?;
            if link.kind != 1 {
                return Err(Error::msg(format!(
                    "{} is not an Ethernet interface (ARPHRD {}): subway routes Ethernet frames",
                    lan.ifname, link.kind
                )));
            }
            let room = cfg.xsk.frame_size as usize - 256;
            if link.mtu as usize + 14 + 4 > room {
                return Err(Error::msg(format!(
                    "{} has MTU {}, more than a {}-byte UMEM frame holds: set [Tuning] FrameSize = 4096 or lower the MTU",
                    lan.ifname, link.mtu, cfg.xsk.frame_size
                )));
            }
            ports.push(Port {
                mtu: link.mtu,
                name: lan.ifname.clone(),
                ifindex: link.ifindex,
                mac: link.mac,
                vnet: lan.vnet,
            });
        }
        let fib = build_fib(&mut netlink, &cfg.lans, &ports, &cfg.peers)?;
        let uplink = match &cfg.uplink {
            None => None,
            Some(name) => match ports.iter().position(|p| &p.name == name) {
                Some(i) => Some(i as u16),
                None => {
                    let link = netlink::link_by_name(name)
                        .map_err(|e| Error::io(format!("reading interface {name}"), e))?
                        .ok_or_else(|| Error::msg(format!("uplink interface {name} does not exist")))?;
                    ports.push(Port {
                        mtu: link.mtu,
                        name: name.clone(),
                        ifindex: link.ifindex,
                        mac: link.mac,
                        vnet: UPLINK_VNET,
                    });
                    Some((ports.len() - 1) as u16)
                }
            },
        };
        let uplink_addrs: Vec<std::net::IpAddr> = match uplink.and_then(|u| ports.get(u as usize)) {
            Some(up) => netlink
                .addresses(up.ifindex)
                .map_err(|e| Error::io(format!("addresses of {}", up.name), e))?
                .iter()
                .map(|n| n.addr())
                .collect(),
            None => Vec::new(),
        };
        if uplink.is_some() && uplink_addrs.is_empty() {
            return Err(Error::msg(
                "the uplink has no IP address: WireGuard needs one to listen on",
            ));
        }
        if let Some(up) = uplink.and_then(|u| ports.get(u as usize))
            && up.vnet != 0
            && up.vnet != UPLINK_VNET
        {
            return Err(Error::msg(format!(
                "the uplink {} is a [Lan] of a non-default VNET: the tunnel's own traffic is routed by the kernel, \
                 which serves the default VNET only; use a dedicated uplink or a default-VNET [Lan]",
                up.name
            )));
        }
        // Fail safe first: the fence on the tunnelled prefixes (and the
        // VNET interfaces) is in the kernel before anything else changes,
        // and stays if the start fails from here on.
        let mut undo = KernelUndo::default();
        undo.fail_open = cfg.fail_open;
        let isolated: Vec<&Port> = ports.iter().filter(|p| p.vnet != 0 && p.vnet != UPLINK_VNET).collect();
        // The gateway's addresses that exist only in non-default VNETs:
        // the kernel accepts a packet for any of its addresses on any
        // interface, so the default VNET could otherwise reach them.
        let mut vnet_only = Vec::new();
        if !isolated.is_empty() {
            let mut elsewhere = Vec::new();
            for p in &ports {
                let addrs = netlink
                    .addresses(p.ifindex)
                    .map_err(|e| Error::io(format!("addresses of {}", p.name), e))?;
                let into = if isolated.iter().any(|i| i.ifindex == p.ifindex) {
                    &mut vnet_only
                } else {
                    &mut elsewhere
                };
                into.extend(addrs.iter().map(|a| a.addr()));
            }
            vnet_only.retain(|a| !elsewhere.contains(a));
        }
        // Routed mode without VNETs has nothing to fence (and no peers can
        // come later without a restart): no table.
        if cfg.listen_port != 0 || !isolated.is_empty() {
            undo.fence(failsafe::Fence {
                table: failsafe::table_name(&cfg.name),
                tun: tun_name(&cfg.name),
                listen_port: cfg.listen_port,
                tunnelled: failsafe::tunnelled(fib.routes()),
                vnet_ifaces: isolated.iter().map(|p| p.name.clone()).collect(),
                vnet_only_addrs: vnet_only,
            })?;
        }
        // Non-default VNETs: take their interfaces out of the kernel's
        // routing (it has one table, the default VNET's), restored on stop.
        for p in &isolated {
            undo.isolate(&mut netlink, p)?;
        }
        // The kernel forwards for the slow path (first packets to a peer,
        // unknown LAN neighbours): on the default VNET's LAN interfaces
        // only, never box-wide.
        for p in ports.iter().filter(|p| p.vnet == 0) {
            undo.forwarding(&p.name, uplink.is_some_and(|u| ports[u as usize].ifindex == p.ifindex))?;
        }

        // Subscribed before the first dump, so no change falls between.
        let events = netlink::RoutingEvents::open()
            .inspect_err(|e| {
                tracing::warn!("not following neighbour and route changes (netlink): {e}; re-reading them")
            })
            .ok();
        let mut neigh_scratch = Vec::new();
        let neigh = read_neighbours(&mut netlink, &ports, &mut neigh_scratch)?;
        let tables = tables::shared(Tables {
            fib: Arc::new(fib.clone()),
            allowed: Arc::new(allowed_ips(&cfg.peers)),
            neigh,
            ports: ports.clone(),
            peers: peer_rts(&[], &cfg.peers, &[]),
            sessions: Default::default(),
            uplink,
            uplink_addrs: uplink_addrs.clone(),
            listen_port: cfg.listen_port,
        });

        let slow = Arc::new(
            SlowPath::create(&tun_name(&cfg.name))
                .map_err(|e| Error::io(format!("creating the slow-path TUN {}", tun_name(&cfg.name)), e))?,
        );

        tun_sysctls(slow.name())?;
        if let Some(up) = uplink.and_then(|u| ports.get(u as usize)) {
            let mtu = up.mtu.saturating_sub(tunnel::TUNNEL_OVERHEAD).max(1280);
            slow.set_mtu(mtu)
                .map_err(|e| Error::io(format!("setting the MTU of {} to {mtu}", slow.name()), e))?;
        }
        // The kernel's routes to the peers' prefixes point at the TUN, so
        // that what the kernel forwards or sends there (first packets before
        // a handshake, the gateway's own traffic) reaches the control thread
        // and the tunnel, never the uplink in clear.
        let tun_nets: Vec<IpNet> = fib
            .routes()
            .iter()
            .filter(|r| r.vnet == 0 && matches!(r.target, Target::Peer(_)))
            .map(|r| r.prefix)
            .collect();
        kernel_routes("replace", &tun_nets, slow.name(), false)?;

        // XDP maps first, attachment last: until then the kernel has it all.
        let mut xdp = XdpSteering::load()?;
        // WireGuard is steered only when addressed to the uplink's own
        // addresses: other traffic to the same port (a WireGuard server
        // behind the gateway, LAN hosts talking to one) is not ours.
        if cfg.listen_port != 0 {
            for a in &uplink_addrs {
                let key = match a {
                    std::net::IpAddr::V4(v4) => subway_common::ListenKey::v4(v4.octets(), cfg.listen_port),
                    std::net::IpAddr::V6(v6) => subway_common::ListenKey::v6(v6.octets(), cfg.listen_port),
                };
                xdp.add_listen(key)?;
            }
        }
        for (i, p) in ports.iter().enumerate() {
            xdp.set_iface(
                p.ifindex,
                IfaceConf {
                    slot: i as u32,
                    vnet: p.vnet,
                    mac: p.mac.0,
                    _pad: [0; 2],
                },
            )?;
        }
        for r in fib.routes() {
            xdp.set_route(r.vnet, r.prefix, steer(r.target, &ports))?;
        }

        let queues = match &cfg.queues {
            Some(q) if !q.is_empty() => q.clone(),
            _ => {
                let n = ports
                    .iter()
                    .map(|p| {
                        netlink::link_by_name(&p.name)
                            .ok()
                            .flatten()
                            .map(|l| l.rx_queues)
                            .unwrap_or(1)
                    })
                    .min()
                    .unwrap_or(1);
                if n > subway_common::MAX_QUEUES {
                    tracing::warn!(
                        "the interfaces have {n} RX queues; subway serves the first {} (the rest go to the kernel)",
                        subway_common::MAX_QUEUES
                    );
                }
                (0..n.min(subway_common::MAX_QUEUES)).collect()
            }
        };
        if let Some(q) = queues.iter().find(|q| **q >= subway_common::MAX_QUEUES) {
            return Err(Error::msg(format!(
                "queue {q} is above the supported maximum {}",
                subway_common::MAX_QUEUES - 1
            )));
        }
        let cores: Vec<usize> = match &cfg.cores {
            Some(c) if !c.is_empty() => c.clone(),
            _ => core_affinity::get_core_ids()
                .map(|v| v.into_iter().map(|c| c.id).collect())
                .unwrap_or_default(),
        };

        let port_names: Vec<(u16, String)> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u16, p.name.clone()))
            .collect();
        let mut built = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let w = Worker::new(i, *q, core, &port_names, cfg.xsk)?;
            for (port, fd) in w.sockets() {
                let idx = IfaceConf {
                    slot: port as u32,
                    ..Default::default()
                }
                .xsk_index(*q)
                .ok_or_else(|| Error::msg(format!("queue {q} is beyond the supported maximum")))?;
                xdp.set_xsk(idx, fd)?;
            }
            built.push(w);
        }

        let mut modes = Vec::new();
        for p in &ports {
            modes.push(xdp.attach(&p.name, cfg.xdp_mode)?);
        }
        let mode_str = modes
            .iter()
            .zip(&ports)
            .map(|(m, p)| format!("{}:{m}", p.name))
            .collect::<Vec<_>>()
            .join(",");

        let stop = Arc::new(AtomicBool::new(false));
        // Running from here: only a clean stop takes the fence down.
        undo.clean = false;
        let mut dp = Dataplane {
            stop: stop.clone(),
            workers: Vec::new(),
            tables: tables.clone(),
            lans: cfg.lans.clone(),
            netlink,
            neigh_scratch,
            events,
            neigh_changes: Vec::new(),
            route_cache: Default::default(),
            slow: slow.clone(),
            punt: Default::default(),
            undo,
            xdp,
        };
        for w in built {
            let info = w.info().clone();
            let stats = w.stats();
            let sockets = w.socket_fds();
            let thread = w.spawn(tables.clone(), slow.clone(), stop.clone())?;
            dp.workers.push(WorkerHandle {
                info,
                xdp_mode: mode_str.clone(),
                stats,
                sockets,
                thread: Some(thread),
            });
        }
        Ok(dp)
    }

    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    pub fn slow_path_name(&self) -> &str {
        self.slow.name()
    }

    pub fn slow_path(&self) -> &SlowPath {
        &self.slow
    }

    /// Publishes new tables made by `f` from the current ones. Workers see
    /// them from their next batch.
    pub fn publish(&self, f: impl FnOnce(&mut Tables)) {
        let mut next = (*self.tables.load_full()).clone();
        f(&mut next);
        self.tables.store(Arc::new(next));
    }

    /// Reads the kernel's route and neighbour entry toward `dst` and, if
    /// it leaves through the uplink with a known next hop, the path.
    pub fn outer_path(&mut self, dst: std::net::SocketAddr, listen_port: u16) -> Option<tunnel::OuterPath> {
        let t = self.tables.load();
        let up = t.ports.get(t.uplink? as usize)?;
        let r = match self.route_cache.get(&dst.ip()) {
            Some(r) => (*r)?,
            None => {
                let r = self.netlink.route_get(dst.ip()).ok().flatten();
                self.route_cache.insert(dst.ip(), r);
                r?
            }
        };
        if r.oif != up.ifindex {
            return None;
        }
        let hop = r.gateway.unwrap_or(dst.ip());
        let mac = t.neigh.get(up.ifindex, hop)?;
        let src = std::net::SocketAddr::new(r.src?, listen_port);
        Some(tunnel::OuterPath {
            src_mac: up.mac,
            dst_mac: mac,
            src,
            dst,
        })
    }

    /// Applies new peers and LAN subnets while traffic flows: builds the
    /// new FIB (nothing changes if that fails), adds the new XDP steering
    /// entries, publishes the new tables (the workers switch at their next
    /// batch), then removes the steering entries and kernel routes that are
    /// gone. Unchanged routes are never touched, so their packets keep
    /// flowing. `fresh` lists peer ids that are new: their counters start
    /// at zero. The set of [Lan] interfaces cannot change here.
    pub fn apply(&mut self, cfg: &DataplaneConfig, fresh: &[u32]) -> Result<RouteChanges> {
        let same_lans = cfg.lans.len() == self.lans.len()
            && cfg
                .lans
                .iter()
                .zip(&self.lans)
                .all(|(a, b)| a.ifname == b.ifname && a.vnet == b.vnet);
        if !same_lans {
            return Err(Error::msg(
                "the [Lan] interfaces or their VNETs changed: that needs a restart (XDP and sockets are per interface)",
            ));
        }
        let cur = self.tables.load_full();
        let fib = build_fib(&mut self.netlink, &cfg.lans, &cur.ports, &cfg.peers)?;
        let old: std::collections::HashMap<(VnetId, IpNet), Target> = cur
            .fib
            .routes()
            .iter()
            .map(|r| ((r.vnet, r.prefix), r.target))
            .collect();
        let new: std::collections::HashMap<(VnetId, IpNet), Target> =
            fib.routes().iter().map(|r| ((r.vnet, r.prefix), r.target)).collect();
        let mut ch = RouteChanges::default();
        for r in fib.routes() {
            let k = (r.vnet, r.prefix);
            match old.get(&k) {
                None => ch.added.push(k),
                Some(t) if *t != r.target => ch.retargeted.push(k),
                Some(_) => {}
            }
        }
        let per_family = |v4: bool| fib.routes().iter().filter(|r| r.prefix.addr().is_ipv4() == v4).count();
        if per_family(true) > subway_common::MAX_ROUTES as usize
            || per_family(false) > subway_common::MAX_ROUTES as usize
        {
            return Err(Error::msg(format!(
                "more than {} routes of one family: the XDP program's tables hold no more",
                subway_common::MAX_ROUTES
            )));
        }
        // Before the switch: steer what is new or retargeted, and point the
        // kernel's routes for new default-VNET peer prefixes at the TUN.
        // Undone step by step if one fails, so that nothing changed.
        let mut done: Vec<(VnetId, IpNet)> = Vec::new();
        let mut failed = None;
        for k in ch.added.iter().chain(&ch.retargeted) {
            if let Err(e) = self.xdp.set_route(k.0, k.1, steer(new[k], &cur.ports)) {
                failed = Some(e);
                break;
            }
            done.push(*k);
        }
        // The kernel's routes of new default-VNET peer prefixes, in one go.
        let tun_new: Vec<IpNet> = ch
            .added
            .iter()
            .chain(&ch.retargeted)
            .filter(|k| k.0 == 0 && matches!(new[*k], Target::Peer(_)) && !matches!(old.get(*k), Some(Target::Peer(_))))
            .map(|k| k.1)
            .collect();
        if failed.is_none()
            && let Err(e) = kernel_routes("replace", &tun_new, self.slow.name(), false)
        {
            let _ = kernel_routes("del", &tun_new, self.slow.name(), true);
            failed = Some(e);
        }
        // The fail-safe fence follows the peers' prefixes, in one nft
        // transaction, before the switch: a new peer prefix is never routed
        // by the kernel unfenced.
        let mut fence = self.undo.fence.clone();
        if failed.is_none()
            && let Some(f) = fence.as_mut()
        {
            f.tunnelled = failsafe::tunnelled(fib.routes());
            if self.undo.fence.as_ref().is_some_and(|cur| cur.tunnelled != f.tunnelled)
                && let Err(e) = failsafe::update_tunnelled(f)
            {
                let _ = kernel_routes("del", &tun_new, self.slow.name(), true);
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            for (vnet, net) in done.into_iter().rev() {
                match old.get(&(vnet, net)) {
                    Some(t) => {
                        let _ = self.xdp.set_route(vnet, net, steer(*t, &cur.ports));
                    }
                    None => {
                        let _ = self.xdp.remove_route(vnet, net);
                    }
                }
            }
            return Err(e);
        }
        self.undo.fence = fence;
        self.undo.fail_open = cfg.fail_open;
        let peers = peer_rts(&cur.peers, &cfg.peers, fresh);
        let allowed = Arc::new(allowed_ips(&cfg.peers));
        self.publish(|t| {
            t.fib = Arc::new(fib.clone());
            t.allowed = allowed;
            t.peers = peers;
        });
        // After the switch nothing may fail the change: what is gone is
        // removed, and a failure to remove is logged.
        let mut tun_gone = Vec::new();
        for (k, target) in &old {
            if new.contains_key(k) {
                continue;
            }
            ch.removed.push(*k);
            if let Err(e) = self.xdp.remove_route(k.0, k.1) {
                tracing::warn!("removing the steering entry of {}: {e}", k.1);
            }
            if k.0 == 0 && matches!(target, Target::Peer(_)) {
                tun_gone.push(k.1);
            }
        }
        // A prefix that moved from a peer to a LAN leaves the TUN.
        for k in &ch.retargeted {
            if k.0 == 0 && matches!(old.get(k), Some(Target::Peer(_))) && !matches!(new.get(k), Some(Target::Peer(_))) {
                tun_gone.push(k.1);
            }
        }
        if let Err(e) = kernel_routes("del", &tun_gone, self.slow.name(), true) {
            tracing::warn!("removing the kernel's routes of removed peer prefixes: {e}");
        }
        self.lans = cfg.lans.clone();
        ch.added.sort();
        ch.removed.sort();
        ch.retargeted.sort();
        Ok(ch)
    }

    /// Serves the packets of non-default VNETs that the workers handed to
    /// the control thread: those for a LAN host wait for its neighbour
    /// entry, those for a peer go to `to_peer(peer, packet)`.
    pub fn serve_punted(&mut self, to_peer: impl FnMut(u32, &[u8])) {
        self.slow.clear_punt_signal();
        let t = self.tables.load_full();
        self.punt.serve(&self.slow, &t, &mut self.netlink, to_peer);
    }

    /// How soon [`Dataplane::serve_punted`] wants to run again without
    /// anything arriving: packets held for a neighbour are retried.
    pub fn punt_deadline(&self) -> Option<std::time::Duration> {
        self.punt.holding().then_some(punt::RESOLVE_EVERY / 5)
    }

    pub fn punt_stats(&self) -> punt::PuntStats {
        self.punt.stats
    }

    /// Follows the uplink's addresses (DHCP or SLAAC renumbering): if they
    /// changed, the XDP program steers WireGuard to the new ones (added
    /// before the switch, old ones removed after) and the workers get them
    /// with the next tables. Returns the new addresses if they changed.
    pub fn follow_uplink_addresses(&mut self, listen_port: u16) -> Result<Option<Vec<std::net::IpAddr>>> {
        let cur = self.tables.load_full();
        let Some(up) = cur.uplink.and_then(|u| cur.ports.get(u as usize)) else {
            return Ok(None);
        };
        let now: Vec<std::net::IpAddr> = self
            .netlink
            .addresses(up.ifindex)
            .map_err(|e| Error::io(format!("addresses of {}", up.name), e))?
            .iter()
            .map(|n| n.addr())
            .collect();
        if now == cur.uplink_addrs {
            return Ok(None);
        }
        let key = |a: &std::net::IpAddr| match a {
            std::net::IpAddr::V4(v4) => subway_common::ListenKey::v4(v4.octets(), listen_port),
            std::net::IpAddr::V6(v6) => subway_common::ListenKey::v6(v6.octets(), listen_port),
        };
        if listen_port != 0 {
            for a in now.iter().filter(|a| !cur.uplink_addrs.contains(a)) {
                self.xdp.add_listen(key(a))?;
            }
        }
        tracing::info!(uplink = %up.name, from = ?cur.uplink_addrs, to = ?now, "uplink addresses changed");
        self.route_cache.clear();
        let gone: Vec<std::net::IpAddr> = cur.uplink_addrs.iter().filter(|a| !now.contains(a)).copied().collect();
        self.publish(|t| t.uplink_addrs = now.clone());
        if listen_port != 0 {
            for a in &gone {
                if let Err(e) = self.xdp.remove_listen(key(a)) {
                    tracing::warn!("unsteering the old uplink address {a}: {e}");
                }
            }
        }
        Ok(Some(now))
    }

    /// The fd that is readable when the kernel's neighbours or routes
    /// changed (see [`Dataplane::follow_kernel`]).
    pub fn kernel_events_fd(&self) -> Option<std::os::fd::RawFd> {
        self.events.as_ref().map(|e| e.fd())
    }

    /// Applies the kernel's neighbour changes to the workers' mirror, in
    /// one publication for all that arrived, and forgets cached routes when
    /// a route changed. The whole table is re-read only when events were
    /// lost (or never subscribed). Returns whether the workers' neighbours
    /// changed.
    pub fn follow_kernel(&mut self) -> Result<bool> {
        self.neigh_changes.clear();
        let drained = match self.events.as_mut() {
            Some(ev) => ev.drain(&mut self.neigh_changes).inspect_err(|e| {
                tracing::warn!("neighbour and route events lost ({e}): re-reading the neighbour table")
            }),
            None => Err(std::io::ErrorKind::Unsupported.into()),
        };
        match drained {
            Ok(false) => {}
            Ok(true) => self.route_cache.clear(),
            Err(_) => {
                self.route_cache.clear();
                return self.refresh_neighbours();
            }
        }
        if self.neigh_changes.is_empty() {
            return Ok(false);
        }
        let cur = self.tables.load_full();
        let mut neigh = cur.neigh.clone();
        let mut changed = false;
        for c in &self.neigh_changes {
            match *c {
                netlink::NeighbourChange::Usable(n)
                    if cur.ports.iter().any(|p| p.ifindex == n.ifindex)
                        && neigh.get(n.ifindex, n.ip) != Some(n.mac) =>
                {
                    neigh.insert(n.ifindex, n.ip, n.mac);
                    changed = true;
                }
                netlink::NeighbourChange::Unusable { ifindex, ip } => changed |= neigh.remove(ifindex, ip),
                _ => {}
            }
        }
        if changed {
            self.publish(|t| t.neigh = neigh);
        }
        Ok(changed)
    }

    /// Re-reads the whole neighbour table (a dump) and publishes it if
    /// anything changed. Returns whether it did.
    fn refresh_neighbours(&mut self) -> Result<bool> {
        let cur = self.tables.load_full();
        let neigh = read_neighbours(&mut self.netlink, &cur.ports, &mut self.neigh_scratch)?;
        if neigh == cur.neigh {
            return Ok(false);
        }
        let mut next = (*cur).clone();
        next.neigh = neigh;
        self.tables.store(Arc::new(next));
        Ok(true)
    }

    /// Runs the XDP program on `frame` as if it arrived on `ifindex` (see
    /// [`XdpSteering::test_run`]): for tests of the classification.
    pub fn xdp_test_run(&self, frame: &[u8], ifindex: u32) -> Result<u32> {
        self.xdp.test_run(frame, ifindex)
    }

    /// `subway route explain` on the running instance: the XDP program
    /// runs on the probe's bytes (`BPF_PROG_TEST_RUN`: nothing is sent),
    /// then, if it steers them to a worker, the workers' decisions on the
    /// current tables ([`trace::trace`]). A probe from a peer is steered as
    /// the datagram that carries it.
    pub fn explain(
        &self,
        p: &trace::Probe,
        now: std::time::Duration,
        peer_name: &dyn Fn(u32) -> String,
    ) -> trace::Trace {
        let t = self.tables.load_full();
        let ingress = p.from.or_else(|| trace::ingress_of(&t, p.vnet, p.src));
        let (frame, port) = match ingress {
            Some(trace::Ingress::Lan(i)) => match t.ports.get(i as usize) {
                Some(port) => (trace::frame(p, port.mac), port),
                None => return trace::trace(&t, p, now, peer_name),
            },
            Some(trace::Ingress::Peer(id)) => match carrier(&t, id) {
                Some(c) => c,
                None => return trace::trace(&t, p, now, peer_name),
            },
            None => return trace::trace(&t, p, now, peer_name),
        };
        let before = self.xdp.counters().unwrap_or([0; XdpCounter::COUNT as usize]);
        let action = self.xdp.test_run(&frame, port.ifindex);
        let after = self.xdp.counters().unwrap_or([0; XdpCounter::COUNT as usize]);
        // The reason is the counter the run moved (with traffic flowing,
        // others move too: the one that fits the action is named).
        let moved = |prefix: &str| {
            XdpCounter::ALL
                .iter()
                .filter(|k| k.name().starts_with(prefix) && after[**k as usize] > before[**k as usize])
                .map(|k| k.name())
                .next()
                .unwrap_or("?")
        };
        let on = format!("XDP on {}", port.name);
        match action {
            Ok(4) => {
                let mut tr = trace::trace(&t, p, now, peer_name);
                tr.steps.insert(
                    0,
                    format!(
                        "{on}: redirected to the AF_XDP socket of its RX queue ({})",
                        moved("redirect_")
                    ),
                );
                tr
            }
            Ok(1) => trace::Trace {
                ingress,
                steps: vec![format!("{on}: dropped ({})", moved("drop_"))],
                outcome: trace::Outcome::XdpDrop(moved("drop_")),
            },
            Ok(_) => trace::Trace {
                ingress,
                steps: vec![format!("{on}: not steered, the kernel has it ({})", moved("pass_"))],
                outcome: trace::Outcome::XdpPass(moved("pass_")),
            },
            Err(e) => {
                let mut tr = trace::trace(&t, p, now, peer_name);
                tr.steps
                    .insert(0, format!("{on}: could not run the XDP program on the probe ({e})"));
                tr
            }
        }
    }

    /// The XDP program's counters, summed over CPUs.
    pub fn xdp_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let c = self.xdp.counters()?;
        Ok(XdpCounter::ALL.iter().map(|k| (k.name(), c[*k as usize])).collect())
    }

    /// A worker thread that has ended (it only ends when stopped, so this
    /// is a crash), if any.
    pub fn dead_worker(&self) -> Option<usize> {
        self.workers
            .iter()
            .find(|w| w.thread.as_ref().is_some_and(|t| t.is_finished()))
            .map(|w| w.info.id)
    }

    /// Stops cleanly (SIGINT, SIGTERM): as [`Dataplane::stop`], and the
    /// non-default VNETs' fence comes down too.
    pub fn stop_clean(&mut self) {
        self.undo.clean = true;
        self.stop();
    }

    /// Stops the workers and waits for them.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        self.xdp.detach_all();
        self.undo.run();
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The datagram that carries a probe from peer `id`: from its endpoint to
/// the uplink's first address and our listen port, as a data message.
fn carrier(t: &Tables, id: u32) -> Option<(Vec<u8>, &Port)> {
    use crate::wire::{EtherType, ethernet, ipv4, ipv6, udp};
    let up = t.ports.get(t.uplink? as usize)?;
    let to = *t.uplink_addrs.first()?;
    let from = t.peers.get(id as usize)?.path.map(|p| p.dst.ip()).unwrap_or(match to {
        std::net::IpAddr::V4(_) => std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        std::net::IpAddr::V6(_) => std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    });
    let msg = 32 + 16;
    let l3 = if to.is_ipv6() { 40 } else { 20 };
    let mut f = vec![0u8; 14 + l3 + 8 + msg];
    let ethertype = if to.is_ipv6() { EtherType::IPV6 } else { EtherType::IPV4 };
    ethernet::emit(&mut f, up.mac, trace::PROBE_MAC, ethertype);
    match (from, to) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => ipv4::emit(&mut f[14..], s, d, 17, 64, 8 + msg),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => ipv6::emit(&mut f[14..], s, d, 17, 64, 8 + msg),
        _ => return None,
    }
    udp::emit(&mut f[14 + l3..], t.listen_port, t.listen_port, msg);
    f[14 + l3 + 8] = crate::wg::messages::TYPE_DATA;
    Some((f, up))
}

fn read_neighbours(nl: &mut Netlink, ports: &[Port], scratch: &mut Vec<Neighbour>) -> Result<NeighTable> {
    nl.neighbours(scratch)
        .map_err(|e| Error::io("dumping the neighbour table", e))?;
    let mut t = NeighTable::default();
    for n in scratch.iter().filter(|n| ports.iter().any(|p| p.ifindex == n.ifindex)) {
        t.insert(n.ifindex, n.ip, n.mac);
    }
    Ok(t)
}
