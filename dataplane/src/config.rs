//! What the dataplane is asked to run: the LAN interfaces, the peers'
//! routes and the tuning, as the control crate hands them over; and what a
//! live change did.

use crate::fib::VnetId;
use crate::xdp::XdpAttach;
use crate::xsk::XskOptions;
use ipnet::IpNet;

/// A LAN interface to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanConfig {
    pub ifname: String,
    /// Prefixes reached through this interface; empty means the prefixes
    /// of the addresses configured on it.
    pub subnets: Vec<IpNet>,
    pub vnet: VnetId,
    /// Prefixes behind routers on this LAN (`Route = P via H`).
    pub routes: Vec<ViaRoute>,
}

/// A prefix reached through one or more routers on a LAN (several: ECMP,
/// each flow on one of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViaRoute {
    pub prefix: IpNet,
    pub hops: Vec<std::net::IpAddr>,
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
    /// The tunnel's datagrams leave from `listen_port` .. `listen_port +
    /// source_ports - 1`, one port per inner flow (the receiver's RSS then
    /// spreads one peer over its queues); all of them receive. At least 1.
    pub source_ports: u16,
    /// WireGuard peers: their id, VNET and AllowedIPs.
    pub peers: Vec<PeerRoutes>,
    /// `FailMode = open`: a clean stop removes the fail-safe table.
    pub fail_open: bool,
    /// [Policy] sections, one per VNET that has one.
    pub policies: Vec<crate::policy::PolicyConfig>,
    /// The flow table's size and timeouts (taken at start).
    pub flows: crate::policy::FlowLimits,
}

/// The ports the tunnel sends from and receives on: the listen port and
/// the `SourcePorts` after it (`source_ports` of them, at least one).
pub fn tunnel_ports(listen_port: u16, source_ports: u16) -> std::ops::RangeInclusive<u16> {
    listen_port..=listen_port.saturating_add(source_ports.max(1) - 1)
}

/// The routes a peer owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRoutes {
    /// The peer's id on the WireGuard device (stable while it exists).
    pub id: u32,
    pub vnet: VnetId,
    pub allowed_ips: Vec<IpNet>,
    /// A route group member's priority: where several peers list one
    /// prefix, the healthy ones of the highest priority carry it.
    pub priority: Option<u8>,
    /// Healthy (probes answered); a peer outside a route group always is.
    pub up: bool,
}

/// What [`Dataplane::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: Vec<(VnetId, IpNet)>,
    pub removed: Vec<(VnetId, IpNet)>,
    pub retargeted: Vec<(VnetId, IpNet)>,
}

pub use subway_common::UPLINK_VNET;
