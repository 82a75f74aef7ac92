//! Starting the dataplane, in the order that keeps it fail-safe: read the
//! ports, plan the FIB, fence the tunnelled prefixes in the kernel before
//! anything else changes, prepare the host (VNET isolation, forwarding),
//! mirror the neighbours, open the slow-path TUN, load the XDP maps, build
//! the workers, and only then attach XDP and let the workers run. A step
//! that fails leaves nothing behind but the fence (the undo runs on drop).

use super::{Dataplane, WorkerHandle, read_neighbours, spare};
use crate::config::{DataplaneConfig, UPLINK_VNET};
use crate::error::{Error, Result};
use crate::fib::Fib;
use crate::host::{KernelUndo, kernel_routes, tun_name, tun_sysctls};
use crate::netlink::{self, Netlink};
use crate::plan::{self, allowed_ips, build_fib, check_capacity, peer_rts, steer};
use crate::slowpath::SlowPath;
use crate::tables::{self, Port, Tables};
use crate::worker::Worker;
use crate::xdp::XdpSteering;
use crate::{failsafe, tunnel};
use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use subway_common::IfaceConf;

impl Dataplane {
    pub fn start(cfg: &DataplaneConfig) -> Result<Dataplane> {
        if cfg.lans.is_empty() {
            return Err(Error::config("no [Lan] interface configured"));
        }
        let mut netlink = Netlink::open().map_err(|e| Error::io("opening rtnetlink", e))?;
        let (ports, uplink) = open_ports(cfg)?;
        // Subscribed before the first dump of routes (build_fib) and of
        // neighbours, so no change falls between. (The config's own LAN
        // routes, installed below, are then news for the first round: a
        // rebuild that finds the FIB as it is.)
        let mut events = netlink::RoutingEvents::open()
            .inspect_err(|e| {
                tracing::warn!("not following neighbour and route changes (netlink): {e}; re-reading them")
            })
            .ok();
        let (fib, fixed) = build_fib(&mut netlink, &cfg.lans, &ports, &cfg.peers)?;
        if let Some(ev) = events.as_mut() {
            let lans: Vec<u32> = ports.iter().take(cfg.lans.len()).map(|p| p.ifindex).collect();
            ev.follow_lans(&lans, plan::default_lan_subnets(&fib));
        }
        check_capacity(&fib)?;
        let uplink_addrs = uplink_addresses(&mut netlink, &ports, uplink)?;
        // The fence's pieces, kept for the live changes that patch them.
        let pieces = failsafe::Pieces::build(fib.routes());
        let mut undo = prepare_kernel(cfg, &mut netlink, &ports, uplink, &pieces)?;

        let mut neigh_scratch = Vec::new();
        let neigh = read_neighbours(&mut netlink, &ports, &mut neigh_scratch)?;
        let mut marks = tables::TrafficMarks::default();
        let allowed = allowed_ips(&cfg.peers);
        let tables = tables::shared(Tables {
            fib: Arc::new(fib.clone()),
            allowed: Arc::new(allowed.clone()),
            neigh,
            ports: ports.clone(),
            peers: peer_rts(&[], &cfg.peers, &[], &mut marks),
            sessions: Default::default(),
            uplink,
            uplink_addrs: uplink_addrs.clone(),
            listen_port: cfg.listen_port,
            source_ports: cfg.source_ports.max(1),
            policies: crate::policy::Policies::build(&cfg.policies, cfg.flows, &Default::default()),
        });

        let slow = Arc::new(open_slow_path(
            cfg,
            &mut netlink,
            &ports,
            uplink,
            &fib,
            events.as_mut(),
        )?);
        let mut xdp = load_steering(cfg, &ports, &fib, &uplink_addrs)?;
        let workers = build_workers(cfg, &ports, &mut xdp)?;
        let mut modes = Vec::new();
        for p in &ports {
            modes.push(format!("{}:{}", p.name, xdp.attach(&p.name, cfg.xdp_mode)?));
        }

        let stop = Arc::new(AtomicBool::new(false));
        // Running from here: only a clean stop takes the fence down.
        undo.clean = false;
        let mut dp = Dataplane {
            stop: stop.clone(),
            workers: Vec::new(),
            tables: tables.clone(),
            running: cfg.clone(),
            netlink,
            neigh_scratch,
            events,
            neigh_changes: Vec::new(),
            route_cache: Default::default(),
            paths_epoch: 0,
            kernel_work: Default::default(),
            marks,
            slow: slow.clone(),
            capture: Default::default(),
            punt: Default::default(),
            undo,
            // The FIB the start steered by is the published one's copy.
            spare_fib: spare::Spare::equal(fib),
            spare_allowed: spare::Spare::equal(allowed),
            fixed,
            fence_pieces: Some(pieces),
            rebuild: false,
            xdp,
        };
        for w in workers {
            let info = w.info().clone();
            let stats = w.stats();
            let sockets = w.socket_fds();
            let thread = w.spawn(tables.clone(), slow.clone(), dp.capture.clone(), stop.clone())?;
            dp.workers.push(WorkerHandle {
                info,
                xdp_mode: modes.join(","),
                stats,
                sockets,
                thread: Some(thread),
            });
        }
        Ok(dp)
    }
}

/// Step 1: the [Lan] interfaces as ports (Ethernet, an MTU the UMEM
/// frames hold), and the uplink: one of them, or a port of its own.
fn open_ports(cfg: &DataplaneConfig) -> Result<(Vec<Port>, Option<u16>)> {
    let link = |name: &str, what: &str| -> Result<netlink::Link> {
        netlink::link_by_name(name)
            .map_err(|e| Error::io(format!("reading interface {name}"), e))?
            .ok_or_else(|| Error::config(format!("{what}interface {name} does not exist")))
    };
    let port = |link: netlink::Link, vnet| Port {
        mtu: link.mtu,
        name: link.name,
        ifindex: link.ifindex,
        mac: link.mac,
        vnet,
    };
    let mut ports = Vec::new();
    for lan in &cfg.lans {
        let link = link(&lan.ifname, "")?;
        if link.kind != 1 {
            return Err(Error::config(format!(
                "{} is not an Ethernet interface (ARPHRD {}): subway routes Ethernet frames",
                lan.ifname, link.kind
            )));
        }
        let room = cfg.xsk.frame_size as usize - 256;
        if link.mtu as usize + 14 + 4 > room {
            return Err(Error::config(format!(
                "{} has MTU {}, more than a {}-byte UMEM frame holds: set [Tuning] FrameSize = 4096 or lower the MTU",
                lan.ifname, link.mtu, cfg.xsk.frame_size
            )));
        }
        ports.push(port(link, lan.vnet));
    }
    let uplink = match &cfg.uplink {
        None => None,
        Some(name) => match ports.iter().position(|p| &p.name == name) {
            Some(i) => Some(i as u16),
            None => {
                ports.push(port(link(name, "uplink ")?, UPLINK_VNET));
                Some((ports.len() - 1) as u16)
            }
        },
    };
    if let Some(up) = uplink.and_then(|u| ports.get(u as usize))
        && up.vnet != 0
        && up.vnet != UPLINK_VNET
    {
        return Err(Error::config(format!(
            "the uplink {} is a [Lan] of a non-default VNET: the tunnel's own traffic is routed by the kernel, \
             which serves the default VNET only; use a dedicated uplink or a default-VNET [Lan]",
            up.name
        )));
    }
    Ok((ports, uplink))
}

/// Step 2: the uplink's addresses, which WireGuard listens on.
fn uplink_addresses(netlink: &mut Netlink, ports: &[Port], uplink: Option<u16>) -> Result<Vec<IpAddr>> {
    let Some(up) = uplink.and_then(|u| ports.get(u as usize)) else {
        return Ok(Vec::new());
    };
    let addrs: Vec<IpAddr> = netlink
        .addresses(up.ifindex)
        .map_err(|e| Error::io(format!("addresses of {}", up.name), e))?
        .iter()
        .map(|n| n.addr())
        .collect();
    if addrs.is_empty() {
        return Err(Error::config(
            "the uplink has no IP address: WireGuard needs one to listen on",
        ));
    }
    Ok(addrs)
}

/// Step 3, fail safe first: the fence on the tunnelled prefixes (and the
/// VNET interfaces) is in the kernel before anything else changes, and
/// stays if the start fails from here on. Then non-default VNETs'
/// interfaces leave the kernel's routing, and the default VNET's LANs
/// forward (for the slow path), all undone on stop.
fn prepare_kernel(
    cfg: &DataplaneConfig,
    netlink: &mut Netlink,
    ports: &[Port],
    uplink: Option<u16>,
    pieces: &failsafe::Pieces,
) -> Result<KernelUndo> {
    let mut undo = KernelUndo::default();
    undo.fail_open = cfg.fail_open;
    let isolated: Vec<&Port> = ports.iter().filter(|p| p.vnet != 0 && p.vnet != UPLINK_VNET).collect();
    // The gateway's addresses that exist only in non-default VNETs: the
    // kernel accepts a packet for any of its addresses on any interface,
    // so the default VNET could otherwise reach them.
    let mut vnet_only = Vec::new();
    if !isolated.is_empty() {
        let mut elsewhere = Vec::new();
        for p in ports {
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
            tunnelled: pieces.folded(),
            vnet_ifaces: isolated.iter().map(|p| p.name.clone()).collect(),
            vnet_only_addrs: vnet_only,
        })?;
    }
    for p in &isolated {
        undo.isolate(netlink, p)?;
    }
    // The kernel forwards for the slow path (first packets to a peer,
    // unknown LAN neighbours): on the default VNET's LAN interfaces only,
    // never box-wide.
    for p in ports.iter().filter(|p| p.vnet == 0) {
        undo.forwarding(&p.name, uplink.is_some_and(|u| ports[u as usize].ifindex == p.ifindex))?;
    }
    undo.lan_routes_add(&crate::plan::default_vnet_routes(&cfg.lans))?;
    Ok(undo)
}

/// Step 4: the slow-path TUN, with the tunnel's MTU, and the kernel's
/// routes of the default VNET's peer prefixes pointing at it, so that what
/// the kernel forwards or sends there (first packets before a handshake,
/// the gateway's own traffic) reaches the control thread and the tunnel,
/// never the uplink in clear.
fn open_slow_path(
    cfg: &DataplaneConfig,
    netlink: &mut Netlink,
    ports: &[Port],
    uplink: Option<u16>,
    fib: &Fib,
    mut events: Option<&mut netlink::RoutingEvents>,
) -> Result<SlowPath> {
    let name = tun_name(&cfg.name);
    let slow = SlowPath::create(&name).map_err(|e| Error::io(format!("creating the slow-path TUN {name}"), e))?;
    if let (Some(ev), Ok(name)) = (events.as_deref_mut(), std::ffi::CString::new(slow.name())) {
        // SAFETY: a NUL-terminated interface name.
        ev.ignore_routes_via(unsafe { libc::if_nametoindex(name.as_ptr()) });
    }
    tun_sysctls(slow.name())?;
    if let Some(up) = uplink.and_then(|u| ports.get(u as usize)) {
        let mtu = up.mtu.saturating_sub(tunnel::TUNNEL_OVERHEAD).max(1280);
        slow.set_mtu(mtu)
            .map_err(|e| Error::io(format!("setting the MTU of {} to {mtu}", slow.name()), e))?;
    }
    let tun_nets: Vec<IpNet> = fib
        .routes()
        .iter()
        .filter(|r| r.vnet == 0 && r.target.is_tunnel())
        .map(|r| r.prefix)
        .collect();
    kernel_routes(netlink, true, &tun_nets, slow.name(), false, events)?;
    Ok(slow)
}

/// Step 5: the XDP program's maps (attached last: until then the kernel
/// has it all). WireGuard is steered only when addressed to the uplink's
/// own addresses: other traffic to the same port (a WireGuard server
/// behind the gateway, LAN hosts talking to one) is not ours.
fn load_steering(cfg: &DataplaneConfig, ports: &[Port], fib: &Fib, uplink_addrs: &[IpAddr]) -> Result<XdpSteering> {
    let mut xdp = XdpSteering::load()?;
    if cfg.listen_port != 0 {
        let listen = uplink_addrs.len() * cfg.source_ports.max(1) as usize;
        if listen > subway_common::MAX_LISTEN as usize {
            return Err(Error::config(format!(
                "SourcePorts = {} on the uplink's {} addresses needs {listen} XDP listen entries, more than the {} \
                 the program holds: lower SourcePorts, or remove addresses from the uplink",
                cfg.source_ports,
                uplink_addrs.len(),
                subway_common::MAX_LISTEN
            )));
        }
        for a in uplink_addrs {
            for k in listen_keys(*a, cfg.listen_port, cfg.source_ports) {
                xdp.add_listen(k)?;
            }
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
        xdp.set_route(r.vnet, r.prefix, steer(r.target, ports, fib))?;
    }
    Ok(xdp)
}

/// The XDP program's listen entries for one uplink address: the listen
/// port and the `SourcePorts` after it.
pub(super) fn listen_keys(addr: IpAddr, port: u16, ports: u16) -> impl Iterator<Item = subway_common::ListenKey> {
    crate::config::tunnel_ports(port, ports).map(move |p| match addr {
        IpAddr::V4(v4) => subway_common::ListenKey::v4(v4.octets(), p),
        IpAddr::V6(v6) => subway_common::ListenKey::v6(v6.octets(), p),
    })
}

/// Step 6: a worker per served RX queue, pinned round-robin to the
/// configured cores, its sockets in the XDP program's socket map.
fn build_workers(cfg: &DataplaneConfig, ports: &[Port], xdp: &mut XdpSteering) -> Result<Vec<Worker>> {
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
        return Err(Error::config(format!(
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
            .ok_or_else(|| Error::config(format!("queue {q} is beyond the supported maximum")))?;
            xdp.set_xsk(idx, fd)?;
        }
        built.push(w);
    }
    Ok(built)
}
