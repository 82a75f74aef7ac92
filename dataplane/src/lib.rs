//! subway's packet path: the XDP steering program's loader, AF_XDP workers
//! pinned to cores, packet codecs, the FIB, the neighbour mirror, the
//! kernel slow path and the counters. The control crate configures a
//! [`Dataplane`] and drives its housekeeping; nothing here reads config
//! files or talks to users.

pub mod error;
pub mod fib;
pub mod forward;
pub mod fxhash;
pub mod netlink;
pub mod slowpath;
pub mod stats;
pub mod tables;
pub mod tunnel;
pub mod wg;
pub mod wire;
pub mod worker;
pub mod xdp;

pub use error::{Error, Result};
pub use subway_common::MAX_QUEUES;
pub use worker::{BindMode, WorkerInfo, XskOptions};
pub use xdp::XdpAttach;

use crate::fib::{Fib, Target, VnetId};
use crate::netlink::{Neighbour, Netlink};
use crate::slowpath::SlowPath;
use crate::stats::WorkerStats;
use crate::tables::{NeighTable, Port, SharedTables, Tables};
use crate::worker::Worker;
use crate::xdp::XdpSteering;
use ipnet::IpNet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use subway_common::{IfaceConf, STEER_LOCAL, STEER_REDIRECT, Steer, XdpCounter};

/// A LAN interface to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanConfig {
    pub ifname: String,
    /// Prefixes reached through this interface; empty means the prefixes
    /// of the addresses configured on it.
    pub subnets: Vec<IpNet>,
    pub vnet: VnetId,
}

/// Everything the dataplane needs to start.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// Instance name (the config file's stem); names the slow-path TUN.
    pub name: String,
    pub lans: Vec<LanConfig>,
    /// RX queues to serve; `None` means every queue the ports have.
    pub queues: Option<Vec<u32>>,
    /// Cores to pin workers to, round-robin; `None` means every core.
    pub cores: Option<Vec<usize>>,
    pub xsk: XskOptions,
    pub xdp_mode: XdpAttach,
    /// The interface toward the peers; it may also be a [Lan] (one-armed).
    pub uplink: Option<String>,
    /// WireGuard listen port (0: no tunnel).
    pub listen_port: u16,
    /// WireGuard peers, by id: their VNET and AllowedIPs.
    pub peers: Vec<PeerRoutes>,
}

/// The routes a peer owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRoutes {
    pub vnet: VnetId,
    pub allowed_ips: Vec<IpNet>,
}

/// The VNET of a dedicated uplink: no routes, WireGuard only.
pub const UPLINK_VNET: VnetId = u32::MAX;

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
    pub fn xsk_stats(&self) -> Vec<(String, worker::XskStats)> {
        if self.thread.is_none() {
            return Vec::new();
        }
        self.sockets
            .iter()
            .map(|(n, fd)| (n.clone(), worker::XskStats::read(*fd).unwrap_or_default()))
            .collect()
    }
}

/// The running packet path. Dropping it stops the workers, closes the
/// sockets and detaches XDP.
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    workers: Vec<WorkerHandle>,
    tables: SharedTables,
    netlink: Netlink,
    neigh_scratch: Vec<Neighbour>,
    slow: Arc<SlowPath>,
    // Dropped last: detaching XDP after the sockets close is harmless
    // (the redirect falls back to XDP_PASS).
    xdp: XdpSteering,
}

/// The slow-path TUN's name for an instance: "sw-" and up to 12 characters.
/// Long names keep 7 characters and a hash of the whole name, so that two
/// instances on one host do not collide.
pub fn tun_name(instance: &str) -> String {
    let clean: String = instance
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    if clean.len() <= 12 {
        return format!("sw-{clean}");
    }
    let h = instance
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    format!("sw-{}-{:04x}", &clean[..7], h & 0xffff)
}

impl Dataplane {
    pub fn start(cfg: &DataplaneConfig) -> Result<Dataplane> {
        if cfg.lans.is_empty() {
            return Err(Error::msg("no [Lan] interface configured"));
        }
        let mut netlink = Netlink::open().map_err(|e| Error::io("opening rtnetlink", e))?;

        // Ports, their prefixes and the gateway's own addresses.
        let mut ports = Vec::new();
        let mut fib = Fib::new();
        let mut locals = Vec::new();
        for (i, lan) in cfg.lans.iter().enumerate() {
            let link = netlink::link_by_name(&lan.ifname)
                .map_err(|e| Error::io(format!("reading interface {}", lan.ifname), e))?
                .ok_or_else(|| Error::msg(format!("interface {} does not exist", lan.ifname)))?;
            let addrs = netlink
                .addresses(link.ifindex)
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
            for s in subnets {
                fib.insert(lan.vnet, s, Target::Port(i as u16))
                    .map_err(|e| Error::msg(format!("{}: {e}", lan.ifname)))?;
            }
            for a in addrs {
                locals.push((lan.vnet, IpNet::from(a.addr())));
            }
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
        for (id, p) in cfg.peers.iter().enumerate() {
            for net in &p.allowed_ips {
                fib.insert(p.vnet, *net, Target::Peer(id as u32))
                    .map_err(|e| Error::msg(format!("peer {id} AllowedIPs: {e}")))?;
            }
        }
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
        for (vnet, host) in locals {
            // Two interfaces with one address is odd but harmless.
            let _ = fib.insert(vnet, host, Target::Local);
        }
        check_forwarding();

        let mut neigh_scratch = Vec::new();
        let neigh = read_neighbours(&mut netlink, &ports, &mut neigh_scratch)?;
        let tables = tables::shared(Tables {
            fib: Arc::new(fib.clone()),
            neigh,
            ports: ports.clone(),
            peers: cfg
                .peers
                .iter()
                .map(|p| tables::PeerRt {
                    vnet: p.vnet,
                    session: None,
                    path: None,
                    stats: Arc::default(),
                })
                .collect(),
            sessions: Default::default(),
            uplink,
            uplink_addrs: uplink_addrs.clone(),
            listen_port: cfg.listen_port,
        });

        let slow = Arc::new(
            SlowPath::create(&tun_name(&cfg.name))
                .map_err(|e| Error::io(format!("creating the slow-path TUN {}", tun_name(&cfg.name)), e))?,
        );

        if let Some(up) = uplink.and_then(|u| ports.get(u as usize)) {
            let mtu = up.mtu.saturating_sub(tunnel::TUNNEL_OVERHEAD).max(1280);
            slow.set_mtu(mtu)
                .map_err(|e| Error::io(format!("setting the MTU of {} to {mtu}", slow.name()), e))?;
        }
        // The kernel's routes to the peers' prefixes point at the TUN, so
        // that what the kernel forwards or sends there (first packets before
        // a handshake, the gateway's own traffic) reaches the control thread
        // and the tunnel, never the uplink in clear.
        for p in &cfg.peers {
            for net in p.allowed_ips.iter().filter(|_| p.vnet == 0) {
                let fam = if net.addr().is_ipv4() { "-4" } else { "-6" };
                let out = std::process::Command::new("ip")
                    .args([fam, "route", "replace", &net.trunc().to_string(), "dev", slow.name()])
                    .output()
                    .map_err(|e| Error::io("running ip route", e))?;
                if !out.status.success() {
                    return Err(Error::msg(format!(
                        "adding the kernel route {net} dev {}: {}",
                        slow.name(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
        }

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
            let steer = match r.target {
                Target::Port(p) => Steer {
                    action: STEER_REDIRECT,
                    egress_ifindex: ports[p as usize].ifindex,
                },
                Target::Peer(_) => Steer {
                    action: STEER_REDIRECT,
                    egress_ifindex: 0,
                },
                Target::Local => Steer {
                    action: STEER_LOCAL,
                    egress_ifindex: 0,
                },
            };
            xdp.set_route(r.vnet, r.prefix, steer)?;
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
        let mut dp = Dataplane {
            stop: stop.clone(),
            workers: Vec::new(),
            tables: tables.clone(),
            netlink,
            neigh_scratch,
            slow: slow.clone(),
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
        let r = self.netlink.route_get(dst.ip()).ok()??;
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

    /// Re-reads the kernel's neighbour table and publishes new tables if
    /// anything changed. Returns whether it did.
    pub fn refresh_neighbours(&mut self) -> Result<bool> {
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

    /// Stops the workers and waits for them.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        self.xdp.detach_all();
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.stop();
    }
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

fn check_forwarding() {
    if std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        tracing::warn!(
            "net.ipv4.conf.all.rp_filter is 1 (strict): the kernel may drop packets handed to it through the \
             slow-path TUN; set it to 0 or 2 (loose)"
        );
    }
    for (path, what) in [
        ("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding"),
    ] {
        if std::fs::read_to_string(path).map(|s| s.trim() == "0").unwrap_or(false) {
            tracing::warn!(
                "{what} is 0: packets handed to the kernel slow path (unknown neighbour, TTL expiring) will not be forwarded; set it to 1"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tun_names_fit_and_differ() {
        assert_eq!(super::tun_name("site-a"), "sw-site-a");
        let (a, b) = (super::tun_name("gateway-site-a"), super::tun_name("gateway-site-b"));
        assert_ne!(a, b);
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
    }
}
